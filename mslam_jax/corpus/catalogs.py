"""Multilingual text from Debian packages: gettext catalogs and fortunes.

Holds the three steps that turn Debian packages into clean text:
fetching (`apt-get download` + `dpkg-deb -x`, cached), reading (.mo
catalogs into English -> translation pairs, fortune files into prose pieces)
and filtering (`drop_reason` for pairs, `fortune_pieces` for prose).

Sources: the five packages in `CATALOG_PACKAGES` hold about 750k English <->
xx catalog pairs in 127 languages; `/usr/share/locale` adds the catalogs of
whatever is installed; the `fortunes-*` packages hold natural prose for en, de,
ru, cs, it, pl, es and pt. docs/embedded_corpus.md gives the sources and the
filter rules with their reasons. Every text leaves this module through
`normalize_text`.
"""

import dataclasses
import gettext
import glob
import json
import os
import re
import shutil
import subprocess
import unicodedata
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from mslam_jax.data.vocabulary import normalize_text

# Packages with many .mo catalogs (about 55 MB to download).
CATALOG_PACKAGES = ('vlc-l10n', 'inkscape', 'evolution-common', 'gnucash-common',
                    'gimp-data')
# Catalogs already on a stock machine. Their set depends on what is
# installed, so a corpus built with them is reproducible only on a like machine.
SYSTEM_LOCALE_DIR = '/usr/share/locale'
# Natural prose in these languages; checked with `apt-cache search fortunes`
# (Debian bookworm). The offensive `*-off` packages are left out, and so is the
# `off/` folder that fortunes-es ships inside itself.
FORTUNE_PACKAGES = {
    'fortunes': 'en',
    'fortunes-min': 'en',
    'fortunes-de': 'de',
    'fortunes-ru': 'ru',
    'fortunes-cs': 'cs',
    'fortunes-it': 'it',
    'fortunes-pl': 'pl',
    'fortunes-es': 'es',
    'fortunes-br': 'pt',
}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'mslam_jax')

# Strings over 300 characters (help paragraphs) and English sides under 3
# words (labels, not sentences) are filtered out; the same bounds apply to
# fortune pieces.
MAX_CHARS = 300
MIN_WORDS = 3

# Our choice: when a language has catalogs for several locales, these are read
# first and the others only fill gaps. Brazilian Portuguese leads because the
# espeak voice (pt-br) and fortunes-br are Brazilian, and the 2,585 multi-way
# strings of the large preset's languages are counted over pt_BR. Every other
# language prefers its plain code.
PREFERRED_LOCALES = {'pt': ('pt_BR', 'pt')}

# The fortune files are UTF-8 today, but older releases used legacy
# code pages; tried in order after UTF-8 fails (latin-1 never fails).
LEGACY_ENCODINGS = {
    'ru': ('koi8_r',),
    'uk': ('koi8_u',),
    'cs': ('iso8859_2',),
    'pl': ('iso8859_2',),
    'sk': ('iso8859_2',),
    'hu': ('iso8859_2',),
}


def count_words(text: str) -> int:
  """Whitespace-separated tokens holding a letter ("Vertical — RL" has 2)."""
  return sum(any(c.isalpha() for c in token) for token in text.split())


class PackageError(RuntimeError):
  """A Debian package could not be fetched or unpacked."""


@dataclasses.dataclass(frozen=True)
class Package:
  """An unpacked package: `root` holds its files as dpkg-deb -x lays them out."""
  name: str
  version: str
  root: str


# --- fetching ----------------------------------------------------------------

def _run(cmd: Sequence[str], package: str, fix: str,
         cwd: Optional[str] = None) -> subprocess.CompletedProcess:
  try:
    result = subprocess.run(list(cmd), capture_output=True, text=True, check=False, cwd=cwd)
  except FileNotFoundError as e:
    raise PackageError(f'cannot fetch package {package!r}: `{cmd[0]}` is not installed '
                       f'(needs a Debian-based machine). {fix}') from e
  if result.returncode != 0:
    message = (result.stderr or result.stdout).strip().splitlines()
    raise PackageError(f'`{" ".join(cmd)}` failed for package {package!r}: '
                       f'{message[-1] if message else "exit " + str(result.returncode)}. '
                       f'{fix}')
  return result


