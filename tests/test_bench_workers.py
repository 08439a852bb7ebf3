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
