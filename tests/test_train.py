"""The tiny pre-training entry point runs on the embedded corpus and logs every loss term."""

import json
import os

import toy_corpus
from mslam_jax import train

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
              f"--gin.MODEL_DIR='{model_dir}'", f'--task_module={module}', *SMALL])
  records = _records(model_dir)
  assert [r['step'] for r in records] == [1, 2, 3]
  for key in ('loss', 'speech/contrastive', 'speech/masked_prediction', 'text/span_mlm',
              'paired/tlm_text', 'paired/ctc', 'speech/code_perplexity', 'step_time_s'):
    assert key in records[-1], key
  out = capsys.readouterr().out
  assert 'text mixture (13 tasks):' in out and 'user_text_zz' in out
  assert 'speech mixture (12 tasks): embedded_speech_cs' in out


def test_train_main_on_synthetic_batches(tmp_path):
  model_dir = str(tmp_path / 'run')
  train.main(['--gin_file=gin/pretrain_tiny_cpu.gin', '--gin.TRAIN_STEPS=2',
              f"--gin.MODEL_DIR='{model_dir}'", "--gin.DataConfig.source='synthetic'",
              '--gin.BatchConfig.speech_frames=48', '--gin.BatchConfig.paired_frames=48',
              '--gin.BatchConfig.paired_text_length=6', *SMALL])
  assert [r['step'] for r in _records(model_dir)] == [1, 2]
