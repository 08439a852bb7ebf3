"""mslam_jax.host_cpu against hand-written /proc/cpuinfo excerpts."""

import pytest

from mslam_jax import host_cpu

_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""
_XEON = 'model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: avx avx2 avx512f avx512_bf16\n'
_ARM = 'processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n'


_ZEN4_NO_BF16 = 'model name\t: AMD EPYC 9B14\nflags\t\t: avx avx2 avx512f avx512bw\n'


@pytest.mark.parametrize('text, model, flags, avx2_only, avx512, bf16', [
    (_EPYC, 'AMD EPYC 7B12', {'fpu', 'sse2', 'avx', 'avx2', 'fma'}, True, False, False),
    (_XEON, 'Intel(R) Xeon(R) CPU @ 2.20GHz', {'avx', 'avx2', 'avx512f', 'avx512_bf16'}, False,
     True, True),
    (_ZEN4_NO_BF16, 'AMD EPYC 9B14', {'avx', 'avx2', 'avx512f', 'avx512bw'}, False, True, False),
    (_ARM, '?', set(), False, False, False),
    ('', '?', set(), False, False, False),
])
def test_model_and_flags(monkeypatch, text, model, flags, avx2_only, avx512, bf16):
  assert host_cpu.parse_cpuinfo(text) == (model, frozenset(flags))
  monkeypatch.setattr(host_cpu, '_read', lambda: host_cpu.parse_cpuinfo(text))
  assert host_cpu.avx2_without_avx512() is avx2_only
  assert host_cpu.has_avx512() is avx512
  assert host_cpu.has_avx512_bf16() is bf16
  summary = host_cpu.summary()
  assert summary.startswith(f'{model}; ')
  assert f'avx2={"avx2" in flags} avx512f={"avx512f" in flags}' in summary


def test_this_host_is_read_once():
  first = host_cpu._read()  # pylint: disable=protected-access
  assert host_cpu._read() is first  # pylint: disable=protected-access
