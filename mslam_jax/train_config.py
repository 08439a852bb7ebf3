"""Run-level settings of a pre-training job, bound from gin macros."""

import dataclasses
from typing import Any, Dict, Optional

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Attributes:
    model_dir: checkpoints/, data_state/, tensorboard/ and metrics.jsonl go here
      (a gs:// path on a TPU pod: every host writes there).
    train_steps: total optimizer steps (paper: 1.3M for 0.6B, 350k for 2B).
    log_every: steps between logged metrics.
    seed: seeds parameters, masks, dropout and the synthetic data stream.
    save_every: steps between checkpoints (also saved at the end and on SIGTERM).
    keep_checkpoints: how many of the latest checkpoints to keep.
    async_checkpoints: write checkpoints in the background (orbax async).
    accumulate_steps: micro-batches per step (gradient accumulation).
    max_consecutive_nonfinite: this many skipped (NaN/Inf) steps in a row stop
      the run with an error; the last checkpoint stays intact.
    peak_flops_per_device: the MFU denominator (FLOP/s); None measures a
      matmul in the model's compute dtype on the device at start-up
      (`flops.measure_peak_flops`: a peak measured on the machine at hand,
      not a datasheet figure).
    fallback_to_intact_checkpoint: on resume, a newest checkpoint that fails
      to read is set aside (MODEL_DIR/unreadable_checkpoints) and the previous
      one is used; False stops the run instead (checkpoints.py).
    restart_data_stream: resume even when the checkpoint's data position is
      missing or written for other data, starting the input stream from its
      first example (repeats data; off by default, so that never happens
      silently).
    compiler_options: XLA options for compiling the train step (`jax.jit`'s
      `compiler_options`, part of the persistent cache's key), e.g.
      {'xla_backend_optimization_level': 2} on a CPU: LLVM at -O2 instead of
      XLA's -O3, about 20% less compile for the same step time on the tiny
      model (gin/pretrain_tiny_cpu.gin sets it; level 1 compiles faster still
      for a slower step; benchmarks/RESULTS.md). None keeps XLA's defaults.
    init_compiler_options: the same for the program that creates a fresh
      state (it runs once): {'xla_backend_optimization_level': 0} on a CPU
      compiles it in half the time (gin/pretrain_tiny_cpu.gin sets it;
      benchmarks/RESULTS.md, "Time to the first step"). The initial values
      then differ in the last bits (float rounding), not in distribution.
  """
  model_dir: str = 'runs/default'
  train_steps: int = 100
  log_every: int = 10
  seed: int = 0
  save_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  accumulate_steps: int = 1
  max_consecutive_nonfinite: int = 20
  peak_flops_per_device: Optional[float] = None
  fallback_to_intact_checkpoint: bool = True
  restart_data_stream: bool = False
  compiler_options: Optional[Dict[str, Any]] = None
  init_compiler_options: Optional[Dict[str, Any]] = None
