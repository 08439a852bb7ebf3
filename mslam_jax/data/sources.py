"""Where examples come from: TFRecord shards, text files, TSV manifests, TFDS.

Every source yields raw records of one schema, whatever the storage:
  speech and paired: {'id', 'language', 'audio' (encoded WAV/FLAC/OGG bytes), 'transcript'}
  text:              {'id', 'language', 'text'}
all tf.string scalars. Decoding, features and tokenisation happen later, in the
task's preprocessors (preprocessors.py), after the records are shuffled, so
shuffle buffers (and the sampler state that saves them) hold compressed bytes,
not log-mel frames.

Sharding: with at least as many files as hosts each host reads its own files;
otherwise every host reads every record in the same order and keeps every n-th.
Shuffling: the file order and a record buffer, seeded, reshuffled each epoch.
"""

import csv
import glob
import os
import zlib
from typing import Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

SplitPatterns = Union[str, Mapping[str, Union[str, Sequence[str]]]]
AUDIO_KEYS = ('id', 'language', 'audio', 'transcript')
TEXT_KEYS = ('id', 'language', 'text')


def _as_splits(patterns: SplitPatterns) -> Mapping[str, List[str]]:
  if isinstance(patterns, str):
    patterns = {'train': patterns}
  return {split: [p] if isinstance(p, str) else list(p) for split, p in patterns.items()}


class RecordSource(seqio.DataSource):
  """A seqio DataSource over files, sharded per host, shuffled as raw records.

  Subclasses give `_read(files_ds) -> records_ds`.

  Attributes:
    patterns: split -> glob patterns of the files.
    shuffle_buffer: records in the shuffle buffer (raw, small: bytes or lines).
  """

  def __init__(self, patterns: SplitPatterns, shuffle_buffer: int = 1000):
    self.patterns = _as_splits(patterns)
    self.shuffle_buffer = shuffle_buffer
    self.task_name = '?'  # set by registry.add_task, for error messages
    super().__init__(splits=tuple(self.patterns), num_input_examples=None)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # we shard by file or by record ourselves

  @property
  def performs_internal_shuffling(self) -> bool:
    return True

  def num_input_examples(self, split: str) -> Optional[int]:
    # None also stops seqio from caching a small source in memory, which would
    # freeze the first epoch's shuffled order for all later epochs.
    return None

  def list_shards(self, split: str) -> List[str]:
    if split not in self.patterns:
      raise ValueError(f'task {self.task_name}: no split {split!r} (it has '
                       f'{sorted(self.patterns)})')
    files = sorted({f for p in self.patterns[split] for f in glob.glob(os.path.expanduser(p))})
    return files

  def check(self, split: str) -> List[str]:
    """The files of `split`; raises a FileNotFoundError with the fix when there are none."""
    files = self.list_shards(split)
    if not files:
      raise FileNotFoundError(
          f'task {self.task_name}: no files match {self.patterns[split]} (split {split!r}). '
          'Build the corpus (python -m mslam_jax.data.build_corpus --output=DIR) or fix '
          'the path in the module that registers this task.')
    return files

  def _task_seed(self, seed: Optional[int]) -> Optional[int]:
    # Tasks share the sampler's seed; without this, equal-sized tasks (one per
    # language) would all be shuffled by the same permutation.
    if seed is None:
      return None
    return (seed + zlib.crc32(self.task_name.encode('utf-8'))) % 2**31

  def count_examples(self, split: str) -> int:
    """Records in `split` (one pass over the files)."""
    ds = self.get_dataset(split, shuffle=False)
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())

  def _read(self, path: tf.Tensor) -> tf.data.Dataset:
    """The records of one file (a string scalar tensor)."""
    raise NotImplementedError

  def get_dataset(self, split: str = 'train', shuffle: bool = True,
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  **unused_kwargs) -> tf.data.Dataset:
    files = self.check(split)
    seed = self._task_seed(seed)
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    shard_by_record = False
    if shard_info is not None and shard_info.num_shards > 1:
      if len(files) >= shard_info.num_shards:
        files_ds = files_ds.shard(shard_info.num_shards, shard_info.index)
      else:
        shard_by_record = True
    if shuffle:
      files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(self._read, cycle_length=min(len(files), 8),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shard_by_record:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    if shuffle:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


class TFRecordSource(RecordSource):
  """tf.train.Example shards with bytes features id, language, audio, transcript.

  The layout the corpus builder writes (build_corpus.py); for a text task the
  transcript feature becomes 'text'. `extra_keys` reads more bytes features
  (empty where absent), e.g. ('english',) for speech translation.
  """

  def __init__(self, patterns: SplitPatterns, shuffle_buffer: int = 256,
               text_only: bool = False, extra_keys: Sequence[str] = ()):
    super().__init__(patterns, shuffle_buffer)
    self.text_only = text_only
    self.extra_keys = tuple(extra_keys)

  def _read(self, path: tf.Tensor) -> tf.data.Dataset:
    spec = {k: tf.io.FixedLenFeature([], tf.string, default_value='')
            for k in AUDIO_KEYS + self.extra_keys}

    def parse(serialized):
      ex = tf.io.parse_single_example(serialized, spec)
      if self.text_only:
        return {'id': ex['id'], 'language': ex['language'], 'text': ex['transcript']}
      return ex

    return tf.data.TFRecordDataset(path).map(parse)


class TextLineSource(RecordSource):
  """UTF-8 text files, one example per line; ids are `file:line`.

  Attributes:
    language: the language code of every line.
  """

  def __init__(self, patterns: SplitPatterns, language: str, shuffle_buffer: int = 10000):
    super().__init__(patterns, shuffle_buffer)
    self.language = language

  def _read(self, path: tf.Tensor) -> tf.data.Dataset:
    language = self.language
    lines = tf.data.TextLineDataset(path).enumerate(start=1)
    return lines.map(lambda i, line: {
        'id': tf.strings.join([path, tf.strings.as_string(i)], separator=':'),
        'language': tf.constant(language), 'text': line})


def _read_file_bytes(path: bytes) -> bytes:
  try:
    with open(path.decode('utf-8'), 'rb') as f:
      return f.read()
  except OSError:
    return b''  # decoding b'' reports UNREADABLE_AUDIO under the file's name


class ManifestSource(RecordSource):
  """TSV manifests, one line per utterance: path <TAB> language <TAB> transcript.

  A header line `path language transcript` is optional; relative paths are
  read from the manifest's folder; the transcript may be empty for unlabeled
  speech. A missing audio file is skipped and counted under its path.
  """

  def __init__(self, patterns: SplitPatterns, shuffle_buffer: int = 256):
    super().__init__(patterns, shuffle_buffer)

  @staticmethod
  def read_manifest(path: str):
    """Parses one manifest into (paths, languages, transcripts); bad rows raise with line no."""
    paths, languages, transcripts = [], [], []
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding='utf-8', newline='') as f:
      for line_no, row in enumerate(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE), 1):
        if not row or (line_no == 1 and row[:2] == ['path', 'language']):
          continue
        if len(row) not in (2, 3):
          raise ValueError(f'{path}:{line_no}: expected "path<TAB>language<TAB>transcript", '
                           f'got {len(row)} fields: {row!r}')
        audio = row[0] if os.path.isabs(row[0]) else os.path.join(folder, row[0])
        paths.append(audio)
        languages.append(row[1])
        transcripts.append(row[2] if len(row) == 3 else '')
    return paths, languages, transcripts

  def count_examples(self, split: str) -> int:
    return sum(len(self.read_manifest(f)[0]) for f in self.check(split))

  def _read(self, path: tf.Tensor) -> tf.data.Dataset:
    def read(manifest):
      paths, languages, transcripts = self.read_manifest(manifest.decode('utf-8'))
      return (np.array(paths, dtype=object), np.array(languages, dtype=object),
              np.array(transcripts, dtype=object))

    paths, languages, transcripts = tf.numpy_function(
        read, [path], (tf.string, tf.string, tf.string), stateful=False)
    rows = tf.data.Dataset.from_tensor_slices(
        (tf.reshape(paths, [-1]), tf.reshape(languages, [-1]), tf.reshape(transcripts, [-1])))
    return rows.map(lambda p, l, t: {
        'id': p, 'language': l, 'transcript': t,
        'audio': tf.reshape(tf.numpy_function(_read_file_bytes, [p], tf.string,
                                              stateful=False), [])})


