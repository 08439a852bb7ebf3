"""Does the quantizer keep many codes with the contrastive loss, and collapse without it?

w2v-BERT reports that with masked prediction alone the codebook collapses
(masked prediction then becomes trivial) and that the contrastive loss, with
its diversity term, prevents it. This trains the tiny model speech-only
(gin/variants/w2v_bert.gin) on the synthetic corpus three times from the same seed,
(a) contrastive + diversity + masked prediction, (b) masked prediction alone,
(c) as (a) without the diversity term, and prints the hard-code perplexity (exp of the entropy of the code histogram
over one batch's valid frames; 1 = collapsed, num_codes = uniform).

    python benchmarks/codebook_collapse.py --steps 1500 --log_every 100
"""

import argparse
import json
import os
import tempfile

from mslam_jax import gin_utils, pretrain_loss, train
from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.models.config import ModelConfig
from mslam_jax.train_config import TrainConfig

RUNS = {
    'contrastive+mlm': [],
    'mlm_only': ['LossConfig.contrastive_weight = 0.0'],
    # Which part of the contrastive module holds the codebook up: InfoNCE alone?
    'no_diversity': ['LossConfig.diversity_weight = 0.0'],
}


def run(name, bindings, steps, log_every, seed, extra):
  """Trains one configuration; returns its logged records, step 0 = the initial state."""
  gin_utils.parse_gin(['gin/pretrain_tiny_cpu.gin', 'gin/variants/w2v_bert.gin'],
                      ["DataConfig.source = 'synthetic'", *bindings, *extra])
  model_dir = tempfile.mkdtemp(prefix=f'collapse_{name}_')
  _, history = train.train(ModelConfig(), pretrain_loss.LossConfig(), BatchConfig(),
                           TrainConfig(model_dir=model_dir, train_steps=steps,
                                       log_every=log_every, seed=seed),
                           log_initial=True)
  return history


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--log_every', type=int, default=100)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--gin', action='append', default=[],
                      help='extra gin binding for both runs, e.g. "ModelConfig.num_codes = 256"')
  parser.add_argument('--json', default=None, help='write the curves here')
  args = parser.parse_args()
  curves = {name: run(name, b, args.steps, args.log_every, args.seed, args.gin)
            for name, b in RUNS.items()}
  keys = ('speech/code_perplexity', 'speech/contrastive', 'speech/masked_prediction')
  print('\n| step | ' + ' | '.join(f'{n} {k.split("/")[1]}' for n in curves for k in keys) + ' |')
  print('|---' * (1 + len(keys) * len(curves)) + '|')
  for i, rec in enumerate(curves['contrastive+mlm']):
    cells = [f'{curves[n][i][k]:.2f}' for n in curves for k in keys]
    print(f'| {rec["step"]} | ' + ' | '.join(cells) + ' |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(curves, f)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
