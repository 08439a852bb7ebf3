"""Pre-train mSLAM from gin files.

    python -m mslam_jax.train --gin_file=gin/pretrain_tiny_cpu.gin --gin.MODEL_DIR="'runs/demo'" \
        [--task_module=my_tasks.py]

Batches come from the three-stream sampler over the seqio tasks that
DataConfig selects (by default the embedded corpus, tasks/embedded.py), or
from synthetic data with --gin.DataConfig.source="'synthetic'". Metrics go to
the console and to MODEL_DIR/metrics.jsonl.
"""

import argparse
import itertools
from typing import Sequence

import jax

from mslam_jax import gin_utils
from mslam_jax import optimizer as optimizer_lib
from mslam_jax import pretrain_loss
from mslam_jax import trainer
from mslam_jax.data import bad_input
from mslam_jax.data import sampler as sampler_lib
from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.data.synthetic import SyntheticCorpus
from mslam_jax.models.config import ModelConfig
from mslam_jax.train_config import TrainConfig


def synthetic_batches(seed: int, batch_config: BatchConfig, parts):
  corpus = SyntheticCorpus(seed, num_mel_bins=batch_config.num_mel_bins)
  while True:
    yield corpus.batch(batch_config, parts)


def make_batches(data_config: sampler_lib.DataConfig, batch_config: BatchConfig, parts,
                 *, seed: int, model_vocab_size: int, task_modules: Sequence[str] = ()):
  """The batch iterator DataConfig.source names; prints each kind's mixing rates."""
  if data_config.source == 'synthetic':
    return synthetic_batches(seed, batch_config, parts)
  if data_config.source != 'tasks':
    raise ValueError(f"DataConfig.source must be 'tasks' or 'synthetic', got "
                     f'{data_config.source!r}')
  sampler = sampler_lib.ThreeStreamSampler(
      batch_config, data_config, parts=parts, model_vocab_size=model_vocab_size,
      extra_task_modules=task_modules)
  for kind, rates in sampler.rates().items():
    shares = ', '.join(f'{name} {rate:.3f}' for name, rate in rates.items())
    print(f'{kind} mixture ({len(rates)} tasks): {shares}', flush=True)
  return sampler


def train(model_config: ModelConfig, loss_config: pretrain_loss.LossConfig,
          batch_config: BatchConfig, train_config: TrainConfig,
          data_config: sampler_lib.DataConfig = None, *, task_modules: Sequence[str] = (),
          log_initial: bool = False):
  """Trains for train_config.train_steps; returns (state, logged metric records).

  task_modules: extra modules that register seqio tasks (--task_module).
  log_initial: also log the metrics of the initial parameters as step 0.
  """
  data_config = data_config or sampler_lib.DataConfig()
  batches = make_batches(data_config, batch_config, loss_config.parts, seed=train_config.seed,
                         model_vocab_size=model_config.vocab_size, task_modules=task_modules)
  first = next(batches)
  rng = jax.random.key(train_config.seed)
  init_rng, step_rng = jax.random.split(rng)
  optimizer = optimizer_lib.make_optimizer()
  state = trainer.init_train_state(init_rng, first, optimizer, model_config=model_config,
                                   loss_config=loss_config)
  step = trainer.make_train_step(optimizer, model_config=model_config,
                                 loss_config=loss_config)

  eval_step = (trainer.make_eval_step(model_config=model_config, loss_config=loss_config)
               if log_initial else None)
  result = trainer.run(state, step, itertools.chain([first], batches), step_rng,
                       num_steps=train_config.train_steps, log_every=train_config.log_every,
                       writer=trainer.MetricsWriter(train_config.model_dir),
                       eval_step=eval_step)
  report = bad_input.LOG.report()
  if report:
    print('input examples skipped or cleaned:\n' + report, flush=True)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--task_module', action='append', default=[],
                      help='module that registers seqio tasks (repeatable): a dotted name '
                      'on the Python path or a .py file')
  args = gin_utils.parse_command_line(parser.description, argv, parser)
  jax.config.update('jax_compilation_cache_dir',
                    jax.config.jax_compilation_cache_dir or '.jax_cache')
  train_config = TrainConfig()
  print(f'model_dir: {train_config.model_dir}  steps: {train_config.train_steps}  '
        f'devices: {jax.devices()}', flush=True)
  train(ModelConfig(), pretrain_loss.LossConfig(), BatchConfig(), train_config,
        sampler_lib.DataConfig(), task_modules=args.task_module)


if __name__ == '__main__':
  main()
