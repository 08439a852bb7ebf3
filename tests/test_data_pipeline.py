"""Task preprocessing: sources, features and every bad-input case (skipped or cleaned, counted)."""

import os
import time

import numpy as np
import pytest
import seqio
import soundfile as sf
import tensorflow as tf

import toy_corpus
from mslam_jax.data import audio
from mslam_jax.data import bad_input
from mslam_jax.data import registry
from mslam_jax.data import sources
from mslam_jax.data.bad_input import Problem
from mslam_jax.data.vocabulary import CharacterVocabulary

LIMITS = {'features': 120, 'ids': 12}  # 1.2 s of frames, 12 characters


def wav_bytes(waveform, subtype='PCM_16', rate=16000):
  return toy_corpus.flac_bytes(waveform, rate, fmt='WAV', subtype=subtype)


@pytest.fixture(autouse=True)
def _vocab(tmp_path):
  path = str(tmp_path / 'vocab.txt')
  CharacterVocabulary.build(['abcdefgh ']).save(path)
  registry.set_vocabulary_path(path)
  bad_input.LOG.reset()
  yield
  bad_input.LOG.reset()


def _examples(task_name, split='train'):
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      LIMITS, split=split, shuffle=False, num_epochs=1)
  return {ex['id'].decode(): ex for ex in ds.as_numpy_iterator()}


def _write_records(path, rows):
  with tf.io.TFRecordWriter(path) as w:
    for ex_id, audio_bytes, transcript in rows:
      w.write(toy_corpus.example(ex_id, 'aa', audio_bytes, transcript).SerializeToString())


def test_paired_bad_inputs_are_skipped_or_cleaned_and_counted(tmp_path):
  rng = np.random.default_rng(0)
  good = toy_corpus.tone(rng, 0.8)
  flac = toy_corpus.flac_bytes(good)
  nan = good.copy()
  nan[100] = np.nan
  rows = [
      ('good', flac, 'abc def'),
      ('good_wav_22k', wav_bytes(toy_corpus.tone(rng, 0.8, 22050), rate=22050), 'abc'),
      ('garbage', rng.bytes(3000), 'abc'),
      ('truncated', wav_bytes(good)[:6000], 'abc'),
      ('empty', wav_bytes(np.zeros(0, np.float32)), 'abc'),
      ('silent', wav_bytes(np.zeros(8000, np.float32)), 'abc'),
      ('nan', wav_bytes(nan, subtype='FLOAT'), 'abc'),
      ('short', toy_corpus.flac_bytes(good[:3000]), 'abc'),      # 0.19 s < 32 frames
      ('long_audio', toy_corpus.flac_bytes(toy_corpus.tone(rng, 2.0)), 'abc'),
      ('empty_text', flac, '  '),
      ('long_text', flac, 'abcdefgh abcdefgh'),
      ('unknown_chars', flac, 'abc xyz'),
  ]
  path = str(tmp_path / 'bad.tfrecord')
  _write_records(path, rows)
  registry.add_task('test_bad_paired', kind='paired', language='aa',
                    source=sources.tfrecords(path), size=len(rows))
  kept = _examples('test_bad_paired')
  assert sorted(kept) == ['good', 'good_wav_22k', 'unknown_chars']
  expected = {
      'garbage': Problem.UNREADABLE_AUDIO, 'truncated': Problem.TRUNCATED_AUDIO,
      'empty': Problem.EMPTY_AUDIO, 'silent': Problem.EMPTY_AUDIO,
      'nan': Problem.NONFINITE_AUDIO, 'short': Problem.TOO_SHORT_AUDIO,
      'long_audio': Problem.TOO_LONG_AUDIO, 'empty_text': Problem.EMPTY_TEXT,
      'long_text': Problem.TOO_LONG_TEXT, 'unknown_chars': Problem.UNKNOWN_CHARS_CLEANED}
  counts = bad_input.LOG.counts()
  for name, problem in expected.items():
    assert name in bad_input.LOG.examples('test_bad_paired', problem), (name, problem)
  assert sum(counts.values()) == len(expected)
  assert counts[('test_bad_paired', Problem.EMPTY_AUDIO)] == 2
  report = bad_input.LOG.report()
  assert 'test_bad_paired: 1 skipped: truncated audio file (e.g. truncated)' in report
  assert 'kept: characters outside the vocabulary mapped to UNK (e.g. unknown_chars)' in report
  # The cleaned example maps unknown characters to UNK; its features are the log-mel.
  vocab = registry.SHARED_VOCABULARY.loaded
  assert kept['unknown_chars']['ids'].tolist() == vocab.encode('abc xyz')
  want = audio.log_mel(audio.decode_audio(flac)[0], audio.FeatureConfig()).numpy()
  np.testing.assert_allclose(kept['good']['features'], want, rtol=1e-5, atol=1e-5)
  # 22.05 kHz audio was resampled: 0.8 s gives the frames of 0.8 s at 16 kHz.
  assert abs(kept['good_wav_22k']['features'].shape[0] - 78) <= 1


