"""The training loop's time per step against the step's own, with a slow input: does the host's
wait for the next batch overlap the device's work?

Each revision (this checkout, uncommitted changes included, and every
--baseline) runs as a worker in its own git worktree with the tiny demo's
step (`tiny_step.make_step`: gin/pretrain_tiny_cpu.gin, synthetic batch, one
CPU device). A worker times, in turn:
  - the step alone: step after step, each waited for (the device's time);
  - `trainer.run` over --steps steps, its batches from an iterator that sleeps
    L ms before each one, for every L of --latency_ms: an input that is not
    ready when asked (a file system, a remote reader; on a TPU or GPU host
    also the batch's copy to the device, which the host does while the chip
    waits).
  - with --save_every K, `trainer.run` (input ready) saving an orbax checkpoint
    every K steps through `checkpoints.Checkpointer`, written in the
    background (async, the default) and not: what a save adds to the steps.
A loop that waits for each step before it asks for the next batch takes about
step + L per step; one that asks while the step runs takes about max(step, L).
The sleep leaves the CPU free, so on this machine the overlap is visible
without an accelerator. The workers take turns, --rounds times; the table
gives medians and the per-round ratio to this checkout
(`workers.paired_ratios`).

    python benchmarks/train_loop.py --baseline 861f886 --latency_ms 0,25,50
    python benchmarks/train_loop.py --latency_ms 0 --save_every 5
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time

import machine  # benchmarks/machine.py, beside this script
import tiny_step  # benchmarks/tiny_step.py, beside this script
from workers import alternate, ms_cell, reply, revision_workers


class _Writer:
  """trainer.run's writer, keeping nothing: the loop's own cost is what is timed."""

  def write(self, step, metrics, total_steps=None):  # pylint: disable=unused-argument
    return {'step': step}


def worker_main(steps: int) -> None:
  """Runs in a revision's tree: builds the tiny step, then times on demand."""
  import jax  # pylint: disable=import-outside-toplevel
  from mslam_jax import checkpoints, partitioning, trainer  # pylint: disable=import-outside-toplevel
  step_fn, state, batch, rng, mesh, _ = tiny_step.make_step()
  holder = [state]

  def delayed(latency_s):
    while True:
      time.sleep(latency_s)
      yield batch

  def loop(latency_s, checkpointer=None):
    start_step = int(holder[0].step)
    start = time.perf_counter()
    # The loop's console lines (compiling) would break the JSON replies on stdout.
    with contextlib.redirect_stdout(sys.stderr):
      holder[0], _ = trainer.run(holder[0], step_fn, delayed(latency_s), rng, mesh=mesh,
                                 num_steps=start_step + steps, log_every=steps,
                                 writer=_Writer(), checkpointer=checkpointer)
    jax.block_until_ready(holder[0])
    return (time.perf_counter() - start) / steps

  def saving(every, async_save):
    # A fresh directory per loop, made outside the timing; the loop's end waits
    # for the last write (trainer.run does), so both kinds time every write.
    with tempfile.TemporaryDirectory() as directory:
      checkpointer = checkpoints.Checkpointer(directory, save_every=every,
                                              async_save=async_save)
      try:
        return loop(0.0, checkpointer)
      finally:
        checkpointer.close()

  def alone():
    global_batch = partitioning.global_batch(batch, mesh)
    start = time.perf_counter()
    for _ in range(steps):
      holder[0], metrics = step_fn(holder[0], global_batch, rng)
      jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps

  loop(0.0)  # compiles
  reply(ready=True)
  for line in sys.stdin:
    command = line.split()
    if command[0] == 'alone':
      reply(seconds=alone())
    elif command[0] == 'loop':
      reply(seconds=loop(float(command[1]) / 1e3))
    elif command[0] == 'save':
      reply(seconds=saving(int(command[1]), command[2] == 'async'))
    elif command[0] == 'quit':
      return


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--baseline', action='append', default=[],
                      help='git revision to compare (repeatable)')
  parser.add_argument('--latency_ms', default='0,25,50',
                      help='comma-separated input latencies L, ms per batch')
  parser.add_argument('--steps', type=int, default=20, help='steps per timed loop')
  parser.add_argument('--rounds', type=int, default=7, help='alternated loops per setting')
  parser.add_argument('--save_every', type=int, default=0,
                      help='also time the loop (input ready) saving an orbax checkpoint every '
                      'this many steps, async and not; 0: no saves')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.steps)
    return
  latencies = [int(x) for x in args.latency_ms.split(',')]
  print(f'train_loop: {machine.cpu_summary()}', flush=True)
  env = {'XLA_FLAGS': ''}  # one device, as the demo
  command = [os.path.abspath(__file__), '--worker', f'--steps={args.steps}']
  with revision_workers(command, args.baseline, env=env, started='compiled') as workers:
    rows = [('step alone', alternate(workers, 'alone', args.rounds))]
    for latency in latencies:
      rows.append((f'trainer.run, input {latency} ms',
                   alternate(workers, f'loop {latency}', args.rounds)))
    if args.save_every:
      for kind in ('async', 'sync'):
        rows.append((f'trainer.run, input 0 ms, {kind} save every {args.save_every} steps',
                     alternate(workers, f'save {args.save_every} {kind}', args.rounds)))
  ours = workers[0].name
  print(f'\nms per step, median (min-max) of {args.rounds} rounds of {args.steps} steps; '
        'in brackets after the median: its time over this checkout\'s, per round')
  print('| what | ' + ' | '.join(w.name for w in workers) + ' |')
  print('|---|' + '---|' * len(workers))
  for label, times in rows:
    cells = [ms_cell(times[w.name], None if w.name == ours else times[ours]) for w in workers]
    print(f'| {label} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
