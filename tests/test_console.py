"""The 'still compiling' lines: printed while a long compile runs, never after it ended."""

import re
import threading
import time

import pytest

from mslam_jax import console


def heartbeat_threads():
  return [t for t in threading.enumerate() if t.name == 'still-working']


def test_still_working_prints_at_its_interval_and_stops_with_the_block(capsys):
  with console.still_working('compiling', every_s=0.1):
    time.sleep(0.55)
  time.sleep(0.3)  # a line after the block would show up here
  lines = capsys.readouterr().out.splitlines()
  # 5 ticks in 0.55 s; a loaded machine may run the thread late, not early.
  assert 1 <= len(lines) <= 5, lines
  assert all(re.fullmatch(r'still compiling: [01]s so far', line) for line in lines), lines
  assert not heartbeat_threads()


def test_still_working_stops_when_the_block_raises(capsys):
  with pytest.raises(RuntimeError, match='compile failed'):
    with console.still_working('compiling', every_s=0.05):
      raise RuntimeError('compile failed')
  time.sleep(0.2)
  assert capsys.readouterr().out == ''
  assert not heartbeat_threads()


def test_compiling_lines_stop_at_done_and_when_the_step_raises(capsys):
  compiling = console.Compiling(every_s=0.1)
  time.sleep(0.35)
  seconds = compiling.done()
  compiling.stop()  # again: nothing more happens
  time.sleep(0.3)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == 'compiling the train step (the first step includes it)...'
  assert lines[-1] == 'compiled the train step and ran the first step in 0s'
  assert lines[1:-1] and all(re.fullmatch(r'still compiling the train step: [01]s so far', l)
                             for l in lines[1:-1]), lines
  assert 0.35 <= seconds < 60
  # The trainer enters it as a context: an error in the first step ends the lines.
  with pytest.raises(ValueError):
    with console.Compiling(every_s=0.05):
      raise ValueError('bad batch')
  assert not heartbeat_threads()


def test_minute_lines_read_as_durations():
  assert [console.format_duration(s) for s in (0.4, 59.6, 61, 3725)] == [
      '0s', '1m00s', '1m01s', '1h02m']
