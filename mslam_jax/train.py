"""Pre-train mSLAM from gin files.

    python -m mslam_jax.train --gin_file=gin/pretrain_tiny_cpu.gin --gin.MODEL_DIR="'runs/demo'" \
        [--task_module=my_tasks.py] [--verbose]

Batches come from the three-stream sampler over the seqio tasks that
DataConfig selects (by default the embedded corpus, tasks/embedded.py), or
from synthetic data with --gin.DataConfig.source="'synthetic'". Metrics go to
MODEL_DIR/metrics.jsonl and TensorBoard, and a progress line to the console;
the run ends with a summary. MODEL_DIR may be local or gs://.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from mslam_jax import console
from mslam_jax import host_memory

if __name__ == '__main__':
  host_memory.configure_on_cpu()  # first: it may re-execute the process (host_memory.py)
  console.quiet_unless_verbose()  # before jax and tensorflow load their loggers

import argparse
import os
import time
from typing import Sequence

import gin
import jax

from mslam_jax import checkpoints
from mslam_jax import flops
from mslam_jax import gin_utils
from mslam_jax import partitioning
from mslam_jax import paths
from mslam_jax import optimizer as optimizer_lib
from mslam_jax import pretrain_loss
from mslam_jax import trainer
from mslam_jax.data import audio
from mslam_jax.data import bad_input
from mslam_jax.data import batch_spec
from mslam_jax.data import sampler as sampler_lib
from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.data.synthetic import SyntheticCorpus
from mslam_jax.models import conformer
from mslam_jax.models.config import ModelConfig
from mslam_jax.train_config import TrainConfig


def synthetic_batches(seed: int, batch_config: BatchConfig, parts):
  """Synthetic global batches; each process keeps its rows (so N processes = 1 process)."""
  corpus = SyntheticCorpus(seed, num_mel_bins=batch_config.num_mel_bins)
  index, count = jax.process_index(), jax.process_count()

  def rows(x):
    per = x.shape[0] // count
    return x[index * per:(index + 1) * per]

  while True:
    yield jax.tree.map(rows, corpus.batch(batch_config, parts))


def make_batches(data_config: sampler_lib.DataConfig, batch_config: BatchConfig, parts,
                 *, seed: int, model_vocab_size: int, task_modules: Sequence[str] = ()):
  """The batch iterator DataConfig.source names; prints the mixtures (with --verbose, every rate)."""
  if data_config.source == 'synthetic':
    return synthetic_batches(seed, batch_config, parts)
  if data_config.source != 'tasks':
    raise ValueError(f"DataConfig.source must be 'tasks' or 'synthetic', got "
                     f'{data_config.source!r}')
  sampler = sampler_lib.ThreeStreamSampler(
      batch_config, data_config, parts=parts, model_vocab_size=model_vocab_size,
      extra_task_modules=task_modules)
  if console.verbose():
    for kind, rates in sampler.rates().items():
      shares = ', '.join(f'{name} {rate:.3f}' for name, rate in rates.items())
      print(f'{kind} mixture ({len(rates)} tasks): {shares}', flush=True)
  else:
    print('mixtures: ' + ', '.join(
        f'{kind} {len(r)} tasks (rates {min(r.values()):.3f}-{max(r.values()):.3f})'
        for kind, r in sampler.rates().items()) + ' (--verbose lists them)', flush=True)
  warning = sampler.paired_length_warning()
  if warning:
    print(warning, flush=True)
  cache = sampler.fill_feature_cache()
  if cache:
    print(cache, flush=True)
  return sampler


def train(model_config: ModelConfig, loss_config: pretrain_loss.LossConfig,
          batch_config: BatchConfig, train_config: TrainConfig,
          data_config: sampler_lib.DataConfig = None,
          mesh_config: partitioning.MeshConfig = None, *, task_modules: Sequence[str] = (),
          log_initial: bool = False):
  """Trains up to train_config.train_steps, resuming from MODEL_DIR's latest checkpoint.

  Writes the parsed gin config to MODEL_DIR/config.gin first (export reads it).
  Returns (state, logged metric records of this call).
  task_modules: extra modules that register seqio tasks (--task_module).
  log_initial: also log the metrics of the initial parameters as step 0.
  """
  paths.ensure_writable(train_config.model_dir)
  save_config(train_config.model_dir)
  data_config = data_config or sampler_lib.DataConfig()
  mesh_config = mesh_config or partitioning.MeshConfig()
  mesh = partitioning.make_mesh(mesh_config)
  rules = mesh_config.rules
  print(partitioning.describe(mesh, rules, verbose=console.verbose()), flush=True)
  # The 'auto' product forms depend on the host CPU: say which ones this run takes.
  forms = (conformer.cpu_product_forms(model_config)
           if jax.default_backend() == 'cpu' else None)
  if forms:
    print(forms, flush=True)
  partitioning.check_batch_split(batch_config, loss_config.parts, mesh)
  batch_spec.check_num_mel_bins(model_config, batch_config, audio.FeatureConfig())
  batches = make_batches(data_config, batch_config, loss_config.parts, seed=train_config.seed,
                         model_vocab_size=model_config.vocab_size, task_modules=task_modules)
  init_rng, step_rng = jax.random.split(jax.random.key(train_config.seed))
  optimizer = optimizer_lib.make_optimizer()
  shape_kwargs = dict(model_config=model_config, loss_config=loss_config,
                      batch_config=batch_config)
  abstract, shardings = trainer.state_shardings(optimizer, mesh, rules, **shape_kwargs)
  checkpointer = checkpoints.Checkpointer(
      train_config.model_dir, save_every=train_config.save_every,
      keep=train_config.keep_checkpoints, async_save=train_config.async_checkpoints)
  sampler = batches if isinstance(batches, sampler_lib.ThreeStreamSampler) else None
  latest, state = checkpointer.restore_latest(
      abstract, sampler, fallback=train_config.fallback_to_intact_checkpoint,
      restart_data_stream=train_config.restart_data_stream)
  if latest is not None:
    print(f'resumed from step {latest} ({checkpointer.directory})', flush=True)
    if sampler is None:  # the synthetic stream replays to the same position
      for _ in range(latest):
        next(batches)
  else:
    state = trainer.create_train_state(init_rng, optimizer, shardings, **shape_kwargs,
                                       compiler_options=train_config.init_compiler_options)
  step_fn = trainer.jit_train_step(
      trainer.make_train_step(optimizer, accumulate_steps=train_config.accumulate_steps,
                              model_config=model_config, loss_config=loss_config),
      shardings, mesh, rules, train_config.compiler_options)
  eval_step = (trainer.make_eval_step(model_config=model_config, loss_config=loss_config)
               if log_initial and latest is None else None)
  writer = trainer.MetricsWriter(train_config.model_dir)
  if latest is not None:
    writer.mark_resume(latest)
  start = time.perf_counter()
  try:
    result = trainer.run(
        state, step_fn, batches, step_rng, mesh=mesh, num_steps=train_config.train_steps,
        log_every=train_config.log_every, writer=writer, checkpointer=checkpointer,
        sampler=sampler, eval_step=eval_step,
        max_consecutive_nonfinite=train_config.max_consecutive_nonfinite,
        frame_seconds=audio.FeatureConfig().hop_ms / 1000,
        **_flops_and_peak(model_config, loss_config, batch_config, train_config))
  finally:
    checkpointer.close()
    writer.close()
    if sampler is not None:
      sampler.close()
  print(summary(result[1], train_config, start_step=latest or 0,
                seconds=time.perf_counter() - start, checkpointer=checkpointer), flush=True)
  return result


def summary(history, train_config, *, start_step: int, seconds: float, checkpointer) -> str:
  """The end-of-run lines: steps and time, final losses, checkpoint, input problems.

  The full bad-input report (per task, with example names) goes to
  MODEL_DIR/bad_input.txt; the console gets one line per problem.
  """
  last = history[-1] if history else {}
  step = int(last.get('step', start_step))
  lines = [f'done: step {step} of {train_config.train_steps} '
           f'({step - start_step} steps in {console.format_duration(seconds)}'
           f'{f", resumed from step {start_step}" if start_step else ""})']
  terms = [k for k in sorted(last) if k.endswith(('contrastive', 'masked_prediction',
                                                  'span_mlm', 'ctc'))]
  if 'loss' in last:
    lines.append(f'final loss {last["loss"]:.4g} (' +
                 ', '.join(f'{k} {last[k]:.4g}' for k in terms) + ')')
  saved = checkpointer.latest_step()
  if saved is not None:
    lines.append(f'checkpoint: {paths.join(train_config.model_dir, "checkpoints", str(saved))}')
  folded = console.fold_bad_input(bad_input.LOG.counts())
  if folded:
    report_path = paths.join(train_config.model_dir, 'bad_input.txt')
    if jax.process_index() == 0:
      paths.path(report_path).write_text(bad_input.LOG.report() + '\n')
    lines.append(f'input examples cleaned or skipped (per task and with names: {report_path}):')
    lines += ['  ' + line for line in folded]
  return '\n'.join(lines)


def _flops_and_peak(model_config, loss_config, batch_config, train_config):
  """step_flops (analytical, mslam_jax.flops) and the per-device peak for MFU."""
  step_flops = flops.train_step_flops(model_config, batch_config, loss_config)['total']
  # In the model's compute dtype: a bf16 model's MFU divides by the bf16 peak.
  peak = (train_config.peak_flops_per_device or
          flops.measure_peak_flops(model_config.compute_dtype))
  print(f'train step: {step_flops / 1e12:.4g} TFLOP; peak {peak / 1e12:.4g} TFLOP/s per '
        'device (MFU denominator)', flush=True)
  return {'step_flops': step_flops, 'peak_flops_per_device': peak}


def initialize_distributed(args) -> None:
  """jax.distributed from --coordinator_address/--num_processes/--process_id, if given."""
  given = [a is not None for a in (args.coordinator_address, args.num_processes,
                                   args.process_id)]
  if any(given) and not all(given):
    raise SystemExit('give all of --coordinator_address, --num_processes and --process_id, '
                     'or none (a Cloud TPU pod needs none)')
  on_cpu = (jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')) == 'cpu'
  if all(given):
    if on_cpu:  # CPU collectives across processes need gloo
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif not on_cpu:
    # A Cloud TPU pod (or a SLURM GPU job) is discovered by jax itself; on a
    # single machine there is no cluster and initialize() says so.
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      if console.verbose():
        print(f'single process ({e})', flush=True)


def save_config(model_dir: str) -> None:
  """Writes the parsed gin config to MODEL_DIR/config.gin (process 0), for export."""
  if jax.process_index() != 0:
    return
  path = paths.path(model_dir)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.gin').write_text(gin.config_str())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--task_module', action='append', default=[],
                      help='module that registers seqio tasks (repeatable): a dotted name '
                      'on the Python path or a .py file')
  parser.add_argument('--coordinator_address', help='HOST:PORT of process 0 (multi-process)')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = gin_utils.parse_command_line(parser.description, argv, parser)
  initialize_distributed(args)
  jax.config.update('jax_compilation_cache_dir',
                    jax.config.jax_compilation_cache_dir or '.jax_cache')
  train_config = TrainConfig()
  print(f'model_dir: {train_config.model_dir}  steps: {train_config.train_steps}  '
        f'process {jax.process_index()}/{jax.process_count()}  '
        f'devices: {jax.device_count()} ({jax.devices()[0].platform})', flush=True)
  try:
    train(ModelConfig(), pretrain_loss.LossConfig(), BatchConfig(), train_config,
          sampler_lib.DataConfig(), partitioning.MeshConfig(), task_modules=args.task_module)
  except (paths.NotWritableError, checkpoints.CheckpointError, bad_input.AllSkippedError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
