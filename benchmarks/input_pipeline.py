"""Speech input pipeline alone (no model): our sampler against a plain Python loader.

Both loaders read the same TFRecord files (the large embedded corpus's speech
train split, 20 languages, 2-8 s FLAC utterances) and produce batches of 32
log-mel sequences of 800 frames (8 s) with 80 channels:

  ours:          ThreeStreamSampler(parts=('speech',)): the global order (per-epoch
                 permutations, grain mix by rate), records fetched by number, then
                 tf.data: soundfile decode inside tf.numpy_function, tf.signal log-mel.
  ours, 3 kinds: the full sampler (speech 32 x 800 frames, text 128 x 512
                 characters, paired 4 x 800 frames + 256 characters: the paper's
                 2048 : 8192 : 256 per step, scaled down 64x).
  plain:         a Python loop: TFRecordDataset only for the record bytes,
                 soundfile decode, librosa mel spectrogram, numpy crop/pad/stack.
  plain, 2 thr:  the same, with decode + features in a ThreadPoolExecutor(2),
                 also with OPENBLAS_NUM_THREADS=1.

Each loader runs in its own subprocess pinned with `taskset -c 0` (1 core) and
`taskset -c 0,1` (2 cores). In each, the first batches (graph building, thread
pools, shuffle buffers filling) are skipped, then `--batches` batches are timed
`--repeats` times; the table gives the median over repeats of examples/s and of
audio seconds/s (valid frames / 100, the like-for-like figure, since the two
loaders do not visit utterances in the same order).

Before timing, the script checks that an utterance the sampler emits and the
plain loader's features for the same record agree (max abs log-mel
difference), so that the two loaders do the same work.

    python benchmarks/input_pipeline.py

The corpus is built once with
`python -m mslam_jax.corpus.build --output=/tmp/corpus_large --size=large`.
"""

import argparse
import collections
import concurrent.futures
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

# Before TensorFlow is imported (by this module or the workers): its start-up
# chatter would bury the table.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import librosa  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import soundfile as sf  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 32
FRAMES = 800
MELS = 80
SAMPLE_RATE = 16000
HOP = 160
# Our STFT puts the 400-sample window at the start of each 512-sample FFT frame;
# librosa centres it, 56 samples in. Padding the waveform by 56 on both sides
# makes librosa's frames cover the same samples (and give the same count).
WINDOW_OFFSET = (512 - 400) // 2
LOADERS = {
    'ours': 'ours (speech only)',
    'ours_all': 'ours, all 3 kinds (speech + paired audio counted)',
    'plain': 'plain (1 thread)',
    'plain_threads': 'plain, ThreadPoolExecutor(2)',
    'plain_threads_blas1': 'plain, ThreadPoolExecutor(2), OPENBLAS_NUM_THREADS=1',
}
# numpy's OpenBLAS starts a thread per core for librosa's mel matrix product;
# beside two Python threads those oversubscribe the cores, so the threaded
# loader is also timed with OpenBLAS held to one thread.
LOADER_ENV = {'plain_threads_blas1': {'OPENBLAS_NUM_THREADS': '1'}}
CORES = (('1', '0'), ('2', '0,1'))


def speech_files(corpus):
  folder = os.path.join(corpus, 'speech', 'train')
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.endswith('.tfrecord'))


# ----------------------------------------------------------------------------
# Our pipeline.


