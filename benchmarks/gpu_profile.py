"""Where a GPU training step's time goes: its kernels, from a jax.profiler trace, by kind and part.

Runs side_by_side.py's mslam_jax stack step at a GPU shape (bf16 compute by
default, as `side_by_side.py --device gpu --dtype bfloat16` measures it) under
`jax.profiler`, and sums the GPU's kernel time per step:

  * by kind: matmul (cuBLAS's kernels and XLA's Triton GEMM fusions), copy
    (memcpy / memset, concatenations, dynamic-update-slices: the scan stacking
    each layer's saved activations and gradients) and other (XLA's elementwise
    and reduction fusions: norms, activations, casts, softmax, the optimizer);
  * by part: the flax module path and primitive of the op, from the compiled
    HLO's op_name metadata (`step_profile.classify`), for kernels named after
    an HLO instruction (XLA's fusions); cuBLAS kernels carry their own names.

The step's matmul FLOPs (`side_by_side.shape_flops`) over the matmul kernels'
time, against the matmul peak measured in the same run (JAX's best n^3
product at side_by_side.py's GPU sizes), says how much of
the MFU gap is matmul speed and how much is the rest. Under remat the
recomputed products are not in that count, so the rate is a slight
underestimate.

    python benchmarks/gpu_profile.py                            # gpu_0.6b, 3 steps
    python benchmarks/gpu_profile.py --shape gpu_0.6b_noremat
    python benchmarks/gpu_profile.py --keep /tmp/prof           # keep the trace and the HLO
    python benchmarks/gpu_profile.py --trace /tmp/prof/perfetto_trace.json.gz \\
        --hlo /tmp/prof/step_hlo.txt.gz --steps 3               # analyse saved files, any machine
"""

import argparse
import collections
import gzip
import os
import re
import statistics
from typing import Dict, List, Optional, Tuple

import machine  # benchmarks/machine.py, beside this script
import side_by_side  # benchmarks/side_by_side.py: the stack step, its shapes and FLOPs
import step_profile  # benchmarks/step_profile.py: HLO metadata and op classification

# cuBLAS (nvjet on Hopper, cutlass / xmma before), cuDNN and XLA's Triton GEMM fusions.
_MATMUL_KERNEL = re.compile(r'^(nvjet|cutlass|sm\d+_xmma|cudnn)|gemm', re.IGNORECASE)
_COPY_KERNEL = re.compile(r'memcpy|memset|concatenate|dynamic_update_slice|^copy',
                          re.IGNORECASE)


def kernel_kind(kernel: str) -> str:
  """'matmul', 'copy' or 'other' for a GPU kernel's name."""
  if _MATMUL_KERNEL.search(kernel):
    return 'matmul'
  if _COPY_KERNEL.search(kernel):
    return 'copy'
  return 'other'


def hlo_instruction(kernel: str, sources: Dict[str, str]) -> Optional[str]:
  """The HLO instruction a kernel is named after ('loop_add_fusion_3' runs 'loop_add_fusion.3').

  XLA:GPU names a fusion's kernel after the instruction, with '_' for the '.'
  before its number; None for kernels of libraries (cuBLAS's nvjet...).
  """
  if kernel in sources:
    return kernel
  match = re.fullmatch(r'(.*)_(\d+)', kernel)
  if match and f'{match.group(1)}.{match.group(2)}' in sources:
    return f'{match.group(1)}.{match.group(2)}'
  return None