def _fetch_fix(package: str) -> str:
  return (f'Run `apt-get update` (as root) so apt knows {package}, check the network '
          'reaches the Debian mirror, or pass --catalog_dir=DIR where DIR/<package>/ holds '
          'already-unpacked packages (e.g. from `dpkg-deb -x NAME_*.deb DIR/NAME`).')


def download_package(name: str, deb_dir: str) -> str:
  """The path of NAME's .deb in deb_dir, downloaded with `apt-get download` if absent."""
  existing = sorted(glob.glob(os.path.join(deb_dir, f'{name}_*.deb')))
  if existing:
    return existing[-1]
  os.makedirs(deb_dir, exist_ok=True)
  cmd = ['apt-get', 'download']
  if hasattr(os, 'geteuid') and os.geteuid() == 0:
    # As root apt downloads through the `_apt` user, which may not write to a
    # folder under root's home; it then warns and falls back. Say so upfront.
    cmd += ['-o', 'APT::Sandbox::User=root']
  # apt-get download writes into its working directory.
  _run(cmd + [name], name, _fetch_fix(name), cwd=deb_dir)
  existing = sorted(glob.glob(os.path.join(deb_dir, f'{name}_*.deb')))
  if not existing:
    raise PackageError(f'`apt-get download {name}` wrote no .deb. {_fetch_fix(name)}')
  return existing[-1]


def deb_version(deb_path: str) -> str:
  name = os.path.basename(deb_path).split('_')[0]
  result = _run(['dpkg-deb', '-f', deb_path, 'Version'], name,
                f'{deb_path} may be truncated: delete it to download it again.')
  return result.stdout.strip()


def unpack_package(deb_path: str, unpack_dir: str) -> str:
  """Unpacks deb_path into unpack_dir/<deb name>/ once; returns that folder."""
  target = os.path.join(unpack_dir, os.path.basename(deb_path)[:-len('.deb')])
  done = os.path.join(target, '.unpacked')
  if os.path.exists(done):
    return target
  if os.path.exists(target):
    shutil.rmtree(target)  # An interrupted earlier unpack.
  os.makedirs(target)
  name = os.path.basename(deb_path).split('_')[0]
  _run(['dpkg-deb', '-x', deb_path, target], name,
       f'{deb_path} may be truncated: delete it to download it again.')
  with open(done, 'w') as f:
    f.write(deb_path + '\n')
  return target


def fetch_packages(names: Iterable[str], cache_dir: str = DEFAULT_CACHE_DIR,
                   catalog_dir: Optional[str] = None) -> List[Package]:
  """Unpacked packages, from catalog_dir if given, else downloaded and cached.

  Args:
    names: Debian package names.
    cache_dir: .debs go to cache_dir/debs, unpacked trees to cache_dir/unpacked.
    catalog_dir: a folder with one already-unpacked tree per package,
      catalog_dir/<name>/usr/share/...; then nothing is downloaded. An optional
      catalog_dir/versions.json ({name: version}) names the versions.

  Raises:
    PackageError: a package is missing, with the command that failed and the fix.
  """
  packages = []
  if catalog_dir is not None:
    versions = {}
    manifest = os.path.join(catalog_dir, 'versions.json')
    if os.path.exists(manifest):
      with open(manifest) as f:
        versions = json.load(f)
    for name in names:
      root = os.path.join(catalog_dir, name)
      if not os.path.isdir(root):
        raise PackageError(f'package {name!r} is not in --catalog_dir={catalog_dir} '
                           f'(expected the folder {root} holding its unpacked files, e.g. '
                           f'from `dpkg-deb -x {name}_*.deb {root}`); or leave --catalog_dir '
                           'out to download it with apt-get.')
      packages.append(Package(name, versions.get(name, 'unknown'), root))
    return packages
  for name in names:
    deb = download_package(name, os.path.join(cache_dir, 'debs'))
    root = unpack_package(deb, os.path.join(cache_dir, 'unpacked'))
    packages.append(Package(name, deb_version(deb), root))
  return packages


