"""Run-level settings of a pre-training job, bound from gin macros."""

import dataclasses

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Attributes:
    model_dir: where metrics.jsonl (and later checkpoints) go.
    train_steps: total optimizer steps (paper: 1.3M for 0.6B, 350k for 2B).
    log_every: steps between logged metrics.
    seed: seeds parameters, masks and the synthetic data stream.
  """
  model_dir: str = 'runs/default'
  train_steps: int = 100
  log_every: int = 10
  seed: int = 0
