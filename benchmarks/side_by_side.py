"""The Conformer stack's training step, mslam_jax against Hugging Face's Wav2Vec2-BERT.

One training step of an encoder stack, forward + backward + Adam, on random
[batch, frames, d] inputs with a mean-square loss on the output:

  mslam_jax: `ConformerStack` (ConformerBlocks under nn.scan, fully unrolled as
             on CPU; the GPU shapes scan one layer per iteration as on a
             pod; padding-aware, all frames valid), jitted with
             `optax.adam`, the old state donated.
  peer:      transformers' `Wav2Vec2BertModel(...).encoder` (the w2v-BERT 2.0
             Conformer: `position_embeddings_type=None`, `layerdrop=0`, no
             SpecAugment, dropouts 0, depthwise kernel 5, SDPA attention),
             `torch.optim.Adam`, `torch.set_num_threads(cores)`.

Both have the same layer structure (half-step FFN, self-attention, convolution
module, half-step FFN, LayerNorm; GroupNorm against LayerNorm after the
depthwise convolution) and the same parameter count within 0.3% (checked).
FLOPs are the analytical count of `mslam_jax.flops.conformer_layer_flops`
(matmuls, 2mnk) times 3 for forward + backward; recomputation under remat is
not counted, as in MFU.

--device gpu runs both on one CUDA GPU (JAX with its CUDA plugin, torch with
CUDA), at the GPU shapes by default (the 0.6B stack itself, 24 layers): the
peer's step ends with torch.cuda.synchronize(), the matmul peak times 20
products back to back at larger sizes, and each worker reports its peak GPU
memory. Use --dtype bfloat16 there (bf16 compute, fp32 weights, as trained):
in fp32 the two would differ by their TF32 settings as much as by their code
(torch leaves TF32 off for matmuls by default; XLA's default precision may
use it).

Each framework runs in its own worker process; the parent asks them for one
step at a time, alternating the order every pair (ABBA), so both see the same
machine load and never compete for the cores. The matmul peak is measured in
the same run, by both frameworks, at several sizes, and again by every worker in
each shape's alternation; each shape's MFU divides by the best of these.

With --baseline=REV the mslam_jax stack of git revision REV runs as a third
worker in the same alternation (a temporary git worktree), so a speed-up is
measured before and after in one run. The mslam_jax workers run with this
checkout's host allocator (`mslam_jax.host_memory`, as the entry points do),
a baseline with its own entry points' setting (workers.entry_point_malloc);
--malloc SETTING adds this checkout's stack with another setting (mimalloc,
hugepages, system: glibc's defaults). The peer runs as a PyTorch user runs it,
with glibc's allocator; --peer_malloc SETTING adds a peer worker with another
setting, and the ratios are taken against the fastest peer worker (the one
with the lowest median): as the ratio of the two medians, and pair by pair
(the median and range of the per-pair ratios, in which the load that drifts
over a run cancels; `workers.paired_ratios`).
--model_option NAME=VALUE adds this checkout's stack with that ModelConfig
field set (e.g. transposed_weight_gradient=False, to measure the default's
'auto' against it on an AVX2-only CPU); --xla_flags FLAGS adds it with FLAGS
appended to XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2: XLA's code without
AVX-512). Each such worker's time over this checkout's is printed as well.

    pip install -c constraints.txt -e '.[bench]'   # torch + transformers
    python benchmarks/side_by_side.py                      # fp32, all shapes
    python benchmarks/side_by_side.py --dtype bfloat16 --shapes d256
    python benchmarks/side_by_side.py --baseline 66f4a35 --output /tmp/sbs.json
    python benchmarks/side_by_side.py --device gpu --dtype bfloat16   # one CUDA GPU
"""

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import machine  # benchmarks/machine.py, beside this script
from workers import (  # benchmarks/workers.py
    Worker, alternate, entry_point_malloc, median_faults, paired_ratios, ratio_summary, reply,
    timed, worktree)
from mslam_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Shape:
  """One encoder stack and batch. remat applies to mslam_jax only (the peer keeps all)."""
  d_model: int
  num_heads: int
  ffn_dim: int
  num_layers: int
  batch: int
  frames: int
  remat: str = 'none'
  # Layers per iteration of the stack's scan (ModelConfig.scan_unroll); None unrolls
  # all of them, as the CPU gin files do.
  scan_unroll: Optional[int] = None

  def label(self) -> str:
    scan = '' if self.scan_unroll is None else f', scan_unroll {self.scan_unroll}'
    return (f'{self.d_model} / {self.num_heads} / {self.ffn_dim} / {self.num_layers}, '
            f'{self.batch} x {self.frames}, remat {self.remat}{scan}')


