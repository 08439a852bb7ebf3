"""The host allocator for XLA:CPU: mimalloc, or glibc with huge pages, chosen at start-up.

XLA:CPU allocates one block for all of a program's temporaries at every
execution and frees it when the execution ends: 116 MB for the tiny demo's
train step, 0.9-2 GB for the larger CPU benchmark stacks. glibc serves a block
that large with a fresh mmap and unmaps it on free, so every step faults its
whole temporary buffer in again, one 4 KiB page at a time (28,700 page faults
per demo step; a third of the step's CPU time went to the kernel).

Three settings, in `MSLAM_HOST_MALLOC` (default: the first one available):

  mimalloc   mimalloc (Microsoft's allocator; the `cmeel-mimalloc` wheel, a
             dependency on Linux x86-64) preloaded with LD_PRELOAD. It keeps a
             freed block and hands it to the next step: a few hundred page
             faults per demo step instead of 28,700.
  hugepages  glibc with its `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35,
             transparent huge pages not `never`): the buffer is still mapped
             afresh, but 2 MiB at a time. Faster than glibc's defaults for the
             demo on a quiet machine; under load, and for buffers of a
             gigabyte, the kernel's compaction made steps slower and erratic.
  system     whatever the process started with.

Measured against each other in one alternated run: benchmarks/RESULTS.md,
"Host memory".

The allocator and glibc's tunables are fixed when a process starts, so
`configure_on_cpu()` re-executes the process once, with the same command line
(`sys.orig_argv`) and the setting in its environment; the entry points (train,
finetune, reproduce) call it before anything else. Subprocesses get it through
their environment (`environment()`): launch/run_tests.sh evaluates
`python -m mslam_jax.host_memory`, and the benchmark workers call it. Nothing
changes when jax runs on a TPU or GPU (the temporaries then live in device
memory).

Tried and not kept: glibc's arena settings (M_ARENA_MAX=1, M_MMAP_MAX=0,
M_TRIM_THRESHOLD) keep the buffer's pages for reuse, but one malloc lock for
all threads made the demo's compile about 40% slower, and with a large tcache
the step itself became erratic; tcmalloc (a system package, not a wheel) is
about as fast as mimalloc; jemalloc maps large blocks afresh like glibc.
"""

import importlib.metadata
import importlib.util
import os
import platform
import shlex
import sys
from typing import Dict, List, Mapping, Optional

VARIABLE = 'MSLAM_HOST_MALLOC'
CHOICES = ('mimalloc', 'hugepages', 'system')
_TUNABLE_NAME = 'glibc.malloc.hugetlb'
_TUNABLE = f'{_TUNABLE_NAME}=1'
_MIMALLOC_DIST = 'cmeel-mimalloc'


def mimalloc_library() -> Optional[str]:
  """Absolute path of the installed wheel's libmimalloc.so on Linux, else None."""
  if platform.system() != 'Linux':
    return None
  try:
    files = importlib.metadata.files(_MIMALLOC_DIST) or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name.startswith('libmimalloc.so'):
      path = str(file.locate())
      if os.path.exists(path):
        return os.path.abspath(path)
  return None


def huge_pages_supported() -> bool:
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


def choice() -> str:
  """The setting: MSLAM_HOST_MALLOC if set, else the first of CHOICES available here."""
  value = os.environ.get(VARIABLE, '').strip().lower()
  if not value:
    if mimalloc_library():
      return 'mimalloc'
    return 'hugepages' if huge_pages_supported() else 'system'
  if value not in CHOICES:
    raise ValueError(f'{VARIABLE}={value!r}: use one of {", ".join(CHOICES)} '
                     '(mslam_jax/host_memory.py).')
  if value == 'mimalloc' and not mimalloc_library():
    raise ValueError(f'{VARIABLE}=mimalloc, but {_MIMALLOC_DIST} is not installed (it is a '
                     f'dependency on Linux x86-64): pip install {_MIMALLOC_DIST}, or set '
                     f'{VARIABLE}=hugepages or system.')
  return value


def _preloads(env: Mapping[str, str]) -> List[str]:
  """The libraries in env's LD_PRELOAD (the loader splits it at spaces and colons)."""
  return env.get('LD_PRELOAD', '').replace(':', ' ').split()


def environment(setting: Optional[str] = None,
                base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """The variables to add to `base` (default: this process's environment) for `setting`.

  `setting` defaults to `choice()`. Other LD_PRELOAD libraries and glibc
  tunables in `base` are kept.
  """
  setting = setting or choice()
  base = os.environ if base is None else base
  env = {VARIABLE: setting}
  preloads = [p for p in _preloads(base) if 'libmimalloc' not in os.path.basename(p)]
  if setting == 'mimalloc':
    preloads = [mimalloc_library(), *preloads]
  if preloads or base.get('LD_PRELOAD'):
    env['LD_PRELOAD'] = ' '.join(preloads)
  if setting == 'hugepages':
    current = base.get('GLIBC_TUNABLES', '')
    env['GLIBC_TUNABLES'] = (current if _TUNABLE_NAME in current else
                             ':'.join(filter(None, [current, _TUNABLE])))
  return env


def applied(setting: str) -> bool:
  """Whether this process started with `setting` in effect."""
  if setting == 'mimalloc':
    return mimalloc_library() in _preloads(os.environ)
  if setting == 'hugepages':
    return _TUNABLE_NAME in os.environ.get('GLIBC_TUNABLES', '')
  return True


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


def configure_on_cpu() -> None:
  """Re-executes this process, once, with the host allocator setting when jax will run on the CPU.

  Call it first thing in a `__main__` block: whatever ran before it runs again.
  """
  if not getattr(sys, 'orig_argv', None) or not xla_runs_on_cpu():
    return
  setting = choice()
  if applied(setting):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, **environment(setting)})


if __name__ == '__main__':
  # `eval "$(python -m mslam_jax.host_memory)"` exports the setting in a shell.
  print(' '.join(f'export {k}={shlex.quote(v)};' for k, v in environment().items()))
