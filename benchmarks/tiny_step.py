"""The tiny CPU demo's full pre-training step, this checkout against earlier revisions.

Each revision runs as a worker in a temporary git worktree (this checkout as
it is, uncommitted changes included, plus every --baseline): it reads
gin/pretrain_tiny_cpu.gin from its own tree, builds the sharded train step the
trainer builds (all three data kinds, synthetic batches, one CPU device), and
reports its cold compile time (trace + lower, XLA compile; no persistent
cache). With `--compiles N` every revision is compiled N times, in fresh
processes started in turn (A B A B ...), and the compile columns give the
median and range: one cold compile varies by several seconds on a shared
machine. The parent then asks the first worker of each revision for one step
at a time in alternation, `--rounds` times, and prints medians, min-max,
GFLOP/s (the analytical step FLOPs of this checkout's mslam_jax.flops) and
the ratios to this checkout, step and compile, each the median (and range)
of the per-round ratios (`workers.paired_ratios`): the load that drifts
over a run moves both members of a round, so it cancels there.

    python benchmarks/tiny_step.py --baseline 2b369fa
    python benchmarks/tiny_step.py --baseline HEAD --compiles 5
    python benchmarks/tiny_step.py --variant 'ModelConfig.merge_passes = False'

A --variant runs this checkout with extra gin bindings as one more worker;
--malloc SETTING adds this checkout with another host allocator setting
(mslam_jax/host_memory.py: mimalloc, hugepages, system). Each worker runs with
the setting its revision's entry points use (workers.entry_point_malloc).
"""

import argparse
import contextlib
import os
import statistics
import time

import machine  # benchmarks/machine.py, beside this script
from workers import (  # benchmarks/workers.py
    REPO_ROOT, Worker, alternate, current_tree, entry_point_malloc, median_faults, paired_ratios,
    ratio_summary, reply, timed, worktree)
from mslam_jax import host_memory

GIN_FILE = 'gin/pretrain_tiny_cpu.gin'


def make_step(bindings=()):
  """The trainer's sharded step for GIN_FILE (+ gin `bindings`) of the checkout in the working directory.

  Returns (step, state, batch, rng, mesh, rules): the step as
  `trainer.jit_train_step` gives it to `trainer.run`, its state on one
  device, a synthetic host batch. Uses only APIs that 2b369fa already had,
  and TrainConfig.compiler_options where the revision has them.
  """
  import gin  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from mslam_jax import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
  from mslam_jax import partitioning, pretrain_loss, trainer  # pylint: disable=import-outside-toplevel
  from mslam_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=import-outside-toplevel
  from mslam_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel

  gin.parse_config_files_and_bindings([GIN_FILE], ["MODEL_DIR = '/tmp/unused'", *bindings])
  model_config, loss_config = ModelConfig(), pretrain_loss.LossConfig()
  batch_config, mesh_config = BatchConfig(), partitioning.MeshConfig()
  mesh = partitioning.make_mesh(mesh_config)
  optimizer = optimizer_lib.make_optimizer()
  kwargs = dict(model_config=model_config, loss_config=loss_config, batch_config=batch_config)
  _, shardings = trainer.state_shardings(optimizer, mesh, mesh_config.rules, **kwargs)
  state = trainer.create_train_state(jax.random.key(0), optimizer, shardings, **kwargs)
  # TrainConfig.compiler_options where the revision has them (not at 2b369fa).
  train_config = getattr(train_lib, 'TrainConfig', None)
  options = getattr(train_config(), 'compiler_options', None) if train_config else None
  step = trainer.jit_train_step(
      trainer.make_train_step(optimizer, model_config=model_config, loss_config=loss_config),
      shardings, mesh, mesh_config.rules, *([options] if options else []))
  batch = next(train_lib.synthetic_batches(0, batch_config, loss_config.parts))
  return step, state, batch, jax.random.key(1), mesh, mesh_config.rules


def build_step(bindings=()):
  """(lowered step, state, batch, rng, lower seconds): `make_step`'s step as
  jax.stages.Lowered for (state, batch, rng)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  step, state, batch, rng, mesh, rules = make_step(bindings)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = step.jitted.lower(state, batch, rng)
  return lowered, state, batch, rng, time.perf_counter() - start


def worker_main(bindings) -> None:
  """Runs in a revision's tree (cwd and PYTHONPATH): build, compile, then step on demand."""
  import sys  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  # Cold compiles whatever the caller's JAX_COMPILATION_CACHE_DIR says.
  jax.config.update('jax_enable_compilation_cache', False)
  lowered, state, batch, rng, lower_s = build_step(bindings)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], batch, rng)
    jax.block_until_ready(metrics)

  one_step()
  reply(ready=True, lower_s=lower_s, compile_s=compile_s,
        params=int(sum(x.size for x in jax.tree.leaves(holder[0].params))))
  faults = []
  for line in sys.stdin:
    if line.startswith('step'):
      reply(seconds=timed(one_step, faults))
    elif line.startswith('faults'):
      reply(faults=statistics.median(faults))
    elif line.startswith('quit'):
      return


