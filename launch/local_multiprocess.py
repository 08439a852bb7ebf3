"""Runs N local CPU processes of one training command, as the hosts of a pod.

Tests multi-host behaviour (jax.distributed, per-host data, checkpoints that
every process writes) on one machine. Process i runs

  python -m MODULE ARGS --coordinator_address=localhost:PORT \
      --num_processes=N --process_id=i

with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=K,
so the job sees N * K devices in all. PORT is a free port picked at start. Each
output line is prefixed with `[i]`, and also written, unprefixed, to
LOG_DIR/process_i.log: --log_dir, or else a temporary directory that is
removed when every process succeeds and kept (and named) when one does not.

A watchdog ends the job when it cannot finish:
  * a process exits non-zero (or is killed by a signal);
  * the job stalls: for --stall_timeout_s seconds (default 600) no running
    process printed anything (a partial line counts) or was busy (used at
    least 5% of a CPU core, read from /proc). A silent XLA compile burns CPU,
    so it is progress; a process blocked on a peer that is compiling is
    waiting, not stalled, as long as the peer is busy. When the job stalls,
    the process that went quiet first is named, since in a collective job the
    others soon block waiting for it. A process spinning in a loop without
    printing counts as busy and is not caught; without /proc (not Linux) only
    output counts. --stall_timeout_s=0 turns the stall check off.
Then the others get SIGTERM, and SIGKILL after --grace_s, and the launcher
exits 1 with one line naming the process, what happened, its log and the
log's last line (for a Python error, the error itself). When all
exit 0 it exits 0; interrupted (Ctrl-C, SIGTERM) it stops them and exits 130.

Usage:
  .venv/bin/python launch/local_multiprocess.py --num_processes=2 \
      [--devices_per_process=4] [--module=mslam_jax.train] [--log_dir=DIR] \
      [--port=PORT] [--stall_timeout_s=600] [--grace_s=10] [--dry_run] -- \
      --gin_file=gin/pretrain_tiny_cpu.gin --gin.MODEL_DIR="'runs/two_hosts'"

Everything after `--` goes to MODULE unchanged. The processes inherit this
environment (PYTHONPATH, JAX_COMPILATION_CACHE_DIR, ...), apart from the two
variables above. --dry_run prints the N commands (a shell script that starts
them in the background) and runs nothing. Tests replace the worker with
--module=a helper module on PYTHONPATH (tests/test_launch.py).
"""

import argparse
import codecs
import dataclasses
import io
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from shell_words import join
from shell_words import split_passthrough

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# A process is busy when it used at least this share of one core since the
# last sample. An idle JAX process (a gloo collective waiting for its peer,
# coordination heartbeats) uses well under 1%; a compile, even on a machine
# oversubscribed 4x, about 25%.
BUSY_CPU_FRACTION = 0.05
CPU_SAMPLE_S = 5.0
POLL_S = 0.1
CLOCK_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog='Arguments after `--` are passed to MODULE unchanged.')
  parser.add_argument('--num_processes', type=int, required=True,
                      help='processes to start (the "hosts")')
  parser.add_argument('--devices_per_process', type=int, default=1,
                      help='fake CPU devices in each process (default %(default)s)')
  parser.add_argument('--module', default='mslam_jax.train',
                      help='module run with `python -m` (default %(default)s)')
  parser.add_argument('--python', default=sys.executable,
                      help='interpreter of the processes (default: this one)')
  parser.add_argument('--port', type=int,
                      help='coordinator port on localhost (default: a free one)')
  parser.add_argument('--log_dir',
                      help='write process_i.log files here (default: a temporary '
                      'directory, removed when all processes succeed)')
  parser.add_argument('--stall_timeout_s', type=float, default=600.0,
                      help='stop the job when no process printed anything or used '
                      'CPU for this long; generous because a big compile can be '
                      'silent (but busy) for minutes; 0: never (default %(default)s)')
  parser.add_argument('--grace_s', type=float, default=10.0,
                      help='after a failure, seconds the others get to exit on '
                      'SIGTERM before SIGKILL (default %(default)s)')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the commands and run nothing')
  args = parser.parse_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be >= 1')
  if args.stall_timeout_s < 0 or args.grace_s < 0:
    parser.error('--stall_timeout_s and --grace_s must be >= 0')
  return args


