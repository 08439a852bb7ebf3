"""An exported mSLAM encoder: speech and text in, features from the shared stack out.

    import mslam_jax
    enc = mslam_jax.load_encoder('exports/demo')
    feats, mask = enc.encode_speech([wave_a, wave_b], sample_rate=8000)   # [2, T', d], [2, T']
    feats, mask = enc.encode_text(['Guten Morgen.', 'Hello'])           # [2, L, d], [2, L]
    feats, mask = enc.encode_speech(waves, layer=enc.num_speech_layers)  # the N-layer output

Speech goes through the training pipeline's own steps: soxr resampling to the
export's rate (as `data.audio.decode_audio` does) and `data.audio.log_mel` with
the export's FeatureConfig, then frontend, N speech layers and M shared
layers. Text is normalised and mapped to ids with the export's vocabulary, then
embedded and run through the M shared layers. `mask` is True on valid frames.

`layer` counts Conformer blocks from the input of each modality: speech
0..N+M (0 = frontend output, N = the speech-only stack's output where paired
data meets text in pre-training, N+M = the top), text 0..M (0 = embeddings).
None is the top.

Inputs are sorted by length and cut into batches padded to a few length
buckets (about four per octave) and a power-of-two batch, so a jitted forward
compiles once per bucket, not once per input. The encoder is padding-aware, so
bucket padding does not change the features.

The pure functions `speech_forward` and `text_forward` are the same forward
for use inside a jitted fine-tuning step (mslam_jax/downstream/).
"""

import functools
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mslam_jax import export as export_lib
from mslam_jax import paths
from mslam_jax.data import audio
from mslam_jax.data import vocabulary as vocabulary_lib
from mslam_jax.models.config import ModelConfig
from mslam_jax.models.conformer import ConformerStack
from mslam_jax.models.frontend import ConvSubsampling
from mslam_jax.models.mslam import MSLAM
from mslam_jax.models.text_embedding import TextEmbedding

Params = Dict[str, Any]


def _stack(params: Params, config: ModelConfig, x, paddings, num_layers: int,
           deterministic: bool, rng):
  """The first `num_layers` blocks of a scanned ConformerStack's params applied to x."""
  if num_layers == 0:
    return x
  total = jax.tree.leaves(params)[0].shape[0]
  if num_layers < total:
    params = jax.tree.map(lambda p: p[:num_layers], params)
  rngs = {'dropout': rng} if rng is not None else None
  return ConformerStack(config, num_layers, deterministic).apply(
      {'params': params}, x, paddings, rngs=rngs)


def _split(rng, n):
  return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def speech_forward(params: Params, config: ModelConfig, features: jax.Array,
                   paddings: jax.Array, layer: Optional[int] = None, *,
                   deterministic: bool = True, dropout_rng=None):
  """log-mel [B, T, mel], paddings [B, T] -> (x [B, T', d], paddings [B, T']).

  layer: blocks to apply (0..N+M, None = all); params: the export's tree
  (export.ENCODER_PARTS). The same computation as MSLAM.encode_speech at the top.
  """
  n, m = config.num_speech_layers, config.num_shared_layers
  layer = n + m if layer is None else layer
  if not 0 <= layer <= n + m:
    raise ValueError(f'speech layer={layer} is outside 0..{n + m} (N={n} speech + M={m} '
                     'shared layers)')
  rng_speech, rng_shared = _split(dropout_rng, 2)
  x, paddings = ConvSubsampling(config).apply({'params': params['frontend']}, features,
                                              paddings)
  x = _stack(params['speech_layers'], config, x,
             paddings, min(layer, n), deterministic, rng_speech)
  x = _stack(params['shared_layers'], config, x, paddings, max(layer - n, 0),
             deterministic, rng_shared)
  return x, paddings


def text_forward(params: Params, config: ModelConfig, ids: jax.Array, paddings: jax.Array,
                 layer: Optional[int] = None, *, deterministic: bool = True, dropout_rng=None):
  """ids int32 [B, L], paddings [B, L] -> (x [B, L, d], paddings [B, L]).

  layer: shared blocks to apply (0..M, None = all). The same computation as
  MSLAM.encode_text at the top.
  """
  m = config.num_shared_layers
  layer = m if layer is None else layer
  if not 0 <= layer <= m:
    raise ValueError(f'text layer={layer} is outside 0..{m} (M={m} shared layers)')
  x = TextEmbedding(config).apply({'params': params['text_embedding']}, ids, paddings)
  x = _stack(params['shared_layers'], config, x, paddings, layer, deterministic, dropout_rng)
  return x, paddings


