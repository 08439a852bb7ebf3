"""Depthwise convolution: our shifted multiply-adds against nn.Conv(feature_group_count=D).

The Conformer's depthwise convolution is written as K shifted multiply-adds
(mslam_jax.models.layers.depthwise_conv1d) because XLA's grouped convolution
has a slow weight gradient, worst inside nn.scan, and its backward pass is
written out (a custom VJP) rather than left to autodiff. This times
forward+backward of a stack of `layers` residual depthwise convolutions,
scanned and unrolled, with the three implementations alternated round by
round, prints each one's compiled temporary memory, and checks that they
compute the same function.

    python benchmarks/depthwise_conv.py --batch 8 --time 400 --dim 256 --layers 4 --rounds 15
"""

import argparse
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import machine  # benchmarks/machine.py, beside this script
from mslam_jax.models import layers as mslam_layers


def grouped_conv(x, kernel):
  """The depthwise convolution as nn.Conv(feature_group_count=D) emits it."""
  half = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel[:, None, :], window_strides=(1,), padding=((half, half),),
      dimension_numbers=('NWC', 'WIO', 'NWC'), feature_group_count=x.shape[-1])


class ResidualConv(nn.Module):
  """x + conv(x, kernel), in the (carry, _) -> (carry, None) form nn.scan takes."""
  kernel_size: int
  conv: Callable

  @nn.compact
  def __call__(self, x, _):
    kernel = self.param('kernel', nn.initializers.normal(0.1), (self.kernel_size, x.shape[-1]))
    return x + self.conv(x, kernel), None


def stack(conv, num_layers, kernel_size, scan):
  if scan:
    return nn.scan(ResidualConv, variable_axes={'params': 0}, split_rngs={'params': True},
                   in_axes=nn.broadcast, length=num_layers)(kernel_size, conv)

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      for i in range(num_layers):
        x, _ = ResidualConv(kernel_size, conv, name=f'layer{i}')(x, None)
      return x, None
  return Unrolled()


def alternated(fns, args, rounds):
  """{name: sorted seconds}: one call of each fn per round, in turn, after a compile call."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: sorted(t) for name, t in times.items()}


IMPLEMENTATIONS = (
    ('shifted multiply-adds, written-out backward (ours)', mslam_layers.depthwise_conv1d),
    ('shifted multiply-adds, autodiff backward', mslam_layers.shifted_sum),
    ('nn.Conv-style grouped conv', grouped_conv))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--time', type=int, default=400)
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--kernel', type=int, default=5)
  parser.add_argument('--rounds', type=int, default=15)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.time, args.dim))
  print(f'depthwise_conv: {machine.cpu_summary()}; jax {jax.__version__}; x {x.shape}, '
        f'{args.layers} layers, kernel {args.kernel}, {args.rounds} alternated rounds', flush=True)
  print('| layers | implementation | fwd+bwd median (min-max) | time / ours | temporaries |')
  print('|---|---|---|---|---|')
  for scan in (True, False):
    fns, grads, temps = {}, {}, {}
    for name, conv in IMPLEMENTATIONS:
      model = stack(conv, args.layers, args.kernel, scan)
      params = model.init(jax.random.key(1), x, None)
      loss = lambda p, x, model=model: jnp.sum(model.apply(p, x, None)[0] ** 2)
      compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
      temps[name] = compiled.memory_analysis().temp_size_in_bytes
      fns[name] = lambda p, x, compiled=compiled: compiled(p, x)
      grads[name] = fns[name](params, x)
    # The three stacks have the same parameters (names, shapes, initialisers, key).
    times = alternated(fns, (params, x), args.rounds)
    ours = statistics.median(times[IMPLEMENTATIONS[0][0]])
    for name, _ in IMPLEMENTATIONS:
      t = times[name]
      print(f'| {"scan" if scan else "unrolled"} | {name} | {statistics.median(t) * 1e3:.1f} ms '
            f'({t[0] * 1e3:.1f}-{t[-1] * 1e3:.1f}) | {statistics.median(t) / ours:.2f}x | '
            f'{temps[name] / 2**20:.1f} MiB |', flush=True)
    reference = grads[IMPLEMENTATIONS[-1][0]]
    for name, _ in IMPLEMENTATIONS[:-1]:
      np.testing.assert_allclose(grads[name][0], reference[0], rtol=1e-4)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3),
                   grads[name][1], reference[1])


if __name__ == '__main__':
  main()
