"""Counts of the examples the input pipeline skipped or cleaned, with their names.

A run never dies on one bad example (a large corpus always holds a few broken
ones): the preprocessors give each example a `problem` code, a `tf.data` filter
hands non-OK codes to `LOG` (from inside the pipeline, through
tf.numpy_function) and drops or keeps the example as the code says. The trainer
and the tools print `LOG.report()`.

Counts are per process and start at zero in each process (a resumed run counts
again from its resume point).
"""

import collections
import enum
import threading
from typing import Dict, List, Optional, Sequence, Tuple


class Problem(enum.IntEnum):
  """Why an example was skipped (or kept but changed, for the codes in KEPT).

  The *_AUDIO codes 1-4 are also `audio.decode_audio`'s outcomes
  (audio.AUDIO_PROBLEMS): one enum for the decoder and the pipeline.
  """
  OK = 0
  UNREADABLE_AUDIO = 1     # not decodable (garbage, unsupported format), or unreadable file
  TRUNCATED_AUDIO = 2      # the header is fine but the data ends early or breaks off
  EMPTY_AUDIO = 3          # no samples, or all samples exactly zero
  NONFINITE_AUDIO = 4      # NaN or Inf samples (possible in float WAV)
  TOO_SHORT_AUDIO = 5      # fewer log-mel frames than audio_features.min_frames (gin)
  TOO_LONG_AUDIO = 6       # paired audio over the frame limit (cropping would cut its transcript)
  EMPTY_TEXT = 7           # empty text line or transcript
  TOO_LONG_TEXT = 8        # transcript over the character limit (paired)
  UNKNOWN_CHARS_CLEANED = 9   # kept: characters outside the vocabulary became UNK
  CROPPED_AUDIO = 10       # kept: unlabeled speech cropped to the frame limit
  CROPPED_TEXT = 11        # kept: unlabeled text cropped to the character limit


KEPT = (Problem.OK, Problem.UNKNOWN_CHARS_CLEANED, Problem.CROPPED_AUDIO, Problem.CROPPED_TEXT)

MESSAGES = {
    Problem.UNREADABLE_AUDIO: 'unreadable audio (missing file, or not WAV/FLAC/OGG)',
    Problem.TRUNCATED_AUDIO: 'truncated audio file',
    Problem.EMPTY_AUDIO: 'empty or all-zero audio',
    Problem.NONFINITE_AUDIO: 'NaN or Inf audio samples',
    Problem.TOO_SHORT_AUDIO: 'audio shorter than audio_features.min_frames',
    Problem.TOO_LONG_AUDIO: 'paired audio longer than BatchConfig.paired_frames',
    Problem.EMPTY_TEXT: 'empty text or transcript',
    Problem.TOO_LONG_TEXT: 'transcript longer than BatchConfig.paired_text_length',
    Problem.UNKNOWN_CHARS_CLEANED: 'characters outside the vocabulary mapped to UNK',
    Problem.CROPPED_AUDIO: 'unlabeled speech cropped to BatchConfig.speech_frames',
    Problem.CROPPED_TEXT: 'text cropped to BatchConfig.text_length',
}


class AllSkippedError(RuntimeError):
  """A task skipped every one of its last `max_consecutive_skips` examples, or every one
  of its examples (`none_kept`)."""


FIX = ('Fix the data, or the limits it breaks (BatchConfig lengths, '
       'preprocessors.audio_features.min_frames).')


class BadInputLog:
  """Thread-safe counts per (task, problem), with the first few example names.

  Attributes:
    max_consecutive_skips: a task that skips this many examples in a row
      raises AllSkippedError instead of filtering forever (ours: 1000; a corpus
      whose every example is too long for the configured shapes would
      otherwise hang the input pipeline without a word).
  """

  def __init__(self, names_kept: int = 3, max_consecutive_skips: int = 1000):
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self._names: Dict[Tuple[str, Problem], List[str]] = collections.defaultdict(list)
    self._streaks = collections.Counter()
    self._names_kept = names_kept
    self.max_consecutive_skips = max_consecutive_skips
    # The AllSkippedError raised, if any: raised inside a tf.data function it
    # reaches the caller wrapped in a TensorFlow error, and the sampler raises
    # this one in its place (`stopped`).
    self._stopped: Optional[AllSkippedError] = None

  def record(self, task: str, problem: int, name: str) -> bool:
    """Counts one example's outcome; returns whether to keep it."""
    problem = Problem(int(problem))
    keep = problem in KEPT
    with self._lock:
      self._streaks[task] = 0 if keep else self._streaks[task] + 1
      streak = self._streaks[task]
      if problem != Problem.OK:
        self._counts[(task, problem)] += 1
        names = self._names[(task, problem)]
        if len(names) < self._names_kept and name not in names:
          names.append(name)
    if streak >= self.max_consecutive_skips:
      error = AllSkippedError(
          f'task {task}: the last {streak} examples were all skipped; so far:\n'
          f'{self.report(task)}\n{FIX}')
      with self._lock:  # the first: batches read ahead on other threads go on counting
        self._stopped = self._stopped or error
      raise error
    return keep

  def stopped(self) -> Optional[AllSkippedError]:
    """The first AllSkippedError `record` raised since the last reset, if any."""
    with self._lock:
      return self._stopped

  def counts(self) -> Dict[Tuple[str, Problem], int]:
    with self._lock:
      return dict(self._counts)

  def total(self, problem: Problem = None) -> int:
    with self._lock:
      return sum(n for (_, p), n in self._counts.items() if problem in (None, p))

  def examples(self, task: str, problem: Problem) -> List[str]:
    with self._lock:
      return list(self._names.get((task, problem), []))

  def reset(self) -> None:
    with self._lock:
      self._counts.clear()
      self._names.clear()
      self._streaks.clear()
      self._stopped = None

  def report(self, task: str = None) -> str:
    """One line per (task, problem): count, skipped or kept, message, first names."""
    with self._lock:
      items = sorted(((k, n) for k, n in self._counts.items() if task in (None, k[0])),
                     key=lambda kv: (kv[0][0], kv[0][1]))
      lines = []
      for (task, problem), n in items:
        verdict = 'kept' if problem in KEPT else 'skipped'
        names = ', '.join(self._names[(task, problem)])
        lines.append(f'{task}: {n} {verdict}: {MESSAGES[problem]} (e.g. {names})')
      return '\n'.join(lines)


def none_kept(task: str, problems: Sequence[int],
              names: Sequence[str]) -> Optional[AllSkippedError]:
  """The error for a task none of whose examples is kept, else None.

  For a task whose every example is known (a corpus decoded whole into memory).
  Such a task gives only all-padding rows: a run would train without it until
  `max_consecutive_skips` draws stop it (a 300-step demo with 2 paired rows a
  step never got there), so the sampler stops before the step is compiled.
  Counts nothing in LOG (the examples are counted when batches take them).
  """
  if not len(problems) or any(Problem(int(p)) in KEPT for p in problems):
    return None
  log = BadInputLog(max_consecutive_skips=len(problems) + 1)
  for problem, name in zip(problems, names):
    log.record(task, problem, name)
  return AllSkippedError(f'task {task}: none of its {len(problems)} examples is kept:\n'
                         f'{log.report(task)}\n{FIX}')


LOG = BadInputLog()
