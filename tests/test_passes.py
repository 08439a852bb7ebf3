"""Merged passes (mslam_jax.models.passes): exact results, one call per shape, rows kept on their device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslam_jax import partitioning
from mslam_jax.models import passes

RULES = partitioning.default_rules()  # the gin copy of the rules
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices: '
                             'XLA_FLAGS=--xla_force_host_platform_device_count=8')


def _rows(n, offset, width=3):
  return jnp.asarray(offset + np.arange(n * width, dtype=np.float32).reshape(n, width))


def test_join_keeps_each_shards_rows_together_and_split_inverts_it():
  a, b = _rows(4, 0), _rows(2, 100)
  np.testing.assert_array_equal(passes.join([a, b], 1), np.concatenate([a, b]))
  # Two shards: shard 0 holds a's first half then b's first half, and so on.
  want = np.concatenate([a[:2], b[:1], a[2:], b[1:]])
  joined = passes.join([a, b], 2)
  np.testing.assert_array_equal(joined, want)
  for shards in (1, 2):
    back = passes.split(passes.join([a, b], shards), [4, 2], shards)
    np.testing.assert_array_equal(back[0], a)
    np.testing.assert_array_equal(back[1], b)


def test_apply_merged_calls_once_per_shape_with_the_results_of_separate_calls():
  calls = []

  def fn(x, y):  # row-wise, two outputs
    calls.append(x.shape)
    return x * 2 + y[:, :, None], jnp.sum(x, axis=-1)

  rng = np.random.default_rng(0)
  inputs = [(jnp.asarray(rng.normal(size=(b, t, 4)), jnp.float32),
             jnp.asarray(rng.normal(size=(b, t)), jnp.float32))
            for b, t in ((2, 5), (3, 5), (2, 7))]
  inputs.insert(1, None)
  want = [None if args is None else fn(*args) for args in inputs]
  calls.clear()
  got = passes.apply_merged(fn, inputs)
  assert sorted(calls) == [(2, 7, 4), (5, 5, 4)]  # the two length-5 inputs ran as one batch
  assert got[1] is None
  for g, w in zip(got, want):
    if w is not None:
      for g_out, w_out in zip(g, w):
        np.testing.assert_allclose(g_out, w_out, rtol=1e-6)
  calls.clear()
  passes.apply_merged(fn, inputs, merge=False)
  assert len(calls) == 3


@needs_8
def test_batch_shards_follow_the_mesh_and_the_gin_rules():
  assert passes.batch_shards() == 1  # no mesh
  mesh = partitioning.make_mesh(partitioning.MeshConfig(shape=(2, 2, 2)), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    # The rules split 'batch' over (data, fsdp): 2 x 2 devices.
    assert passes.batch_shards() == 4
  mesh = partitioning.make_mesh(partitioning.MeshConfig(shape=(1, 1, 8)), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    assert passes.batch_shards() == 1  # tensor parallel only: the batch is not split


@needs_8
def test_a_merged_pass_over_a_sharded_batch_moves_no_rows_between_devices():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(shape=(8, 1, 1)), jax.devices()[:8])
  batch = partitioning.batch_sharding(mesh)
  a, b = _rows(16, 0, width=8), _rows(8, 1000, width=8)

  def merged(x, y):
    return tuple(passes.apply_merged(lambda z: jnp.tanh(z) * 3.0, [(x,), (y,)]))

  def concatenated(x, y):  # the plain concatenation the shard-local join avoids
    out = jnp.tanh(jnp.concatenate([x, y])) * 3.0
    return out[:16], out[16:]

  compiled = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    for name, fn in (('merged', merged), ('concatenated', concatenated)):
      jitted = jax.jit(fn, in_shardings=(batch, batch), out_shardings=(batch, batch))
      compiled[name] = jitted.lower(a, b).compile()
      got = compiled[name](jax.device_put(a, batch), jax.device_put(b, batch))
      np.testing.assert_allclose(got[0], np.tanh(a) * 3.0, rtol=1e-6)
      np.testing.assert_allclose(got[1], np.tanh(b) * 3.0, rtol=1e-6)
  collectives = ('all-to-all', 'collective-permute', 'all-gather', 'all-reduce')
  text = {name: c.as_text() for name, c in compiled.items()}
  assert not [op for op in collectives if op in text['merged']]
  assert [op for op in collectives if op in text['concatenated']]
