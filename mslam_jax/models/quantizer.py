"""Gumbel-softmax vector quantizer of w2v-BERT / wav2vec 2.0.

    features [B, T, d] -> dense -> logits [B, T, V] -> gumbel-softmax (hard, straight-through)
        -> one-hot @ codebook -> quantized [B, T, code_dim];  ids = argmax(logits)

PAPER.md: 1 codebook of 1024 codes, code dim 1024, temperature annealed
2.0 -> 0.1. The quantizer reads the unmasked frontend features.
"""

import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from mslam_jax.models import layers
from mslam_jax.models.config import ModelConfig


@gin.configurable
def gumbel_temperature(step, *, start: float = 2.0, end: float = 0.1,
                       decay: float = 0.999995):
  """Annealed Gumbel temperature max(start * decay^step, end).

  start and end: PAPER.md (the wav2vec 2.0 schedule, 2.0 -> 0.1); decay:
  wav2vec 2.0's per-step factor (inferred for mSLAM).
  """
  step = jnp.asarray(step, jnp.float32)
  # decay**step in float32 loses 1e-3 relative accuracy by 1e5 steps (decay
  # itself rounds); exp(step * log(decay)) with the log taken in float64 does not.
  return jnp.maximum(start * jnp.exp(step * math.log(decay)), end)


class GumbelQuantizer(nn.Module):
  """One codebook of `num_codes` vectors of `code_dim`, chosen by Gumbel-softmax.

  In training (deterministic=False) the chosen code is a hard Gumbel-softmax
  sample whose gradient flows straight through the soft probabilities; in
  evaluation it is the argmax code.
  """
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, temperature):
    """x [B, T, d] -> (quantized [B, T, code_dim], ids int32 [B, T], logits f32 [B, T, V])."""
    cfg = self.config
    # Unit-variance weights as in wav2vec 2.0: logits start far apart relative to
    # the Gumbel noise, so each frame's sampled code is mostly its argmax and
    # the contrastive targets are consistent from the first step.
    logits = layers.dense(cfg.num_codes, ('embed', 'codes'), name='logits',
                          dtype=cfg.compute_dtype,
                          kernel_init=nn.initializers.normal(stddev=1.0))(x).astype(jnp.float32)
    codebook = self.param(
        'codebook',
        layers.logical_init(nn.initializers.uniform(scale=1.0), ('codes', 'code_dim')),
        (cfg.num_codes, cfg.code_dim), jnp.float32)
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if self.deterministic:
      one_hot = jax.nn.one_hot(ids, cfg.num_codes, dtype=jnp.float32)
    else:
      noise = jax.random.gumbel(self.make_rng('gumbel'), logits.shape, jnp.float32)
      soft = jax.nn.softmax((logits + noise) / temperature, axis=-1)
      hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), cfg.num_codes, dtype=jnp.float32)
      one_hot = hard + soft - jax.lax.stop_gradient(soft)
    quantized = jnp.einsum('btv,vc->btc', one_hot.astype(cfg.compute_dtype),
                           codebook.astype(cfg.compute_dtype))
    return quantized, ids, logits
