"""What a person sees: quiet start-up, one progress line, a summary at the end.

Entry points call `quiet_unless_verbose()` before importing jax or
tensorflow: their C++ loggers read TF_CPP_MIN_LOG_LEVEL once, at load, and
otherwise print CUDA-probe errors and XLA banners on machines without a GPU.
TensorFlow's CUDA stub also logs through absl before absl is initialised,
which no setting reaches, so in quiet mode tensorflow is imported with the
process's stderr set aside (and shown if the import fails). `--verbose` on the
command line keeps all of it.
"""

import collections
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Dict, Iterable, Iterator, Optional, Sequence

VERBOSE_FLAG = '--verbose'
_verbose: Optional[bool] = None  # set from the parsed command line (set_verbose)


def set_verbose(on: bool) -> None:
  global _verbose
  _verbose = bool(on)


def verbose(argv: Optional[Sequence[str]] = None) -> bool:
  """--verbose as parsed (gin_utils.parse_command_line), else as on the command line."""
  if argv is None and _verbose is not None:
    return _verbose
  return VERBOSE_FLAG in (sys.argv if argv is None else argv)


def quiet_unless_verbose(argv: Optional[Sequence[str]] = None) -> None:
  """Silences library start-up noise unless --verbose is on the command line."""
  if verbose(argv):
    return
  # 3: errors too (the CUDA probe logs an error on every machine without a
  # GPU); a real failure still raises a Python exception. --verbose keeps them.
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
  os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
  for name in ('absl', 'jax', 'orbax', 'tensorflow', 'seqio', 'grain'):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass
  if 'tensorflow' not in sys.modules:
    with stderr_set_aside():
      importlib.import_module('tensorflow')


@contextlib.contextmanager
def stderr_set_aside(when: bool = True) -> Iterator[None]:
  """Captures file descriptor 2 (C++ loggers write there directly) while the block runs,
  and replays it if the block raises; a no-op when `when` is false."""
  if not when:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      capture.seek(0)
      sys.stderr.write(capture.read().decode('utf-8', errors='replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def format_duration(seconds: float) -> str:
  """'42s', '3m05s', '2h07m': a duration for a progress line."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


# Seconds between 'still ...' lines while a long compile runs: a 0.6B step takes
# minutes to compile for a TPU slice on a few CPU cores, and a silent console
# looks hung (our choice: one line a minute).
STILL_WORKING_EVERY_S = 60.0


@contextlib.contextmanager
def still_working(what: str, every_s: Optional[float] = None) -> Iterator[None]:
  """Prints 'still WHAT: 2m00s so far' every `every_s` seconds (default
  STILL_WORKING_EVERY_S) until the block ends, from a daemon thread."""
  every_s = STILL_WORKING_EVERY_S if every_s is None else every_s
  start = time.perf_counter()
  stop = threading.Event()

  def tick():
    while not stop.wait(every_s):
      print(f'still {what}: {format_duration(time.perf_counter() - start)} so far', flush=True)

  thread = threading.Thread(target=tick, name='still-working', daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


class Compiling:
  """Prints 'compiling the train step...', 'still compiling' every minute, and, on `done()`,
  how long it took. Also a context manager, so that an error stops the minute lines."""

  def __init__(self, what: str = 'the train step', every_s: Optional[float] = None):
    self.what = what
    self.start = time.perf_counter()
    print(f'compiling {what} (the first step includes it)...', flush=True)
    self._still = contextlib.ExitStack()
    self._still.enter_context(still_working(f'compiling {what}', every_s))

  def stop(self) -> None:
    """Ends the 'still compiling' lines (again: no effect)."""
    self._still.close()

  def done(self) -> float:
    self.stop()
    seconds = time.perf_counter() - self.start
    print(f'compiled {self.what} and ran the first step in {format_duration(seconds)}',
          flush=True)
    return seconds

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def progress_line(step: int, total: Optional[int], record: Dict[str, float],
                  extra: Iterable[str] = ()) -> str:
  """'step 120/300 | loss 3.412 | 0.52 s/step | ETA 1m34s' (+ MFU, skipped, extras)."""
  parts = [f'step {step}/{total}' if total else f'step {step}']
  if 'loss' in record:
    parts.append(f'loss {record["loss"]:.4g}')
  parts += [f'{k} {record[k]:.4g}' for k in extra if k in record]
  if 'step_time_s' in record:
    parts.append(f'{record["step_time_s"]:.3g} s/step')
    if total and step < total:
      parts.append(f'ETA {format_duration((total - step) * record["step_time_s"])}')
  if 'mfu' in record:
    parts.append(f'MFU {100 * record["mfu"]:.2g}%')
  if record.get('skipped_total'):
    parts.append(f'{int(record["skipped_total"])} skipped')
  return ' | '.join(parts)


def fold_bad_input(counts) -> list:
  """One line per problem, summed over tasks: '1,234 kept: text cropped to ...'.

  counts: bad_input.LOG.counts(), {(task, Problem): n}.
  """
  from mslam_jax.data import bad_input  # pylint: disable=g-import-not-at-top
  per_problem = collections.Counter()
  tasks = collections.defaultdict(set)
  for (task, problem), n in counts.items():
    per_problem[problem] += n
    tasks[problem].add(task)
  lines = []
  for problem in sorted(per_problem):
    verdict = 'kept' if problem in bad_input.KEPT else 'skipped'
    lines.append(f'{per_problem[problem]:,} {verdict}: {bad_input.MESSAGES[problem]} '
                 f'({len(tasks[problem])} tasks)')
  return lines
