"""The paper's comparison at CPU scale: three variants x seeds, every downstream evaluation.

    python -m mslam_jax.reproduce --output=runs/reproduce            # 75 min on 2 cores
    python -m mslam_jax.reproduce --output=runs/reproduce_quick --quick   # 17 min

For each seed it pre-trains the tiny model as w2v-BERT (speech only),
mSLAM-TLM and mSLAM-CTC with the same steps and batch (mSLAM, Bapna et al.
2022, arXiv:2202.01374), exports each, and runs the downstream suite on each
and on two baselines: the same encoder untrained (random init) and log-mel
features (unnormalised and normalised; speech-only evaluations). Every
downstream head trains on the frozen encoder (a probe of the representation,
and what a 2-core budget affords; `python -m mslam_jax.finetune` fine-tunes
the whole encoder by default). It writes

    OUTPUT/results.md      mean +- std over seeds per evaluation and per language group
    OUTPUT/results.json    every score of every run
    OUTPUT/pretraining.png loss curves per variant (mean over seeds)
    OUTPUT/downstream.png  downstream scores with error bars (std over seeds)

Resumable: each unit (a pre-training, an export, a downstream run) leaves a
marker when done and is skipped when run again; a killed pre-training or
fine-tuning resumes from its last checkpoint.

The full mode uses the large corpus (built with `python -m
mslam_jax.corpus.build --size=large`, about 2 minutes with espeak-ng and
Debian mirrors) when --corpus_dir names it or it is at the default place;
--quick uses the committed embedded corpus.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from mslam_jax import console
from mslam_jax import host_memory

if __name__ == '__main__':
  host_memory.configure_on_cpu()  # first: it may re-execute the process (host_memory.py)
  console.quiet_unless_verbose()  # before jax and tensorflow load their loggers

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mslam_jax
from mslam_jax import report
from mslam_jax import trainer

VARIANTS = {  # name -> gin file (the paper's three pre-training variants)
    'w2v_bert': 'gin/variants/w2v_bert.gin',
    'mslam_tlm': 'gin/variants/mslam_tlm.gin',
    'mslam_ctc': 'gin/variants/mslam_ctc.gin',
}
BASELINES = ('random_init', 'logmel', 'logmel_normalized')
LABELS = {'w2v_bert': 'w2v-BERT', 'mslam_tlm': 'mSLAM-TLM', 'mslam_ctc': 'mSLAM-CTC',
          'random_init': 'random init', 'logmel': 'log-mel',
          'logmel_normalized': 'log-mel (norm.)'}
COLORS = {'w2v_bert': 'C0', 'mslam_tlm': 'C1', 'mslam_ctc': 'C2', 'random_init': 'C7',
          'logmel': 'C8', 'logmel_normalized': 'C9'}  # one colour per backbone in every plot
# downstream evaluation -> (gin file, needs text input, headline metric key, higher is better)
EVALUATIONS = {
    'language_id': ('gin/downstream/language_id.gin', False),
    'ctc_probe': ('gin/downstream/ctc_probe.gin', False),
    'speech_translation': ('gin/downstream/speech_translation.gin', False),
    'multimodal_translation': ('gin/downstream/multimodal_translation.gin', True),
    'retrieval': ('gin/downstream/retrieval.gin', True),
}
# Script groups for the per-group table (languages of the corpus builder's presets,
# mslam_jax/corpus/build.py).
GROUPS = {
    'Latin': ('en', 'de', 'fr', 'es', 'it', 'pt', 'nl', 'pl', 'cs', 'tr', 'sv', 'fi', 'hu',
              'vi'),
    'Cyrillic': ('ru', 'uk'),
    'Greek': ('el',),
    'Hangul/Devanagari/Arabic': ('ko', 'hi', 'ar'),
}
DEFAULT_LARGE_CORPUS = '~/mslam_data/corpus_large'
# Ours: heads on a frozen encoder take a larger step than full fine-tuning (at 3e-3 and
# 80 steps the language-ID probe still predicted one class).
PROBE_LEARNING_RATE = 1e-2


@dataclasses.dataclass(frozen=True)
class Budget:
  """Steps and sizes of one reproduction mode (ours, sized for a 2-core CPU)."""
  seeds: Tuple[int, ...]
  pretrain_steps: int
  finetune_steps: int
  corpus_dir: str
  vocab_size: int                      # ModelConfig.vocab_size (>= the corpus vocabulary)
  languages: Optional[Tuple[str, ...]]
  max_train_per_language: Optional[int]
  max_eval_per_language: Optional[int]
  evaluations: Tuple[str, ...]


QUICK = Budget(seeds=(0, 1), pretrain_steps=40, finetune_steps=40,
               corpus_dir='tasks/embedded_corpus', vocab_size=1024, languages=None,
               max_train_per_language=None, max_eval_per_language=None,
               evaluations=tuple(EVALUATIONS))
# 75 minutes on a 2-core CPU (measured, unit by unit: benchmarks/RESULTS.md). Four
# languages in three scripts keep the downstream sets small enough for 3 seeds x 6 backbones.
FULL = Budget(seeds=(0, 1, 2), pretrain_steps=200, finetune_steps=120,
              corpus_dir=DEFAULT_LARGE_CORPUS, vocab_size=2048,
              languages=('en', 'de', 'ru', 'el'),
              max_train_per_language=80, max_eval_per_language=25,
              evaluations=tuple(EVALUATIONS))


class Progress:
  """One line per unit: [k/n] what, its time, and an ETA from the mean time of units run."""

  def __init__(self, total: int):
    self.total, self.done, self.ran, self.spent = total, 0, 0, 0.0
    self.start = time.perf_counter()

  def skip(self, what: str) -> None:
    self.done += 1
    print(f'[{self.done}/{self.total}] {what}: done before, skipped', flush=True)

  def line(self, what: str, seconds: float) -> None:
    self.done, self.ran, self.spent = self.done + 1, self.ran + 1, self.spent + seconds
    eta = self.spent / self.ran * (self.total - self.done)
    print(f'[{self.done}/{self.total}] {what}: {seconds:.0f} s  (elapsed '
          f'{(time.perf_counter() - self.start) / 60:.1f} min, ETA {eta / 60:.1f} min)',
          flush=True)


@contextlib.contextmanager
def _logged(path: str):
  """Sends a unit's console output (and library noise) to its log file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a', encoding='utf-8') as f, contextlib.redirect_stdout(f), \
      contextlib.redirect_stderr(f):
    yield


