"""Building blocks against independent references (lax conv, numpy)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from mslam_jax.models import layers


def test_depthwise_conv_matches_grouped_lax_conv():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 11, 6)).astype(np.float32)
  kernel = rng.normal(size=(5, 6)).astype(np.float32)
  ours = layers.depthwise_conv1d(jnp.asarray(x), jnp.asarray(kernel))
  ref = jax.lax.conv_general_dilated(
      x, kernel[:, None, :], window_strides=(1,), padding=((2, 2),),
      dimension_numbers=('NWC', 'WIO', 'NWC'), feature_group_count=6)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # And against a plain numpy loop (correlation, zeros outside).
  loop = np.zeros_like(x)
  for t in range(11):
    for k in range(5):
      s = t + k - 2
      if 0 <= s < 11:
        loop[:, t] += kernel[k] * x[:, s]
  np.testing.assert_allclose(ours, loop, rtol=1e-5, atol=1e-5)


def test_masked_group_norm_equals_numpy_on_valid_frames():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 8)).astype(np.float32) * 3 + 1
  lengths = [7, 4]
  paddings = np.array([[0.0 if t < n else 1.0 for t in range(7)] for n in lengths],
                      np.float32)
  x[1, 4:] = 1e3  # garbage in the padding must not matter
  module = layers.MaskedGroupNorm(num_groups=2, epsilon=1e-6)
  params = module.init(jax.random.key(0), x, paddings)
  out = np.asarray(module.apply(params, x, paddings))
  for b, n in enumerate(lengths):
    for g in range(2):
      block = x[b, :n, g * 4:(g + 1) * 4]
      ref = (block - block.mean()) / np.sqrt(block.var() + 1e-6)
      np.testing.assert_allclose(out[b, :n, g * 4:(g + 1) * 4], ref, rtol=1e-4, atol=1e-4)


def test_sinusoidal_positions_formula():
  table = np.asarray(layers.sinusoidal_positions(9, 6))
  for p in range(9):
    for i in range(3):
      angle = p / 10000 ** (2 * i / 6)
      assert math.isclose(table[p, 2 * i], math.sin(angle), abs_tol=1e-5)
      assert math.isclose(table[p, 2 * i + 1], math.cos(angle), abs_tol=1e-5)


def test_zero_padded_and_lengths():
  paddings = jnp.array([[0, 0, 1], [0, 1, 1]], jnp.float32)
  x = jnp.ones((2, 3, 2))
  np.testing.assert_array_equal(layers.zero_padded(x, paddings)[..., 0],
                                [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(layers.lengths_from_paddings(paddings), [2, 1])