def free_port():
  """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env_updates(base_env, devices):
  """The variables each process gets on top of base_env."""
  # An inherited device count (run_tests.sh sets 8) would silently win or
  # conflict, so it is replaced rather than appended to.
  flags = [flag for flag in base_env.get('XLA_FLAGS', '').split()
           if not flag.startswith(DEVICE_COUNT_FLAG)]
  flags.append(f'{DEVICE_COUNT_FLAG}={devices}')
  return {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags)}


def commands(args, module_args, port):
  """One argv per process."""
  return [[args.python, '-m', args.module, *module_args,
           f'--coordinator_address=localhost:{port}',
           f'--num_processes={args.num_processes}', f'--process_id={i}']
          for i in range(args.num_processes)]


def describe_exit(code):
  if code < 0:
    try:
      return f'was killed by {signal.Signals(-code).name}'
    except ValueError:
      return f'was killed by signal {-code}'
  return f'exited with code {code}'


def group_cpu_seconds(pgids):
  """{pgid: CPU seconds used by the processes of that group}, from /proc.

  Whole groups, so that a worker that is a wrapper (a shell, a launcher of its
  own) is busy when its children are. Empty where /proc is missing (not Linux).
  """
  totals = {}
  try:
    entries = os.listdir('/proc')
  except OSError:
    return totals
  for entry in entries:
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat', 'rb') as f:
        stat = f.read()
    except OSError:  # exited meanwhile, or not ours to read
      continue
    # The command name (field 2) may hold spaces and parentheses; the fields
    # after its last ')' are: state ppid pgrp ... utime(14) stime cutime cstime.
    fields = stat[stat.rfind(b')') + 2:].split()
    try:
      pgrp = int(fields[2])
      if pgrp in pgids:
        ticks = sum(int(field) for field in fields[11:15])
        totals[pgrp] = totals.get(pgrp, 0.0) + ticks / CLOCK_TICKS
    except (IndexError, ValueError):
      continue
  return totals


@dataclasses.dataclass
class Failure:
  """Why the job cannot finish: process `index` failed or stalled."""
  index: int
  what: str  # e.g. 'exited with code 3', 'stalled: ...'
  stalled: bool = False


class Processes:
  """The running processes, their output pumps, the watchdog, and stopping them."""

  def __init__(self, env, log_dir):
    self.env = env
    self.log_dir = pathlib.Path(log_dir)
    self.procs = []
    self.pumps = []
    self.lock = threading.Lock()
    # Per process, monotonic times of the last output and the last busy CPU
    # sample; written by the pump threads and the watchdog, read by the watchdog.
    self.last_output = []
    self.last_busy = []
    self._cpu = {}  # pgid -> CPU seconds at the last sample
    self._cpu_sampled = None

  def log_path(self, i):
    return self.log_dir / f'process_{i}.log'

  def start(self, cmds):
    for i, cmd in enumerate(cmds):
      log = open(self.log_path(i), 'w', encoding='utf-8')
      # A session of its own per process, so stopping it also stops anything it
      # started, and a terminal Ctrl-C reaches only the launcher, which then
      # stops them in order.
      try:
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, bufsize=0)
      except OSError:
        log.close()
        raise
      now = time.monotonic()
      self.last_output.append(now)
      self.last_busy.append(now)
      pump = threading.Thread(target=self._pump, args=(i, proc.stdout, log), daemon=True)
      pump.start()
      self.procs.append(proc)
      self.pumps.append(pump)

  def _pump(self, i, stream, log):
    """Copies process i's output to stdout (prefixed) and its log, line by line.

    Reads raw chunks rather than lines, so that output without a newline (a
    progress bar) still counts as a sign of life. Newlines are translated as in
    text mode (\\r and \\r\\n become \\n), as the launcher always did.
    """
    decoder = io.IncrementalNewlineDecoder(
        codecs.getincrementaldecoder('utf-8')(errors='replace'), translate=True)
    pending = ''
    fd = stream.fileno()
    try:
      while True:
        chunk = os.read(fd, 65536)
        if chunk:
          self.last_output[i] = time.monotonic()
        pending += decoder.decode(chunk, final=not chunk)
        *lines, pending = pending.split('\n')
        if not chunk and pending:
          lines.append(pending)
        if lines:
          text = ''.join(f'{line}\n' for line in lines)
          with self.lock:
            sys.stdout.write(''.join(f'[{i}] {line}\n' for line in lines))
            sys.stdout.flush()
          log.write(text)
          log.flush()
        if not chunk:
          return
    except OSError:
      return
    finally:
      stream.close()
      log.close()

  def _sample_cpu(self, now, interval):
    """Marks as busy the processes that used enough CPU since the last sample."""
    if self._cpu_sampled is not None and now - self._cpu_sampled < interval:
      return
    pgids = {proc.pid: i for i, proc in enumerate(self.procs)}
    cpu = group_cpu_seconds(set(pgids))
    if self._cpu_sampled is not None:
      elapsed = now - self._cpu_sampled
      for pgid, seconds in cpu.items():
        # A member that exits unreaped takes its time along: a drop is no work.
        if seconds - self._cpu.get(pgid, seconds) >= BUSY_CPU_FRACTION * elapsed:
          self.last_busy[pgids[pgid]] = now
    self._cpu, self._cpu_sampled = cpu, now

  def watch(self, stall_timeout_s):
    """Waits until all exit 0 (returns None), or one fails or the job stalls (a Failure)."""
    while True:
      codes = [proc.poll() for proc in self.procs]
      for i, code in enumerate(codes):
        if code is not None and code != 0:
          return Failure(i, describe_exit(code))
      running = [i for i, code in enumerate(codes) if code is None]
      if not running:
        return None
      if stall_timeout_s:
        now = time.monotonic()
        # Several samples per timeout, so a busy process is seen as busy in time.
        self._sample_cpu(now, min(CPU_SAMPLE_S, stall_timeout_s / 4))
        last = {i: max(self.last_output[i], self.last_busy[i]) for i in running}
        if now - max(last.values()) > stall_timeout_s:
          # Collectives make the others wait for a hung process, so the one
          # that went quiet first is the likeliest cause.
          quiet = min(running, key=lambda i: (last[i], i))
          n = len(running) - 1
          others = ('' if not n else f', nor did the {n} other running '
                    f'process{"es" if n > 1 else ""} for {now - max(last.values()):.0f} s')
          return Failure(quiet, f'stalled: no output and no CPU use for '
                         f'{now - last[quiet]:.0f} s{others}', stalled=True)
      time.sleep(POLL_S)

  def _signal(self, proc, sig):
    try:
      os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
      pass

  def stop(self, grace_s):
    """SIGTERM to those still running, SIGKILL to those still running after grace_s."""
    running = [proc for proc in self.procs if proc.poll() is None]
    for proc in running:
      self._signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in running:
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self._signal(proc, signal.SIGKILL)
        proc.wait()

  def drain(self):
    # Output still in the pipes is printed before the launcher's last word.
    for pump in self.pumps:
      pump.join(timeout=5)


def failure_message(failure, args, cmds, log):
  """The launcher's one line about a failure: which process, what, its log, the fix."""
  if failure.stalled:
    return (f'[local] error: process {failure.index} {failure.what}; stopped all '
            f'processes; its log: {log}. If it was only slow (a long silent '
            f'compile?), raise --stall_timeout_s (now {args.stall_timeout_s:g}; '
            '0 turns the check off)')
  return (f'[local] error: process {failure.index} {failure.what}; stopped the others; '
          f'its log: {log} (command: {join(cmds[failure.index])}); its last line: '
          f'{last_line(log)}')


