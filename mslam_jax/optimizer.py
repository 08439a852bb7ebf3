"""Adam with linear warm-up then inverse square root decay (mSLAM, Bapna et al. 2022).

The learning rate is a function of the train step that the trainer passes to
`update` (`step=TrainState.step`), not of a count inside the optimizer state:
the trainer's step is the one counter of every schedule (learning rate and
Gumbel temperature), so a step skipped for a non-finite gradient moves both
or neither. Adam's own count (its bias correction) counts the updates it made.
"""

from typing import Callable, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
def warmup_rsqrt_schedule(*, peak_learning_rate: float = 6e-4, warmup_steps: int = 40_000):
  """lr(s) = peak * min(s / warmup, sqrt(warmup / s)), with s clamped to at least 1.

  Paper: peak 6e-4 (0.6B) or 3.6e-4 (2B), 40k warm-up steps, then inverse
  square root.
  """
  def schedule(step):
    step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    warmup = float(max(warmup_steps, 1))
    return peak_learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
  return schedule


class ScaleByStepScheduleState(NamedTuple):
  """learning_rate: the rate of the last update (for logging)."""
  learning_rate: jax.Array


def scale_by_step_schedule(schedule: Callable[[jax.Array], jax.Array]
                           ) -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by -schedule(step), `step` given to `update` as a keyword.

  Unlike optax.scale_by_learning_rate, no count is kept in the state: the
  caller's step is used, so skipped steps advance the schedule as they
  advance everything else that depends on the step.
  """
  def init(params):
    del params
    return ScaleByStepScheduleState(learning_rate=jnp.zeros((), jnp.float32))

  def update(updates, state, params=None, *, step, **extra_args):
    del state, params, extra_args
    rate = jnp.asarray(schedule(step), jnp.float32)
    updates = jax.tree.map(lambda u: (-rate).astype(u.dtype) * u, updates)
    return updates, ScaleByStepScheduleState(learning_rate=rate)

  return optax.GradientTransformationExtraArgs(init, update)


@gin.configurable
def make_optimizer(*, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6,
                   clip_norm: float = 1.0, flatten: bool = False
                   ) -> optax.GradientTransformationExtraArgs:
  """Gradient clipping by global norm, Adam, then the warm-up/rsqrt learning rate.

  `update(grads, state, params, step=step)` needs the train step. Adam's
  betas and eps (inferred: 0.9, 0.98, 1e-6, the Conformer/w2v-BERT values)
  and clip_norm (inferred: 1.0) are not given by the paper.

  flatten=True (ours) runs the same update on all parameters as one vector
  (`optax.flatten`): a handful of fused loops instead of several per
  parameter array: the tiny demo's step compiled about 3 s faster (of 18-21
  s) in repeated cold compiles on a CPU, within the noise in one alternated
  run (benchmarks/RESULTS.md). The optimizer state is
  then one unsharded vector, so sharded (FSDP) runs keep False; a
  checkpoint's optimizer state is only readable with the same setting.
  """
  chain = optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      scale_by_step_schedule(warmup_rsqrt_schedule()))
  return optax.flatten(chain) if flatten else chain