def test_unlabeled_speech_and_text_are_cropped_not_skipped(tmp_path):
  rng = np.random.default_rng(1)
  path = str(tmp_path / 'speech.tfrecord')
  _write_records(path, [('long', toy_corpus.flac_bytes(toy_corpus.tone(rng, 2.0)), '')])
  registry.add_task('test_crop_speech', kind='speech', language='aa',
                    source=sources.tfrecords(path))
  (ex,) = _examples('test_crop_speech').values()
  full = audio.log_mel(audio.decode_audio(toy_corpus.flac_bytes(
      toy_corpus.tone(np.random.default_rng(1), 2.0)))[0], audio.FeatureConfig()).numpy()
  assert ex['features'].shape == (LIMITS['features'], 80)
  # The crop is a contiguous window of the full features.
  starts = [s for s in range(full.shape[0] - LIMITS['features'] + 1)
            if np.allclose(full[s:s + LIMITS['features']], ex['features'], atol=1e-5)]
  assert starts
  text_path = str(tmp_path / 'aa.txt')
  with open(text_path, 'w', encoding='utf-8') as f:
    f.write('abcdefgh abcdefgh abcdefgh\n\nabc\n')
  registry.add_task('test_crop_text', kind='text', language='aa',
                    source=sources.text_lines(text_path, 'aa'))
  kept = _examples('test_crop_text')
  assert sorted(kept) == [f'{text_path}:1', f'{text_path}:3']
  cropped = registry.SHARED_VOCABULARY.loaded.decode(kept[f'{text_path}:1']['ids'])
  assert len(cropped) == LIMITS['ids'] and cropped in 'abcdefgh abcdefgh abcdefgh'
  assert bad_input.LOG.examples('test_crop_text', Problem.EMPTY_TEXT) == [f'{text_path}:2']
  assert bad_input.LOG.total(Problem.CROPPED_AUDIO) == 1
  assert bad_input.LOG.total(Problem.CROPPED_TEXT) == 1


def test_a_crop_does_not_move_with_the_folder_the_corpus_is_in(tmp_path):
  """A text line's id names its file's path; its crop offset comes from the id without
  the folders, so a corpus checked out elsewhere gives the same batches."""
  lines = [' '.join(['abcdefgh'] * 4) for _ in range(6)]  # 35 characters, 24 offsets each
  crops = []
  for folder in ('here', 'elsewhere/deeper'):
    path = tmp_path / folder / 'aa.txt'
    path.parent.mkdir(parents=True)
    path.write_text('\n'.join(f'{n}{line}' for n, line in enumerate(lines)) + '\n',
                    encoding='utf-8')
    name = f'test_crop_{folder.replace("/", "_")}'
    registry.add_task(name, kind='text', language='aa', source=sources.text_lines(str(path), 'aa'))
    kept = _examples(name)
    crops.append([kept[f'{path}:{n + 1}']['ids'].tolist() for n in range(len(lines))])
  assert crops[0] == crops[1]
  assert len({tuple(c) for c in crops[0]}) > 1  # the offsets differ from line to line


