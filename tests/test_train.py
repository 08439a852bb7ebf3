"""The tiny pre-training entry point runs and logs every loss term."""

import json
import os

from mslam_jax import train


def test_train_main_writes_metrics(tmp_path):
  model_dir = str(tmp_path / 'run')
  train.main(['--gin_file=gin/pretrain_tiny_cpu.gin', '--gin.TRAIN_STEPS=3',
              f"--gin.MODEL_DIR='{model_dir}'", '--gin.TrainConfig.log_every=1',
              '--gin.BatchConfig.speech_batch_size=2', '--gin.BatchConfig.text_batch_size=2',
              '--gin.BatchConfig.paired_batch_size=2', '--gin.BatchConfig.speech_frames=48',
              '--gin.BatchConfig.paired_frames=48', '--gin.BatchConfig.text_length=24',
              '--gin.BatchConfig.paired_text_length=6'])
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1, 2, 3]
  for key in ('loss', 'speech/contrastive', 'speech/masked_prediction', 'text/span_mlm',
              'paired/tlm_text', 'paired/ctc', 'speech/code_perplexity', 'step_time_s'):
    assert key in records[-1], key
