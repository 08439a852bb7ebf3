"""benchmarks/workers.py: a worker's library noise stays off the console; a failure shows it."""

import os

import pytest

import workers  # benchmarks/workers.py (tests/conftest.py puts benchmarks/ on the path)

WORKER = '''
import json, sys
print('I0000 some library start-up line', file=sys.stderr, flush=True)
print(json.dumps({'ready': True}), flush=True)
for line in sys.stdin:
  if line.strip() == 'quit':
    break
  if line.strip() == 'fail':
    print('Traceback (most recent call last):', file=sys.stderr)
    print('ValueError: the worker broke', file=sys.stderr, flush=True)
    sys.exit(3)
  print(json.dumps({'seconds': 0.5}), flush=True)
'''


def test_a_worker_answers_with_its_stderr_kept_off_the_console(tmp_path, capfd):
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  worker = workers.Worker('w', [str(script)], root=str(tmp_path), malloc='system')
  assert worker.ready == {'ready': True}
  assert workers.alternate([worker], 'step', rounds=2) == {'w': [0.5, 0.5]}
  log = worker.stderr.name
  worker.close()
  assert 'start-up line' not in capfd.readouterr().err
  assert not os.path.exists(log)


def test_a_failed_worker_raises_with_the_end_of_its_stderr(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  worker = workers.Worker('w', [str(script)], root=str(tmp_path), malloc='system')
  with pytest.raises(RuntimeError, match=r'(?s)worker w exited \(code 3\).*the worker broke'):
    worker.ask('fail')
  os.unlink(worker.stderr.name)  # kept for the user to read; named in the error


def test_paired_ratios_are_taken_round_by_round():
  """The per-round ratio against numpy; it cancels a drift that the ratio of medians keeps."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  # Launch-to-first-step seconds of two revisions, five alternated rounds
  # under a load that rose over the run (benchmarks/RESULTS.md, 2026-12-04).
  ours = [22.7, 23.3, 29.2, 28.9, 27.8]
  theirs = [26.8, 25.0, 29.4, 33.2, 28.7]
  ratios = workers.paired_ratios(ours, theirs)
  np.testing.assert_allclose(ratios, np.array(ours) / np.array(theirs))
  median = float(np.median(np.array(ours) / np.array(theirs)))
  assert workers.ratio_summary(ratios) == (
      f'{median:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})')
  assert workers.ratio_summary(ratios).startswith('0.93x (0.85-0.99)')
  # Every round faster, while the medians say 0.97: the drift between rounds.
  assert float(np.median(ours) / np.median(theirs)) == pytest.approx(0.969, abs=1e-3)
  # A constant ratio survives any drift exactly.
  drift = [1.0, 1.7, 3.2, 2.1]
  assert workers.paired_ratios([1.1 * d for d in drift], drift) == pytest.approx([1.1] * 4)
  assert workers.ratio_summary(workers.paired_ratios([2.0], [4.0])) == '0.50x'
  with pytest.raises(ValueError, match='same rounds'):
    workers.paired_ratios([1.0, 2.0], [1.0])


def test_a_table_cell_gives_the_median_range_and_per_round_ratio_in_ms():
  ours, theirs = [0.010, 0.012, 0.011], [0.020, 0.030, 0.022]
  assert workers.ms_cell(ours) == '11.0 (10.0-12.0)'
  # Per round: 2.0, 2.5, 2.0 -> median 2.0, range 2.0-2.5.
  assert workers.ms_cell(theirs, ours) == '22.0 (20.0-30.0); 2.00x (2.00-2.50)'
