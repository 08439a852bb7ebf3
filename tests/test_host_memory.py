"""host_memory: huge pages for XLA:CPU's per-execution temporary buffer.

The expectation is counted independently of the setting: a program whose
temporaries take N 4 KiB pages, mapped afresh at every execution, page-faults
about N times per execution; with transparent huge pages it faults per 2 MiB,
hundreds of times fewer. Each case runs in a fresh process (glibc reads its
tunables at start-up).
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
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update({'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', **(extra_env or {})})
  return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                        check=True, cwd=_REPO_ROOT).stdout


def _faults(extra_env=None):
  return json.loads(_run(['-c', _PROGRAM], extra_env).strip().splitlines()[-1])


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='utf-8') as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return 'unknown'


needs_madvise_thp = pytest.mark.skipif(
    not host_memory.supported() or _thp_mode() != 'madvise',
    reason='glibc >= 2.35 and transparent huge pages in madvise mode')


@needs_madvise_thp
def test_by_default_every_call_faults_in_the_whole_temporary_buffer():
  r = _faults()
  assert r['temp_pages'] >= 48 * 2**20 / 4096 * 0.9
  assert r['faults_per_call'] > 0.8 * r['temp_pages'], r


@needs_madvise_thp
def test_the_huge_page_tunable_cuts_the_faults():
  r = _faults(host_memory.environment())
  assert r['faults_per_call'] < 0.2 * r['temp_pages'], r


@pytest.mark.skipif(not host_memory.supported(), reason='glibc >= 2.35 with huge pages on')
def test_the_entry_point_call_reexecutes_once_with_the_tunable():
  code = ('from mslam_jax import host_memory; import os; print("ran", flush=True); '
          'host_memory.use_huge_pages_on_cpu(); print(os.environ["GLIBC_TUNABLES"])')
  lines = _run(['-c', code], {'GLIBC_TUNABLES': 'glibc.malloc.check=0'}).split()
  assert lines == ['ran', 'ran', 'glibc.malloc.check=0:glibc.malloc.hugetlb=1']


def test_no_reexecution_for_an_accelerator():
  code = ('from mslam_jax import host_memory; import os; print("ran", flush=True); '
          'host_memory.use_huge_pages_on_cpu(); print(os.environ.get("GLIBC_TUNABLES"))')
  assert _run(['-c', code], {'JAX_PLATFORMS': 'tpu'}).split() == ['ran', 'None']


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
