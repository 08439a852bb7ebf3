"""Ahead-of-time compile tool: FSDP shrinks the state per device, bad meshes fail clearly.

Needs 8 devices (the suite runs with --xla_force_host_platform_device_count=8).
State bytes are checked against an independent count from the parameter
shapes of `jax.eval_shape`, and XLA's argument bytes against state + batch.
The compiled runs use the tiny model's speech-only step (gin/variants/w2v_bert.gin):
about 15 s to compile on 8 CPU devices where all three kinds take about 40 s.
"""

import contextlib
import io
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from library_logs import library_log_lines
from libtpu_env import with_libtpu

from mslam_jax import compile as compile_lib
from mslam_jax import console
from mslam_jax import gin_utils
from mslam_jax import info
from mslam_jax import pretrain_loss
from mslam_jax.data import batch_spec
from mslam_jax import REPO_ROOT
from mslam_jax.models.config import ModelConfig

NUM_DEVICES = 8
GIN_FILES = ('gin/pretrain_tiny_cpu.gin', 'gin/variants/w2v_bert.gin')
ARGS = tuple(f'--gin_file={f}' for f in GIN_FILES) + (f'--num_devices={NUM_DEVICES}',)
DATA_PARALLEL, FSDP = '(8, 1, 1)', '(1, 8, 1)'
# Non-parameter leaves of the state: the step and Adam's count (int32 scalars).
SCALAR_SLACK = 64


@pytest.fixture
def eight_devices():
  if jax.device_count() != NUM_DEVICES:
    pytest.skip('run with XLA_FLAGS=--xla_force_host_platform_device_count=8')


@contextlib.contextmanager
def _restored_jax_env():
  """main() points XLA_FLAGS and JAX_PLATFORMS at N CPU devices; undo it afterwards."""
  platforms = jax.config.jax_platforms
  with pytest.MonkeyPatch.context() as mp:
    for name in ('XLA_FLAGS', 'JAX_PLATFORMS'):
      mp.setenv(name, os.environ.get(name, ''))  # records the old value (or absence)
    try:
      yield
    finally:
      jax.config.update('jax_platforms', platforms)


def run_tool(*args):
  """(report, stdout lines) of `python -m mslam_jax.compile ARGS...`, in-process."""
  out = io.StringIO()
  with _restored_jax_env(), contextlib.redirect_stdout(out):
    report = compile_lib.main(list(args))
  return report, out.getvalue().strip().splitlines()


def report_lines(stdout):
  """The tool's lines without the 'still compiling: 1m00s so far' ones (a loaded machine's)."""
  return [line for line in stdout.strip().splitlines() if not line.startswith('still compiling')]


