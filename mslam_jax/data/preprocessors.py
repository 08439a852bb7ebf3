"""seqio preprocessors: raw records (sources.py) -> model features, bad examples counted.

  speech: audio bytes -> decode, 16 kHz -> log-mel [frames, 80] -> crop to the limit
  text:   text -> NFC, spaces -> char ids [length] -> crop to the limit
  paired: both, but over-long examples are skipped (cropping would cut the
          transcript away from its audio)
and last, for every kind, the `problem` code each step set is recorded (with
the example's name) in bad_input.LOG (`keep_flags`), and a skipped example is
either dropped (`drop_bad`, seqio streams) or kept as an empty row (the
pre-training sampler, whose batches must not depend on which host decodes
which row; sampler.py).

Limits come through seqio's `sequence_length`: {'features': frames, 'ids': characters}.
"""

import functools
from typing import Callable, List, Mapping, Optional

import gin
import numpy as np
import seqio
import tensorflow as tf

from mslam_jax import special_ids
from mslam_jax.data import audio
from mslam_jax.data import bad_input
from mslam_jax.data import vocabulary as vocabulary_lib
from mslam_jax.data.bad_input import Problem

PROBLEM = 'problem'
# The raw-record key of each kind's text (sources.py schema).
TEXT_KEYS = {'text': 'text', 'paired': 'transcript'}


def _merge_problem(old: tf.Tensor, new: tf.Tensor) -> tf.Tensor:
  """A skip reason already set wins; otherwise a new non-OK code replaces the old.

  Elementwise: one example's codes (scalars) or a batch's ([B] each).
  """
  old_skips = tf.reduce_all(tf.stack([tf.not_equal(old, int(p)) for p in bad_input.KEPT]),
                            axis=0)
  return tf.where(old_skips, old, tf.where(tf.equal(new, 0), old, new))


def _crop_start(example_id: tf.Tensor, length: tf.Tensor, limit: int) -> tf.Tensor:
  """A start in [0, length - limit], fixed per example id (stateless, so resumable).

  Elementwise over ids and lengths of any one shape, so a batch's starts are
  one op. The id is hashed without its folders: a text line's id is its file's
  path (sources.py), and the crop must not move with where the corpus is
  checked out. A 31-bit hash modulo a window count of at most a few thousand
  is uniform to within 1e-6.
  """
  name = tf.strings.regex_replace(example_id, r'^.*/', '')
  windows = tf.cast(tf.maximum(length - limit + 1, 1), tf.int64)
  return tf.cast(tf.strings.to_hash_bucket_fast(name, 2**31 - 1) % windows, tf.int32)


def _fit_to_limit(example_id: tf.Tensor, values: tf.Tensor, limit: Optional[int], crop: bool,
                  cropped: Problem, too_long: Problem):
  """(values cropped to `limit` along axis 0 if `crop`, the problem code for the length)."""
  if limit is None:
    return values, tf.constant(0)
  length = tf.shape(values)[0]
  over = length > limit
  if not crop:
    return values, tf.where(over, int(too_long), 0)
  start = tf.where(over, _crop_start(example_id, length, limit), 0)
  return values[start:start + limit], tf.where(over, int(cropped), 0)


@gin.configurable(denylist=['dataset', 'sequence_length', 'crop'])
def audio_features(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]],
                   *, crop: bool, min_frames: int = 32) -> tf.data.Dataset:
  """Adds 'features' [frames, num_mel_bins] float32 and a 'problem' code.

  Args:
    dataset: records with 'id' and 'audio' (encoded bytes).
    sequence_length: 'features' is the frame limit (None: no limit).
    crop: crop over-long audio to the limit at a per-example offset (unlabeled
      speech) instead of skipping it (paired).
    min_frames: shorter audio is skipped (ours: 32 frames = 0.32 s, 8 encoder
      frames, the least that holds a 10-frame masked span's worth of context).
  """
  config = audio.FeatureConfig()
  limit = (sequence_length or {}).get('features')

  def fn(ex):
    waveform, status = audio.decode_audio_tf(ex['audio'], config.sample_rate)
    features = audio.log_mel(waveform, config)
    frames = tf.shape(features)[0]
    problem = status  # already a Problem code: OK or one of audio.AUDIO_PROBLEMS
    problem = _merge_problem(problem, tf.where(frames < min_frames,
                                               int(Problem.TOO_SHORT_AUDIO), 0))
    features, fit = _fit_to_limit(ex['id'], features, limit, crop, Problem.CROPPED_AUDIO,
                                  Problem.TOO_LONG_AUDIO)
    problem = _merge_problem(problem, fit)
    out = {k: v for k, v in ex.items() if k != 'audio'}
    out['features'] = tf.ensure_shape(features, [None, config.num_mel_bins])
    out[PROBLEM] = _merge_problem(ex.get(PROBLEM, tf.constant(0)), problem)
    return out

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def normalize_bytes(text: bytes) -> bytes:
  """vocabulary.normalize_text on UTF-8 bytes (invalid bytes become U+FFFD)."""
  return vocabulary_lib.normalize_text(text.decode('utf-8', errors='replace')).encode('utf-8')


