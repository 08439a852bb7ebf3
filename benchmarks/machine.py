"""What machine a benchmark ran on: CPU model, core count and the ISA flags that matter.

AVX-512 (and its bf16 extension) changes which framework's matmul is faster and
whether bf16 compute pays, so every benchmark prints this line with its figures.
"""

import os
import subprocess
import sys


def cpu_summary() -> str:
  """One line: model name, cores, and avx2 / avx512f / avx512_bf16 / amx flags."""
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
  except OSError:  # no lscpu (e.g. a minimal container): fall back to /proc
    lscpu = ''
  if not lscpu and os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      lscpu = f.read().replace('model name', 'Model name').replace('flags', 'Flags')
  flags, model = [], '?'
  for line in lscpu.splitlines():
    key, _, value = line.partition(':')
    if key.strip() == 'Flags' and not flags:
      flags = value.split()
    elif key.strip() == 'Model name' and model == '?':
      model = value.strip()
  isa = ' '.join(f'{name}={name in flags}' for name in ('avx2', 'avx512f', 'avx512_bf16',
                                                        'amx_bf16'))
  return f'{model}; {os.cpu_count()} cores; {isa}; python {sys.version.split()[0]}'
