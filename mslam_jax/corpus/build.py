r"""Builds the embedded multilingual corpus from Debian packages and espeak-ng.

    python -m mslam_jax.corpus.build --output=DIR [--size=small|large] \
        [--languages=en,de,...] [--seed=0] [--workers=2]

Text comes from gettext catalogs and fortunes (catalogs.py), speech from
espeak-ng (synthesis.py); docs/embedded_corpus.md describes both. The output, read
by mslam_jax/data/registry.py (pre-training) and the downstream evaluations:

    DIR/metadata.json                     languages, per-kind/split/language sizes, sources
    DIR/vocab.txt                         CharacterVocabulary over all texts below
    DIR/text/train/{lang}.txt             one normalised sentence per line
    DIR/speech/train/{lang}.tfrecord      unlabeled speech
    DIR/paired/{train,dev,test}/{lang}.tfrecord
    DIR/downstream/speech/train/{lang}.tfrecord
    DIR/downstream/text/{train,dev,test}/{lang}.tsv   non-English languages only

Each record is a tf.train.Example with bytes features id, language, audio
(FLAC: 16 kHz mono 16-bit; the small preset keeps 11 significant bits, see
`encode_flac`), transcript, english (empty in speech/ and paired/train) and an
int64 num_samples.

paired dev and test are multi-way: English catalog strings translated into
every chosen language, spoken in each, with the same id (`mw-00017`)
everywhere and the English source in `english` (equal to the transcript in
English). downstream/speech/train holds more multi-way items of the same kind
(ids `ds-00017`), the next ones in the same shuffled candidate order, for
fine-tuning speech translation xx->en, language ID and ASR; the downstream
speech dev and test sets ARE paired/dev and paired/test (not copied).

downstream/text/{split}/{lang}.tsv hold text translation pairs, one
`xx<TAB>english` line each (normalised, no tabs inside). train: pairs of that
language's catalogs, not necessarily multi-way (`select_translation_pairs`);
dev, test: the transcript and English source of paired/dev and paired/test.

Every multi-way item and every downstream text pair is held out of all
pre-training data (speech, text and paired train): no catalog pair with a
held-out English side is used in any language, and no training line equals
(ignoring case and final punctuation, `holdout_key`) a held-out string of its
language.

The same seed, languages and package versions give the same corpus, whatever
--workers.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from mslam_jax import console

if __name__ == '__main__':
  console.quiet_unless_verbose()  # before tensorflow loads its loggers

import argparse
import collections
import dataclasses
import io
import json
import os
import shutil
import sys
import time
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import soundfile as sf
import tensorflow as tf
from tqdm import tqdm

from mslam_jax.corpus import catalogs
from mslam_jax.corpus import synthesis
from mslam_jax.data.vocabulary import CharacterVocabulary
from mslam_jax.data.vocabulary import normalize_text

# espeak-ng reads Japanese and Chinese badly (ideographs spoken as English
# names), so they stay out.
EXCLUDED_LANGUAGES = frozenset({'ja', 'zh'})
SMALL_LANGUAGES = ('en', 'de', 'fr', 'es', 'it', 'pt', 'nl', 'pl', 'cs', 'ru', 'el', 'tr')
# English and 19 languages whose catalogs all translate 2,585 common English
# strings (pt_BR as pt): enough for the multi-way dev/test sets.
LARGE_LANGUAGES = SMALL_LANGUAGES + ('sv', 'uk', 'fi', 'hu', 'vi', 'ko', 'hi', 'ar')


@dataclasses.dataclass(frozen=True)
class Preset:
  """Per-language sizes of one corpus size.

  Attributes:
    languages: default language codes.
    speech, paired, dev, test: utterances per language and kind/split.
    max_text_lines: training text lines per language (None: all).
    min_seconds, max_seconds: utterances outside this range are re-drawn.
    sample_bits: significant bits kept per 16-bit sample (see `encode_flac`).
    downstream_speech: multi-way downstream training utterances per language.
    downstream_text: downstream text translation (xx -> en) training pairs per
      non-English language.
  """
  languages: Tuple[str, ...]
  speech: int
  paired: int
  dev: int
  test: int
  max_text_lines: Optional[int]
  min_seconds: float
  max_seconds: float
  sample_bits: int
  downstream_speech: int
  downstream_text: int


PRESETS = {
    # Committed to the repository (tasks/embedded_corpus), so it must stay a
    # few MB. FLAC of espeak speech takes about 18.5 kB/s at 16 bits
    # and 9.9 kB/s at 11 (measured here), so the utterances are short and 11
    # bits are kept: 360 pre-training and dev/test utterances of 1-2 s (6 MB
    # with the text) and 192 downstream ones (3 MB), under 10 MB in all; 300
    # text pairs are about 30 kB per language.
    'small': Preset(SMALL_LANGUAGES, speech=12, paired=12, dev=3, test=3, max_text_lines=1000,
                    min_seconds=1.0, max_seconds=2.0, sample_bits=11,
                    downstream_speech=16, downstream_text=300),
    # Built on demand, not committed: 20 languages x 500 utterances of 2-8 s,
    # about 10.5 hours and 700 MB (measured: 3.8 s per utterance on average).
    'large': Preset(LARGE_LANGUAGES, speech=120, paired=120, dev=30, test=30,
                    max_text_lines=None, min_seconds=2.0, max_seconds=8.0, sample_bits=16,
                    downstream_speech=200, downstream_text=3000),
}

# Our choice: utterances are synthesised in batches of this many candidates;
# the accepted ones do not depend on it (candidates are taken in order).
_BATCH = 64
# Our choice: candidates longer than this many characters per second of
# max_seconds are never spoken in time (espeak reads about 13-19 characters
# per second in Latin script at rates 130-190), so they are not synthesised.
_MAX_CHARS_PER_SECOND = 25


def derive_seed(seed: int, *parts: object) -> int:
  """A 63-bit seed from the corpus seed and a tag, stable across runs and machines."""
  tag = zlib.crc32('/'.join(map(str, parts)).encode('utf-8'))
  return int(np.random.SeedSequence([seed, tag]).generate_state(2, np.uint64)[0] >> 1)


def holdout_key(text: str) -> str:
  """What 'equal' means for held-out strings: case and final punctuation ignored."""
  return text.casefold().rstrip(' .!?…:;').strip()


def select_multiway(pairs: Dict[str, Dict[str, str]], languages: Sequence[str]
                    ) -> List[str]:
  """Sorted English strings translated into every non-English language of `languages`.

  The English side must pass catalogs.is_prose (3+ words), each translation
  is_prose with any number of words.
  """
  others = [lang for lang in languages if lang != 'en']
  if not others:
    return []
  common = set(pairs.get(others[0], {}))
  for lang in others[1:]:
    common &= set(pairs.get(lang, {}))
  return sorted(e for e in common if catalogs.is_prose(e) and
                all(catalogs.is_prose(pairs[l][e], min_words=1) for l in others))


def multiway_texts(english: str, pairs: Dict[str, Dict[str, str]],
                   languages: Sequence[str]) -> Dict[str, str]:
  return {lang: english if lang == 'en' else pairs[lang][english] for lang in languages}


def remove_held_out(pairs: Dict[str, Dict[str, str]], held_english: Set[str]
                    ) -> Dict[str, Dict[str, str]]:
  """pairs without every entry whose English side is held out (by holdout_key)."""
  keys = {holdout_key(e) for e in held_english}
  return {lang: {e: t for e, t in table.items() if holdout_key(e) not in keys}
          for lang, table in pairs.items()}


def training_text(language: str, pairs: Dict[str, Dict[str, str]], fortunes: Sequence[str],
                  held: Iterable[str], rng: np.random.Generator,
                  max_lines: Optional[int]) -> List[str]:
  """Deduplicated, shuffled training lines of a language, none equal to a held-out string.

  Translations (the msgstr side; for English the msgid sides of all chosen
  languages) and fortune pieces; `held` are the held-out strings of this
  language (compared by holdout_key).
  """
  if language == 'en':
    translated = sorted({e for table in pairs.values() for e in table})
  else:
    translated = sorted(set(pairs.get(language, {}).values()))
  held_keys = {holdout_key(h) for h in held}
  lines, seen = [], set()
  for line in list(translated) + list(fortunes):
    if line not in seen and holdout_key(line) not in held_keys:
      seen.add(line)
      lines.append(line)
  order = rng.permutation(len(lines))
  lines = [lines[i] for i in order]
  return lines if max_lines is None else lines[:max_lines]


def select_translation_pairs(pairs: Dict[str, Dict[str, str]], languages: Sequence[str],
                             held: Dict[str, Sequence[str]], count: int, seed: int
                             ) -> Dict[str, List[Tuple[str, str]]]:
  """`count` catalog pairs per non-English language for text translation, none held out.

  Every language walks one shuffled order of all English strings and takes
  the first `count` it translates, so the languages mostly take the same
  English strings: as these leave every language's training pairs
  (`remove_held_out`), a shared choice costs each language the fewest. A pair
  is skipped when its English side equals (by holdout_key) a string of
  held['en'] or of a pair already taken, or its translation one of
  held[language] or of a pair already taken: the pairs are disjoint from the
  held-out ones and hold no repeats.

  Args:
    pairs: language -> {english: translation}.
    languages: the corpus languages; English gets none.
    held: language -> its held-out strings (the multi-way items).
    count: pairs per language.
    seed: the corpus seed.
  Returns:
    language -> [(translation, english)], `count` each, in the shuffled order.
  """
  english = sorted({e for lang in languages if lang != 'en' for e in pairs.get(lang, {})})
  order = np.random.default_rng(derive_seed(seed, 'downstream_text')).permutation(len(english))
  chosen: Dict[str, List[Tuple[str, str]]] = {}
  for lang in languages:
    if lang == 'en':
      continue
    table = pairs.get(lang, {})
    english_keys = {holdout_key(h) for h in held.get('en', ())}
    keys = {holdout_key(h) for h in held.get(lang, ())}
    chosen[lang] = []
    for i in order:
      if len(chosen[lang]) == count:
        break
      source = english[i]
      if source not in table:
        continue
      english_key, key = holdout_key(source), holdout_key(table[source])
      if english_key not in english_keys and key not in keys:
        english_keys.add(english_key)
        keys.add(key)
        chosen[lang].append((table[source], source))
    if len(chosen[lang]) < count:
      raise SystemExit(f'only {len(chosen[lang])} of {count} downstream text pairs for '
                       f'{lang!r} are left after the held-out ones; choose other --languages')
  return chosen


def write_translations(path: str, pairs: Sequence[Tuple[str, str]]) -> None:
  """One `translation<TAB>english` line per pair, both normalised (so no tab or newline inside)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(f'{normalize_text(xx)}\t{normalize_text(en)}\n' for xx, en in pairs)


