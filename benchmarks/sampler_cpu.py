"""The pre-training sampler alone: CPU time and wall time per batch, kind by kind.

On a small host (the demo's 2 cores) the input pipeline shares the CPU with
the step, so every millisecond of CPU it spends per batch is one the step may
wait for. Each revision (this checkout, uncommitted changes included, and
every --baseline) runs as a worker in its own git worktree, with the batch
sizes, lengths and tasks of --gin_file (by default the tiny demo's: the
embedded corpus); a worker builds one `ThreeStreamSampler` per measured set of
kinds (speech, text, paired alone, then all three), fills its decoded-audio
cache (`fill_feature_cache`, as train.py does), reads --warmup batches, and
then, on demand, times --batches batches: wall time and the process's CPU time
(user + system, every thread: tf.data's work runs on its own threads). The
workers take turns (ABBA), --rounds times; the table gives medians, ranges and
the per-round ratio to this checkout (`workers.paired_ratios`).

    python benchmarks/sampler_cpu.py --baseline 218a3d9
"""

import argparse
import os
import resource
import sys
import time

import machine  # benchmarks/machine.py, beside this script
from workers import ms_cell, reply, revision_workers  # benchmarks/workers.py

SETS = ('speech', 'text', 'paired', 'speech,text,paired')


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def worker_main(gin_file: str, warmup: int, batches: int) -> None:
  """Runs in a revision's tree: one sampler per set of kinds, timed on demand."""
  from mslam_jax import gin_utils  # pylint: disable=import-outside-toplevel
  from mslam_jax.data import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=import-outside-toplevel
  gin_utils.parse_gin([gin_file])
  samplers = {}
  for kinds in SETS:
    s = sampler_lib.ThreeStreamSampler(BatchConfig(), sampler_lib.DataConfig(),
                                       parts=kinds.split(','), shard_index=0, num_shards=1)
    if hasattr(s, 'fill_feature_cache'):  # revisions before it filled at the first batch
      s.fill_feature_cache()
    for _ in range(warmup):
      next(s)
    samplers[kinds] = s
  reply(ready=True)
  for line in sys.stdin:
    command = line.split()
    if command[0] == 'time':
      s = samplers[command[1]]
      cpu, wall = _cpu_seconds(), time.perf_counter()
      for _ in range(batches):
        next(s)
      reply(seconds=(time.perf_counter() - wall) / batches,
            cpu=(_cpu_seconds() - cpu) / batches)
    elif command[0] == 'quit':
      for s in samplers.values():
        s.close()
      return


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--baseline', action='append', default=[],
                      help='git revision to compare (repeatable)')
  parser.add_argument('--gin_file', default='gin/pretrain_tiny_cpu.gin')
  parser.add_argument('--warmup', type=int, default=10, help='batches read before timing')
  parser.add_argument('--batches', type=int, default=100, help='batches per timing')
  parser.add_argument('--rounds', type=int, default=5, help='alternated timings per set')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.gin_file, args.warmup, args.batches)
    return
  print(f'sampler_cpu: {machine.cpu_summary()}', flush=True)
  command = [os.path.abspath(__file__), '--worker', f'--gin_file={args.gin_file}',
             f'--warmup={args.warmup}', f'--batches={args.batches}']
  times = {}  # (kinds, worker) -> [(wall, cpu)] per round
  with revision_workers(command, args.baseline) as workers:
    for r in range(args.rounds):
      for kinds in SETS:
        for w in (workers if r % 2 == 0 else workers[::-1]):
          got = w.ask(f'time {kinds}')
          times.setdefault((kinds, w.name), []).append((got['seconds'], got['cpu']))
  ours = workers[0].name
  print(f'\nms per batch, median (min-max) of {args.rounds} rounds of {args.batches} batches; '
        'after the median, its time over this checkout\'s, per round')
  print('| kinds | what | ' + ' | '.join(w.name for w in workers) + ' |')
  print('|---|---|' + '---|' * len(workers))
  for kinds in SETS:
    for what, column in (('CPU', 1), ('wall', 0)):
      column_of = lambda name, c=column: [t[c] for t in times[(kinds, name)]]
      cells = [ms_cell(column_of(w.name), None if w.name == ours else column_of(ours))
               for w in workers]
      print(f'| {kinds.replace(",", " + ")} | {what} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