def make_sampler(corpus, all_kinds, with_metadata=False):
  """The sampler over the corpus's tasks; speech only unless `all_kinds`."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  from mslam_jax.data import registry  # pylint: disable=g-import-not-at-top
  from mslam_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=g-import-not-at-top

  registry.add_corpus(corpus, 'large')
  batch_config = BatchConfig(speech_batch_size=BATCH, speech_frames=FRAMES,
                             text_batch_size=4 * BATCH, text_length=512,
                             paired_batch_size=BATCH // 8, paired_frames=FRAMES,
                             paired_text_length=256)
  data_config = sampler_lib.DataConfig(
      task_modules=(), speech_tasks=('large_speech_*',), text_tasks=('large_text_*',),
      paired_tasks=('large_paired_*',), vocabulary_path=os.path.join(corpus, 'vocab.txt'))
  parts = ('speech', 'text', 'paired') if all_kinds else ('speech',)
  return sampler_lib.ThreeStreamSampler(batch_config, data_config, parts=parts,
                                        shard_index=0, num_shards=1,
                                        with_metadata=with_metadata)


def ours_batches(corpus, all_kinds):
  """Yields (audio examples, valid frames) per batch of our sampler."""
  sampler = make_sampler(corpus, all_kinds)
  for batch in sampler:
    examples = frames = 0
    for kind in ('speech', 'paired'):
      if kind in batch:
        paddings = batch[kind]['feature_paddings']
        examples += paddings.shape[0]
        frames += int(paddings.size - paddings.sum())
    yield examples, frames


# ----------------------------------------------------------------------------
# The plain loader.


def audio_bytes(serialized):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.train.Example.FromString(serialized).features.feature['audio'].bytes_list.value[0]


def plain_log_mel(data):
  """FLAC bytes -> log-mel [frames, 80] with soundfile and librosa."""
  y, rate = sf.read(io.BytesIO(data), dtype='float32')
  assert rate == SAMPLE_RATE, rate  # the corpus is 16 kHz; a plain loader would not resample
  mel = librosa.feature.melspectrogram(
      y=np.pad(y, (WINDOW_OFFSET, WINDOW_OFFSET)), sr=SAMPLE_RATE, n_fft=512, win_length=400,
      hop_length=HOP, center=False, htk=True, norm=None, n_mels=MELS, fmin=20, fmax=8000)
  return np.log(np.maximum(mel, 1e-6)).T


def crop_or_pad(features):
  """[frames, 80] -> ([FRAMES, 80], valid frames); crops from the start."""
  valid = min(len(features), FRAMES)
  out = np.zeros([FRAMES, MELS], np.float32)
  out[:valid] = features[:valid]
  return out, valid


def plain_featurize(serialized):
  return crop_or_pad(plain_log_mel(audio_bytes(serialized)))


def plain_records(corpus):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.data.TFRecordDataset(speech_files(corpus)).repeat().as_numpy_iterator()


def to_batch(items):
  features = np.stack([f for f, _ in items])
  valid = np.array([v for _, v in items])
  paddings = (np.arange(FRAMES)[None, :] >= valid[:, None]).astype(np.float32)
  return features, paddings


def plain_batches(corpus):
  records = plain_records(corpus)
  while True:
    _, paddings = to_batch([plain_featurize(next(records)) for _ in range(BATCH)])
    yield BATCH, int(paddings.size - paddings.sum())


def plain_thread_batches(corpus, threads=2):
  """The plain loader with decode + features on `threads` threads, a batch ahead."""
  records = plain_records(corpus)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = collections.deque(pool.submit(plain_featurize, next(records))
                                for _ in range(2 * BATCH))
    while True:
      items = []
      for _ in range(BATCH):
        items.append(pending.popleft().result())
        pending.append(pool.submit(plain_featurize, next(records)))
      _, paddings = to_batch(items)
      yield BATCH, int(paddings.size - paddings.sum())


# ----------------------------------------------------------------------------
# Timing and checking.


def worker(args):
  """Times one loader in this (pinned) process; prints one JSON line."""
  batches = {
      'ours': lambda: ours_batches(args.corpus, all_kinds=False),
      'ours_all': lambda: ours_batches(args.corpus, all_kinds=True),
      'plain': lambda: plain_batches(args.corpus),
      'plain_threads': lambda: plain_thread_batches(args.corpus),
      'plain_threads_blas1': lambda: plain_thread_batches(args.corpus),
  }[args.worker]()
  for _ in range(args.warmup):
    next(batches)
  runs = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    examples = frames = 0
    for examples_i, frames_i in itertools.islice(batches, args.batches):
      examples += examples_i
      frames += frames_i
    seconds = time.perf_counter() - start
    runs.append({'seconds': seconds, 'batches_per_s': args.batches / seconds,
                 'examples_per_s': examples / seconds,
                 'audio_s_per_s': frames / 100 / seconds})
  print(json.dumps({'loader': args.worker, 'cpus': sorted(os.sched_getaffinity(0)),
                    'runs': runs}), flush=True)
  # Skips interpreter teardown with tf.data threads still running (the sampler
  # closes itself at exit, which can take a while under one core).
  os._exit(0)  # pylint: disable=protected-access


def check_features(corpus):
  """Max abs log-mel difference, sampler output against the plain loader, one utterance."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sampler = make_sampler(corpus, all_kinds=False, with_metadata=True)
  speech = next(sampler)['speech']
  sampler.close()
  valid = int((1 - speech['feature_paddings'][0]).sum())
  example_id = speech['id'][0]
  example_id = example_id.decode() if isinstance(example_id, bytes) else str(example_id)
  for serialized in tf.data.TFRecordDataset(speech_files(corpus)).as_numpy_iterator():
    example = tf.train.Example.FromString(serialized)
    if example.features.feature['id'].bytes_list.value[0].decode() == example_id:
      break
  else:
    raise ValueError(f'{example_id} not in the speech files')
  theirs = plain_log_mel(example.features.feature['audio'].bytes_list.value[0])
  if len(theirs) != valid:
    raise ValueError(f'{example_id}: the sampler gives {valid} frames, librosa {len(theirs)} '
                     '(cropped, or the framing differs)')
  return example_id, valid, float(np.abs(speech['features'][0, :valid] - theirs).max())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--corpus', default='/tmp/corpus_large')
  parser.add_argument('--batches', type=int, default=30, help='timed batches per repeat')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=3, help='untimed batches first')
  parser.add_argument('--loaders', default=','.join(LOADERS),
                      help=f'comma-separated, of {list(LOADERS)}')
  parser.add_argument('--worker', choices=list(LOADERS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.corpus, 'metadata.json')):
    sys.exit(f'{args.corpus} not found: python -m mslam_jax.corpus.build '
             f'--output={args.corpus} --size=large')
  if args.worker:
    worker(args)
    return

  example_id, frames, diff = check_features(args.corpus)
  print(f'check: {example_id} ({frames} frames): max |ours - librosa| log-mel = {diff:.2e}')
  if diff >= 1e-2:
    sys.exit('the two loaders compute different features; timing them would mislead')

  results = {}
  for cores, cpu_list in CORES:
    for loader in args.loaders.split(','):
      command = ['taskset', '-c', cpu_list, sys.executable, os.path.abspath(__file__),
                 f'--worker={loader}', f'--corpus={args.corpus}',
                 f'--batches={args.batches}', f'--repeats={args.repeats}',
                 f'--warmup={args.warmup}']
      start = time.perf_counter()
      env = {**os.environ, **LOADER_ENV.get(loader, {})}
      done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
      if done.returncode:
        sys.exit(f'{" ".join(command)} failed:\n{done.stderr[-3000:]}')
      runs = json.loads(done.stdout.strip().splitlines()[-1])['runs']
      results[loader, cores] = {
          k: statistics.median(r[k] for r in runs)
          for k in ('batches_per_s', 'examples_per_s', 'audio_s_per_s')}
      results[loader, cores]['all_audio_s_per_s'] = [round(r['audio_s_per_s'], 1) for r in runs]
      print(f'  {loader} on {cores} core(s): {time.perf_counter() - start:.0f} s wall',
            file=sys.stderr, flush=True)

  print(f'\n{BATCH} x {FRAMES} frames per batch; {args.warmup} batches skipped, then '
        f'{args.repeats} x {args.batches} batches timed; medians over the repeats.\n')
  print('| loader | cores | batches/s | examples/s | audio s/s | audio s/s, each repeat |')
  print('|---|---|---|---|---|---|')
  for loader in args.loaders.split(','):
    for cores, _ in CORES:
      r = results[loader, cores]
      print(f'| {LOADERS[loader]} | {cores} | {r["batches_per_s"]:.2f} | '
            f'{r["examples_per_s"]:.1f} | {r["audio_s_per_s"]:.1f} | '
            f'{", ".join(map(str, r["all_audio_s_per_s"]))} |')
  if ('ours', '1') in results and ('plain', '1') in results:
    print()
    for cores, _ in CORES:
      ratio = results['ours', cores]['audio_s_per_s'] / results['plain', cores]['audio_s_per_s']
      print(f'ours / plain (1 thread), audio s/s, {cores} core(s): {ratio:.2f}x')
    for other in ('plain_threads', 'plain_threads_blas1'):
      for cores, _ in CORES:
        if (other, cores) in results:
          ratio = (results['ours', cores]['audio_s_per_s']
                   / results[other, cores]['audio_s_per_s'])
          print(f'ours / {LOADERS[other]}, audio s/s, {cores} core(s): {ratio:.2f}x')


if __name__ == '__main__':
  main()