def _corpus_bindings(budget: Budget) -> List[str]:
  corpus = os.path.expanduser(budget.corpus_dir)
  if budget.corpus_dir == 'tasks/embedded_corpus':
    return []
  return ['--gin.DataConfig.task_modules=()', f"--gin.DataConfig.corpus_dirs=('{corpus}',)",
          f"--gin.DataConfig.vocabulary_path='{corpus}/vocab.txt'",
          f'--gin.ModelConfig.vocab_size={budget.vocab_size}',
          # The large corpus' paired utterances run 2-8 s (paired data is never cropped).
          '--gin.BatchConfig.paired_frames=800', '--gin.BatchConfig.paired_text_length=200']


def pretrain(output: str, variant: str, seed: int, budget: Budget) -> str:
  from mslam_jax import train  # pylint: disable=g-import-not-at-top
  model_dir = os.path.join(output, 'pretrain', f'{variant}_seed{seed}')
  train.main(['--gin_file=gin/pretrain_tiny_cpu.gin', f'--gin_file={VARIANTS[variant]}',
              f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={budget.pretrain_steps}',
              f'--gin.TrainConfig.seed={seed}', f'--gin.DataConfig.seed={seed}',
              f'--gin.TrainConfig.save_every={budget.pretrain_steps}',
              *_corpus_bindings(budget)])
  return model_dir


def export_dir_of(output: str, backbone: str, seed: int) -> str:
  return os.path.join(output, 'exports', f'{backbone}_seed{seed}')


def export(output: str, backbone: str, seed: int, budget: Budget) -> None:
  from mslam_jax import export as export_lib  # pylint: disable=g-import-not-at-top
  out = export_dir_of(output, backbone, seed)
  if backbone == 'random_init':
    export_lib.main(['--random_init', '--gin_file=gin/pretrain_tiny_cpu.gin',
                     f'--seed={seed}', f'--output={out}', *_corpus_bindings(budget)])
  else:
    export_lib.main([f'--model_dir={os.path.join(output, "pretrain", f"{backbone}_seed{seed}")}',
                     f'--output={out}'])