# d256: a small width where non-matmul work weighs most. d1024: the 0.6B model's
# width (d 1024, 8 heads, ffn 4096), with the 0.6B gin file's remat policy and
# without remat. long: d256 at 1600 frames (16 s), attention-dominated.
SHAPES = {
    'd256': Shape(256, 4, 1024, 4, 8, 400),
    'd1024': Shape(1024, 8, 4096, 2, 4, 400, 'dots_no_batch'),
    'd1024_noremat': Shape(1024, 8, 4096, 2, 4, 400),
    'long': Shape(256, 4, 1024, 4, 2, 1600),
    # GPU: the 0.6B encoder stack itself (24 layers of d 1024), batch 32 x 400 frames
    # (12,800 frames, enough to fill an H100/H200 with matmuls), scanned one layer per
    # iteration as in the pod gin files, with the 0.6B gin file's remat policy and without.
    'gpu_0.6b': Shape(1024, 8, 4096, 24, 32, 400, 'dots_no_batch', scan_unroll=1),
    'gpu_0.6b_noremat': Shape(1024, 8, 4096, 24, 32, 400, scan_unroll=1),
}
DEFAULT_SHAPES = {'cpu': 'd256,d1024,d1024_noremat,long', 'gpu': 'gpu_0.6b,gpu_0.6b_noremat'}
MATMUL_SIZES = {'cpu': (1024, 2048, 3072), 'gpu': (4096, 8192, 16384)}
# Measured again by every worker in each shape's alternation, so that each MFU
# divides by a peak taken under the same load as its steps.
PEAK_CHECK_SIZE = {'cpu': 2048, 'gpu': 8192}
# Products timed back to back per matmul measurement: one on a CPU (seconds
# each); on a GPU enough to hide the launch and the host's wait (a bf16 8192^3
# product takes about 1.4 ms on an H200).
MATMUL_CALLS = {'cpu': 1, 'gpu': 20}
# Each worker's environment beyond Worker's (which pins JAX to the CPU). On a GPU
# JAX allocates as it goes instead of taking 75% of the memory at start, since
# the peer's worker holds the same GPU.
WORKER_ENV = {'cpu': {}, 'gpu': {'JAX_PLATFORMS': 'cuda',
                                 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}}


# ----------------------------------------------------------------------------
# Workers: one process per framework, commands on stdin, JSON replies on stdout.