def test_manifest_source_reads_relative_paths_and_counts_missing_files(tmp_path):
  rng = np.random.default_rng(2)
  os.makedirs(tmp_path / 'clips')
  sf.write(str(tmp_path / 'clips' / 'one.flac'), toy_corpus.tone(rng, 0.7), 16000)
  manifest = tmp_path / 'train.tsv'
  manifest.write_text('path\tlanguage\ttranscript\n'
                      'clips/one.flac\taa\tabc\n'
                      'clips/missing.flac\taa\tabc\n', encoding='utf-8')
  registry.add_task('test_manifest', kind='paired', language='aa',
                    source=sources.manifest(str(manifest)))
  assert registry.task_size('test_manifest') == 2  # rows, without reading the audio
  kept = _examples('test_manifest')
  assert list(kept) == [str(tmp_path / 'clips' / 'one.flac')]
  assert bad_input.LOG.examples('test_manifest', Problem.UNREADABLE_AUDIO) == [
      str(tmp_path / 'clips' / 'missing.flac')]
  bad = tmp_path / 'bad.tsv'
  bad.write_text('only_one_field\n', encoding='utf-8')
  with pytest.raises(ValueError, match='bad.tsv:1: expected'):
    sources.ManifestSource.read_manifest(str(bad))


def test_missing_source_fails_with_the_fix(tmp_path):
  task = registry.add_task('test_missing', kind='text', language='aa',
                           source=sources.text_lines(str(tmp_path / 'nope' / '*.txt'), 'aa'))
  with pytest.raises(FileNotFoundError, match='test_missing: no files match .*corpus.build'):
    task.source.check('train')
  with pytest.raises(FileNotFoundError, match='metadata.json not found'):
    registry.add_corpus(str(tmp_path / 'no_corpus'), 'x')


def test_add_task_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="kind must be one of"):
    registry.add_task('t', kind='audio', language='aa', source=sources.text_lines('x', 'aa'))
  with pytest.raises(TypeError, match='mslam_jax.data.sources'):
    registry.add_task('t', kind='text', language='aa', source='x.txt')


def test_sharded_sources_are_disjoint_and_cover(tmp_path):
  """Two hosts of one file (record sharding) and of four files (file sharding)."""
  for num_files in (1, 4):
    paths = []
    for f in range(num_files):
      path = str(tmp_path / f'{num_files}_{f}.txt')
      with open(path, 'w', encoding='utf-8') as out:
        out.write(''.join(f'line {f} {i}\n' for i in range(10)))
      paths.append(path)
    source = sources.text_lines(str(tmp_path / f'{num_files}_*.txt'), 'aa')
    seen = []
    for host in range(2):
      ds = source.get_dataset('train', shuffle=True, seed=3,
                              shard_info=seqio.ShardInfo(host, 2))
      seen.append({ex['id'] for ex in ds.as_numpy_iterator()})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 10 * num_files


def test_a_task_that_skips_everything_stops_with_a_message(tmp_path):
  registry.add_task('test_all_skipped', kind='paired', language='aa',
                    source=sources.manifest(str(tmp_path / 'm.tsv')))
  (tmp_path / 'm.tsv').write_text('missing.flac\taa\tabc\n', encoding='utf-8')
  ds = seqio.get_mixture_or_task('test_all_skipped').get_dataset(
      LIMITS, split='train', shuffle=False, num_epochs=None)
  old = bad_input.LOG.max_consecutive_skips
  bad_input.LOG.max_consecutive_skips = 25
  try:
    with pytest.raises(tf.errors.OpError, match='test_all_skipped: the last 25 examples were '
                       'all skipped'):
      next(iter(ds))
  finally:
    bad_input.LOG.max_consecutive_skips = old


def test_the_sampler_stops_on_a_task_that_skips_everything_with_the_message(tmp_path):
  """Raised inside tf.data, the AllSkippedError reaches the sampler's caller as itself
  (its message names the task, the problem and the fix), not wrapped in a TF error."""
  from mslam_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=g-import-not-at-top
  registry.add_task('test_sampler_all_skipped', kind='paired', language='aa',
                    source=sources.manifest(str(tmp_path / 'm.tsv')))
  (tmp_path / 'm.tsv').write_text('missing.flac\taa\tabc\n', encoding='utf-8')
  # Streamed (not held in memory, where a task that keeps nothing stops at once: below).
  config = sampler_lib.DataConfig(task_modules=(), paired_tasks=('test_sampler_all_skipped',),
                                  vocabulary_path=registry.SHARED_VOCABULARY.path,
                                  feature_cache_mb=0)
  s = sampler_lib.ThreeStreamSampler(BatchConfig(paired_batch_size=2), config, parts=('paired',),
                                     shard_index=0, num_shards=1)
  old = bad_input.LOG.max_consecutive_skips
  bad_input.LOG.max_consecutive_skips = 6
  try:
    with pytest.raises(bad_input.AllSkippedError, match=r'(?s)test_sampler_all_skipped: the last '
                       r'6 examples were all skipped.*missing.flac.*Fix the data'):
      for _ in range(10):
        next(s)
  finally:
    bad_input.LOG.max_consecutive_skips = old
    s.close()
    bad_input.LOG.reset()
  assert bad_input.LOG.stopped() is None  # a reset forgets it


