"""The launchers: tpu_pod.py's commands (dry run, no gcloud) and local_multiprocess.py's processes.

tpu_pod.py is only run with --dry_run, without gcloud on PATH, or with a fake
gcloud that records its arguments, so nothing here touches the network; the
scripts it would run on the workers are run here by bash, on a fake worker (a
fake `curl` and training command). --check_fit compiles for a TPU slice for
real (libtpu, as in test_compile.py). The
local_multiprocess.py tests start real processes: small helper modules
written into tmp_path, and one 2-process jax.distributed run. Time limits
are loose (the machine may be oversubscribed): they only tell "stopped by
the launcher" from "ran until its hour-long sleep ended".
"""

import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from libtpu_env import with_libtpu
import shell_words  # launch/ (tests/conftest.py puts it on the path)
import tpu_pod

REPO = pathlib.Path(__file__).resolve().parents[1]

LIBTPU_FIND_LINKS = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
# Words a shell or a gin parser would mangle if any quoting level were wrong.
OVERRIDES = ['--gin.TRAIN_STEPS=100', '--gin.MESH_SHAPE=(4, 2, 2)',
             '--gin.TrainConfig.log_every=10',
             '--gin.NOTE="it\'s a $HOME `test` \\ !"', '--task_module=tasks/my_lang.py']


def launch(script, *args, env=None, timeout=900):
  return subprocess.run([sys.executable, str(REPO / 'launch' / script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)


def bash_words(line):
  """How bash splits a line into words (the ground truth shlex.split imitates)."""
  out = subprocess.run(['bash', '-c', 'eval "set -- $1"; printf "%s\\0" "$@"', '_', line],
                       capture_output=True, text=True, check=True).stdout
  return out.split('\0')[:-1]


def commands_of(stdout):
  """The dry run's command lines as word lists; each line must parse back exactly."""
  commands = []
  for line in stdout.splitlines():
    if line.startswith('#'):
      continue
    words = shlex.split(line)
    assert shell_words.join(words) == line
    assert bash_words(line) == words, line
    commands.append(words)
  return commands


def remote_script(cmd):
  """The --command= script of a `gcloud ... ssh --worker=all` command."""
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod'], cmd
  assert '--worker=all' in cmd
  [script] = [word[len('--command='):] for word in cmd if word.startswith('--command=')]
  return script


def train_words_of(script):
  """The training command line inside a start script, as bash would read it."""
  start = script.index('mslam_jax-train "$L" ') + len('mslam_jax-train "$L" ')
  return script[start:script.index(' >> "$LOG"', start)]


def pinned_jax():
  [version] = re.findall(r'^jax==(\S+)$', (REPO / 'constraints.txt').read_text(), re.M)
  return version


def test_tpu_pod_dry_run_prints_create_copy_setup_and_train_on_all_workers():
  result = launch('tpu_pod.py', '--name=pod', '--zone=us-central2-b', '--project=proj',
                  '--spot', '--gin_file=gin/pretrain_0.6b.gin',
                  '--gin_file=gin/variants/mslam_ctc.gin', '--model_dir=gs://bucket/run',
                  '--dry_run', '--', *OVERRIDES)
  assert result.returncode == 0, result.stderr
  assert 'MODEL_DIR' not in result.stderr
  titles = [line for line in result.stdout.splitlines() if line.startswith('#')]
  assert [t.split()[2] for t in titles] == ['create', 'copy', 'set', 'train']
  create, archive, scp, unpack, setup, train = commands_of(result.stdout)
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod',
                    '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base',
                    '--zone=us-central2-b', '--project=proj', '--spot']
  assert archive[:4] == ['git', '-C', str(REPO), 'archive'] and archive[-1] == 'HEAD'
  tarball = archive[archive.index('-o') + 1]
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5] == tarball and '--worker=all' in scp
  assert 'tar -xzf' in remote_script(unpack)
  setup_words = shlex.split(remote_script(setup))
  assert 'launch/setup_venv.sh' in setup_words
  assert f'jax[tpu]=={pinned_jax()}' in setup_words
  assert setup_words[setup_words.index('-f') + 1] == LIBTPU_FIND_LINKS
  # The command each worker runs, word for word: the gin files, MODEL_DIR as a
  # gin string, and every override exactly as given after `--`.
  train_argv = ['.venv/bin/python', '-m', 'mslam_jax.train',
                '--gin_file=gin/pretrain_0.6b.gin', '--gin_file=gin/variants/mslam_ctc.gin',
                "--gin.MODEL_DIR='gs://bucket/run'", *OVERRIDES]
  script = remote_script(train)
  assert bash_words(train_words_of(script)) == train_argv
  # Detached, in the checkout, output appended to this worker's own log.
  assert 'cd mslam_jax || exit 1; nohup setsid bash -c ' in script
  assert '>> "$LOG" 2>&1 < /dev/null &' in script
  assert 'LOG="$L/worker_$W.log"' in script and 'agent-worker-number' in script
  assert 'L=$(mkdir -p mslam_jax_logs && cd mslam_jax_logs && pwd)' in script
  # How to watch and stop it is said, on stderr (stdout stays a script).
  assert 'tpu_pod.py logs --name=pod --zone=us-central2-b --project=proj --follow' in result.stderr
  assert 'tpu_pod.py stop --name=pod' in result.stderr


