"""Speech frontend: log-mel -> 2 x Conv2D(stride 2) -> linear to d.

    [B, T, 80] -> conv3x3/2 -> relu -> conv3x3/2 -> relu -> flatten -> dense -> [B, ceil(T/4), d]

mSLAM (Bapna et al. 2022): 80-dim log-mel at a 10 ms hop, two stride-2 Conv2D
layers (4x fewer frames, so 40 ms per encoder frame), then a projection to the
model dim.
"""

from typing import List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslam_jax.models import layers
from mslam_jax.models.config import ModelConfig

# Conv2D geometry of `ConvSubsampling`, the one source for everything that
# needs the frontend's shapes (the FLOP count in mslam_jax/flops.py, the
# log-mel baseline's frame stacking in mslam_jax/downstream/backbone.py).
# mSLAM: two stride-2 Conv2D layers; 3x3 kernels with (1, 1) zero padding are
# inferred (the Conformer/w2v-BERT subsampling convention).
NUM_CONV_LAYERS = 2
CONV_KERNEL = 3
CONV_STRIDE = 2
CONV_PADDING = 1
# Log-mel frames per encoder frame: 4, so 40 ms per encoder frame at a 10 ms hop.
SUBSAMPLING = CONV_STRIDE ** NUM_CONV_LAYERS


def conv_output_length(n: int) -> int:
  """Positions along time or frequency after one conv: (n + 2p - k) // s + 1 = ceil(n / 2)."""
  return (n + 2 * CONV_PADDING - CONV_KERNEL) // CONV_STRIDE + 1


def conv_output_shapes(config: ModelConfig, num_frames: int) -> List[Tuple[int, int, int, int]]:
  """Per conv layer, (frames, frequencies, in channels, out channels) of its output.

  For log-mel [num_frames, config.num_mel_bins]: layer i maps [T_i, F_i, C_in]
  to [conv_output_length(T_i), conv_output_length(F_i), frontend_channels],
  with C_in = 1 for the first layer. The projection to d reads the last
  layer's frequencies x channels per frame.
  """
  shapes = []
  frames, freq, channels_in = num_frames, config.num_mel_bins, 1
  for _ in range(NUM_CONV_LAYERS):
    frames, freq = conv_output_length(frames), conv_output_length(freq)
    shapes.append((frames, freq, channels_in, config.frontend_channels))
    channels_in = config.frontend_channels
  return shapes


def subsample_paddings(paddings: jax.Array) -> jax.Array:
  """Paddings [B, T] of one conv's output: frame t is centred on input CONV_STRIDE * t."""
  return paddings[:, ::CONV_STRIDE]


class ConvSubsampling(nn.Module):
  """Two 3x3 stride-2 Conv2D layers over (time, frequency), then a linear map.

  Geometry: NUM_CONV_LAYERS, CONV_KERNEL, CONV_STRIDE, CONV_PADDING above.
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
    for i in range(NUM_CONV_LAYERS):
      x = layers.zero_padded(x, paddings)
      x = nn.Conv(
          cfg.frontend_channels,
          kernel_size=(CONV_KERNEL, CONV_KERNEL),
          strides=(CONV_STRIDE, CONV_STRIDE),
          padding=((CONV_PADDING, CONV_PADDING),) * 2,
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
  for _ in range(NUM_CONV_LAYERS):
    num_input_frames = conv_output_length(num_input_frames)
  return num_input_frames


def encoder_paddings(feature_paddings: jax.Array) -> jax.Array:
  """Paddings of the encoder frames for log-mel paddings [B, T] -> [B, ceil(T/4)]."""
  for _ in range(NUM_CONV_LAYERS):
    feature_paddings = subsample_paddings(feature_paddings)
  return feature_paddings
