"""Time from launch to the tiny demo's first training step, with a cold compilation cache.

Runs the trainer's entry point, `python -m mslam_jax.train` on
gin/pretrain_tiny_cpu.gin with synthetic batches and TRAIN_STEPS=1, in this
checkout (uncommitted changes included) and in each --baseline revision (git
worktrees), alternated (ABBA), --rounds times each. Every run gets an empty
persistent compilation cache and an empty MODEL_DIR, so it creates the state
and compiles everything a first-time user's run does. Prints, per revision,
the median and min-max seconds from launch to the first progress line
(`step 1/1`: start-up, state, compiles and one step), its ratio to this
checkout's round by round (median and range; `workers.paired_ratios`), the
seconds to exit, and where that time went: launch to the trainer's first
console line (imports, the allocator's re-exec, jax's start), from there to
the `train step:` line (data, the state's shapes, its initialisation and the
matmul peak), and from there to the first step (the step's trace, compile
and run). A --variant runs this checkout with extra gin bindings. --warmup untimed runs
go first: without one, the first timed process was often several seconds
slower than the rest, whichever revision it ran (probably files not yet in
the page cache).

    python benchmarks/startup.py --baseline c96f3fe --rounds 3
    python benchmarks/startup.py --variant 'TrainConfig.init_compiler_options = None'
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import machine  # benchmarks/machine.py, beside this script
from tiny_step import GIN_FILE  # benchmarks/tiny_step.py
from workers import current_tree, paired_ratios, ratio_summary, worktree  # benchmarks/workers.py


def gin_flags(bindings):
  """'NAME = VALUE' gin bindings -> ['--gin.NAME=VALUE'] (split at the first '=' only)."""
  flags = []
  for binding in bindings:
    name, sep, value = binding.partition('=')
    if not sep or not name.strip():
      raise ValueError(f'--variant: {binding!r} is not a gin binding NAME = VALUE')
    flags.append(f'--gin.{name.strip()}={value.strip()}')
  return flags


# Console lines that end each start-up stage (mslam_jax/train.py), in order.
STAGES = (('imports', 'model_dir:'), ('state', 'train step:'), ('step', 'step 1/1'))


def stage_ends(timed_lines) -> dict:
  """(seconds since launch, line) pairs -> {stage: seconds at its first marker line}.

  A stage whose marker never appears (an older revision's console) is left out.
  """
  ends = {}
  for seconds, line in timed_lines:
    for stage, prefix in STAGES:
      if stage not in ends and line.startswith(prefix):
        ends[stage] = seconds
  return ends


def stage_durations(ends: dict) -> dict:
  """{stage: end seconds} -> {stage: seconds since the previous stage's end (or launch)}."""
  durations, previous = {}, 0.0
  for stage, _ in STAGES:
    if stage not in ends:
      return durations
    durations[stage] = ends[stage] - previous
    previous = ends[stage]
  return durations


def one_run(root: str, bindings=()) -> dict:
  """Seconds to the first progress line, to exit and per stage of one cold run in `root`."""
  with tempfile.TemporaryDirectory(prefix='mslam_startup_') as scratch:
    env = {**os.environ, 'PYTHONPATH': root, 'XLA_FLAGS': '',
           'JAX_COMPILATION_CACHE_DIR': os.path.join(scratch, 'jax_cache')}
    command = [sys.executable, '-m', 'mslam_jax.train', f'--gin_file={GIN_FILE}',
               '--gin.TRAIN_STEPS=1', "--gin.DataConfig.source='synthetic'",
               f"--gin.MODEL_DIR='{os.path.join(scratch, 'run')}'"]
    command += gin_flags(bindings)
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
      output = [(time.perf_counter() - start, line) for line in process.stdout]
    total = time.perf_counter() - start
  ends = stage_ends(output)
  if process.returncode or 'step' not in ends:
    tail = ''.join(line for _, line in output[-20:])
    raise RuntimeError(f'{" ".join(command)} in {root} failed:\n{tail}')
  return {'first_step': ends['step'], 'exit': total, 'stages': stage_durations(ends)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--baseline', action='append', default=[],
                      help='git revision to compare (repeatable)')
  parser.add_argument('--variant', action='append', default=[],
                      help="this checkout with gin bindings (repeatable; ';' between "
                           "bindings), e.g. 'TrainConfig.init_compiler_options = None'")
  parser.add_argument('--rounds', type=int, default=3, help='cold runs per revision')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed cold runs of this checkout before the timed ones')
  args = parser.parse_args()
  print(f'startup: {machine.cpu_summary()}', flush=True)
  with contextlib.ExitStack() as stack:
    current = stack.enter_context(current_tree())
    roots = {'this checkout': (current, [])}
    for variant in args.variant:
      roots[f'this checkout, {variant}'] = (current, [b for b in variant.split(';') if b.strip()])
    for rev in args.baseline:
      roots[rev] = (stack.enter_context(worktree(rev)), [])
    names = list(roots)
    for w in range(args.warmup):
      seconds = one_run(current)['first_step']
      print(f'warm-up {w + 1}: first step at {seconds:.1f} s (not counted)', flush=True)
    runs = {name: [] for name in names}
    for r in range(args.rounds):
      for name in (names if r % 2 == 0 else names[::-1]):
        runs[name].append(one_run(*roots[name]))
        print(f'round {r + 1}, {name}: first step at {runs[name][-1]["first_step"]:.1f} s, '
              f'exit at {runs[name][-1]["exit"]:.1f} s', flush=True)
  ours = [run['first_step'] for run in runs[names[0]]]
  print('\n| revision | launch to first step (median, min-max) | launch to exit | '
        'imports | state | step | first step / this checkout\'s, per round |')
  print('|---|---|---|---|---|---|---|')
  for name in names:
    first = [run['first_step'] for run in runs[name]]
    done = [run['exit'] for run in runs[name]]
    stages = []
    for stage, _ in STAGES:
      values = [run['stages'][stage] for run in runs[name] if stage in run['stages']]
      stages.append(f'{statistics.median(values):.1f} s' if values else '-')
    print(f'| {name} | {statistics.median(first):.1f} s ({min(first):.1f}-{max(first):.1f}) | '
          f'{statistics.median(done):.1f} s | {" | ".join(stages)} | '
          f'{ratio_summary(paired_ratios(first, ours))} |')
  print('(stage medians: launch to the first console line; to the `train step:` line; to '
        'the first step)')


if __name__ == '__main__':
  main()
