"""Adam with linear warm-up then inverse square root decay (PAPER.md, "Optimisation")."""

import gin
import jax.numpy as jnp
import optax


@gin.configurable
def warmup_rsqrt_schedule(*, peak_learning_rate: float = 6e-4, warmup_steps: int = 40_000):
  """lr(s) = peak * min(s / warmup, sqrt(warmup / s)).

  Paper: peak 6e-4 (0.6B) or 3.6e-4 (2B), 40k warm-up steps, then inverse
  square root.
  """
  def schedule(step):
    step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    warmup = float(max(warmup_steps, 1))
    return peak_learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
  return schedule


@gin.configurable
def make_optimizer(*, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then Adam on the warm-up/rsqrt schedule.

  Adam's betas and eps (inferred: 0.9, 0.98, 1e-6, the Conformer/w2v-BERT
  values) and clip_norm (inferred: 1.0) are not given by the paper.
  """
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adam(warmup_rsqrt_schedule(), b1=b1, b2=b2, eps=eps))
