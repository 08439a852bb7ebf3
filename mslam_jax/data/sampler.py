"""The three-stream sampler: every step holds speech, text and paired examples.

mSLAM (Bapna et al. 2022): no alternating steps, no curriculum; each step holds
B_speech unlabeled speech, B_text unlabeled text and B_paired paired sequences.
Each kind is one seqio mixture of its tasks (registry.mixture, temperature
rates over languages), padded to the static shapes of BatchConfig, and the
three are zipped into one batch:

  {'speech': {'features' [B_s, F_s, 80] f32, 'feature_paddings' [B_s, F_s] f32},
   'text':   {'ids' [B_t, L_t] i32, 'id_paddings' [B_t, L_t] f32},
   'paired': {'features' [B_p, F_p, 80], 'feature_paddings', 'ids' [B_p, L_p], 'id_paddings'}}

paddings are 1.0 on padding, right-padded (the model's convention).

The global order is an index function, as in Grain (and MaxText's Grain
pipeline): each task's records are shuffled per epoch by a seeded
permutation of record numbers (numpy, or grain's index_shuffle for tasks
too large to hold one), and the tasks of a kind are interleaved in
proportion to their mixture rates (grain.MapDataset.mix), so the g-th
example of a kind's stream is a pure function of (seed, tasks, g). Global
batch k holds examples [g0 + kB, g0 + (k+1)B); host i of n fetches (by random
access, sources.RecordReader) and decodes only rows [i B/n, (i+1) B/n) of it,
with one Python call per batch: the records' fetch (and their text's
normalisation) and the bad-input check (a call costs about 0.17 ms of CPU,
about what a text line's other steps take together).

The data position is therefore one number per kind, the examples consumed,
the same on every host (`state()` / `load_state()`, a small JSON dict): a run
restored on any number of hosts reads exactly the global batches the
uninterrupted run would have read, and the batch size may change on resume.

An example that fails its checks (bad_input.py) is counted and keeps its row
as an empty, all-padding row (`_finish`) instead of being dropped: dropping
would shift every later row, and which rows shift would depend on how the
batch is split over hosts.
"""

import atexit
import concurrent.futures
import dataclasses
import gc
import inspect
import os
import re
import threading
import time
import weakref
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gin
import grain
import numpy as np
import seqio
import tensorflow as tf

import mslam_jax
from mslam_jax import paths
from mslam_jax import special_ids
from mslam_jax.data import bad_input
from mslam_jax.data import paired_lengths
from mslam_jax.data import preprocessors
from mslam_jax.data import registry
from mslam_jax.data import vocabulary as vocabulary_lib
from mslam_jax.data.batch_spec import BatchConfig

KINDS = registry.KINDS
_OPEN_SAMPLERS = weakref.WeakSet()