def test_a_task_held_in_memory_that_keeps_nothing_stops_before_the_first_batch(tmp_path):
  """Decoded whole into memory, a task with no example to keep stops the sampler at
  once, naming each problem and file; a task that keeps one of them goes on."""
  from mslam_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=g-import-not-at-top
  sf.write(str(tmp_path / 'silent.wav'), np.zeros(16000, np.float32), 16000)
  sf.write(str(tmp_path / 'tone.wav'),
           np.sin(np.arange(16000) * 0.1).astype(np.float32) * 0.5, 16000)
  rows = {'bad': ['missing.flac\taa\tabc', 'silent.wav\taa\tabc', 'tone.wav\taa\t'],
          'one_good': ['missing.flac\taa\tabc', 'tone.wav\taa\tabc']}
  for name, lines in rows.items():
    (tmp_path / f'{name}.tsv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    registry.add_task(f'test_sampler_keeps_{name}', kind='paired', language='aa',
                      source=sources.manifest(str(tmp_path / f'{name}.tsv')))

  def sampler(task):
    config = sampler_lib.DataConfig(task_modules=(), paired_tasks=(task,),
                                    vocabulary_path=registry.SHARED_VOCABULARY.path)
    return sampler_lib.ThreeStreamSampler(BatchConfig(paired_batch_size=2), config,
                                          parts=('paired',), shard_index=0, num_shards=1)

  s = sampler('test_sampler_keeps_bad')
  try:
    with pytest.raises(bad_input.AllSkippedError) as stop:
      s.fill_feature_cache()
  finally:
    s.close()
  lines = str(stop.value).splitlines()
  assert lines[0] == 'task test_sampler_keeps_bad: none of its 3 examples is kept:'
  assert lines[1:-1] == [
      'test_sampler_keeps_bad: 1 skipped: unreadable audio (missing file, or not WAV/FLAC/OGG) '
      f'(e.g. {tmp_path / "missing.flac"})',
      f'test_sampler_keeps_bad: 1 skipped: empty or all-zero audio (e.g. {tmp_path / "silent.wav"})',
      f'test_sampler_keeps_bad: 1 skipped: empty text or transcript (e.g. {tmp_path / "tone.wav"})']
  assert lines[-1] == bad_input.FIX
  # Counted in LOG when batches take them, not here as well.
  assert not [k for k in bad_input.LOG.counts() if k[0] == 'test_sampler_keeps_bad']
  s = sampler('test_sampler_keeps_one_good')
  try:
    assert 'paired 2 examples' in s.fill_feature_cache()
    batch = next(s)['paired']
    assert batch['feature_paddings'].shape[0] == 2
  finally:
    s.close()
    bad_input.LOG.reset()


