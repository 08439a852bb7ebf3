"""Audio decoding and log-mel features for the speech input pipeline.

bytes -> decode_audio (soundfile, mono, soxr resample) -> [samples] float32
      -> log_mel (tf.signal STFT -> |X|^2 -> mel filterbank -> log) -> [frames, 80]

Decoding runs in numpy (soundfile/soxr have no TF ops) and is wrapped with
`tf.numpy_function` so it can sit inside `tf.data.Dataset.map`. It never raises:
a corpus of millions of files always holds a few broken ones, and one bad file
must not stop a pre-training run. Callers get a `bad_input.Problem` code instead
(OK or one of AUDIO_PROBLEMS) and can count and drop bad examples.

Feature constants: mSLAM (Bapna et al. 2022) gives 80-dim log-mel with a 10 ms
hop. Everything else is our choice, with the reason next to it.
"""

import dataclasses
import io
import struct

import gin
import numpy as np
import soundfile as sf
import soxr
import tensorflow as tf

from mslam_jax.data.bad_input import Problem
from mslam_jax.data.batch_spec import NUM_MEL_BINS


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Log-mel feature parameters.

  Attributes:
    sample_rate: waveform rate in Hz (ours: 16 kHz, the usual rate of ASR
      corpora; it also bounds `upper_edge_hz` at the Nyquist frequency).
    window_ms: STFT window length in ms (ours: 25 ms, the usual ASR window).
    hop_ms: STFT hop in ms (mSLAM: 10 ms).
    fft_length: FFT size in samples (ours: 512, the next power of two above
      the 400-sample window; the window is zero-padded at the end).
    num_mel_bins: mel channels (mSLAM: 80). Bound with BatchConfig's and
      ModelConfig's from the gin macro NUM_MEL_BINS (data/batch_spec.py says
      why there are three).
    lower_edge_hz: lower edge of the lowest mel filter (ours: 20 Hz, below
      which speech carries nothing but DC offset and rumble).
    upper_edge_hz: upper edge of the highest mel filter (ours: 8 kHz, the
      Nyquist frequency at 16 kHz).
    log_floor: features are log(max(mel, log_floor)) (ours: 1e-6, ~100 dB
      under the ~1e4 mel power of a full-scale sine, and about 10x above
      16-bit quantisation noise (5e-9 to 1e-7 per mel channel), so digital
      silence and dither all land on the floor). We clamp instead of adding
      the floor so values above it are the exact log of the mel power, with
      no bias on quiet but non-silent bins.
    normalize: per-utterance mean/variance normalisation of each mel channel
      over the utterance's frames. Off here, so features are the exact log-mel;
      pre-training turns it on (gin/runs/pretrain.gin, ours): without it the
      tiny model's codebook collapsed to 1-2 codes on the embedded corpus
      (benchmarks/RESULTS.md), and it evens out corpora recorded at different gains.
  """
  sample_rate: int = 16000
  window_ms: float = 25.0
  hop_ms: float = 10.0
  fft_length: int = 512
  num_mel_bins: int = NUM_MEL_BINS
  lower_edge_hz: float = 20.0
  upper_edge_hz: float = 8000.0
  log_floor: float = 1e-6
  normalize: bool = False

  @property
  def window_samples(self) -> int:
    """STFT window in samples (400 at the defaults)."""
    return int(round(self.sample_rate * self.window_ms / 1000))

  @property
  def hop_samples(self) -> int:
    """STFT hop in samples (160 at the defaults)."""
    return int(round(self.sample_rate * self.hop_ms / 1000))


# Floor on a channel's variance in `normalize`, so a constant channel (e.g. a
# band that sits at `log_floor` in every frame) maps to zeros instead of
# inf/NaN. Ours: far below the variance of any real log-mel channel.
_VARIANCE_FLOOR = 1e-8


# What `decode_audio` returns besides Problem.OK (always with an empty
# waveform). The codes, and the words a report gives them
# (bad_input.MESSAGES), live in bad_input.Problem.
AUDIO_PROBLEMS = (Problem.UNREADABLE_AUDIO, Problem.TRUNCATED_AUDIO, Problem.EMPTY_AUDIO,
                  Problem.NONFINITE_AUDIO)

# Frames per soundfile read. Reading in blocks, instead of one read sized from
# the header, keeps a corrupt header that claims billions of frames from
# allocating them up front.
_READ_BLOCK = 1 << 16

# WAV data-chunk sizes that mean "unknown" rather than a length: streaming
# writers (ffmpeg to a pipe) leave 0 or 0xFFFFFFFF, and RF64 keeps the real
# size in its ds64 chunk.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF)


def _wav_missing_bytes(data: bytes) -> bool:
  """True if a RIFF/WAVE file's data chunk promises more bytes than follow.

  libsndfile quietly shortens a cut WAV to the frames present, so comparing its
  frame count with the frames read cannot catch it; the data chunk's size field
  can.
  """
  if len(data) < 12 or data[:4] != b'RIFF' or data[8:12] != b'WAVE':
    return False
  offset = 12
  while offset + 8 <= len(data):
    chunk_id = data[offset:offset + 4]
    (size,) = struct.unpack('<I', data[offset + 4:offset + 8])
    if chunk_id == b'data':
      return size not in _UNKNOWN_WAV_SIZES and size > len(data) - (offset + 8)
    offset += 8 + size + (size & 1)  # RIFF chunks are padded to even sizes.
  return False


def _ogg_missing_end(data: bytes) -> bool:
  """True if an Ogg stream's pages break off or never reach end-of-stream.

  Ogg headers hold no total length, and libsndfile reads a cut Ogg Vorbis file
  as fewer frames (often zero) without an error, so the page structure is the
  only sign: every page must be whole (27-byte header, segment table, body)
  and the last one must carry the end-of-stream flag.
  """
  if data[:4] != b'OggS':
    return False
  offset, end_of_stream = 0, False
  while offset < len(data):
    header_end = offset + 27
    if data[offset:offset + 4] != b'OggS' or header_end > len(data):
      return True
    segment_table_end = header_end + data[offset + 26]
    if segment_table_end > len(data):
      return True
    end_of_stream = bool(data[offset + 5] & 0x04)
    offset = segment_table_end + sum(data[header_end:segment_table_end])
  return offset > len(data) or not end_of_stream


def _failed(status: Problem) -> tuple[np.ndarray, Problem]:
  return np.zeros([0], np.float32), status


def decode_audio(data: bytes, target_rate: int = 16000) -> tuple[np.ndarray, Problem]:
  """Decodes WAV/FLAC/OGG (anything soundfile reads) to mono at `target_rate`.

  Never raises: problems come back as a status with an empty waveform.

  Args:
    data: the encoded file's bytes.
    target_rate: output sample rate in Hz; other rates are resampled with
      soxr's default (high) quality.

  Returns:
    (waveform, status): waveform is float32 [samples] in [-1, 1], the channel
    mean for multi-channel files; [0] unless status is Problem.OK. status is
    Problem.OK or one of AUDIO_PROBLEMS.
  """
  try:
    stream = sf.SoundFile(io.BytesIO(data))
  except Exception:  # pylint: disable=broad-except
    # Mostly LibsndfileError ("Format not recognised"); whatever the type,
    # failing to open means we cannot decode it.
    return _failed(Problem.UNREADABLE_AUDIO)
  with stream:
    rate, expected_frames = stream.samplerate, stream.frames
    blocks = []
    try:
      for block in stream.blocks(blocksize=_READ_BLOCK, dtype='float32', always_2d=True):
        blocks.append(block)
    except Exception:  # pylint: disable=broad-except
      # A valid header followed by data the decoder cannot follow: a FLAC or
      # Ogg cut mid-frame ("lost sync", "psf_fseek failed").
      return _failed(Problem.TRUNCATED_AUDIO)
  multichannel = np.concatenate(blocks) if blocks else np.zeros([0, 1], np.float32)
  if (len(multichannel) < expected_frames or _wav_missing_bytes(data)
      or _ogg_missing_end(data)):
    return _failed(Problem.TRUNCATED_AUDIO)
  if multichannel.size == 0:
    return _failed(Problem.EMPTY_AUDIO)
  if not np.all(np.isfinite(multichannel)):
    return _failed(Problem.NONFINITE_AUDIO)
  if not np.any(multichannel):
    return _failed(Problem.EMPTY_AUDIO)
  waveform = multichannel.mean(axis=1, dtype=np.float32)  # [frames, channels] -> [frames]
  if rate != target_rate:
    try:
      waveform = soxr.resample(waveform, rate, target_rate)
    except Exception:  # pylint: disable=broad-except
      # Not seen in practice (soxr took 1 Hz to 384 kHz headers in our
      # tries), but a header rate is untrusted input and this must not raise.
      return _failed(Problem.UNREADABLE_AUDIO)
  # Float WAV may hold values beyond full scale and resampling overshoots a
  # little near full scale; clipping keeps the promised range.
  waveform = np.clip(waveform, -1.0, 1.0).astype(np.float32, copy=False)
  return waveform, Problem.OK


def decode_audio_tf(data: tf.Tensor, target_rate: int = 16000) -> tuple[tf.Tensor, tf.Tensor]:
  """`decode_audio` as a TF op, for use inside `tf.data.Dataset.map`.

  Args:
    data: string scalar, the encoded file's bytes.
    target_rate: output sample rate in Hz.

  Returns:
    (waveform, status): float32 [samples] and an int32 scalar `bad_input.Problem`
    code (OK or one of AUDIO_PROBLEMS).
  """

  def decode(encoded):
    waveform, status = decode_audio(encoded, target_rate)
    return waveform, np.int32(status)

  # stateful=False: the output depends on nothing but the input bytes.
  waveform, status = tf.numpy_function(
      decode, [data], (tf.float32, tf.int32), stateful=False, name='decode_audio')
  waveform.set_shape([None])
  status.set_shape([])
  return waveform, status


def _hz_to_mel(hz):
  """HTK mel scale: 2595 log10(1 + f / 700)."""
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(config: FeatureConfig) -> np.ndarray:
  """Triangular mel filters, [fft_length // 2 + 1, num_mel_bins] float32.

  Filter edges are equally spaced on the HTK mel scale between lower_edge_hz
  and upper_edge_hz; each triangle rises linearly in Hz from its left edge to
  1 at its centre and falls to 0 at its right edge. No area normalisation, so
  this equals `librosa.filters.mel(..., htk=True, norm=None).T`. (Unlike
  `tf.signal.linear_to_mel_weight_matrix`, which interpolates in mel and zeroes
  the DC bin.)
  """
  edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(config.lower_edge_hz),
                                    _hz_to_mel(config.upper_edge_hz),
                                    config.num_mel_bins + 2))
  bin_hz = np.linspace(0.0, config.sample_rate / 2, config.fft_length // 2 + 1)
  left, centre, right = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
  # [bins, 1] against [1, mels] broadcasts to [bins, mels].
  rising = (bin_hz[:, None] - left) / (centre - left)
  falling = (right - bin_hz[:, None]) / (right - centre)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def num_frames(num_samples: int, config: FeatureConfig) -> int:
  """Frames `log_mel` gives for `num_samples`: no padding, whole windows only.

  1 + (samples - window) // hop when samples >= window, else 0 (a clip
  shorter than one 25 ms window has no frame).
  """
  if num_samples < config.window_samples:
    return 0
  return 1 + (num_samples - config.window_samples) // config.hop_samples


def log_mel(waveform: tf.Tensor, config: FeatureConfig) -> tf.Tensor:
  """Log-mel features of float32 waveforms.

  Frame t covers samples [t * hop, t * hop + window) under a periodic Hann
  window, zero-padded at the end to fft_length; there is no padding of the
  waveform (pad_end=False), so the frame count is `num_frames(samples)`.

  Args:
    waveform: [..., samples] float32, e.g. [samples] or [batch, samples].
      Rows are used whole: zeros padding a short row give frames at the log
      floor, which `normalize` would count as part of the utterance.
    config: feature parameters.

  Returns:
    [..., frames, num_mel_bins] float32.
  """
  waveform = tf.convert_to_tensor(waveform, tf.float32)
  window, hop = config.window_samples, config.hop_samples
  samples = tf.shape(waveform)[-1]
  frames = tf.where(samples >= window, 1 + (samples - window) // hop, 0)
  # In eager mode tf.signal.stft raises when there is no whole frame (its RFFT
  # then sees rows of `window` rather than `fft_length` samples). Padding short
  # input up to one window and dropping that frame again gives [..., 0, mels].
  rank = waveform.shape.rank
  paddings = [[0, 0]] * (rank - 1) + [[0, tf.maximum(0, window - samples)]]
  stft = tf.signal.stft(tf.pad(waveform, paddings), frame_length=window, frame_step=hop,
                        fft_length=config.fft_length, window_fn=tf.signal.hann_window,
                        pad_end=False)[..., :frames, :]
  power = tf.math.real(stft) ** 2 + tf.math.imag(stft) ** 2
  mel = tf.tensordot(power, tf.constant(mel_filterbank(config)), axes=1)
  features = tf.math.log(tf.maximum(mel, config.log_floor))
  if config.normalize:
    mean, variance = tf.nn.moments(features, axes=[-2], keepdims=True)
    features = (features - mean) * tf.math.rsqrt(tf.maximum(variance, _VARIANCE_FLOOR))
  return features


def waveform_features(waveform: np.ndarray, sample_rate: int, config: FeatureConfig
                      ) -> np.ndarray:
  """A decoded waveform at any rate -> log-mel [frames, mel], as the input pipeline makes it.

  Resampled with soxr to config.sample_rate and clipped to [-1, 1] as
  `decode_audio` does, then `log_mel`; for waveforms that arrive as arrays
  (export, downstream) rather than encoded files.
  """
  waveform = np.asarray(waveform, np.float32)
  if waveform.ndim != 1:
    raise ValueError(f'waveform has shape {waveform.shape}; give 1-D mono arrays (average '
                     'the channels of a multi-channel recording first)')
  if sample_rate != config.sample_rate:
    waveform = soxr.resample(waveform, sample_rate, config.sample_rate)
  waveform = np.clip(waveform, -1.0, 1.0).astype(np.float32, copy=False)
  return np.asarray(log_mel(waveform, config))