def _encode_and_fit(texts: tf.Tensor, example_ids: tf.Tensor, vocab: seqio.Vocabulary,
                    limit: Optional[int], crop: bool):
  """Normalised texts [B] -> (ids tf.RaggedTensor [B, None] int32, problem codes [B]).

  Unknown characters become UNK and are counted (the row is kept); empty text
  is skipped; over-long text is cropped to `limit` at a per-example offset
  (`crop`) or marked to be skipped (and left whole).
  """
  ids = vocab.encode_tf(texts)
  lengths = tf.cast(ids.row_lengths(), tf.int32)
  problem = tf.where(tf.reduce_any(tf.equal(ids, special_ids.UNK_ID), axis=1),
                     int(Problem.UNKNOWN_CHARS_CLEANED), 0)
  if limit is not None:
    over = lengths > limit
    if crop:
      start = tf.where(over, _crop_start(example_ids, lengths, limit), 0)
      first = tf.cast(ids.row_starts(), tf.int32) + start
      ids = tf.gather(ids.flat_values,
                      tf.ragged.range(first, first + tf.minimum(lengths, limit)))
    problem = _merge_problem(problem, tf.where(
        over, int(Problem.CROPPED_TEXT if crop else Problem.TOO_LONG_TEXT), 0))
  problem = _merge_problem(problem, tf.where(lengths == 0, int(Problem.EMPTY_TEXT), 0))
  return ids, problem


def char_ids(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]],
             output_features: Mapping[str, seqio.Feature], *, key: str,
             crop: bool, normalized: bool = False) -> tf.data.Dataset:
  """Adds 'ids' [length] int32 from record[key] (normalised first) and a 'problem' code.

  Unknown characters become UNK and are counted (the example is kept); empty
  text is skipped; over-long text is cropped at a per-example offset (`crop`)
  or skipped. normalized: record[key] went through `normalize_bytes` already.
  `char_ids_batched` does the same for whole batches.
  """
  vocab = output_features['ids'].vocabulary
  limit = (sequence_length or {}).get('ids')

  def fn(ex):
    text = ex[key]
    if not normalized:
      text = tf.reshape(tf.numpy_function(normalize_bytes, [text], tf.string, stateful=False), [])
    ids, problem = _encode_and_fit(text[None], ex['id'][None], vocab, limit, crop)
    out = {k: v for k, v in ex.items() if k != key}
    out['ids'] = ids[0]
    out[PROBLEM] = _merge_problem(ex.get(PROBLEM, tf.constant(0)), problem[0])
    return out

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def char_ids_batched(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                     output_features: Mapping[str, seqio.Feature], *, key: str,
                     crop: bool) -> tf.data.Dataset:
  """`char_ids` on batches of records whose record[key] [B] is normalised already.

  Adds 'ids' [B, limit] int32 (PAD after each row's end), 'num_ids' [B] and
  'problem' [B]; a row over the limit and not cropped is cut to it (its problem
  code skips it). The sampler's text takes this path: per-example tf.data ops
  cost more than the encoding itself (benchmarks/RESULTS.md).
  """
  vocab = output_features['ids'].vocabulary
  limit = sequence_length['ids']

  def fn(batch):
    ids, problem = _encode_and_fit(batch[key], batch['id'], vocab, limit, crop)
    out = {k: v for k, v in batch.items() if k != key}
    out['ids'] = ids.to_tensor(special_ids.PAD_ID, shape=[None, limit])
    out['num_ids'] = tf.minimum(tf.cast(ids.row_lengths(), tf.int32), limit)
    out[PROBLEM] = _merge_problem(batch.get(PROBLEM, tf.zeros_like(problem)), problem)
    return out

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def feature_steps(kind: str, *, text_normalized: bool = False,
                  batched: bool = False) -> List[Callable]:
  """The seqio preprocessors that turn `kind`'s raw records into features.

  One list for the seqio tasks (registry.add_task, followed by drop_bad) and
  the sampler (whose batches blank the skipped rows, and whose records come
  with their text normalised: `text_normalized`). batched: steps that take
  batches of records ([B] per key) and give padded batches, for the kinds
  without audio (whose decoding is per example); implies text_normalized.
  """
  if batched and kind != 'text':
    raise ValueError(f'{kind} examples are decoded one by one; only text has batched steps')
  steps = []
  if kind in ('speech', 'paired'):
    steps.append(functools.partial(audio_features, crop=kind == 'speech'))
  if kind in ('text', 'paired'):
    crop = kind == 'text'
    steps.append(functools.partial(char_ids_batched, key=TEXT_KEYS[kind], crop=crop)
                 if batched else
                 functools.partial(char_ids, key=TEXT_KEYS[kind], crop=crop,
                                   normalized=text_normalized))
  return steps


def _record_rows(problems, names, tasks) -> np.ndarray:
  return np.array([bad_input.LOG.record(task.decode('utf-8'), int(problem),
                                        name.decode('utf-8', errors='replace'))
                   for problem, name, task in zip(problems, names, tasks)], bool)


def keep_flags(problem: tf.Tensor, example_id: tf.Tensor, task_name: tf.Tensor) -> tf.Tensor:
  """Records each example's problem in bad_input.LOG; True where it is to be kept.

  Takes one example (scalars) or a batch ([B] each) in one Python call: the
  call, not the counting, is what costs (about 0.2 ms each on a busy CPU).
  """
  flags = tf.numpy_function(_record_rows, [tf.reshape(t, [-1]) for t in
                                           (problem, example_id, task_name)],
                            tf.bool, stateful=True)
  return tf.reshape(flags, tf.shape(problem))


def drop_bad(dataset: tf.data.Dataset, *, task_name: str) -> tf.data.Dataset:
  """Records every non-OK example in bad_input.LOG; keeps the cleaned ones, skips the rest."""
  def keep(ex):
    return keep_flags(ex[PROBLEM], ex['id'], tf.constant(task_name))

  def strip(ex):
    return {k: v for k, v in ex.items() if k != PROBLEM}

  return dataset.filter(keep).map(strip)
