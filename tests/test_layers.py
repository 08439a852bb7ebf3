"""Building blocks against independent references (lax conv, numpy)."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

from mslam_jax.models import layers


def _grouped_lax_conv(x, kernel):
  """The depthwise convolution as XLA's grouped convolution (an independent reference)."""
  half = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel[:, None, :], window_strides=(1,), padding=((half, half),),
      dimension_numbers=('NWC', 'WIO', 'NWC'), feature_group_count=x.shape[-1])


def test_depthwise_conv_matches_grouped_lax_conv():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 11, 6)).astype(np.float32)
  kernel = rng.normal(size=(5, 6)).astype(np.float32)
  ours = layers.depthwise_conv1d(jnp.asarray(x), jnp.asarray(kernel))
  ref = _grouped_lax_conv(x, kernel)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # And against a plain numpy loop (correlation, zeros outside).
  loop = np.zeros_like(x)
  for t in range(11):
    for k in range(5):
      s = t + k - 2
      if 0 <= s < 11:
        loop[:, t] += kernel[k] * x[:, s]
  np.testing.assert_allclose(ours, loop, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_gradients_match_grouped_lax_conv():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 13, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(3, 13, 6)), jnp.float32)

  def grads(conv):
    return jax.grad(lambda x, k: jnp.sum(conv(x, k) * weights), argnums=(0, 1))(x, kernel)

  for ours, ref in zip(grads(layers.depthwise_conv1d), grads(_grouped_lax_conv)):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # Second order too (the written-out backward is itself differentiable).
  check_grads(layers.depthwise_conv1d, (x, kernel), order=2, modes=['rev'],
                            atol=1e-2, rtol=1e-2)


def test_depthwise_conv_gradients_in_bfloat16_keep_dtypes_and_match_float64():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 64, 8)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 8)), jnp.bfloat16)
  grad_x, grad_kernel = jax.grad(
      lambda x, k: jnp.sum(layers.depthwise_conv1d(x, k).astype(jnp.float32)),
      argnums=(0, 1))(x, kernel)
  assert grad_x.dtype == jnp.bfloat16 and grad_kernel.dtype == jnp.bfloat16
  # d/dkernel[k, c] of the sum = sum over (b, t) of x shifted by k: 256 terms each,
  # compared with a float64 numpy sum of the same bf16 inputs.
  xs = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (0, 0)))
  expected = np.stack([xs[:, k:k + 64].sum(axis=(0, 1)) for k in range(3)])
  np.testing.assert_allclose(np.asarray(grad_kernel, np.float64), expected, rtol=1e-2, atol=0.1)


def test_depthwise_conv_keeps_only_its_inputs_for_the_backward_pass(capsys):
  x, kernel = jnp.ones((2, 11, 6)), jnp.ones((5, 6))
  print_saved_residuals(lambda x, k: jnp.sum(layers.depthwise_conv1d(x, k)), x, kernel)
  saved = capsys.readouterr().out.strip().splitlines()
  # Autodiff of the shifted sum would keep the K = 5 shifted copies of x.
  assert saved == ['f32[2,11,6] from the argument x', 'f32[5,6] from the argument k'], saved


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


def _numpy_attention(q, k, v, paddings):
  """Per example and head, with a Python loop over keys that skips padded ones."""
  batch, time, heads, dim = q.shape
  out = np.zeros_like(q)
  for b in range(batch):
    valid = [s for s in range(k.shape[1]) if paddings[b, s] < 0.5]
    for n in range(heads):
      for t in range(time):
        logits = np.array([q[b, t, n] @ k[b, s, n] / math.sqrt(dim) for s in valid])
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        out[b, t, n] = sum(w * v[b, s, n] for w, s in zip(weights, valid))
  return out


