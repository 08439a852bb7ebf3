"""Parameter counts: paper ranges, and an independent closed-form count."""

import os
import subprocess
import sys

import pytest
from library_logs import library_log_lines

from mslam_jax import gin_utils, info, pretrain_loss
from mslam_jax import REPO_ROOT
from mslam_jax.models.config import ModelConfig


def closed_form_params(c: ModelConfig) -> int:
  """Counts every weight and bias of the architecture by hand."""
  d, f, k = c.d_model, c.ffn_dim, c.conv_kernel_size
  ln = 2 * d
  ffn = ln + (d * f + f) + (f * d + d)
  attention = ln + 3 * (d * d + d) + (d * d + d)
  conv = ln + (d * 2 * d + 2 * d) + k * d + 2 * d + (d * d + d)
  layer = 2 * ffn + attention + conv + ln
  ch = c.frontend_channels
  freq = -(-(-(-c.num_mel_bins // 2)) // 2)
  frontend = (9 * ch + ch) + (9 * ch * ch + ch) + (freq * ch * d + d)
  text = c.vocab_size * d + ln
  quantizer = (d * c.num_codes + c.num_codes) + c.num_codes * c.code_dim
  heads = ((d * c.code_dim + c.code_dim) + (d * c.num_codes + c.num_codes)
           + 2 * (d * c.vocab_size + c.vocab_size))
  return ((c.num_speech_layers + c.num_shared_layers) * layer + frontend + text + d
          + quantizer + heads)


@pytest.mark.parametrize('gin_file,low,high', [
    ('gin/pretrain_0.6b.gin', 0.55e9, 0.65e9),
    ('gin/pretrain_2b.gin', 1.8e9, 2.1e9),
])
def test_paper_sizes(gin_file, low, high, capsys):
  total = info.main([f'--gin_file={gin_file}'])
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == f'total_params: {total}'
  assert low <= total <= high
  for part in ('frontend', 'speech_layers', 'shared_layers', 'text_embedding', 'quantizer'):
    assert any(line.split()[0] == part for line in out if line.strip()), part
  gin_utils.parse_gin([gin_file], writes_model_dir=False)
  assert total == closed_form_params(ModelConfig())
  # The paper's check: about 23 d^2 weights per layer.
  c = ModelConfig()
  per_layer = info.part_counts(info.abstract_params(c, pretrain_loss.LossConfig()))[
      'shared_layers'] / c.num_shared_layers
  assert abs(per_layer / (23 * c.d_model ** 2) - 1) < 0.03


def test_info_command_line_runs_in_seconds_without_library_noise():
  """The counts and nothing from TensorFlow's or XLA's loggers, unless --verbose."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  command = [sys.executable, '-m', 'mslam_jax.info', '--gin_file=gin/pretrain_2b.gin']
  out = subprocess.run(command, cwd=REPO_ROOT, check=True, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.stdout.strip().splitlines()[-1].startswith('total_params: 18')
  assert library_log_lines(out.stderr) == [], out.stderr
  verbose = subprocess.run(command + ['--verbose'], cwd=REPO_ROOT, check=True, env=env,
                           capture_output=True, text=True, timeout=900)
  assert library_log_lines(verbose.stderr), verbose.stderr  # what the quiet run leaves out
