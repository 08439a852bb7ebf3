"""benchmarks/step_profile.py reads matmul FLOPs, fused dots included, and what runs each
matmul from compiled HLO."""

import jax
import jax.numpy as jnp
import numpy as np

import step_profile  # benchmarks/ (tests/conftest.py puts it on the path)


def _entry_instructions(hlo_text):
  """Names of the instructions of the ENTRY computation: the ops a trace shows."""
  entry = hlo_text[hlo_text.index('\nENTRY'):].splitlines()[1:]
  names = set()
  for line in entry:
    if line.startswith('}'):
      break
    names.add(line.split('=')[0].strip().removeprefix('ROOT ').lstrip('%'))
  return names


def test_op_flops_counts_every_executed_matmul_once():
  """Attention-like program, forward and backward: fused or not, FLOPs match the einsums."""
  b, n, t, h, d = 2, 3, 16, 8, 24
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, n, t, h)), jnp.float32) for _ in range(3))
  w = jnp.asarray(rng.standard_normal((n * h, d)), jnp.float32)

  def loss(q, k, v, w):
    probs = jax.nn.softmax(jnp.einsum('bnth,bnsh->bnts', q, k), axis=-1)
    out = jnp.einsum('bnts,bnsh->bnth', probs, v)
    return jnp.sum(jnp.tanh(out.transpose(0, 2, 1, 3).reshape(b * t, n * h) @ w))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, w).compile().as_text()
  flops = step_profile.op_flops(step_profile.dot_products(hlo))
  executed = sum(f for name, f in flops.items() if name in _entry_instructions(hlo))
  attention = 2 * b * n * t * t * h        # one [t, h] x [h, t] product per batch and head
  projection = 2 * b * t * n * h * d
  # forward: logits, probs @ v, projection; backward: one product of the same size
  # per operand of each (all four inputs are differentiated).
  expected = 3 * (2 * attention + projection)
  assert executed == expected, (executed, expected)


def test_classify_names_fused_matmuls_by_their_flops():
  assert step_profile.classify('ynn_fusion.2', 'jit(f)/jvp()/reduce_sum', 10)[0] == 'matmul'
  assert step_profile.classify('fusion.3', 'jit(f)/transpose(jvp())/mul', 0)[:2] == (
      'other', 'backward')


def _dot_general_reference(lhs, rhs, product):
  """numpy einsum of a dot_general: output axes are batch, lhs free, rhs free."""
  letters = iter('abcdefghijklmnopqrstuvwxyz')
  lhs_axes = [next(letters) for _ in lhs.shape]
  rhs_axes = [next(letters) for _ in rhs.shape]
  for left, right in zip(product.lhs_batch + product.lhs_contracting,
                         product.rhs_batch + product.rhs_contracting):
    rhs_axes[right] = lhs_axes[left]
  out = ([lhs_axes[a] for a in product.lhs_batch]
         + [c for a, c in enumerate(lhs_axes)
            if a not in product.lhs_batch + product.lhs_contracting]
         + [c for a, c in enumerate(rhs_axes)
            if a not in product.rhs_batch + product.rhs_contracting])
  return np.einsum(f"{''.join(lhs_axes)},{''.join(rhs_axes)}->{''.join(out)}", lhs, rhs)


def test_each_products_stand_alone_copy_computes_the_same_dot():
  """Shapes, dimension numbers and dtypes read from compiled HLO rebuild each product."""
  b, n, t, h = 2, 3, 16, 8
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))

  def loss(q, k, v):
    probs = jax.nn.softmax(jnp.einsum('btnh,bsnh->bnts', q, k), axis=-1)
    return jnp.sum(jnp.tanh(jnp.einsum('bnts,bsnh->btnh', probs, v)))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  products = {p for ps in step_profile.dot_products(hlo).values() for p in ps}
  assert products
  for product in products:
    assert product.out_dtype == product.lhs_dtype == 'float32'
    lhs = rng.standard_normal(product.lhs).astype(np.float32)
    rhs = rng.standard_normal(product.rhs).astype(np.float32)
    out = np.asarray(product.function()(lhs, rhs))
    expected = _dot_general_reference(lhs, rhs, product)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    contracted = np.prod([lhs.shape[a] for a in product.lhs_contracting])
    assert product.flops == 2 * expected.size * contracted
  assert step_profile.square(64).flops == 2 * 64 ** 3
  seconds = step_profile.time_alone(list(products) + [step_profile.square(64)], rounds=2)
  assert set(seconds) == products | {step_profile.square(64)}
  assert all(0 < s < 60 for s in seconds.values())


def test_an_async_op_lasts_from_its_launch_to_its_end_event():
  """XLA:CPU's async thunks: launch event + `end: NAME`; a synchronous op keeps its own span."""
  def x(name, ts, dur):
    return {'ph': 'X', 'name': name, 'ts': ts, 'dur': dur}

  events = [
      x('dot.1', 0.0, 0.5), x('fusion.2', 1.0, 3.0),   # dot.1 launched, fusion.2 synchronous
      x('end: dot.1', 9.0, 1.0),                        # dot.1 done at 10
      x('dot.1', 20.0, 0.5), x('end: dot.1', 24.0, 0.0),  # dot.1 again (a loop): done at 24
      x('ThreadpoolListener::Record', 2.0, 5.0),        # not an HLO op of the step
      {'ph': 'i', 'name': 'dot.1', 'ts': 3.0},          # not a complete event
  ]
  spans = step_profile.op_spans(events, {'dot.1', 'fusion.2'})
  assert spans == [('dot.1', 10.0), ('fusion.2', 3.0), ('dot.1', 4.0)]


def test_matmul_runners_reads_the_library_from_each_line():
  hlo = '\n'.join([
      '%ynn_fusion.3 = f32[8,400]{1,0} fusion(%a, %b), kind=kCustom, calls=%fc.3, '
      'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}',
      '  %dot.2 = f32[256,1024]{1,0} dot(%x, %dy), lhs_contracting_dims={0}, '
      'rhs_contracting_dims={0}, metadata={op_name="jit(f)/transpose(jvp())/dot_general"}',
      '  ROOT %fusion.7 = f32[4,4]{1,0} fusion(%c), kind=kCustom, calls=%fc.7, '
      'backend_config={"fusion_config":{"kind":"__onednn_fusion"}}',
      '  %add.1 = f32[4,4]{1,0} add(%c, %c)',
  ])
  assert step_profile.matmul_runners(hlo) == {
      'ynn_fusion.3': 'YNNPACK', 'dot.2': 'Eigen', 'fusion.7': '__onednn_fusion'}


def test_every_executed_matmul_of_a_compiled_step_has_a_runner():
  """The pinned XLA:CPU's HLO: each op that runs a matmul is a library fusion or a bare dot."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
  hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=(0, 1))).lower(
      x, w).compile().as_text()
  runners = step_profile.matmul_runners(hlo)
  flops = step_profile.op_flops(step_profile.dot_products(hlo))
  executed = [name for name in _entry_instructions(hlo) if flops.get(name)]
  assert len(executed) == 3  # x @ w, dx and dw
  assert all(name in runners for name in executed), (executed, runners)