def test_dot_product_attention_equals_numpy_and_ignores_padded_keys():
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  paddings = np.array([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], np.float32)
  ours = layers.dot_product_attention(q, k, v, layers.attention_bias(jnp.asarray(paddings)))
  np.testing.assert_allclose(ours, _numpy_attention(q, k, v, paddings), rtol=1e-5, atol=1e-5)
  # Padded keys' values do not leak into any output.
  k2, v2 = k.copy(), v.copy()
  k2[1, 3:], v2[1, 3:] = 100.0, -100.0
  again = layers.dot_product_attention(q, k2, v2, layers.attention_bias(jnp.asarray(paddings)))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))
  # An all-pad example gets uniform weights (the mean of the values), not NaN.
  all_pad = layers.dot_product_attention(q[:1], k[:1], v[:1],
                                         layers.attention_bias(jnp.ones((1, 5))))
  np.testing.assert_allclose(all_pad, np.broadcast_to(v[:1].mean(axis=1, keepdims=True),
                                                      all_pad.shape), rtol=1e-5, atol=1e-6)


def _vjp(fn, x, cotangent):
  out, pullback = jax.vjp(fn, x)
  return out, pullback(cotangent)[0]


def test_softmax_swish_glu_values_and_gradients_equal_jax_nn():
  """Custom backward passes against jax's own differentiation of the plain formulas."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, 4, 8)).astype(np.float32) * 3)
  pairs = [
      (layers.softmax, lambda a: jax.nn.softmax(a, axis=-1), x),
      (layers.swish, lambda a: a * (1 / (1 + jnp.exp(-a))), x),
      (layers.glu, lambda a: a[..., :4] * (1 / (1 + jnp.exp(-a[..., 4:]))), x),
  ]
  for ours, reference, arg in pairs:
    cotangent = jnp.asarray(rng.normal(size=reference(arg).shape).astype(np.float32))
    out, grad = _vjp(ours, arg, cotangent)
    ref_out, ref_grad = _vjp(reference, arg, cotangent)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)
    # Second use: jit and a sum of outputs, as inside a training step.
    g = jax.jit(jax.grad(lambda a, fn=ours: jnp.sum(fn(a) * cotangent)))(arg)
    np.testing.assert_allclose(g, ref_grad, rtol=1e-4, atol=1e-5)


def test_dense_layers_equal_numpy_products_and_their_gradients():
  """FlatDense and MultiAxisDense (one 2-D product) against numpy's einsum, values and grads."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 8)).astype(np.float32)
  flat = layers.dense(6, ('embed', 'mlp'), name='d')
  params = nn.unbox(flat.init(jax.random.key(0), x)['params'])
  kernel, bias = (np.asarray(params[k]) for k in ('kernel', 'bias'))
  np.testing.assert_allclose(flat.apply({'params': params}, x),
                             np.einsum('btd,df->btf', x, kernel) + bias, rtol=1e-5, atol=1e-5)
  # d/dkernel of sum(y * g) is sum over b, t of x (outer) g.
  g = rng.standard_normal((3, 5, 6)).astype(np.float32)
  grads = jax.grad(lambda p: jnp.sum(flat.apply({'params': p}, x) * g))(params)
  np.testing.assert_allclose(grads['kernel'], np.einsum('btd,btf->df', x, g), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(grads['bias'], g.sum((0, 1)), rtol=1e-4, atol=1e-4)

  # The weight gradient from a written-out x^T: the same values and gradients,
  # and the copy is there (an optimization barrier) only when asked for.
  wide = layers.dense(6, ('embed', 'mlp'), name='d', transposed_weight_gradient=True)

  def loss_and_grads(module):
    def loss(p, x):
      return jnp.sum(module.apply({'params': p}, x) * g)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  (value, (grads_wide, dx_wide)), (ref_value, (ref_grads, ref_dx)) = (
      loss_and_grads(wide), loss_and_grads(flat))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grads_wide['kernel'], np.einsum('btd,btf->df', x, g), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(dx_wide, np.einsum('btf,df->btd', g, kernel), rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves((grads_wide, dx_wide)), jax.tree.leaves((ref_grads, ref_dx))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  barriers = {
      name: str(jax.make_jaxpr(jax.grad(lambda p, m=m: jnp.sum(m.apply({'params': p}, x) * g)))(
          params)).count('optimization_barrier')
      for name, m in (('wide', wide), ('flat', flat))}
  assert barriers == {'wide': 1, 'flat': 0}

  heads = layers.MultiAxisDense(out_shape=(2, 4), num_in_axes=1, axes=('embed', 'heads', 'kv'))
  params = nn.unbox(heads.init(jax.random.key(1), x)['params'])
  kernel, bias = (np.asarray(params[k]) for k in ('kernel', 'bias'))
  y = heads.apply({'params': params}, x)
  np.testing.assert_allclose(y, np.einsum('btd,dhk->bthk', x, kernel) + bias, rtol=1e-5,
                             atol=1e-5)
  back = layers.MultiAxisDense(out_shape=(8,), num_in_axes=2, axes=('heads', 'kv', 'embed'))
  params = nn.unbox(back.init(jax.random.key(2), y)['params'])
  np.testing.assert_allclose(back.apply({'params': params}, y),
                             np.einsum('bthk,hkd->btd', np.asarray(y), np.asarray(params['kernel']))
                             + np.asarray(params['bias']), rtol=1e-4, atol=1e-4)
  g = rng.standard_normal((3, 5, 8)).astype(np.float32)
  grads = jax.grad(lambda p: jnp.sum(back.apply({'params': p}, y) * g))(params)
  np.testing.assert_allclose(grads['kernel'], np.einsum('bthk,btd->hkd', np.asarray(y), g),
                             rtol=1e-4, atol=1e-4)


def _auto_barriers(monkeypatch, setting: str, *, avx2_only: bool, avx512: bool, d_in: int,
                   d_out: int, dtype=jnp.float32, platforms=('cpu',)) -> int:
  """Barriers (one per written-out x^T or flipped product) in the exported gradient of a
  dense layer with `setting` = 'auto' on a host with these flags."""
  monkeypatch.setattr(layers.host_cpu, 'avx2_without_avx512', lambda: avx2_only)
  monkeypatch.setattr(layers.host_cpu, 'has_avx512', lambda: avx512)
  module = layers.dense(d_out, ('embed', 'mlp'), name='d', dtype=dtype, **{setting: 'auto'})
  x = jnp.ones((2, 3, d_in), jnp.float32)
  params = nn.unbox(module.init(jax.random.key(0), x)['params'])
  grad = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({'params': p}, x))))
  exported = jax.export.export(grad, platforms=platforms)(params)
  return exported.mlir_module().count('stablehlo.optimization_barrier')


