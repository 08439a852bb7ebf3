"""One pass through a module for several inputs of the same shape.

A pre-training step sends up to three inputs through the speech layers
(masked speech; the paired speech masked for TLM and clean for CTC) and up
to four through the shared layers (speech, text, the packed TLM sequences,
clean paired speech). `apply_merged` joins the inputs whose shapes past the
batch axis agree into one batch and runs the module once on it: one traced
and compiled copy of the stack instead of several (a shorter compile, fewer
and larger ops per step) for the same FLOPs. It is exact for modules that
treat examples independently, as every mSLAM module does (no batch
statistics; per-example Gumbel keys): each input gets the rows it would get
from a pass of its own, up to float rounding.

Rows are joined shard by shard. With the batch axis split over S devices,
each input [B_i, ...] is seen as [S, B_i / S, ...] and the inputs are joined
on the second axis, so every device's rows stay on that device; a plain
concatenation would move rows between devices in every pass.
"""

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_shards() -> int:
  """Devices the logical 'batch' axis is split over, under the current mesh and rules.

  1 outside a mesh (`jax.set_mesh`) or when the rules leave 'batch' unsplit.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(('batch',))[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def join(arrays: Sequence[jax.Array], shards: int) -> jax.Array:
  """Arrays [B_i, ...] with equal trailing shapes -> [sum B_i, ...], shard-local rows.

  With shards = 1 this is `jnp.concatenate(arrays)`; every B_i must divide by `shards`.
  """
  parts = [a.reshape((shards, a.shape[0] // shards) + a.shape[1:]) for a in arrays]
  joined = jnp.concatenate(parts, axis=1)
  return joined.reshape((-1,) + joined.shape[2:])


def split(joined: jax.Array, sizes: Sequence[int], shards: int) -> List[jax.Array]:
  """Inverse of `join`: [sum sizes, ...] -> arrays [sizes[i], ...]."""
  per_shard = joined.reshape((shards, -1) + joined.shape[1:])
  out, start = [], 0
  for size in sizes:
    rows = per_shard[:, start:start + size // shards]
    out.append(rows.reshape((size,) + joined.shape[1:]))
    start += size // shards
  return out


def _signature(args: Tuple[jax.Array, ...]):
  return tuple((a.shape[1:], a.dtype) for a in args)


def apply_merged(fn: Callable[..., Any], inputs: Sequence[Optional[Tuple[jax.Array, ...]]],
                 merge: bool = True) -> List[Any]:
  """[fn(*args) for args in inputs], calling `fn` once per group of same-shaped inputs.

  Args:
    fn: maps arrays with a leading batch axis to an array or a tuple of
      arrays with the same leading batch axis, each row depending only on
      the same row of the inputs.
    inputs: argument tuples (None entries give None); inputs whose arrays
      agree in shape past the batch axis and in dtype form one group.
    merge: False calls `fn` once per input (the reference; `ModelConfig.merge_passes`).

  Returns:
    One result per input, in order.
  """
  results: List[Any] = [None] * len(inputs)
  groups = {}
  for i, args in enumerate(inputs):
    if args is not None:
      key = _signature(args) if merge else i
      groups.setdefault(key, []).append(i)
  shards = batch_shards()
  for members in groups.values():
    if len(members) == 1:
      results[members[0]] = fn(*inputs[members[0]])
      continue
    sizes = [inputs[i][0].shape[0] for i in members]
    group_shards = shards if all(s % shards == 0 for s in sizes) else 1
    joined_args = [join([inputs[i][k] for i in members], group_shards)
                   for k in range(len(inputs[members[0]]))]
    out = fn(*joined_args)
    if isinstance(out, tuple):
      pieces = [split(o, sizes, group_shards) for o in out]
      for j, i in enumerate(members):
        results[i] = tuple(p[j] for p in pieces)
    else:
      for i, piece in zip(members, split(out, sizes, group_shards)):
        results[i] = piece
  return results
