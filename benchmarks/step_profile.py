"""Where a training step's time goes: XLA:CPU ops from a jax.profiler trace, by model part.

Runs a jitted step under `jax.profiler` (a perfetto trace with one event per
executed XLA op), reads each op's source from the compiled HLO's metadata
(`op_name`: the flax module path, `jvp(...)` for the forward pass,
`transpose(jvp(...))` for the backward pass), and sums the op time per step:

  * by kind: matmul (a dot, alone or fused with other ops) or other, forward
    or backward;
  * by part: the module that emitted the op (attention, conv, ffn_start, ...)
    and the primitive (reduce_sum, div, dot_general, ...), largest first;
    for the matmuls also their FLOPs (from the HLO's dot shapes) and rate.

Op times are summed over threads, so with ops running side by side they can
exceed the step's wall time; the wall time is printed for comparison.

    python benchmarks/step_profile.py --what stack:d256   # side_by_side.py's stack step
    python benchmarks/step_profile.py --what tiny         # the demo's full pre-training step
    git worktree add /tmp/old REV && PYTHONPATH=/tmp/old python benchmarks/step_profile.py
                                                          # the same for revision REV
"""

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time

import machine  # benchmarks/machine.py, beside this script
from mslam_jax import console
from mslam_jax import host_memory


def build_stack_step(shape_name: str):
  """(jitted step, state) of side_by_side.py's mslam_jax stack at `shape_name`."""
  import side_by_side  # pylint: disable=import-outside-toplevel
  step, state, _ = side_by_side.build_jax_step(side_by_side.SHAPES[shape_name])
  return step, state


def build_tiny_step():
  """(compiled step, args) of the demo's full step (tiny_step.py's build, synthetic batch)."""
  import tiny_step  # pylint: disable=import-outside-toplevel
  lowered, state, batch, rng, _ = tiny_step.build_step()
  return lowered.compile(), (state, batch, rng)


# An HLO instruction's line: its name, then (_INSTRUCTION) an array result's dimensions.
_NAMED = r'\s*(?:ROOT )?%?([\w.\-]+) = '
_INSTRUCTION = re.compile(_NAMED + r'\w+\[([\d,]*)\]')


def op_sources(hlo_text: str):
  """{HLO instruction name: op_name metadata ('' when absent)}."""
  sources = {}
  for line in hlo_text.splitlines():
    match = re.match(_NAMED, line)
    if match:
      name = re.search(r'op_name="([^"]*)"', line)
      if name or match.group(1) not in sources:
        sources[match.group(1)] = name.group(1) if name else ''
  return sources


