"""benchmarks/step_profile.py reads matmul FLOPs from compiled HLO, fused dots included."""

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
  flops = step_profile.op_flops(hlo)
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
