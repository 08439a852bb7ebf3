"""Text path into the shared layers: characters -> embedding + sinusoid -> LayerNorm.

mSLAM (Bapna et al. 2022): text gets sinusoidal positions (speech gets its
position from the convolutions); character vocabulary of 4096 symbols, text
capped at 512.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslam_jax.models import layers
from mslam_jax.models.config import ModelConfig


class TextEmbedding(nn.Module):
  """ids [B, L] -> embed(ids) + sinusoid(position) -> ln -> [B, L, d], padded rows zeroed."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ids: jax.Array, paddings: jax.Array) -> jax.Array:
    cfg = self.config
    length = ids.shape[1]
    if length > cfg.max_text_length:
      raise ValueError(
          f'TextEmbedding: text length {length} exceeds ModelConfig.max_text_length='
          f'{cfg.max_text_length}; truncate the text in the data pipeline or raise '
          'the limit in gin.')
    embed = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        embedding_init=layers.logical_init(
            nn.initializers.normal(stddev=1.0), ('vocab', 'embed')),
        name='embed')
    x = embed(ids) + layers.sinusoidal_positions(length, cfg.d_model)[None].astype(
        cfg.compute_dtype)
    x = layers.layer_norm(name='ln', dtype=cfg.compute_dtype)(x)
    x = layers.zero_padded(x, paddings)
    return nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
