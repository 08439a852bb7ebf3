"""Ahead-of-time compile of the sharded train step, for fake CPU devices or a TPU slice.

    python -m mslam_jax.compile --gin_file=gin/pretrain_2b.gin --num_devices=8 \
        --gin.MESH_SHAPE="(1, 8, 1)"
    python -m mslam_jax.compile --gin_file=gin/pretrain_0.6b.gin --topology=v5litepod-256

--topology (needs the `tpu` extra, libtpu) compiles with XLA:TPU for a named
Cloud TPU slice on this machine, without a TPU (mslam_jax/tpu_topologies.py),
and compares the per-device total with the chip's HBM. A step that does not
fit exits non-zero; when XLA:TPU refuses it, the message names the gradient
accumulation to try (`accumulation_advice`). launch/tpu_pod.py --check_fit
runs this before it creates a TPU VM.

Answers "does this config fit, and how is it split?" before a pod slice is
booked, on any machine:

  --num_devices fake CPU devices -> mesh and rules from gin
  -> abstract state (shapes + shardings) + abstract global batch + abstract rng
  -> lower `trainer.jit_train_step(...)` (training's own step) -> compile
  -> print: mesh and rules, parameter count, lowering and compile time,
     XLA's per-device memory (arguments, outputs, temporaries, code, aliasing),
     the analytical step TFLOP, and the per-device bytes of params + optimizer
     state from the shardings (FSDP divides them by the fsdp axis size).

Nothing is allocated: every input is a jax.ShapeDtypeStruct. The last line is
`per_device_bytes: N`, XLA's total for one device.

The figures come from XLA:CPU's buffer assignment. The state bytes depend only
on the shardings and hold on any backend; temporaries depend on the compiler
(fusion, layouts, remat), so a TPU or GPU compile will differ somewhat.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from mslam_jax import console

if __name__ == '__main__':
  console.quiet_unless_verbose()  # before jax and tensorflow load their loggers

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Dict, Iterator, Optional, Sequence

import jax
import numpy as np

from mslam_jax import flops
from mslam_jax import gin_utils
from mslam_jax import partitioning
from mslam_jax import optimizer as optimizer_lib
from mslam_jax import pretrain_loss
from mslam_jax import tpu_topologies
from mslam_jax import trainer
from mslam_jax.data import batch_spec
from mslam_jax.models.config import ModelConfig
from mslam_jax.train_config import TrainConfig

GIB = 1024 ** 3
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# (label, CompiledMemoryStats attribute), in the order they are printed.
_MEMORY_FIELDS = (
    ('argument', 'argument_size_in_bytes'),
    ('output', 'output_size_in_bytes'),
    ('alias', 'alias_size_in_bytes'),
    ('temp', 'temp_size_in_bytes'),
    ('generated_code', 'generated_code_size_in_bytes'),
)


# What to change when the step needs more memory per chip than the chip has.
FIT_ADVICE = ('Accumulate gradients (--gin.TrainConfig.accumulate_steps=K), choose another '
              'remat policy, or a larger slice.')
# XLA:TPU's refusal: "... the total memory required for HLO temporaries (102.29G)
# exceeds available HBM (15.75G)" (libtpu 0.0.42.1), or "... temporaries 105.92G,
# available 30.75G".
_TEMPORARIES_OVER = re.compile(r'temporaries \(?([\d.]+)([KMGT]?)\)?'
                               r'(?: exceeds available HBM \(|, available )([\d.]+)([KMGT]?)')


def accumulations(batch_sizes: Sequence[int], shards: int, most: int) -> Iterator[int]:
  """K = 1, 2, 4, ... <= most whose micro-batches (B / K) still split over the batch shards.

  batch_sizes: the global batch of each enabled data kind; shards: the mesh's
  batch shards (data x fsdp). `trainer` splits every kind's batch into K equal
  micro-batches, each sharded like the whole batch.
  """
  k = 1
  while k <= most:
    if all(b % k == 0 and (b // k) % shards == 0 for b in batch_sizes):
      yield k
    k *= 2


def accumulation_advice(refusal: str, accumulate_steps: int, batch_sizes: Sequence[int],
                        shards: int) -> str:
  """What to try after XLA:TPU refused the step with `refusal` (its message).

  The temporaries are mostly activations. In the compiles of
  benchmarks/RESULTS.md ("TPU slices") they shrank at least as fast as the
  micro-batch (0.6B on a v4-128: 105.9G at K = 1, 39.0G at 2, 22.9G at 4), so
  the K to try is the smallest allowed multiple of the current one that
  divides them by at least needed / available. That names the smallest K
  that fit for 0.6B (4 on a v4-128, 2 on a v5p-128) and 2B (2 on a
  v5litepod-256); a tiny step at 102G of 15.75 got 8 where 4 fit too. A
  guess to compile, not a promise; FIT_ADVICE when the message has no
  figures.
  """
  match = _TEMPORARIES_OVER.search(refusal)
  if not match:
    return FIT_ADVICE
  scale = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
  needed = float(match.group(1)) * scale[match.group(2)]
  available = float(match.group(3)) * scale[match.group(4)]
  wanted = accumulate_steps * needed / available
  for k in accumulations(batch_sizes, shards, most=2 ** 16):
    if k >= wanted and k % accumulate_steps == 0:
      return (f'Try --gin.TrainConfig.accumulate_steps={k}: the temporaries are '
              f'{needed / available:.1f}x what the chip has free, and they shrink at least '
              'as fast as the micro-batch, so this K should fit; a smaller one may too '
              '(benchmarks/tpu_fit.py compiles each K in turn). Or choose another remat '
              'policy, or a larger slice.')
  return (f'No gradient accumulation of {accumulate_steps} or more splits the batch '
          f'({", ".join(map(str, batch_sizes))}) into micro-batches over the {shards} batch '
          "shards: choose another remat policy (e.g. --gin.ModelConfig.remat_policy='full') "
          'or a larger slice.')


class ConfigError(ValueError):
  """The gin config does not fit the devices (mesh shape, batch split, parameter split)."""


class DoesNotFitError(RuntimeError):
  """XLA:TPU refused the step: it needs more HBM per chip than the chip has."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What one ahead-of-time compile found; all sizes in bytes.

  Attributes:
    mesh_description: `partitioning.describe` of the mesh and rules.
    num_devices: devices in the mesh.
    num_params: trainable parameters.
    lower_s: seconds to trace and lower the step (abstract state included).
    compile_s: seconds XLA took to compile it.
    memory: XLA's per-device sizes by `_MEMORY_FIELDS` label.
    per_device_bytes: argument + output - alias + temp + generated code: what
      one device holds at the step's peak (donated state counted once).
    state_bytes: params + optimizer state (+ step counters), whole.
    state_bytes_per_device: the same, one device's shards only.
    step_flops: analytical FLOPs of one step (mslam_jax.flops), all devices.
    topology: the TPU slice compiled for (--topology), None for CPU devices.
    hbm_bytes_per_device: that slice's HBM per chip, None for CPU devices.
  """
  mesh_description: str
  num_devices: int
  num_params: int
  lower_s: float
  compile_s: float
  memory: Dict[str, int]
  per_device_bytes: int
  state_bytes: int
  state_bytes_per_device: int
  step_flops: float
  topology: Optional[str] = None
  hbm_bytes_per_device: Optional[int] = None


def use_fake_cpu_devices(num_devices: int) -> None:
  """Makes jax start `num_devices` CPU devices; needs a backend not yet started.

  XLA reads the device count when the CPU client is created, so setting the
  flag after `import jax` works as long as nothing has asked for a device yet.
  Any device count already in XLA_FLAGS is replaced, not appended: XLA would
  otherwise take whichever comes last.
  """
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith(_DEVICE_COUNT_FLAG)]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'{_DEVICE_COUNT_FLAG}={num_devices}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'
  # jax read JAX_PLATFORMS when it was imported; the config is what counts now.
  jax.config.update('jax_platforms', 'cpu')


def require_devices(num_devices: int) -> None:
  """Raises SystemExit unless jax sees exactly `num_devices` devices."""
  found = jax.device_count()
  if found != num_devices:
    raise SystemExit(
        f'--num_devices={num_devices}, but jax started {found} {jax.devices()[0].platform} '
        f'device(s): its backend was already running when the flag was set. Run the tool in '
        f'a fresh process (python -m mslam_jax.compile), or start Python with '
        f'JAX_PLATFORMS=cpu XLA_FLAGS={_DEVICE_COUNT_FLAG}={num_devices}.')


def tree_bytes(tree) -> int:
  """Bytes of every leaf of an abstract (or real) tree, unsharded."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def tree_bytes_per_device(tree) -> int:
  """Bytes of one device's shard of every leaf (leaves must carry a sharding).

  Shards of a NamedSharding all have one shape (jit rejects uneven splits of
  arguments), so one device's share is the shard shape's size.
  """
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def memory_per_device(compiled):
  """(XLA's sizes by `_MEMORY_FIELDS` label, their per-device total) of a compiled program.

  The total is argument + output - alias + temp + generated code: what one
  device holds at the program's peak, donated buffers counted once. Not
  `peak_memory_in_bytes`: XLA:CPU reports less there than one argument plus
  its temporaries, so the buffers are summed instead.
  """
  stats = compiled.memory_analysis()
  memory = {label: int(getattr(stats, attr, 0) or 0) for label, attr in _MEMORY_FIELDS}
  total = (memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
           + memory['generated_code'])
  return memory, total