def test_tpu_pod_dry_run_from_a_repo_url_then_delete():
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--skip_create', '--delete_after',
                  '--repo_url=https://example.com/me/mslam_jax.git', '--git_ref=v1.0',
                  '--gin_file=gin/pretrain_2b.gin', '--dry_run', '--',
                  "--gin.MODEL_DIR='gs://b/2b'")
  assert result.returncode == 0, result.stderr
  clone, setup, train, wait, delete = commands_of(result.stdout)
  clone_script = remote_script(clone)
  assert 'git clone --quiet https://example.com/me/mslam_jax.git mslam_jax' in clone_script
  assert 'fetch --quiet origin v1.0' in clone_script
  assert 'setup_venv.sh' in remote_script(setup)
  assert shlex.split(train_words_of(remote_script(train)))[-2:] == [
      '--gin_file=gin/pretrain_2b.gin', "--gin.MODEL_DIR='gs://b/2b'"]
  # Training is detached, so the VM is deleted only after `wait` returns.
  assert wait == [sys.executable, str(REPO / 'launch' / 'tpu_pod.py'), 'wait', '--name=pod',
                  '--zone=z', '--remote_log_dir=mslam_jax_logs', '--poll_s=60']
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod', '--quiet',
                    '--zone=z']
  assert 'MODEL_DIR' not in result.stderr


@pytest.mark.parametrize('model_dir_args', [
    ['--model_dir=runs/local'],
    ['--model_dir=gs://bucket/run', '--', "--gin.MODEL_DIR='/tmp/local'"],  # last one wins
])
def test_tpu_pod_warns_when_model_dir_is_not_on_gcs(model_dir_args):
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--gin_file=gin/pretrain_0.6b.gin',
                  '--dry_run', *model_dir_args)
  assert result.returncode == 0, result.stderr
  [warning] = [line for line in result.stderr.splitlines() if 'MODEL_DIR' in line]
  assert warning.startswith('warning:') and '--model_dir=gs://' in warning


def test_tpu_pod_without_model_dir_refuses_to_launch():
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--gin_file=gin/pretrain_0.6b.gin',
                  '--dry_run')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert 'error: no MODEL_DIR given: pass --model_dir=gs://BUCKET/RUN' in result.stderr


def test_tpu_pod_without_gcloud_names_the_fix(tmp_path):
  env = {**os.environ, 'PATH': str(tmp_path)}  # an empty directory: no gcloud
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--gin_file=gin/pretrain_0.6b.gin',
                  '--model_dir=gs://b/r', env=env)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert 'gcloud (the Google Cloud CLI) is not on PATH' in result.stderr
  assert 'https://cloud.google.com/sdk/docs/install' in result.stderr
  assert '--dry_run' in result.stderr
  assert not result.stdout