def read_translations(path: str) -> List[Tuple[str, str]]:
  """The (translation, english) pairs of a file written by write_translations."""
  with open(path, encoding='utf-8') as f:
    return [tuple(line.rstrip('\n').split('\t')) for line in f]


def encode_flac(waveform: np.ndarray, sample_rate: int, sample_bits: int = 16) -> bytes:
  """FLAC bytes (mono, 16-bit PCM) of a float waveform.

  With sample_bits < 16 the samples are rounded to multiples of 2^(16 -
  sample_bits), whose always-zero low bits FLAC stores at no cost ("wasted
  bits"). At 11 bits the rounding noise is about 60 dB under the peak (espeak's
  pauses stay exact zeros), far below what log-mel features of this robotic
  speech resolve, and the files are about 45% smaller than at 16 bits.
  """
  step = 2 ** (16 - sample_bits)
  ints = np.round(np.asarray(waveform, np.float64) * (32768 / step)) * step
  ints = np.clip(ints, -32768, 32767).astype(np.int16)
  buf = io.BytesIO()
  sf.write(buf, ints, sample_rate, format='FLAC', subtype='PCM_16')
  return buf.getvalue()


@dataclasses.dataclass
class Utterance:
  id: str
  language: str
  transcript: str
  english: str
  audio: bytes
  num_samples: int


