"""Downstream data: speech with transcript and English translation, and text translation pairs.

Speech examples come from any `mslam_jax.data.sources` RecordSource (TFRecord
shards, TSV manifests, TFDS), the same sources pre-training tasks use; records
need 'audio', 'language' and 'transcript', and 'english' for translation. A
corpus written by `python -m mslam_jax.corpus.build` has them as

    CORPUS/downstream/speech/train/{lang}.tfrecord   held out of all pre-training data
    CORPUS/paired/{dev,test}/{lang}.tfrecord         the multi-way held-out sets
    CORPUS/downstream/text/{train,dev,test}/{lang}.tsv   xx <TAB> English

and `corpus_speech_source` / `corpus_text_pairs` read them. Downstream sets are
small (hundreds to thousands of utterances per language), so they are decoded
once into memory; a bad record is skipped, counted and reported, never fatal.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from mslam_jax import paths
from mslam_jax.data import audio
from mslam_jax.data import bad_input
from mslam_jax.data import sources as sources_lib
from mslam_jax.data import vocabulary as vocabulary_lib

SPLITS = ('train', 'dev', 'test')


@dataclasses.dataclass
class SpeechExample:
  """One utterance: waveform float32 [samples] at the source rate, and its texts."""
  id: str
  language: str
  waveform: np.ndarray
  transcript: str
  english: str = ''


@dataclasses.dataclass
class TextPair:
  """One text translation pair: source text in `language` and its English translation."""
  language: str
  source: str
  english: str


def corpus_speech_source(corpus_dir: str) -> sources_lib.RecordSource:
  """train = downstream/speech/train, dev/test = paired/{dev,test} of a built corpus."""
  train = paths.join(corpus_dir, 'downstream', 'speech', 'train', '*.tfrecord')
  if not paths.glob(train):
    raise FileNotFoundError(
        f'no downstream speech in {paths.join(corpus_dir, "downstream", "speech", "train")}: '
        'the corpus predates downstream splits; rebuild it with '
        f'`python -m mslam_jax.corpus.build --output={corpus_dir}`')
  return sources_lib.tfrecords(
      {'train': train,
       'dev': paths.join(corpus_dir, 'paired', 'dev', '*.tfrecord'),
       'test': paths.join(corpus_dir, 'paired', 'test', '*.tfrecord')},
      extra_keys=('english',))


def load_speech(source: sources_lib.RecordSource, split: str, *,
                languages: Optional[Sequence[str]] = None, sample_rate: int = 16000,
                max_per_language: Optional[int] = None) -> List[SpeechExample]:
  """Decodes a split of `source` in file order; bad audio is skipped and reported.

  languages: keep only these (None: all). max_per_language: the first n of each.
  """
  examples, skipped, per_language = [], {}, {}
  for rec in source.get_dataset(split, shuffle=False).as_numpy_iterator():
    language = rec['language'].decode('utf-8')
    if languages is not None and language not in languages:
      continue
    if max_per_language is not None and per_language.get(language, 0) >= max_per_language:
      continue
    waveform, status = audio.decode_audio(rec['audio'], sample_rate)
    if status != bad_input.Problem.OK:
      skipped.setdefault(status, []).append(rec['id'].decode('utf-8', 'replace'))
      continue
    per_language[language] = per_language.get(language, 0) + 1
    examples.append(SpeechExample(
        id=rec['id'].decode('utf-8'), language=language, waveform=waveform,
        transcript=vocabulary_lib.normalize_text(rec['transcript'].decode('utf-8')),
        english=vocabulary_lib.normalize_text(rec.get('english', b'').decode('utf-8'))))
  for status, ids in skipped.items():
    print(f'{source.task_name} {split}: skipped {len(ids)} records: '
          f'{bad_input.MESSAGES[status]} (e.g. {", ".join(ids[:3])})', flush=True)
  if not examples:
    raise ValueError(f'no usable {split} examples in {source.patterns.get(split)}'
                     + (f' for languages {list(languages)}' if languages else ''))
  return examples


def corpus_text_pairs(corpus_dir: str, split: str, *,
                      languages: Optional[Sequence[str]] = None,
                      max_per_language: Optional[int] = None) -> List[TextPair]:
  """The xx -> English pairs of downstream/text/<split>/*.tsv (sorted by language)."""
  folder = paths.join(corpus_dir, 'downstream', 'text', split)
  files = paths.glob(paths.join(folder, '*.tsv'))
  if not files:
    raise FileNotFoundError(f'no text translation pairs in {folder}; rebuild the corpus '
                            'with `python -m mslam_jax.corpus.build`')
  pairs = []
  for path in files:
    language = path.rsplit('/', 1)[-1][:-len('.tsv')]
    if languages is not None and language not in languages:
      continue
    with paths.path(path).open('r') as f:
      for line_no, line in enumerate(f, 1):
        if max_per_language is not None and line_no > max_per_language:
          break
        fields = line.rstrip('\n').split('\t')
        if len(fields) != 2 or not all(fields):
          raise ValueError(f'{path}:{line_no}: expected "source<TAB>english", got {line!r}')
        pairs.append(TextPair(language, *fields))
  return pairs


def pad_batch(items: Sequence[np.ndarray], length: int, rows: int, pad_value=0):
  """Right-pads variable-length arrays into ([rows, length, ...], paddings [rows, length]).

  Rows beyond len(items) are all padding (a fixed batch shape for jit).
  """
  first = items[0]
  out = np.full((rows, length) + first.shape[1:], pad_value, first.dtype)
  paddings = np.ones((rows, length), np.float32)
  for row, x in enumerate(items):
    n = min(len(x), length)
    out[row, :n] = x[:n]
    paddings[row, :n] = 0.0
  return out, paddings


def languages_of(examples: Sequence[SpeechExample]) -> List[str]:
  return sorted({e.language for e in examples})


def count_by_language(examples) -> Dict[str, int]:
  counts: Dict[str, int] = {}
  for e in examples:
    counts[e.language] = counts.get(e.language, 0) + 1
  return dict(sorted(counts.items()))
