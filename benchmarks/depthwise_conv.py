"""Depthwise convolution: our shifted multiply-adds against nn.Conv(feature_group_count=D).

The Conformer's depthwise convolution is written as K shifted multiply-adds
(mslam_jax.models.layers.depthwise_conv1d) because XLA's grouped convolution
has a slow weight gradient, worst inside nn.scan. This times forward+backward
of a stack of `layers` residual depthwise convolutions, scanned and unrolled,
with both implementations, and checks they compute the same function.

    python benchmarks/depthwise_conv.py --batch 8 --time 256 --dim 256 --layers 8
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mslam_jax.models import layers as mslam_layers


class Shifted(nn.Module):
  kernel_size: int

  @nn.compact
  def __call__(self, x, _):
    kernel = self.param('kernel', nn.initializers.normal(0.1), (self.kernel_size, x.shape[-1]))
    return x + mslam_layers.depthwise_conv1d(x, kernel), None


class Grouped(nn.Module):
  kernel_size: int

  @nn.compact
  def __call__(self, x, _):
    kernel = self.param('kernel', nn.initializers.normal(0.1), (self.kernel_size, x.shape[-1]))
    y = jax.lax.conv_general_dilated(
        x, kernel[:, None, :], window_strides=(1,),
        padding=((self.kernel_size // 2,) * 2,), dimension_numbers=('NWC', 'WIO', 'NWC'),
        feature_group_count=x.shape[-1])
    return x + y, None


def stack(block, num_layers, kernel_size, scan):
  if scan:
    return nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                   in_axes=nn.broadcast, length=num_layers)(kernel_size)

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      for i in range(num_layers):
        x, _ = block(kernel_size, name=f'layer{i}')(x, None)
      return x, None
  return Unrolled()


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--time', type=int, default=256)
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--kernel', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.time, args.dim))
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; '
        f'x {x.shape}, {args.layers} layers, kernel {args.kernel}')
  print('| layers | implementation | fwd+bwd median (s) |')
  print('|---|---|---|')
  for scan in (True, False):
    results = {}
    for name, block in (('shifted multiply-adds (ours)', Shifted),
                        ('nn.Conv-style grouped conv', Grouped)):
      model = stack(block, args.layers, args.kernel, scan)
      params = model.init(jax.random.key(1), x, None)
      loss = lambda p, x: jnp.sum(model.apply(p, x, None)[0] ** 2)
      grad = jax.jit(jax.value_and_grad(loss))
      results[name] = (grad(params, x), timed(grad, params, x, repeats=args.repeats))
      print(f'| {"scan" if scan else "unrolled"} | {name} | {results[name][1]:.4f} |')
    (a, ta), (b, tb) = results.values()
    np.testing.assert_allclose(a[0], b[0], rtol=1e-4)
    print(f'| {"scan" if scan else "unrolled"} | ratio grouped / shifted | {tb / ta:.1f}x |')


if __name__ == '__main__':
  main()
