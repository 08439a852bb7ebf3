"""What machine a benchmark ran on: CPU model, cores and ISA flags; the GPU, where used.

AVX-512 (and its bf16 extension) changes which framework's matmul is faster and
whether bf16 compute pays, so every benchmark prints this line with its figures.
The flags come from `mslam_jax.host_cpu`, which the model's layers consult too.
"""


def cpu_summary() -> str:
  """One line: model name, cores, and avx2 / avx512f / avx512_bf16 / amx flags."""
  # Imported here, in the parent process only: the workers of a --baseline
  # import the benchmarked revision's mslam_jax, which may predate host_cpu.
  from mslam_jax import host_cpu  # pylint: disable=import-outside-toplevel
  return host_cpu.summary()


def gpu_summary() -> str:
  """One line per GPU from nvidia-smi: name, memory, driver, max SM clock; or why none."""
  import subprocess  # pylint: disable=import-outside-toplevel
  try:
    out = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,memory.total,driver_version,clocks.max.sm',
         '--format=csv,noheader'], capture_output=True, text=True, check=True, timeout=60)
  except (OSError, subprocess.SubprocessError) as e:
    return f'no GPU summary (nvidia-smi: {e})'
  return '; '.join(line.strip() for line in out.stdout.splitlines() if line.strip())
