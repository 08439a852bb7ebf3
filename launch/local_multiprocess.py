"""Runs N local CPU processes of one training command, as the hosts of a pod.

Tests multi-host behaviour (jax.distributed, per-host data, checkpoints that
every process writes) on one machine. Process i runs

  python -m MODULE ARGS --coordinator_address=localhost:PORT \
      --num_processes=N --process_id=i

with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=K,
so the job sees N * K devices in all. PORT is a free port picked at start. Each
output line is prefixed with `[i]` (and also written, unprefixed, to
LOG_DIR/process_i.log with --log_dir). When a process fails, the others are
stopped and the launcher exits non-zero naming it.

Usage:
  .venv/bin/python launch/local_multiprocess.py --num_processes=2 \
      [--devices_per_process=4] [--module=mslam_jax.train] [--log_dir=DIR] \
      [--port=PORT] [--dry_run] -- \
      --gin_file=gin/pretrain_tiny_cpu.gin --gin.MODEL_DIR="'runs/two_hosts'"

Everything after `--` goes to MODULE unchanged. The processes inherit this
environment (PYTHONPATH, JAX_COMPILATION_CACHE_DIR, ...), apart from the two
variables above. --dry_run prints the N commands (a shell script that starts
them in the background) and runs nothing.
"""

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from shell_words import join
from shell_words import split_passthrough

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


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
  parser.add_argument('--log_dir', help='also write process_i.log files here')
  parser.add_argument('--grace_s', type=float, default=10.0,
                      help='after a failure, seconds the others get to exit on '
                      'SIGTERM before SIGKILL (default %(default)s)')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the commands and run nothing')
  args = parser.parse_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be >= 1')
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


class Processes:
  """The running processes, their output pumps, and stopping them."""

  def __init__(self, env, log_dir):
    self.env = env
    self.log_dir = log_dir
    self.procs = []
    self.pumps = []
    self.lock = threading.Lock()

  def start(self, cmds):
    for i, cmd in enumerate(cmds):
      log = None
      if self.log_dir:
        log = open(pathlib.Path(self.log_dir) / f'process_{i}.log', 'w', encoding='utf-8')
      # A session of its own per process, so stopping it also stops anything it
      # started, and a terminal Ctrl-C reaches only the launcher, which then
      # stops them in order.
      proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True, text=True, errors='replace',
                              bufsize=1)
      pump = threading.Thread(target=self._pump, args=(i, proc.stdout, log), daemon=True)
      pump.start()
      self.procs.append(proc)
      self.pumps.append(pump)

  def _pump(self, i, stream, log):
    try:
      for line in stream:
        if not line.endswith('\n'):
          line += '\n'
        with self.lock:
          sys.stdout.write(f'[{i}] {line}')
          sys.stdout.flush()
        if log:
          log.write(line)
          log.flush()
    finally:
      stream.close()
      if log:
        log.close()

  def wait(self):
    """Waits until all exit 0 (returns None) or one fails (returns its index)."""
    while True:
      codes = [proc.poll() for proc in self.procs]
      for i, code in enumerate(codes):
        if code is not None and code != 0:
          return i
      if all(code == 0 for code in codes):
        return None
      time.sleep(0.05)

  def _signal(self, proc, sig):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
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
  # Python buffers a pipe in blocks; unbuffered, lines of the processes
  # interleave as they happen.
  env = {**os.environ, **updates, 'PYTHONUNBUFFERED': '1'}
  print(f'[local] {args.num_processes} processes x {args.devices_per_process} CPU '
        f'devices, coordinator localhost:{port}', file=sys.stderr, flush=True)

  def on_sigterm(signum, frame):
    del signum, frame
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_sigterm)
  processes = Processes(env, args.log_dir)
  try:
    processes.start(cmds)
    failed = processes.wait()
  except OSError as e:  # e.g. a --python that does not exist
    processes.stop(args.grace_s)
    print(f'[local] error: cannot start the processes: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    processes.stop(args.grace_s)
    processes.drain()
    print('[local] interrupted: stopped all processes', file=sys.stderr)
    return 130
  if failed is None:
    processes.drain()
    return 0
  code = processes.procs[failed].returncode
  processes.stop(args.grace_s)
  processes.drain()
  print(f'[local] error: process {failed} {describe_exit(code)}; stopped the others '
        f'(command: {join(cmds[failed])})', file=sys.stderr)
  return 1


if __name__ == '__main__':
  sys.exit(main())
