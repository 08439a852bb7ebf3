"""Gin files: all parse, carry the paper's values, and take command-line overrides."""

import glob
import os

import pytest

from mslam_jax import gin_utils
from mslam_jax import REPO_ROOT
from mslam_jax.models.config import ModelConfig
from mslam_jax.optimizer import warmup_rsqrt_schedule
from mslam_jax.pretrain_loss import LossConfig
from mslam_jax.train_config import TrainConfig

ALL_GIN = sorted(os.path.relpath(p, REPO_ROOT)
                 for p in glob.glob(os.path.join(REPO_ROOT, 'gin', '**', '*.gin'),
                                    recursive=True))


@pytest.mark.parametrize('path', ALL_GIN)
def test_every_gin_file_parses(path):
  gin_utils.parse_gin([path])


@pytest.mark.parametrize('path,d,m,ffn,lr,steps', [
    ('gin/pretrain_0.6b.gin', 1024, 16, 4096, 6e-4, 1_300_000),
    ('gin/pretrain_2b.gin', 1408, 32, 5632, 3.6e-4, 350_000),
])
def test_paper_values(path, d, m, ffn, lr, steps):
  gin_utils.parse_gin([path])
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
  gin_utils.parse_gin([path])
  bound = partitioning.MeshConfig().rules
  assert bound == partitioning.default_rules()
  assert bound[0] == ('batch', ('data', 'fsdp')) and ('embed', 'fsdp') in bound
  assert not hasattr(partitioning, 'LOGICAL_RULES')  # no Python twin