def _example(u: Utterance) -> tf.train.Example:
  def b(value: str):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode('utf-8')]))
  return tf.train.Example(features=tf.train.Features(feature={
      'id': b(u.id), 'language': b(u.language), 'transcript': b(u.transcript),
      'english': b(u.english),
      'audio': tf.train.Feature(bytes_list=tf.train.BytesList(value=[u.audio])),
      'num_samples': tf.train.Feature(int64_list=tf.train.Int64List(value=[u.num_samples])),
  }))


def write_records(path: str, utterances: Sequence[Utterance]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tf.io.TFRecordWriter(path) as writer:
    for u in utterances:
      # Feature maps otherwise serialise in hash order, which changes per process.
      writer.write(_example(u).SerializeToString(deterministic=True))


class Synthesizer:
  """Speaks candidates in order and keeps those whose length is in range."""

  def __init__(self, workers: int, min_seconds: float, max_seconds: float,
               sample_bits: int, seed: int):
    self.pool = synthesis.make_pool(workers) if workers > 1 else None
    self.min_samples = int(min_seconds * synthesis.SAMPLE_RATE)
    self.max_samples = int(max_seconds * synthesis.SAMPLE_RATE)
    self.max_chars = int(max_seconds * _MAX_CHARS_PER_SECOND)
    self.sample_bits = sample_bits
    self.seed = seed
    self.spoken = 0
    self.rejected = 0

  def close(self):
    if self.pool is not None:
      self.pool.shutdown()

  def speak(self, requests: Sequence[Tuple[str, str, int]]):
    """(waveform or None when out of range, voice) per (text, language, seed)."""
    out = []
    for waveform, voice in synthesis.synthesize_many(requests, pool=self.pool, workers=1):
      self.spoken += 1
      if not self.min_samples <= len(waveform) <= self.max_samples:
        self.rejected += 1
        waveform = None
      out.append((waveform, voice))
    return out

  def utterance(self, waveform: np.ndarray, **fields) -> Utterance:
    return Utterance(audio=encode_flac(waveform, synthesis.SAMPLE_RATE, self.sample_bits),
                     num_samples=len(waveform), **fields)

  def take(self, language: str, candidates: Sequence[str], count: int, tag: str,
           progress) -> List[Tuple[str, np.ndarray, str]]:
    """The first `count` candidates (in order) spoken within range: (text, waveform, voice)."""
    candidates = [c for c in candidates if len(c) <= self.max_chars]
    kept = []
    for start in range(0, len(candidates), _BATCH):
      batch = candidates[start:start + _BATCH]
      requests = [(text, language, derive_seed(self.seed, tag, language, start + i))
                  for i, text in enumerate(batch)]
      for text, (waveform, voice) in zip(batch, self.speak(requests)):
        if waveform is not None and len(kept) < count:
          kept.append((text, waveform, voice))
          progress.update(1)
      if len(kept) >= count:
        break
    if len(kept) < count:
      raise SystemExit(f'only {len(kept)} of {count} {tag} utterances for {language!r} fit '
                       f'{self.min_samples / synthesis.SAMPLE_RATE:g}-'
                       f'{self.max_samples / synthesis.SAMPLE_RATE:g} s; widen '
                       '--min_seconds/--max_seconds or ask for fewer')
    return kept

  def take_multiway(self, candidates: Sequence[str], pairs: Dict[str, Dict[str, str]],
                    languages: Sequence[str], count: int, progress
                    ) -> List[Tuple[str, Dict[str, np.ndarray]]]:
    """The first `count` English candidates spoken within range in every language.

    Returns (english, {language: waveform}) in candidate order.
    """
    kept = []
    step = max(1, _BATCH // len(languages))
    for start in range(0, len(candidates), step):
      batch = []
      for k, english in enumerate(candidates[start:start + step], start):
        texts = multiway_texts(english, pairs, languages)
        if max(map(len, texts.values())) <= self.max_chars:
          batch.append((k, english, texts))
      spoken = iter(self.speak([(texts[lang], lang, derive_seed(self.seed, 'multiway', k, lang))
                                for k, _, texts in batch for lang in languages]))
      for _, english, _ in batch:
        audio = {lang: next(spoken)[0] for lang in languages}
        if len(kept) < count and all(w is not None for w in audio.values()):
          kept.append((english, audio))
          progress.update(len(languages))
      if len(kept) >= count:
        return kept
    raise SystemExit(f'only {len(kept)} of {count} multi-way strings (of {len(candidates)} '
                     f'translated into all of {",".join(languages)}) are spoken within '
                     f'{self.min_samples / synthesis.SAMPLE_RATE:g}-'
                     f'{self.max_samples / synthesis.SAMPLE_RATE:g} s in every language; '
                     'widen the range or choose fewer languages')


def _progress(**kwargs):
  return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kwargs)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m mslam_jax.corpus.build', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--output', required=True, help='folder to write the corpus into')
  parser.add_argument('--size', choices=sorted(PRESETS), default='small')
  parser.add_argument('--languages', default=None,
                      help='comma-separated codes (default: the preset\'s)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workers', type=int, default=2, help='parallel espeak-ng runs')
  parser.add_argument('--min_seconds', type=float, default=None,
                      help='shortest utterance (default: the preset\'s)')
  parser.add_argument('--max_seconds', type=float, default=None,
                      help='longest utterance (default: the preset\'s)')
  parser.add_argument('--sample_bits', type=int, default=None, choices=range(8, 17),
                      metavar='8..16', help='significant bits per sample (default: preset)')
  parser.add_argument('--max_vocab_size', type=int, default=4096,
                      help='vocabulary ids including the reserved ones (mSLAM: 4096)')
  parser.add_argument('--cache_dir', default=catalogs.DEFAULT_CACHE_DIR,
                      help='where downloaded and unpacked .debs are kept')
  parser.add_argument('--catalog_dir', default=None,
                      help='already-unpacked packages, DIR/<package>/usr/share/...; '
                           'nothing is downloaded')
  parser.add_argument('--no_system_locale', action='store_true',
                      help=f'leave out the catalogs in {catalogs.SYSTEM_LOCALE_DIR}, '
                           'whose set depends on what the machine has installed')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
  parser.add_argument(console.VERBOSE_FLAG, action='store_true',
                      help="keep TensorFlow's start-up logs")
  return parser.parse_args(argv)


