"""Whole training processes: SIGKILL then resume is exact, SIGTERM saves, 2 processes = 1.

Each test runs `python -m mslam_jax.train` in subprocesses, as a user would.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mslam_jax import REPO_ROOT as REPO
SMALL = ['--gin_file=gin/pretrain_tiny_cpu.gin', '--gin.TrainConfig.log_every=1',
         '--gin.BatchConfig.speech_batch_size=2', '--gin.BatchConfig.text_batch_size=2',
         '--gin.BatchConfig.paired_batch_size=2', '--gin.BatchConfig.text_length=24',
         '--gin.TrainConfig.save_every=2', '--gin.TrainConfig.peak_flops_per_device=1e11',
         # The Gumbel anneal follows the run length; runs of different lengths
         # below are compared step by step, so it is pinned to one length.
         '--gin.gumbel_temperature.train_steps=8']
# Generous: these machines are shared and sometimes 4x oversubscribed, and a
# hung run is still caught (a timeout fails the test, it only takes longer).
TIMEOUT_S = 1500


def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONUNBUFFERED='1')
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  return env


def _train_args(model_dir, steps, *extra):
  return [sys.executable, '-m', 'mslam_jax.train', *SMALL, f"--gin.MODEL_DIR='{model_dir}'",
          f'--gin.TRAIN_STEPS={steps}', *extra]


def _records(model_dir):
  path = os.path.join(model_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _run(args, devices=1, timeout=TIMEOUT_S):
  out = subprocess.run(args, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def _start_and_wait(args, model_dir, until_step, ckpt_step=None, timeout=TIMEOUT_S):
  """Starts training; returns the process once `until_step` is logged (and ckpt_step saved)."""
  proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [r['step'] for r in _records(model_dir)]
    saved = ckpt_step is None or os.path.isdir(
        os.path.join(model_dir, 'checkpoints', str(ckpt_step)))
    if steps and max(steps) >= until_step and saved:
      return proc
    if proc.poll() is not None:
      raise AssertionError(f'training ended early: {proc.stdout.read()[-3000:]}')
    time.sleep(0.2)
  proc.kill()
  raise AssertionError('training did not reach the step in time')


def test_resume_after_sigkill_logs_the_same_losses(tmp_path):
  reference = str(tmp_path / 'reference')
  _run(_train_args(reference, 8))
  want = {r['step']: r for r in _records(reference)}
  assert sorted(want) == list(range(1, 9))

  killed = str(tmp_path / 'killed')
  proc = _start_and_wait(_train_args(killed, 1000), killed, until_step=3, ckpt_step=2)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=120)
  before = len(_records(killed))
  out = _run(_train_args(killed, 8))
  assert 'resuming from step' in out
  resumed = _records(killed)[before:]
  assert resumed and resumed[-1]['step'] == 8
  for r in resumed:
    for key in ('loss', 'speech/contrastive', 'text/span_mlm', 'paired/ctc', 'grad_norm'):
      assert r[key] == pytest.approx(want[r['step']][key], rel=1e-5, abs=1e-6), (r['step'], key)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  model_dir = str(tmp_path / 'run')
  proc = _start_and_wait(_train_args(model_dir, 1000, '--gin_file=gin/variants/w2v_bert.gin'),
                         model_dir, until_step=2)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 0, output[-3000:]
  assert 'SIGTERM: saved step' in output
  step = int(output.split('SIGTERM: saved step ')[1].split(';')[0])
  assert os.path.isdir(os.path.join(model_dir, 'checkpoints', str(step)))
  assert os.path.isdir(os.path.join(model_dir, 'data_state', str(step)))


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 1 device (gloo) against 1 process x 2 devices: same global batch."""
  # Speech only (w2v-BERT) and synthetic batches keep the three compiles short.
  synthetic = ['--gin_file=gin/variants/w2v_bert.gin', "--gin.DataConfig.source='synthetic'",
               '--gin.BatchConfig.speech_frames=48', '--gin.MESH_SHAPE=(-1, 1, 1)']
  one = str(tmp_path / 'one')
  _run(_train_args(one, 2, *synthetic), devices=2)
  two = str(tmp_path / 'two')
  args = _train_args(two, 2, *synthetic)[3:]  # drop "python -m mslam_jax.train"
  out = subprocess.run([sys.executable, 'launch/local_multiprocess.py', '--num_processes=2',
                        '--devices_per_process=1', '--', *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert '2 processes' in out.stdout
  want, got = _records(one), _records(two)
  assert [r['step'] for r in got] == [r['step'] for r in want] == [1, 2]
  for w, g in zip(want, got):
    for key in ('loss', 'speech/contrastive', 'speech/masked_prediction', 'grad_norm'):
      assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), key
