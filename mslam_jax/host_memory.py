"""Let XLA:CPU reuse its temporary buffer from one step to the next (glibc malloc settings).

XLA:CPU allocates one block for all of a program's temporaries at every
execution and frees it when the execution ends: 117 MB for the tiny demo's
train step, 890 MB for benchmarks/side_by_side.py's d256 stack step. With
glibc's default settings malloc serves a block that large with a fresh mmap
and returns it with munmap, so every step page-faults its whole temporary
buffer again (28,500 faults per demo step, about a third of its CPU time on a
2-core machine; benchmarks/RESULTS.md, "Host memory"). glibc keeps freed memory
for reuse only in its heaps, and only the main heap grows past 64 MB, so
three settings are needed:

  * M_ARENA_MAX = 1: every thread allocates from the main heap (XLA executes on
    its own threads, which otherwise get per-thread heaps capped at 64 MB);
  * M_MMAP_MAX = 0: no allocation is served by mmap;
  * M_TRIM_THRESHOLD = 2**31 - 1: free memory at the top of the heap is not
    handed back to the kernel.

The cost: the process keeps its peak heap, and all threads share one malloc
lock. Neither matters for a training process on a CPU; on TPU and GPU hosts
the temporaries live in device memory, so `keep_freed_memory_on_cpu` leaves
those processes alone (the input pipeline's threads keep their own heaps).

The settings must be made before a second thread allocates (before numpy,
jax or tensorflow are imported): a thread that already has a heap keeps it.
Entry points call `keep_freed_memory_on_cpu()` first; subprocesses get the
same settings through the environment (`environment()`, which glibc reads at
start-up), as launch/run_tests.sh and the benchmark workers do.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
from typing import Dict

# (mallopt parameter number from glibc's malloc.h, environment variable glibc
# reads at start-up, value). The one copy of the settings.
_SETTINGS = (
    (-8, 'MALLOC_ARENA_MAX', 1),                # M_ARENA_MAX
    (-4, 'MALLOC_MMAP_MAX_', 0),                # M_MMAP_MAX
    (-1, 'MALLOC_TRIM_THRESHOLD_', 2**31 - 1),  # M_TRIM_THRESHOLD (mallopt takes an int)
)


def environment() -> Dict[str, str]:
  """The settings as environment variables, for a subprocess's environment."""
  return {name: str(value) for _, name, value in _SETTINGS}


def keep_freed_memory() -> bool:
  """Applies the settings to this process with mallopt; False where malloc is not glibc's."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  return all(libc.mallopt(param, value) == 1 for param, _, value in _SETTINGS)


def xla_runs_on_cpu() -> bool:
  """Whether jax will run on the CPU, told without importing jax.

  JAX_PLATFORMS decides where it is set; otherwise jax picks an accelerator
  when a plugin for one is installed (libtpu, or a `jax_plugins` package such
  as jax_cuda12_plugin).
  """
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return False
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return importlib.util.find_spec('jax_plugins') is None


def keep_freed_memory_on_cpu() -> bool:
  """`keep_freed_memory()` when jax will run on the CPU; returns whether it was applied."""
  return xla_runs_on_cpu() and keep_freed_memory()


if __name__ == '__main__':
  # `eval "$(python -m mslam_jax.host_memory)"` exports the settings in a shell.
  print(' '.join(f'export {name}={value};' for name, value in environment().items()))
