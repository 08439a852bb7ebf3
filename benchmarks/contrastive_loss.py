"""Memory and time of the contrastive loss, forward + backward: candidate tensor against all-pairs.

  before: the form mslam_jax used up to commit 2b369fa, read from git history:
          K distractors gathered into a [B, T, K+1, C] candidate tensor, cosines
          on it, same code decided by vector equality;
  after:  mslam_jax.losses.contrastive.contrastive_loss: unit vectors, one
          [T, C] x [C, T] similarity matrix per utterance, K+1 logits gathered
          from it, same code decided by id.

The batch is split over N fake CPU devices (jit with explicit shardings, as
the train step). Memory: XLA's buffer assignment per device for the global
batch (`mslam_jax.compile.memory_per_device`), from abstract inputs, so the
paper's batch compiles on any machine. Time: median wall time of the jitted
loss and its gradients with respect to context and targets on real inputs, at
a batch that fits this machine for both forms.

    python benchmarks/contrastive_loss.py --devices 8 --batch 2048 --frames 400 \
        --code_dim 1024 --negatives 100 --time_batch 64
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import machine  # benchmarks/machine.py, beside this script

BEFORE_COMMIT = '2b369fa'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


def load_before(commit: str):
  """The contrastive module as it was at `commit` (git show), as a Python module."""
  source = subprocess.run(['git', 'show', f'{commit}:mslam_jax/losses/contrastive.py'],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
  module = types.ModuleType(f'contrastive_at_{commit}')
  exec(compile(source, module.__name__, 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch', type=int, default=2048, help='global utterances (memory)')
  parser.add_argument('--frames', type=int, default=400, help='encoder frames per utterance')
  parser.add_argument('--code_dim', type=int, default=1024)
  parser.add_argument('--negatives', type=int, default=100)
  parser.add_argument('--time_batch', type=int, default=64, help='global utterances (time)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--before', default=BEFORE_COMMIT, help='commit of the "before" form')
  parser.add_argument('--time_after_only', action='store_true',
                      help='time only the new form (the old one needs ~40 GiB per utterance)')
  args = parser.parse_args()

  from mslam_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  compile_lib.use_fake_cpu_devices(args.devices)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mslam_jax import masking  # pylint: disable=g-import-not-at-top
  from mslam_jax.losses import contrastive  # pylint: disable=g-import-not-at-top

  compile_lib.require_devices(args.devices)
  before = load_before(args.before)
  mesh = jax.make_mesh((args.devices,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P('batch'))
  replicated = NamedSharding(mesh, P())

  def grads_of(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                   in_shardings=(rows,) * 5, out_shardings=(replicated, (rows, rows)))

  forms = {
      'before (candidate tensor)': grads_of(
          lambda c, q, ids, m, n: before.contrastive_loss(c, q, m, n, temperature=0.1)[0]),
      'after (all-pairs similarity)': grads_of(
          lambda c, q, ids, m, n: contrastive.contrastive_loss(c, q, ids, m, n,
                                                               temperature=0.1)[0]),
  }

  def abstract(batch):
    t, c, k = args.frames, args.code_dim, args.negatives
    f32, i32 = jnp.float32, jnp.int32
    return (jax.ShapeDtypeStruct((batch, t, c), f32, sharding=rows),
            jax.ShapeDtypeStruct((batch, t, c), f32, sharding=rows),
            jax.ShapeDtypeStruct((batch, t), i32, sharding=rows),
            jax.ShapeDtypeStruct((batch, t), jnp.bool_, sharding=rows),
            jax.ShapeDtypeStruct((batch, t, k), i32, sharding=rows))

  def real(batch):
    keys = jax.random.split(jax.random.key(0), 5)
    t, c = args.frames, args.code_dim
    context = jax.random.normal(keys[0], (batch, t, c))
    ids = jax.random.randint(keys[1], (batch, t), 0, 1024)
    codebook = jax.random.uniform(keys[2], (1024, c))
    mask = masking.span_mask(keys[3], jnp.zeros((batch, t)), start_prob=0.065, span_length=10)
    negatives = contrastive.sample_negative_indices(keys[4], mask, args.negatives)
    return tuple(jax.device_put(x, rows) for x in (context, codebook[ids], ids, mask, negatives))

  print(f'jax {jax.__version__}; {args.devices} fake CPU devices; {machine.cpu_summary()}',
        flush=True)
  print(f'memory: global batch {args.batch} x {args.frames} frames x {args.code_dim}, '
        f'K = {args.negatives}, {args.batch // args.devices} utterances per device', flush=True)
  results = {}
  for name, fn in forms.items():
    start = time.perf_counter()
    compiled = fn.lower(*abstract(args.batch)).compile()
    memory, total = compile_lib.memory_per_device(compiled)
    results[name] = dict(compile_s=time.perf_counter() - start, temp=memory['temp'],
                         argument=memory['argument'], total=total)
    print(f'  {name}: temp {memory["temp"] / GIB:.3f} GiB, total {total / GIB:.3f} GiB '
          f'per device (compiled in {results[name]["compile_s"]:.1f} s)', flush=True)

  print(f'time: global batch {args.time_batch}, {args.time_batch // args.devices} utterances '
        f'per device, median of {args.repeats}', flush=True)
  inputs = real(args.time_batch)
  values = {}
  for name, fn in forms.items():
    if args.time_after_only and name.startswith('before'):
      continue
    loss, grads = fn(*inputs)
    jax.block_until_ready(grads)
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*inputs))
      times.append(time.perf_counter() - start)
    results[name].update(median_s=statistics.median(times), min_s=min(times),
                         max_s=max(times))
    values[name] = (float(loss), [np.asarray(g) for g in grads])
    print(f'  {name}: {statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, '
          f'max {max(times) * 1e3:.1f}); loss {float(loss):.6f}', flush=True)
  if len(values) == 2:
    (loss_a, grads_a), (loss_b, grads_b) = values.values()
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(grads_a, grads_b))
    print(f'  same results: |loss difference| {abs(loss_a - loss_b):.2e}, '
          f'max |gradient difference| {worst:.2e}', flush=True)

  ms = lambda r: (f'{r["median_s"] * 1e3:.1f} (min {r["min_s"] * 1e3:.1f}, '
                  f'max {r["max_s"] * 1e3:.1f})' if 'median_s' in r else 'not run')
  (_, a), (_, b) = results.items()
  print('\n| form | temp / device (GiB) | total / device (GiB) | '
        f'fwd+bwd at batch {args.time_batch} (ms, median) |')
  print('|---|---|---|---|')
  for name, r in results.items():
    print(f'| {name} | {r["temp"] / GIB:.3f} | {r["total"] / GIB:.3f} | {ms(r)} |')
  speedup = f'{a["median_s"] / b["median_s"]:.2f}x' if 'median_s' in a else '-'
  print(f'| ratio before / after | {a["temp"] / b["temp"]:.1f}x | {a["total"] / b["total"]:.1f}x | '
        f'{speedup} |')


if __name__ == '__main__':
  sys.exit(main())