@pytest.fixture(scope='module')
def runs():
  """{mesh shape: (report, output lines)} for data parallel and FSDP (one compile each)."""
  if jax.device_count() != NUM_DEVICES:
    pytest.skip('run with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  # The tiny gin file's flattened Adam holds its state in one vector, which
  # FSDP cannot split (trainer.state_shardings refuses it).
  # A 'still compiling' line every 0.2 s instead of every minute, so that the
  # output shows them (lowering alone takes over a second).
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(console, 'STILL_WORKING_EVERY_S', 0.2)
    return {mesh: run_tool(*ARGS, f'--gin.MESH_SHAPE={mesh}',
                           '--gin.make_optimizer.flatten=False')
            for mesh in (DATA_PARALLEL, FSDP)}


def _independent_counts():
  """(param bytes, param bytes one FSDP device holds) from the boxed parameter shapes.

  Reads only the parameters' logical names: a weight with an 'embed' axis is
  split 8 ways under FSDP, any other weight is whole on every device.
  """
  gin_utils.parse_gin(GIN_FILES)
  boxed = info.abstract_params(ModelConfig(), pretrain_loss.LossConfig())
  total = fsdp = 0
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    value, names = (leaf.value, leaf.names) if isinstance(leaf, nn.Partitioned) else (leaf, ())
    size = math.prod(value.shape) * np.dtype(value.dtype).itemsize
    total += size
    fsdp += size // NUM_DEVICES if 'embed' in names else size
  return total, fsdp


def _batch_bytes_per_device():
  gin_utils.parse_gin(GIN_FILES)
  spec = batch_spec.abstract_batch(batch_spec.BatchConfig(), pretrain_loss.LossConfig().parts)
  return compile_lib.tree_bytes(spec) // NUM_DEVICES


def test_fsdp_splits_params_and_adam_state(runs):
  param_bytes, fsdp_param_bytes = _independent_counts()
  data_parallel, fsdp = runs[DATA_PARALLEL][0], runs[FSDP][0]
  # Adam keeps mu and nu beside the params: 3 copies, whole on every device.
  assert 0 <= data_parallel.state_bytes_per_device - 3 * param_bytes < SCALAR_SLACK
  assert data_parallel.state_bytes == data_parallel.state_bytes_per_device
  assert 0 <= fsdp.state_bytes_per_device - 3 * fsdp_param_bytes < SCALAR_SLACK
  assert fsdp.state_bytes == data_parallel.state_bytes
  # Nearly every weight has an 'embed' axis: close to 1/8 overall.
  ratio = fsdp.state_bytes_per_device / data_parallel.state_bytes_per_device
  assert 1 / 8 < ratio < 1 / 6, ratio
  assert fsdp.num_params == data_parallel.num_params == param_bytes // 4


def test_xla_arguments_are_state_plus_batch_shards(runs):
  batch = _batch_bytes_per_device()
  key_bytes = 8  # a threefry key is two uint32
  for report, _ in runs.values():
    assert report.memory['argument'] == report.state_bytes_per_device + batch + key_bytes
    # The donated state is reused for the new one rather than held twice.
    assert report.memory['alias'] >= report.state_bytes_per_device - SCALAR_SLACK
    assert report.memory['temp'] > 0
  assert runs[FSDP][0].per_device_bytes < runs[DATA_PARALLEL][0].per_device_bytes


def test_output_last_lines_parse(runs):
  for report, raw_lines in runs.values():
    still = [line for line in raw_lines if line.startswith('still compiling')]
    assert still and all(re.fullmatch(r'still compiling: \d+s so far', l) for l in still)
    lines = report_lines('\n'.join(raw_lines))
    key, value = lines[-1].split(': ')
    assert key == 'per_device_bytes' and int(value) == report.per_device_bytes
    assert lines[-2] == f'state_bytes_per_device: {report.state_bytes_per_device}'
    assert lines[0] == 'compiling the train step for --num_devices=8 with XLA:CPU...'
    assert lines[1].startswith('mesh: ')
    assert any(line.strip().startswith('embed') and 'fsdp' in line for line in lines)
    assert report.lower_s > 0 and report.compile_s > 0 and report.step_flops > 0


@pytest.mark.usefixtures('eight_devices')
def test_mesh_that_does_not_hold_the_devices_fails_clearly():
  with pytest.raises(SystemExit, match=r'MESH_SHAPE \(3, 1, 1\) holds 3 devices, but there '
                     r'are 8; make the product 8'):
    run_tool(*ARGS, '--gin.MESH_SHAPE=(3, 1, 1)')


@pytest.mark.usefixtures('eight_devices')
def test_batch_that_does_not_split_fails_clearly():
  # The full tiny config's paired batch is 4.
  with pytest.raises(SystemExit, match=r'paired_batch_size=4 does not split over the 8 batch'):
    run_tool('--gin_file=gin/pretrain_tiny_cpu.gin', f'--num_devices={NUM_DEVICES}',
             f'--gin.MESH_SHAPE={FSDP}')


@pytest.mark.usefixtures('eight_devices')
def test_device_count_fixed_too_late_fails_clearly():
  # This process's backend already holds 8 devices: 4 cannot be had any more.
  with pytest.raises(SystemExit, match='already running'):
    run_tool('--gin_file=gin/pretrain_tiny_cpu.gin', '--num_devices=4')


def test_command_line_sets_up_its_own_devices():
  """Without XLA_FLAGS the tool still starts 8 CPU devices (checked via the mesh error)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL')}
  result = subprocess.run(
      [sys.executable, '-m', 'mslam_jax.compile', *ARGS, '--gin.MESH_SHAPE=(3, 1, 1)'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 1
  assert 'holds 3 devices, but there are 8' in result.stderr
  assert library_log_lines(result.stderr) == [], result.stderr  # the error alone


def test_accelerator_types_name_their_chips_grid_and_hbm():
  from mslam_jax import tpu_topologies  # pylint: disable=g-import-not-at-top
  gib = 1024 ** 3
  cases = {  # name -> (chips, libtpu topology, HBM GiB per chip): Cloud TPU's own tables
      'v4-8': (4, 'v4:2x2x1', 32), 'v4-64': (32, 'v4:2x4x4', 32),
      'v5p-128': (64, 'v5p:4x4x4', 95), 'v5litepod-256': (256, 'v5e:16x16', 16),
      'v5litepod-8': (8, 'v5e:2x4', 16), 'v6e-16': (16, 'v6e:4x4', 32)}
  for name, (chips, topology, hbm) in cases.items():
    s = tpu_topologies.parse_accelerator_type(name)
    assert (s.chips, s.topology_name, s.hbm_bytes_per_device) == (chips, topology, hbm * gib)
  with pytest.raises(ValueError, match='no standard slice of that size; choose one of v4-8'):
    tpu_topologies.parse_accelerator_type('v4-12')
  with pytest.raises(ValueError, match='expected a Cloud TPU accelerator type'):
    tpu_topologies.parse_accelerator_type('tpu-64')


def test_accumulations_keep_micro_batches_divisible_by_the_shards():
  # The paper's batches (speech, text, paired) over 64 and 256 batch shards.
  assert list(compile_lib.accumulations([2048, 8192, 256], 64, 16)) == [1, 2, 4]
  assert list(compile_lib.accumulations([2048, 8192, 256], 256, 16)) == [1]
  assert list(compile_lib.accumulations([48, 96, 24], 1, 16)) == [1, 2, 4, 8]


PAPER_BATCH = [2048, 8192, 256]


@pytest.mark.parametrize('refusal, k, shards, expected', [
    # XLA:TPU's refusals at K = 1 and the K that then fit (benchmarks/RESULTS.md,
    # "TPU slices"): 0.6B on a v4-128 (K = 2 still needed 38.98G of 30.75: K = 4
    # fit), 0.6B on a v5p-128, 2B on a v5litepod-256 with 4-way model parallelism.
    ('Ran out of memory on HBM, temporaries 105.92G, available 30.75G', 1, 64, 4),
    ('Ran out of memory on HBM, the total memory required for HLO temporaries (105.91G) '
     'exceeds available HBM (95.74G).', 1, 64, 2),
    ('temporaries 16.86G, available 15.75G', 1, 64, 2),
    # From K = 2 the next guess is a multiple of 2.
    ('temporaries 38.98G, available 30.75G', 2, 64, 4),
])
def test_accumulation_advice_names_the_k_that_fit(refusal, k, shards, expected):
  advice = compile_lib.accumulation_advice(refusal, k, PAPER_BATCH, shards)
  assert advice.startswith(f'Try --gin.TrainConfig.accumulate_steps={expected}: '), advice


def test_accumulation_advice_without_a_k_that_splits_or_without_figures():
  # 0.6B on a v5litepod-256: 256 paired sequences over 256 shards leave no K > 1;
  # 'full' remat is what fit there.
  advice = compile_lib.accumulation_advice(
      'temporaries 25.91G, available 15.75G', 1, PAPER_BATCH, 256)
  assert advice.startswith('No gradient accumulation of 1 or more splits the batch '
                           '(2048, 8192, 256) into micro-batches over the 256 batch shards')
  assert "remat_policy='full'" in advice
  assert compile_lib.accumulation_advice('RESOURCE_EXHAUSTED: out of memory', 1, PAPER_BATCH,
                                         64) == compile_lib.FIT_ADVICE


def test_compiles_for_a_tpu_slice_without_a_tpu():
  """--topology: XLA:TPU compiles the tiny step for 4 v5e chips; memory against their HBM."""
  env = with_libtpu({k: v for k, v in os.environ.items()
                     if k not in ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL')})
  result = subprocess.run(
      [sys.executable, '-m', 'mslam_jax.compile', '--gin_file=gin/pretrain_tiny_cpu.gin',
       '--topology=v5litepod-4', '--gin.MESH_SHAPE=(-1, 1, 1)'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  # libtpu's start-up lines (no TPU VM here) are set aside unless --verbose.
  assert library_log_lines(result.stderr) == [], result.stderr[-3000:]
  lines = report_lines(result.stdout)
  assert lines[0] == 'compiling the train step for --topology=v5litepod-4 with XLA:TPU...'
  assert lines[1].startswith('mesh: data=4, fsdp=1, model=1 (4 devices')
  [fit] = [l for l in lines if l.startswith('v5litepod-4: ')]
  total = int(lines[-1].split(': ')[1])
  assert fit == f'v5litepod-4: {total / 1024 ** 3:.2f} of 16 GiB HBM per chip (0%): fits'
  # TPU code, not CPU code: a batch shard of the tiny step on one v5e chip.
  assert 0 < total < 1024 ** 3
