"""Where examples come from: TFRecord shards, text files, TSV manifests, TFDS.

Every source yields raw records of one schema, whatever the storage:
  speech and paired: {'id', 'language', 'audio' (encoded WAV/FLAC/OGG bytes), 'transcript'}
  text:              {'id', 'language', 'text'}
all tf.string scalars (bytes from random access). Decoding, features and
tokenisation happen later, in the task's preprocessors (preprocessors.py),
after the records are ordered, so what is read ahead and buffered is
compressed bytes, not log-mel frames.

Two ways to read a source:
  random_access(split): `len(reader)` and `reader[i]` -> record i, from an
    index of record offsets built once per file. The pre-training sampler
    reads this way (sampler.py): any host fetches exactly the records of its
    rows of any global batch, so the data position is one number that does
    not depend on the host count.
  get_dataset(split): a seqio/tf.data stream (downstream tasks and tools).
    Sharding: with at least as many files as hosts each host reads its own
    files; otherwise every host reads every record and keeps every n-th.
    Shuffling: the file order and a record buffer, seeded, per epoch.

Paths go through mslam_jax.paths (etils.epath), so corpora may be on gs://.
"""

import bisect
import csv
import io
import os
import struct
import threading
import zlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import seqio
import tensorflow as tf

from mslam_jax import paths

SplitPatterns = Union[str, Mapping[str, Union[str, Sequence[str]]]]
AUDIO_KEYS = ('id', 'language', 'audio', 'transcript')
TEXT_KEYS = ('id', 'language', 'text')


def _as_splits(patterns: SplitPatterns) -> Mapping[str, List[str]]:
  if isinstance(patterns, str):
    patterns = {'train': patterns}
  return {split: [p] if isinstance(p, str) else list(p) for split, p in patterns.items()}


class _OpenFiles:
  """Open file handles, one set per OS thread (a handle's seek and read must not interleave).

  Keyed by the thread's native id, not a `threading.local`: the sampler reads
  from tf.data's threads (`tf.numpy_function`), and Python gives such a thread a
  fresh thread state at every call, so a thread-local cache was empty at every
  batch and reopened each file it read (the demo's text reads took 2.3 ms of CPU
  per batch that way, 1.0 ms with the files kept open: benchmarks/RESULTS.md).
  Nothing tells Python when such a thread ends, so when a new thread starts
  reading, the handles of threads that have ended are closed (Linux: the
  threads of /proc/self/task; elsewhere they stay open until the reader goes).
  A thread counts as ended once the OS has removed it, which can be a moment
  after `Thread.join()` returns; its files are then closed at a later new thread.
  """

  def __init__(self):
    self._by_thread: Dict[int, Dict[str, object]] = {}
    self._lock = threading.Lock()

  def get(self, name: str):
    handles = self._by_thread.get(threading.get_native_id())
    if handles is None:
      handles = self._new_thread()
    handle = handles.get(name)
    if handle is None:
      if len(handles) >= 64:  # bound the descriptors of a many-file corpus
        for old in handles.values():
          old.close()
        handles.clear()
      handle = handles[name] = paths.path(name).open('rb')
    return handle

  def _new_thread(self) -> Dict[str, object]:
    with self._lock:
      if os.path.isdir('/proc/self/task'):
        for thread in list(self._by_thread):
          if not os.path.exists(f'/proc/self/task/{thread}'):
            for old in self._by_thread.pop(thread).values():
              old.close()
      return self._by_thread.setdefault(threading.get_native_id(), {})

  def count(self) -> int:
    """Open handles, all threads together."""
    return sum(len(handles) for handles in list(self._by_thread.values()))


