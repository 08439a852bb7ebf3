"""Audio decoding and log-mel features against librosa, numpy and soundfile."""

import io

import librosa
import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf

from mslam_jax.data import audio
from mslam_jax.data import bad_input
from mslam_jax.data.bad_input import Problem

CONFIG = audio.FeatureConfig()


def speechlike(seconds=1.3, rate=16000, seed=0):
  """A chirp, three tones and noise: energy across the whole mel range."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  y = 0.3 * np.sin(2 * np.pi * (100 * t + 0.5 * (6000 / seconds) * t ** 2))
  for hz, amp in [(220, 0.2), (1330, 0.1), (5150, 0.05)]:
    y += amp * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
  y += 0.01 * rng.standard_normal(t.shape)
  return y.astype(np.float32)


def encode(samples, rate=16000, fmt='WAV', subtype='PCM_16'):
  buffer = io.BytesIO()
  sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
  return buffer.getvalue()


def test_config_sample_counts():
  assert (CONFIG.window_samples, CONFIG.hop_samples) == (400, 160)


def test_filterbank_matches_librosa():
  reference = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=20, fmax=8000,
                                  htk=True, norm=None).T
  got = audio.mel_filterbank(CONFIG)
  assert got.shape == (257, 80) and got.dtype == np.float32
  np.testing.assert_allclose(got, reference, atol=1e-5)


def test_log_mel_matches_librosa():
  """Max abs difference of log-mel < 1e-3 over bins above the floor (float32).

  librosa (center=False) puts the 400-sample window in the middle of each
  512-sample FFT frame, 56 samples in; tf.signal.stft puts it at the start.
  Padding the waveform by 56 on both sides for librosa aligns the windows and
  gives the same frame count. A one-sample misalignment gives differences of
  order 0.1, so the tolerance catches it.
  """
  y = speechlike()
  offset = (512 - 400) // 2
  power = librosa.feature.melspectrogram(
      y=np.pad(y, (offset, offset)), sr=16000, n_fft=512, win_length=400, hop_length=160,
      center=False, window='hann', power=2.0, htk=True, norm=None, n_mels=80, fmin=20,
      fmax=8000).T
  reference = np.log(np.maximum(power, CONFIG.log_floor))
  got = audio.log_mel(tf.constant(y), CONFIG).numpy()
  assert got.shape == reference.shape == (audio.num_frames(len(y), CONFIG), 80)
  above_floor = power > CONFIG.log_floor
  assert above_floor.mean() > 0.99
  assert np.max(np.abs(got - reference)[above_floor]) < 1e-3


@pytest.mark.parametrize('samples', [0, 1, 399, 400, 559, 560, 561, 2000])
def test_num_frames_agrees_with_log_mel(samples):
  features = audio.log_mel(tf.zeros([samples]), CONFIG)
  assert features.shape == (audio.num_frames(samples, CONFIG), 80)
  assert audio.num_frames(samples, CONFIG) == (0 if samples < 400 else 1 + (samples - 400) // 160)


def test_log_mel_batch_and_graph_mode():
  y = np.stack([speechlike(seed=1), speechlike(seed=2)])
  batched = audio.log_mel(tf.constant(y), CONFIG).numpy()
  for row, single in zip(batched, y):
    np.testing.assert_allclose(row, audio.log_mel(tf.constant(single), CONFIG), atol=1e-4)
  graph = tf.function(lambda x: audio.log_mel(x, CONFIG),
                      input_signature=[tf.TensorSpec([None], tf.float32)])
  assert graph(tf.zeros([100])).shape == (0, 80)
  np.testing.assert_allclose(graph(tf.constant(y[0])), batched[0], atol=1e-4)


def test_normalize_gives_zero_mean_unit_variance():
  y = speechlike(seed=3)
  raw = audio.log_mel(tf.constant(y), CONFIG).numpy().astype(np.float64)
  expected = (raw - raw.mean(axis=0)) / raw.std(axis=0)
  normalized = audio.log_mel(tf.constant(y), audio.FeatureConfig(normalize=True)).numpy()
  np.testing.assert_allclose(normalized, expected, atol=1e-3)
  np.testing.assert_allclose(normalized.mean(axis=0), 0, atol=1e-4)
  np.testing.assert_allclose(normalized.std(axis=0), 1, atol=1e-4)


@pytest.mark.parametrize('fmt,subtype,atol', [('WAV', 'PCM_16', 1 / 32768),
                                               ('WAV', 'FLOAT', 0),
                                               ('FLAC', 'PCM_16', 1 / 32768)])
def test_decode_round_trip(fmt, subtype, atol):
  y = speechlike(seconds=0.5)
  waveform, status = audio.decode_audio(encode(y, fmt=fmt, subtype=subtype))
  assert status == Problem.OK and waveform.dtype == np.float32
  np.testing.assert_allclose(waveform, y, atol=atol, rtol=0)


def test_decode_resamples_to_target_rate():
  n = 22050
  tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / 22050)
  waveform, status = audio.decode_audio(encode(tone, rate=22050, subtype='FLOAT'))
  assert status == Problem.OK
  assert abs(len(waveform) - n * 16000 / 22050) <= 2
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
  peak_hz = np.argmax(spectrum) * 16000 / len(waveform)
  assert abs(peak_hz - 440) <= 1


def test_decode_averages_stereo():
  left, right = speechlike(seconds=0.2, seed=4), speechlike(seconds=0.2, seed=5)
  waveform, status = audio.decode_audio(encode(np.stack([left, right], 1), subtype='FLOAT'))
  assert status == Problem.OK
  np.testing.assert_allclose(waveform, (left + right) / 2, atol=1e-7)


def bad_files():
  y = speechlike(seconds=0.5)
  wav, flac, ogg = encode(y), encode(y, fmt='FLAC'), encode(y, fmt='OGG', subtype='VORBIS')
  with_nan = y.copy()
  with_nan[100] = np.nan
  return {
      'garbage': (np.random.default_rng(0).bytes(4000), Problem.UNREADABLE_AUDIO),
      'no_bytes': (b'', Problem.UNREADABLE_AUDIO),
      'half_wav': (wav[:len(wav) // 2], Problem.TRUNCATED_AUDIO),
      # libsndfile opens the cut FLAC (STREAMINFO is intact) and raises while
      # decoding ("lost sync" / "psf_fseek() failed").
      'half_flac': (flac[:len(flac) // 2], Problem.TRUNCATED_AUDIO),
      # libsndfile reads a cut Ogg Vorbis file as fewer (often 0) frames
      # without an error; a cut inside the ~4 kB Vorbis setup header, as half
      # of this short file would be, is UNREADABLE_AUDIO instead.
      'ogg_without_end': (ogg[:-100], Problem.TRUNCATED_AUDIO),
      'zero_length_wav': (encode(np.zeros(0, np.float32)), Problem.EMPTY_AUDIO),
      'silent_wav': (encode(np.zeros(1600, np.float32)), Problem.EMPTY_AUDIO),
      'nan_wav': (encode(with_nan, subtype='FLOAT'), Problem.NONFINITE_AUDIO),
      'inf_wav': (encode(np.full(10, np.inf, np.float32), subtype='FLOAT'),
                  Problem.NONFINITE_AUDIO),
  }


@pytest.mark.parametrize('name', list(bad_files()))
def test_decode_bad_input(name):
  data, expected = bad_files()[name]
  waveform, status = audio.decode_audio(data)
  assert status == expected, bad_input.MESSAGES.get(status, status)
  assert waveform.shape == (0,) and waveform.dtype == np.float32


def test_complete_ogg_is_ok():
  waveform, status = audio.decode_audio(encode(speechlike(0.5), fmt='OGG', subtype='VORBIS'))
  assert status == Problem.OK and len(waveform) == 8000


def test_every_decode_problem_is_a_pipeline_problem_with_a_message():
  """decode_audio speaks bad_input.Problem: its codes need no translation downstream."""
  assert all(isinstance(p, Problem) and p in bad_input.MESSAGES and p not in bad_input.KEPT
             for p in audio.AUDIO_PROBLEMS)
  returned = {audio.decode_audio(data)[1] for data, _ in bad_files().values()}
  assert returned == set(audio.AUDIO_PROBLEMS)


def test_decode_tf_in_parallel_map_matches_numpy():
  good = [encode(speechlike(0.3, seed=s)) for s in range(3)]
  resampled = encode(speechlike(0.3, rate=22050), rate=22050, subtype='FLOAT')
  files = good + [resampled] + [data for data, _ in bad_files().values()]
  dataset = tf.data.Dataset.from_tensor_slices(files).map(
      audio.decode_audio_tf, num_parallel_calls=tf.data.AUTOTUNE)
  assert dataset.element_spec[0].shape.as_list() == [None]
  assert dataset.element_spec[1].shape.as_list() == []
  for data, (waveform, status) in zip(files, dataset.as_numpy_iterator(), strict=True):
    expected_waveform, expected_status = audio.decode_audio(data)
    assert status == expected_status
    np.testing.assert_array_equal(waveform, expected_waveform)


def test_log_mel_of_too_short_waveform_is_empty():
  waveform, status = audio.decode_audio(encode(speechlike(0.01)))  # 160 samples
  assert status == Problem.OK
  assert audio.log_mel(tf.constant(waveform), CONFIG).shape == (0, 80)
