"""Benchmark workers: one subprocess per contender, stepped in alternation by the parent.

A worker prints one JSON line when ready and one per command it is sent on
stdin. Running each contender in its own process keeps their thread pools and
allocators apart; asking them for one measurement at a time, with the order
reversed every round (ABBA), gives all of them the same machine load, which on a
shared machine moves by tens of per cent within minutes.
"""

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

from mslam_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reply(**fields) -> None:
  """Worker side: one JSON line to the parent."""
  sys.stdout.write(json.dumps(fields) + '\n')
  sys.stdout.flush()


def timed(step: Callable[[], None], faults: List[int]) -> float:
  """Worker side: runs `step`; appends its minor page faults to `faults`, returns its seconds.

  Memory mapped afresh is faulted in page by page, so the count shows a buffer
  allocated anew at every step (mslam_jax/host_memory.py).
  """
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  begin = time.perf_counter()
  step()
  seconds = time.perf_counter() - begin
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return seconds


class Worker:
  """Parent side: `python argv...` in `root` (a checkout; its mslam_jax is the one imported).

  Every worker, whatever its framework, runs with the host allocator of this
  checkout's entry points (`mslam_jax.host_memory`: mimalloc where installed)
  unless `malloc` names another setting (one of host_memory.CHOICES; 'system'
  gives glibc's defaults). `ready` holds the worker's first reply.

  The worker's stderr (the libraries' start-up logs: TensorFlow's, XLA's)
  goes to a file, not to the console; when the worker fails, its last lines
  and the file's path are in the error.
  """

  def __init__(self, name: str, argv: Sequence[str], root: str = REPO_ROOT, env=None,
               malloc: Optional[str] = None):
    self.name = name
    self.stderr = tempfile.NamedTemporaryFile(  # pylint: disable=consider-using-with
        mode='w+', prefix='worker_', suffix='.log', delete=False)
    # JAX on the CPU unless `env` names another platform (side_by_side.py --device gpu).
    env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu', **(env or {})}
    for key in ('GLIBC_TUNABLES', 'LD_PRELOAD', host_memory.VARIABLE):
      env.pop(key, None)
    env.update(host_memory.environment(malloc, base=env))
    env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
    self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                 env=env, cwd=root)
    self.ready = self._read()

  def _read(self) -> Dict:
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      self.stderr.seek(0)
      tail = ''.join(self.stderr.readlines()[-20:])
      raise RuntimeError(f'worker {self.name} exited (code {code}); the end of its stderr '
                         f'({self.stderr.name}):\n{tail}')
    return json.loads(line)

  def ask(self, command: str) -> Dict:
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    with contextlib.suppress(BrokenPipeError):
      self.proc.stdin.write('quit\n')
      self.proc.stdin.flush()
    self.proc.wait()
    self.stderr.close()
    os.unlink(self.stderr.name)


def median_faults(workers: List[Worker]) -> Dict[str, float]:
  """Each worker's median page faults per step (its reply to 'faults', counted by `timed`)."""
  return {w.name: w.ask('faults')['faults'] for w in workers}


def alternate(workers: List[Worker], command: str, rounds: int) -> Dict[str, List[float]]:
  """`rounds` replies' 'seconds' per worker; the order is reversed every round (ABBA)."""
  times = {w.name: [] for w in workers}
  for r in range(rounds):
    for w in (workers if r % 2 == 0 else workers[::-1]):
      times[w.name].append(w.ask(command)['seconds'])
  return times


def paired_ratios(values: Sequence[float], reference: Sequence[float]) -> List[float]:
  """values[i] / reference[i], round by round, for two workers timed in the same rounds.

  A shared machine's load drifts over a run and moves both members of a
  round together: the ratio within each round cancels that drift, where the
  ratio of the two medians mixes minutes of different load.
  """
  if len(values) != len(reference):
    raise ValueError(f'paired_ratios: {len(values)} values against {len(reference)} '
                     'reference values; both must come from the same rounds')
  return [v / r for v, r in zip(values, reference)]


def ratio_summary(ratios: Sequence[float]) -> str:
  """'0.93x (0.85-0.99)': the median and range of `paired_ratios`' ratios; '0.93x' for one."""
  if len(ratios) == 1:
    return f'{ratios[0]:.2f}x'
  return f'{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})'


def ms_cell(seconds: Sequence[float], reference: Optional[Sequence[float]] = None) -> str:
  """'12.3 (11.9-14.0)': the median and range of `seconds` in ms; with `reference` (the same
  rounds of another worker) '; ' and `ratio_summary` of the per-round ratios to it."""
  cell = f'{statistics.median(seconds) * 1e3:.1f} ({min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f})'
  if reference is not None:
    cell += f'; {ratio_summary(paired_ratios(seconds, reference))}'
  return cell


def entry_point_malloc(root: str) -> Optional[str]:
  """The host allocator setting the entry points of the checkout at `root` ran with.

  'system' (glibc's defaults) before mslam_jax/host_memory.py existed,
  'hugepages' while it knew only glibc's huge pages, None (this checkout's
  choice) since. A revision is measured as its entry points ran it.
  """
  path = os.path.join(root, 'mslam_jax', 'host_memory.py')
  if not os.path.exists(path):
    return 'system'
  with open(path, encoding='utf-8') as f:
    return None if 'mimalloc' in f.read() else 'hugepages'


@contextlib.contextmanager
def worktree(rev: str):
  """A temporary checkout of git revision `rev` (git worktree), removed afterwards."""
  path = tempfile.mkdtemp(prefix=f'mslam_{rev}_')
  subprocess.run(['git', 'worktree', 'add', '--detach', path, rev], cwd=REPO_ROOT, check=True,
                 capture_output=True)
  try:
    yield path
  finally:
    subprocess.run(['git', 'worktree', 'remove', '--force', path], cwd=REPO_ROOT, check=False,
                   capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def current_tree():
  """This checkout as it is, in a worktree like the others.

  HEAD, then the uncommitted changes to tracked files, then the untracked
  files git does not ignore (new modules not yet added).
  """
  with worktree('HEAD') as path:
    diff = subprocess.run(['git', 'diff', 'HEAD', '--binary'], cwd=REPO_ROOT,
                          capture_output=True, check=True).stdout
    if diff:
      subprocess.run(['git', 'apply', '--whitespace=nowarn'], input=diff, cwd=path, check=True)
    untracked = subprocess.run(['git', 'ls-files', '--others', '--exclude-standard', '-z'],
                               cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, untracked.decode().split('\0')):
      os.makedirs(os.path.dirname(os.path.join(path, name)) or path, exist_ok=True)
      shutil.copy2(os.path.join(REPO_ROOT, name), os.path.join(path, name))
    yield path


@contextlib.contextmanager
def revision_workers(command: Sequence[str], baselines: Sequence[str], *, env=None,
                     started: str = 'ready'):
  """One Worker running `command` per revision: 'this checkout' (`current_tree`) first,
  then each git revision of `baselines` in its own worktree, named by it. Prints
  '<name>: <started>' as each comes up; closes them all, and removes the trees, on exit."""
  with contextlib.ExitStack() as stack:
    roots = {'this checkout': stack.enter_context(current_tree())}
    for rev in baselines:
      roots[rev] = stack.enter_context(worktree(rev))
    workers = []
    try:
      for name, root in roots.items():
        workers.append(Worker(name, command, root=root, env=env))
        print(f'{name}: {started}', flush=True)
      yield workers
    finally:
      for w in workers:
        w.close()