def step_flops() -> float:
  import gin  # pylint: disable=import-outside-toplevel
  from mslam_jax import flops, pretrain_loss  # pylint: disable=import-outside-toplevel
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=import-outside-toplevel
  from mslam_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  gin.add_config_file_search_path(REPO_ROOT)
  gin.parse_config_files_and_bindings([os.path.join(REPO_ROOT, GIN_FILE)],
                                      ["MODEL_DIR = '/tmp/unused'"], skip_unknown=True)
  return flops.train_step_flops(ModelConfig(), BatchConfig(), pretrain_loss.LossConfig())['total']


def seconds_range(values) -> str:
  """'12.3 s' for one value, else 'median s (min-max)'."""
  if len(values) == 1:
    return f'{values[0]:.1f} s'
  return f'{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--baseline', action='append', default=[],
                      help='git revision to compare (repeatable), e.g. 2b369fa')
  parser.add_argument('--variant', action='append', default=[],
                      help="this checkout with gin bindings (repeatable; ';' between "
                           "bindings), e.g. 'ModelConfig.scan_unroll = 1'")
  parser.add_argument('--malloc', action='append', default=[], choices=host_memory.CHOICES,
                      help='one more worker: this checkout with this host allocator setting '
                      '(repeatable; the others run as their entry points do: '
                      'mslam_jax/host_memory.py)')
  parser.add_argument('--rounds', type=int, default=15, help='alternated steps per worker')
  parser.add_argument('--compiles', type=int, default=1,
                      help='cold compiles per revision, each in a fresh process, alternated')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--binding', action='append', default=[], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.binding)
    return
  print(f'tiny_step: {machine.cpu_summary()}', flush=True)
  total = step_flops()
  print(f'{GIN_FILE}: {total / 1e9:.3f} GFLOP per step (analytical, this checkout)', flush=True)
  env = {'XLA_FLAGS': ''}  # one device, as the demo; no fake devices from the caller
  with contextlib.ExitStack() as stack:
    current = stack.enter_context(current_tree())
    roots = {f'this checkout ({host_memory.choice()})': (current, [], None)}
    for variant in args.variant:
      roots[f'this checkout, {variant}'] = (current, [b.strip() for b in variant.split(';')],
                                            None)
    for setting in args.malloc:
      roots[f'this checkout, MSLAM_HOST_MALLOC={setting}'] = (current, [], setting)
    for rev in args.baseline:
      root = stack.enter_context(worktree(rev))
      malloc = entry_point_malloc(root)
      roots[f'{rev} ({malloc or host_memory.choice()})'] = (root, [], malloc)
    workers, lower_s, compile_s = [], {name: [] for name in roots}, {name: [] for name in roots}
    try:
      for attempt in range(args.compiles):
        for name, (root, bindings, malloc) in roots.items():  # one at a time: clean compiles
          command = [os.path.abspath(__file__), '--worker']
          command += [f'--binding={b}' for b in bindings]
          worker = Worker(name, command, root=root, env=env, malloc=malloc)
          lower_s[name].append(worker.ready['lower_s'])
          compile_s[name].append(worker.ready['compile_s'])
          print(f'{name}: trace + lower {lower_s[name][-1]:.1f} s, XLA compile '
                f'{compile_s[name][-1]:.1f} s (cold, {attempt + 1} of {args.compiles})',
                flush=True)
          if attempt == 0:
            workers.append(worker)  # kept for the steps
          else:
            worker.close()
      times = alternate(workers, 'step', args.rounds)
      faults = median_faults(workers)
    finally:
      for w in workers:
        w.close()
  ours = workers[0].name
  print('\n| revision | step (median, min-max) | GFLOP/s | page faults per step | trace + lower '
        '| XLA compile | step / this checkout\'s | compile / this checkout\'s |')
  print('|---|---|---|---|---|---|---|---|')
  for w in workers:
    ts = times[w.name]
    med = statistics.median(ts)
    print(f'| {w.name} | {med:.3f} s ({min(ts):.3f}-{max(ts):.3f}) | {total / med / 1e9:.1f} | '
          f'{faults[w.name]:,.0f} | {seconds_range(lower_s[w.name])} | '
          f'{seconds_range(compile_s[w.name])} | {ratio_summary(paired_ratios(ts, times[ours]))} | '
          f'{ratio_summary(paired_ratios(compile_s[w.name], compile_s[ours]))} |')
  print('(the ratios: median and range of the per-round ratios; a round times every '
        'revision once, so the load of its minutes cancels)')


if __name__ == '__main__':
  main()
