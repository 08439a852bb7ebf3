"""Downstream runs assembled from gin: which evaluation, data and backbone.

`run()` builds the evaluation (DownstreamConfig) and backbone, fine-tunes with
the shared loop (engine.py, FinetuneConfig) and scores; `summary()` renders the
scores for the console. The command line is `python -m mslam_jax.finetune`.
"""

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import gin

from mslam_jax import partitioning
from mslam_jax import report
from mslam_jax.data import sampler as sampler_lib
from mslam_jax.downstream import asr
from mslam_jax.downstream import backbone as backbone_lib
from mslam_jax.downstream import data as data_lib
from mslam_jax.downstream import decoder as decoder_lib
from mslam_jax.downstream import engine
from mslam_jax.downstream import metrics
from mslam_jax.downstream import retrieval
from mslam_jax.downstream import speech_classification
from mslam_jax.downstream import translation

EVALUATIONS = ('language_id', 'asr', 'speech_translation', 'multimodal_translation',
               'retrieval')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
  """What to evaluate, on which data, with which backbone.

  Attributes:
    evaluation: one of EVALUATIONS.
    backbone: 'export', 'logmel' or 'logmel_normalized'.
    export_dir: the export (mslam_jax.export) for backbone 'export'.
    layer: encoder layer the head reads (None: the top; see mslam_jax/encoder.py).
    corpus_dir: a corpus with downstream splits (mslam_jax.corpus.build).
    languages: languages to use (None: all of the corpus).
    max_train_per_language, max_eval_per_language: caps (None: all).
    text_loss_weight: multi-modal text loss weight (paper: 5.0).
    beam_size: beam of the scored translations (1: greedy only).
    eval_splits: the splits scored after training.
  """
  evaluation: str = 'language_id'
  backbone: str = 'export'
  export_dir: str = ''
  layer: Optional[int] = None
  corpus_dir: str = 'tasks/embedded_corpus'
  languages: Optional[Tuple[str, ...]] = None
  max_train_per_language: Optional[int] = None
  max_eval_per_language: Optional[int] = None
  text_loss_weight: float = translation.TEXT_LOSS_WEIGHT
  beam_size: int = 4
  eval_splits: Tuple[str, ...] = ('dev', 'test')

  def __post_init__(self):
    if self.evaluation not in EVALUATIONS:
      raise ValueError(f'DownstreamConfig.evaluation={self.evaluation!r}; choose one of '
                       f'{EVALUATIONS}')


def load_splits(config: DownstreamConfig, splits: Sequence[str] = ('train', 'dev', 'test')
                ) -> Dict[str, Any]:
  corpus = sampler_lib.resolve_path(config.corpus_dir)
  source = data_lib.corpus_speech_source(corpus)
  out = {}
  for split in splits:
    cap = config.max_train_per_language if split == 'train' else config.max_eval_per_language
    out[split] = data_lib.load_speech(source, split, languages=config.languages,
                                      max_per_language=cap)
  return out


def build_evaluation(config: DownstreamConfig, finetune_config: engine.FinetuneConfig
                     ) -> engine.Evaluation:
  splits = load_splits(config, ('train',) + tuple(s for s in config.eval_splits if s != 'train'))
  kwargs = dict(eval_batch_size=finetune_config.eval_batch_size)
  if config.evaluation == 'language_id':
    return speech_classification.LanguageId(splits, **kwargs)
  if config.evaluation == 'asr':
    return asr.Asr(splits, **kwargs)
  if config.evaluation == 'retrieval':
    return retrieval.Retrieval(splits, **kwargs)
  text_pairs = None
  if config.evaluation == 'multimodal_translation':
    text_pairs = data_lib.corpus_text_pairs(
        sampler_lib.resolve_path(config.corpus_dir), 'train', languages=config.languages)
  return translation.Translation(splits, decoder_config=decoder_lib.DecoderConfig(),
                                 text_pairs=text_pairs, text_loss_weight=config.text_loss_weight,
                                 beam_size=config.beam_size, seed=finetune_config.seed, **kwargs)


def build_backbone(config: DownstreamConfig) -> backbone_lib.Backbone:
  corpus = sampler_lib.resolve_path(config.corpus_dir)
  return backbone_lib.make_backbone(config.backbone, export_dir=config.export_dir,
                                    layer=config.layer,
                                    vocabulary_path=f'{corpus}/vocab.txt')


def summary(scores: Dict[str, Any]) -> str:
  """A few lines a person reads: the headline numbers of each split."""
  lines = [f'{scores["evaluation"]} ({report.backbone_phrase(scores)}, '
           f'{scores["train_steps"]} steps, {scores["wall_s"]} s)']
  for split in ('dev', 'test'):
    s = scores.get(split)
    if not s:
      continue
    if 'accuracy' in s:
      lines.append(f'  {split}: accuracy {s["accuracy"]:.3f} over {s["num_examples"]}')
    if 'cer' in s:
      lines.append(f'  {split}: CER {s["cer"]:.3f}  WER {s["wer"]:.3f}')
    if 'bleu' in s:
      extra = ''.join(f'  {k} BLEU {v["bleu"]:.1f}' for k, v in s.items()
                      if isinstance(v, dict) and 'bleu' in v and k != s.get('decoding'))
      lines.append(f'  {split}: BLEU {s["bleu"]:.1f}  chrF {s["chrf"]:.1f}{extra}')
    if 'speech_to_text_recall@1' in s:
      lines.append(f'  {split}: speech->text R@1 {s["speech_to_text_recall@1"]:.3f} '
                   f'R@5 {s["speech_to_text_recall@5"]:.3f}  text->speech R@1 '
                   f'{s["text_to_speech_recall@1"]:.3f}  (chance@1 {s["chance@1"]:.3f}, '
                   f'{s["examples"]} utterances)')
  test = scores.get('test', {})
  if 'confusion' in test:
    lines.append(metrics.format_confusion(test['confusion'], test['classes']))
  if 'bleu_signature' in test:
    lines.append(f'  sacrebleu: {test["bleu_signature"]} | {test["chrf_signature"]}')
  return '\n'.join(lines)


def run(config: Optional[DownstreamConfig] = None,
        finetune_config: Optional[engine.FinetuneConfig] = None) -> Dict[str, Any]:
  config = config or DownstreamConfig()
  finetune_config = finetune_config or engine.FinetuneConfig()
  if config.evaluation == 'retrieval' and finetune_config.train_steps:
    finetune_config = dataclasses.replace(finetune_config, train_steps=0)
  evaluation = build_evaluation(config, finetune_config)
  backbone = build_backbone(config)
  return engine.run_and_score(evaluation, backbone, finetune_config,
                              splits=config.eval_splits, mesh_config=partitioning.MeshConfig())
