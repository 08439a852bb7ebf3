"""host_memory: XLA:CPU's temporary buffer is reused from one execution to the next.

The expectation is counted independently of the settings: a program whose
temporaries take N pages page-faults about N times per execution when its
buffer is mapped afresh, and close to zero times when the pages are reused.
Each case runs in a fresh process, since the settings must come before any
thread allocates.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from mslam_jax import host_memory

# A gradient program with 48 MiB of temporaries (six saved [32768, 64] fp32
# activations): above glibc's largest mmap threshold (32 MiB) and its per-thread
# heap size (64 MiB counts the whole heap), so glibc's defaults map it afresh.
_PROGRAM = r'''
import json, resource, sys
if sys.argv[1] == 'mallopt':
  from mslam_jax import host_memory
  assert host_memory.keep_freed_memory()
import jax, jax.numpy as jnp

def f(x, w):
  y = x
  for _ in range(6):
    y = jnp.tanh(y @ w) + y
  return jnp.sum(y)

step = jax.jit(jax.grad(f))
x, w = jnp.ones((32768, 64)), jnp.full((64, 64), 1e-3)
temp = step.lower(x, w).compile().memory_analysis().temp_size_in_bytes
for _ in range(12):  # the heap settles within about 10 calls
  jax.block_until_ready(step(x, w))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
calls = 8
for _ in range(calls):
  jax.block_until_ready(step(x, w))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
print(json.dumps({'temp_pages': temp / resource.getpagesize(), 'faults_per_call': faults}))
'''


def _faults(mode: str, extra_env=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='', **(extra_env or {}))
  out = subprocess.run([sys.executable, '-c', _PROGRAM, mode], env=env, capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  return json.loads(out.stdout.strip().splitlines()[-1])


def _transparent_huge_pages_always() -> bool:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='utf-8') as f:
      return '[always]' in f.read()
  except OSError:
    return False


_GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


@pytest.mark.skipif(not _GLIBC, reason='glibc malloc settings')
def test_glibc_defaults_fault_the_whole_temporary_buffer_every_call():
  if _transparent_huge_pages_always():
    pytest.skip('transparent huge pages [always]: faults come in 2 MiB pages')
  r = _faults('defaults')
  assert r['temp_pages'] >= 48 * 2**20 / 4096 * 0.9
  assert r['faults_per_call'] > 0.8 * r['temp_pages'], r


@pytest.mark.skipif(not _GLIBC, reason='glibc malloc settings')
def test_mallopt_settings_reuse_the_temporary_buffer():
  r = _faults('mallopt')
  assert r['faults_per_call'] < 0.25 * r['temp_pages'], r


@pytest.mark.skipif(not _GLIBC, reason='glibc malloc settings')
def test_environment_settings_reuse_the_temporary_buffer():
  """The subprocess route (launch/run_tests.sh, the benchmark workers): glibc reads them at start."""
  r = _faults('defaults', host_memory.environment())
  assert r['faults_per_call'] < 0.25 * r['temp_pages'], r


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
