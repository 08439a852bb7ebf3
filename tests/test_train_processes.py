"""Whole training processes: SIGKILL then resume is exact, SIGTERM saves, a run resumed
on another process count reads the same data (elastic resume; 2 processes = 1), and a
run whose MODEL_DIR is on object storage (gs://, a local emulator) trains, resumes and
exports.

Each test runs `python -m mslam_jax.train` in subprocesses, as a user would.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  pylint: disable=unused-import
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
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if 'event' not in r]  # resume markers


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
  # The newest checkpoint that was complete when the kill landed: step 2, or 4
  # when the run got that far first (a step takes tens of ms); a save cut short
  # is left as a `.orbax-checkpoint-tmp` folder, which must not be resumed from.
  latest = max(int(name) for name in os.listdir(os.path.join(killed, 'checkpoints'))
               if name.isdigit())
  assert latest >= 2
  out = _run(_train_args(killed, 8))
  assert f'resumed from step {latest} (' in out
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
  assert (f'SIGTERM: saved step {step}; exiting ({step} of 1000 steps done: the same command '
          'resumes from there)') in output
  assert os.path.isdir(os.path.join(model_dir, 'checkpoints', str(step)))
  assert os.path.isfile(os.path.join(model_dir, 'data_state', f'{step}.json'))


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_with_a_save(tmp_path):
  """A preemption notice that reaches one host only: jax's preemption service passes it
  on, and both processes save the same step and exit 0. (Each stopping on its own flag,
  one could sit in its collective save while the other waits in the next step's.)"""
  model_dir = str(tmp_path / 'run')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  args = _train_args(model_dir, 1000, '--gin_file=gin/variants/w2v_bert.gin',
                     '--gin.MESH_SHAPE=(-1, 1, 1)', '--gin.BatchConfig.speech_frames=64',
                     f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2')
  logs = [open(tmp_path / f'process_{i}.log', 'w+', encoding='utf-8') for i in range(2)]
  procs = [subprocess.Popen(args + [f'--process_id={i}'], cwd=REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True) for i, log in enumerate(logs)]
  try:
    deadline = time.time() + TIMEOUT_S
    while not any(r['step'] >= 2 for r in _records(model_dir)):
      assert time.time() < deadline and all(p.poll() is None for p in procs), 'no step 2'
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  assert codes == [0, 0], [out[-2000:] for out in outputs]
  steps = {int(out.split('SIGTERM: saved step ')[1].split(';')[0]) for out in outputs}
  assert len(steps) == 1, outputs  # one step, agreed by both
  assert os.path.isdir(os.path.join(model_dir, 'checkpoints', str(steps.pop())))


def _launch(args, processes, devices_per_process=1):
  """`args` (a train command line) on `processes` local processes (launch/local_multiprocess.py)."""
  out = subprocess.run([sys.executable, 'launch/local_multiprocess.py',
                        f'--num_processes={processes}',
                        f'--devices_per_process={devices_per_process}', '--', *args[3:]],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_resume_on_another_process_count_reads_the_same_batches(tmp_path):
  """1 process -> 2 processes -> 1 process logs the losses of one uninterrupted run.

  Real data (the embedded corpus through the sampler), so the data position
  must carry over: each resumed host reads its rows of the same global batch.
  """
  speech = ['--gin_file=gin/variants/w2v_bert.gin', '--gin.MESH_SHAPE=(-1, 1, 1)',
            '--gin.BatchConfig.speech_frames=64']
  reference = str(tmp_path / 'reference')
  _run(_train_args(reference, 6, *speech), devices=2)
  want = {r['step']: r for r in _records(reference)}
  elastic = str(tmp_path / 'elastic')
  _run(_train_args(elastic, 2, *speech), devices=2)
  out = _launch(_train_args(elastic, 4, *speech), processes=2)
  assert 'resumed from step 2' in out
  out = _run(_train_args(elastic, 6, *speech), devices=2)
  assert 'resumed from step 4' in out
  got = {r['step']: r for r in _records(elastic)}
  assert sorted(got) == list(range(1, 7))
  for step in range(3, 7):
    for key in ('loss', 'speech/contrastive', 'speech/masked_prediction', 'grad_norm'):
      assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_a_run_on_object_storage_trains_resumes_and_exports(gcs_bucket, gcs_emulator):  # pylint: disable=redefined-outer-name
  """MODEL_DIR = gs://... (tests/gcs_emulator.py): the code path of a TPU pod's runs."""
  import mslam_jax  # pylint: disable=g-import-not-at-top
  if not gcs_emulator.supports_tf:
    pytest.skip('no `openssl` command: TensorFlow reaches the emulator through its TLS proxy')
  speech = ['--gin_file=gin/variants/w2v_bert.gin', '--gin.BatchConfig.speech_frames=64']
  model_dir = f'{gcs_bucket}/run'
  _run(_train_args(model_dir, 2, *speech))
  out = _run(_train_args(model_dir, 3, *speech))
  assert 'resumed from step 2' in out and f'checkpoint: {model_dir}/checkpoints/3' in out
  run = epath.Path(model_dir)
  rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r.get('event')) for r in rows] == [(1, None), (2, None), (2, 'resume'),
                                                         (3, None)]
  assert all('time' in r for r in rows) and all('learning_rate' in r for r in rows[:2])
  assert (run / 'data_state' / '2.json').exists() and (run / 'config.gin').exists()
  assert list((run / 'tensorboard').iterdir())
  export_dir = f'{gcs_bucket}/export'
  out = subprocess.run([sys.executable, '-m', 'mslam_jax.export', f'--model_dir={model_dir}',
                        f'--output={export_dir}'], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  encoder = mslam_jax.load_encoder(export_dir)
  assert encoder.manifest['step'] == 3
  tone = np.sin(2 * np.pi * 220 * np.arange(8000) / 16000).astype(np.float32)
  encoded, mask = encoder.encode_speech([tone])
  assert mask.any() and np.all(np.isfinite(encoded))