def compile_train_step(model_config: ModelConfig, loss_config: pretrain_loss.LossConfig,
                       batch_config: batch_spec.BatchConfig, train_config: TrainConfig,
                       mesh_config: partitioning.MeshConfig,
                       optimizer=None, devices=None, tpu_slice=None):
  """Lowers and compiles the train step on the current (or given) devices, all abstract.

  devices: compile-only devices of a TPU slice (tpu_topologies), described
  by `tpu_slice`; None: jax's devices.

  Returns (compiled, CompileReport). Raises ConfigError with the fix when the
  mesh shape does not match the devices or a batch does not split over it.
  """
  optimizer = optimizer or optimizer_lib.make_optimizer()
  rules = mesh_config.rules
  start = time.perf_counter()
  try:  # the messages of the mesh, batch split and state checks already name the fix
    mesh = partitioning.make_mesh(mesh_config, devices)
    partitioning.check_batch_split(batch_config, loss_config.parts, mesh)
    abstract_state, shardings = trainer.state_shardings(
        optimizer, mesh, rules, model_config=model_config, loss_config=loss_config,
        batch_config=batch_config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  batch = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=partitioning.batch_sharding(mesh)),
      batch_spec.abstract_batch(batch_config, loss_config.parts))
  # The key's dtype without creating a key on a device.
  key_dtype = jax.eval_shape(jax.random.key, 0).dtype
  rng = jax.ShapeDtypeStruct((), key_dtype, sharding=partitioning.replicated(mesh))
  # Training's own builder: `lower` enters the mesh and rules a real call does.
  step = trainer.jit_train_step(
      trainer.make_train_step(optimizer, model_config=model_config, loss_config=loss_config,
                              accumulate_steps=train_config.accumulate_steps),
      shardings, mesh, rules, train_config.compiler_options)
  lowered = step.lower(abstract_state, batch, rng)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA:TPU checks memory at compile time and names what is over (XLA:CPU never does).
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    refusal = str(e).strip().splitlines()[0]
    advice = accumulation_advice(
        refusal, train_config.accumulate_steps,
        [getattr(batch_config, f'{kind}_batch_size') for kind in loss_config.parts],
        partitioning.batch_shards(mesh))
    raise DoesNotFitError(
        f'{refusal} (compiled in {time.perf_counter() - start:.0f} s). {advice}') from None
  compile_s = time.perf_counter() - start

  memory, per_device = memory_per_device(compiled)
  report = CompileReport(
      mesh_description=partitioning.describe(mesh, rules, verbose=True),
      num_devices=mesh.devices.size,
      num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))),
      lower_s=lower_s, compile_s=compile_s, memory=memory, per_device_bytes=per_device,
      state_bytes=tree_bytes(abstract_state),
      state_bytes_per_device=tree_bytes_per_device(abstract_state),
      step_flops=float(flops.train_step_flops(model_config, batch_config,
                                              loss_config)['total']),
      topology=tpu_slice.name if tpu_slice else None,
      hbm_bytes_per_device=tpu_slice.hbm_bytes_per_device if tpu_slice else None)
  return compiled, report