def abstract_encoder_params(config: ModelConfig, with_text: bool = True) -> Params:
  """Shapes and dtypes of the encoder parameters of `config` (allocates nothing).

  with_text: include the text embedding (False for a speech-only export).
  """

  def both(module, features, feature_paddings, ids, id_paddings):
    module.encode_speech(features, feature_paddings)
    module.encode_text(ids, id_paddings)

  frames, chars = 16, 4
  args = (jnp.zeros((1, frames, config.num_mel_bins)), jnp.zeros((1, frames)),
          jnp.zeros((1, chars), jnp.int32), jnp.zeros((1, chars)))
  boxed = jax.eval_shape(lambda r: MSLAM(config).init(r, *args, method=both),
                         jax.random.key(0))
  params = export_lib.encoder_params(nn.unbox(boxed)['params'])
  if not with_text:
    params.pop('text_embedding')
  return params


def bucket_length(n: int, minimum: int = 16) -> int:
  """n rounded up to a bucket: multiples of a quarter of the enclosing power of two.

  Padding waste stays under 1/3 and there are about four buckets per octave
  (ours: few compiles, little wasted compute).
  """
  n = max(int(n), minimum)
  step = max(minimum // 4, 2 ** (math.ceil(math.log2(n)) - 2))
  return int(math.ceil(n / step) * step)


class ExportMismatchError(ValueError):
  """An export whose parts disagree, or that does not fit what uses it."""


class Encoder:
  """The encoder of one export, on the default device; see the module docstring.

  Attributes:
    config: ModelConfig of the export.
    feature_config: FeatureConfig the export trained with.
    vocabulary: its CharacterVocabulary.
    params: encoder parameters (export.ENCODER_PARTS).
    manifest: the export's manifest.json.
  """

  def __init__(self, params: Params, config: ModelConfig, feature_config: audio.FeatureConfig,
               vocabulary: vocabulary_lib.CharacterVocabulary,
               manifest: Optional[Dict[str, Any]] = None):
    self.params = params
    self.config = config
    self.feature_config = feature_config
    self.vocabulary = vocabulary
    self.manifest = manifest or {}
    self._speech = jax.jit(functools.partial(speech_forward, config=config),
                           static_argnames=('layer',))
    self._text = jax.jit(functools.partial(text_forward, config=config),
                         static_argnames=('layer',))

  @property
  def has_text(self) -> bool:
    """False for a speech-only model (the w2v-BERT variant has no text embedding)."""
    return 'text_embedding' in self.params

  @property
  def d_model(self) -> int:
    return self.config.d_model

  @property
  def num_speech_layers(self) -> int:
    return self.config.num_speech_layers

  @property
  def num_shared_layers(self) -> int:
    return self.config.num_shared_layers

  # ---- inputs --------------------------------------------------------------

  def log_mel(self, waveforms: Sequence[np.ndarray], sample_rate: int = 16000
              ) -> List[np.ndarray]:
    """Waveforms (1-D float, any rate) -> log-mel [frames, mel] per waveform, as in training."""
    return [audio.waveform_features(w, sample_rate, self.feature_config) for w in waveforms]

  def text_ids(self, texts: Sequence[str]) -> List[np.ndarray]:
    """Normalised texts -> int32 ids per text (the pre-training tokenisation, no EOS)."""
    out = []
    for i, t in enumerate(texts):
      ids = np.asarray(self.vocabulary.encode(vocabulary_lib.normalize_text(t)), np.int32)
      if len(ids) > self.config.max_text_length:
        raise ValueError(f'text {i} has {len(ids)} characters, more than the model\'s '
                         f'max_text_length={self.config.max_text_length}; split it')
      out.append(ids)
    return out

  # ---- encoding -------------------------------------------------------------

  def encode_speech(self, waveforms: Sequence[np.ndarray], sample_rate: int = 16000,
                    layer: Optional[int] = None, batch_size: int = 16
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Waveforms -> (features float32 [B, T', d], mask bool [B, T']); see the module docstring."""
    return self.encode_features(self.log_mel(waveforms, sample_rate), layer, batch_size)

  def encode_features(self, features: Sequence[np.ndarray], layer: Optional[int] = None,
                      batch_size: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    """log-mel [frames, mel] per utterance -> (float32 [B, T', d], mask bool [B, T'])."""
    mel = self.config.num_mel_bins
    for i, f in enumerate(features):
      if f.ndim != 2 or f.shape[1] != mel:
        raise ValueError(f'features {i} have shape {f.shape}; expected [frames, {mel}]')
    return self._encode(features, lambda x, p: self._speech(self.params, features=x,
                                                            paddings=p, layer=layer),
                        pad_value=0.0, batch_size=batch_size, minimum=16)

  def encode_text(self, texts: Sequence[str], layer: Optional[int] = None,
                  batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """Texts -> (float32 [B, L, d], mask bool [B, L]), L the longest text in characters."""
    if not self.has_text:
      raise ValueError('this export has no text input: its model was pre-trained on speech '
                       'only (the w2v-BERT variant has no text embedding)')
    return self._encode(self.text_ids(texts),
                        lambda x, p: self._text(self.params, ids=x, paddings=p, layer=layer),
                        pad_value=0, batch_size=batch_size, minimum=8)

  def _encode(self, items: Sequence[np.ndarray], forward, *, pad_value, batch_size: int,
              minimum: int):
    if not items:
      raise ValueError('nothing to encode: the input list is empty')
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    results: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None] * len(items)
    for start in range(0, len(order), batch_size):
      chunk = order[start:start + batch_size]
      rows = min(batch_size, 2 ** math.ceil(math.log2(len(chunk))))
      length = bucket_length(max(len(items[i]) for i in chunk), minimum)
      first = items[chunk[0]]
      x = np.full((rows, length) + first.shape[1:], pad_value, first.dtype)
      paddings = np.ones((rows, length), np.float32)
      for row, i in enumerate(chunk):
        x[row, :len(items[i])] = items[i]
        paddings[row, :len(items[i])] = 0.0
      out, out_paddings = jax.device_get(forward(x, paddings))
      for row, i in enumerate(chunk):
        valid = int(np.sum(out_paddings[row] == 0))
        results[i] = (out[row, :valid], np.ones(valid, bool))
    longest = max(r[0].shape[0] for r in results)
    feats = np.zeros((len(items), longest, self.d_model), np.float32)
    mask = np.zeros((len(items), longest), bool)
    for i, (f, m) in enumerate(results):
      feats[i, :len(f)] = f
      mask[i, :len(m)] = m
    return feats, mask


def _check_params(path: epath.Path, abstract: Params, config: ModelConfig) -> None:
  """Names the first parameter whose saved shape differs from the manifest's dims."""
  saved = ocp.StandardCheckpointer().metadata(path / export_lib.PARAMS)
  saved = getattr(saved, 'item_metadata', saved)
  saved_flat = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(saved)[0]}
  for key, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = jax.tree_util.keystr(key)
    got = saved_flat.get(name)
    if got is None:
      raise ExportMismatchError(f'{path}: parameter {name} is missing from params/; the '
                                'export is incomplete or of another model: export again')
    if tuple(got.shape) != tuple(want.shape):
      raise ExportMismatchError(
          f'{path}: parameter {name} has shape {tuple(got.shape)} but manifest.json says '
          f'{tuple(want.shape)} (d_model={config.d_model}, layers={config.num_speech_layers}'
          f'+{config.num_shared_layers}, vocab_size={config.vocab_size}): params/ and '
          'manifest.json come from different models; export again')


def load_encoder(path: str) -> Encoder:
  """The Encoder of an export directory (mslam_jax.export), on the default device.

  Reads manifest.json (no gin), checks that params/, vocab.txt and the
  manifest agree, and restores the weights. Raises ExportMismatchError naming
  the disagreement otherwise.
  """
  path = paths.path(path)
  manifest_path = path / export_lib.MANIFEST
  if not manifest_path.exists():
    raise FileNotFoundError(f'{manifest_path} not found: {path} is not an export; make one '
                            'with `python -m mslam_jax.export --model_dir=RUN --output=DIR`')
  manifest = json.loads(manifest_path.read_text())
  version = manifest.get('format_version')
  if version != export_lib.FORMAT_VERSION:
    raise ExportMismatchError(f'{manifest_path}: format_version {version}, this code reads '
                              f'{export_lib.FORMAT_VERSION}; export again with this version')
  config = ModelConfig(**manifest['model'])
  feature_config = audio.FeatureConfig(**manifest['features'])
  if feature_config.num_mel_bins != config.num_mel_bins:
    raise ExportMismatchError(f'{manifest_path}: features have {feature_config.num_mel_bins} '
                              f'mel bins but the model takes {config.num_mel_bins}')
  vocab = vocabulary_lib.CharacterVocabulary.load(str(path / export_lib.VOCAB))
  if vocab.vocab_size != manifest['vocab_size']:
    raise ExportMismatchError(
        f'{path}: vocab.txt has {vocab.vocab_size} ids but manifest.json says '
        f'{manifest["vocab_size"]}: the vocabulary was replaced after export; put back the '
        'one the model trained with (its ids would mean other characters)')
  if vocab.vocab_size > config.vocab_size:
    raise ExportMismatchError(f'{path}: vocab.txt has {vocab.vocab_size} ids, more than the '
                              f'model\'s vocab_size={config.vocab_size}')
  abstract = abstract_encoder_params(config, 'text_embedding' in manifest.get('parts', ()))
  _check_params(path, abstract, config)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)
  params = ocp.StandardCheckpointer().restore(path / export_lib.PARAMS, target)
  return Encoder(params, config, feature_config, vocab, manifest)
