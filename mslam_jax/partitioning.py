"""The device mesh and the logical-to-mesh rules (which array axes shard where).

Three mesh axes, all configured in gin (`MESH_SHAPE`, `gin/meshes/*.gin`):
  data   pure data parallelism: the batch is split, every weight is replicated;
  fsdp   the batch is split *and* weights are sharded along their 'embed' axis
         (gathered per layer in the step: ZeRO-3 / FSDP);
  model  tensor parallelism: 'mlp', 'heads', 'vocab' and 'codes' axes are split.
A -1 in the shape takes the remaining devices, e.g. (-1, 1, 1) is data
parallel on every device.

The model names its axes (`nn.with_logical_partitioning` on parameters,
`nn.with_logical_constraint` on activations); the rules in
`gin/meshes/rules.gin` map those names to mesh axes. That file is their one
source: runs bind them through gin (`MeshConfig.rules`), and code that runs
without a gin config (the downstream engine, tests, tools) reads the same
binding with `default_rules()`. flax applies the rules in order and never uses a mesh axis twice
in one array, so 'batch' (listed first) takes (data, fsdp) on activations and
'embed' falls back to replicated there, while on weights 'embed' takes fsdp.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import gin
from gin import config_parser
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import mslam_jax

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')

RULES_GIN = os.path.join(mslam_jax.REPO_ROOT, 'gin', 'meshes', 'rules.gin')


@functools.lru_cache(maxsize=None)
def default_rules() -> Tuple[Tuple[str, Any], ...]:
  """The `MeshConfig.rules` binding of gin/meshes/rules.gin, parsed without touching gin's state.

  ((logical axis, mesh axes or None), ...); ours, following t5x/MaxText conventions.
  """
  with open(RULES_GIN, encoding='utf-8') as f:
    parser = config_parser.ConfigParser(f, gin.config.ParserDelegate(skip_unknown=True))
    for statement in parser:
      if (isinstance(statement, config_parser.BindingStatement)
          and statement.selector == 'MeshConfig' and statement.arg_name == 'rules'):
        return tuple(statement.value)
  raise ValueError(f'{RULES_GIN} has no MeshConfig.rules binding; restore it (see git log).')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Attributes:
    shape: sizes of the (data, fsdp, model) axes; one may be -1 (the rest).
    rules: logical axis -> mesh axes (None: default_rules(), gin/meshes/rules.gin).
  """
  shape: Tuple[int, int, int] = (-1, 1, 1)
  rules: Optional[Tuple[Tuple[str, Any], ...]] = None

  def __post_init__(self):
    if self.rules is None:
      object.__setattr__(self, 'rules', default_rules())


def resolve_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
  """Fills one -1 so the product is num_devices; raises with the fix otherwise."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'MESH_SHAPE {shape} must have {len(MESH_AXES)} entries {MESH_AXES}')
  if shape.count(-1) > 1:
    raise ValueError(f'MESH_SHAPE {shape}: at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'MESH_SHAPE {shape}: {num_devices} devices are not divisible by {known}')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'MESH_SHAPE {shape} holds {math.prod(shape)} devices, but there are '
                     f'{num_devices}; make the product {num_devices} or use -1 for one axis')
  return shape


def make_mesh(config: Optional[MeshConfig] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh of all (or the given) devices with (data, fsdp, model) axes.

  Axes are of type Auto: the classic jit + sharding-constraint style (in current
  jax, jax.make_mesh would make them Explicit by default).
  """
  config = config or MeshConfig()
  devices = list(devices) if devices is not None else jax.devices()
  if tuple(config.shape) == (1, 1, 1) and len(devices) > 1 and jax.process_count() == 1:
    # A one-device run (the tiny CPU config) on a machine with more devices,
    # e.g. the 8 fake devices of the test suite: take the first. Any other shape
    # must hold every device (resolve_shape says so).
    print(f'mesh (1, 1, 1) uses 1 of the {len(devices)} devices; use -1 in MESH_SHAPE '
          'to take them all', flush=True)
    devices = devices[:1]
  shape = resolve_shape(config.shape, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may carry logical axis names.

  Leaves without names (e.g. Adam's step count) are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces `batch_sharding` cuts a batch into: the product of BATCH_AXES."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh: Mesh):
  """This process's numpy batch -> global jax.Arrays split over (data, fsdp).

  Every process passes its own rows (the sampler's per-host share); the global
  batch is their concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def check_batch_split(batch_config, parts: Sequence[str], mesh: Optional[Mesh] = None, *,
                      num_hosts: Optional[int] = None) -> None:
  """Raises ValueError unless every enabled kind's global batch splits evenly.

  The one check of batch sizes against the devices, run before anything is
  built (train.py, compile.py; the sampler's per-host split is the same rule).
  A global batch must split over
    * the mesh's batch shards: the product of its BATCH_AXES (data x fsdp),
      which `batch_sharding` splits the leading axis over;
    * the hosts: each process feeds an equal share of rows to `global_batch`.
  The message names the BatchConfig field, its value, the mesh axes and the fix.

  Args:
    batch_config: a `data.batch_spec.BatchConfig`; reads `{kind}_batch_size`.
    parts: the enabled data kinds, e.g. LossConfig.parts ('speech', 'text',
      'paired').
    mesh: the (data, fsdp, model) mesh the step runs on; None checks the
      hosts only.
    num_hosts: processes that feed the batch (default: those holding the
      mesh's devices, or jax.process_count() without a mesh).
  """
  shards = batch_shards(mesh) if mesh is not None else 1
  if num_hosts is None:
    num_hosts = (len({device.process_index for device in mesh.devices.flat})
                 if mesh is not None else jax.process_count())
  multiple = math.lcm(shards, num_hosts)
  for kind in parts:
    field = f'{kind}_batch_size'
    size = getattr(batch_config, field)
    if size % shards:
      axes = ', '.join(f'{name}={n}' for name, n in mesh.shape.items())
      where = f'the {shards} batch shards of the mesh ({" x ".join(BATCH_AXES)} of {axes})'
      other = 'change MESH_SHAPE'
    elif size % num_hosts:
      where = f'the {num_hosts} hosts (each feeds an equal share of rows)'
      other = 'run on another number of hosts'
    else:
      continue
    raise ValueError(
        f'BatchConfig.{field}={size} does not split over {where}; make it a multiple of '
        f'{multiple} (--gin.BatchConfig.{field}=N) or {other}.')


def describe(mesh: Mesh, rules, verbose: bool = False) -> str:
  """The mesh and where the rules put things, for the start-up log.

  One line: the mesh, then only the logical axes that are split (the rest are
  replicated); verbose adds the whole rules table, one rule a line.
  """
  shape = ', '.join(f'{name}={size}' for name, size in mesh.shape.items())
  split = ', '.join(f'{logical}->{mesh_axes}' for logical, mesh_axes in rules
                    if mesh_axes is not None)
  line = (f'mesh: {shape} ({mesh.devices.size} devices, {jax.process_count()} processes); '
          f'split: {split or "nothing"}; other axes replicated')
  if not verbose:
    return line
  return '\n'.join([line, 'logical axis rules:'] +
                   [f'  {logical:12s} -> {mesh_axes}' for logical, mesh_axes in rules])