def read_text(languages: Sequence[str], args: argparse.Namespace
              ) -> Tuple[Dict[str, Dict[str, str]], Dict[str, List[str]], List[str]]:
  """(catalog pairs per language, fortune pieces per language, sources) for a build."""
  fortune_packages = [p for p, lang in catalogs.FORTUNE_PACKAGES.items() if lang in languages]
  print(f'fetching {len(catalogs.CATALOG_PACKAGES) + len(fortune_packages)} packages',
        file=sys.stderr)
  packages = catalogs.fetch_packages(catalogs.CATALOG_PACKAGES + tuple(fortune_packages),
                                     args.cache_dir, args.catalog_dir)
  by_name = {p.name: p for p in packages}
  roots = [by_name[n].root for n in catalogs.CATALOG_PACKAGES]
  sources = [f'{p.name}={p.version}' for p in packages]
  if not args.no_system_locale and os.path.isdir(catalogs.SYSTEM_LOCALE_DIR):
    roots.append(catalogs.SYSTEM_LOCALE_DIR)
    count = sum(1 for lang, _, _ in catalogs.find_catalogs(catalogs.SYSTEM_LOCALE_DIR)
                if lang in languages)
    sources.append(f'{catalogs.SYSTEM_LOCALE_DIR} ({count} catalogs)')
  sources.append(f'espeak-ng={synthesis.espeak_version()}')
  unreadable: List[str] = []
  pairs = catalogs.load_pairs(
      roots, [l for l in languages if l != 'en'], errors=unreadable,
      progress=lambda files: _progress(iterable=files, desc='reading catalogs', unit='file'))
  for line in unreadable:
    print(f'skipped an unreadable catalog: {line}', file=sys.stderr)
  fortunes: Dict[str, List[str]] = collections.defaultdict(list)
  for name in _progress(iterable=fortune_packages, desc='reading fortunes', unit='package'):
    fortunes[catalogs.FORTUNE_PACKAGES[name]] += catalogs.read_fortunes(
        by_name[name].root, catalogs.FORTUNE_PACKAGES[name])
  for lang in languages:
    if lang != 'en' and not pairs.get(lang):
      raise SystemExit(f'no catalog pairs for {lang!r}: the catalogs hold no translations '
                       'into it; choose other --languages')
  return pairs, fortunes, sources