def test_tfds_source_reencodes_decoded_audio(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  clips = [np.round(toy_corpus.tone(rng, s) * 32767).astype(np.int16) for s in (0.6, 0.9)]
  features = tfds.features.FeaturesDict({
      'speech': tfds.features.Audio(dtype=np.int16, sample_rate=16000),
      'text': tfds.features.Text()})
  tfds.dataset_builders.store_as_tfds_dataset(
      name='toy_speech_ds', version='1.0.0', features=features, data_dir=str(tmp_path),
      split_datasets={'train': [(i, {'speech': c, 'text': 'abc'}) for i, c in enumerate(clips)]})
  registry.add_task('test_tfds', kind='paired', language='aa', source=sources.tfds_dataset(
      'toy_speech_ds', audio_key='speech', transcript_key='text', language='aa',
      data_dir=str(tmp_path)))
  assert registry.task_size('test_tfds') == 2
  kept = sorted(_examples('test_tfds').values(), key=lambda ex: ex['features'].shape[0])
  config = audio.FeatureConfig()
  for ex, clip in zip(kept, clips):
    want = audio.log_mel(clip.astype(np.float32) / 32768, config).numpy()
    np.testing.assert_allclose(ex['features'], want, atol=1e-3)
    assert registry.SHARED_VOCABULARY.loaded.decode(ex['ids']) == 'abc'


def _stream_records(source):
  """The source's records as its tf.data stream yields them, by id."""
  return {ex['id']: ex for ex in source.get_dataset('train', shuffle=False).as_numpy_iterator()}


def test_random_access_reads_the_records_of_the_stream(tmp_path):
  """reader[i] for every i equals the tf.data stream, for each file-based source."""
  rng = np.random.default_rng(5)
  for f in range(2):
    _write_records(str(tmp_path / f'r{f}.tfrecord'),
                   [(f'ex{f}_{i}', rng.bytes(int(rng.integers(0, 300))), f'text {i}')
                    for i in range(7)])
  (tmp_path / 'a.txt').write_bytes(b'one\r\ntwo\n\nfour')  # CRLF, empty, no final newline
  (tmp_path / 'b.txt').write_bytes(b'five\n')
  sf.write(str(tmp_path / 'c.flac'), toy_corpus.tone(rng, 0.5), 16000)
  (tmp_path / 'm.tsv').write_text('c.flac\taa\tabc\nmissing.flac\taa\t\n', encoding='utf-8')
  for source in (sources.tfrecords(str(tmp_path / 'r*.tfrecord')),
                 sources.text_lines(str(tmp_path / '*.txt'), 'aa'),
                 sources.manifest(str(tmp_path / 'm.tsv'))):
    reader = source.random_access('train')
    want = _stream_records(source)
    got = {reader[i]['id']: reader[i] for i in range(len(reader))}
    assert len(reader) == len(want) == source.count_examples('train')
    assert set(got) == set(want)
    for ex_id, record in want.items():
      for key, value in record.items():
        assert got[ex_id][key] == value, (type(source).__name__, ex_id, key)
    with pytest.raises(IndexError):
      reader[len(reader)]


def test_reads_from_tf_data_threads_open_each_file_once(tmp_path, monkeypatch):
  """The sampler reads records inside tf.numpy_function, on tf.data's threads, where each
  call gets a fresh Python thread state: the open files must outlive the call (a
  threading.local cache reopened every file at every batch)."""
  folder = tmp_path / 'text'
  folder.mkdir()
  for name in ('a', 'b'):
    (folder / f'{name}.txt').write_text(''.join(f'{name}{n}\n' for n in range(10)),
                                        encoding='utf-8')
  reader = sources.text_lines(str(folder / '*.txt'), 'aa').random_access('train')
  opened = []
  real_path = sources.paths.path

  def counting_path(name):
    path = real_path(name)
    return type('Counted', (), {'open': lambda _, mode: opened.append(name) or path.open(mode)})()

  monkeypatch.setattr(sources.paths, 'path', counting_path)

  def read_all(_):
    return np.array([reader[i]['text'] for i in range(len(reader))], dtype=object)

  calls = 12
  ds = tf.data.Dataset.range(calls).map(
      lambda n: tf.numpy_function(read_all, [n], tf.string, stateful=False)).prefetch(1)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == calls
  assert batches[0].tolist() == [f'{name}{n}'.encode() for name in 'ab' for n in range(10)]
  # One prefetch thread runs the map: each file opened once there, not once per call.
  assert sorted(set(opened)) == sorted(reader.files) and len(opened) <= 2 * len(reader.files)


def test_the_files_of_threads_that_ended_are_closed(tmp_path):
  """Handles are kept per thread; a thread's are closed once it has ended and another
  thread starts reading, so restarted pipelines do not pile up open files."""
  import threading  # pylint: disable=g-import-not-at-top
  if not os.path.isdir('/proc/self/task'):
    pytest.skip('needs /proc/self/task (Linux) to tell which threads have ended')
  for name in ('a', 'b'):
    (tmp_path / f'{name}.txt').write_text('x\ny\n', encoding='utf-8')
  reader = sources.text_lines(str(tmp_path / '[ab].txt'), 'aa').random_access('train')

  def read_all():
    assert [reader[i]['text'] for i in range(len(reader))] == [b'x', b'y'] * 2

  thread = threading.Thread(target=read_all)
  thread.start()
  thread.join()
  # join() returns once Python has let go of the thread, which can be a moment
  # before the OS removes it from /proc/self/task (CI under load saw that).
  deadline = time.monotonic() + 120
  while os.path.exists(f'/proc/self/task/{thread.native_id}') and time.monotonic() < deadline:
    time.sleep(0.01)
  ended = [h for handles in reader._open._by_thread.values() for h in handles.values()]
  assert len(ended) == reader._open.count() == 2 and not any(h.closed for h in ended)
  read_all()  # this thread's first read: the ended thread's files are closed
  assert all(h.closed for h in ended) and reader._open.count() == 2
  read_all()  # the same thread again: no new handles
  assert reader._open.count() == 2


def test_a_truncated_tfrecord_is_reported_with_its_path(tmp_path):
  path = tmp_path / 'cut.tfrecord'
  _write_records(str(path), [('a', b'x' * 100, 'abc'), ('b', b'y' * 100, 'abc')])
  path.write_bytes(path.read_bytes()[:-30])
  with pytest.raises(ValueError, match='cut.tfrecord: the last TFRecord is truncated'):
    sources.tfrecords(str(path)).random_access('train')


def test_a_non_utf8_manifest_names_its_path_and_line(tmp_path):
  manifest = tmp_path / 'latin1.tsv'
  manifest.write_bytes('a.flac\taa\tabc\nb.flac\taa\tcaf\u00e9\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'latin1.tsv:2: not UTF-8 \(byte 0xe9 at column 14\).*'
                     'iconv'):
    sources.ManifestSource.read_manifest(str(manifest))


@pytest.mark.parametrize('feature_cache_mb', [0.0, 256.0])
def test_the_sampler_keeps_a_skipped_example_as_an_empty_row(tmp_path, feature_cache_mb):
  """A batch's rows never shift: bad examples are all padding, counted in the report;
  decoded at every reading or served from memory (DataConfig.feature_cache_mb)."""
  from mslam_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  flac = toy_corpus.flac_bytes(toy_corpus.tone(rng, 0.8))
  rows = [('good1', flac, 'abc'), ('garbage', rng.bytes(3000), 'abc'), ('good2', flac, 'def'),
          ('long_text', flac, 'abcdefgh abcdefgh')]
  path = str(tmp_path / 'mixed.tfrecord')
  _write_records(path, rows)
  registry.add_task('test_blank_paired', kind='paired', language='aa',
                    source=sources.tfrecords(path))
  batch = BatchConfig(speech_batch_size=2, text_batch_size=2, paired_batch_size=4,
                      paired_frames=LIMITS['features'], paired_text_length=LIMITS['ids'])
  config = sampler_lib.DataConfig(task_modules=(), paired_tasks=('test_blank_paired',),
                                  vocabulary_path=registry.SHARED_VOCABULARY.path,
                                  feature_cache_mb=feature_cache_mb)
  s = sampler_lib.ThreeStreamSampler(batch, config, parts=('paired',), shard_index=0,
                                     num_shards=1, with_metadata=True)
  part = next(s)['paired']
  assert s.cached_kinds() == (['paired'] if feature_cache_mb else [])
  s.close()
  by_id = {i.decode(): n for n, i in enumerate(part['id'])}
  assert sorted(by_id) == sorted(r[0] for r in rows)  # one epoch, every record has its row
  for name in ('garbage', 'long_text'):
    row = by_id[name]
    assert np.all(part['feature_paddings'][row] == 1) and np.all(part['id_paddings'][row] == 1)
    assert not part['features'][row].any() and not part['ids'][row].any()
  for name in ('good1', 'good2'):
    assert part['id_paddings'][by_id[name]][:3].tolist() == [0, 0, 0]
  assert bad_input.LOG.examples('test_blank_paired', Problem.UNREADABLE_AUDIO) == ['garbage']
  assert bad_input.LOG.examples('test_blank_paired', Problem.TOO_LONG_TEXT) == ['long_text']
