"""Compile time and per-device memory of the train step, one device against N with FSDP.

Runs `python -m mslam_jax.compile` once per (gin file, device count), each in
its own process (the fake device count is fixed when jax starts), and prints
a markdown table of what each printed. Nothing is allocated; the figures are
XLA:CPU's buffer assignment for the step at the given batch.

    python benchmarks/compile_memory.py --gin_file gin/pretrain_0.6b.gin \
        --gin_file gin/pretrain_2b.gin --devices 1 8 --batch 8

With N devices the mesh is (1, N, 1): every device is an FSDP shard.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


def compile_once(gin_file: str, devices: int, batch: int, bindings, timeout_s: float):
  """The tool's JSON report plus wall time, or {'error': ...} on failure or timeout."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'report.json')
    command = [sys.executable, '-m', 'mslam_jax.compile', f'--gin_file={gin_file}',
               f'--num_devices={devices}', f'--gin.MESH_SHAPE=(1, {devices}, 1)',
               f'--json={path}']
    command += [f'--gin.BatchConfig.{kind}_batch_size={batch}'
                for kind in ('speech', 'text', 'paired')]
    command += [f'--gin.{b}' for b in bindings]
    print('$ ' + ' '.join(command[1:]), flush=True)
    start = time.perf_counter()
    try:
      result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
      return {'error': f'not done after {timeout_s:.0f} s'}
    wall = time.perf_counter() - start
    if result.returncode:
      return {'error': (result.stderr.strip().splitlines() or ['?'])[-1]}
    with open(path, encoding='utf-8') as f:
      report = json.load(f)
  report['wall_s'] = wall
  return report


def table(rows) -> str:
  header = ('| config | devices | params | lower (s) | compile (s) | state/device (GiB) | '
            'argument | output | alias | temp | total/device (GiB) |')
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  for name, devices, r in rows:
    if 'error' in r:
      lines.append(f'| {name} | {devices} | {r["error"]} |' + ' |' * 8)
      continue
    m = r['memory']
    gib = lambda n: f'{n / GIB:.3f}'
    lines.append(
        f'| {name} | {devices} | {r["num_params"] / 1e9:.3f}B | {r["lower_s"]:.1f} | '
        f'{r["compile_s"]:.1f} | {gib(r["state_bytes_per_device"])} | {gib(m["argument"])} | '
        f'{gib(m["output"])} | {gib(m["alias"])} | {gib(m["temp"])} | '
        f'{gib(r["per_device_bytes"])} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gin_file', action='append', required=True)
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--batch', type=int, default=8,
                      help='global batch of each kind (speech, text, paired)')
  parser.add_argument('--gin', action='append', default=[],
                      help='extra binding NAME=VALUE for every run (repeatable)')
  parser.add_argument('--timeout_s', type=float, default=600)
  parser.add_argument('--json', help='write all reports here')
  args = parser.parse_args()
  rows = []
  for gin_file in args.gin_file:
    name = os.path.splitext(os.path.basename(gin_file))[0]
    for devices in args.devices:
      report = compile_once(gin_file, devices, args.batch, args.gin, args.timeout_s)
      print(json.dumps({k: v for k, v in report.items() if k != 'mesh_description'}),
            flush=True)
      rows.append((name, devices, report))
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump([{'config': n, 'devices': d, **r} for n, d, r in rows], f, indent=1)
  print(table(rows))


if __name__ == '__main__':
  main()
