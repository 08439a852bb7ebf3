"""Registering seqio tasks for the three data kinds, and mixing them by temperature.

Adding a task is one call, in any module named with `--task_module` or in gin
(`DataConfig.task_modules`), with no edit to the library:

    from mslam_jax.data import registry, sources
    registry.add_task('my_speech_sw', kind='speech', language='sw',
                      source=sources.manifest('/data/sw/train.tsv'))

`kind` is 'speech' (unlabeled audio), 'text' (unlabeled text) or 'paired'
(audio + transcript). The task is a plain `seqio.Task` in seqio's TaskRegistry;
we also keep its kind, language and size here, so that the sampler can build
one mixture per kind from every task whose name matches the gin patterns, with
temperature-based rates over languages (mSLAM: T = 3 for mC4's languages) or,
optionally, over tasks.

All text tasks share one character vocabulary per process (the model has one
output layer): `SHARED_VOCABULARY`, loaded from `set_vocabulary_path` (the
sampler sets it from DataConfig.vocabulary_path) when first used.
"""

import dataclasses
import fnmatch
import functools
import importlib
import importlib.util
import json
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from mslam_jax import REPO_ROOT
from mslam_jax import paths
from mslam_jax.data import preprocessors
from mslam_jax.data import sources as sources_lib
from mslam_jax.data import vocabulary as vocabulary_lib

KINDS = ('speech', 'text', 'paired')
EMBEDDED_CORPUS = os.path.join(REPO_ROOT, 'tasks', 'embedded_corpus')