def gpu_kernels(events: List[Dict]) -> List[Dict]:
  """The kernel events of every '/device:GPU:N' process in a perfetto trace's events."""
  gpus = {e['pid'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'
          and str(e.get('args', {}).get('name', '')).startswith('/device:GPU')}
  return [e for e in events if e.get('ph') == 'X' and e.get('pid') in gpus]


def summarize(events: List[Dict], sources: Dict[str, str], steps: int):
  """Kernel milliseconds per step: (by kind, by (kind, pass, part), kernel span per step).

  The span runs from the first kernel's start to the last one's end, divided
  by `steps`: it exceeds the summed kernel time by the GPU's idle gaps.
  """
  by_kind, by_part = collections.Counter(), collections.Counter()
  kernels = gpu_kernels(events)
  for event in kernels:
    ms = event['dur'] / 1e3 / steps
    kind = kernel_kind(event['name'])
    op = hlo_instruction(event['name'], sources)
    if op is None:
      part: Tuple[str, str] = ('', f'({event["name"][:48]})')
    else:
      part = step_profile.classify(op, sources[op], 1 if kind == 'matmul' else 0)[1:]
    by_kind[kind] += ms
    by_part[(kind, *part)] += ms
  span = 0.0
  if kernels:
    span = (max(e['ts'] + e['dur'] for e in kernels) - min(e['ts'] for e in kernels)) / 1e3
  return by_kind, by_part, span / steps


def report(by_kind, by_part, span_ms: float, top: int, matmul_flops: Optional[float] = None,
           peak: Optional[float] = None) -> None:
  total = sum(by_kind.values())
  print(f'GPU kernel time per step: {total:.1f} ms, over a span of {span_ms:.1f} ms '
        f'(busy {total / span_ms:.0%})\n' if span_ms else '')
  print('| kind | ms per step | share |\n|---|---|---|')
  for kind, ms in by_kind.most_common():
    print(f'| {kind} | {ms:.1f} | {ms / total:.0%} |')
  if matmul_flops and by_kind['matmul']:
    rate = matmul_flops / (by_kind['matmul'] / 1e3)
    print(f'\nmatmul kernels: {matmul_flops / 1e12:.1f} TFLOP per step in '
          f'{by_kind["matmul"]:.1f} ms, {rate / 1e12:.0f} TFLOP/s'
          + (f' ({rate / peak:.0%} of the {peak / 1e12:.0f} TFLOP/s peak measured here)'
             if peak else ''))
  print('\nlargest parts:\n| kind | pass | module / primitive (or kernel) | ms per step |\n'
        '|---|---|---|---|')
  for (kind, pass_, part), ms in by_part.most_common(top):
    print(f'| {kind} | {pass_} | {part} | {ms:.2f} |')


def profile(shape_name: str, dtype: str, steps: int, keep: Optional[str]):
  """Traces `steps` steps on the default device: (events, hlo text, wall seconds per step)."""
  step, state, _ = side_by_side.build_jax_step(side_by_side.SHAPES[shape_name], dtype)
  compiled = step.lower(state).compile()
  hlo = compiled.as_text()
  run = lambda s: compiled(s)[0]  # pylint: disable=unnecessary-lambda-assignment
  for _ in range(2):  # warm up: autotuning, first-touch allocation
    state = run(state)
  events, walls = step_profile.trace_steps(run, state, steps, keep)
  if keep:
    with gzip.open(os.path.join(keep, 'step_hlo.txt.gz'), 'wt') as f:
      f.write(hlo)
  return events, hlo, statistics.median(walls)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', default='gpu_0.6b', help=f'a key of {sorted(side_by_side.SHAPES)}')
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--steps', type=int, default=3, help='profiled steps (or in --trace)')
  parser.add_argument('--top', type=int, default=30, help='parts listed')
  parser.add_argument('--keep', default=None, help='folder to keep the trace and the HLO in')
  parser.add_argument('--trace', default=None, help='a saved perfetto_trace.json.gz to analyse')
  parser.add_argument('--hlo', default=None, help="the traced step's compiled HLO (.txt[.gz])")
  args = parser.parse_args()
  if args.shape not in side_by_side.SHAPES:
    parser.error(f'--shape {args.shape!r} is not among {sorted(side_by_side.SHAPES)}')
  matmul_flops = side_by_side.shape_flops(side_by_side.SHAPES[args.shape])
  peak = None
  if args.trace:
    if not args.hlo:
      parser.error('--trace needs --hlo, the compiled HLO of the traced step')
    events = step_profile.read_trace(args.trace)
    with (gzip.open(args.hlo, 'rt') if args.hlo.endswith('.gz') else open(args.hlo)) as f:
      hlo = f.read()
    print(f'gpu_profile {args.shape} from {args.trace} ({args.steps} steps)')
  else:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mslam_jax import flops  # pylint: disable=import-outside-toplevel
    if jax.default_backend() != 'gpu':
      parser.error(f'JAX runs on {jax.default_backend()}: this profile reads GPU kernels '
                   '(install jax with its CUDA plugin; benchmarks/step_profile.py profiles the '
                   'CPU), or analyse a saved trace with --trace and --hlo')
    print(f'gpu_profile {args.shape} {args.dtype}: {machine.cpu_summary()}; GPU: '
          f'{machine.gpu_summary()}; jax {jax.__version__} on {jax.devices()[0].device_kind}',
          flush=True)
    # The best of side_by_side.py's peak sizes: one size alone can miss the peak by 10%.
    peak = max(flops.measure_peak_flops(jnp.dtype(args.dtype), n,
                                        calls=side_by_side.MATMUL_CALLS['gpu'])
               for n in side_by_side.MATMUL_SIZES['gpu'])
    events, hlo, wall = profile(args.shape, args.dtype, args.steps, args.keep)
    print(f'{side_by_side.SHAPES[args.shape].label()}: {wall * 1e3:.1f} ms per step (median '
          f'of {args.steps}, under the profiler), {matmul_flops / wall / 1e12:.0f} TFLOP/s, '
          f'MFU {matmul_flops / wall / peak:.0%} against {peak / 1e12:.0f} TFLOP/s')
  by_kind, by_part, span = summarize(events, step_profile.op_sources(hlo), args.steps)
  if not by_kind:
    raise SystemExit('gpu_profile: the trace holds no GPU kernels (no /device:GPU process).')
  report(by_kind, by_part, span, args.top, matmul_flops, peak)


if __name__ == '__main__':
  main()
