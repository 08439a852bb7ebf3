"""Gumbel quantizer: hard codes from the codebook, straight-through gradients, annealing."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_configs
from mslam_jax import gin_utils
from mslam_jax.models.quantizer import GumbelQuantizer, gumbel_temperature


def test_quantized_vectors_are_codebook_rows():
  mc, _ = tiny_configs()
  x = jax.random.normal(jax.random.key(0), (2, 7, mc.d_model))
  params = GumbelQuantizer(mc).init(jax.random.key(1), x, 1.0)
  codebook = np.asarray(params['params']['codebook'].value)
  q, ids, logits = GumbelQuantizer(mc).apply(params, x, 1.0)
  np.testing.assert_array_equal(ids, np.argmax(logits, -1))
  np.testing.assert_array_equal(q, codebook[np.asarray(ids)])


@pytest.mark.parametrize('temperature', [2.0, 0.5, 0.1])
def test_training_output_is_exactly_the_sampled_row_in_float32(temperature):
  """0.6B-sized codebook (1024 x 1024): every frame's vector is bit-equal to codebook[id].

  A one-hot + soft - sg(soft) product missed 1.0 by an ulp on 4-23% of such frames.
  """
  mc = dataclasses.replace(tiny_configs()[0], num_codes=1024, code_dim=1024)
  batch, time = 4, 100
  x = jax.random.normal(jax.random.key(0), (batch, time, mc.d_model))
  keys = jax.random.split(jax.random.key(2), batch)
  quantizer = GumbelQuantizer(mc, deterministic=False)
  params = quantizer.init(jax.random.key(1), x, temperature, keys)
  q, ids, logits = jax.jit(quantizer.apply)(params, x, temperature, keys)
  codebook = np.asarray(params['params']['codebook'].value)
  q, ids = np.asarray(q), np.asarray(ids)
  np.testing.assert_array_equal(q, codebook[ids])
  # The ids are a Gumbel sample: argmax of logits + noise from each example's key.
  noise = np.stack([np.asarray(jax.random.gumbel(k, logits.shape[1:])) for k in keys])
  np.testing.assert_array_equal(ids, np.argmax(np.asarray(logits) + noise, -1))
  assert 0 < np.mean(ids != np.argmax(logits, -1)) < 0.5


def test_an_examples_codes_do_not_depend_on_its_batch():
  """Per-example keys: the first two examples get the same codes alone as in a batch of 4."""
  mc, _ = tiny_configs()
  x = jax.random.normal(jax.random.key(0), (4, 9, mc.d_model))
  keys = jax.random.split(jax.random.key(2), 4)
  quantizer = GumbelQuantizer(mc, deterministic=False)
  params = quantizer.init(jax.random.key(1), x, 1.0, keys)
  _, whole, _ = quantizer.apply(params, x, 1.0, keys)
  _, part, _ = quantizer.apply(params, x[:2], 1.0, keys[:2])
  np.testing.assert_array_equal(whole[:2], part)


def test_straight_through_gradient_reaches_the_logits():
  mc, _ = tiny_configs()
  x = jax.random.normal(jax.random.key(0), (1, 5, mc.d_model))
  params = GumbelQuantizer(mc).init(jax.random.key(1), x, 1.0)

  keys = jax.random.split(jax.random.key(3), 1)
  weights = jax.random.normal(jax.random.key(4), (1, 5, mc.code_dim))

  def loss(p):
    q, _, _ = GumbelQuantizer(mc, deterministic=False).apply(p, x, 1.0, keys)
    return jnp.sum(q * weights)

  grads = jax.grad(loss)(params)['params']
  assert float(jnp.abs(grads['logits']['kernel'].value).sum()) > 0
  # The codebook learns only through the rows chosen (straight-through).
  _, ids, _ = GumbelQuantizer(mc, deterministic=False).apply(params, x, 1.0, keys)
  codebook_grad = np.asarray(grads['codebook'].value)
  ids, weights = np.asarray(ids)[0], np.asarray(weights)[0]
  for code in range(mc.num_codes):
    np.testing.assert_allclose(codebook_grad[code], weights[ids == code].sum(0), atol=1e-6)


@pytest.mark.parametrize('gin_file,train_steps,end_step', [
    ('gin/pretrain_0.6b.gin', 1_300_000, 598_000),
    ('gin/pretrain_2b.gin', 350_000, 161_000),
    ('gin/pretrain_tiny_cpu.gin', 300, 138),
])
def test_temperature_reaches_its_end_at_the_configured_step(gin_file, train_steps, end_step):
  """Each run's schedule, from its gin file: start at 0, end at anneal_fraction * TRAIN_STEPS."""
  gin_utils.parse_gin([gin_file], writes_model_dir=False)
  assert gin.query_parameter('%TRAIN_STEPS') == train_steps
  start = gin.query_parameter('gumbel_temperature.start')
  end = gin.query_parameter('gumbel_temperature.end')
  fraction = gin.query_parameter('gumbel_temperature.anneal_fraction')
  assert round(fraction * train_steps) == end_step
  assert float(gumbel_temperature(0)) == pytest.approx(start, rel=1e-6)
  assert gumbel_temperature(end_step) == np.float32(end)
  assert gumbel_temperature(train_steps) == np.float32(end)
  assert float(gumbel_temperature(end_step - max(end_step // 100, 1))) > end * 1.01
  # Exponential in between: halfway, the geometric mean of the ends.
  assert float(gumbel_temperature(end_step / 2)) == pytest.approx((start * end) ** 0.5, rel=1e-5)
  steps = np.linspace(0, train_steps, 50)
  temps = [float(gumbel_temperature(s)) for s in steps]
  assert temps == sorted(temps, reverse=True)


def test_paper_0p6b_schedule_is_wav2vec2s_per_step_decay():
  """For 1.3M steps the anneal matches wav2vec 2.0's 2.0 * 0.999995^step within 1%."""
  gin_utils.parse_gin(['gin/pretrain_0.6b.gin'], writes_model_dir=False)
  for step in (10_000, 100_000, 300_000, 590_000):
    assert float(gumbel_temperature(step)) == pytest.approx(2.0 * 0.999995 ** step, rel=1e-2)