def _auto_dense_barriers(monkeypatch, avx2_only: bool, width: int, dtype=jnp.float32,
                         platforms=('cpu',)) -> int:
  """Written-out x^T copies in the gradient of a widening transposed_weight_gradient='auto' layer."""
  return _auto_barriers(monkeypatch, 'transposed_weight_gradient', avx2_only=avx2_only,
                        avx512=not avx2_only, d_in=width, d_out=2 * width, dtype=dtype,
                        platforms=platforms)


def test_auto_transposed_weight_gradient_only_where_measured_to_pay(monkeypatch):
  """'auto': the x^T copy for fp32 layers >= 256 wide in CPU programs of AVX2-only hosts."""
  wide = layers.AUTO_TRANSPOSED_MIN_WIDTH
  assert _auto_dense_barriers(monkeypatch, True, wide) == 1
  assert _auto_dense_barriers(monkeypatch, True, wide // 4) == 0    # the tiny demo's d 64
  assert _auto_dense_barriers(monkeypatch, False, wide) == 0        # AVX-512 (or not x86)
  assert _auto_dense_barriers(monkeypatch, True, wide, jnp.bfloat16) == 0
  # A TPU program compiled on such a host (mslam_jax.compile --topology) keeps
  # autodiff's product; a program for both keeps each platform's choice.
  assert _auto_dense_barriers(monkeypatch, True, wide, platforms=('tpu',)) == 0
  assert _auto_dense_barriers(monkeypatch, True, wide, platforms=('cpu', 'tpu')) == 1


def test_flipped_weight_gradient_equals_numpy():
  """dw as (dy^T x)^T: autodiff's values and gradients (numpy), one barrier, only where asked."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 5, 12)).astype(np.float32)
  g = rng.standard_normal((3, 5, 4)).astype(np.float32)
  results, barriers = {}, {}
  for flipped in (True, False):
    module = layers.dense(4, ('mlp', 'embed'), name='d', flipped_weight_gradient=flipped)
    params = nn.unbox(module.init(jax.random.key(0), x)['params'])
    loss = lambda p, x, m=module: jnp.sum(m.apply({'params': p}, x) * g)
    results[flipped] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    barriers[flipped] = str(jax.make_jaxpr(jax.grad(loss))(params, x)).count(
        'optimization_barrier')
  value, (grads, dx) = results[True]
  kernel = np.asarray(params['kernel'])
  np.testing.assert_allclose(value, np.sum((x @ kernel + np.asarray(params['bias'])) * g),
                             rtol=1e-5)
  np.testing.assert_allclose(grads['kernel'], np.einsum('btd,btf->df', x, g), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(grads['bias'], g.sum((0, 1)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g @ kernel.T, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert barriers == {True: 1, False: 0}
  with pytest.raises(ValueError, match="dense 'd': .*set at most one"):
    layers.dense(4, ('mlp', 'embed'), name='d', flipped_weight_gradient='auto',
                 transposed_weight_gradient=True)


def _auto_flipped_barriers(monkeypatch, avx512: bool, d_in: int, d_out: int,
                           dtype=jnp.float32, platforms=('cpu',)) -> int:
  """Flipped products in the gradient of a flipped_weight_gradient='auto' layer."""
  return _auto_barriers(monkeypatch, 'flipped_weight_gradient', avx2_only=not avx512,
                        avx512=avx512, d_in=d_in, d_out=d_out, dtype=dtype, platforms=platforms)


def test_auto_flipped_weight_gradient_only_where_measured_to_pay(monkeypatch):
  """'auto': the flipped product for fp32 narrowing layers with outputs >= 256 wide, in CPU
  programs of AVX-512 hosts."""
  width = layers.AUTO_TRANSPOSED_MIN_WIDTH
  assert _auto_flipped_barriers(monkeypatch, True, 4 * width, width) == 1   # d256's wo
  assert _auto_flipped_barriers(monkeypatch, True, width, 4 * width) == 0   # widening
  assert _auto_flipped_barriers(monkeypatch, True, width, width) == 0       # square
  assert _auto_flipped_barriers(monkeypatch, True, 128, 64) == 0            # the tiny demo's wo
  assert _auto_flipped_barriers(monkeypatch, False, 4 * width, width) == 0  # AVX2-only, not x86
  assert _auto_flipped_barriers(monkeypatch, True, 4 * width, width, jnp.bfloat16) == 0
  assert _auto_flipped_barriers(monkeypatch, True, 4 * width, width, platforms=('tpu',)) == 0
  assert _auto_flipped_barriers(monkeypatch, True, 4 * width, width,
                                platforms=('cpu', 'tpu')) == 1


def test_auto_transposed_weight_gradient_values(monkeypatch):
  """With the copy switched on, 'auto' gives autodiff's values and gradients (numpy)."""
  monkeypatch.setattr(layers.host_cpu, 'avx2_without_avx512', lambda: True)
  width = layers.AUTO_TRANSPOSED_MIN_WIDTH
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, width)).astype(np.float32)
  g = rng.normal(size=(2, 5, 8)).astype(np.float32)
  module = layers.dense(8, ('embed', 'mlp'), name='d', transposed_weight_gradient='auto')
  params = nn.unbox(module.init(jax.random.key(0), x)['params'])
  loss = lambda p, x: jnp.sum(module.apply({'params': p}, x) * g)
  grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  kernel = np.asarray(params['kernel'])
  np.testing.assert_allclose(module.apply({'params': params}, x),
                             x @ kernel + np.asarray(params['bias']), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads['kernel'], np.einsum('btd,btf->df', x, g), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(dx, g @ kernel.T, rtol=1e-4, atol=1e-4)


# --- bf16 products accumulated in float32 (cpu_bf16_products) ---------------------------


def _bf16(a) -> jax.Array:
  return jnp.asarray(a, jnp.bfloat16)


def _f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize('d_in, d_out', [(16, 40), (40, 16)])  # dw from x^T; from dy^T
def test_float32_accumulation_equals_float64_products_of_the_bf16_values(d_in, d_out):
  """affine_float32_accumulation and its gradients against float64 numpy on the same bf16
  values: each result is the exact value rounded once to bf16 (half an ulp, 2^-9 relative),
  up to float32 accumulation error."""
  rng = np.random.default_rng(5)
  x, w, b = (_bf16(rng.standard_normal(s)) for s in ((48, d_in), (d_in, d_out), (d_out,)))
  g = _bf16(rng.standard_normal((48, d_out)))

  def loss(x, w, b):
    return jnp.sum(layers.affine_float32_accumulation(x, w, b).astype(jnp.float32)
                   * g.astype(jnp.float32))

  y = jax.jit(layers.affine_float32_accumulation)(x, w, b)
  dx, dw, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
  assert {a.dtype for a in (y, dx, dw, db)} == {jnp.dtype(jnp.bfloat16)}
  rounding = dict(rtol=2 ** -8, atol=1e-4)
  np.testing.assert_allclose(_f64(y), _f64(x) @ _f64(w) + _f64(b), **rounding)
  np.testing.assert_allclose(_f64(dx), _f64(g) @ _f64(w).T, **rounding)
  np.testing.assert_allclose(_f64(dw), _f64(x).T @ _f64(g), **rounding)
  np.testing.assert_allclose(_f64(db), _f64(g).sum(0), **rounding)


_DOT_LINE = re.compile(r'%?[\w.\-]+ = (\w+)\[[^\n]*? dot\(%?([\w.\-]+), %?([\w.\-]+)\)')


def _product_dtypes(hlo: str):
  """(lhs, rhs, result) element types of every dot instruction in compiled HLO text."""
  types = dict(re.findall(r'%?([\w.\-]+) = (\w+)\[', hlo))
  return sorted((types[lhs], types[rhs], out) for out, lhs, rhs in _DOT_LINE.findall(hlo))


@pytest.mark.parametrize('d_in, d_out', [(32, 48), (48, 32)])
def test_float32_accumulation_keeps_bf16_operands_in_the_compiled_cpu_program(d_in, d_out):
  """Forward, input gradient and weight gradient: three bf16 x bf16 -> float32 products
  (which XLA:CPU runs in YNNPACK), also with the weight gradient's transposed operand;
  nn.Dense's bf16 products get float32 operands instead (converted first)."""
  rng = np.random.default_rng(7)
  x, w, b, g = (_bf16(rng.standard_normal(s))
                for s in ((64, d_in), (d_in, d_out), (d_out,), (64, d_out)))

  def compiled(affine):
    loss = lambda x, w, b: jnp.sum(affine(x, w, b) * g, dtype=jnp.float32)
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))  # the forward product stays live
    return jax.jit(grad).lower(x, w, b).compile().as_text()

  assert _product_dtypes(compiled(layers.affine_float32_accumulation)) == (
      [('bf16', 'bf16', 'f32')] * 3)
  plain = _product_dtypes(compiled(lambda x, w, b: x @ w + b))
  assert len(plain) == 3 and all(lhs == 'f32' for lhs, _, _ in plain)