# --- .mo catalogs ------------------------------------------------------------

def read_mo(path: str) -> Dict:
  """The raw msgid -> msgstr dict of a GNU .mo file (plural keys are tuples)."""
  with open(path, 'rb') as f:
    return dict(gettext.GNUTranslations(f)._catalog)  # pylint: disable=protected-access


def locale_language(locale: str) -> Optional[Tuple[str, int]]:
  """(our language code, preference rank) of a locale folder name, or None.

  `de` -> ('de', 0); `pt_BR` -> ('pt', 0); `de_CH` -> ('de', 1), `en_GB` ->
  None (English comes from the msgid side), `sr@latin` -> None (a modifier
  can change the script, and mixing scripts under one code would hurt).
  Lower ranks are read first, so they win where both translate a string.
  """
  if '@' in locale:
    return None
  base = locale.split('.')[0]
  code = base.split('_')[0].lower()
  if not re.fullmatch(r'[a-z]{2,3}', code) or code == 'en':
    return None
  preferred = PREFERRED_LOCALES.get(code, (code,))
  rank = preferred.index(base) if base in preferred else len(preferred)
  return code, rank


def find_catalogs(root: str) -> List[Tuple[str, int, str]]:
  """(language, rank, path) of every .mo under root/**/LC_MESSAGES/, sorted."""
  found = []
  for path in glob.glob(os.path.join(root, '**', 'LC_MESSAGES', '*.mo'), recursive=True):
    locale = os.path.basename(os.path.dirname(os.path.dirname(path)))
    mapped = locale_language(locale)
    if mapped is not None:
      found.append((mapped[0], mapped[1], path))
  return sorted(found)


_FORMAT = re.compile(
    r"%(\([^)]*\))?[-+#0']*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t)?"
    r'[diouxXeEfFgGaAcspnSC%]'   # printf and Python %-formatting
    r'|%[-_0^#]?[A-Za-z]'         # strftime %H:%M, %-d
    r'|%\d|%[A-Za-z]\w*%'        # Qt %1, Windows-style %NAME%
    r'|\{[^{}\s]*\}'              # str.format and ICU {0} {name} {}
    r'|\$\{|\$\(|@\w+@')          # shell and autoconf substitutions
_MARKUP = re.compile(r'</?[A-Za-z!][^<>]*>|&[A-Za-z]+;|&#\d+;|&#x[0-9a-fA-F]+;')
_MNEMONIC = re.compile(r'_\w|&\w')
_URL = re.compile(r'[a-z]+://|www\.|mailto:|\S@\S+\.[a-z]', re.IGNORECASE)


def drop_reason(english, translation) -> Optional[str]:
  """Why a raw catalog entry is not a clean sentence pair, or None to keep it.

  docs/embedded_corpus.md gives each rule's reason. English equal to its
  translation and English under MIN_WORDS words are judged after
  normalize_text; the rest on the raw text.
  """
  if isinstance(english, tuple) or isinstance(translation, tuple):
    return 'plural'
  if not english:
    return 'header'
  if '\x04' in english:
    return 'msgctxt'
  if not translation:
    return 'untranslated'
  for text in (english, translation):
    if any(c in text for c in '\n\r\t'):
      return 'newline'
    if '\\' in text:
      return 'backslash'
    if _URL.search(text):
      return 'url'
    if _MARKUP.search(text):
      return 'markup'
    if _FORMAT.search(text):
      return 'format'
    if _MNEMONIC.search(text):
      return 'mnemonic'
  english, translation = normalize_text(english), normalize_text(translation)
  if len(english) > MAX_CHARS or len(translation) > MAX_CHARS:
    return 'too_long'
  if english == translation:
    return 'untranslated'
  if count_words(english) < MIN_WORDS:
    return 'short'
  return None


