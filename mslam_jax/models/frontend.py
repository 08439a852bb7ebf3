"""Speech frontend: log-mel -> 2 x Conv2D(stride 2) -> linear to d.

    [B, T, 80] -> conv3x3/2 -> relu -> conv3x3/2 -> relu -> flatten -> dense -> [B, ceil(T/4), d]

mSLAM (Bapna et al. 2022): 80-dim log-mel at a 10 ms hop, two stride-2 Conv2D
layers (4x fewer frames, so 40 ms per encoder frame), then a projection to the
model dim.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslam_jax.models import layers
from mslam_jax.models.config import ModelConfig


def subsample_paddings(paddings: jax.Array) -> jax.Array:
  """Paddings of a stride-2 conv: frame t of the output is centred on input 2t."""
  return paddings[:, ::2]


class ConvSubsampling(nn.Module):
  """Two 3x3 stride-2 Conv2D layers over (time, frequency), then a linear map.

  Every conv uses a fixed (1, 1) zero padding, so output frame t always reads
  input frames 2t-1..2t+1 whatever the padded length; padded frames are zeroed
  before each conv, which makes valid outputs independent of padded content.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, features: jax.Array, paddings: jax.Array):
    """features [B, T, mel], paddings [B, T] -> ([B, T', d], [B, T']), T' = ceil(T/4)."""
    cfg = self.config
    dtype = cfg.compute_dtype
    x = features.astype(dtype)[..., None]  # [B, T, mel, 1]
    for i in range(2):
      x = layers.zero_padded(x, paddings)
      x = nn.Conv(
          cfg.frontend_channels,
          kernel_size=(3, 3),
          strides=(2, 2),
          padding=((1, 1), (1, 1)),
          dtype=dtype,
          param_dtype=jnp.float32,
          kernel_init=layers.logical_init(
              nn.initializers.lecun_normal(),
              ('conv_time', 'conv_freq', 'conv_in', 'conv_out')),
          bias_init=layers.logical_init(nn.initializers.zeros_init(), ('conv_out',)),
          name=f'conv{i}')(x)
      x = nn.relu(x)
      paddings = subsample_paddings(paddings)
    batch, time, freq, channels = x.shape
    x = x.reshape(batch, time, freq * channels)
    x = layers.dense(cfg.d_model, ('frontend_in', 'embed'), name='projection',
                     dtype=dtype)(x)
    x = layers.zero_padded(x, paddings)
    x = nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
    return x, paddings


def output_frames(num_input_frames: int) -> int:
  """Encoder frames for `num_input_frames` log-mel frames: ceil(ceil(T/2)/2) = ceil(T/4)."""
  return -(-num_input_frames // 4)


def encoder_paddings(feature_paddings: jax.Array) -> jax.Array:
  """Paddings of the encoder frames for log-mel paddings [B, T] -> [B, ceil(T/4)]."""
  return subsample_paddings(subsample_paddings(feature_paddings))
