"""Pre-train mSLAM from gin files.

    python -m mslam_jax.train --gin_file=gin/pretrain_tiny_cpu.gin --gin.MODEL_DIR="'runs/demo'"

Until the data issue lands, batches are synthetic (mslam_jax/data/synthetic.py).
Metrics go to the console and to MODEL_DIR/metrics.jsonl.
"""

import itertools

import jax

from mslam_jax import gin_utils
from mslam_jax import optimizer as optimizer_lib
from mslam_jax import pretrain_loss
from mslam_jax import trainer
from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.data.synthetic import SyntheticCorpus
from mslam_jax.models.config import ModelConfig
from mslam_jax.train_config import TrainConfig


def synthetic_batches(seed: int, batch_config: BatchConfig, parts):
  corpus = SyntheticCorpus(seed, num_mel_bins=batch_config.num_mel_bins)
  while True:
    yield corpus.batch(batch_config, parts)


def train(model_config: ModelConfig, loss_config: pretrain_loss.LossConfig,
          batch_config: BatchConfig, train_config: TrainConfig, *, log_initial: bool = False):
  """Trains for train_config.train_steps; returns (state, logged metric records).

  log_initial: also log the metrics of the initial parameters as step 0.
  """
  batches = synthetic_batches(train_config.seed, batch_config, loss_config.parts)
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
  return trainer.run(state, step, itertools.chain([first], batches), step_rng,
                     num_steps=train_config.train_steps, log_every=train_config.log_every,
                     writer=trainer.MetricsWriter(train_config.model_dir), eval_step=eval_step)


def main(argv=None):
  gin_utils.parse_command_line(__doc__.splitlines()[0], argv)
  jax.config.update('jax_compilation_cache_dir',
                    jax.config.jax_compilation_cache_dir or '.jax_cache')
  train_config = TrainConfig()
  print(f'model_dir: {train_config.model_dir}  steps: {train_config.train_steps}  '
        f'devices: {jax.devices()}', flush=True)
  train(ModelConfig(), pretrain_loss.LossConfig(), BatchConfig(), train_config)


if __name__ == '__main__':
  main()
