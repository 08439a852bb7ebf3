"""What a downstream head reads: an exported encoder, or log-mel frames (the baseline).

Both give frames at the encoder's 40 ms rate, so one head fits either:

    MslamBackbone:  log-mel [B, T, 80] -> encoder (layer k) -> [B, T/4, d]
    LogMelBackbone: log-mel [B, T, 80] -> 4 frames stacked   -> [B, T/4, 320]

`speech_inputs` turns waveforms into what `speech` reads (log-mel frames);
`speech` and `text` are pure functions of (params, inputs), for use inside a
jitted fine-tuning step; `params` is the encoder's tree (empty for log-mel).
A frozen encoder's speech encodings never change, so `frozen()` gives a
backbone whose `speech_inputs` are the encodings themselves, computed once
(eval mode) and read back by an identity `speech`: a probe's step then costs
the head alone.
The log-mel baseline comes unnormalised (the raw log of mel power) and with the
per-utterance mean/variance normalisation our pre-training uses, since a
pre-trained encoder should beat both.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from mslam_jax import encoder as encoder_lib
from mslam_jax.data import audio
from mslam_jax.data import vocabulary as vocabulary_lib
from mslam_jax.models import frontend

# Log-mel frames per encoder frame (4: the frontend's two stride-2 convolutions).
SUBSAMPLING = frontend.SUBSAMPLING


class Backbone:
  """Interface: name, dim, params, vocabulary, has_text, speech_inputs, text_ids, speech, text.

  `origin` says which weights: an export's {'step', 'source'} from its manifest.json
  (the pre-training step, and the run or 'random init, seed S' it came from); empty
  for a backbone without weights.
  """
  name: str
  origin: Dict[str, Any] = {}
  dim: int
  params: Any
  vocabulary: vocabulary_lib.CharacterVocabulary
  feature_config: audio.FeatureConfig
  has_text: bool = False

  def speech_inputs(self, waveforms: Sequence[np.ndarray], sample_rate: int = 16000
                    ) -> List[np.ndarray]:
    """What `speech` reads, per waveform: log-mel [frames, mel] with this backbone's settings."""
    return [audio.waveform_features(w, sample_rate, self.feature_config) for w in waveforms]

  def frozen(self) -> 'Backbone':
    """This backbone for a head that never updates it (default: itself)."""
    return self

  def text_ids(self, texts: Sequence[str]) -> List[np.ndarray]:
    return [np.asarray(self.vocabulary.encode(vocabulary_lib.normalize_text(t)), np.int32)
            for t in texts]

  def speech(self, params, features, paddings, *, deterministic=True, rng=None):
    raise NotImplementedError

  def text(self, params, ids, paddings, *, deterministic=True, rng=None):
    raise NotImplementedError(f'{self.name} has no text input')


@dataclasses.dataclass
class MslamBackbone(Backbone):
  """An exported mSLAM encoder read at `layer` (None: the top)."""
  encoder: encoder_lib.Encoder
  layer: Optional[int] = None
  name: str = 'mslam'
  has_text: bool = True

  def __post_init__(self):
    self.has_text = self.encoder.has_text
    self.dim = self.encoder.d_model
    self.params = self.encoder.params
    self.vocabulary = self.encoder.vocabulary
    self.feature_config = self.encoder.feature_config
    self.origin = {k: self.encoder.manifest[k] for k in ('step', 'source')
                   if k in self.encoder.manifest}
    n, m = self.encoder.num_speech_layers, self.encoder.num_shared_layers
    self.text_layer = None
    if self.layer is not None:
      if not 0 <= self.layer <= n + m:
        raise ValueError(f'layer={self.layer} is outside 0..{n + m}')
      # Text enters at the shared stack: the same depth, counted from there.
      self.text_layer = max(self.layer - n, 0)

  def speech(self, params, features, paddings, *, deterministic=True, rng=None):
    return encoder_lib.speech_forward(params, self.encoder.config, features, paddings,
                                      self.layer, deterministic=deterministic, dropout_rng=rng)

  def text(self, params, ids, paddings, *, deterministic=True, rng=None):
    return encoder_lib.text_forward(params, self.encoder.config, ids, paddings,
                                    self.text_layer, deterministic=deterministic,
                                    dropout_rng=rng)

  def frozen(self) -> 'PrecomputedSpeech':
    return PrecomputedSpeech(self)