def downstream(output: str, evaluation: str, backbone: str, seed: int, budget: Budget
               ) -> Dict[str, Any]:
  from mslam_jax import finetune  # pylint: disable=g-import-not-at-top
  model_dir = os.path.join(output, 'downstream', evaluation, f'{backbone}_seed{seed}')
  is_export = backbone in VARIANTS or backbone == 'random_init'
  corpus = os.path.expanduser(budget.corpus_dir)
  argv = [f'--gin_file={EVALUATIONS[evaluation][0]}', '--gin_file=gin/downstream/tiny.gin',
          f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.BACKBONE='{'export' if is_export else backbone}'",
          f"--gin.EXPORT_DIR='{export_dir_of(output, backbone, seed) if is_export else ''}'",
          f"--gin.DownstreamConfig.corpus_dir='{corpus}'",
          f'--gin.FinetuneConfig.seed={seed}',
          # Probes: the frozen encoder (a representation test, and affordable on a CPU).
          '--gin.FinetuneConfig.freeze_encoder=True', '--gin.DownstreamConfig.beam_size=1',
          "--gin.DownstreamConfig.eval_splits=('test',)",
          f'--gin.FinetuneConfig.learning_rate={PROBE_LEARNING_RATE}']
  if evaluation != 'retrieval':
    argv.append(f'--gin.FinetuneConfig.train_steps={budget.finetune_steps}')
  if budget.languages:
    argv.append(f'--gin.DownstreamConfig.languages={tuple(budget.languages)!r}')
  for key in ('max_train_per_language', 'max_eval_per_language'):
    if getattr(budget, key) is not None:
      argv.append(f'--gin.DownstreamConfig.{key}={getattr(budget, key)}')
  finetune.main(argv)
  with open(os.path.join(model_dir, 'scores.json'), encoding='utf-8') as f:
    return json.load(f)


def plan(budget: Budget) -> List[Tuple[str, ...]]:
  """Every unit in order: ('pretrain', variant, seed), ('export', ...), ('downstream', ...)."""
  units = []
  for seed in budget.seeds:
    for variant in VARIANTS:
      units.append(('pretrain', variant, seed))
      units.append(('export', variant, seed))
    units.append(('export', 'random_init', seed))
  for seed in budget.seeds:
    for evaluation in budget.evaluations:
      for backbone in tuple(VARIANTS) + BASELINES:
        needs_text = EVALUATIONS[evaluation][1]
        # log-mel has no text input, and neither has the speech-only w2v-BERT.
        if needs_text and (backbone.startswith('logmel') or backbone == 'w2v_bert'):
          continue
        # Per-utterance normalised log-mel has mean 0 and standard deviation 1 in
        # every channel, so the language-ID head's mean+std pooling reads a
        # constant (measured: chance): no run.
        if evaluation == 'language_id' and backbone == 'logmel_normalized':
          continue
        units.append(('downstream', evaluation, backbone, seed))
  return units


def _marker(output: str, unit: Tuple[str, ...]) -> str:
  return os.path.join(output, 'done', '_'.join(map(str, unit)))


def run_all(output: str, budget: Budget) -> Dict[str, Any]:
  units = plan(budget)
  progress = Progress(len(units))
  results: Dict[str, Any] = {'budget': dataclasses.asdict(budget), 'downstream': []}
  for unit in units:
    what = ' '.join(map(str, unit))
    marker = _marker(output, unit)
    if os.path.exists(marker):
      progress.skip(what)
      continue
    start = time.perf_counter()
    log = os.path.join(output, 'logs', '_'.join(map(str, unit)) + '.log')
    try:
      with _logged(log):
        if unit[0] == 'pretrain':
          pretrain(output, unit[1], unit[2], budget)
        elif unit[0] == 'export':
          export(output, unit[1], unit[2], budget)
        else:
          downstream(output, unit[1], unit[2], unit[3], budget)
    except trainer.Preempted as stop:  # saved; not marked done, so a rerun resumes it
      print(f'{what}: SIGTERM at step {stop.step} of {stop.num_steps}, saved; the same '
            f'command resumes from there (log: {log})', flush=True)
      raise
    except Exception:
      print(f'{what} failed; its log: {log}', flush=True)
      raise
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, 'w', encoding='utf-8') as f:
      f.write(f'{time.perf_counter() - start:.1f}\n')
    progress.line(what, time.perf_counter() - start)
  results['downstream'] = collect(output, budget)
  results['pretraining'] = pretraining_curves(output, budget)
  results['unit_minutes'] = unit_minutes(output, units)
  return results