def build_jax_step(shape: Shape, dtype: str = 'float32', options: Optional[Dict] = None):
  """mslam_jax's stack step at `shape`: (jitted step(state) -> (state, loss), state, params).

  The one builder of the measured step, shared with step_profile.py. The old
  state is donated, as in training. `options`: more ModelConfig fields
  (`--model_option`).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from mslam_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from mslam_jax.models.conformer import ConformerStack  # pylint: disable=import-outside-toplevel
  # Unrolled layers, the CPU setting of the gin files (ModelConfig.scan_unroll), unless
  # the shape sets the unroll, where the revision has the field (a --baseline may
  # predate it). `options` override any field.
  unroll = ({'scan_unroll': shape.scan_unroll or shape.num_layers}
            if 'scan_unroll' in {f.name for f in dataclasses.fields(ModelConfig)} else {})
  fields = dict(d_model=shape.d_model, num_heads=shape.num_heads, ffn_dim=shape.ffn_dim,
                dropout_rate=0.0, remat_policy=shape.remat, dtype=dtype, conv_kernel_size=5,
                **unroll)
  config = ModelConfig(**{**fields, **(options or {})})
  model = ConformerStack(config, shape.num_layers, deterministic=True)
  # The stack's input in the compute dtype, as the frontend hands it over in the model.
  x = jax.random.normal(jax.random.key(0), (shape.batch, shape.frames, shape.d_model),
                        jnp.dtype(dtype))
  paddings = jnp.zeros((shape.batch, shape.frames))
  params = model.init(jax.random.key(1), x, paddings)
  optimizer = optax.adam(1e-4)

  def loss_fn(p):
    return jnp.mean(jnp.square(model.apply(p, x, paddings).astype(jnp.float32)))

  def train_step(state):
    p, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  num_params = sum(a.size for a in jax.tree.leaves(params))
  return jax.jit(train_step, donate_argnums=0), (params, optimizer.init(params)), num_params


def _jax_worker(shape: Optional[Shape], dtype: str, options: Dict, device: str):
  """Builds the mslam_jax step; returns (params, step(), matmul(n) -> seconds, peak_bytes())."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mslam_jax import flops  # pylint: disable=import-outside-toplevel
  if device == 'gpu':
    try:
      backend = jax.default_backend()
    except (RuntimeError, AssertionError) as e:  # JAX_PLATFORMS=cuda without the plugin
      backend = f'no backend ({e!r})'
    if backend != 'gpu':
      raise RuntimeError(f'side_by_side --device gpu: JAX runs on {backend}; install jax with '
                         'its CUDA plugin for the driver (pip install "jax[cuda12]" or '
                         '"jax[cuda13]").')

  def matmul(n: int) -> float:
    return 2 * n ** 3 / flops.measure_peak_flops(jnp.dtype(dtype), n, repeats=1,
                                                 calls=MATMUL_CALLS[device])

  def peak_bytes() -> Optional[int]:
    stats = jax.devices()[0].memory_stats()  # None on the CPU backend
    return stats.get('peak_bytes_in_use') if stats else None

  if shape is None:
    return 0, None, matmul, peak_bytes
  train_step, state, num_params = build_jax_step(shape, dtype, options)
  holder = [state]

  def step():
    holder[0], loss = train_step(holder[0])
    loss.block_until_ready()

  import mslam_jax  # pylint: disable=import-outside-toplevel
  print(f'mslam_jax from {os.path.dirname(mslam_jax.__file__)}, jax {jax.__version__} on '
        f'{jax.devices()[0].device_kind}', file=sys.stderr)
  return num_params, step, matmul, peak_bytes


def _torch_worker(shape: Optional[Shape], dtype: str, options: Dict, device: str):
  """Builds the Wav2Vec2-BERT step; returns (params, step(), matmul(n) -> seconds, peak_bytes())."""
  if options:
    raise ValueError(f'side_by_side: --model_option {options} is for the mslam_jax stack.')
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  on_gpu = device == 'gpu'
  if on_gpu and not torch.cuda.is_available():
    raise RuntimeError('side_by_side --device gpu: torch sees no CUDA device.')
  where = torch.device('cuda' if on_gpu else 'cpu')
  # The host waits for the GPU's queue before the clock is read.
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)
  reduced = dtype == 'bfloat16'
  autocast = (lambda: torch.autocast(where.type, dtype=torch.bfloat16)) if reduced else (
      contextlib.nullcontext)

  def matmul(n: int) -> float:
    # Random operands, as JAX's (flops.measure_peak_flops): on a GPU products of
    # constant data run faster than of real data.
    a, b = (torch.randn((n, n), device=where).to(torch.bfloat16 if reduced else torch.float32)
            for _ in range(2))
    calls = MATMUL_CALLS[device]
    with torch.no_grad():
      a @ b
      sync()
      start = time.perf_counter()
      for _ in range(calls):
        a @ b
      sync()
    return (time.perf_counter() - start) / calls

  def peak_bytes() -> Optional[int]:
    return torch.cuda.max_memory_allocated() if on_gpu else None

  if shape is None:
    return 0, None, matmul, peak_bytes
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.Wav2Vec2BertConfig(
      hidden_size=shape.d_model, num_attention_heads=shape.num_heads,
      intermediate_size=shape.ffn_dim, num_hidden_layers=shape.num_layers,
      position_embeddings_type=None, layerdrop=0.0, apply_spec_augment=False,
      mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
      feat_proj_dropout=0.0, final_dropout=0.0, conv_depthwise_kernel_size=5)
  encoder = transformers.Wav2Vec2BertModel._from_config(  # pylint: disable=protected-access
      config, attn_implementation='sdpa').encoder
  encoder.to(where).train()
  optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-4)
  x = torch.randn(shape.batch, shape.frames, shape.d_model, device=where)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      out = encoder(x).last_hidden_state
    loss = out.float().square().mean()
    loss.backward()
    optimizer.step()
    sync()

  print(f'torch {torch.__version__}, transformers {transformers.__version__} on {where}',
        file=sys.stderr)
  return sum(p.numel() for p in encoder.parameters()), step, matmul, peak_bytes


