"""Huge pages for XLA:CPU's temporary buffer (glibc's `glibc.malloc.hugetlb` tunable).

XLA:CPU allocates one block for all of a program's temporaries at every
execution and frees it when the execution ends: 116 MB for the tiny demo's
train step. glibc serves a block that large with a fresh mmap, so every step
faults its whole temporary buffer in again, one 4 KiB page at a time (28,700
page faults per demo step; a third of the step's CPU time went to the kernel).
With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks the kernel for
transparent huge pages on its mappings (madvise): the same buffer comes in
2 MiB at a time (a few hundred faults per step), and the demo step ran 1.21x
faster in an alternated run (benchmarks/RESULTS.md, "Host memory"; there too:
for buffers of a gigabyte or more the kernel's compaction made the median step
slower; GLIBC_TUNABLES=glibc.malloc.hugetlb=0 turns it off).

glibc reads tunables only when a process starts. `use_huge_pages_on_cpu()`
therefore re-executes the process once, with the same command line
(`sys.orig_argv`) and GLIBC_TUNABLES set; the entry points (train, finetune,
reproduce) call it before anything else. Subprocesses get it through their
environment (`environment()`): launch/run_tests.sh and the benchmark workers.

Nothing happens where it cannot help: malloc other than glibc >= 2.35 on
Linux, transparent huge pages off (`never`), GLIBC_TUNABLES already naming
the tunable, or jax running on a TPU or GPU (the temporaries then live in
device memory).

Tried and not kept: glibc's arena settings (M_ARENA_MAX=1, M_MMAP_MAX=0,
M_TRIM_THRESHOLD) keep the buffer's pages for reuse, but one malloc lock for
all threads made the demo's compile about 40% slower.
"""

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Dict

_NAME = 'glibc.malloc.hugetlb'
_TUNABLE = f'{_NAME}=1'


def environment() -> Dict[str, str]:
  """GLIBC_TUNABLES with the huge-page tunable added, for a subprocess's environment."""
  current = os.environ.get('GLIBC_TUNABLES', '')
  if _NAME in current:
    return {'GLIBC_TUNABLES': current}
  return {'GLIBC_TUNABLES': ':'.join(filter(None, [current, _TUNABLE]))}


def supported() -> bool:
  """glibc >= 2.35 on Linux (the tunable's first release) with transparent huge pages on."""
  if platform.system() != 'Linux':
    return False
  libc, version = platform.libc_ver()
  try:
    if libc != 'glibc' or tuple(int(v) for v in version.split('.')[:2]) < (2, 35):
      return False
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='utf-8') as f:
      return '[never]' not in f.read()
  except (OSError, ValueError):
    return False


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


def use_huge_pages_on_cpu() -> None:
  """Re-executes this process with the tunable set, once, when jax will run on the CPU.

  Call it first thing in a `__main__` block: whatever ran before it runs again.
  """
  if _NAME in os.environ.get('GLIBC_TUNABLES', '') or not getattr(sys, 'orig_argv', None):
    return
  if not (supported() and xla_runs_on_cpu()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, **environment()})


if __name__ == '__main__':
  # `eval "$(python -m mslam_jax.host_memory)"` exports the setting in a shell.
  print(' '.join(f'export {k}={v};' for k, v in environment().items()) if supported() else '')