def unit_minutes(output: str, units: Sequence[Tuple[str, ...]]) -> Dict[str, float]:
  """Minutes spent per kind of unit ('pretrain w2v_bert', 'downstream ctc_probe', ...), and
  'total': what an uninterrupted run costs, summed from the markers' times even when the
  units ran in several sittings."""
  spent: Dict[str, float] = {}
  for unit in units:
    with open(_marker(output, unit), encoding='utf-8') as f:
      seconds = float(f.read().strip() or 0)
    kind = f'{unit[0]} {unit[1]}'
    spent[kind] = spent.get(kind, 0.0) + seconds / 60
    spent['total'] = spent.get('total', 0.0) + seconds / 60
  return {k: round(v, 1) for k, v in spent.items()}


def collect(output: str, budget: Budget) -> List[Dict[str, Any]]:
  rows = []
  for unit in plan(budget):
    if unit[0] != 'downstream':
      continue
    _, evaluation, backbone, seed = unit
    path = os.path.join(output, 'downstream', evaluation, f'{backbone}_seed{seed}',
                        'scores.json')
    with open(path, encoding='utf-8') as f:
      scores = json.load(f)
    rows.append({'evaluation': evaluation, 'backbone': backbone, 'seed': seed,
                 'test': scores['test']})
  return rows


def headline(evaluation: str, test: Dict[str, Any]) -> Dict[str, float]:
  """metric name -> value of one run's test scores (higher is better unless CER/WER)."""
  if evaluation == 'language_id':
    return {'accuracy': test['accuracy']}
  if evaluation == 'ctc_probe':
    return {'CER': test['cer']}
  if evaluation in ('speech_translation', 'multimodal_translation'):
    out = {'BLEU': test['bleu'], 'chrF': test['chrf']}
    for key, name in (('text_zero_shot', 'zero-shot text BLEU'), ('text', 'text BLEU')):
      if key in test:
        out[name] = test[key]['bleu']
    return out
  return {'speech->text R@1': test['speech_to_text_recall@1'],
          'speech->text R@5': test['speech_to_text_recall@5'],
          'text->speech R@1': test['text_to_speech_recall@1']}


def _mean_std(values: Sequence[float]) -> str:
  if not values:
    return ''
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{mean:.3g} ± {std:.2g}'


def table(rows: List[Dict[str, Any]], budget: Budget) -> str:
  backbones = [b for b in tuple(VARIANTS) + BASELINES
               if any(r['backbone'] == b for r in rows)]
  header = '| evaluation | metric | ' + ' | '.join(LABELS[b] for b in backbones) + ' |'
  lines = [header, '|' + '---|' * (len(backbones) + 2)]
  for evaluation in budget.evaluations:
    metric_names = []
    for r in rows:
      if r['evaluation'] == evaluation:
        metric_names += [m for m in headline(evaluation, r['test']) if m not in metric_names]
    for metric in metric_names:
      cells = []
      for b in backbones:
        values = [headline(evaluation, r['test']).get(metric) for r in rows
                  if r['evaluation'] == evaluation and r['backbone'] == b]
        cells.append(_mean_std([v for v in values if v is not None]))
      lines.append(f'| {evaluation} | {metric} | ' + ' | '.join(cells) + ' |')
  # Per language group: the headline metric averaged over the group's languages.
  group_lines = ['| evaluation | group | ' + ' | '.join(LABELS[b] for b in backbones) + ' |',
                 '|' + '---|' * (len(backbones) + 2)]
  for evaluation in budget.evaluations:
    if evaluation == 'retrieval':
      continue
    for group, members in GROUPS.items():
      cells, any_value = [], False
      for b in backbones:
        values = []
        for r in rows:
          if r['evaluation'] != evaluation or r['backbone'] != b:
            continue
          per = r['test'].get('per_language', {})
          langs = [lang for lang in per if lang in members]
          if langs:
            values.append(statistics.fmean(per[lang] for lang in langs))
        any_value |= bool(values)
        cells.append(_mean_std(values))
      if any_value:
        group_lines.append(f'| {evaluation} | {group} | ' + ' | '.join(cells) + ' |')
  seeds = len(budget.seeds)
  return ('\n'.join(lines) + f'\n\nMean ± standard deviation over {seeds} seeds (test split). '
          'language_id: accuracy; ctc_probe: character error rate (lower is better); '
          'translation: sacrebleu BLEU/chrF (greedy), zero-shot text: the speech translation '
          'model fed the transcripts as text; multimodal_translation: text BLEU on the '
          'transcripts; retrieval: recall@k of the frozen encoder\'s mean-pooled '
          'encodings, each modality centred (chance 1/n and k/n).\n\n'
          'Per language group (macro average over the group\'s languages; language ID '
          'accuracy, CTC probe CER, speech translation BLEU):\n\n' + '\n'.join(group_lines))


