"""A run's summary for a person: final pre-training losses, downstream scores, a loss plot.

    python -m mslam_jax.report --model_dir=runs/demo [--downstream=runs/demo/language_id ...]

Reads MODEL_DIR/metrics.jsonl (pre-training) and each downstream run's
scores.json, prints a short table, and writes MODEL_DIR/loss_curves.png.
"""

import argparse
import io
import json
from typing import Dict, List, Sequence

from mslam_jax import paths

# The loss terms worth a curve (pretrain_loss.py's metric names), in plot order.
CURVES = ('loss', 'speech/contrastive', 'speech/masked_prediction', 'speech/code_perplexity',
          'text/span_mlm', 'paired/tlm_speech', 'paired/tlm_text', 'paired/ctc')


def read_metrics(path: str) -> List[Dict[str, float]]:
  """metrics.jsonl rows by step, without resume markers; a resumed run's repeated steps
  keep the last row (the run that went on)."""
  rows: Dict[int, Dict[str, float]] = {}
  for line in paths.path(path).read_text(encoding='utf-8').splitlines():
    line = line.strip()
    if line:
      row = json.loads(line)
      if 'event' not in row:
        rows[int(row['step'])] = row
  return [rows[s] for s in sorted(rows)]


def plot_curves(rows: Sequence[Dict[str, float]], path: str, title: str = '') -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = [k for k in CURVES if any(k in r for r in rows)]
  cols = min(4, len(keys))
  nrows = -(-len(keys) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    points = [(r['step'], r[key]) for r in rows if key in r]
    ax.plot([p[0] for p in points], [p[1] for p in points])
    ax.set_title(key, fontsize=10)
    ax.set_xlabel('step', fontsize=8)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis('off')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  png = io.BytesIO()  # matplotlib writes local files only; paths also reaches gs://
  fig.savefig(png, format='png', dpi=110)
  plt.close(fig)
  paths.path(path).write_bytes(png.getvalue())
  return path


def backbone_phrase(scores: Dict) -> str:
  """'mslam at step 300, frozen': the backbone, which weights, and whether they trained.

  The weights are named by the export's step (scores['backbone_origin'], from its
  manifest.json), so a probe of a trained export and one of its random init read apart;
  step 0 is an untrained encoder. A backbone without an export (log-mel) has no step.
  """
  name = scores['backbone']
  step = (scores.get('backbone_origin') or {}).get('step')
  if step is not None:
    name += f' at step {step}' + (' (untrained)' if step == 0 else '')
  return f'{name}, {"frozen" if scores["freeze_encoder"] else "fine-tuned"}'


def downstream_line(scores: Dict, name: str, width: int = 45) -> str:
  """One line: the run's folder name, the backbone, and (from column `width`) its headline
  test score."""
  test = scores.get('test', {})
  what = f'{name} ({backbone_phrase(scores)})'
  if 'accuracy' in test:
    value = f'accuracy {test["accuracy"]:.3f} (chance {1 / len(test["classes"]):.3f})'
  elif 'cer' in test:
    value = f'CER {test["cer"]:.3f}'
  elif 'bleu' in test:
    value = f'BLEU {test["bleu"]:.1f} chrF {test["chrf"]:.1f}'
  else:
    value = (f'speech->text R@1 {test["speech_to_text_recall@1"]:.3f} '
             f'(chance {test["chance@1"]:.3f})')
  return f'{what:<{width}} {value}'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model_dir', required=True, help='the pre-training run')
  parser.add_argument('--downstream', action='append', default=[],
                      help='a downstream run directory (repeatable)')
  args = parser.parse_args(argv)
  rows = read_metrics(paths.join(args.model_dir, 'metrics.jsonl'))
  first, last = rows[0], rows[-1]
  print(f'\npre-training ({args.model_dir}): {last["step"]} steps')
  print(f'  {"term":<26} {"step " + str(first["step"]):>10} {"step " + str(last["step"]):>10}')
  for key in CURVES:
    if key in last:
      print(f'  {key:<26} {first.get(key, float("nan")):>10.4g} {last[key]:>10.4g}')
  if args.downstream:
    print('downstream (test split):')
  runs = [(folder.rstrip('/').split('/')[-1],
           json.loads(paths.path(paths.join(folder, 'scores.json')).read_text()))
          for folder in args.downstream]
  width = max([45] + [len(f'{name} ({backbone_phrase(scores)})') for name, scores in runs])
  for name, scores in runs:
    print('  ' + downstream_line(scores, name, width))
  png = plot_curves(rows, paths.join(args.model_dir, 'loss_curves.png'),
                    f'pre-training: {args.model_dir}')
  print(f'\nloss curves: {png}')
  print(f'checkpoints: {paths.join(args.model_dir, "checkpoints")}')
  for folder in args.downstream:
    print(f'scores:      {paths.join(folder, "scores.json")}')


if __name__ == '__main__':
  main()