def clean_pairs(catalog: Mapping) -> Iterator[Tuple[str, str]]:
  """(english, translation) of the entries drop_reason keeps, normalised."""
  for english, translation in catalog.items():
    if drop_reason(english, translation) is None:
      yield normalize_text(english), normalize_text(translation)


def load_pairs(roots: Sequence[str], languages: Optional[Iterable[str]] = None,
               errors: Optional[List[str]] = None,
               progress: Callable[[Sequence], Iterable] = iter) -> Dict[str, Dict[str, str]]:
  """language -> {english: translation} over the .mo catalogs under roots.

  Deduplicated on the English side: the first translation read wins, reading
  preferred locales first (locale_language), then roots in the order given,
  then paths in sorted order, so the result is the same on every run.

  Args:
    roots: folders to search (unpacked packages, /usr/share/locale).
    languages: only these codes; all when None.
    errors: if given, gets one line per unreadable .mo file.
    progress: wraps the list of catalogs to read, e.g. a tqdm progress bar.
  """
  wanted = None if languages is None else set(languages)
  catalogs = []
  for order, root in enumerate(roots):
    for language, rank, path in find_catalogs(root):
      if wanted is None or language in wanted:
        catalogs.append((language, rank, order, path))
  pairs: Dict[str, Dict[str, str]] = {}
  for language, _, _, path in progress(sorted(catalogs)):
    try:
      catalog = read_mo(path)
    except (OSError, UnicodeDecodeError, LookupError, ValueError) as e:
      # Some .mo files name no or a wrong charset; one bad file is skipped.
      if errors is not None:
        errors.append(f'{path}: {type(e).__name__}: {e}')
      continue
    into = pairs.setdefault(language, {})
    for english, translation in clean_pairs(catalog):
      into.setdefault(english, translation)
  return pairs


# --- fortunes ----------------------------------------------------------------

def decode_text(data: bytes, language: str) -> str:
  """UTF-8, else the language's legacy code page(s), else latin-1."""
  for encoding in ('utf-8',) + LEGACY_ENCODINGS.get(language, ()):
    try:
      return data.decode(encoding)
    except UnicodeDecodeError:
      pass
  return data.decode('latin-1')


def split_fortunes(text: str) -> List[str]:
  """The fortunes of a fortune file: the text between lines holding only `%`."""
  fortunes, current = [], []
  for line in text.splitlines():
    if line.rstrip() == '%':
      fortunes.append('\n'.join(current))
      current = []
    else:
      current.append(line)
  fortunes.append('\n'.join(current))
  return [f for f in fortunes if f.strip()]


# A line naming the source: "-- Author", "— Author", "~ Author".
_ATTRIBUTION = re.compile(r'^(--|—|–|~)\s*\S')
# Chat logs (common in fortunes-pl): "<nick> words" or "[12:00] <nick> words".
_SPEAKER = re.compile(r'^(\[[^\]]*\]\s*)?<[^<>\s]{1,30}>\s*')
# Characters of code, ASCII art, tables and markup: prose does not need them.
_NOT_PROSE = re.compile(r'[<>|{}\[\]_#@=*^~`\\/$]')
_SENTENCE_END = re.compile(r'(?<=[.!?…])\s+')
_QUOTES = {'"': '"', '“': '”', '„': '“', '«': '»', '»': '«', "'": "'", '‘': '’'}


def _strip_quotes(text: str) -> str:
  """Removes one pair of quote marks around the whole text, if that is all they enclose."""
  if len(text) > 1 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]):
    inner = text[1:-1]
    if text[0] not in inner and _QUOTES[text[0]] not in inner:
      return inner.strip()
  return text


