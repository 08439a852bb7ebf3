"""Parameter counts of a gin-configured mSLAM model, from abstract shapes only.

    python -m mslam_jax.info --gin_file=gin/pretrain_0.6b.gin

Nothing is allocated: the model is initialised under `jax.eval_shape`. Prints
one line per part, per-layer counts of the scanned stacks, and ends with
`total_params: N`.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from mslam_jax import console

if __name__ == '__main__':
  console.quiet_unless_verbose()  # before jax and tensorflow load their loggers

import dataclasses

import jax
import numpy as np

from mslam_jax import gin_utils
from mslam_jax import pretrain_loss
from mslam_jax.data import batch_spec
from mslam_jax.models.config import ModelConfig


def abstract_params(model_config: ModelConfig, loss_config: pretrain_loss.LossConfig):
  """Shape-only MSLAM variables ({'params': ...}) for the enabled parts."""
  # Parameter shapes do not depend on batch sizes or lengths: use tiny ones.
  shapes = batch_spec.BatchConfig(
      speech_batch_size=1, text_batch_size=1, paired_batch_size=1,
      speech_frames=16, text_length=8, paired_frames=16, paired_text_length=4,
      num_mel_bins=model_config.num_mel_bins)
  batch = batch_spec.abstract_batch(shapes, loss_config.parts)
  init = lambda rng, b: pretrain_loss.init_params(
      rng, b, model_config=model_config, loss_config=loss_config)
  return jax.eval_shape(init, jax.random.key(0), batch)


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def part_counts(params) -> dict:
  """{top-level module name: parameter count} of an MSLAM params tree."""
  return {name: count(sub) for name, sub in params['params'].items()}


def main(argv=None):
  # Counts only: nothing is written, so a pod file's REQUIRED MODEL_DIR need not be given.
  gin_utils.parse_command_line(__doc__.splitlines()[0], argv, writes_model_dir=False)
  model_config = ModelConfig()
  loss_config = pretrain_loss.LossConfig()
  variables = abstract_params(model_config, loss_config)
  print('model config:')
  for field in dataclasses.fields(model_config):
    print(f'  {field.name} = {getattr(model_config, field.name)!r}')
  print(f'enabled data kinds: {", ".join(loss_config.parts)}')
  print('parameters per part:')
  parts = part_counts(variables)
  for name, n in parts.items():
    print(f'  {name:<20s} {n:>15,d}')
  layers = {'speech_layers': model_config.num_speech_layers,
            'shared_layers': model_config.num_shared_layers}
  for name, num in layers.items():
    if name in parts and num:
      print(f'  per {name[:-1]:<16s} {parts[name] // num:>15,d}  (x {num})')
  total = count(variables)
  print(f'total: {total / 1e9:.3f}B ({total / 1e6:.2f}M)')
  print(f'total_params: {total}')
  return total


if __name__ == '__main__':
  main()