class TfdsSource(RecordSource):
  """A TFDS dataset with decoded audio (e.g. int16 samples), re-encoded as WAV bytes.

  Attributes:
    name: the TFDS name (`librispeech/clean100`), data_dir: where it is prepared.
    audio_key, transcript_key: feature names; language: code, or a feature name
      via `language_key`.
  """

  def __init__(self, name: str, splits: Sequence[str] = ('train',), *, audio_key: str = 'audio',
               transcript_key: Optional[str] = None, language: str = '',
               language_key: Optional[str] = None, sample_rate: int = 16000,
               data_dir: Optional[str] = None, shuffle_buffer: int = 256):
    super().__init__({s: s for s in splits}, shuffle_buffer)
    self.name, self.data_dir = name, data_dir
    self.audio_key, self.transcript_key = audio_key, transcript_key
    self.language, self.language_key, self.sample_rate = language, language_key, sample_rate

  def list_shards(self, split: str) -> List[str]:
    return [split] if split in self.patterns else []

  def check(self, split: str) -> List[str]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      tfds.builder(self.name, data_dir=self.data_dir).info  # pylint: disable=expression-not-assigned
    except Exception as e:  # pylint: disable=broad-except
      raise FileNotFoundError(f'task {self.task_name}: TFDS dataset {self.name} not available '
                              f'in {self.data_dir or "the default data_dir"} ({e}); prepare it '
                              'with tfds.builder(...).download_and_prepare()') from e
    return super().check(split)

  def count_examples(self, split: str) -> int:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.check(split)
    return tfds.builder(self.name, data_dir=self.data_dir).info.splits[split].num_examples

  def get_dataset(self, split: str = 'train', shuffle: bool = True,
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  **unused_kwargs) -> tf.data.Dataset:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.check(split)
    seed = self._task_seed(seed)
    ds = tfds.builder(self.name, data_dir=self.data_dir).as_dataset(split=split,
                                                                    shuffle_files=False)
    if shard_info is not None and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    ds = ds.enumerate().map(self._convert)
    if shuffle:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds

  def _convert(self, index, ex):
    audio = tf.cast(ex[self.audio_key], tf.float32)
    if ex[self.audio_key].dtype.is_integer:
      audio = audio / 32768.0
    wav = tf.audio.encode_wav(tf.reshape(audio, [-1, 1]), self.sample_rate)
    language = (ex[self.language_key] if self.language_key else tf.constant(self.language))
    transcript = ex[self.transcript_key] if self.transcript_key else tf.constant('')
    return {'id': tf.strings.join([self.name, tf.strings.as_string(index)], separator=':'),
            'language': language, 'audio': wav, 'transcript': transcript}


# Short constructor names for task modules: `sources.tfrecords('.../*.tfrecord')`.
tfrecords: Callable[..., TFRecordSource] = TFRecordSource
text_lines: Callable[..., TextLineSource] = TextLineSource
manifest: Callable[..., ManifestSource] = ManifestSource
tfds_dataset: Callable[..., TfdsSource] = TfdsSource
