"""Speech from text with the espeak-ng synthesiser, for the embedded corpus.

`synthesize` speaks one text in a random voice variant, rate and pitch and
returns a 16 kHz float32 waveform; `synthesize_many` does the same for many
texts in parallel. The speech is very robotic (an off-the-shelf English
recogniser gets over 90% WER on it): good for pipeline tests and for
comparing pre-training variants, not a stand-in for natural speech.

espeak-ng writes 22.05 kHz mono WAV; a random voice variant, rate and pitch per
utterance give some speaker variety. docs/embedded_corpus.md explains the
settings.
"""

import concurrent.futures
import dataclasses
import functools
import shutil
import subprocess
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import soxr

SAMPLE_RATE = 16000  # The corpus rate (that of most ASR corpora); espeak writes 22.05 kHz.
RATE_RANGE = (130, 190)  # Words per minute, around espeak's default of 175.
PITCH_RANGE = (30, 70)  # On espeak's 0-99 pitch scale, around its default of 50.

# Our code -> espeak-ng voice; each was checked in `espeak-ng --voices` (1.51).
# American English and Brazilian Portuguese are our choice (the most speakers;
# fortunes-br is Brazilian).
VOICES = {
    'en': 'en-us', 'de': 'de', 'fr': 'fr-fr', 'es': 'es', 'it': 'it', 'pt': 'pt-br',
    'nl': 'nl', 'pl': 'pl', 'cs': 'cs', 'ru': 'ru', 'el': 'el', 'tr': 'tr', 'sv': 'sv',
    'uk': 'uk', 'fi': 'fi', 'hu': 'hu', 'vi': 'vi', 'ko': 'ko', 'hi': 'hi', 'ar': 'ar',
    'da': 'da', 'nb': 'nb', 'ro': 'ro', 'bg': 'bg', 'hr': 'hr', 'sk': 'sk', 'sl': 'sl',
    'ca': 'ca', 'et': 'et', 'lt': 'lt', 'lv': 'lv', 'id': 'id', 'fa': 'fa', 'he': 'he',
    'sr': 'sr', 'eu': 'eu', 'gl': 'pt', 'ka': 'ka', 'is': 'is',
}
# Our choice among the 101 variants of `espeak-ng --voices=variant`: the plain
# male and female ones and three Klatt voices. Whisper, croak and the novelty
# voices are left out; klatt4 clips.
VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8', 'f1', 'f2', 'f3', 'f4', 'f5',
            'klatt', 'klatt2', 'klatt3')
# Our choice: silence kept before and after the speech once trimmed (espeak
# pads about 0.35 s at the end), and the level counted as silence.
EDGE_SECONDS = 0.05
SILENCE_LEVEL = 1e-3
# Our choice: each utterance is scaled to a random peak in this range, a
# further source of variety that also keeps resampling overshoot off the
# clipping point.
PEAK_RANGE = (0.3, 0.7)


class SynthesisError(RuntimeError):
  """espeak-ng is missing or failed on a text."""


@dataclasses.dataclass(frozen=True)
class Voice:
  """One utterance's espeak-ng settings."""
  name: str  # e.g. 'de+m3'
  rate: int  # words per minute
  pitch: int  # 0-99
  peak: float  # the waveform's peak after scaling

  def __str__(self) -> str:
    return f'{self.name} -s {self.rate} -p {self.pitch} peak {self.peak:.2f}'


def _espeak() -> str:
  path = shutil.which('espeak-ng')
  if path is None:
    raise SynthesisError('espeak-ng is not installed: run `apt-get install -y espeak-ng` '
                         '(as root) on a Debian-based machine.')
  return path


def espeak_version() -> str:
  """The installed espeak-ng's version, e.g. '1.51'."""
  out = subprocess.run([_espeak(), '--version'], capture_output=True, text=True).stdout
  words = out.split()
  return words[words.index('text-to-speech:') + 1] if 'text-to-speech:' in words else 'unknown'


@functools.lru_cache(maxsize=None)
def installed_voices() -> Tuple[str, ...]:
  """Language voices of the installed espeak-ng (the `Language` column)."""
  out = subprocess.run([_espeak(), '--voices'], capture_output=True, text=True,
                       check=True).stdout
  return tuple(line.split()[1] for line in out.splitlines()[1:] if line.split())


@functools.lru_cache(maxsize=None)
def installed_variants() -> Tuple[str, ...]:
  """Variant names of the installed espeak-ng (`!v/m3` in the File column -> m3)."""
  out = subprocess.run([_espeak(), '--voices=variant'], capture_output=True, text=True,
                       check=True).stdout
  names = []
  for line in out.splitlines()[1:]:
    fields = line.split()
    if len(fields) >= 5 and fields[4].startswith('!v/'):
      names.append(fields[4][len('!v/'):])
  return tuple(names)


def voice_for(language: str) -> str:
  """The espeak-ng voice of our language code, checked against the installed ones."""
  voice = VOICES.get(language)
  if voice is None:
    raise SynthesisError(f'no espeak-ng voice is mapped for language {language!r}; add it '
                         f'to VOICES in {__name__} (known: {", ".join(sorted(VOICES))})')
  if voice not in installed_voices():
    raise SynthesisError(f'espeak-ng has no voice {voice!r} for language {language!r}; '
                         'see `espeak-ng --voices`')
  return voice