# The paper's orderings (mSLAM, Bapna et al. 2022): (evaluation, metric, better, worse).
# Speech translation: mSLAM-CTC >= w2v-BERT > mSLAM-TLM; CTC helps language ID.
PAPER_ORDERINGS = (
    ('speech_translation', 'BLEU', 'mslam_ctc', 'w2v_bert'),
    ('speech_translation', 'BLEU', 'w2v_bert', 'mslam_tlm'),
    ('speech_translation', 'chrF', 'mslam_ctc', 'w2v_bert'),
    ('speech_translation', 'chrF', 'w2v_bert', 'mslam_tlm'),
    ('language_id', 'accuracy', 'mslam_ctc', 'mslam_tlm'),
    ('language_id', 'accuracy', 'mslam_ctc', 'w2v_bert'),
)


def orderings(rows: List[Dict[str, Any]]) -> str:
  """The paper's orderings, seed by seed: mean ± std of the paired difference, and the
  number of seeds in which it holds (same seed = same downstream data and head init)."""
  lines = ['| evaluation | metric | paper: better > worse | difference (mean ± std) | '
           'holds in |', '|---|---|---|---|---|']
  for evaluation, metric, better, worse in PAPER_ORDERINGS:
    by_seed = {}
    for r in rows:
      if r['evaluation'] == evaluation and r['backbone'] in (better, worse):
        by_seed.setdefault(r['seed'], {})[r['backbone']] = headline(evaluation, r['test'])[metric]
    differences = [v[better] - v[worse] for v in by_seed.values() if len(v) == 2]
    if not differences:
      continue
    holds = sum(d > 0 for d in differences)
    lines.append(f'| {evaluation} | {metric} | {LABELS[better]} > {LABELS[worse]} | '
                 f'{_mean_std(differences)} | {holds} of {len(differences)} seeds |')
  return '\n'.join(lines) if len(lines) > 2 else ''


def pretraining_curves(output: str, budget: Budget) -> Dict[str, Dict[str, List[float]]]:
  """variant -> {'step': [...], 'loss': mean over seeds [...]} from metrics.jsonl."""
  curves = {}
  for variant in VARIANTS:
    per_seed = []
    for seed in budget.seeds:
      path = os.path.join(output, 'pretrain', f'{variant}_seed{seed}', 'metrics.jsonl')
      if os.path.exists(path):
        per_seed.append({r['step']: r for r in report.read_metrics(path)})
    if not per_seed:
      continue
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    curves[variant] = {
        'step': steps,
        **{key: [statistics.fmean(s[step][key] for s in per_seed) for step in steps]
           for key in ('loss', 'speech/contrastive', 'speech/masked_prediction')
           if steps and all(key in s[steps[0]] for s in per_seed)}}
  return curves


def _chance(evaluation: str, metric: str, rows: List[Dict[str, Any]]) -> Optional[float]:
  """The chance level of a headline metric where one is defined (language ID, recall@1)."""
  test = next(r['test'] for r in rows if r['evaluation'] == evaluation)
  if evaluation == 'language_id' and test.get('classes'):
    return 1.0 / len(test['classes'])
  if evaluation == 'retrieval' and metric.endswith('R@1'):
    return test.get('chance@1')
  return None