def last_line(log, limit=300):
  """The last non-blank line of a log (a traceback ends with its error), cut to `limit`."""
  try:
    lines = pathlib.Path(log).read_text(errors='replace').splitlines()
  except OSError as e:
    return f'(unreadable: {e})'
  line = next((l.strip() for l in reversed(lines) if l.strip()), '(empty)')
  return line if len(line) <= limit else line[:limit] + '...'


def main(argv=None):
  own, module_args = split_passthrough(sys.argv[1:] if argv is None else argv)
  args = parse_args(own)
  port = args.port or free_port()
  cmds = commands(args, module_args, port)
  updates = process_env_updates(os.environ, args.devices_per_process)
  if args.dry_run:
    env_words = ['env'] + [f'{name}={value}' for name, value in updates.items()]
    for i, cmd in enumerate(cmds):
      print(f'# process {i}')
      print(join(env_words + cmd) + ' &')
    print('wait')
    return 0
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)
    log_dir = args.log_dir
  else:
    log_dir = tempfile.mkdtemp(prefix='local_multiprocess_')
  # Python buffers a pipe in blocks; unbuffered, lines of the processes
  # interleave as they happen (and the watchdog sees them).
  env = {**os.environ, **updates, 'PYTHONUNBUFFERED': '1'}
  print(f'[local] {args.num_processes} processes x {args.devices_per_process} CPU '
        f'devices, coordinator localhost:{port}, logs in {log_dir}',
        file=sys.stderr, flush=True)

  def on_sigterm(signum, frame):
    del signum, frame
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_sigterm)
  processes = Processes(env, log_dir)
  try:
    processes.start(cmds)
    failure = processes.watch(args.stall_timeout_s)
  except OSError as e:  # e.g. a --python that does not exist
    processes.stop(args.grace_s)
    print(f'[local] error: cannot start the processes: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    processes.stop(args.grace_s)
    processes.drain()
    print(f'[local] interrupted: stopped all processes; logs in {log_dir}',
          file=sys.stderr)
    return 130
  processes.stop(args.grace_s)
  processes.drain()
  if failure is None:
    if not args.log_dir:
      shutil.rmtree(log_dir, ignore_errors=True)
    return 0
  print(failure_message(failure, args, cmds, processes.log_path(failure.index)),
        file=sys.stderr, flush=True)
  return 1


if __name__ == '__main__':
  sys.exit(main())
