"""Shapes of one pre-training step's batch: all three data kinds, static sizes.

mSLAM (Bapna et al. 2022): every step holds 2048 speech + 8192 text + 256
paired sequences, text capped at 512 characters. Speech lengths are not published: 1600 log-mel
frames (16 s at a 10 ms hop, 400 encoder frames) is our choice.
"""

import dataclasses

import gin
import jax
import jax.numpy as jnp


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """Global batch sizes and maximum lengths per data kind.

  Attributes:
    speech_batch_size, text_batch_size, paired_batch_size: sequences per step
      (paper: 2048, 8192, 256).
    speech_frames: log-mel frames per speech example (ours: 1600, 16 s).
    text_length: characters per text example (paper: 512).
    paired_frames: log-mel frames per paired example (ours: 2000, 20 s; paired
      corpora run 10-20 s, and a longer example is skipped, not cropped).
    paired_text_length: transcript characters per paired example (ours: 400).
    num_mel_bins: log-mel channels (paper: 80).
  """
  speech_batch_size: int = 2048
  text_batch_size: int = 8192
  paired_batch_size: int = 256
  speech_frames: int = 1600
  text_length: int = 512
  paired_frames: int = 2000
  paired_text_length: int = 400
  num_mel_bins: int = 80


def abstract_batch(config: BatchConfig, parts=('speech', 'text', 'paired')):
  """jax.ShapeDtypeStruct tree of a batch with `parts` (no memory allocated)."""
  f32, i32 = jnp.float32, jnp.int32

  def speech(batch, frames):
    return {'features': jax.ShapeDtypeStruct((batch, frames, config.num_mel_bins), f32),
            'feature_paddings': jax.ShapeDtypeStruct((batch, frames), f32)}

  def text(batch, length):
    return {'ids': jax.ShapeDtypeStruct((batch, length), i32),
            'id_paddings': jax.ShapeDtypeStruct((batch, length), f32)}

  spec = {}
  if 'speech' in parts:
    spec['speech'] = speech(config.speech_batch_size, config.speech_frames)
  if 'text' in parts:
    spec['text'] = text(config.text_batch_size, config.text_length)
  if 'paired' in parts:
    spec['paired'] = {**speech(config.paired_batch_size, config.paired_frames),
                      **text(config.paired_batch_size, config.paired_text_length)}
  return spec