@pytest.mark.parametrize('accelerator_type, version_args, version', [
    ('v5p-128', [], 'v2-alpha-tpuv5'), ('v5litepod-256', [], 'v2-alpha-tpuv5-lite'),
    ('v6e-16', [], 'v2-alpha-tpuv6e'), ('v4-8', [], 'tpu-ubuntu2204-base'),
    ('v5p-128', ['--version=my-runtime'], 'my-runtime')])
def test_tpu_pod_picks_the_runtime_of_the_slices_generation(accelerator_type, version_args,
                                                            version):
  args = tpu_pod.parse_args(['--name=pod', '--zone=z', f'--accelerator_type={accelerator_type}',
                             *version_args, '--gin_file=gin/pretrain_0.6b.gin'])
  create = tpu_pod.Plan(args, []).create()
  assert create[5:8] == ['pod', f'--accelerator-type={accelerator_type}', f'--version={version}']


def test_tpu_pod_asks_for_the_runtime_of_a_generation_it_does_not_know():
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--accelerator_type=v9x-8',
                  '--gin_file=gin/pretrain_0.6b.gin', '--model_dir=gs://b/r', '--dry_run')
  assert result.returncode == 1 and not result.stdout
  assert result.stderr.strip().endswith(
      "error: --accelerator_type=v9x-8: no default --version for 'v9x' (known: v4, v5litepod, "
      'v5p, v6e); pass --version=RUNTIME')


def test_tpu_pod_dry_run_with_check_fit_compiles_for_the_slice_first():
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--accelerator_type=v4-128',
                  '--gin_file=gin/pretrain_0.6b.gin', '--gin_file=gin/variants/mslam_ctc.gin',
                  '--model_dir=gs://b/r', '--check_fit', '--dry_run', '--', *OVERRIDES)
  assert result.returncode == 0, result.stderr
  titles = [line for line in result.stdout.splitlines() if line.startswith('#')]
  assert titles[0] == '# 1. check that the step fits v4-128 (a compile on this machine)'
  assert [t.split()[2] for t in titles[1:]] == ['create', 'copy', 'set', 'train']
  check = commands_of(result.stdout)[0]
  venv_python = REPO / '.venv' / 'bin' / 'python'
  # The step training would run: the same gin files and --gin. overrides (not
  # --task_module, a flag of mslam_jax.train), compiled with .venv's python.
  assert check == [str(venv_python) if venv_python.exists() else sys.executable,
                   '-m', 'mslam_jax.compile', '--gin_file=gin/pretrain_0.6b.gin',
                   '--gin_file=gin/variants/mslam_ctc.gin', '--topology=v4-128',
                   *[arg for arg in OVERRIDES if arg.startswith('--gin.')]]


def test_tpu_pod_check_fit_stops_before_the_vm_is_created_unless_the_step_fits(tmp_path):
  """A real XLA:TPU compile for 4 v5e chips (libtpu), then a fake gcloud that logs its calls."""
  env = with_libtpu({k: v for k, v in os.environ.items()
                     if k not in ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL')})
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'gcloud_calls'
  (bin_dir / 'gcloud').write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(calls))}\n')
  (bin_dir / 'gcloud').chmod(0o755)
  env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
  name = f'fit-{os.getpid()}'
  args = ['--name', name, '--zone=z', '--accelerator_type=v5litepod-4', '--check_fit',
          '--gin_file=gin/pretrain_tiny_cpu.gin', '--gin_file=gin/variants/w2v_bert.gin',
          '--model_dir=gs://b/r', '--', '--gin.MESH_SHAPE=(-1, 1, 1)']
  # 64 utterances of 32,000 frames: attention alone needs about 100 GB per chip.
  result = launch('tpu_pod.py', *args, '--gin.BatchConfig.speech_batch_size=64',
                  '--gin.BatchConfig.speech_frames=32000', env=env)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'does not fit --topology=v5litepod-4: RESOURCE_EXHAUSTED' in result.stderr
  # 102 of 15.75 GB: 8 micro-batches of 8 utterances, each split over the 4 chips.
  assert 'Try --gin.TrainConfig.accumulate_steps=8: ' in result.stderr
  [error] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert 'failed (exit code 1), so nothing was created or started' in error
  assert not calls.exists()  # gcloud was never called
  # The demo's batch fits: the launch goes on to create, copy, set up and train.
  try:
    result = launch('tpu_pod.py', *args, env=env)
  finally:
    pathlib.Path(tempfile.gettempdir(), f'{name}-mslam_jax.tar.gz').unlink(missing_ok=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'v5litepod-4: ' in result.stdout and 'GiB HBM per chip' in result.stdout
  verbs = [line.split()[3] for line in calls.read_text().splitlines()]
  assert verbs == ['create', 'scp', 'ssh', 'ssh', 'ssh'], verbs


def test_tpu_pod_rejects_a_gin_file_the_workers_would_not_have():
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--gin_file=gin/no_such.gin',
                  '--model_dir=gs://b/r', '--dry_run')
  assert result.returncode == 1
  assert 'error: gin file gin/no_such.gin not found' in result.stderr
  assert not result.stdout


