"""Gumbel-softmax vector quantizer of w2v-BERT / wav2vec 2.0.

    features [B, T, d] -> dense -> logits [B, T, V]
        training:   ids = argmax(logits + Gumbel noise)      (a sample of softmax(logits))
                    quantized = codebook[ids], gradient straight through
                                softmax((logits + noise) / temperature) @ codebook
        evaluation: ids = argmax(logits), quantized = codebook[ids]

mSLAM (Bapna et al. 2022) and w2v-BERT (Chung et al. 2021): one codebook of
1024 codes of dim 1024, Gumbel temperature annealed 2.0 -> 0.1 (the wav2vec
2.0 schedule). The quantizer reads the unmasked frontend features.

`ids` is the one speech target of the step: the contrastive loss scores
`quantized` (= codebook[ids]) and excludes distractors by id, masked prediction
and the speech half of TLM predict the same ids.
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
                       train_steps: int = 1_300_000, anneal_fraction: float = 0.46):
  """Gumbel temperature at `step`: exponential decay from `start`, held at `end`.

    t(step) = start * (end / start) ** min(step / anneal_steps, 1),
    anneal_steps = round(anneal_fraction * train_steps)

  start, end: 2.0 -> 0.1 (mSLAM / wav2vec 2.0). The paper gives the end
  points, not the length: wav2vec 2.0 decays by 0.999995 per step, which
  reaches 0.1 after 599k steps, 46% of the 0.6B run's 1.3M but beyond the 2B
  run's 350k. Tying the decay to the run length (ours: anneal_fraction 0.46)
  keeps wav2vec 2.0's schedule for 0.6B and ends the 2B anneal at 161k.

  Args:
    step: the train step (TrainState.step; may be traced).
    start, end: temperatures at step 0 and from anneal_steps on.
    train_steps: the run's length (gin: %TRAIN_STEPS).
    anneal_fraction: share of train_steps over which the temperature decays.

  Returns:
    float32 scalar.
  """
  anneal_steps = max(int(round(anneal_fraction * train_steps)), 1)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32) / anneal_steps, 1.0)
  # exp(progress * log(end / start)) with the log taken in float64: exact at
  # both ends up to one float32 rounding, which the clamp below removes.
  decayed = start * jnp.exp(progress * math.log(end / start))
  low, high = min(start, end), max(start, end)
  return jnp.where(progress >= 1.0, jnp.float32(end), jnp.clip(decayed, low, high))


def gumbel_noise(keys: jax.Array, shape) -> jax.Array:
  """Gumbel(0, 1) noise [B, *shape] from one PRNG key per example (keys [B]).

  Per-example keys make an example's noise independent of the batch it is in,
  so a batch split into micro-batches draws exactly the noise of the whole.
  """
  return jax.vmap(lambda k: jax.random.gumbel(k, tuple(shape), jnp.float32))(keys)


class GumbelQuantizer(nn.Module):
  """One codebook of `num_codes` vectors of `code_dim`, chosen by Gumbel-softmax.

  Attributes:
    config: sizes (num_codes, code_dim, compute dtype).
    deterministic: True (evaluation) takes the argmax code and needs no keys.
  """
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, temperature, gumbel_keys=None):
    """Quantizes every frame.

    Args:
      x: [B, T, d] frontend features.
      temperature: Gumbel-softmax temperature (scalar; only shapes the gradient).
      gumbel_keys: PRNG keys [B], one per example; required in training.

    Returns:
      quantized [B, T, code_dim]: exactly codebook[ids] (cast to the compute
        dtype) in the forward pass.
      ids int32 [B, T]: the chosen codes.
      logits float32 [B, T, V]: noise-free, for the diversity loss.
    """
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
        (cfg.num_codes, cfg.code_dim), jnp.float32).astype(cfg.compute_dtype)
    if self.deterministic:
      ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return jnp.take(codebook, ids, axis=0), ids, logits
    if gumbel_keys is None:
      raise ValueError('GumbelQuantizer in training needs gumbel_keys [batch] '
                       '(pretrain_loss.make_masks draws them).')
    perturbed = logits + gumbel_noise(gumbel_keys, logits.shape[1:])
    ids = jnp.argmax(perturbed, axis=-1).astype(jnp.int32)
    # Straight-through: the forward value is the codebook row itself (a
    # one-hot + soft - sg(soft) product is off by an ulp on a share of the
    # frames in float32), the gradient flows through the soft probabilities
    # to the logits, and the codebook learns only through its chosen rows.
    soft = jax.nn.softmax(perturbed / temperature, axis=-1).astype(cfg.compute_dtype)
    soft_rows = soft @ jax.lax.stop_gradient(codebook)
    quantized = jnp.take(codebook, ids, axis=0) + (soft_rows - jax.lax.stop_gradient(soft_rows))
    return quantized, ids, logits
