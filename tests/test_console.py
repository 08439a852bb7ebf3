"""The 'still compiling' lines: printed while a long compile runs, never after it ended."""

import re
import threading
import time

import pytest

from mslam_jax import console


def heartbeat_threads():
  return [t for t in threading.enumerate() if t.name == 'still-working']


def wait_for_lines(capsys, n, timeout_s=60.0):
  """The lines printed until there are at least n (a loaded machine runs the thread late)."""
  lines, deadline = [], time.monotonic() + timeout_s
  while len(lines) < n and time.monotonic() < deadline:
    time.sleep(0.05)
    lines += capsys.readouterr().out.splitlines()
  return lines


def test_still_working_prints_at_its_interval_and_stops_with_the_block(capsys):
  start = time.monotonic()
  with console.still_working('compiling', every_s=0.1):
    lines = wait_for_lines(capsys, 3)
  elapsed = time.monotonic() - start
  time.sleep(0.3)  # a line after the block would show up here
  lines += capsys.readouterr().out.splitlines()
  # One line per interval at most: never early, perhaps late.
  assert 3 <= len(lines) <= elapsed / 0.1 + 1, (lines, elapsed)
  assert all(re.fullmatch(r'still compiling: \ds so far', line) for line in lines), lines
  assert not heartbeat_threads()


def test_still_working_stops_when_the_block_raises():
  start = time.monotonic()
  with pytest.raises(RuntimeError, match='compile failed'):
    with console.still_working('compiling', every_s=600):
      raise RuntimeError('compile failed')
  # The thread is woken and joined, not left waiting out its 600 s.
  assert not heartbeat_threads() and time.monotonic() - start < 60


def test_compiling_lines_stop_at_done_and_when_the_step_raises(capsys):
  compiling = console.Compiling(every_s=0.1)
  lines = wait_for_lines(capsys, 2)  # the first line, then one 'still compiling'
  seconds = compiling.done()
  compiling.stop()  # again: nothing more happens
  time.sleep(0.3)
  lines += capsys.readouterr().out.splitlines()
  assert lines[0] == 'compiling the train step (the first step includes it)...'
  assert re.fullmatch(r'compiled the train step and ran the first step in \ds', lines[-1])
  assert lines[1:-1] and all(re.fullmatch(r'still compiling the train step: \ds so far', l)
                             for l in lines[1:-1]), lines
  assert 0.1 <= seconds < 60
  # The trainer enters it as a context: an error in the first step ends the lines.
  with pytest.raises(ValueError):
    with console.Compiling(every_s=600):
      raise ValueError('bad batch')
  assert not heartbeat_threads()


def test_minute_lines_read_as_durations():
  assert [console.format_duration(s) for s in (0.4, 59.6, 61, 3725)] == [
      '0s', '1m00s', '1m01s', '1h02m']