@atexit.register
def _close_open_samplers():
  # A tf.data iterator destroyed during interpreter shutdown waits forever for
  # its tf.numpy_function calls (they can no longer take the GIL); closing
  # while the interpreter is still whole ends them cleanly.
  for sampler in list(_OPEN_SAMPLERS):
    sampler.close()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which tasks feed each kind, and how they are mixed.

  Attributes:
    source: 'tasks' (the sampler over seqio tasks) or 'synthetic' (the toy
      generator in synthetic.py, for model tests without data).
    task_modules: modules imported before the mixtures are built; each
      registers tasks (dotted names or .py paths; `--task_module` adds more).
    corpus_dirs: corpora written by `python -m mslam_jax.corpus.build`,
      registered as tasks `<folder name>_<kind>_<language>` (registry.add_corpus);
      point vocabulary_path at the corpus' vocab.txt.
    speech_tasks, text_tasks, paired_tasks: fnmatch patterns of task names per
      kind ('*': every registered task of that kind).
    speech_temperature, paired_temperature: mixing temperature T, rates
      proportional to size^(1/T) (ours: 1, in proportion to size; the paper
      gives no value for speech).
    text_temperature: T for text (mSLAM: 3, over mC4's languages).
    mix_by: what the temperature is applied to: 'language' (the paper: a
      language's tasks share its rate, split by size) or 'task' (each task
      on its own, so a language registered as two tasks gets more).
    vocabulary_path: the character vocabulary (relative paths are tried from
      the current directory, then the repository root).
    split: which split the sampler reads.
    seed: shuffling and mixing seed (the same on every host).
    feature_cache_mb: a speech or paired kind whose examples, once decoded
      (log-mel, character ids), fit in this many MB on a host is decoded once,
      before the first step (train.py; else at its first batch), and served
      from memory after (ours: the embedded corpus' speech is read about 17
      times in the 300-step demo, where decoding takes a quarter of the 2 CPU
      cores; 0: off). The batches are the same either way, and a bad example
      is still counted each time it is read.
  """
  source: str = 'tasks'
  task_modules: Tuple[str, ...] = ('tasks.embedded',)
  corpus_dirs: Tuple[str, ...] = ()
  speech_tasks: Tuple[str, ...] = ('*',)
  text_tasks: Tuple[str, ...] = ('*',)
  paired_tasks: Tuple[str, ...] = ('*',)
  speech_temperature: float = 1.0
  text_temperature: float = 3.0
  paired_temperature: float = 1.0
  mix_by: str = 'language'
  vocabulary_path: str = 'tasks/embedded_corpus/vocab.txt'
  split: str = 'train'
  seed: int = 0
  feature_cache_mb: float = 256.0


def corpus_prefix(corpus_dir: str) -> str:
  """Task-name prefix of a corpus folder: its name, other characters made '_'."""
  name = os.path.basename(os.path.normpath(os.path.expanduser(corpus_dir)))
  return re.sub(r'[^A-Za-z0-9]', '_', name) or 'corpus'


def resolve_path(path: str) -> str:
  """A relative path as given when it exists from here, else from the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  return os.path.join(mslam_jax.REPO_ROOT, path)


def _padded_batches(ds: tf.data.Dataset, batch_size: int, frames: Optional[int],
                    chars: Optional[int], num_mel_bins: int) -> tf.data.Dataset:
  """Examples -> batches padded to the static limits, with their lengths ('num_frames',
  'num_ids'); the examples' other keys (id, language, task, problem code) ride along."""

  def add_lengths(ex):
    # Past the limit only a skipped example (paired audio and transcripts are
    # skipped, not cropped): cut so it pads; `_finish` blanks its row.
    out = dict(ex)
    if frames is not None:
      out['features'] = ex['features'][:frames]
      out['num_frames'] = tf.shape(out['features'])[0]
    if chars is not None:
      out['ids'] = ex['ids'][:chars]
      out['num_ids'] = tf.shape(out['ids'])[0]
    return out

  shapes = {'id': [], 'language': [], 'task': [], preprocessors.PROBLEM: []}
  values = {'id': '', 'language': '', 'task': '', preprocessors.PROBLEM: 0}
  if frames is not None:
    shapes.update(features=[frames, num_mel_bins], num_frames=[])
    values.update(features=0.0, num_frames=0)
  if chars is not None:
    shapes.update(ids=[chars], num_ids=[])
    values.update(ids=special_ids.PAD_ID, num_ids=0)
  ds = ds.map(add_lengths, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.padded_batch(batch_size, padded_shapes=shapes,
                         padding_values={k: tf.constant(v, dtype=ds.element_spec[k].dtype)
                                         for k, v in values.items()},
                         drop_remainder=True)


def _finish(frames: Optional[int], chars: Optional[int]):
  """A padded batch -> the model's arrays, with float paddings (1 = pad).

  The batch's problem codes are recorded in bad_input.LOG in one call, and a
  row to be skipped becomes all padding (zero features, PAD ids), as an empty
  example would pad to.
  """

  def finish(batch):
    keep = preprocessors.keep_flags(batch[preprocessors.PROBLEM], batch['id'], batch['task'])
    out = {'id': batch['id'], 'language': batch['language']}
    if frames is not None:
      # tf.where, not a product: a skipped example's features may be NaN.
      out['features'] = tf.where(keep[:, None, None], batch['features'], 0.0)
      out['feature_paddings'] = tf.cast(
          tf.range(frames)[None, :] >= tf.where(keep, batch['num_frames'], 0)[:, None],
          tf.float32)
    if chars is not None:
      out['ids'] = tf.where(keep[:, None], batch['ids'], special_ids.PAD_ID)
      out['id_paddings'] = tf.cast(
          tf.range(chars)[None, :] >= tf.where(keep, batch['num_ids'], 0)[:, None], tf.float32)
    return out

  return finish


# The raw-record keys each kind's preprocessors read (sources.py schema).
_RAW_KEYS = {'speech': ('id', 'language', 'audio'), 'text': ('id', 'language', 'text'),
             'paired': ('id', 'language', 'audio', 'transcript')}
STATE_FORMAT = 'mslam_jax.sampler/1'
# Records fetched at once per kind (ours: enough to hide object-store latency).
_READ_THREADS = 16


class DataPositionMismatchError(ValueError):
  """A saved data position was written for other tasks, sizes or seed."""


def _task_seed(seed: int, task_name: str) -> int:
  # Tasks share the sampler's seed; without this, equal-sized tasks (one per
  # language) would all be shuffled by the same permutation.
  return (seed + zlib.crc32(task_name.encode('utf-8'))) % 2**31


# Tasks up to this many records keep each epoch's permutation in memory (8
# bytes a record, two epochs); larger ones use grain's index_shuffle, which
# needs no memory but costs about 0.3 ms a lookup (ours: the cut-off).
_MATERIALIZE_MAX = 2**24


class _EpochPermutations:
  """Record number of the i-th draw of a task: epoch i // n, permuted per epoch."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, seed
    self._cached: Dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # batches are fetched from several threads

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      found = self._cached.get(epoch)
    if found is not None:
      return found
    made = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    with self._lock:
      self._cached[epoch] = made
      while len(self._cached) > 2:  # draws move forward: keep the newest two epochs
        self._cached.pop(min(self._cached))
    return made

  def __call__(self, index: int, _) -> int:
    return int(self.permutation(index // self.n)[index % self.n])


def _shuffled_epochs(n: int, seed: int):
  """grain MapDataset over record numbers 0..n-1, reshuffled each epoch, endless."""
  if n > _MATERIALIZE_MAX:
    return grain.MapDataset.range(n).shuffle(seed=seed).repeat()
  return grain.MapDataset.range(n).repeat().map_with_index(_EpochPermutations(n, seed))


@dataclasses.dataclass
class _KindPlan:
  """One kind's global example order: example g -> (task number, record number).

  Attributes:
    tasks: the mixture's task names; readers: their random-access readers.
    rates: normalised mixing rates, in task order.
    order: grain MapDataset, order[g] = (task number, record number).
    seed: the kind's seed.
  """
  tasks: List[str]
  readers: List[Any]
  rates: List[float]
  order: Any
  seed: int

  def fingerprint(self) -> Dict[str, Any]:
    return {'seed': self.seed,
            'tasks': [[t, len(r), round(p, 12)] for t, r, p in
                      zip(self.tasks, self.readers, self.rates)]}


def _raw_columns(plan: _KindPlan, task: int, record: int, keys: Sequence[str]) -> List[bytes]:
  """One record's raw `keys` (sources.py schema; 'task': its task's name), b'' where absent,
  its text normalised (preprocessors.normalize_bytes; the feature steps are told so)."""
  raw = plan.readers[task][record]
  text_keys = preprocessors.TEXT_KEYS.values()
  return [plan.tasks[task].encode('utf-8') if k == 'task' else
          preprocessors.normalize_bytes(raw.get(k, b'')) if k in text_keys else raw.get(k, b'')
          for k in keys]


class ThreeStreamSampler:
  """Iterator over this host's share of the global three-kind batches.

  Args:
    batch_config: global batch sizes and static lengths.
    data_config: tasks, temperatures, vocabulary, seed.
    parts: the kinds to produce (a variant without text builds no text stream).
    shard_index, num_shards: this host and the host count (default: JAX's
      process index and count).
    model_vocab_size: if given, fail early when the vocabulary is larger.
    with_metadata: also return each example's 'id' and 'language' (numpy
      object arrays) beside the arrays; for statistics and tests, not the model.
    extra_task_modules: imported after data_config.task_modules (--task_module).
  """

  def __init__(self, batch_config: BatchConfig, data_config: Optional[DataConfig] = None, *,
               parts: Sequence[str] = KINDS, shard_index: Optional[int] = None,
               num_shards: Optional[int] = None, model_vocab_size: Optional[int] = None,
               with_metadata: bool = False, extra_task_modules: Sequence[str] = ()):
    data_config = data_config or DataConfig()
    if shard_index is None or num_shards is None:
      import jax  # pylint: disable=g-import-not-at-top
      shard_index, num_shards = jax.process_index(), jax.process_count()
    self.batch_config, self.data_config = batch_config, data_config
    self.parts = tuple(p for p in KINDS if p in parts)
    self.shard_index, self.num_shards = shard_index, num_shards
    self.with_metadata = with_metadata
    for kind in self.parts:
      self.per_host_batch_size(kind)  # fails early when hosts do not divide it
    for module in tuple(data_config.task_modules) + tuple(extra_task_modules):
      registry.import_task_module(module)
    for corpus_dir in data_config.corpus_dirs:
      registry.add_corpus(corpus_dir, prefix=corpus_prefix(corpus_dir))
    registry.set_vocabulary_path(resolve_path(data_config.vocabulary_path))
    self.vocabulary = registry.SHARED_VOCABULARY.loaded
    vocabulary_lib.check_fits_model(self.vocabulary, model_vocab_size,
                                    where=data_config.vocabulary_path)
    self.mixtures: Dict[str, seqio.Mixture] = {}
    self._plans = {kind: self._plan(kind, data_config.seed + offset)
                   for offset, kind in enumerate(self.parts)}
    # Examples of each kind consumed so far (the data position).
    self.examples = {kind: 0 for kind in self.parts}
    self._iterator = None
    self._pools: List[concurrent.futures.ThreadPoolExecutor] = []
    # kind -> (examples[task][record] after the feature steps, their element_spec),
    # or None when over DataConfig.feature_cache_mb; filled by fill_feature_cache (train.py)
    # or else at the first batch.
    self._feature_cache: Dict[str, Optional[Tuple[List[List[Dict[str, Any]]], Any]]] = {}
    # kind -> (examples held, bytes decoded, seconds) of the cache's fill; examples
    # None when the kind did not fit (bytes None: its static limits ruled it out).
    self._cache_fill: Dict[str, Tuple[Optional[int], Optional[int], float]] = {}
    _OPEN_SAMPLERS.add(self)

  def per_host_batch_size(self, kind: str) -> int:
    from mslam_jax import partitioning  # pylint: disable=g-import-not-at-top (jax: lazily)
    partitioning.check_batch_split(self.batch_config, (kind,), num_hosts=self.num_shards)
    return getattr(self.batch_config, f'{kind}_batch_size') // self.num_shards

  def _plan(self, kind: str, seed: int) -> _KindPlan:
    dc = self.data_config
    mix = registry.mixture(kind, getattr(dc, f'{kind}_tasks'), getattr(dc, f'{kind}_temperature'),
                           name=f'mslam_{kind}_mixture', mix_by=dc.mix_by)
    self.mixtures[kind] = mix
    tasks = [t.name for t in mix.tasks]
    readers = []
    for task in mix.tasks:
      # Indexes the files; a missing source fails here, before any step.
      readers.append(task.source.random_access(dc.split))
    rates = np.array([mix.get_rate(t) for t in mix.tasks], np.float64)
    rates = (rates / rates.sum()).tolist()
    streams = []
    for number, (name, reader) in enumerate(zip(tasks, readers)):
      if not len(reader):
        raise ValueError(f'task {name}: split {dc.split!r} has no records')
      streams.append(_shuffled_epochs(len(reader), _task_seed(seed, name))
                     .map(lambda i, n=number: (n, i)))
    order = grain.MapDataset.mix(streams, rates) if len(streams) > 1 else streams[0]
    return _KindPlan(tasks=tasks, readers=readers, rates=rates, order=order, seed=seed)

  def _lengths(self, kind: str) -> Dict[str, int]:
    cfg = self.batch_config
    frames = {'speech': cfg.speech_frames, 'paired': cfg.paired_frames}.get(kind)
    chars = {'text': cfg.text_length, 'paired': cfg.paired_text_length}.get(kind)
    return {k: v for k, v in (('features', frames), ('ids', chars)) if v is not None}

  def _dataset(self, kind: str) -> tf.data.Dataset:
    """This host's batches of `kind` from the current position: fetch, decode, pad."""
    global_size = getattr(self.batch_config, f'{kind}_batch_size')
    per_host = self.per_host_batch_size(kind)
    start = self.examples[kind]  # fixed for this iterator; `examples` counts on

    def host_rows(batch) -> range:
      """Global example numbers of this host's rows of the `batch`-th global batch from `start`."""
      first = start + int(batch) * global_size + self.shard_index * per_host
      return range(first, first + per_host)

    cached = self._cached_features(kind)
    lengths = self._lengths(kind)
    frames, chars = lengths.get('features'), lengths.get('ids')
    if cached is not None:
      ds = self._from_cache(kind, cached, host_rows, per_host)
    elif frames is None:
      # Text alone: its steps take whole batches; per-example tf.data ops (unbatch,
      # a map per line, padded_batch) cost more than the encoding itself.
      ds = self._features(kind, self._from_records(kind, host_rows, per_host), batched=True)
    else:
      records = self._from_records(kind, host_rows, per_host).unbatch()
      ds = _padded_batches(self._features(kind, records), per_host, frames, chars,
                           self.batch_config.num_mel_bins)
    return ds.map(_finish(frames, chars), num_parallel_calls=tf.data.AUTOTUNE)

  def _from_records(self, kind: str, host_rows, per_host: int) -> tf.data.Dataset:
    """This host's raw records of `kind`, in `_dataset`'s order, fetched by number, as
    batches of `per_host` rows (a [per_host] column per key)."""
    plan = self._plans[kind]
    pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, f'mslam_{kind}_reader')
    self._pools.append(pool)
    keys = _RAW_KEYS[kind] + ('task',)
    # Object stores answer in tens of milliseconds: fetch a batch's rows in
    # parallel there; local reads are faster one by one (no thread hand-offs).
    remote = any(paths.is_uri(f) for reader in plan.readers
                 for f in getattr(reader, 'files', ()))

    def fetch_row(g):
      task, record = plan.order[g]
      return _raw_columns(plan, task, int(record), keys)

    def fetch_batch(batch):
      """The batch's raw records, as columns."""
      rows = host_rows(batch)
      rows = list(pool.map(fetch_row, rows) if remote else map(fetch_row, rows))
      return tuple(np.array(column, dtype=object) for column in zip(*rows))

    def fetch(batch):
      # One Python call per batch, not per row (tf.data.Dataset.from_generator
      # costs about a third of the decoding throughput), and several batches in
      # flight (parallel map calls, order kept).
      columns = tf.numpy_function(fetch_batch, [batch], [tf.string] * len(keys),
                                  stateful=False)
      return {k: tf.reshape(c, [per_host]) for k, c in zip(keys, columns)}

    return tf.data.Dataset.range(2**62).map(fetch, num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=True)

  def _features(self, kind: str, ds: tf.data.Dataset, batched: bool = False) -> tf.data.Dataset:
    """Raw records -> examples with features, ids and a problem code (the kind's steps);
    batched: batches of records -> padded batches with lengths (text only)."""
    lengths = self._lengths(kind)
    # The text is normalised by _raw_columns.
    for step in preprocessors.feature_steps(kind, text_normalized=True, batched=batched):
      wanted = inspect.signature(step).parameters
      kwargs = {}
      if 'sequence_length' in wanted:
        kwargs['sequence_length'] = lengths
      if 'output_features' in wanted:
        kwargs['output_features'] = registry.output_features(kind)
      ds = step(ds, **kwargs)
    return ds

  def _cached_features(self, kind: str):
    """(examples[task][record] after `_features`, their element_spec), or None.

    None where DataConfig.feature_cache_mb is 0 or the kind's examples would
    not fit in it: checked first from the static limits (frames, characters)
    times the record count, so a large corpus is never read here, then on the
    decoded examples themselves (paired audio is not cropped to the limit).
    Raises AllSkippedError for a task none of whose held examples is kept,
    before any batch is built (bad_input.none_kept says why).
    """
    if kind in self._feature_cache:
      return self._feature_cache[kind]
    budget = self.data_config.feature_cache_mb * 2**20
    plan = self._plans[kind]
    lengths = self._lengths(kind)
    per_example = 4 * (lengths.get('features', 0) * self.batch_config.num_mel_bins +
                       lengths.get('ids', 0))
    cache = None
    records = sum(len(r) for r in plan.readers)
    # Only audio is worth it: text's steps cost about what serving from memory does.
    if 'features' in lengths and budget > 0 and records * per_example > budget:
      self._cache_fill[kind] = (None, None, 0.0)
    elif 'features' in lengths and budget > 0:
      started = time.perf_counter()
      keys = _RAW_KEYS[kind] + ('task',)
      # One pipeline over every record of every task (a pipeline per task costs
      # more to build than its records take to decode).
      where = [(t, r) for t, reader in enumerate(plan.readers) for r in range(len(reader))]

      def fetch_record(n):
        return _raw_columns(plan, *where[int(n)], keys)

      def fetch(n):
        columns = tf.numpy_function(fetch_record, [n], [tf.string] * len(keys), stateful=False)
        return {k: tf.reshape(c, []) for k, c in zip(keys, columns)}

      ds = self._features(kind, tf.data.Dataset.range(len(where)).map(
          fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
      examples, used = [[] for _ in plan.readers], 0
      for (task, _), example in zip(where, ds.as_numpy_iterator()):
        used += sum(np.asarray(v).nbytes for v in example.values())
        if used > budget:
          examples = None
          break
        examples[task].append(example)
      if examples is not None:
        cache = (examples, ds.element_spec)
      self._cache_fill[kind] = (records if cache else None, used,
                                time.perf_counter() - started)
    self._feature_cache[kind] = cache
    for task, held in zip(self._plans[kind].tasks, cache[0] if cache else ()):
      error = bad_input.none_kept(task, [ex[preprocessors.PROBLEM] for ex in held],
                                  [ex['id'].decode('utf-8', errors='replace') for ex in held])
      if error is not None:
        raise error
    return cache

  def _from_cache(self, kind: str, cached, host_rows, per_host: int) -> tf.data.Dataset:
    """This host's batches of `kind` (the rows `host_rows` names) built from memory, as
    `_padded_batches` builds them from `_features`' examples of the raw records."""
    plan = self._plans[kind]
    examples, spec = cached
    limits = self._lengths(kind)  # the static length of each ranked key
    pad = {'features': 0.0, 'ids': special_ids.PAD_ID}
    length_key = {'features': 'num_frames', 'ids': 'num_ids'}
    keys = sorted(spec)
    ranked = [k for k in keys if spec[k].shape.rank]

    def fetch_batch(batch):
      """The batch's columns: scalars as they are, arrays padded to the limit (cut past it,
      as `_padded_batches` does) with their lengths."""
      rows = []
      for g in host_rows(batch):
        task, record = plan.order[g]
        rows.append(examples[task][int(record)])
      columns = []
      for k in keys:
        values = [row[k] for row in rows]
        if k not in ranked:
          columns.append(np.array(values, dtype=object if spec[k].dtype == tf.string
                                  else spec[k].dtype.as_numpy_dtype))
          continue
        limit = limits[k]
        padded = np.full((per_host, limit) + values[0].shape[1:], pad[k], values[0].dtype)
        lengths = np.zeros([per_host], np.int32)
        for n, v in enumerate(values):
          lengths[n] = min(len(v), limit)
          padded[n, :lengths[n]] = v[:limit]
        columns += [padded, lengths]
      return columns

    types = []
    for k in keys:
      types += [spec[k].dtype] + ([tf.int32] if k in ranked else [])

    def fetch(batch):
      columns = iter(tf.numpy_function(fetch_batch, [batch], types, stateful=False))
      out = {}
      for k in keys:
        if k in ranked:
          out[k] = tf.ensure_shape(next(columns), [per_host, limits[k]] + spec[k].shape[1:])
          out[length_key[k]] = tf.ensure_shape(next(columns), [per_host])
        else:
          out[k] = tf.ensure_shape(next(columns), [per_host])
      return out

    return tf.data.Dataset.range(2**62).map(fetch, num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=True)

  def cached_kinds(self) -> List[str]:
    """The kinds served from memory (DataConfig.feature_cache_mb), once batches started."""
    return [kind for kind, cache in self._feature_cache.items() if cache is not None]

  def fill_feature_cache(self) -> Optional[str]:
    """Decodes the kinds that fit DataConfig.feature_cache_mb now rather than at the first
    batch, and says which kinds are held in memory and which are not, in console lines
    (None when the cache is off or no kind has audio)."""
    for kind in self.parts:
      self._cached_features(kind)
    if not self._cache_fill:
      return None
    limit = f'DataConfig.feature_cache_mb = {self.data_config.feature_cache_mb:g}'
    held, read, seconds = [], [], 0.0
    for kind in self.parts:
      if kind in self._cache_fill:
        examples, used, took = self._cache_fill[kind]
        seconds += took
        if examples is None:
          read.append(kind)
        else:
          held.append(f'{kind} {examples} examples ({used / 2**20:.1f} MB)')
    lines = []
    if held:
      lines.append(f'input held in memory: {", ".join(held)}, decoded once in '
                   f'{seconds:.1f} s ({limit})')
    if read:
      lines.append(f'input decoded at every reading: {", ".join(read)} (larger than {limit})')
    return '\n'.join(lines)

  def _start(self) -> None:
    streams = {kind: self._dataset(kind) for kind in self.parts}
    dataset = tf.data.Dataset.zip(streams).prefetch(2)
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning thread: at the end of a train.py run, destroying the iterator
    # waited for that thread's current tuning period, 8-28 s after a 300-step demo
    # (benchmarks/RESULTS.md). Each parallel map then runs on min(16, CPU cores)
    # threads, which is what autotuning gave on 2 cores and enough for decoding
    # audio on a pod host (its share of a paper-size step: a few core-seconds).
    options.autotune.enabled = False
    self._iterator = iter(dataset.with_options(options))

  def paired_length_warning(self, records_per_task: int = 256) -> Optional[str]:
    """A start-up warning when the paired limits would skip a large share (else None).

    Reads the first `records_per_task` records of every paired task (headers
    only; `paired_lengths.py`).
    """
    if 'paired' not in self.mixtures:
      return None
    lengths = paired_lengths.survey([t.name for t in self.mixtures['paired'].tasks],
                                    split=self.data_config.split,
                                    records_per_task=records_per_task)
    return paired_lengths.warning(lengths, self.batch_config.paired_frames,
                                  self.batch_config.paired_text_length)

  def rates(self) -> Dict[str, Dict[str, float]]:
    """kind -> task -> mixing rate, normalised."""
    return {kind: dict(zip(plan.tasks, plan.rates)) for kind, plan in self._plans.items()}

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, Dict[str, Any]]:
    if self._iterator is None:
      self._start()
    try:
      batch = next(self._iterator)
    except tf.errors.OpError:
      stopped = bad_input.LOG.stopped()
      if stopped is not None:  # the message names the task and the fix: no TF wrapping
        raise stopped from None
      raise
    for kind in self.parts:
      self.examples[kind] += getattr(self.batch_config, f'{kind}_batch_size')
    out = {}
    for kind, part in batch.items():
      keep = {k: v.numpy() for k, v in part.items()
              if self.with_metadata or k not in ('id', 'language')}
      for k in ('id', 'language'):
        if k in keep:
          keep[k] = keep[k].astype(object)
      out[kind] = keep
    return out

  def state(self) -> Dict[str, Any]:
    """The data position: examples consumed per kind, and what they index (JSON-able).

    The same on every host; `load_state` continues from it on any host count.
    """
    return {'format': STATE_FORMAT, 'split': self.data_config.split,
            'examples': dict(self.examples),
            'plans': {kind: plan.fingerprint() for kind, plan in self._plans.items()}}

  def load_state(self, state: Dict[str, Any]) -> None:
    """Continues from `state()` of a sampler over the same tasks, sizes and seed.

    Raises DataPositionMismatchError naming what differs (the saved position
    would index other examples).
    """
    if state.get('format') != STATE_FORMAT:
      raise DataPositionMismatchError(
          f'data position format {state.get("format")!r}, expected {STATE_FORMAT!r}')
    problems = []
    if state.get('split') != self.data_config.split:
      problems.append(f'split {state.get("split")!r} vs {self.data_config.split!r}')
    for kind in self.parts:
      saved = state.get('plans', {}).get(kind)
      now = self._plans[kind].fingerprint()
      if saved is None:
        problems.append(f'no saved position for {kind}')
      elif saved != now:
        problems.append(f'{kind}: saved seed/tasks/sizes/rates {saved} vs now {now}')
    if problems:
      raise DataPositionMismatchError('; '.join(problems))
    self.close()
    self.examples = {kind: int(state['examples'][kind]) for kind in self.parts}

  def close(self) -> None:
    """Stops the input threads (also done at exit); the next batch restarts them at the
    current position."""
    self._iterator = None
    gc.collect()
    for pool in self._pools:
      pool.shutdown(wait=False, cancel_futures=True)
    self._pools = []

  @staticmethod
  def bad_input_report() -> str:
    return bad_input.LOG.report()