def _split_sentences(text: str) -> List[str]:
  """Sentences of a paragraph; a break needs end punctuation then a capital or quote."""
  sentences = []
  for part in _SENTENCE_END.split(text):
    if sentences:
      word = sentences[-1].rsplit(' ', 1)[-1].rstrip('.')
      # "M. Twain", "z.B. so", "Dr. Who": an initial, a dotted abbreviation or a
      # short capitalised title, not a sentence end.
      abbreviation = (sentences[-1].endswith('.') and
                      (len(word) == 1 or '.' in word or (len(word) <= 3 and word[:1].isupper())))
      starts_sentence = part[:1].isupper() or part[:1] in '"“„«\'(-–—¿¡'
      if abbreviation or not starts_sentence:
        sentences[-1] += ' ' + part
        continue
    sentences.append(part)
  return sentences


def is_prose(text: str, min_words: int = MIN_WORDS) -> bool:
  """True for a normalised piece fit for the text corpus and for speaking.

  min_words is 3 for fortunes and English (MIN_WORDS); translations of a
  3-word English string may be shorter ("Klangdatei auswählen").
  """
  if count_words(text) < min_words or len(text) > MAX_CHARS:
    return False
  if _NOT_PROSE.search(text) or _URL.search(text):
    return False
  if text.startswith('(') and text.endswith(')'):
    return False  # Usually a source note: "(Goethe, Faust I)".
  # Vowel signs of Indic scripts and Arabic diacritics are marks, not letters.
  letters = sum(unicodedata.category(c)[0] in 'LM' for c in text)
  # Our choice: 70% letters among the non-space characters keeps dialogue and
  # numbers but drops tables, ASCII art and lists of symbols.
  return letters >= 0.7 * len(text.replace(' ', ''))


def fortune_pieces(fortune: str) -> List[str]:
  """Clean sentences or short paragraphs of one fortune.

  Wrapped lines are joined; blank lines, attribution lines ("-- Author") and
  chat speaker tags end a paragraph. A paragraph within MAX_CHARS stays whole,
  a longer one is split into sentences; pieces that fail is_prose are dropped.
  """
  paragraphs, current = [], []
  for line in fortune.splitlines():
    stripped = line.strip()
    speaker = _SPEAKER.match(stripped)
    if not stripped or _ATTRIBUTION.match(stripped) or speaker:
      if current:
        paragraphs.append(' '.join(current))
      current = []
      if speaker:
        paragraphs.append(stripped[speaker.end():])
      continue
    current.append(stripped)
  if current:
    paragraphs.append(' '.join(current))
  pieces = []
  for paragraph in paragraphs:
    paragraph = _strip_quotes(normalize_text(paragraph))
    parts = [paragraph] if len(paragraph) <= MAX_CHARS else _split_sentences(paragraph)
    for part in parts:
      part = _strip_quotes(part)
      if is_prose(part):
        pieces.append(part)
  return pieces


def fortune_files(root: str) -> List[str]:
  """The fortune text files under root (not the .dat indexes, .u8 stubs or off/)."""
  files = []
  for path in glob.glob(os.path.join(root, '**', 'games', 'fortunes', '**', '*'),
                        recursive=True):
    relative = os.path.relpath(path, root).split(os.sep)
    if (not os.path.isfile(path) or os.path.islink(path) or 'off' in relative
        or path.endswith(('.dat', '.u8', '.pdat'))):
      continue
    files.append(path)
  return sorted(files)


def read_fortunes(root: str, language: str) -> List[str]:
  """Deduplicated fortune pieces of the fortune files under root, in file order."""
  seen, pieces = set(), []
  for path in fortune_files(root):
    with open(path, 'rb') as f:
      text = decode_text(f.read(), language)
    for fortune in split_fortunes(text):
      for piece in fortune_pieces(fortune):
        if piece not in seen:
          seen.add(piece)
          pieces.append(piece)
  return pieces