@pytest.mark.parametrize('make', [
    lambda bf16: layers.dense(24, ('embed', 'mlp'), name='d', dtype=jnp.bfloat16,
                              cpu_bf16_products=bf16),
    lambda bf16: layers.MultiAxisDense((2, 12), 1, ('embed', 'heads', 'kv'), jnp.bfloat16,
                                       cpu_bf16_products=bf16)])
def test_bf16_layers_keep_their_parameters_and_outputs_with_float32_accumulation(make):
  """FlatDense and MultiAxisDense with cpu_bf16_products=True: nn.Dense's parameters (names,
  shapes, initial values), and the same outputs and gradients within bf16 rounding."""
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 5, 16)).astype(np.float32)
  results = {}
  for bf16 in (True, False):
    module = make(bf16)
    params = nn.unbox(module.init(jax.random.key(0), x)['params'])
    loss = lambda p, m=module: jnp.sum(m.apply({'params': p}, x).astype(jnp.float32) ** 2)
    results[bf16] = params, jax.jit(jax.value_and_grad(loss))(params)
  (params, (value, grads)), (ref_params, (ref_value, ref_grads)) = results[True], results[False]
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(value, ref_value, rtol=2e-2)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2 * np.abs(b).max())


def _bf16_barriers(monkeypatch, bf16_host: bool, dtype, platforms=('cpu',)) -> int:
  """Written-out transposes in the exported gradient of a cpu_bf16_products='auto' layer."""
  monkeypatch.setattr(layers.host_cpu, 'has_avx512_bf16', lambda: bf16_host)
  module = layers.dense(32, ('embed', 'mlp'), name='d', dtype=dtype, cpu_bf16_products='auto')
  x = jnp.ones((2, 3, 16), jnp.float32)
  params = nn.unbox(module.init(jax.random.key(0), x)['params'])
  grad = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({'params': p}, x))))
  exported = jax.export.export(grad, platforms=platforms)(params)
  return exported.mlir_module().count('stablehlo.optimization_barrier')


