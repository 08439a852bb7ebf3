"""A dense layer's weight gradient in its three forms, timed alone on this CPU.

A dense layer x [rows, d_in] @ w [d_in, d_out] has the weight gradient
dw = x^T dy, a product that contracts the rows of both operands. The model's
layers (mslam_jax/models/layers.py) can take it three ways:
  autodiff    x^T dy, as jax differentiates `x @ w`;
  flipped     (dy^T x)^T: the same product with its output the other way round
              (`matmul_flipped_weight_gradient`);
  transposed  a written-out x^T times dy (`matmul_transposed_weight_gradient`).
This times each form's backward pass for w alone (jax drops the forward
product and dx, which nothing uses), built from the layers' own functions,
at the Conformer's dense shapes, alternated round by round with the matmul
peak, and checks that the three give numpy's x^T dy.

    python benchmarks/weight_gradient.py --rounds 7
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 python benchmarks/weight_gradient.py   # AVX2 code only
"""

import argparse
import statistics
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import machine  # benchmarks/machine.py, beside this script
from workers import paired_ratios, ratio_summary  # benchmarks/workers.py
from mslam_jax import flops
from mslam_jax.models import layers

FORMS: Dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'autodiff': lambda x, w: x @ w,
    'flipped': layers.matmul_flipped_weight_gradient,
    'transposed': layers.matmul_transposed_weight_gradient,
}

# (name, rows, d_in, d_out): the Conformer stack's dense layers in
# benchmarks/side_by_side.py's shapes (d 256: 8 x 400 frames; 0.6B width:
# 4 x 400) and in the tiny CPU demo's speech pass (8 x 50 frames, d 64).
SHAPES: List[Tuple[str, int, int, int]] = [
    ('d256 ffn wi', 3200, 256, 1024),
    ('d256 ffn wo', 3200, 1024, 256),
    ('d256 pointwise_in', 3200, 256, 512),
    ('d256 square (pointwise_out, attention)', 3200, 256, 256),
    ('0.6B ffn wi', 1600, 1024, 4096),
    ('0.6B ffn wo', 1600, 4096, 1024),
    ('tiny ffn wi', 400, 64, 128),
    ('tiny ffn wo', 400, 128, 64),
]


def weight_gradient(form: Callable) -> Callable:
  """jit(x, w, dy -> dw) through `form`'s backward pass."""
  return jax.jit(lambda x, w, dy: jax.vjp(lambda w: form(x, w), w)[1](dy)[0])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7, help='alternated rounds per shape')
  args = parser.parse_args()
  print(f'weight_gradient: {machine.cpu_summary()}; jax {jax.__version__}', flush=True)
  n = flops.PEAK_SIZE_CPU
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  peak_fn = jax.jit(jnp.matmul)
  jax.block_until_ready(peak_fn(a, a))
  print(f'| layer | rows x d_in -> d_out | GFLOP | {" | ".join(FORMS)} | flipped / autodiff |')
  print('|---|---|---|' + '---|' * len(FORMS) + '---|')
  peaks = []
  for name, rows, d_in, d_out in SHAPES:
    kx, kw, kg = jax.random.split(jax.random.key(rows + d_in + d_out), 3)
    x = jax.random.normal(kx, (rows, d_in), jnp.float32)
    w = jax.random.normal(kw, (d_in, d_out), jnp.float32)
    dy = jax.random.normal(kg, (rows, d_out), jnp.float32)
    expected = np.asarray(x).T @ np.asarray(dy)
    fns = {form: weight_gradient(f) for form, f in FORMS.items()}
    for form, fn in fns.items():  # compile, and check against numpy
      np.testing.assert_allclose(fn(x, w, dy), expected, rtol=1e-4, atol=1e-3 * np.sqrt(rows),
                                 err_msg=f'{form} at {name}')
    times = {form: [] for form in fns}
    for _ in range(args.rounds):
      peaks.append(2.0 * n ** 3 / flops.seconds_per_call(peak_fn, a, a))
      for form, fn in fns.items():
        times[form].append(flops.seconds_per_call(fn, x, w, dy))
    gflop = 2.0 * rows * d_in * d_out / 1e9
    rate = {form: gflop / statistics.median(t) for form, t in times.items()}
    # Autodiff's time over the flipped form's, round by round: flipped's speed-up.
    speedup = ratio_summary(paired_ratios(times['autodiff'], times['flipped']))
    print(f'| {name} | {rows} x {d_in} -> {d_out} | {gflop:.2f} | '
          + ' | '.join(f'{rate[form]:.0f} GFLOP/s' for form in FORMS) + f' | {speedup} |',
          flush=True)
  print(f'matmul {n}^3 between the shapes: median {statistics.median(peaks) / 1e9:.0f} GFLOP/s '
        f'(min {min(peaks) / 1e9:.0f}, max {max(peaks) / 1e9:.0f}); rates are medians of '
        f'{args.rounds} rounds, the last column flipped\'s speed over autodiff\'s round by round.')


if __name__ == '__main__':
  main()