class RecordReader:
  """Random access to one split's records: `len(reader)`, `reader[i]` -> raw record.

  Files are indexed once, in order (`index_file(name) -> (starts, lengths)`,
  byte offsets of each record's payload); `parse(name, ordinal, payload)`
  turns one payload into the raw-record dict. Thread-safe.
  """

  def __init__(self, files: Sequence[str], index_file, parse):
    self.files = list(files)
    self._parse = parse
    spans = [index_file(f) for f in self.files]
    self._starts = [s for s, _ in spans]
    self._lengths = [n for _, n in spans]
    # The first global record number of each file, and the total (a list: bisect
    # on it is a few times faster than numpy's searchsorted for one number).
    self._first = np.cumsum([0] + [len(s) for s in self._starts]).tolist()
    self._open = _OpenFiles()

  def __len__(self) -> int:
    return self._first[-1]

  def locate(self, index: int) -> Tuple[int, int]:
    """(file number, record number within the file) of global record `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of {len(self)}')
    index = int(index)
    f = bisect.bisect_right(self._first, index) - 1
    return f, index - self._first[f]

  def __getitem__(self, index: int) -> Dict[str, bytes]:
    f, j = self.locate(index)
    name = self.files[f]
    handle = self._open.get(name)
    handle.seek(int(self._starts[f][j]))
    return self._parse(name, j, handle.read(int(self._lengths[f][j])))


def index_tfrecord(name: str) -> Tuple[np.ndarray, np.ndarray]:
  """Payload offsets and lengths of a TFRecord file, from its record headers.

  Each record is: length (uint64 LE), its CRC (4 bytes), payload, CRC (4 bytes).
  """
  starts, lengths = [], []
  with paths.path(name).open('rb') as f:
    data = f.read()
  pos, end = 0, len(data)
  while pos < end:
    if pos + 12 > end:
      raise ValueError(f'{name}: truncated TFRecord header at byte {pos}; rewrite the file')
    (length,) = struct.unpack_from('<Q', data, pos)
    starts.append(pos + 12)
    lengths.append(length)
    pos += 16 + length
  if pos != end:
    raise ValueError(f'{name}: the last TFRecord is truncated (file ends at byte {end}, '
                     f'record needs {pos}); rewrite the file')
  return np.asarray(starts, np.int64), np.asarray(lengths, np.int64)


def index_lines(name: str) -> Tuple[np.ndarray, np.ndarray]:
  """Offsets and lengths (without the newline) of every line of a text file."""
  with paths.path(name).open('rb') as f:
    data = np.frombuffer(f.read(), np.uint8)
  ends = np.flatnonzero(data == ord('\n'))
  if len(data) and (not len(ends) or ends[-1] != len(data) - 1):
    ends = np.append(ends, len(data))  # a last line without a newline
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else np.zeros(
      0, np.int64)
  return starts, (ends - starts).astype(np.int64)


class RecordSource(seqio.DataSource):
  """A seqio DataSource over files: random access (sampler) or a tf.data stream.

  Subclasses give `_read(file) -> records_ds` (the stream) and
  `random_access(split)`.

  Attributes:
    patterns: split -> glob patterns of the files.
    shuffle_buffer: records in the shuffle buffer (raw, small: bytes or lines).
  """

  def __init__(self, patterns: SplitPatterns, shuffle_buffer: int = 1000):
    self.patterns = _as_splits(patterns)
    self.shuffle_buffer = shuffle_buffer
    self.task_name = '?'  # set by registry.add_task, for error messages
    self._readers = {}  # split -> RecordReader, built on first use
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
    return sorted({f for p in self.patterns[split] for f in paths.glob(p)})

  def check(self, split: str) -> List[str]:
    """The files of `split`; raises a FileNotFoundError with the fix when there are none."""
    files = self.list_shards(split)
    if not files:
      raise FileNotFoundError(
          f'task {self.task_name}: no files match {self.patterns[split]} (split {split!r}). '
          'Build the corpus (python -m mslam_jax.corpus.build --output=DIR) or fix '
          'the path in the module that registers this task.')
    return files

  def _task_seed(self, seed: Optional[int]) -> Optional[int]:
    # Tasks share the sampler's seed; without this, equal-sized tasks (one per
    # language) would all be shuffled by the same permutation.
    if seed is None:
      return None
    return (seed + zlib.crc32(self.task_name.encode('utf-8'))) % 2**31

  def count_examples(self, split: str) -> int:
    """Records in `split` (from the files' record index)."""
    return len(self.random_access(split))

  def random_access(self, split: str) -> RecordReader:
    """A reader of `split`'s records by number (built once per split, then cached)."""
    if split not in self._readers:
      self._readers[split] = self._make_reader(split)
    return self._readers[split]

  def _make_reader(self, split: str) -> RecordReader:
    raise NotImplementedError

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

  The layout the corpus builder writes (mslam_jax/corpus/build.py); for a text task the
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

  def _make_reader(self, split: str) -> RecordReader:
    keys = AUDIO_KEYS + self.extra_keys

    def parse(name, ordinal, payload):
      del name, ordinal
      feature = tf.train.Example.FromString(payload).features.feature
      values = {k: feature[k].bytes_list.value[0] if k in feature and
                feature[k].bytes_list.value else b'' for k in keys}
      if self.text_only:
        return {'id': values['id'], 'language': values['language'],
                'text': values['transcript']}
      return values

    return RecordReader(self.check(split), index_tfrecord, parse)


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

  def _make_reader(self, split: str) -> RecordReader:
    language = self.language.encode('utf-8')

    def parse(name, ordinal, payload):
      # The same id and text as the tf.data stream (TextLineDataset drops '\r\n' too).
      return {'id': f'{name}:{ordinal + 1}'.encode('utf-8'), 'language': language,
              'text': payload[:-1] if payload.endswith(b'\r') else payload}

    return RecordReader(self.check(split), index_lines, parse)


def _read_file_bytes(path: bytes) -> bytes:
  try:
    return paths.path(path.decode('utf-8')).read_bytes()
  except Exception:  # pylint: disable=broad-except (object stores raise their own errors)
    return b''  # decoding b'' reports UNREADABLE_AUDIO under the file's name


class _RowReader(RecordReader):
  """A RecordReader whose records are in-memory rows (no file reads by offset)."""

  def __getitem__(self, index: int) -> Dict[str, bytes]:
    f, j = self.locate(index)
    return self._parse(self.files[f], j, b'')


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
    audio_paths, languages, transcripts = [], [], []
    folder = path.rsplit('/', 1)[0] if paths.is_uri(path) else os.path.dirname(
        os.path.abspath(path))
    raw = paths.path(path).read_bytes()
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      line_no = raw.count(b'\n', 0, e.start) + 1
      column = e.start - (raw.rfind(b'\n', 0, e.start) + 1) + 1
      raise ValueError(
          f'{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}). '
          'Manifests are UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`.'
      ) from None
    rows = csv.reader(io.StringIO(text, newline=''), delimiter='\t', quoting=csv.QUOTE_NONE)
    for line_no, row in enumerate(rows, 1):
      if not row or (line_no == 1 and row[:2] == ['path', 'language']):
        continue
      if len(row) not in (2, 3):
        raise ValueError(f'{path}:{line_no}: expected "path<TAB>language<TAB>transcript", '
                         f'got {len(row)} fields: {row!r}')
      absolute = paths.is_uri(row[0]) or os.path.isabs(row[0])
      audio_paths.append(row[0] if absolute else f'{folder}/{row[0]}')
      languages.append(row[1])
      transcripts.append(row[2] if len(row) == 3 else '')
    return audio_paths, languages, transcripts

  def _make_reader(self, split: str) -> RecordReader:
    rows = {f: self.read_manifest(f) for f in self.check(split)}

    def index(name):
      n = len(rows[name][0])
      return np.arange(n, dtype=np.int64), np.zeros(n, np.int64)

    def parse(name, ordinal, payload):
      del payload  # the index points at rows, not bytes: read the audio file itself
      audio_path, language, transcript = (column[ordinal] for column in rows[name])
      encoded = audio_path.encode('utf-8')
      return {'id': encoded, 'language': language.encode('utf-8'),
              'transcript': transcript.encode('utf-8'), 'audio': _read_file_bytes(encoded)}

    return _RowReader(list(rows), index, parse)

  def _read(self, path: tf.Tensor) -> tf.data.Dataset:
    def read(manifest):
      paths, languages, transcripts = self.read_manifest(manifest.decode('utf-8'))
      return (np.array(paths, dtype=object), np.array(languages, dtype=object),
              np.array(transcripts, dtype=object))

    audio_paths, languages, transcripts = tf.numpy_function(
        read, [path], (tf.string, tf.string, tf.string), stateful=False)
    rows = tf.data.Dataset.from_tensor_slices(
        (tf.reshape(audio_paths, [-1]), tf.reshape(languages, [-1]),
         tf.reshape(transcripts, [-1])))
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

  def _make_reader(self, split: str) -> 'TfdsReader':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.check(split)
    try:
      source = tfds.data_source(self.name, split=split, data_dir=self.data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'task {self.task_name}: TFDS dataset {self.name} has no random access ({e}). '
          'The pre-training sampler reads records by number: prepare the dataset with '
          "download_and_prepare(file_format='array_record').") from e
    return TfdsReader(self, source)

  def _convert(self, index, ex):
    audio = tf.cast(ex[self.audio_key], tf.float32)
    if ex[self.audio_key].dtype.is_integer:
      audio = audio / 32768.0
    wav = tf.audio.encode_wav(tf.reshape(audio, [-1, 1]), self.sample_rate)
    language = (ex[self.language_key] if self.language_key else tf.constant(self.language))
    transcript = ex[self.transcript_key] if self.transcript_key else tf.constant('')
    return {'id': tf.strings.join([self.name, tf.strings.as_string(index)], separator=':'),
            'language': language, 'audio': wav, 'transcript': transcript}


class TfdsReader:
  """Random access to a TFDS split prepared as ArrayRecord, records as raw WAV bytes."""

  def __init__(self, tfds_source: TfdsSource, data_source):
    self._source, self._data = tfds_source, data_source

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> Dict[str, bytes]:
    import soundfile as sf  # pylint: disable=g-import-not-at-top
    src = self._source
    ex = self._data[index]
    audio = np.asarray(ex[src.audio_key])
    samples = audio.astype(np.float32) / 32768.0 if audio.dtype.kind == 'i' else audio
    wav = io.BytesIO()
    sf.write(wav, samples.reshape(-1), src.sample_rate, format='WAV', subtype='FLOAT')

    def text(value) -> bytes:
      return value if isinstance(value, bytes) else str(value).encode('utf-8')

    return {'id': f'{src.name}:{index}'.encode('utf-8'),
            'language': text(ex[src.language_key]) if src.language_key
                        else src.language.encode('utf-8'),
            'audio': wav.getvalue(),
            'transcript': text(ex[src.transcript_key]) if src.transcript_key else b''}


# Short constructor names for task modules: `sources.tfrecords('.../*.tfrecord')`.
tfrecords: Callable[..., TFRecordSource] = TFRecordSource
text_lines: Callable[..., TextLineSource] = TextLineSource
manifest: Callable[..., ManifestSource] = ManifestSource
tfds_dataset: Callable[..., TfdsSource] = TfdsSource