def build(args: argparse.Namespace) -> dict:
  """Writes the corpus to args.output; returns its metadata."""
  args.output = os.path.expanduser(args.output)
  preset = PRESETS[args.size]
  languages = (tuple(args.languages.split(',')) if args.languages else preset.languages)
  languages = tuple(dict.fromkeys(l.strip() for l in languages if l.strip()))
  bad = sorted(set(languages) & EXCLUDED_LANGUAGES)
  if bad:
    raise SystemExit(f'--languages: {",".join(bad)} cannot be used: espeak-ng reads '
                     'Japanese and Chinese badly (docs/embedded_corpus.md)')
  min_seconds = preset.min_seconds if args.min_seconds is None else args.min_seconds
  max_seconds = preset.max_seconds if args.max_seconds is None else args.max_seconds
  sample_bits = preset.sample_bits if args.sample_bits is None else args.sample_bits
  if not 0 < min_seconds < max_seconds:
    raise SystemExit(f'need 0 < --min_seconds < --max_seconds, got {min_seconds}, '
                     f'{max_seconds}')
  voices = synthesis.check_languages(languages)  # Fails early without espeak-ng.
  if os.path.exists(args.output) and os.listdir(args.output):
    if not args.overwrite:
      raise SystemExit(f'{args.output} exists and is not empty; pass --overwrite to replace it')
    for sub in ('text', 'speech', 'paired', 'downstream', 'metadata.json', 'vocab.txt'):
      path = os.path.join(args.output, sub)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  seed = args.seed
  started = time.time()

  pairs, fortunes, sources = read_text(languages, args)
  synth = Synthesizer(args.workers, min_seconds, max_seconds, sample_bits, seed)
  total = len(languages) * (preset.speech + preset.paired + preset.dev + preset.test
                            + preset.downstream_speech)
  bar = _progress(desc='synthesising', unit='utt', total=total)
  try:
    # --- multi-way dev/test, then downstream speech train --------------------
    multiway = select_multiway(pairs, languages)
    order = np.random.default_rng(derive_seed(seed, 'multiway')).permutation(len(multiway))
    # Candidates are taken in order with seeds by position, so dev and test
    # are the same whatever the number of downstream items after them.
    held = synth.take_multiway([multiway[i] for i in order], pairs, languages,
                               preset.dev + preset.test + preset.downstream_speech, bar)
    # Held-out strings per language; English always, as its strings leave the
    # training pairs of every language.
    held_languages = tuple(dict.fromkeys(('en',) + languages))
    held_text = {lang: [multiway_texts(e, pairs, held_languages)[lang] for e, _ in held]
                 for lang in held_languages}
    multiway_utts = {split: collections.defaultdict(list) for split in ('dev', 'test', 'ds')}
    for i, (english, audio) in enumerate(held):
      if i < preset.dev + preset.test:
        split, item_id = ('dev' if i < preset.dev else 'test'), f'mw-{i:05d}'
      else:
        split, item_id = 'ds', f'ds-{i - preset.dev - preset.test:05d}'
      texts = multiway_texts(english, pairs, languages)
      for lang in languages:
        multiway_utts[split][lang].append(synth.utterance(
            audio[lang], id=item_id, language=lang, transcript=texts[lang], english=english))

    # --- downstream text translation pairs -------------------------------------
    translations = select_translation_pairs(pairs, languages, held_text,
                                            preset.downstream_text, seed)
    for lang, chosen in translations.items():
      held_text['en'] += [english for _, english in chosen]
      held_text[lang] += [xx for xx, _ in chosen]
    train_pairs = remove_held_out(pairs, set(held_text['en']))
    # The vocabulary covers the held-out texts (each distinct one counted
    # once), so that downstream transcripts and translations have no UNK.
    downstream_texts = {text for lang_texts in held_text.values() for text in lang_texts}

    # --- training text and speech, per language ------------------------------
    meta_kinds = {'speech': {'train': {}}, 'paired': {'train': {}, 'dev': {}, 'test': {}},
                  'text': {'train': {}}}
    downstream = {'speech': {'train': {}}, 'text': {'train': {}, 'dev': {}, 'test': {}}}
    vocab_texts: List[str] = sorted(downstream_texts)
    for lang in languages:
      lines = training_text(lang, train_pairs, fortunes.get(lang, ()), held_text[lang],
                            np.random.default_rng(derive_seed(seed, 'text', lang)),
                            preset.max_text_lines)
      text_path = os.path.join(args.output, 'text', 'train', f'{lang}.txt')
      os.makedirs(os.path.dirname(text_path), exist_ok=True)
      with open(text_path, 'w', encoding='utf-8') as f:
        f.writelines(line + '\n' for line in lines)
      meta_kinds['text']['train'][lang] = {'examples': len(lines),
                                           'characters': sum(map(len, lines))}
      vocab_texts += lines
      spoken = synth.take(lang, [l for l in lines if catalogs.is_prose(l, min_words=1)],
                          preset.speech + preset.paired, 'train', bar)
      for kind, chosen in (('speech', spoken[:preset.speech]),
                           ('paired', spoken[preset.speech:])):
        utts = [synth.utterance(w, id=f'{lang}-{kind}-{i:05d}', language=lang,
                                transcript=text, english='')
                for i, (text, w, _) in enumerate(chosen)]
        write_records(os.path.join(args.output, kind, 'train', f'{lang}.tfrecord'), utts)
        meta_kinds[kind]['train'][lang] = _audio_stats(utts)
        if kind == 'paired':
          vocab_texts += [u.transcript for u in utts]
      for split in ('dev', 'test'):
        utts = multiway_utts[split][lang]
        write_records(os.path.join(args.output, 'paired', split, f'{lang}.tfrecord'), utts)
        meta_kinds['paired'][split][lang] = _audio_stats(utts)
      utts = multiway_utts['ds'][lang]
      write_records(os.path.join(args.output, 'downstream', 'speech', 'train',
                                 f'{lang}.tfrecord'), utts)
      downstream['speech']['train'][lang] = _audio_stats(utts)
      if lang != 'en':
        for split, text_pairs in (
            ('train', translations[lang]),
            ('dev', [(u.transcript, u.english) for u in multiway_utts['dev'][lang]]),
            ('test', [(u.transcript, u.english) for u in multiway_utts['test'][lang]])):
          write_translations(os.path.join(args.output, 'downstream', 'text', split,
                                          f'{lang}.tsv'), text_pairs)
          downstream['text'][split][lang] = {'examples': len(text_pairs)}
  finally:
    bar.close()
    synth.close()

  vocab = CharacterVocabulary.build(vocab_texts, max_size=args.max_vocab_size)
  vocab.save(os.path.join(args.output, 'vocab.txt'))
  meta = {
      'name': f'mslam_embedded_{args.size}',
      'sample_rate': synthesis.SAMPLE_RATE,
      'languages': list(languages),
      'kinds': meta_kinds,
      'downstream': downstream,
      'vocabulary': 'vocab.txt',
      'audio_format': 'flac',
      'sources': sources,
      'builder': {
          'args': {k: v for k, v in sorted(vars(args).items())
                   if k not in ('output', 'cache_dir', 'overwrite', 'workers')},
          'seed': seed,
          'min_seconds': min_seconds,
          'max_seconds': max_seconds,
          'sample_bits': sample_bits,
          'voices': voices,
          'variants': list(synthesis.VARIANTS),
          'multiway_candidates': len(multiway),
          'utterances_spoken': synth.spoken,
          'utterances_out_of_range': synth.rejected,
      },
  }
  with open(os.path.join(args.output, 'metadata.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, ensure_ascii=False, indent=1)
    f.write('\n')
  hours = sum(s['seconds'] for per_split in (*meta_kinds['speech'].values(),
                                             *meta_kinds['paired'].values(),
                                             *downstream['speech'].values())
              for s in per_split.values()) / 3600
  print(f'wrote {args.output}: {len(languages)} languages, {hours:.2f} h of audio, '
        f'{vocab.vocab_size} vocabulary ids, in {time.time() - started:.0f} s', file=sys.stderr)
  return meta


def _audio_stats(utts: Sequence[Utterance]) -> dict:
  return {'examples': len(utts),
          'seconds': round(sum(u.num_samples for u in utts) / synthesis.SAMPLE_RATE, 2)}


def main(argv: Optional[Sequence[str]] = None) -> None:
  try:
    build(parse_args(argv))
  except (catalogs.PackageError, synthesis.SynthesisError) as e:
    raise SystemExit(f'mslam_jax.corpus.build: {e}') from e


if __name__ == '__main__':
  main()
