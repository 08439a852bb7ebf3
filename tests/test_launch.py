"""The launchers: tpu_pod.py's commands (dry run, no gcloud) and local_multiprocess.py's processes.

tpu_pod.py is only run with --dry_run or without gcloud on PATH, so nothing
here touches the network. local_multiprocess.py starts real processes: small
helper modules written into tmp_path, and one 2-process jax.distributed run.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'launch'))
import shell_words  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

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
  assert shlex.split(script) == ['cd', 'mslam_jax', '&&', *train_argv]
  assert bash_words(script.removeprefix('cd mslam_jax && ')) == train_argv


def test_tpu_pod_dry_run_from_a_repo_url_then_delete():
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--skip_create', '--delete_after',
                  '--repo_url=https://example.com/me/mslam_jax.git', '--git_ref=v1.0',
                  '--gin_file=gin/pretrain_2b.gin', '--dry_run', '--',
                  "--gin.MODEL_DIR='gs://b/2b'")
  assert result.returncode == 0, result.stderr
  clone, setup, train, delete = commands_of(result.stdout)
  clone_script = remote_script(clone)
  assert 'git clone --quiet https://example.com/me/mslam_jax.git mslam_jax' in clone_script
  assert 'fetch --quiet origin v1.0' in clone_script
  assert 'setup_venv.sh' in remote_script(setup)
  assert shlex.split(remote_script(train))[-2:] == ['--gin_file=gin/pretrain_2b.gin',
                                                   "--gin.MODEL_DIR='gs://b/2b'"]
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod', '--quiet',
                    '--zone=z']
  assert 'MODEL_DIR' not in result.stderr


@pytest.mark.parametrize('model_dir_args', [
    ['--model_dir=runs/local'],
    ['--model_dir=gs://bucket/run', '--', "--gin.MODEL_DIR='/tmp/local'"],  # last one wins
    [],
])
def test_tpu_pod_warns_when_model_dir_is_not_on_gcs(model_dir_args):
  result = launch('tpu_pod.py', '--name=pod', '--zone=z', '--gin_file=gin/pretrain_0.6b.gin',
                  '--dry_run', *model_dir_args)
  assert result.returncode == 0, result.stderr
  [warning] = [line for line in result.stderr.splitlines() if 'MODEL_DIR' in line]
  assert warning.startswith('warning:') and '--model_dir=gs://' in warning


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
  if '--process_id=1' in sys.argv:
    sys.exit(1)
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
  assert time.monotonic() - start < 20  # process 0 would sleep 60 s
  assert result.returncode == 1
  assert 'error: process 1 exited with code 1; stopped the others' in result.stderr
  assert prefixed(result.stdout, 0) and prefixed(result.stdout, 1)


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
