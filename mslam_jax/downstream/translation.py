"""Speech translation X -> English with a Transformer decoder; multi-modal and zero-shot text.

    speech -> backbone [B, T', d] --memory--> TransformerDecoder -> English characters
    text   -> backbone (shared layers) ----/                 (multi-modal, zero-shot)

- speech translation: fine-tuned on speech only; scored on speech (BLEU and
  chrF from sacrebleu, greedy and beam), and zero-shot on the transcripts as
  text input when the backbone has one (the paper's cross-modal evidence: a
  model fine-tuned on speech translation translates text).
- multi-modal: every step holds a speech translation batch and a text
  translation batch of equal size, text loss weight 5.0 (mSLAM, Bapna et
  al. 2022, "with text translation data mixed into fine-tuning").

Targets are English character ids in the backbone's vocabulary, then EOS,
cut to DecoderConfig.max_length.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mslam_jax import special_ids
from mslam_jax.downstream import data as data_lib
from mslam_jax.downstream import decoder as decoder_lib
from mslam_jax.downstream import engine
from mslam_jax.downstream import metrics
from mslam_jax.encoder import bucket_length

# mSLAM (Bapna et al. 2022): multi-modal fine-tuning weighs the text loss 5.0.
TEXT_LOSS_WEIGHT = 5.0


def cross_entropy(logits: jax.Array, targets: jax.Array, paddings: jax.Array):
  """Mean token cross-entropy over valid targets, and token accuracy."""
  valid = 1.0 - paddings
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  count = jnp.maximum(jnp.sum(valid), 1.0)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * valid) / count
  return jnp.sum(losses * valid) / count, accuracy


class Translation(engine.Evaluation):
  """Speech (and optionally text) translation into English.

  Attributes:
    splits: split -> data.SpeechExample lists with `english` set.
    text_pairs: train text translation pairs for multi-modal fine-tuning
      (None: speech only).
    decoder_config: DecoderConfig (its vocab_size is replaced by the backbone's).
    text_loss_weight: weight of the text translation loss (paper: 5.0).
    beam_size: beam for the scored hypotheses (greedy is scored too).
  """

  def __init__(self, splits: Dict[str, Sequence[data_lib.SpeechExample]], *,
               decoder_config: Optional[decoder_lib.DecoderConfig] = None,
               text_pairs: Optional[Sequence[data_lib.TextPair]] = None,
               text_loss_weight: float = TEXT_LOSS_WEIGHT, beam_size: int = 4,
               eval_batch_size: int = 32, seed: int = 0):
    self.splits = {s: [e for e in ex if e.language != 'en'] for s, ex in splits.items()}
    for split, ex in self.splits.items():
      missing = [e.id for e in ex if not e.english]
      if missing:
        raise ValueError(f'speech translation {split}: {len(missing)} examples have no English '
                         f'translation (e.g. {missing[:3]}); give records an "english" field')
    self.text_pairs = list(text_pairs) if text_pairs else None
    self.name = 'multimodal_translation' if self.text_pairs else 'speech_translation'
    self.decoder_config = decoder_config or decoder_lib.DecoderConfig()
    self.text_loss_weight = text_loss_weight
    self.beam_size = beam_size
    self.eval_batch_size = eval_batch_size
    self.seed = seed

  def prepare(self, backbone) -> None:
    self.backbone = backbone
    vocab = backbone.vocabulary
    engine.check_vocabulary_covers(vocab, [e.english for e in self.splits['train']],
                                   'English translations')
    if self.text_pairs and not backbone.has_text:
      raise ValueError(f'multi-modal fine-tuning needs a text input; {backbone.name} has none')
    cfg = dataclasses.replace(self.decoder_config, vocab_size=vocab.vocab_size)
    self.decoder_config = cfg
    self.decoder = decoder_lib.TransformerDecoder(cfg, backbone.dim, deterministic=True)
    self.train_decoder = decoder_lib.TransformerDecoder(cfg, backbone.dim, deterministic=False)
    self.features = {s: backbone.speech_inputs([e.waveform for e in ex])
                     for s, ex in self.splits.items()}
    self.targets = {s: self._targets([e.english for e in ex]) for s, ex in self.splits.items()}
    self.num_train = len(self.splits['train'])
    if backbone.has_text:
      self.sources = {s: backbone.text_ids([e.transcript for e in ex])
                      for s, ex in self.splits.items()}
    # One shape for every training step (ours): per-batch buckets of the speech, target
    # and text lengths combine into dozens of shapes, each compiled anew (a multi-modal
    # step averaged 7 s on 2 cores that way).
    self.train_lengths = {'speech': engine.bucket_for(self.features['train'], 16),
                          'target': engine.bucket_for(self.targets['train'], 8)}
    if self.text_pairs:
      engine.check_vocabulary_covers(vocab, [p.source for p in self.text_pairs],
                                     'text translation sources')
      sources = backbone.text_ids([p.source for p in self.text_pairs])
      targets = self._targets([p.english for p in self.text_pairs])
      # Text pairs as long as the speech split's transcripts (ours): a few very long
      # sentences would otherwise set the padded length of every text batch.
      limit = engine.bucket_for(self.sources['train'], 8)
      keep = [i for i, ids in enumerate(sources) if len(ids) <= limit]
      if not keep:
        raise ValueError(f'multi-modal fine-tuning: no text pair has a source of at most '
                         f'{limit} characters (the longest speech transcript)')
      print(f'{self.name}: {len(keep)} of {len(sources)} text pairs have sources of at most '
            f'{limit} characters (the longest transcript of the speech training split); '
            'the rest are left out', flush=True)
      self.text_sources = [sources[i] for i in keep]
      self.text_targets = [targets[i] for i in keep]
      self.train_lengths['text'] = engine.bucket_for(self.text_sources, 8)
      self.train_lengths['text_target'] = engine.bucket_for(self.text_targets, 8)
    longest = max(len(t) for t in self.targets['train'])
    # Our choice: hypotheses may run 1.5x the longest training target.
    self.max_decode_length = min(cfg.max_length, bucket_length(int(1.5 * longest), 8))
    self._memory = jax.jit(self._speech_memory)
    self._text_memory = jax.jit(self._text_memory_fn)
    self._greedy = jax.jit(lambda head, m, p: decoder_lib.greedy_decode(
        self.decoder, {'params': head}, m, p, max_length=self.max_decode_length))
    self._beam = jax.jit(lambda head, m, p: decoder_lib.beam_search(
        self.decoder, {'params': head}, m, p, beam_size=self.beam_size,
        max_length=self.max_decode_length)[0])

  def _targets(self, texts: Sequence[str]) -> List[np.ndarray]:
    limit = self.decoder_config.max_length - 1
    return [np.append(ids[:limit], special_ids.EOS_ID).astype(np.int32)
            for ids in self.backbone.text_ids(texts)]

  def _speech_memory(self, encoder_params, batch, rng=None, deterministic=True):
    return self.backbone.speech(encoder_params, batch['features'], batch['feature_paddings'],
                                deterministic=deterministic, rng=rng)

  def _text_memory_fn(self, encoder_params, batch, rng=None, deterministic=True):
    return self.backbone.text(encoder_params, batch['ids'], batch['id_paddings'],
                              deterministic=deterministic, rng=rng)

  def init_head(self, rng):
    return self.decoder.init(rng, jnp.zeros((1, 4), jnp.int32),
                             jnp.zeros((1, 4, self.backbone.dim)), jnp.zeros((1, 4)))['params']

  def train_batch(self, indices, step=0):
    n, lengths = len(indices), self.train_lengths
    speech = engine.speech_batch([self.features['train'][i] for i in indices], n,
                                 lengths['speech'])
    speech.update(engine.ids_batch([self.targets['train'][i] for i in indices], n, 'target_',
                                   lengths['target']))
    batch = {'speech': speech}
    if self.text_pairs:
      # Equal-size text batch, from its own seeded epoch order.
      rows = engine.batch_indices(len(self.text_sources), n, self.seed + 1, step)
      text = engine.ids_batch([self.text_sources[i] for i in rows], n, '', lengths['text'])
      text.update(engine.ids_batch([self.text_targets[i] for i in rows], n, 'target_',
                                   lengths['text_target']))
      batch['text'] = text
    return batch

  def _decoder_loss(self, head, memory, paddings, part, rng, deterministic):
    decoder = self.decoder if deterministic else self.train_decoder
    logits = decoder.apply({'params': head}, decoder_lib.shift_right(part['target_ids']),
                           memory, paddings, rngs=None if deterministic else {'dropout': rng})
    return cross_entropy(logits, part['target_ids'], part['target_id_paddings'])

  def loss(self, head, encoder_params, batch, rng, deterministic):
    rngs = jax.random.split(rng, 4)
    memory, paddings = self._speech_memory(encoder_params, batch['speech'], rngs[0],
                                           deterministic)
    loss, accuracy = self._decoder_loss(head, memory, paddings, batch['speech'], rngs[1],
                                        deterministic)
    out = {'speech_loss': loss, 'token_accuracy': accuracy}
    if 'text' in batch:
      memory, paddings = self._text_memory_fn(encoder_params, batch['text'], rngs[2],
                                              deterministic)
      text_loss, _ = self._decoder_loss(head, memory, paddings, batch['text'], rngs[3],
                                        deterministic)
      out['text_loss'] = text_loss
      loss = loss + self.text_loss_weight * text_loss
    return loss, out

  def translate(self, head, encoder_params, split: str, *, modality: str = 'speech',
                beam: bool = True) -> List[str]:
    """English hypotheses for a split's speech (or its transcripts as text input)."""
    if modality == 'speech':
      inputs, make, memory_fn = self.features[split], engine.speech_batch, self._memory
    else:
      inputs, make, memory_fn = self.sources[split], engine.ids_batch, self._text_memory
    decode = self._beam if beam else self._greedy
    hypotheses = []
    for rows in engine.in_batches(len(inputs), self.eval_batch_size,
                                  f'translating {split} ({modality})'):
      memory, paddings = memory_fn(encoder_params, make([inputs[i] for i in rows],
                                                        self.eval_batch_size))
      ids = np.asarray(decode(head, memory, paddings))[:len(rows)]
      hypotheses.extend(decoder_lib.ids_to_text(ids, self.backbone.vocabulary))
    return hypotheses

  def evaluate(self, head, encoder_params, split: str) -> Dict[str, Any]:
    references = [e.english for e in self.splits[split]]
    scores = {}
    runs = [('speech_greedy', 'speech', False)]
    if self.beam_size > 1:
      runs.insert(0, ('speech_beam', 'speech', True))
    if self.backbone.has_text:
      runs.append(('text_zero_shot' if not self.text_pairs else 'text', 'text', False))
    for name, modality, beam in runs:
      hypotheses = self.translate(head, encoder_params, split, modality=modality, beam=beam)
      result = metrics.translation_scores(hypotheses, references)
      languages = [e.language for e in self.splits[split]]
      per_language = {}
      for lang in sorted(set(languages)):
        pick = [i for i, l in enumerate(languages) if l == lang]
        per_language[lang] = metrics.translation_scores(
            [hypotheses[i] for i in pick], [references[i] for i in pick])['bleu']
      scores[name] = {'bleu': result['bleu'], 'chrf': result['chrf'],
                      'per_language': per_language,
                      'examples': [{'reference': r, 'hypothesis': h}
                                   for r, h in list(zip(references, hypotheses))[:3]]}
      scores['bleu_signature'] = result['bleu_signature']
      scores['chrf_signature'] = result['chrf_signature']
    # The headline: beam search when beam_size > 1, else greedy.
    best = scores[runs[0][0]]
    scores['bleu'], scores['chrf'] = best['bleu'], best['chrf']
    scores['per_language'] = best['per_language']
    scores['decoding'] = runs[0][0]
    return scores
