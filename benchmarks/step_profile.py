"""Where a training step's time goes: XLA:CPU ops from a jax.profiler trace, by model part.

Runs a jitted step under `jax.profiler` (a perfetto trace with an event per
executed XLA op; an op that XLA:CPU runs asynchronously has an event for its
launch and an `end:` event for its completion, and lasts from one to the
other), reads each op's source from the compiled HLO's metadata (`op_name`:
the flax module path, `jvp(...)` for the forward pass, `transpose(jvp(...))`
for the backward pass), and sums the op time per step:

  * by kind: matmul (a dot, alone or fused with other ops) or other, forward
    or backward;
  * by part: the module that emitted the op (attention, conv, ffn_start, ...)
    and the primitive (reduce_sum, div, dot_general, ...), largest first;
    for the matmuls also their FLOPs (from the HLO's dot shapes), rate, and
    what runs them: a YNNPACK fusion, or XLA:CPU's own dot (Eigen), which
    jax 0.10.2 uses for a product that YNNPACK does not take ('XLA fusion'
    for a dot inside a fusion that XLA emits itself);
  * each of the step's matmuls again, by itself (same shapes, dimension
    numbers and dtypes, row-major operands), and the rate the step's
    products reach alone against the matmul peak measured in the same rounds:
    the MFU ceiling that the step's shapes set, before any other op's time.

Op times are summed over threads: ops that run side by side on the cores each
count their whole span, so the sum can exceed the step's wall time and a
part's in-step rate can be half its rate alone. The wall time is printed, and
the ceiling compares the products alone with it.

    python benchmarks/step_profile.py --what stack:d256   # side_by_side.py's stack step
    python benchmarks/step_profile.py --what tiny         # the demo's full pre-training step
    git worktree add /tmp/old REV && PYTHONPATH=/tmp/old python benchmarks/step_profile.py
                                                          # the same for revision REV
"""

import argparse
import bisect
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import machine  # benchmarks/machine.py, beside this script
import side_by_side  # benchmarks/side_by_side.py: the stack step and the peak's sizes
from mslam_jax import console
from mslam_jax import flops
from mslam_jax import host_memory


def build_stack_step(shape_name: str):
  """(jitted step, state) of side_by_side.py's mslam_jax stack at `shape_name`."""
  step, state, _ = side_by_side.build_jax_step(side_by_side.SHAPES[shape_name])
  return step, state


def build_tiny_step():
  """(compiled step, args) of the demo's full step (tiny_step.py's build, synthetic batch)."""
  import tiny_step  # pylint: disable=import-outside-toplevel
  lowered, state, batch, rng, _ = tiny_step.build_step()
  return lowered.compile(), (state, batch, rng)


# An HLO instruction's line: its name, then (_INSTRUCTION) an array result's type and dimensions.
_NAMED = r'\s*(?:ROOT )?%?([\w.\-]+) = '
_INSTRUCTION = re.compile(_NAMED + r'(\w+)\[([\d,]*)\]')
_DOT = re.compile(r' dot\(%?([\w.\-]+), %?([\w.\-]+)\)')
_HLO_DTYPES = {'f32': 'float32', 'bf16': 'bfloat16', 'f16': 'float16', 'f64': 'float64'}


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


@dataclasses.dataclass(frozen=True)
class Product:
  """One HLO dot: operand shapes and dtypes, and its dimension numbers."""
  lhs: Tuple[int, ...]
  rhs: Tuple[int, ...]
  lhs_dtype: str
  rhs_dtype: str
  out_dtype: str
  lhs_contracting: Tuple[int, ...]
  rhs_contracting: Tuple[int, ...]
  lhs_batch: Tuple[int, ...]
  rhs_batch: Tuple[int, ...]

  @property
  def flops(self) -> int:
    """2 x output size x contracted size."""
    batch = math.prod(self.lhs[a] for a in self.lhs_batch)
    contracted = math.prod(self.lhs[a] for a in self.lhs_contracting)
    free = lambda shape, used: math.prod(  # pylint: disable=unnecessary-lambda-assignment
        d for a, d in enumerate(shape) if a not in used)
    return (2 * batch * contracted * free(self.lhs, self.lhs_contracting + self.lhs_batch)
            * free(self.rhs, self.rhs_contracting + self.rhs_batch))

  def function(self):
    """The product as a jitted (lhs, rhs) -> out, with row-major operands."""
    import jax  # pylint: disable=import-outside-toplevel
    numbers = ((self.lhs_contracting, self.rhs_contracting), (self.lhs_batch, self.rhs_batch))
    return jax.jit(lambda a, b: jax.lax.dot_general(
        a, b, numbers, preferred_element_type=self.out_dtype))