def worker_main(framework: str, shape_name: str, dtype: str, options: Dict,
                device: str = 'cpu') -> None:
  shape = SHAPES.get(shape_name)
  build = {'jax': _jax_worker, 'torch': _torch_worker}[framework]
  start = time.perf_counter()
  num_params, step, matmul, peak_bytes = build(shape, dtype, options, device)
  if step is not None:
    step()  # compilation, first-touch allocation
    step()
  reply(ready=True, params=num_params, warmup_s=time.perf_counter() - start)
  faults = []
  for line in sys.stdin:
    command = line.split()
    if command[0] == 'step':
      reply(seconds=timed(step, faults))
    elif command[0] == 'faults':
      reply(faults=statistics.median(faults))
    elif command[0] == 'memory':
      reply(peak_bytes=peak_bytes())
    elif command[0] == 'matmul':
      reply(seconds=matmul(int(command[1])))
    elif command[0] == 'quit':
      return


# ----------------------------------------------------------------------------
# The parent: starts workers, alternates them, prints the tables.


def _worker(name: str, framework: str, shape: str, dtype: str, root: str = REPO_ROOT,
            malloc: Optional[str] = None, model_option: Optional[str] = None,
            device: str = 'cpu', xla_flags: Optional[str] = None) -> Worker:
  options = ['--model_option', model_option] if model_option else []
  env = dict(WORKER_ENV[device])
  if xla_flags:
    env['XLA_FLAGS'] = ' '.join(f for f in (os.environ.get('XLA_FLAGS'), xla_flags) if f)
  return Worker(name, [os.path.abspath(__file__), '--worker', framework, '--shapes', shape,
                       '--dtype', dtype, '--device', device, *options], root=root,
                malloc=malloc, env=env)


