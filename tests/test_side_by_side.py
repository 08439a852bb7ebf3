"""benchmarks/side_by_side.py's option parsing and its step builder with a ModelConfig option."""

import jax
import numpy as np
import pytest

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
