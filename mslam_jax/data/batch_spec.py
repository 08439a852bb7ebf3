"""Shapes of one pre-training step's batch: all three data kinds, static sizes.

mSLAM (Bapna et al. 2022): every step holds 2048 speech + 8192 text + 256
paired sequences, text capped at 512 characters. Speech lengths are not published: 1600 log-mel
frames (16 s at a 10 ms hop, 400 encoder frames) is our choice.

The log-mel channel count is one fact held by three configs: the features
the pipeline computes (`audio.FeatureConfig`), the batch they are padded into
(`BatchConfig`) and the model's frontend (`ModelConfig`, whose projection
weights depend on it and which an export records alone). All three default
to NUM_MEL_BINS, gin binds all three from one macro (`NUM_MEL_BINS` in
gin/runs/pretrain.gin), and `check_num_mel_bins`, run at start-up by
train.py and export.py, stops when they disagree (one of them bound directly)
before anything is built.
"""

import dataclasses

import gin
import jax
import jax.numpy as jnp

# Log-mel channels (mSLAM, Bapna et al. 2022: 80-dim log-mel): the default of
# ModelConfig, BatchConfig and audio.FeatureConfig.num_mel_bins. We keep the
# three fields rather than deriving two of them, because each travels alone
# (an export's manifest holds ModelConfig and FeatureConfig, the sampler gets
# only a BatchConfig) and saved run configs bind all three; a gin file still
# says it once: `NUM_MEL_BINS = 128` changes all of them.
NUM_MEL_BINS = 80


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
    num_mel_bins: log-mel channels of `features` (paper: 80); bound from the
      gin macro NUM_MEL_BINS with the other two (see the module docstring).
  """
  speech_batch_size: int = 2048
  text_batch_size: int = 8192
  paired_batch_size: int = 256
  speech_frames: int = 1600
  text_length: int = 512
  paired_frames: int = 2000
  paired_text_length: int = 400
  num_mel_bins: int = NUM_MEL_BINS


def check_num_mel_bins(model_config, batch_config: BatchConfig, feature_config) -> None:
  """Raises ValueError unless the three configs agree on the log-mel channels.

  Args:
    model_config: a `models.config.ModelConfig` (the frontend's input).
    batch_config: the batch the features are padded into.
    feature_config: an `audio.FeatureConfig` (the features computed).
  """
  values = {'ModelConfig': model_config.num_mel_bins,
            'BatchConfig': batch_config.num_mel_bins,
            'FeatureConfig': feature_config.num_mel_bins}
  if len(set(values.values())) > 1:
    found = ', '.join(f'{name}.num_mel_bins={value}' for name, value in values.items())
    raise ValueError(
        f'the log-mel channel counts disagree: {found}. Set them together with the gin '
        'macro NUM_MEL_BINS (gin/runs/pretrain.gin), e.g. --gin.NUM_MEL_BINS=80, and '
        'drop any direct binding of one of them.')


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