HELPER = """
import os, sys, time
print('flags', *sys.argv[1:])
print('env', os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS'])
if '--fail_in_1' in sys.argv:
  # Process 1 fails only once process 0 has printed, however slowly it starts.
  ready = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'process_0_ready')
  if '--process_id=1' in sys.argv:
    while not os.path.exists(ready):
      time.sleep(0.05)
    sys.exit(1)
  open(ready, 'w').close()
  time.sleep(60)  # the launcher must stop this one
"""

JAX_HELPER = """
import argparse
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

parser = argparse.ArgumentParser()
parser.add_argument('--coordinator_address')
parser.add_argument('--num_processes', type=int)
parser.add_argument('--process_id', type=int)
args = parser.parse_args()
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
ids = multihost_utils.process_allgather(jnp.int32(jax.process_index()))
print(f'process_count={jax.process_count()} device_count={jax.device_count()} '
      f'gathered={ids.tolist()}')
"""


def with_module(tmp_path, name, source):
  """An environment where `python -m name` runs source."""
  (tmp_path / f'{name}.py').write_text(source)
  path = [str(tmp_path)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
  return {**os.environ, 'PYTHONPATH': os.pathsep.join(path),
          'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


def prefixed(stdout, i):
  prefix = f'[{i}] '
  return [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]


def test_local_runs_every_process_with_its_id_and_one_port(tmp_path):
  env = with_module(tmp_path, 'echo_flags', HELPER)
  result = launch('local_multiprocess.py', '--num_processes=2', '--devices_per_process=3',
                  '--module=echo_flags', f'--log_dir={tmp_path / "logs"}', '--',
                  '--gin_file=gin/pretrain_tiny_cpu.gin', "--gin.MODEL_DIR='runs/a b'",
                  env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  ports = set()
  for i in range(2):
    flags_line, env_line = prefixed(result.stdout, i)
    flags = flags_line.split(' ', 1)[1]
    # The pass-through args come first, unchanged, then the three multi-host flags.
    assert flags.startswith("--gin_file=gin/pretrain_tiny_cpu.gin --gin.MODEL_DIR='runs/a b' ")
    assert flags.endswith(f' --num_processes=2 --process_id={i}')
    ports.update(re.findall(r'--coordinator_address=localhost:(\d+)', flags))
    # The inherited device count (8) is replaced, not added to.
    assert env_line == 'env cpu --xla_force_host_platform_device_count=3'
    log = (tmp_path / 'logs' / f'process_{i}.log').read_text().splitlines()
    assert log == [flags_line, env_line]
  assert len(ports) == 1


def test_local_stops_the_others_and_names_the_process_that_failed(tmp_path):
  env = with_module(tmp_path, 'echo_flags', HELPER)
  start = time.monotonic()
  result = launch('local_multiprocess.py', '--num_processes=2', '--module=echo_flags', '--',
                  '--fail_in_1', env=env)
  assert time.monotonic() - start < 50  # process 0 would sleep 60 s (loose: CI may be oversubscribed)
  assert result.returncode == 1
  assert 'error: process 1 exited with code 1; stopped the others' in result.stderr
  assert prefixed(result.stdout, 0) and prefixed(result.stdout, 1)
  # The temporary log directory is kept for the user, named in the error.
  log = pathlib.Path(re.search(r'its log: (\S+process_1\.log) ', result.stderr).group(1))
  assert log.read_text().startswith('flags --fail_in_1 ')
  shutil.rmtree(log.parent)


def test_local_dry_run_prints_the_commands_and_starts_nothing(tmp_path):
  env = with_module(tmp_path, 'echo_flags', HELPER)
  result = launch('local_multiprocess.py', '--num_processes=2', '--module=echo_flags',
                  '--dry_run', '--', "--gin.MODEL_DIR='runs/x'", env=env)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if not line.startswith('#')]
  assert lines[-1] == 'wait'
  coordinators = set()
  for i, line in enumerate(lines[:-1]):
    words = shlex.split(line.removesuffix(' &'))
    assert words[:7] == ['env', 'JAX_PLATFORMS=cpu',
                         'XLA_FLAGS=--xla_force_host_platform_device_count=1', sys.executable,
                         '-m', 'echo_flags', "--gin.MODEL_DIR='runs/x'"]
    assert words[8:] == ['--num_processes=2', f'--process_id={i}']
    coordinators.add(words[7])
  assert len(coordinators) == 1 and coordinators.pop().startswith('--coordinator_address=')
  assert '[0]' not in result.stdout


def test_local_two_jax_processes_form_one_distributed_job(tmp_path):
  env = with_module(tmp_path, 'jax_hello', JAX_HELPER)
  result = launch('local_multiprocess.py', '--num_processes=2', '--module=jax_hello',
                  env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  for i in range(2):
    assert 'process_count=2 device_count=2 gathered=[0, 1]' in prefixed(result.stdout, i)


# --- tpu_pod.py: watching and stopping a detached training -------------------

WATCH_FLAGS = ['--name=pod', '--zone=z', '--project=proj']


def dry_run_command(*args):
  """The one gcloud command a logs/status/stop dry run prints."""
  result = launch('tpu_pod.py', *args, '--dry_run')
  assert result.returncode == 0, result.stderr
  [cmd] = commands_of(result.stdout)
  return cmd


def ssh_script(cmd, worker='all'):
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod'], cmd
  assert cmd[6] == f'--worker={worker}'
  assert cmd[-2:] == ['--zone=z', '--project=proj']
  return cmd[7].removeprefix('--command=')


def test_tpu_pod_logs_status_and_stop_commands():
  prelude = ('L=$(mkdir -p mslam_jax_logs && cd mslam_jax_logs && pwd) || exit 1; W=$(curl ')
  logs = ssh_script(dry_run_command('logs', *WATCH_FLAGS))
  assert logs.startswith(prelude)
  assert 'tail -n 100 "$LOG" | sed -u "s/^/[$W] /"' in logs
  follow = ssh_script(dry_run_command('logs', *WATCH_FLAGS, '--worker=2', '--lines=5',
                                      '--follow'), worker='2')
  assert 'tail -n 5 -F "$LOG" | sed -u "s/^/[$W] /"' in follow
  status = ssh_script(dry_run_command('status', *WATCH_FLAGS, '--remote_log_dir=/data/logs'))
  assert status.startswith('L=$(mkdir -p /data/logs && cd /data/logs && pwd)')
  assert 'echo "worker $W: running, pid $P, log $LOG;' in status
  stop = ssh_script(dry_run_command('stop', *WATCH_FLAGS, '--grace_s=30'))
  # The whole process group: SIGTERM (the trainer saves), SIGKILL after the grace.
  assert 'kill -s TERM -- "-$P"; for i in $(seq 30); do alive || break; sleep 1; done' in stop
  assert 'if alive; then kill -s KILL -- "-$P";' in stop
  result = launch('tpu_pod.py', 'wait', *WATCH_FLAGS, '--dry_run')
  assert result.returncode == 0, result.stderr
  [poll] = commands_of(result.stdout)
  assert ssh_script(poll) == status.replace('/data/logs', 'mslam_jax_logs')


def test_tpu_pod_watch_commands_take_no_training_args():
  result = launch('tpu_pod.py', 'status', *WATCH_FLAGS, '--dry_run', '--', '--gin.X=1')
  assert result.returncode == 1
  assert "error: arguments after `--` (--gin.X=1) go to training" in result.stderr


FAKE_TRAIN = """#!/bin/bash
echo "fake train $*"
if [ "${@: -1}" = --ignore_term ]; then trap '' TERM; fi
for i in $(seq 3600); do echo "step $i"; sleep 1; done
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or shutil.which('setsid') is None,
                    reason='the worker scripts need Linux (/proc) and setsid')
@pytest.mark.parametrize('train_arg', ['--gin.NOTE="it\'s $HOME"', '--ignore_term'])
def test_tpu_pod_worker_scripts_start_detached_then_watch_and_stop(tmp_path, train_arg):
  """Runs the start, status, logs and stop scripts with bash on a fake worker 3."""
  home = tmp_path / 'home'
  venv_bin = home / 'mslam_jax' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  (venv_bin / 'python').write_text(FAKE_TRAIN)
  (venv_bin / 'python').chmod(0o755)
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  (fake_bin / 'curl').write_text('#!/bin/sh\necho 3\n')  # the metadata server's worker number
  (fake_bin / 'curl').chmod(0o755)
  env = {**os.environ, 'HOME': str(home), 'PATH': f'{fake_bin}{os.pathsep}{os.environ["PATH"]}'}
  pid_file = home / 'mslam_jax_logs' / 'train.pid'
  log = home / 'mslam_jax_logs' / 'worker_3.log'

  def on_worker(*args):
    if args[0] == 'launch':
      cmd = commands_of(launch('tpu_pod.py', '--dry_run', *args[1:]).stdout)[-1]
    else:
      cmd = dry_run_command(*args)
    return subprocess.run(['bash', '-c', ssh_script(cmd)], cwd=home, env=env,
                          capture_output=True, text=True, timeout=120, check=False)

  start = ('launch', *WATCH_FLAGS, '--skip_create', '--repo_url=https://example.com/r.git',
           '--gin_file=gin/pretrain_0.6b.gin', '--model_dir=gs://b/r', '--', train_arg)
  try:
    started = on_worker(*start)
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    assert started.stdout == f'worker 3: started training, pid {pid}, log {log}\n'
    # A session of its own: the end of the ssh session does not reach it.
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    again = on_worker(*start)
    assert again.returncode == 1
    assert f'worker 3: training already runs (pid {pid}, log {log}); stop it first' in again.stderr
    deadline = time.monotonic() + 300
    while 'step 1' not in log.read_text() and time.monotonic() < deadline:
      time.sleep(0.2)
    status = on_worker('status', *WATCH_FLAGS)
    [(worker, (state, code, _))] = tpu_pod.parse_status(status.stdout).items()
    assert (worker, state, code) == ('3', 'running', None), status.stdout
    logs = on_worker('logs', *WATCH_FLAGS, '--lines=1000')
    lines = logs.stdout.splitlines()
    assert lines[0].startswith('[3] === started ') and '[3] step 1' in lines
    # The training command got its arguments through both quoting levels intact.
    assert lines[1] == f'[3] fake train -m mslam_jax.train --gin_file=gin/pretrain_0.6b.gin ' \
                       f"--gin.MODEL_DIR='gs://b/r' {train_arg}"
    stopped = on_worker('stop', *WATCH_FLAGS, '--grace_s=2')
    assert stopped.returncode == 0, stopped.stderr
    assert_group_ends(pid)
    status = tpu_pod.parse_status(on_worker('status', *WATCH_FLAGS).stdout)
    if train_arg == '--ignore_term':
      assert stopped.stdout.startswith(f'worker 3: killed process group {pid}, still running 2 s')
      assert status['3'][0] == 'not running'
    else:
      # Bash ends on SIGTERM: 128 + 15, recorded by the wrapper that outlived it.
      assert stopped.stdout.startswith(f'worker 3: stopped process group {pid}')
      assert status['3'][:2] == ('exited', 143)
    assert not pid_file.exists()
  finally:
    if pid_file.exists():
      try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


def assert_group_ends(pgid, timeout_s=60):
  """The process group is gone (its last zombies may take a moment to be reaped)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.1)
  pytest.fail(f'process group {pgid} still exists {timeout_s} s after `stop`')


def status_result(*lines, returncode=0):
  return subprocess.CompletedProcess([], returncode, stdout=''.join(f'{x}\n' for x in lines),
                                     stderr='' if not returncode else 'ssh: connection lost\n')


def test_tpu_pod_wait_polls_until_every_worker_ended_and_names_a_failure():
  pod = tpu_pod.Pod(tpu_pod.parse_args(['wait', *WATCH_FLAGS]))
  said = []
  polls = iter([
      status_result(returncode=255),  # a dropped connection costs one poll
      status_result('worker 0: running, pid 7, log L0; last line: x',
                    'worker 1: running, pid 8, log L1; last line: y'),
      status_result('worker 0: exited with code 0, log L0; last line: x',
                    'worker 1: running, pid 8, log L1; last line: y'),
      status_result('worker 0: exited with code 0, log L0; last line: x',
                    'worker 1: exited with code 0, log L1; last line: y'),
  ])
  tpu_pod.wait_for_training(pod, 0, said.append, sleep=lambda s: None,
                            run_status=lambda: next(polls))
  assert said[1:] == ['2 of 2 workers running', '1 of 2 workers running',
                      '0 of 2 workers running']
  assert 'status check 1/10 failed (exit code 255): ssh: connection lost' == said[0]

  polls = iter([status_result('worker 0: running, pid 7, log L0; last line: x',
                              'worker 1: exited with code 3, log L1; last line: boom')])
  with pytest.raises(tpu_pod.LaunchError) as error:
    tpu_pod.wait_for_training(pod, 0, said.append, sleep=lambda s: None,
                              run_status=lambda: next(polls))
  assert str(error.value) == ('training failed on worker 1: worker 1: exited with code 3, '
                              'log L1; last line: boom; still running on workers 0: stop '
                              'them with `tpu_pod.py stop`')
  with pytest.raises(tpu_pod.LaunchError, match='cannot get the training status'):
    tpu_pod.wait_for_training(pod, 0, said.append, sleep=lambda s: None,
                              run_status=lambda: status_result(returncode=255))


@pytest.mark.parametrize('outcome', ['failed', 'interrupted'])
def test_tpu_pod_delete_after_waits_and_deletes_unless_interrupted(monkeypatch, outcome):
  args = tpu_pod.parse_args(['--name=pod', '--zone=z', '--skip_create', '--delete_after',
                             '--gin_file=gin/pretrain_0.6b.gin'])
  plan = tpu_pod.Plan(args, [])
  ran = []
  monkeypatch.setattr(tpu_pod, 'run', lambda title, cmd: ran.append(cmd[4]))

  def wait(pod, poll_s, say):
    del pod, poll_s, say
    ran.append('wait')
    if outcome == 'failed':
      raise tpu_pod.LaunchError('training failed on worker 1')
    raise KeyboardInterrupt

  monkeypatch.setattr(tpu_pod, 'wait_for_training', wait)
  error = tpu_pod.LaunchError if outcome == 'failed' else KeyboardInterrupt
  with pytest.raises(error):
    tpu_pod.execute(plan, [('start', [['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']])],
                    delete_after=True)
  # Ctrl-C while waiting means "stop watching": training runs on, detached.
  assert ran == ['ssh', 'wait', 'delete'] if outcome == 'failed' else ['ssh', 'wait']


# --- local_multiprocess.py: the watchdog --------------------------------------

WATCHDOG_HELPER = """
import os, signal, sys, time
mode, pid_dir = sys.argv[1], sys.argv[2]
i = int(sys.argv[-1].removeprefix('--process_id='))
with open(os.path.join(pid_dir, f'{i}.pid'), 'w') as f:
  f.write(str(os.getpid()))
if mode == 'hang':
  if i == 0:
    print('process 0 is done')
    sys.exit(0)
  time.sleep(3600)  # no output, no CPU: stalled
elif mode == 'die':
  if i == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
    print('process 0 waits', flush=True)
    open(os.path.join(pid_dir, 'ready'), 'w').close()
    time.sleep(3600)
  while not os.path.exists(os.path.join(pid_dir, 'ready')):
    time.sleep(0.1)
  print('process 1 fails')
  sys.exit(3)
elif mode == 'busy':
  if i == 0:
    end = time.monotonic() + 10
    while time.monotonic() < end:  # silent but busy, as a compile
      pass
  print(f'process {i} is done')
"""


def pids_of(pid_dir, n):
  return [int((pid_dir / f'{i}.pid').read_text()) for i in range(n)]


def assert_gone(pid):
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def error_line(stderr):
  [line] = [line for line in stderr.splitlines() if line.startswith('[local] error:')]
  return line


def watchdog_setup(tmp_path):
  """(environment that imports the watchdog helper module, the folder its workers' pids go to)."""
  pid_dir = tmp_path / 'pids'
  pid_dir.mkdir()
  return with_module(tmp_path, 'watchdog_helper', WATCHDOG_HELPER), pid_dir


def test_local_stops_a_job_that_hangs_and_names_the_silent_process(tmp_path):
  env, pid_dir = watchdog_setup(tmp_path)
  start = time.monotonic()
  result = launch('local_multiprocess.py', '--num_processes=2', '--module=watchdog_helper',
                  '--stall_timeout_s=3', '--', 'hang', str(pid_dir), env=env, timeout=600)
  assert time.monotonic() - start < 120  # process 1 would sleep 3600 s
  assert result.returncode == 1, result.stdout + result.stderr
  line = error_line(result.stderr)
  assert line.startswith('[local] error: process 1 stalled: no output and no CPU use for ')
  assert '--stall_timeout_s (now 3;' in line
  # Without --log_dir the logs go to a temporary directory, kept on failure.
  log = pathlib.Path(re.search(r'its log: (\S+process_1\.log)\.', line).group(1))
  assert log.is_file() and log.read_text() == ''
  assert (log.parent / 'process_0.log').read_text() == 'process 0 is done\n'
  shutil.rmtree(log.parent)
  assert prefixed(result.stdout, 0) == ['process 0 is done']
  assert_gone(pids_of(pid_dir, 2)[1])


def test_local_stops_the_others_when_one_dies_even_if_they_ignore_sigterm(tmp_path):
  env, pid_dir = watchdog_setup(tmp_path)
  start = time.monotonic()
  result = launch('local_multiprocess.py', '--num_processes=2', '--module=watchdog_helper',
                  f'--log_dir={tmp_path / "logs"}', '--grace_s=2', '--', 'die', str(pid_dir),
                  env=env, timeout=600)
  assert time.monotonic() - start < 120  # process 0 would sleep 3600 s
  assert result.returncode == 1, result.stdout + result.stderr
  log = tmp_path / 'logs' / 'process_1.log'
  assert error_line(result.stderr).startswith(
      f'[local] error: process 1 exited with code 3; stopped the others; its log: {log} '
      '(command: ')
  assert log.read_text() == 'process 1 fails\n'
  assert error_line(result.stderr).endswith('; its last line: process 1 fails')
  assert prefixed(result.stdout, 0) == ['process 0 waits']
  assert_gone(pids_of(pid_dir, 2)[0])


def test_local_watchdog_lets_a_silent_but_busy_process_finish(tmp_path):
  env, pid_dir = watchdog_setup(tmp_path)
  result = launch('local_multiprocess.py', '--num_processes=2', '--module=watchdog_helper',
                  '--stall_timeout_s=4', '--', 'busy', str(pid_dir), env=env, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert prefixed(result.stdout, 0) == ['process 0 is done']
  # On success the temporary log directory is removed.
  log_dir = re.search(r'logs in (\S+)', result.stderr).group(1)
  assert not os.path.exists(log_dir)