def op_flops(hlo_text: str):
  """{HLO instruction name: matmul FLOPs it executes}, for dots and fusions that contain one.

  XLA:CPU fuses a dot with its neighbours (a YNNPACK fusion can hold the
  attention logits' product and the softmax's sum), and such a fusion carries
  the op_name of its root, which need not be the dot: an op is a matmul here
  when it runs one, alone or fused. FLOPs are 2 x output size x contracted size.
  """
  shapes, calls, flops = {}, {}, {}
  in_computation, computation = collections.Counter(), None
  for line in hlo_text.splitlines():
    header = re.match(r'(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$', line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name = match.group(1)
    shapes[name] = [int(d) for d in match.group(2).split(',') if d]
    called = re.search(r'calls=%?([\w.\-]+)', line)
    if called:
      calls[name] = called.group(1)
    dot = re.search(r' dot\(%?([\w.\-]+), %?[\w.\-]+\).*?lhs_contracting_dims=\{([\d,]*)\}', line)
    if dot and dot.group(1) in shapes:
      lhs = shapes[dot.group(1)]
      contracted = math.prod(lhs[int(axis)] for axis in dot.group(2).split(',') if axis)
      flops[name] = 2 * math.prod(shapes[name]) * contracted
      in_computation[computation] += flops[name]
  for name, called in calls.items():
    if in_computation[called]:
      flops[name] = in_computation[called]
  return flops


def classify(op: str, source: str, flops: int):
  """(kind, pass, part) of one executed op: a matmul when it runs `flops` > 0."""
  backward = 'transpose(' in source
  kind = 'matmul' if flops else 'other'
  path = re.sub(r'^jit\([^)]*\)/', '', source)
  path = re.sub(r'(transpose\()?jvp\([^/]*\)\)?/', '', path)
  path = re.sub(r'.*?closed_call/', '', path)
  path = path or f'({op.rsplit(".", 1)[0]})'
  return kind, 'backward' if backward else 'forward', path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--what', default='stack:d256', help="'stack:SHAPE' or 'tiny'")
  parser.add_argument('--steps', type=int, default=3, help='profiled steps')
  parser.add_argument('--top', type=int, default=25, help='parts listed')
  parser.add_argument('--verbose', action='store_true',
                      help="keep jax's, XLA's and TensorFlow's start-up logs")
  args = parser.parse_args()
  console.quiet_unless_verbose()
  import jax  # pylint: disable=import-outside-toplevel
  if args.what == 'tiny':
    step, state = build_tiny_step()
    run = lambda s: step(*s)[:1] + s[1:]
  else:
    step, state = build_stack_step(args.what.split(':', 1)[1])
    run = lambda s: step(s)[0]
  for _ in range(2):  # compile, warm up
    state = run(state)
    jax.block_until_ready(state)
  hlo = (step.as_text() if hasattr(step, 'as_text') else
         step.lower(state).compile().as_text())
  sources, flops = op_sources(hlo), op_flops(hlo)
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(args.steps):
      begin = time.perf_counter()
      state = run(state)
      jax.block_until_ready(state)
      walls.append(time.perf_counter() - begin)
    jax.profiler.stop_trace()
    trace_file = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                           recursive=True)[0]
    with gzip.open(trace_file) as f:
      events = json.load(f)['traceEvents']
  by_kind, by_part = collections.Counter(), collections.Counter()
  by_matmul, matmul_flops = collections.Counter(), collections.Counter()
  for event in events:
    name = event.get('name')
    if event.get('ph') != 'X' or name not in sources or name.startswith('while'):
      continue  # a while loop's own event spans its body's ops
    kind, pass_, part = classify(name, sources[name], flops.get(name, 0))
    ms = event['dur'] / 1e3 / args.steps
    by_kind[(kind, pass_)] += ms
    if kind == 'other':
      by_part[(pass_, part)] += ms
    else:
      by_matmul[(pass_, part)] += ms
      matmul_flops[(pass_, part)] += flops[name] / args.steps
  total = sum(by_kind.values())
  print(f'step_profile {args.what}: {machine.cpu_summary()}; jax {jax.__version__}')
  print(f'wall time per step (median of {args.steps}, under the profiler): '
        f'{statistics.median(walls) * 1e3:.0f} ms; XLA op time summed: {total:.0f} ms\n')
  print('| kind | pass | ms per step | share |\n|---|---|---|---|')
  for (kind, pass_), ms in by_kind.most_common():
    print(f'| {kind} | {pass_} | {ms:.0f} | {ms / total:.0%} |')
  print(f'\nlargest non-matmul parts (of {sum(by_part.values()):.0f} ms):\n'
        '| pass | module / primitive | ms per step |\n|---|---|---|')
  for (pass_, part), ms in by_part.most_common(args.top):
    print(f'| {pass_} | {part} | {ms:.1f} |')
  print(f'\nlargest matmul parts (of {sum(by_matmul.values()):.0f} ms, '
        f'{sum(matmul_flops.values()) / 1e9:.1f} GFLOP; a part named by a fused op '
        'other than dot_general runs it with the matmul):\n'
        '| pass | module / primitive | ms per step | GFLOP | GFLOP/s |\n|---|---|---|---|---|')
  for (pass_, part), ms in by_matmul.most_common(args.top):
    gflop = matmul_flops[(pass_, part)] / 1e9
    print(f'| {pass_} | {part} | {ms:.1f} | {gflop:.2f} | {gflop / ms * 1e3:.0f} |')


if __name__ == '__main__':
  host_memory.configure_on_cpu()  # as the entry points do (it may re-execute this script)
  main()
