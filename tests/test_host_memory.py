"""host_memory: the host allocator for XLA:CPU's per-execution temporary buffer.

The expectation is counted independently of the setting: a program whose
temporaries take N 4 KiB pages, mapped afresh at every execution, page-faults
about N times per execution; with transparent huge pages it faults per 2 MiB,
hundreds of times fewer; an allocator that keeps the freed buffer (mimalloc)
barely faults at all after the first calls. Each case runs in a fresh process
(the allocator and glibc's tunables are fixed at start-up).
"""

import json
import os
import subprocess
import sys

import pytest

from mslam_jax import host_memory

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A gradient program with 48 MiB of temporaries (six saved [32768, 64] fp32
# activations): above glibc's largest mmap threshold (32 MiB), so every call
# maps its temporary buffer afresh.
_PROGRAM = r'''
import json, resource
import jax, jax.numpy as jnp

def f(x, w):
  y = x
  for _ in range(6):
    y = jnp.tanh(y @ w) + y
  return jnp.sum(y)

step = jax.jit(jax.grad(f))
x, w = jnp.ones((32768, 64)), jnp.full((64, 64), 1e-3)
temp = step.lower(x, w).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
  jax.block_until_ready(step(x, w))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
calls = 8
for _ in range(calls):
  jax.block_until_ready(step(x, w))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
print(json.dumps({'temp_pages': temp / 4096, 'faults_per_call': faults}))
'''


def _run(args, extra_env=None):
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', host_memory.VARIABLE)}
  env.update({'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', **(extra_env or {})})
  return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                        check=True, cwd=_REPO_ROOT).stdout


def _faults(setting):
  env = host_memory.environment(setting, base={})
  return json.loads(_run(['-c', _PROGRAM], env).strip().splitlines()[-1])


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='utf-8') as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return 'unknown'


needs_madvise_thp = pytest.mark.skipif(
    not host_memory.huge_pages_supported() or _thp_mode() != 'madvise',
    reason='glibc >= 2.35 and transparent huge pages in madvise mode')
needs_mimalloc = pytest.mark.skipif(host_memory.mimalloc_library() is None,
                                    reason='cmeel-mimalloc (a dependency on Linux x86-64)')

# Prints whether libmimalloc is mapped into the process, then the setting.
_REPORT = ('from mslam_jax import host_memory; import os; print("ran", flush=True); '
           'host_memory.configure_on_cpu(); '
           'print("mimalloc" if "libmimalloc" in open("/proc/self/maps").read() else "-", '
           'os.environ.get("MSLAM_HOST_MALLOC"), os.environ.get("GLIBC_TUNABLES"))')


@needs_madvise_thp
def test_with_glibc_defaults_every_call_faults_in_the_whole_temporary_buffer():
  r = _faults('system')
  assert r['temp_pages'] >= 48 * 2**20 / 4096 * 0.9
  assert r['faults_per_call'] > 0.8 * r['temp_pages'], r


@needs_madvise_thp
def test_the_huge_page_tunable_cuts_the_faults():
  r = _faults('hugepages')
  assert r['faults_per_call'] < 0.2 * r['temp_pages'], r


@needs_mimalloc
def test_mimalloc_reuses_the_temporary_buffer():
  r = _faults('mimalloc')
  assert r['temp_pages'] >= 48 * 2**20 / 4096 * 0.9
  assert r['faults_per_call'] < 0.02 * r['temp_pages'], r


@needs_mimalloc
def test_the_entry_point_call_reexecutes_once_with_mimalloc_preloaded():
  lines = _run(['-c', _REPORT], {'LD_PRELOAD': ''}).split()
  assert lines == ['ran', 'ran', 'mimalloc', 'mimalloc', 'None']


@pytest.mark.skipif(not host_memory.huge_pages_supported(),
                    reason='glibc >= 2.35 with huge pages on')
def test_hugepages_keeps_other_tunables_and_preloads_nothing():
  lines = _run(['-c', _REPORT], {host_memory.VARIABLE: 'hugepages',
                                 'GLIBC_TUNABLES': 'glibc.malloc.check=0'}).split()
  assert lines == ['ran', 'ran', '-', 'hugepages', 'glibc.malloc.check=0:glibc.malloc.hugetlb=1']


def test_system_changes_nothing():
  lines = _run(['-c', _REPORT], {host_memory.VARIABLE: 'system'}).split()
  assert lines == ['ran', '-', 'system', 'None']


def test_no_reexecution_for_an_accelerator():
  assert _run(['-c', _REPORT], {'JAX_PLATFORMS': 'tpu'}).split() == ['ran', '-', 'None', 'None']


def test_an_unknown_setting_names_the_variable_and_the_choices(monkeypatch):
  monkeypatch.setenv(host_memory.VARIABLE, 'jemalloc')
  with pytest.raises(ValueError, match='MSLAM_HOST_MALLOC=.jemalloc.: use one of mimalloc, '
                     'hugepages, system'):
    host_memory.choice()


def test_mimalloc_asked_for_but_missing_says_how_to_install(monkeypatch):
  monkeypatch.setenv(host_memory.VARIABLE, 'mimalloc')
  monkeypatch.setattr(host_memory, 'mimalloc_library', lambda: None)
  with pytest.raises(ValueError, match='pip install cmeel-mimalloc'):
    host_memory.choice()


def test_environment_keeps_other_preloads_and_replaces_an_old_mimalloc():
  base = {'LD_PRELOAD': '/opt/old/libmimalloc.so.2 /usr/lib/libfoo.so'}
  assert host_memory.environment('system', base) == {
      host_memory.VARIABLE: 'system', 'LD_PRELOAD': '/usr/lib/libfoo.so'}
  if host_memory.mimalloc_library():
    assert host_memory.environment('mimalloc', base)['LD_PRELOAD'] == (
        f'{host_memory.mimalloc_library()} /usr/lib/libfoo.so')


@pytest.mark.parametrize('platforms,expected', [('cpu', True), ('tpu', False),
                                                ('cuda,cpu', False), ('CPU', True)])
def test_jax_platforms_decides(monkeypatch, platforms, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert host_memory.xla_runs_on_cpu() is expected


def test_an_installed_accelerator_plugin_means_not_cpu(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  real = host_memory.importlib.util.find_spec
  monkeypatch.setattr(host_memory.importlib.util, 'find_spec',
                      lambda name: object() if name == 'libtpu' else real(name))
  assert host_memory.xla_runs_on_cpu() is False