class PrecomputedSpeech(Backbone):
  """A frozen MslamBackbone whose speech encodings are computed once.

  speech_inputs: waveforms -> encodings [T', d] at the backbone's layer (the
  export's batched, bucketed `encode_features`, deterministic); speech is
  the identity on them. Text still runs the encoder (`params` are the
  export's), so text inputs stay exact too.
  """

  def __init__(self, inner: MslamBackbone):
    self.inner = inner
    self.name, self.dim, self.params = inner.name, inner.dim, inner.params
    self.vocabulary, self.feature_config = inner.vocabulary, inner.feature_config
    self.has_text, self.origin = inner.has_text, inner.origin

  def speech_inputs(self, waveforms: Sequence[np.ndarray], sample_rate: int = 16000
                    ) -> List[np.ndarray]:
    features = self.inner.speech_inputs(waveforms, sample_rate)
    encodings, mask = self.inner.encoder.encode_features(features, layer=self.inner.layer)
    return [x[m] for x, m in zip(encodings, mask)]

  def speech(self, params, features, paddings, *, deterministic=True, rng=None):
    del params, deterministic, rng
    return features, paddings

  def text(self, params, ids, paddings, *, deterministic=True, rng=None):
    return self.inner.text(params, ids, paddings, deterministic=deterministic, rng=rng)


@dataclasses.dataclass
class LogMelBackbone(Backbone):
  """Log-mel frames stacked in fours: [B, T, mel] -> [B, ceil(T/4), 4 * mel]."""
  feature_config: audio.FeatureConfig
  vocabulary: vocabulary_lib.CharacterVocabulary
  name: str = 'logmel'

  def __post_init__(self):
    self.dim = SUBSAMPLING * self.feature_config.num_mel_bins
    self.params = {}

  def speech(self, params, features, paddings, *, deterministic=True, rng=None):
    del params, deterministic, rng
    batch, frames, mel = features.shape
    extra = -frames % SUBSAMPLING
    features = jnp.pad(features * (1.0 - paddings)[..., None], ((0, 0), (0, extra), (0, 0)))
    stacked = features.reshape(batch, -1, SUBSAMPLING * mel)
    # A stacked frame is valid when its first frame is: the frontend's rule
    # (paddings[:, ::2] twice).
    return stacked, jnp.pad(paddings, ((0, 0), (0, extra)), constant_values=1.0)[:, ::SUBSAMPLING]


def make_backbone(kind: str, *, export_dir: Optional[str] = None, layer: Optional[int] = None,
                  vocabulary_path: Optional[str] = None,
                  feature_config: Optional[audio.FeatureConfig] = None) -> Backbone:
  """'export' (export_dir, layer), 'logmel' or 'logmel_normalized' (vocabulary_path)."""
  if kind == 'export':
    if not export_dir:
      raise ValueError("backbone 'export' needs an export directory (EXPORT_DIR)")
    return MslamBackbone(encoder_lib.load_encoder(export_dir), layer)
  if kind in ('logmel', 'logmel_normalized'):
    config = dataclasses.replace(feature_config or audio.FeatureConfig(),
                                 normalize=kind == 'logmel_normalized')
    vocab = vocabulary_lib.CharacterVocabulary.load(vocabulary_path)
    return LogMelBackbone(config, vocab, name=kind)
  raise ValueError(f"backbone must be 'export', 'logmel' or 'logmel_normalized', got {kind!r}")
