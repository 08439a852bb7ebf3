"""benchmarks/side_by_side.py: option parsing, the step builder and its shapes, the GPU line."""

import subprocess

import jax
import numpy as np
import pytest

import machine  # benchmarks/machine.py
import side_by_side  # benchmarks/side_by_side.py (tests/conftest.py puts benchmarks/ on the path)


def test_model_options_parse_literals_and_refuse_unknown_fields():
  assert side_by_side.parse_model_options(
      ['transposed_weight_gradient=True', 'scan_unroll=2', 'remat_policy=dots_no_batch']) == {
          'transposed_weight_gradient': True, 'scan_unroll': 2, 'remat_policy': 'dots_no_batch'}
  for bad in ('transposed_weight_gradient', 'no_such_field=1', '=1'):
    with pytest.raises(ValueError, match='ModelConfig'):
      side_by_side.parse_model_options([bad])


def test_a_model_option_reaches_the_measured_step():
  """The stack step built with transposed_weight_gradient: same loss and update, other program."""
  shape = side_by_side.Shape(32, 2, 64, 1, 2, 8)
  results, programs = {}, {}
  # scan_unroll and remat_policy are also set by the builder: an option overrides them.
  for options in ({}, {'transposed_weight_gradient': True, 'scan_unroll': 1,
                       'remat_policy': 'none'}):
    step, state, _ = side_by_side.build_jax_step(shape, options=options)
    programs[bool(options)] = step.lower(state).as_text()
    results[bool(options)] = step(state)
  (params, _), loss = results[False]
  (params_t, _), loss_t = results[True]
  np.testing.assert_allclose(loss_t, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(params_t), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # One written-out x^T per widening layer: two feed-forward wi, one pointwise_in.
  assert programs[True].count('optimization_barrier') == 3
  assert programs[False].count('optimization_barrier') == 0


def test_a_shape_scan_unroll_reaches_the_step():
  """None unrolls every layer (the CPU gin setting): no loop; 1 scans (the pod setting):
  one loop forward, one backward."""
  loops = {}
  for unroll in (None, 1):
    shape = side_by_side.Shape(32, 2, 64, 2, 2, 8, scan_unroll=unroll)
    step, state, _ = side_by_side.build_jax_step(shape)
    loops[unroll] = step.lower(state).as_text().count('stablehlo.while')
  assert loops == {None: 0, 1: 2}


def test_every_default_shape_exists():
  for names in side_by_side.DEFAULT_SHAPES.values():
    assert set(names.split(',')) <= set(side_by_side.SHAPES)
  assert set(side_by_side.DEFAULT_SHAPES) == set(side_by_side.MATMUL_SIZES) == set(
      side_by_side.PEAK_CHECK_SIZE) == set(side_by_side.MATMUL_CALLS) == set(
          side_by_side.WORKER_ENV)


def test_gpu_summary_reads_nvidia_smi_or_says_why_not(monkeypatch):
  line = 'NVIDIA H200, 143771 MiB, 580.159.04, 1980 MHz'
  monkeypatch.setattr(subprocess, 'run', lambda *a, **k: subprocess.CompletedProcess(
      a, 0, stdout=f'{line}\n{line}\n\n', stderr=''))
  assert machine.gpu_summary() == f'{line}; {line}'

  def missing(*args, **kwargs):
    raise FileNotFoundError(2, 'No such file or directory', 'nvidia-smi')
  monkeypatch.setattr(subprocess, 'run', missing)
  assert machine.gpu_summary().startswith('no GPU summary (nvidia-smi: ')


def test_an_xla_flags_worker_appends_to_the_callers_flags(monkeypatch):
  """--xla_flags: the worker's XLA_FLAGS are the caller's plus the given ones; others get none."""
  monkeypatch.setattr(side_by_side, 'Worker', lambda name, argv, **kw: kw['env'])
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  env = side_by_side._worker('w', 'jax', 'd256', 'float32', xla_flags='--xla_cpu_max_isa=AVX2')
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2'
  assert 'XLA_FLAGS' not in side_by_side._worker('w', 'jax', 'd256', 'float32')
  monkeypatch.delenv('XLA_FLAGS')
  env = side_by_side._worker('w', 'jax', 'd256', 'float32', xla_flags='--xla_cpu_max_isa=AVX2')
  assert env['XLA_FLAGS'] == '--xla_cpu_max_isa=AVX2'
