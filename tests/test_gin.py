"""Gin files: all parse, carry the paper's values, and take command-line overrides."""

import glob
import os

import pytest

from mslam_jax import gin_utils
from mslam_jax import REPO_ROOT
from mslam_jax.data import audio
from mslam_jax.data import batch_spec
from mslam_jax.models.config import ModelConfig
from mslam_jax.optimizer import warmup_rsqrt_schedule
from mslam_jax.pretrain_loss import LossConfig
from mslam_jax.train_config import TrainConfig

ALL_GIN = sorted(os.path.relpath(p, REPO_ROOT)
                 for p in glob.glob(os.path.join(REPO_ROOT, 'gin', '**', '*.gin'),
                                    recursive=True))
POD_RUNS = ('gin/pretrain_0.6b.gin', 'gin/pretrain_2b.gin')
RUNS = POD_RUNS + ('gin/pretrain_tiny_cpu.gin',)
# What a pod run passes for its REQUIRED MODEL_DIR.
MODEL_DIR = "MODEL_DIR = 'gs://bucket/run'"


@pytest.mark.parametrize('path', ALL_GIN)
def test_every_gin_file_parses(path):
  gin_utils.parse_gin([path], [MODEL_DIR])


@pytest.mark.parametrize('path', POD_RUNS)
def test_pod_runs_require_model_dir(path):
  """MODEL_DIR = %gin.REQUIRED: a pod run cannot silently write to a default directory."""
  with pytest.raises(SystemExit, match=r'MODEL_DIR is required .*--gin\.MODEL_DIR='):
    gin_utils.parse_gin([path])
  gin_utils.parse_gin([path], [MODEL_DIR])
  assert TrainConfig().model_dir == 'gs://bucket/run'
  # Tools that write nothing there (info, compile) need not give it.
  gin_utils.parse_gin([path], writes_model_dir=False)
  assert TrainConfig().model_dir is None
  gin_utils.parse_gin([path], [MODEL_DIR], writes_model_dir=False)
  assert TrainConfig().model_dir == 'gs://bucket/run'


def test_cpu_demo_keeps_a_local_model_dir():
  gin_utils.parse_gin(['gin/pretrain_tiny_cpu.gin'])
  assert TrainConfig().model_dir == 'runs/tiny_cpu'


@pytest.mark.parametrize('path,d,m,ffn,lr,steps', [
    ('gin/pretrain_0.6b.gin', 1024, 16, 4096, 6e-4, 1_300_000),
    ('gin/pretrain_2b.gin', 1408, 32, 5632, 3.6e-4, 350_000),
])
def test_paper_values(path, d, m, ffn, lr, steps):
  gin_utils.parse_gin([path], [MODEL_DIR])
  c = ModelConfig()
  assert (c.d_model, c.num_speech_layers, c.num_shared_layers, c.ffn_dim,
          c.conv_kernel_size, c.num_codes) == (d, 8, m, ffn, 5, 1024)
  assert TrainConfig().train_steps == steps
  loss = LossConfig()
  assert (loss.speech_mask_start_prob, loss.speech_mask_span, loss.num_negatives,
          loss.diversity_weight, loss.text_mask_span) == (0.065, 10, 100, 0.1, 20)
  # Warm-up reaches the peak at 40k steps, then decays as 1/sqrt(step).
  schedule = warmup_rsqrt_schedule()
  assert abs(float(schedule(40_000)) - lr) < 1e-9
  assert abs(float(schedule(160_000)) - lr / 2) < 1e-9
  assert abs(float(schedule(20_000)) - lr / 2) < 1e-9


def test_command_line_overrides():
  bindings, rest = gin_utils.split_gin_flags(
      ['--gin_file=x.gin', '--gin.TRAIN_STEPS=7', "--gin.MODEL_DIR='runs/t'",
       '--gin.ModelConfig.num_heads=2'])
  assert rest == ['--gin_file=x.gin']
  gin_utils.parse_gin(['gin/pretrain_tiny_cpu.gin'], bindings)
  assert TrainConfig().train_steps == 7
  assert TrainConfig().model_dir == 'runs/t'
  assert ModelConfig().num_heads == 2


def test_help_lists_the_gin_binding_flag(capsys):
  """--gin.NAME=VALUE bypasses argparse, so --help has to name it in its own words."""
  with pytest.raises(SystemExit) as done:
    gin_utils.parse_command_line('a tool', ['--help'])
  assert done.value.code == 0
  out = capsys.readouterr().out
  assert '--gin_file' in out and '--gin.NAME=VALUE (repeatable)' in out


def test_bad_flag_and_missing_file_say_how_to_fix():
  with pytest.raises(SystemExit, match='--gin.NAME=VALUE'):
    gin_utils.split_gin_flags(['--gin.TRAIN_STEPS'])
  with pytest.raises(SystemExit, match='not found'):
    gin_utils.parse_gin(['gin/no_such_file.gin'])


def test_config_validation_names_the_fix():
  with pytest.raises(ValueError, match='num_heads'):
    ModelConfig(d_model=100, num_heads=8)


@pytest.mark.parametrize('path', ['gin/pretrain_0.6b.gin', 'gin/pretrain_tiny_cpu.gin',
                                  'gin/meshes/fsdp.gin'])
def test_mesh_rules_have_one_source(path):
  """Runs bind the rules through gin; code without gin reads the same file's binding."""
  from mslam_jax import partitioning  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin([path], [MODEL_DIR])
  bound = partitioning.MeshConfig().rules
  assert bound == partitioning.default_rules()
  assert bound[0] == ('batch', ('data', 'fsdp')) and ('embed', 'fsdp') in bound
  assert not hasattr(partitioning, 'LOGICAL_RULES')  # no Python twin


def _num_mel_bins():
  return (ModelConfig().num_mel_bins, batch_spec.BatchConfig().num_mel_bins,
          audio.FeatureConfig().num_mel_bins)


@pytest.mark.parametrize('path', RUNS)
def test_num_mel_bins_is_one_macro(path):
  """One NUM_MEL_BINS feeds the model, the batch and the features; a stray binding is caught."""
  gin_utils.parse_gin([path], [MODEL_DIR])
  assert _num_mel_bins() == (80, 80, 80) == (batch_spec.NUM_MEL_BINS,) * 3
  batch_spec.check_num_mel_bins(ModelConfig(), batch_spec.BatchConfig(), audio.FeatureConfig())
  gin_utils.parse_gin([path], [MODEL_DIR, 'NUM_MEL_BINS = 64'])
  assert _num_mel_bins() == (64, 64, 64)
  gin_utils.parse_gin([path], [MODEL_DIR, 'FeatureConfig.num_mel_bins = 64'])
  with pytest.raises(ValueError, match=r'ModelConfig.num_mel_bins=80, BatchConfig.num_mel_bins'
                     r'=80, FeatureConfig.num_mel_bins=64.*--gin.NUM_MEL_BINS'):
    batch_spec.check_num_mel_bins(ModelConfig(), batch_spec.BatchConfig(),
                                  audio.FeatureConfig())


def test_no_gin_file_binds_num_mel_bins_but_through_the_macro():
  for path in ALL_GIN:
    with open(os.path.join(REPO_ROOT, path), encoding='utf-8') as f:
      for line in f:
        code = line.split('#')[0]
        if 'num_mel_bins' in code:
          assert code.split('=', 1)[1].strip() == '%NUM_MEL_BINS', (path, line)
