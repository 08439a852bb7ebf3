"""Do the paper's models fit named TPU slices at the paper's batch, with what accumulation, remat?

For each (experiment gin file, Cloud TPU slice), compiles the real train step
with XLA:TPU on this machine (`python -m mslam_jax.compile --topology=...`, the
`tpu` extra; no TPU needed) at gradient accumulation K = 1, 2, 4, ... (only K
whose micro-batches still split over the batch shards, data x fsdp) until XLA:TPU accepts it, first
with the gin file's remat policy and, if no K fits, with each `--fallback_remat`
policy in turn; it prints one table row per compile: per-device HBM XLA needs,
the chip's HBM, whether it fits, and the compile time.

    python benchmarks/tpu_fit.py [--runs=0.6b:v5p-128,2b:v5p-256] [--max_accumulation=16] \
        [--fallback_remat=full] [--binding='MESH_SHAPE = (1, -1, 4)']

Each compile runs in its own process (a fresh libtpu). Batch sizes are those of
the gin files (the paper's 2048 speech, 8192 text, 256 paired per step).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = {'0.6b': 'gin/pretrain_0.6b.gin', '2b': 'gin/pretrain_2b.gin'}


def gin_settings(gin_file: str, bindings, chips: int):
  """(global batch size of each data kind, remat policy, batch shards) of gin file + bindings.

  Batch shards: data x fsdp of the mesh on `chips` devices (the batch is split
  over those two axes, not over 'model').
  """
  from mslam_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from mslam_jax import partitioning  # pylint: disable=g-import-not-at-top
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=g-import-not-at-top
  from mslam_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin([gin_file], bindings, writes_model_dir=False)
  config = BatchConfig()
  batches = [config.speech_batch_size, config.text_batch_size, config.paired_batch_size]
  data, fsdp, _ = partitioning.resolve_shape(partitioning.MeshConfig().shape, chips)
  return batches, ModelConfig().remat_policy, data * fsdp


def compile_once(gin_file: str, topology: str, k: int, remat: str, bindings=()) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'report.json')
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', 'mslam_jax.compile', f'--gin_file={gin_file}',
         f'--topology={topology}', f'--gin.TrainConfig.accumulate_steps={k}',
         f"--gin.ModelConfig.remat_policy='{remat}'", f'--json={out}',
         *[f'--gin.{name.strip()}={value.strip()}'
           for name, value in (b.split('=', 1) for b in bindings)]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if not os.path.exists(out):
      raise SystemExit(f'{gin_file} on {topology}, K={k}, remat {remat}: no report\n'
                       f'{result.stderr[-3000:]}')
    with open(out, encoding='utf-8') as f:
      report = json.load(f)
  report['wall_s'] = wall
  return report


def needed_text(report: dict) -> str:
  """The table's "per-device HBM needed" cell for one `mslam_jax.compile --json` report.

  A step that compiled has XLA's per-device total (over the chip's HBM or not);
  one that XLA:TPU refused has only its error, of which the words after 'Ran out
  of memory on HBM, ' are kept: 'temporaries 105.92G, available 30.75G'.
  """
  if 'per_device_bytes' in report:
    return f'{report["per_device_bytes"] / 2 ** 30:.1f} GiB'
  return 'over: ' + report['error'].split('Ran out of memory on HBM, ')[-1].split(
      ' (compiled')[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', default='0.6b:v5p-128,2b:v5p-256',
                      help='comma-separated MODEL:ACCELERATOR_TYPE (MODEL: 0.6b or 2b)')
  parser.add_argument('--max_accumulation', type=int, default=16)
  parser.add_argument('--fallback_remat', default='full',
                      help='comma-separated remat policies (ModelConfig.remat_policy keys) to '
                      'try, in order, where no K fits with the gin file\'s; empty: none')
  parser.add_argument('--binding', action='append', default=[],
                      help="a gin binding for every compile (repeatable), e.g. "
                      "'MESH_SHAPE = (1, -1, 4)'")
  parser.add_argument('--verbose', action='store_true',
                      help="keep jax's, XLA's and TensorFlow's start-up logs")
  args = parser.parse_args()
  sys.path.insert(0, REPO_ROOT)
  from mslam_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_unless_verbose()
  from mslam_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  from mslam_jax import tpu_topologies  # pylint: disable=g-import-not-at-top
  print('| topology | config | remat | accumulation K | per-device HBM needed | chip HBM | '
        'fits? | compile (wall) |')
  print('|---|---|---|---|---|---|---|---|')
  for run in args.runs.split(','):
    model, topology = run.split(':')
    tpu_slice = tpu_topologies.parse_accelerator_type(topology)
    hbm = tpu_slice.hbm_bytes_per_device / 2 ** 30
    batches, gin_remat, shards = gin_settings(GIN_FILES[model], args.binding, tpu_slice.chips)
    policies = [gin_remat] + [p for p in args.fallback_remat.split(',') if p and p != gin_remat]
    for remat in policies:
      fits = False
      for k in compile_lib.accumulations(batches, shards, args.max_accumulation):
        r = compile_once(GIN_FILES[model], topology, k, remat, args.binding)
        fits = r['fits']
        needed = needed_text(r)
        config = ', '.join([model, *args.binding])
        print(f'| {topology} ({tpu_slice.chips} chips) | {config} | {remat} | {k} | {needed} | '
              f'{hbm:.0f} GiB | {"yes" if fits else "no"} | {r["wall_s"]:.0f} s |', flush=True)
        if fits:
          break
      if fits:
        break


if __name__ == '__main__':
  main()