def random_voice(language: str, rng: np.random.Generator) -> Voice:
  """A variant, rate, pitch and peak drawn for one utterance."""
  variants = [v for v in VARIANTS if v in installed_variants()] or ['']
  variant = variants[int(rng.integers(len(variants)))]
  name = voice_for(language) + (f'+{variant}' if variant else '')
  return Voice(name=name,
               rate=int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1)),
               pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
               peak=float(rng.uniform(*PEAK_RANGE)))


def _parse_wav(data: bytes) -> Tuple[np.ndarray, int]:
  """16-bit mono PCM of a RIFF WAV; espeak's --stdout header holds no real sizes."""
  if data[:4] != b'RIFF' or data[8:12] != b'WAVE':
    raise SynthesisError('espeak-ng wrote no WAV data')
  pos, rate = 12, None
  while pos + 8 <= len(data):
    chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], 'little')
    if chunk == b'fmt ':
      channels = int.from_bytes(data[pos + 10:pos + 12], 'little')
      rate = int.from_bytes(data[pos + 12:pos + 16], 'little')
      bits = int.from_bytes(data[pos + 22:pos + 24], 'little')
      if channels != 1 or bits != 16:
        raise SynthesisError(f'espeak-ng wrote {channels} channels of {bits} bits, '
                             'expected mono 16-bit')
    elif chunk == b'data':
      if rate is None:
        raise SynthesisError('espeak-ng WAV has data before its format chunk')
      samples = data[pos + 8:]
      samples = samples[:len(samples) // 2 * 2]
      return np.frombuffer(samples, '<i2').astype(np.float32) / 32768.0, rate
    pos += 8 + size + (size & 1)
  raise SynthesisError('espeak-ng WAV has no data chunk')


def trim_silence(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
  """Cuts leading and trailing silence down to EDGE_SECONDS."""
  loud = np.flatnonzero(np.abs(waveform) > SILENCE_LEVEL)
  if not loud.size:
    return waveform[:0]
  edge = int(EDGE_SECONDS * sample_rate)
  return waveform[max(0, loud[0] - edge):loud[-1] + 1 + edge]


def render(text: str, voice: Voice, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Speaks text with fixed settings: float32 [samples] at sample_rate, trimmed, scaled."""
  cmd = [_espeak(), '-v', voice.name, '-s', str(voice.rate), '-p', str(voice.pitch),
         '--stdout']
  # The text goes through stdin so that one starting with '-' is not an option.
  result = subprocess.run(cmd, input=text.encode('utf-8'), capture_output=True, check=False)
  if result.returncode != 0:
    raise SynthesisError(f'`{" ".join(cmd)}` failed on {text!r}: '
                         f'{result.stderr.decode("utf-8", "replace").strip()}')
  waveform, rate = _parse_wav(result.stdout)
  waveform = trim_silence(waveform, rate)
  if rate != sample_rate and waveform.size:
    waveform = soxr.resample(waveform, rate, sample_rate).astype(np.float32)
  peak = float(np.max(np.abs(waveform))) if waveform.size else 0.0
  if peak > 0:
    waveform = waveform * np.float32(voice.peak / peak)
  return waveform.astype(np.float32)


def synthesize(text: str, language: str, rng: np.random.Generator,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Speaks text in a random voice of language: float32 [samples] at 16 kHz.

  The caller drops utterances whose length is out of its range.
  """
  return render(text, random_voice(language, rng), sample_rate)


def _synthesize_seeded(request: Tuple[str, str, int]) -> Tuple[np.ndarray, str]:
  text, language, seed = request
  rng = np.random.default_rng(seed)
  voice = random_voice(language, rng)
  return render(text, voice), str(voice)


def synthesize_many(requests: Sequence[Tuple[str, str, int]], workers: int = 2,
                    pool: Optional[concurrent.futures.Executor] = None
                    ) -> Iterator[Tuple[np.ndarray, str]]:
  """(waveform, voice description) per (text, language, seed), in request order.

  Each request draws its voice from np.random.default_rng(seed), so the output
  does not depend on the number of workers.

  Args:
    requests: (text, language, seed) triples.
    workers: parallel espeak-ng runs when no pool is given; 1 runs them in turn.
    pool: an executor to reuse across calls (see `make_pool`).
  """
  if pool is None and workers <= 1:
    yield from map(_synthesize_seeded, requests)
    return
  own = pool is None
  pool = pool or make_pool(workers)
  try:
    yield from pool.map(_synthesize_seeded, requests)
  finally:
    if own:
      pool.shutdown()


def make_pool(workers: int) -> concurrent.futures.Executor:
  """An executor running `workers` espeak-ng processes at a time, for synthesize_many.

  Threads, not processes: each utterance already runs in its own espeak-ng
  process, and the Python side (parsing, soxr) is small and mostly outside the
  GIL. Measured here on 2 cores for 80 utterances: 1.23 s serial, 0.55 s on 2
  threads, 0.67-0.88 s on 2-process pools (fork, forkserver, spawn), and
  process pools would re-import the builder (and TensorFlow) per worker or
  fork TensorFlow's threads.
  """
  return concurrent.futures.ThreadPoolExecutor(max_workers=workers)


def check_languages(languages: Sequence[str]) -> Dict[str, str]:
  """language -> espeak voice for all of languages; raises on the first missing."""
  return {language: voice_for(language) for language in languages}

