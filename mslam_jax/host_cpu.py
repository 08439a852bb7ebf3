"""The host CPU's model name and instruction-set flags, as Linux reports them.

Which XLA:CPU code is fastest depends on the vector units: on AVX2-only x86
CPUs some products run at half the matmul rate that AVX-512 CPUs reach
(benchmarks/RESULTS.md), so `mslam_jax.models.layers` asks here, and every
benchmark prints `summary()` with its figures.
"""

import functools
import os
import sys
from typing import FrozenSet, Tuple

CPUINFO = '/proc/cpuinfo'


def parse_cpuinfo(text: str) -> Tuple[str, FrozenSet[str]]:
  """(model name, flags) of the first processor in a /proc/cpuinfo text ('?' and {} if absent)."""
  model, flags_ = '?', frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(':')
    key = key.strip()
    if key == 'model name' and model == '?':
      model = value.strip()
    elif key == 'flags' and not flags_:
      flags_ = frozenset(value.split())
  return model, flags_


@functools.lru_cache(maxsize=None)
def _read() -> Tuple[str, FrozenSet[str]]:
  try:
    with open(CPUINFO, encoding='utf-8') as f:
      return parse_cpuinfo(f.read())
  except OSError:  # not Linux (e.g. macOS): nothing known
    return '?', frozenset()


def model_name() -> str:
  return _read()[0]


def flags() -> FrozenSet[str]:
  """The ISA flags of /proc/cpuinfo (e.g. 'avx2', 'avx512f'); empty off Linux."""
  return _read()[1]


def has_avx512() -> bool:
  """True on x86 CPUs with AVX-512 Foundation (e.g. AMD EPYC Zen 4, Intel Xeon since Skylake-SP)."""
  return 'avx512f' in flags()


def has_avx512_bf16() -> bool:
  """True on x86 CPUs with the AVX-512 BF16 dot-product instructions (e.g. AMD EPYC Zen 4,
  Intel Xeon since Cooper Lake)."""
  return 'avx512_bf16' in flags()


def avx2_without_avx512() -> bool:
  """True on x86 CPUs with AVX2 but no AVX-512 (e.g. AMD EPYC before Zen 4)."""
  return 'avx2' in flags() and not has_avx512()


def summary() -> str:
  """One line: model name, cores, and the avx2 / avx512f / avx512_bf16 / amx_bf16 flags."""
  isa = ' '.join(f'{name}={name in flags()}'
                 for name in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'))
  return f'{model_name()}; {os.cpu_count()} cores; {isa}; python {sys.version.split()[0]}'