def _size(n: int) -> str:
  """Bytes in MiB below 1 GiB, else GiB (tiny and 2B configs both stay readable)."""
  return f'{n / GIB:8.3f} GiB' if n >= GIB else f'{n / 2 ** 20:8.3f} MiB'


def _count(n: int) -> str:
  return f'{n / 1e9:.3f}B' if n >= 1e9 else f'{n / 1e6:.2f}M'


def format_report(report: CompileReport) -> str:
  """Human-readable lines; the last one is `per_device_bytes: N`."""
  r = report
  lines = [r.mesh_description,
           f'parameters: {r.num_params:,d} ({_count(r.num_params)})',
           f'lowering: {r.lower_s:.1f} s  compile: {r.compile_s:.1f} s']
  lines.append(f'train step: {r.step_flops / 1e12:.4g} TFLOP (analytical, all devices; '
               f'{r.step_flops / r.num_devices / 1e12:.4g} per device)')
  lines.append(f'params + optimizer state: {_size(r.state_bytes).strip()} whole, '
               f'{_size(r.state_bytes_per_device).strip()} per device '
               f'(split {r.state_bytes / max(r.state_bytes_per_device, 1):.2f} ways)')
  lines.append('XLA memory per device:')
  for label, n in r.memory.items():
    lines.append(f'  {label:<15s}{_size(n)}  {n:>16,d} bytes')
  lines.append(f'  {"total":<15s}{r.per_device_bytes / GIB:8.3f} GiB  '
               f'{r.per_device_bytes:>16,d} bytes  (argument + output - alias + temp + code)')
  if r.hbm_bytes_per_device:
    share = r.per_device_bytes / r.hbm_bytes_per_device
    lines.append(f'{r.topology}: {r.per_device_bytes / GIB:.2f} of {r.hbm_bytes_per_device / GIB:.0f}'
                 f' GiB HBM per chip ({100 * share:.0f}%): '
                 f'{"fits" if share <= 1 else "does NOT fit"}')
  lines.append(f'state_bytes_per_device: {r.state_bytes_per_device}')
  lines.append(f'per_device_bytes: {r.per_device_bytes}')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> CompileReport:
  parser = argparse.ArgumentParser(prog='python -m mslam_jax.compile',
                                   description=__doc__.splitlines()[0])
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--num_devices', type=int,
                     help='fake CPU devices to compile for (the mesh must hold them all)')
  where.add_argument('--topology', metavar='ACCELERATOR_TYPE',
                     help='a Cloud TPU slice to compile for with XLA:TPU, e.g. v4-64, '
                     "v5p-128, v5litepod-256, v6e-16 (needs pip install -e '.[tpu]')")
  parser.add_argument('--json', metavar='PATH',
                      help='also write the report as a JSON object to PATH')
  # Compiles only: nothing is written, so a pod file's REQUIRED MODEL_DIR need not be given.
  args = gin_utils.parse_command_line(parser.description, argv, parser,
                                      writes_model_dir=False)
  devices = tpu_slice = None
  if args.topology:
    try:
      tpu_slice = tpu_topologies.parse_accelerator_type(args.topology)
    except ValueError as e:
      parser.error(str(e))
    use_fake_cpu_devices(1)  # the host side stays on the CPU; the step compiles for the TPU
    devices = tpu_topologies.compile_only_devices(tpu_slice)
    target = f'--topology={args.topology}'
  else:
    if args.num_devices < 1:
      parser.error('--num_devices must be at least 1')
    use_fake_cpu_devices(args.num_devices)
    require_devices(args.num_devices)
    target = f'--num_devices={args.num_devices}'
  # A line while it works, then one a minute: a 2B step takes about 30 s for 8 CPU devices,
  # 0.6B for a v4-128 about 12 minutes on 2 CPU cores (benchmarks/RESULTS.md, "TPU slices").
  print(f'compiling the train step for {target} with XLA:{"TPU" if tpu_slice else "CPU"}...',
        flush=True)
  try:
    with console.still_working('compiling'):
      _, report = compile_train_step(ModelConfig(), pretrain_loss.LossConfig(),
                                     batch_spec.BatchConfig(), TrainConfig(),
                                     partitioning.MeshConfig(), devices=devices,
                                     tpu_slice=tpu_slice)
  except ConfigError as e:
    raise SystemExit(f'cannot compile for {target}: {e}') from e
  except DoesNotFitError as e:
    if args.json:
      with open(args.json, 'w', encoding='utf-8') as f:
        json.dump({'topology': args.topology, 'fits': False, 'error': str(e)}, f, indent=1)
    raise SystemExit(f'does not fit {target}: {e}') from None
  fits = report.hbm_bytes_per_device is None or (
      report.per_device_bytes <= report.hbm_bytes_per_device)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({**dataclasses.asdict(report), 'fits': fits}, f, indent=1)
  print(format_report(report), flush=True)
  if not fits:  # a non-zero exit, as when XLA:TPU refuses, for scripts (tpu_pod.py --check_fit)
    raise SystemExit(f'does not fit {target}: see the memory above. {FIT_ADVICE}')
  return report


if __name__ == '__main__':
  main(sys.argv[1:])
