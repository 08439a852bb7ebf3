"""The tiny pre-training entry point runs on the embedded corpus and logs every loss term."""

import json
import os
import threading

import pytest

import toy_corpus
from mslam_jax import flops
from mslam_jax import pretrain_loss
from mslam_jax import train
from mslam_jax.data import bad_input
from mslam_jax.data import registry
from mslam_jax.data import sources
from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.models.config import ModelConfig
from mslam_jax.train_config import TrainConfig

SMALL = ['--gin.TrainConfig.log_every=1', '--gin.BatchConfig.speech_batch_size=2',
         '--gin.BatchConfig.text_batch_size=2', '--gin.BatchConfig.paired_batch_size=2',
         '--gin.BatchConfig.text_length=24']


def _records(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_train_main_on_the_embedded_corpus_with_a_user_task_module(tmp_path, capsys):
  module = toy_corpus.write_user_task_module(str(tmp_path), ['the quick brown fox'], size=100)
  model_dir = str(tmp_path / 'run')
  train.main(['--gin_file=gin/pretrain_tiny_cpu.gin', '--gin.TRAIN_STEPS=3',
              f"--gin.MODEL_DIR='{model_dir}'", f'--task_module={module}', '--verbose', *SMALL])
  records = _records(model_dir)
  assert [r['step'] for r in records] == [1, 2, 3]
  for key in ('loss', 'speech/contrastive', 'speech/masked_prediction', 'text/span_mlm',
              'paired/tlm_text', 'paired/ctc', 'speech/code_perplexity', 'step_time_s'):
    assert key in records[-1], key
  out = capsys.readouterr().out
  # --verbose lists every task's rate and the whole rules table.
  assert 'text mixture (13 tasks):' in out and 'user_text_zz' in out
  assert 'speech mixture (12 tasks): embedded_speech_cs' in out
  assert 'logical axis rules:' in out


def test_train_main_on_synthetic_batches(tmp_path):
  model_dir = str(tmp_path / 'run')
  train.main(['--gin_file=gin/pretrain_tiny_cpu.gin', '--gin.TRAIN_STEPS=2',
              f"--gin.MODEL_DIR='{model_dir}'", "--gin.DataConfig.source='synthetic'",
              '--gin.BatchConfig.speech_frames=48', '--gin.BatchConfig.paired_frames=48',
              '--gin.BatchConfig.paired_text_length=6', *SMALL])
  assert [r['step'] for r in _records(model_dir)] == [1, 2]


def test_the_console_shows_a_line_per_stage_and_a_summary(tmp_path, capsys):
  model_dir = str(tmp_path / 'run')
  train.main(['--gin_file=gin/pretrain_tiny_cpu.gin', '--gin.TRAIN_STEPS=2',
              f"--gin.MODEL_DIR='{model_dir}'", *SMALL])
  lines = capsys.readouterr().out.splitlines()
  mesh = [l for l in lines if l.startswith('mesh: ')]
  assert len(mesh) == 1 and 'split: batch->' in mesh[0] and 'logical axis rules' not in lines
  assert any(l.startswith('mixtures: speech 12 tasks (rates ') for l in lines)
  # The embedded corpus' audio fits the default cache: decoded before the step compiles.
  held = [i for i, l in enumerate(lines) if l.startswith('input held in memory: speech ')]
  assert len(held) == 1 and 'paired' in lines[held[0]]
  assert held[0] < lines.index('compiling the train step (the first step includes it)...')
  assert 'compiling the train step (the first step includes it)...' in lines
  # The demo's float32 d 64 model keeps nn.Dense's products on every CPU: no line for them.
  assert not any(l.startswith(('CPU weight gradients', 'CPU bf16 products')) for l in lines)
  assert any(l.startswith('compiled the train step and ran the first step in ') for l in lines)
  # The 'still compiling' lines (one a minute while the first step runs) end with it.
  assert not [t for t in threading.enumerate() if t.name == 'still-working']
  progress = [l for l in lines if l.startswith('step ')]
  assert [l.split(' | ')[0] for l in progress] == ['step 1/2', 'step 2/2']
  assert progress[1].split(' | ')[1].startswith('loss ') and ' s/step' in progress[1]
  done = next(i for i, l in enumerate(lines) if l.startswith('done: step 2 of 2 (2 steps in '))
  assert lines[done + 1].startswith('final loss ') and 'text/span_mlm' in lines[done + 1]
  assert lines[done + 2] == f'checkpoint: {model_dir}/checkpoints/2'
  if len(lines) > done + 3:  # examples cropped at these lengths, one line per problem
    assert lines[done + 3].startswith('input examples cleaned or skipped')
    assert all(l.startswith('  ') and 'tasks)' in l for l in lines[done + 4:])
    assert os.path.exists(os.path.join(model_dir, 'bad_input.txt'))


def test_a_task_that_skips_everything_stops_the_run_with_an_error_not_a_traceback(tmp_path, capsys):
  """Known when the demo's paired audio is decoded into memory, before the step's compile.
  (Streamed, the sampler stops after max_consecutive_skips: tests/test_data_pipeline.py.)"""
  (tmp_path / 'm.tsv').write_text('missing.flac\taa\tabc\n', encoding='utf-8')
  registry.add_task('test_train_all_skipped', kind='paired', language='aa',
                    source=sources.manifest(str(tmp_path / 'm.tsv')))
  try:
    with pytest.raises(SystemExit) as stop:
      train.main(['--gin_file=gin/pretrain_tiny_cpu.gin', '--gin.TRAIN_STEPS=20',
                  f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                  "--gin.DataConfig.paired_tasks=('test_train_all_skipped',)", *SMALL])
  finally:
    bad_input.LOG.reset()
  message = str(stop.value)
  assert message.startswith('error: task test_train_all_skipped: none of its 1 examples is '
                            'kept:\ntest_train_all_skipped: 1 skipped: unreadable audio'), message
  assert 'missing.flac' in message and 'Traceback' not in message
  assert 'compiling' not in capsys.readouterr().out


def test_the_mfu_peak_is_measured_in_the_models_compute_dtype(monkeypatch):
  """A bf16 model's MFU divides by a bf16 product's rate; a given peak is used as given."""
  asked = []
  monkeypatch.setattr(flops, 'measure_peak_flops', lambda dtype: asked.append(dtype) or 5e12)
  configs = (pretrain_loss.LossConfig(), BatchConfig())
  for dtype in ('bfloat16', 'float32'):
    got = train._flops_and_peak(ModelConfig(dtype=dtype), *configs, TrainConfig())  # pylint: disable=protected-access
    assert got['peak_flops_per_device'] == 5e12
  assert [str(d) for d in asked] == ['bfloat16', 'float32']
  got = train._flops_and_peak(ModelConfig(), *configs, TrainConfig(peak_flops_per_device=3e11))  # pylint: disable=protected-access
  assert got['peak_flops_per_device'] == 3e11 and len(asked) == 2
