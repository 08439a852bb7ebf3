"""Cloud TPU slices by the names users type, as devices to compile for on any machine.

    slice_ = parse_accelerator_type('v5litepod-256')  # -> 256 v5e chips, 'v5e:16x16'
    devices = compile_only_devices(slice_)             # needs the `tpu` extra (libtpu)

With libtpu installed (`pip install -e '.[tpu]'`), jax.experimental.topologies
describes a TPU slice without a TPU: its devices can be compiled for (not run
on), and the compiled program reports its per-device memory. mslam_jax.compile
--topology=NAME uses this to tell whether a config fits a slice's HBM before
the slice is rented.

Accelerator names follow Cloud TPU's `--accelerator-type`: v4-N and v5p-N
count TensorCores (2 per chip; one JAX device per chip, "megacore"),
v5litepod-N (v5e) and v6e-N count chips. Chip grids and HBM per chip are from
the Cloud TPU system architecture pages (v4: 32 GiB, v5e: 16 GiB, v5p: 95 GiB,
v6e: 32 GiB).
"""

import dataclasses
import os
import re
from typing import List, Optional

from mslam_jax import console

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class _Generation:
  """What one TPU generation's accelerator names mean.

  Attributes:
    topology_prefix: the generation's name in libtpu topology names ('v5e').
    cores_per_name_unit: TensorCores per unit of the name's number (2: the
      number counts cores, 1: chips) -- v4-64 is 32 chips.
    grids: chips -> chip grid of the standard slice shapes.
    hbm_gib: HBM per chip.
    chip_config_name: libtpu's chip configuration ('megacore': one device per
      chip, as JAX sees v4 and v5p), None for the default.
  """
  topology_prefix: str
  cores_per_name_unit: int
  grids: dict
  hbm_gib: float
  chip_config_name: Optional[str]


_GRIDS_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
             256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
_GRIDS_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
             256: '16x16'}
GENERATIONS = {
    'v4': _Generation('v4', 2, _GRIDS_3D, 32, 'megacore'),
    'v5p': _Generation('v5p', 2, _GRIDS_3D, 95, 'megacore'),
    'v5litepod': _Generation('v5e', 1, _GRIDS_2D, 16, None),
    'v5e': _Generation('v5e', 1, _GRIDS_2D, 16, None),
    'v6e': _Generation('v6e', 1, _GRIDS_2D, 32, None),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A named TPU slice.

  Attributes:
    name: as given ('v4-64').
    chips: chips in the slice (= JAX devices).
    topology_name: libtpu's name for it ('v4:2x4x4').
    hbm_bytes_per_device: HBM of one chip.
    chip_config_name: libtpu chip configuration, or None.
  """
  name: str
  chips: int
  topology_name: str
  hbm_bytes_per_device: int
  chip_config_name: Optional[str]


def parse_accelerator_type(name: str) -> TpuSlice:
  """'v4-64', 'v5p-128', 'v5litepod-256', 'v6e-16' -> TpuSlice; ValueError naming the choices."""
  match = re.fullmatch(r'(v4|v5p|v5litepod|v5e|v6e)-(\d+)', name.strip().lower())
  known = ', '.join(f'{g}-N' for g in GENERATIONS)
  if not match:
    raise ValueError(f'--topology={name!r}: expected a Cloud TPU accelerator type ({known}), '
                     'e.g. v4-64, v5p-128, v5litepod-256')
  generation = GENERATIONS[match.group(1)]
  number = int(match.group(2))
  chips, rest = divmod(number, generation.cores_per_name_unit)
  if rest or chips not in generation.grids:
    sizes = ', '.join(f'{match.group(1)}-{c * generation.cores_per_name_unit}'
                      for c in generation.grids)
    raise ValueError(f'--topology={name!r}: no standard slice of that size; choose one of '
                     f'{sizes}')
  return TpuSlice(name=name, chips=chips,
                  topology_name=f'{generation.topology_prefix}:{generation.grids[chips]}',
                  hbm_bytes_per_device=int(generation.hbm_gib * GIB),
                  chip_config_name=generation.chip_config_name)


def compile_only_devices(tpu_slice: TpuSlice) -> List:
  """The slice's devices, to lower and compile for (nothing runs on them).

  Raises SystemExit with the install command when libtpu is missing.
  """
  # No TPU VM metadata server here: do not wait for it. Nothing runs on a TPU,
  # so several compiling processes may share libtpu (it otherwise takes a
  # machine-wide lock, /tmp/libtpu_lockfile).
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = ({'chip_config_name': tpu_slice.chip_config_name}
            if tpu_slice.chip_config_name else {})
  try:
    # libtpu logs to fd 2 at load, before absl is set up, that it found no TPU VM
    # (no worker hostnames, no accelerator type): true and harmless here.
    with console.stderr_set_aside(not console.verbose()):
      topology = topologies.get_topology_desc(platform='tpu',
                                              topology_name=tpu_slice.topology_name, **kwargs)
  except Exception as e:  # pylint: disable=broad-except (jax raises several kinds here)
    raise SystemExit(
        f'cannot describe TPU slice {tpu_slice.name} ({tpu_slice.topology_name}): '
        f'{str(e).splitlines()[0] if str(e) else type(e).__name__}. Compiling for a TPU '
        "needs libtpu: pip install -c constraints.txt -e '.[tpu]'") from None
  devices = list(topology.devices)
  if len(devices) != tpu_slice.chips:
    raise SystemExit(f'{tpu_slice.name}: libtpu described {len(devices)} devices for '
                     f'{tpu_slice.topology_name}, expected {tpu_slice.chips} chips')
  return devices