def parse_model_options(items: List[str]) -> Dict:
  """['NAME=VALUE', ...] -> ModelConfig fields; VALUE a Python literal, else a string."""
  from mslam_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  options = {}
  for item in items:
    name, sep, value = item.partition('=')
    if not sep or name not in fields:
      raise ValueError(f'side_by_side: --model_option {item!r} is not NAME=VALUE with NAME a '
                       'field of mslam_jax.models.config.ModelConfig '
                       '(e.g. transposed_weight_gradient=True).')
    try:
      options[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[name] = value
  return options


def measure_peak(dtype: str, rounds: int, device: str = 'cpu') -> Dict:
  """Matmul FLOP/s of both frameworks at MATMUL_SIZES; the best median is the peak."""
  workers = [_worker('mslam_jax', 'jax', 'none', dtype, device=device),
             _worker('torch', 'torch', 'none', dtype, device=device)]
  rates = {}
  try:
    for n in MATMUL_SIZES[device]:
      times = alternate(workers, f'matmul {n}', rounds)
      for name, ts in times.items():
        rates[f'{name} {n}'] = 2 * n ** 3 / statistics.median(ts)
  finally:
    for w in workers:
      w.close()
  best = max(rates, key=rates.get)
  return {'rates': rates, 'peak': rates[best], 'peak_from': best}


def shape_flops(shape: Shape) -> int:
  from mslam_jax import flops  # pylint: disable=import-outside-toplevel
  from mslam_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  config = ModelConfig(d_model=shape.d_model, num_heads=shape.num_heads, ffn_dim=shape.ffn_dim,
                       conv_kernel_size=5)
  return 3 * shape.num_layers * flops.conformer_layer_flops(
      config, shape.batch, shape.frames)['total']


def fastest_peer(row: Dict) -> str:
  """The name of the peer worker (one per allocator setting) with the lowest median."""
  peers = [name for name in row['workers'] if name.startswith('peer')]
  return min(peers, key=lambda name: row['workers'][name]['median_s'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu'),
                      help='where both frameworks run: the host CPU, or one CUDA GPU')
  parser.add_argument('--shapes', default=None,
                      help=f'comma-separated keys of {sorted(SHAPES)} '
                      f'(default: {DEFAULT_SHAPES})')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='compute dtype (params stay fp32): jax dtype, torch autocast')
  parser.add_argument('--pairs', type=int, default=7, help='alternated steps per worker')
  parser.add_argument('--baseline', default=None,
                      help='git revision whose mslam_jax stack runs as a third worker')
  parser.add_argument('--malloc', action='append', default=[], choices=host_memory.CHOICES,
                      help='one more worker: the mslam_jax stack with this host allocator '
                      'setting (repeatable; mslam_jax/host_memory.py)')
  parser.add_argument('--peer_malloc', action='append', default=[],
                      choices=[c for c in host_memory.CHOICES if c != 'system'],
                      help='one more peer worker with this host allocator setting (repeatable; '
                      'the peer runs with glibc\'s allocator)')
  parser.add_argument('--model_option', action='append', default=[], metavar='NAME=VALUE',
                      help='one more worker: the mslam_jax stack with this ModelConfig field '
                      'set (repeatable, one worker each; e.g. transposed_weight_gradient=True)')
  parser.add_argument('--xla_flags', action='append', default=[], metavar='FLAGS',
                      help='one more worker: the mslam_jax stack with FLAGS appended to '
                      'XLA_FLAGS (repeatable; e.g. --xla_flags=--xla_cpu_max_isa=AVX2)')
  parser.add_argument('--output', default=None, help='JSON file for the figures')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.worker, args.shapes, args.dtype, parse_model_options(args.model_option),
                args.device)
    return
  parse_model_options(args.model_option)  # a bad option fails here, not in every worker
  shapes = (args.shapes or DEFAULT_SHAPES[args.device]).split(',')
  unknown = [name for name in shapes if name not in SHAPES]
  if unknown:
    parser.error(f'--shapes: {unknown} are not among {sorted(SHAPES)}')
  device = args.device
  check_size = PEAK_CHECK_SIZE[device]

  where = machine.cpu_summary() + (f'; GPU: {machine.gpu_summary()}' if device == 'gpu' else '')
  print(f'side_by_side {args.dtype} on {device}: {where}', flush=True)
  peak = measure_peak(args.dtype, rounds=5, device=device)
  print('matmul GFLOP/s (median of 5): ' + ', '.join(
      f'{k} {v / 1e9:.0f}' for k, v in peak['rates'].items()), flush=True)
  print(f'peak at start: {peak["peak"] / 1e9:.0f} GFLOP/s ({peak["peak_from"]})', flush=True)
  results = {'machine': where, 'device': device, 'dtype': args.dtype, 'peak': peak,
             'baseline': args.baseline, 'shapes': {}}
  with contextlib.ExitStack() as stack:
    baseline_root = stack.enter_context(worktree(args.baseline)) if args.baseline else None
    for name in shapes:
      shape = SHAPES[name]
      workers = [_worker('mslam_jax', 'jax', name, args.dtype, device=device)]
      if baseline_root:
        workers.append(_worker(f'mslam_jax@{args.baseline}', 'jax', name, args.dtype,
                               root=baseline_root,
                               malloc=entry_point_malloc(baseline_root), device=device))
      for setting in args.malloc:
        workers.append(_worker(f'mslam_jax, MSLAM_HOST_MALLOC={setting}', 'jax', name,
                               args.dtype, malloc=setting, device=device))
      for option in args.model_option:
        workers.append(_worker(f'mslam_jax, {option}', 'jax', name, args.dtype,
                               model_option=option, device=device))
      for flags in args.xla_flags:
        workers.append(_worker(f'mslam_jax, XLA_FLAGS={flags}', 'jax', name, args.dtype,
                               device=device, xla_flags=flags))
      workers.append(_worker('peer', 'torch', name, args.dtype, malloc='system', device=device))
      for setting in args.peer_malloc:
        workers.append(_worker(f'peer, MSLAM_HOST_MALLOC={setting}', 'torch', name, args.dtype,
                               malloc=setting, device=device))
      try:
        params = {w.name: w.ready['params'] for w in workers}
        mismatch = abs(params['mslam_jax'] - params['peer']) / params['peer']
        if mismatch > 0.003:
          raise RuntimeError(f'side_by_side: parameter counts differ by {mismatch:.2%}: '
                             f'{params}; the shapes no longer match.')
        times = alternate(workers, 'step', args.pairs)
        faults = median_faults(workers)
        memory = {w.name: w.ask('memory')['peak_bytes'] for w in workers}
        # The peak again, in the same minutes as the steps: load on a shared machine moves.
        mm = alternate(workers, f'matmul {check_size}', args.pairs)
      finally:
        for w in workers:
          w.close()
      total_flops = shape_flops(shape)
      rates = {name: 2 * check_size ** 3 / statistics.median(ts) for name, ts in mm.items()}
      shape_peak = max(max(rates.values()), peak['peak'])
      row = {'label': shape.label(), 'flops': total_flops, 'params': params, 'workers': {},
             'matmul_during_steps': rates, 'peak': shape_peak}
      for w in workers:
        ts = times[w.name]
        med = statistics.median(ts)
        row['workers'][w.name] = {
            'median_s': med, 'min_s': min(ts), 'max_s': max(ts), 'times': ts,
            'gflops': total_flops / med / 1e9, 'mfu': total_flops / med / shape_peak,
            'warmup_s': w.ready['warmup_s'], 'page_faults': faults[w.name],
            'peak_device_bytes': memory[w.name]}
      results['shapes'][name] = row
      print(f'\n{name}: {row["label"]}, {total_flops / 1e9:.1f} GFLOP per step, '
            f'params {params}', flush=True)
      print(f'  matmul {check_size}^3 between the steps: ' + ', '.join(
          f'{k} {v / 1e9:.0f}' for k, v in rates.items()) +
            f' GFLOP/s; MFU below is against {shape_peak / 1e9:.0f} GFLOP/s', flush=True)
      width = max(len(wname) for wname in row['workers'])  # long flag names stay aligned
      for wname, r in row['workers'].items():
        held = r['peak_device_bytes']
        print(f'  {wname:{width}s} {r["median_s"]:.3f} s '
              f'(min {r["min_s"]:.3f}, max {r["max_s"]:.3f})'
              f'  {r["gflops"]:.0f} GFLOP/s  MFU {r["mfu"]:.0%}  warm-up {r["warmup_s"]:.0f} s'
              f'  page faults per step {r["page_faults"]:,.0f}'
              + ('' if held is None else f'  peak GPU memory {held / 2 ** 30:.1f} GiB'),
              flush=True)
      row['fastest_peer'] = peer_name = fastest_peer(row)
      peer_s = row['workers'][peer_name]['median_s']
      peer_times = times[peer_name]
      for wname, r in row['workers'].items():
        if not wname.startswith('peer'):
          r['peer_ratio_per_pair'] = paired_ratios(peer_times, times[wname])
          print(f'  {peer_name} / {wname}: {peer_s / r["median_s"]:.2f} (medians), '
                f'{ratio_summary(r["peer_ratio_per_pair"])} (pair by pair)', flush=True)
      # A baseline's or an option's time over this checkout's: > 1 where this checkout is faster.
      ours_s = row['workers']['mslam_jax']['median_s']
      for wname, r in row['workers'].items():
        if wname != 'mslam_jax' and not wname.startswith('peer'):
          r['ratio_to_this_checkout_per_pair'] = paired_ratios(times[wname], times['mslam_jax'])
          print(f'  {wname} / mslam_jax: {r["median_s"] / ours_s:.2f} (medians), '
                f'{ratio_summary(r["ratio_to_this_checkout_per_pair"])} (pair by pair)',
                flush=True)

  print('\n| shape (d / heads / ffn / layers, batch x frames) | GFLOP | ' +
        ' | '.join(next(iter(results['shapes'].values()))['workers']) +
        ' | fastest peer / mslam_jax (medians; pair by pair) |')
  for name, row in results['shapes'].items():
    cells = [f'{r["median_s"]:.2f} s ({r["min_s"]:.2f}-{r["max_s"]:.2f}), '
             f'{r["gflops"]:.0f} GFLOP/s, MFU {r["mfu"]:.0%}' for r in row['workers'].values()]
    ours = row['workers']['mslam_jax']
    ratio = row['workers'][row['fastest_peer']]['median_s'] / ours['median_s']
    per_pair = ratio_summary(ours['peer_ratio_per_pair'])
    print(f'| {row["label"]} | {row["flops"] / 1e9:.0f} | ' + ' | '.join(cells) +
          f' | {ratio:.2f}; pairs {per_pair} |')
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
