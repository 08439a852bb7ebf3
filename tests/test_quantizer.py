"""Gumbel quantizer: hard codes from the codebook, straight-through gradients, annealing."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_configs
from mslam_jax.models.quantizer import GumbelQuantizer, gumbel_temperature


def test_quantized_vectors_are_codebook_rows():
  mc, _ = tiny_configs()
  x = jax.random.normal(jax.random.key(0), (2, 7, mc.d_model))
  params = GumbelQuantizer(mc).init(jax.random.key(1), x, 1.0)
  codebook = np.asarray(params['params']['codebook'].value)
  q, ids, logits = GumbelQuantizer(mc).apply(params, x, 1.0)
  np.testing.assert_array_equal(ids, np.argmax(logits, -1))
  np.testing.assert_allclose(q, codebook[np.asarray(ids)], rtol=1e-6)
  # Training: a Gumbel sample, still exactly one codebook row per frame.
  q_train, _, _ = GumbelQuantizer(mc, deterministic=False).apply(
      params, x, 2.0, rngs={'gumbel': jax.random.key(2)})
  dist = np.linalg.norm(np.asarray(q_train)[:, :, None] - codebook[None, None], axis=-1)
  assert np.all(dist.min(-1) < 1e-5)


def test_straight_through_gradient_reaches_the_logits():
  mc, _ = tiny_configs()
  x = jax.random.normal(jax.random.key(0), (1, 5, mc.d_model))
  params = GumbelQuantizer(mc).init(jax.random.key(1), x, 1.0)

  def loss(p):
    q, _, _ = GumbelQuantizer(mc, deterministic=False).apply(
        p, x, 1.0, rngs={'gumbel': jax.random.key(3)})
    return jnp.sum(q)

  grads = jax.grad(loss)(params)['params']
  assert float(jnp.abs(grads['logits']['kernel'].value).sum()) > 0
  assert float(jnp.abs(grads['codebook'].value).sum()) > 0


def test_temperature_anneals_from_start_to_floor():
  assert abs(float(gumbel_temperature(0)) - 2.0) < 1e-6
  assert abs(float(gumbel_temperature(10**7)) - 0.1) < 1e-6
  t = [float(gumbel_temperature(s)) for s in (0, 1000, 100_000, 1_000_000)]
  assert t == sorted(t, reverse=True)
  np.testing.assert_allclose(float(gumbel_temperature(100_000)), 2.0 * 0.999995 ** 100_000,
                             rtol=1e-4)