def dot_products(hlo_text: str) -> Dict[str, List[Product]]:
  """{HLO instruction name: the matmuls it executes}, for dots and fusions that hold one.

  XLA:CPU fuses a dot with its neighbours (a YNNPACK fusion can hold the
  attention logits' product and the softmax's sum), and such a fusion carries
  the op_name of its root, which need not be the dot: an op is a matmul here
  when it runs one, alone or fused.
  """
  types, calls, products = {}, {}, {}
  in_computation, computation = collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    header = re.match(r'(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$', line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name = match.group(1)
    types[name] = (_HLO_DTYPES.get(match.group(2), match.group(2)),
                   tuple(int(d) for d in match.group(3).split(',') if d))
    called = re.search(r'calls=%?([\w.\-]+)', line)
    if called:
      calls[name] = called.group(1)
    dot = _DOT.search(line)
    if dot and dot.group(1) in types and dot.group(2) in types:
      dims = {key: tuple(int(a) for a in value.split(',') if a) for key, value in
              re.findall(r'((?:lhs|rhs)_(?:batch|contracting))_dims=\{([\d,]*)\}', line)}
      (lhs_dtype, lhs), (rhs_dtype, rhs) = types[dot.group(1)], types[dot.group(2)]
      product = Product(lhs, rhs, lhs_dtype, rhs_dtype, types[name][0],
                        dims.get('lhs_contracting', ()), dims.get('rhs_contracting', ()),
                        dims.get('lhs_batch', ()), dims.get('rhs_batch', ()))
      products[name] = [product]
      in_computation[computation].append(product)
  for name, called in calls.items():
    if in_computation[called]:
      products[name] = in_computation[called]
  return products


def matmul_runners(hlo_text: str) -> Dict[str, str]:
  """{HLO instruction name: what runs it}, for the dots and the fusions of a kind XLA names.

  A fusion whose backend config names its kind (`"kind":"__ynn_fusion"`) runs
  in that library: 'YNNPACK' for `__ynn_fusion`, the kind's own name for any
  other. A bare `dot` instruction is XLA:CPU's dot thunk, which runs Eigen's
  contraction: 'Eigen'.
  """
  runners = {}
  for line in hlo_text.splitlines():
    match = re.match(_NAMED, line)
    if not match:
      continue
    kind = re.search(r'"kind":"(__\w+)"', line)
    if kind:
      runners[match.group(1)] = 'YNNPACK' if kind.group(1) == '__ynn_fusion' else kind.group(1)
    elif _DOT.search(line):
      runners[match.group(1)] = 'Eigen'
  return runners


def op_flops(products: Dict[str, List[Product]]) -> Dict[str, int]:
  """{HLO instruction name: matmul FLOPs it executes}, from `dot_products`' answer."""
  return {name: sum(p.flops for p in op_products) for name, op_products in products.items()}


def square(n: int, dtype: str = 'float32') -> Product:
  """The [n, n] x [n, n] product: the matmul peak's yardstick."""
  return Product((n, n), (n, n), dtype, dtype, dtype, (1,), (0,), (), ())


def time_alone(products, rounds: int = 5, min_seconds: float = 0.02) -> Dict[Product, float]:
  """{product: best seconds per call over `rounds`}, each product run by itself on random operands.

  The products take turns, one timing each per round (after a warm-up call), so
  that a shared machine's changing load reaches them all alike; the best of the
  rounds is the rate the product can reach here. A timing is back-to-back calls
  worth about `min_seconds` (jax dispatches asynchronously, so the launch of
  the next call overlaps the running one), so that a small product's time is
  not its Python dispatch.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  calls = {}
  for product in set(products):
    lhs = jax.numpy.asarray(rng.standard_normal(product.lhs), product.lhs_dtype)
    rhs = jax.numpy.asarray(rng.standard_normal(product.rhs), product.rhs_dtype)
    function = product.function()
    jax.block_until_ready(function(lhs, rhs))  # compile
    repeats = flops.products_per_timing(flops.seconds_per_call(function, lhs, rhs, calls=1),
                                        min_seconds)
    calls[product] = (function, lhs, rhs, repeats)
  best = {product: math.inf for product in calls}
  for _ in range(rounds):
    for product, (function, lhs, rhs, repeats) in calls.items():
      best[product] = min(best[product],
                          flops.seconds_per_call(function, lhs, rhs, calls=repeats))
  return best


def op_spans(events, names) -> List[Tuple[str, float]]:
  """(op name, microseconds) of every executed op of `names` in a perfetto trace's events.

  XLA:CPU runs some thunks asynchronously (a dot handed to the thread pool, a
  fusion split into tasks): the op's own event then covers only its launch, and
  an `end: NAME` event marks its completion. Such an op lasts from its launch to
  the end of the first `end:` event of its name after it.
  """
  ends = collections.defaultdict(list)
  for event in events:
    if event.get('ph') == 'X' and str(event.get('name')).startswith('end: '):
      ends[event['name'][5:]].append(event['ts'] + event['dur'])
  for times in ends.values():
    times.sort()
  spans = []
  for event in sorted((e for e in events if e.get('ph') == 'X' and e.get('name') in names),
                      key=lambda e: e['ts']):
    name, duration = event['name'], event['dur']
    done = ends.get(name)
    if done:
      at = bisect.bisect_left(done, event['ts'])
      if at < len(done):
        duration = max(duration, done.pop(at) - event['ts'])
    spans.append((name, duration))
  return spans


def classify(op: str, source: str, flops: int):
  """(kind, pass, part) of one executed op: a matmul when it runs `flops` > 0."""
  backward = 'transpose(' in source
  kind = 'matmul' if flops else 'other'
  path = re.sub(r'^jit\([^)]*\)/', '', source)
  path = re.sub(r'(transpose\()?jvp\([^/]*\)\)?/', '', path)
  path = re.sub(r'.*?closed_call/', '', path)
  path = path or f'({op.rsplit(".", 1)[0]})'
  return kind, 'backward' if backward else 'forward', path


def read_trace(path: str) -> List[Dict]:
  """The events of a perfetto_trace.json.gz that jax.profiler wrote."""
  with gzip.open(path) as f:
    return json.load(f)['traceEvents']


def trace_steps(run, state, steps: int, keep: Optional[str] = None):
  """`state = run(state)`, `steps` times under jax.profiler: (trace events, wall seconds each).

  `keep`: a folder to copy the perfetto trace into (perfetto_trace.json.gz).
  """
  import jax  # pylint: disable=import-outside-toplevel
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      begin = time.perf_counter()
      state = run(state)
      jax.block_until_ready(state)
      walls.append(time.perf_counter() - begin)
    jax.profiler.stop_trace()
    trace_file = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                           recursive=True)[0]
    events = read_trace(trace_file)
    if keep:
      os.makedirs(keep, exist_ok=True)
      shutil.copy(trace_file, os.path.join(keep, 'perfetto_trace.json.gz'))
  return events, walls


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--what', default='stack:d256', help="'stack:SHAPE' or 'tiny'")
  parser.add_argument('--steps', type=int, default=3, help='profiled steps')
  parser.add_argument('--top', type=int, default=25, help='parts listed')
  parser.add_argument('--no_alone', dest='alone', action='store_false',
                      help="skip timing each of the step's matmuls by itself")
  parser.add_argument('--rounds', type=int, default=5,
                      help='turns each matmul gets when timed by itself (the best counts)')
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
  sources, products, runners = op_sources(hlo), dot_products(hlo), matmul_runners(hlo)
  op_flop_counts = op_flops(products)
  events, walls = trace_steps(run, state, args.steps)
  by_kind, by_part = collections.Counter(), collections.Counter()
  by_matmul, matmul_flops = collections.Counter(), collections.Counter()
  executions = collections.Counter()
  runs_in = collections.defaultdict(set)
  for name, microseconds in op_spans(events, sources):
    if name.startswith('while'):
      continue  # a while loop's own event spans its body's ops
    kind, pass_, part = classify(name, sources[name], op_flop_counts.get(name, 0))
    ms = microseconds / 1e3 / args.steps
    by_kind[(kind, pass_)] += ms
    if kind == 'other':
      by_part[(pass_, part)] += ms
    else:
      by_matmul[(pass_, part)] += ms
      matmul_flops[(pass_, part)] += op_flop_counts[name] / args.steps
      executions[(name, pass_, part)] += 1 / args.steps
      runs_in[(pass_, part)].add(runners.get(name, 'XLA fusion'))
  alone = collections.Counter()
  if args.alone:
    print('timing each of the step\'s matmuls by itself ...', flush=True)
    squares = [square(n) for n in side_by_side.MATMUL_SIZES['cpu']]
    seconds = time_alone([p for name, _, _ in executions for p in products[name]] + squares,
                         rounds=args.rounds)
    for (name, pass_, part), count in executions.items():
      for product in products[name]:
        alone[(pass_, part)] += count * seconds[product] * 1e3
    peak = max(p.flops / seconds[p] for p in squares)
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
        '| pass | module / primitive | runs in | ms per step | GFLOP | GFLOP/s |'
        + (' alone: ms | alone: GFLOP/s |' if alone else '')
        + '\n|---|---|---|---|---|---|' + ('---|---|' if alone else ''))
  for (pass_, part), ms in by_matmul.most_common(args.top):
    gflop = matmul_flops[(pass_, part)] / 1e9
    runner = ', '.join(sorted(runs_in[(pass_, part)]))
    print(f'| {pass_} | {part} | {runner} | {ms:.1f} | {gflop:.2f} | {gflop / ms * 1e3:.0f} |'
          + (f' {alone[(pass_, part)]:.1f} | {gflop / alone[(pass_, part)] * 1e3:.0f} |'
             if alone else ''))
  if alone:
    matmul_ms, alone_ms = sum(by_matmul.values()), sum(alone.values())
    gflop = sum(matmul_flops.values()) / 1e9
    wall_ms = statistics.median(walls) * 1e3
    sizes = ', '.join(str(n) for n in side_by_side.MATMUL_SIZES['cpu'])
    print(f'\neach matmul again, by itself (best of {args.rounds} rounds, taking turns with the '
          f'peak\'s n^3 products, n = {sizes}):\n'
          f'  the step\'s products alone: {alone_ms:.0f} ms for {gflop:.1f} GFLOP per step, '
          f'{gflop / alone_ms * 1e3:.0f} GFLOP/s\n'
          f'  matmul peak in the same rounds: {peak / 1e9:.0f} GFLOP/s\n'
          f'  MFU ceiling of these shapes: {gflop * 1e12 / alone_ms / peak:.0%} (every product '
          'at its rate alone, every other op free)\n'
          f'  in the step: matmul op time {matmul_ms:.0f} ms ({matmul_ms / alone_ms:.2f}x alone), '
          f'wall time {wall_ms:.0f} ms ({wall_ms / alone_ms:.2f}x alone), MFU '
          f'{gflop * 1e12 / wall_ms / peak:.0%}')


if __name__ == '__main__':
  host_memory.configure_on_cpu()  # as the entry points do (it may re-execute this script)
  main()