class SharedVocabulary(seqio.Vocabulary):
  """The process's character vocabulary, loaded from its path when first used."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path
    self._vocab: Optional[vocabulary_lib.CharacterVocabulary] = None

  def set_path(self, path: str) -> None:
    if path != self.path:
      self.path, self._vocab = path, None

  @property
  def loaded(self) -> vocabulary_lib.CharacterVocabulary:
    if self._vocab is None:
      self._vocab = vocabulary_lib.CharacterVocabulary.load(self.path)
    return self._vocab

  eos_id = property(lambda self: self.loaded.eos_id)
  unk_id = property(lambda self: self.loaded.unk_id)
  _base_vocab_size = property(lambda self: self.loaded.vocab_size)

  def _encode(self, s):
    return self.loaded.encode(s)

  def _decode(self, ids):
    return self.loaded.decode(ids)

  def _encode_tf(self, s):
    return self.loaded.encode_tf(s)

  def _decode_tf(self, ids):
    return self.loaded.decode_tf(ids)


SHARED_VOCABULARY = SharedVocabulary(os.path.join(EMBEDDED_CORPUS, 'vocab.txt'))


def set_vocabulary_path(path: str) -> None:
  SHARED_VOCABULARY.set_path(path)


@dataclasses.dataclass
class TaskInfo:
  """What the sampler needs to know of a registered task.

  Attributes:
    name, kind, language: as given to add_task.
    size: examples in the train split, for the mixing rate (None: counted by
      reading the source once, when a mixture first needs it).
  """
  name: str
  kind: str
  language: str
  size: Optional[int] = None


TASKS: Dict[str, TaskInfo] = {}


def output_features(kind: str) -> Dict[str, seqio.Feature]:
  speech = seqio.ContinuousFeature(dtype=tf.float32, rank=2, required=True)
  text = seqio.Feature(vocabulary=SHARED_VOCABULARY, add_eos=False, dtype=tf.int32)
  return {'speech': {'features': speech}, 'text': {'ids': text},
          'paired': {'features': speech, 'ids': text}}[kind]


def add_task(name: str, *, kind: str, language: str, source: sources_lib.RecordSource,
             size: Optional[int] = None) -> seqio.Task:
  """Registers a seqio task of one data kind (replacing one of the same name).

  Args:
    name: the seqio task name (by convention `<corpus>_<kind>_<language>`).
    kind: 'speech', 'text' or 'paired'.
    language: language code (for mixing statistics and reports).
    source: a sources.RecordSource (tfrecords, text_lines, manifest, tfds_dataset);
      text tasks need records with 'text', audio tasks with 'audio' (+ 'transcript').
    size: train examples, for temperature rates; None counts them when needed.
  """
  if kind not in KINDS:
    raise ValueError(f'task {name}: kind must be one of {KINDS}, got {kind!r}')
  if not isinstance(source, sources_lib.RecordSource):
    raise TypeError(f'task {name}: source must come from mslam_jax.data.sources '
                    f'(tfrecords, text_lines, manifest, tfds_dataset), got {type(source)}')
  source.task_name = name
  steps = preprocessors.feature_steps(kind) + [
      functools.partial(preprocessors.drop_bad, task_name=name)]
  seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name, source=source, preprocessors=steps, output_features=output_features(kind),
      shuffle_buffer_size=None)  # the source shuffles raw records (sources.py)
  TASKS[name] = TaskInfo(name=name, kind=kind, language=language, size=size)
  return task


def add_corpus(corpus_dir: str, prefix: str, splits: Sequence[str] = ('train', 'dev', 'test')
               ) -> List[str]:
  """Registers every task of a corpus written by mslam_jax.corpus.build; returns their names.

  Tasks are `{prefix}_{kind}_{language}`; paired tasks get every split present
  (dev and test are the multi-way held-out sets).
  """
  meta_path = paths.join(corpus_dir, 'metadata.json')
  if not paths.path(meta_path).exists():
    raise FileNotFoundError(f'{meta_path} not found: build the corpus with '
                            f'`python -m mslam_jax.corpus.build --output={corpus_dir}`')
  meta = json.loads(paths.path(meta_path).read_text(encoding='utf-8'))
  names = []
  for kind in KINDS:
    per_split = meta['kinds'].get(kind, {})
    languages = sorted({lang for split in per_split.values() for lang in split})
    for lang in languages:
      name = f'{prefix}_{kind}_{lang}'
      present = [s for s in splits if lang in per_split.get(s, {})]
      if kind == 'text':
        source = sources_lib.text_lines(
            {s: paths.join(corpus_dir, 'text', s, f'{lang}.txt') for s in present}, lang)
      else:
        source = sources_lib.tfrecords(
            {s: paths.join(corpus_dir, kind, s, f'{lang}.tfrecord') for s in present})
      size = per_split.get('train', {}).get(lang, {}).get('examples')
      add_task(name, kind=kind, language=lang, source=source, size=size)
      names.append(name)
  return names


def select(kind: str, patterns: Sequence[str] = ('*',)) -> List[str]:
  """Names of registered tasks of `kind` matching any fnmatch pattern, sorted."""
  names = sorted(n for n, info in TASKS.items()
                 if info.kind == kind and any(fnmatch.fnmatchcase(n, p) for p in patterns))
  return [n for n in names if n in seqio.TaskRegistry.names()]


def task_size(name: str) -> int:
  """Train examples of a task (counting raw records once when add_task had no size)."""
  info = TASKS[name]
  if info.size is None:
    info.size = seqio.get_mixture_or_task(name).source.count_examples('train')
  return info.size


def temperature_rates(sizes: Mapping[str, float], temperature: float) -> Dict[str, float]:
  """Mixing rates p_i proportional to n_i^(1/T), normalised.

  T = 1 samples in proportion to size; larger T flattens toward uniform.
  """
  if temperature <= 0:
    raise ValueError(f'temperature must be positive, got {temperature}')
  weights = {n: float(s) ** (1.0 / temperature) for n, s in sizes.items() if s > 0}
  total = sum(weights.values())
  return {n: w / total for n, w in weights.items()}


def language_temperature_rates(sizes: Mapping[str, float], languages: Mapping[str, str],
                               temperature: float) -> Dict[str, float]:
  """Task rates when languages are sampled by temperature and tasks by size within one.

  Language l gets p_l proportional to n_l^(1/T), n_l the examples of all its
  tasks (mSLAM samples mC4's languages with T = 3); a task gets its
  language's rate times its share of the language's examples. A language
  split into several tasks (two corpora, or shards registered separately)
  thus keeps the share it would have as one task.

  Args:
    sizes: task -> examples; languages: task -> language code.
    temperature: T.
  """
  per_language: Dict[str, float] = {}
  for task, size in sizes.items():
    per_language[languages[task]] = per_language.get(languages[task], 0.0) + float(size)
  language_rates = temperature_rates(per_language, temperature)
  return {task: language_rates[languages[task]] * float(size) / per_language[languages[task]]
          for task, size in sizes.items() if size > 0}


MIX_BY = ('language', 'task')


def mixture(kind: str, patterns: Sequence[str] = ('*',), temperature: float = 1.0,
            name: Optional[str] = None, mix_by: str = 'language') -> seqio.Mixture:
  """Registers (anew) and returns the seqio mixture of `kind`'s matching tasks.

  mix_by: 'language' (temperature over languages, `language_temperature_rates`;
  the paper's sampling) or 'task' (temperature over tasks, `temperature_rates`).
  """
  if mix_by not in MIX_BY:
    raise ValueError(f'mix_by must be one of {MIX_BY}, got {mix_by!r} (DataConfig.mix_by)')
  names = select(kind, patterns)
  if not names:
    registered = sorted(n for n, i in TASKS.items() if i.kind == kind)
    raise ValueError(
        f'no {kind} task matches {list(patterns)} (registered {kind} tasks: {registered}); '
        'import the module that registers them with --task_module=MODULE, or fix '
        f'DataConfig.{kind}_tasks')
  sizes = {n: task_size(n) for n in names}
  if mix_by == 'language':
    rates = language_temperature_rates(sizes, {n: TASKS[n].language for n in names},
                                       temperature)
  else:
    rates = temperature_rates(sizes, temperature)
  name = name or f'mslam_{kind}_mixture'
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, [(n, rates[n]) for n in names if n in rates])


def import_task_module(module: str) -> None:
  """Runs a task module, by dotted name (`tasks.embedded`) or file path (`my_tasks.py`)."""
  if module.endswith('.py') or os.sep in module:
    path = module if os.path.isabs(module) or os.path.exists(module) else os.path.join(
        REPO_ROOT, module)
    if not os.path.exists(path):
      raise FileNotFoundError(f'task module file {module} not found (looked in '
                              f'{os.getcwd()} and {REPO_ROOT})')
    mod_name = 'mslam_user_tasks_' + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return
  if REPO_ROOT not in sys.path:  # so `tasks.embedded` imports from any directory
    sys.path.append(REPO_ROOT)
  try:
    if module in sys.modules:
      # Run the registrations again: a caller may have removed the tasks since
      # (tests do), and add_task replaces tasks of the same name.
      importlib.reload(sys.modules[module])
    else:
      importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f'task module {module!r} not found ({e}); name a module on '
                              'the Python path (tasks.embedded) or a file (path/to/my_tasks.py)'
                              ) from e
