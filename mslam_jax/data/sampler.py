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

Per host: host i of n reads its own shard (seqio.ShardInfo(i, n)) and yields
1/n of each global batch size. The stream is deterministic for a seed, and its
position is a tf.data iterator checkpoint (`save` / `restore`): a restored
sampler yields exactly the batches the saved one would have yielded next. The
checkpoint holds the raw-record shuffle buffers (compressed audio and text
lines, sources.py), so its size is about the buffers' size.
"""

import atexit
import dataclasses
import gc
import os
import re
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

import gin
import seqio
import tensorflow as tf

import mslam_jax
from mslam_jax import special_ids
from mslam_jax.data import bad_input
from mslam_jax.data import paired_lengths
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
    corpus_dirs: corpora written by `python -m mslam_jax.data.build_corpus`,
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


def corpus_prefix(corpus_dir: str) -> str:
  """Task-name prefix of a corpus folder: its name, other characters made '_'."""
  name = os.path.basename(os.path.normpath(os.path.expanduser(corpus_dir)))
  return re.sub(r'[^A-Za-z0-9]', '_', name) or 'corpus'


def resolve_path(path: str) -> str:
  """A relative path as given when it exists from here, else from the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  return os.path.join(mslam_jax.REPO_ROOT, path)


def _pad_and_batch(ds: tf.data.Dataset, batch_size: int, frames: Optional[int],
                   chars: Optional[int], num_mel_bins: int) -> tf.data.Dataset:
  """Pads every example to the static limits and adds float paddings (1 = pad)."""

  def add_lengths(ex):
    out = dict(ex)
    if frames is not None:
      out['num_frames'] = tf.shape(ex['features'])[0]
    if chars is not None:
      out['num_ids'] = tf.shape(ex['ids'])[0]
    return out

  shapes = {'id': [], 'language': []}
  values = {'id': '', 'language': ''}
  if frames is not None:
    shapes.update(features=[frames, num_mel_bins], num_frames=[])
    values.update(features=0.0, num_frames=0)
  if chars is not None:
    shapes.update(ids=[chars], num_ids=[])
    values.update(ids=special_ids.PAD_ID, num_ids=0)

  def finish(batch):
    out = {'id': batch['id'], 'language': batch['language']}
    if frames is not None:
      out['features'] = batch['features']
      out['feature_paddings'] = tf.cast(
          tf.range(frames)[None, :] >= batch['num_frames'][:, None], tf.float32)
    if chars is not None:
      out['ids'] = batch['ids']
      out['id_paddings'] = tf.cast(
          tf.range(chars)[None, :] >= batch['num_ids'][:, None], tf.float32)
    return out

  ds = ds.map(add_lengths, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.padded_batch(batch_size, padded_shapes=shapes,
                       padding_values={k: tf.constant(v, dtype=ds.element_spec[k].dtype)
                                       for k, v in values.items()},
                       drop_remainder=True)
  return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)


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
    for module in tuple(data_config.task_modules) + tuple(extra_task_modules):
      registry.import_task_module(module)
    for corpus_dir in data_config.corpus_dirs:
      registry.add_corpus(corpus_dir, prefix=corpus_prefix(corpus_dir))
    registry.set_vocabulary_path(resolve_path(data_config.vocabulary_path))
    self.vocabulary = registry.SHARED_VOCABULARY.loaded
    vocabulary_lib.check_fits_model(self.vocabulary, model_vocab_size,
                                    where=data_config.vocabulary_path)
    self.mixtures: Dict[str, seqio.Mixture] = {}
    streams = {}
    for offset, kind in enumerate(self.parts):
      streams[kind] = self._stream(kind, seed=data_config.seed + offset)
    dataset = tf.data.Dataset.zip(streams).prefetch(2)
    options = tf.data.Options()
    options.deterministic = True
    # Our numpy_function steps are pure (decoding) or only count (drop_bad), so
    # an iterator checkpoint may leave their state out.
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    self.dataset = dataset.with_options(options)
    self._iterator = iter(self.dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    _OPEN_SAMPLERS.add(self)

  def per_host_batch_size(self, kind: str) -> int:
    global_size = getattr(self.batch_config, f'{kind}_batch_size')
    if global_size % self.num_shards:
      raise ValueError(f'BatchConfig.{kind}_batch_size={global_size} is not divisible by '
                       f'the {self.num_shards} hosts; make it a multiple of {self.num_shards}')
    return global_size // self.num_shards

  def _stream(self, kind: str, seed: int) -> tf.data.Dataset:
    cfg, dc = self.batch_config, self.data_config
    patterns = getattr(dc, f'{kind}_tasks')
    mix = registry.mixture(kind, patterns, getattr(dc, f'{kind}_temperature'),
                           name=f'mslam_{kind}_mixture', mix_by=dc.mix_by)
    for task in mix.tasks:
      task.source.check(dc.split)  # a missing source fails here, before any step
    self.mixtures[kind] = mix
    frames = {'speech': cfg.speech_frames, 'paired': cfg.paired_frames}.get(kind)
    chars = {'text': cfg.text_length, 'paired': cfg.paired_text_length}.get(kind)
    lengths = {k: v for k, v in (('features', frames), ('ids', chars)) if v is not None}
    ds = mix.get_dataset(lengths, split=dc.split, shuffle=True, seed=seed,
                         shard_info=seqio.ShardInfo(self.shard_index, self.num_shards),
                         num_epochs=None, passthrough_features=['id', 'language'],
                         log_mixing_proportions=False)
    return _pad_and_batch(ds, self.per_host_batch_size(kind), frames, chars,
                          cfg.num_mel_bins)

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
    out = {}
    for kind, mix in self.mixtures.items():
      rates = {t.name: mix.get_rate(t) for t in mix.tasks}
      total = sum(rates.values())
      out[kind] = {n: r / total for n, r in rates.items()}
    return out

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, Dict[str, Any]]:
    batch = next(self._iterator)
    out = {}
    for kind, part in batch.items():
      keep = {k: v.numpy() for k, v in part.items()
              if self.with_metadata or k not in ('id', 'language')}
      for k in ('id', 'language'):
        if k in keep:
          keep[k] = keep[k].astype(object)
      out[kind] = keep
    return out

  def save(self, prefix: str) -> str:
    """Writes the stream position (iterator checkpoint) under `prefix`; returns its path."""
    tf.io.gfile.makedirs(os.path.dirname(prefix) or '.')
    return self._checkpoint.write(prefix)

  def restore(self, path: str) -> None:
    """Continues from a position written by `save` (same seed, tasks and shapes)."""
    self._checkpoint.read(path).assert_consumed()

  def close(self) -> None:
    """Stops the input threads (also done at exit); the sampler is unusable after."""
    self._iterator = self._checkpoint = None
    gc.collect()

  @staticmethod
  def bad_input_report() -> str:
    return bad_input.LOG.report()