def test_auto_bf16_products_only_where_measured_to_pay(monkeypatch):
  """'auto': bf16 layers, in CPU programs of hosts with AVX-512 BF16."""
  assert _bf16_barriers(monkeypatch, True, jnp.bfloat16) == 1
  assert _bf16_barriers(monkeypatch, False, jnp.bfloat16) == 0
  assert _bf16_barriers(monkeypatch, True, jnp.float32) == 0
  assert _bf16_barriers(monkeypatch, True, jnp.bfloat16, platforms=('tpu',)) == 0
  assert _bf16_barriers(monkeypatch, True, jnp.bfloat16, platforms=('cpu', 'tpu')) == 1


def test_attention_float32_accumulation_equals_float64_attention_of_the_bf16_values():
  """attention_float32_accumulation within bf16 rounding of float64 references on the same
  bf16 values (its output: the numpy loop; its gradients: jax.grad of dot_product_attention
  in float64); padded keys still do not leak; six bf16 x bf16 -> float32 products in the
  compiled CPU program."""
  rng = np.random.default_rng(8)
  q, k, v, g = (_bf16(rng.standard_normal((2, 24, 2, 16))) for _ in range(4))
  paddings = np.zeros((2, 24), np.float32)
  paddings[1, 17:] = 1.0
  bias = layers.attention_bias(jnp.asarray(paddings))

  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v, bias).astype(jnp.float32) * g.astype(jnp.float32))

  grad = jax.jit(jax.value_and_grad(functools.partial(loss, layers.attention_float32_accumulation),
                                    argnums=(0, 1, 2)))
  value, grads = grad(q, k, v)
  out = jax.jit(layers.attention_float32_accumulation)(q, k, v, bias)
  assert out.dtype == jnp.bfloat16 and all(d.dtype == jnp.bfloat16 for d in grads)
  np.testing.assert_allclose(_f64(out), _numpy_attention(*(_f64(a) for a in (q, k, v)), paddings),
                             rtol=2 ** -7, atol=2e-2)
  with jax.enable_x64():
    ref_value, ref_grads = jax.value_and_grad(
        lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v, bias.astype(jnp.float64))
                                * jnp.asarray(_f64(g))), argnums=(0, 1, 2))(
                                    *(jnp.asarray(_f64(a)) for a in (q, k, v)))
  np.testing.assert_allclose(float(value), float(ref_value), rtol=2e-2)
  for ours, ref in zip(grads, ref_grads):
    ref = np.asarray(ref)
    assert np.linalg.norm(_f64(ours) - ref) <= 2e-2 * np.linalg.norm(ref)
  k2, v2 = np.array(_f64(k)), np.array(_f64(v))
  k2[1, 17:], v2[1, 17:] = 100.0, -100.0
  again = jax.jit(layers.attention_float32_accumulation)(q, _bf16(k2), _bf16(v2), bias)
  np.testing.assert_array_equal(_f64(again), _f64(out))
  hlo = grad.lower(q, k, v).compile().as_text()
  assert _product_dtypes(hlo) == [('bf16', 'bf16', 'f32')] * 6