def plots(output: str, results: Dict[str, Any], budget: Budget) -> List[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  curves = results['pretraining']
  if curves:
    keys = [k for k in ('loss', 'speech/contrastive', 'speech/masked_prediction')
            if all(k in c for c in curves.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
      for variant, c in curves.items():
        ax.plot(c['step'], c[key], label=LABELS[variant])
      ax.set_xlabel('step')
      ax.set_title(key)
    axes[0][0].legend()
    fig.suptitle(f'Pre-training (mean over {len(budget.seeds)} seeds)')
    fig.tight_layout()
    path = os.path.join(output, 'pretraining.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  rows = results['downstream']
  panels = []
  for evaluation in budget.evaluations:
    metric = next(iter(headline(evaluation, next(r for r in rows if r['evaluation'] ==
                                                 evaluation)['test'])))
    panels.append((evaluation, metric))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
  for ax, (evaluation, metric) in zip(axes[0], panels):
    names, means, stds, backbones = [], [], [], []
    for b in tuple(VARIANTS) + BASELINES:
      values = [headline(evaluation, r['test'])[metric] for r in rows
                if r['evaluation'] == evaluation and r['backbone'] == b]
      if values:
        backbones.append(b)
        names.append(LABELS[b])
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    ax.bar(range(len(names)), means, yerr=stds, capsize=3,
           color=[COLORS[b] for b in backbones])
    ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=8)
    chance = _chance(evaluation, metric, rows)
    if chance is not None:
      ax.axhline(chance, color='k', linestyle='--', linewidth=0.8, label='chance')
      ax.legend(fontsize=7)
    ax.set_title(f'{evaluation}\n{metric}', fontsize=9)
  fig.tight_layout()
  path = os.path.join(output, 'downstream.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  paths.append(path)
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output', default='runs/reproduce', help='everything goes here')
  parser.add_argument('--quick', action='store_true',
                      help='2 seeds, 40 steps, embedded corpus: 17 min instead of 75')
  parser.add_argument('--corpus_dir', help='a corpus with downstream splits (default: the '
                      f'large one at {DEFAULT_LARGE_CORPUS}; --quick: the embedded one)')
  parser.add_argument('--seeds', type=int, help='number of seeds (default 3; --quick 2)')
  parser.add_argument('--pretrain_steps', type=int)
  parser.add_argument('--finetune_steps', type=int)
  parser.add_argument('--evaluations', help='comma-separated, of ' + ', '.join(EVALUATIONS))
  parser.add_argument(console.VERBOSE_FLAG, action='store_true',
                      help="keep jax's, XLA's and TensorFlow's start-up logs")
  args = parser.parse_args(argv)
  budget = QUICK if args.quick else FULL
  changes = {}
  if args.corpus_dir:
    changes['corpus_dir'] = args.corpus_dir
  if args.seeds:
    changes['seeds'] = tuple(range(args.seeds))
  if args.pretrain_steps:
    changes['pretrain_steps'] = args.pretrain_steps
  if args.finetune_steps:
    changes['finetune_steps'] = args.finetune_steps
  if args.evaluations:
    chosen = tuple(args.evaluations.split(','))
    unknown = [e for e in chosen if e not in EVALUATIONS]
    if unknown:
      parser.error(f'unknown evaluations {unknown}; choose from {list(EVALUATIONS)}')
    changes['evaluations'] = chosen
  budget = dataclasses.replace(budget, **changes)
  corpus = os.path.expanduser(budget.corpus_dir)
  if not os.path.exists(os.path.join(corpus, 'metadata.json')) and not os.path.isabs(corpus):
    corpus = os.path.join(mslam_jax.REPO_ROOT, corpus)
  if not os.path.exists(os.path.join(corpus, 'metadata.json')):
    raise SystemExit(f'no corpus at {budget.corpus_dir}: build it with\n  python -m '
                     f'mslam_jax.corpus.build --output={budget.corpus_dir} --size=large\n'
                     'or run with --quick (the embedded corpus)')
  budget = dataclasses.replace(budget, corpus_dir=corpus)
  os.makedirs(args.output, exist_ok=True)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir',
                    jax.config.jax_compilation_cache_dir or '.jax_cache')
  print(f'reproduction in {args.output}: seeds {budget.seeds}, {budget.pretrain_steps} '
        f'pre-training steps, {budget.finetune_steps} fine-tuning steps, corpus '
        f'{budget.corpus_dir}; per-unit logs in {args.output}/logs', flush=True)
  start = time.perf_counter()
  results = run_all(args.output, budget)
  results['wall_min'] = round((time.perf_counter() - start) / 60, 1)
  with open(os.path.join(args.output, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  text = table(results['downstream'], budget)
  paper = orderings(results['downstream'])
  if paper:
    text += '\n\nThe paper\'s orderings, paired by seed:\n\n' + paper
  with open(os.path.join(args.output, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text + '\n')
  paths = plots(args.output, results, budget)
  print('\n' + text + '\n', flush=True)
  print(f'units took {results["unit_minutes"]["total"]:.1f} min in all (this sitting '
        f'{results["wall_min"]:.1f} min); wrote {args.output}/results.md, results.json, '
        + ', '.join(paths), flush=True)


if __name__ == '__main__':
  main()
