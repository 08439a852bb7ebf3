"""The three-stream sampler: shapes, temperature rates, determinism, resume, hosts, user tasks."""

import collections
import glob
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import seqio
import soundfile as sf
import tensorflow as tf

import toy_corpus
from mslam_jax import special_ids
from mslam_jax.data import audio
from mslam_jax.data import registry
from mslam_jax.data import sources
from mslam_jax.data import sampler as sampler_lib
from mslam_jax.data.batch_spec import BatchConfig

BATCH = BatchConfig(speech_batch_size=4, text_batch_size=8, paired_batch_size=2,
                    speech_frames=100, text_length=12, paired_frames=160,
                    paired_text_length=24)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('toy_corpus'))
  meta = toy_corpus.write(root)
  registry.add_corpus(root, 'toy')
  return root, meta


def make(corpus, seed=0, feature_cache_mb=256.0, **kwargs):
  root, _ = corpus
  config = sampler_lib.DataConfig(task_modules=(), speech_tasks=('toy_*',),
                                  text_tasks=('toy_*',), paired_tasks=('toy_*',),
                                  vocabulary_path=os.path.join(root, 'vocab.txt'), seed=seed,
                                  feature_cache_mb=feature_cache_mb)
  kwargs.setdefault('shard_index', 0)
  kwargs.setdefault('num_shards', 1)
  return sampler_lib.ThreeStreamSampler(kwargs.pop('batch', BATCH), config, **kwargs)


def test_batches_have_the_configured_shapes_kinds_and_paddings(corpus):
  s = make(corpus, with_metadata=True)
  vocab = s.vocabulary
  for _ in range(3):
    batch = next(s)
    assert set(batch) == {'speech', 'text', 'paired'}
    sp, tx, pr = batch['speech'], batch['text'], batch['paired']
    assert sp['features'].shape == (4, 100, 80) and sp['features'].dtype == np.float32
    assert sp['feature_paddings'].shape == (4, 100)
    assert tx['ids'].shape == (8, 12) and tx['ids'].dtype == np.int32
    assert pr['features'].shape == (2, 160, 80) and pr['ids'].shape == (2, 24)
    for part, key, pad_key in ((sp, 'features', 'feature_paddings'), (tx, 'ids', 'id_paddings'),
                               (pr, 'features', 'feature_paddings'), (pr, 'ids', 'id_paddings')):
      paddings = part[pad_key]
      # Right-padded: 0 then 1, padding positions hold zeros, every example non-empty.
      assert np.all(np.diff(paddings, axis=1) >= 0) and np.all(paddings[:, 0] == 0)
      values = part[key].reshape(paddings.shape + (-1,))
      assert np.all(values[paddings == 1] == 0)
    assert {l.decode() for l in sp['language']} <= set(toy_corpus.ALPHABETS)
    assert all(i.decode().split('-')[1] == 'speech' for i in sp['id'])
    assert all(i.decode().split('-')[1] == 'paired' for i in pr['id'])
    # Paired ids spell the example's transcript in its language's alphabet.
    for ids, pad, lang in zip(pr['ids'], pr['id_paddings'], pr['language']):
      text = vocab.decode(ids[pad == 0].tolist())
      assert set(text) <= set(toy_corpus.ALPHABETS[lang.decode()] + ' ')
      assert special_ids.UNK_ID not in ids
  # Paired audio of 0.5-1.5 s fits 160 frames uncropped: valid frames match its length.
  frames = (1 - pr['feature_paddings']).sum(axis=1)
  assert np.all((frames >= audio.num_frames(8000, audio.FeatureConfig())) & (frames <= 160))


def test_parts_selects_streams(corpus):
  batch = next(make(corpus, parts=('speech',)))
  assert set(batch) == {'speech'}


def test_language_shares_match_temperature_rates(corpus):
  """Text languages over 2,560 draws vs n_i^(1/3) / sum: within 4.5 binomial sigmas."""
  _, meta = corpus
  sizes = {lang: v['examples'] for lang, v in meta['kinds']['text']['train'].items()}
  weights = {lang: n ** (1 / 3) for lang, n in sizes.items()}
  want = {lang: w / sum(weights.values()) for lang, w in weights.items()}
  batch = BatchConfig(**{**BATCH.__dict__, 'text_batch_size': 64})
  s = make(corpus, parts=('text',), with_metadata=True, batch=batch)
  assert s.rates()['text'] == pytest.approx({f'toy_text_{l}': p for l, p in want.items()})
  counts = collections.Counter()
  for _ in range(40):
    counts.update(l.decode() for l in next(s)['text']['language'])
  n = sum(counts.values())
  proportional = {lang: v / sum(sizes.values()) for lang, v in sizes.items()}
  for lang, p in want.items():
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(counts[lang] / n - p) < 4.5 * sigma, (lang, counts, want)
  # T = 3 is measurably flatter than sampling in proportion to size (T = 1).
  assert abs(counts['aa'] / n - proportional['aa']) > 10 * np.sqrt(0.25 / n)


def test_a_language_split_over_two_tasks_keeps_its_language_share(corpus, tmp_path):
  """Languages follow n_l^(1/3) over 2,560 draws when 'aa' has a second text task.

  Sampling tasks instead would raise 'aa' to two task shares: the rates show it.
  """
  root, meta = corpus
  sizes = {lang: v['examples'] for lang, v in meta['kinds']['text']['train'].items()}
  extra = ['abc de', 'fgh', 'hg fe dc', 'ab', 'ef gh', 'cd ab', 'a b c', 'hh', 'ge', 'fa'] * 2
  path = tmp_path / 'aa_more.txt'
  path.write_text('\n'.join(extra) + '\n', encoding='utf-8')
  registry.add_task('toy2_text_aa', kind='text', language='aa',
                    source=sources.text_lines(str(path), "aa"), size=len(extra))
  sizes['aa'] += len(extra)
  weights = {lang: n ** (1 / 3) for lang, n in sizes.items()}
  want = {lang: w / sum(weights.values()) for lang, w in weights.items()}
  batch = BatchConfig(**{**BATCH.__dict__, 'text_batch_size': 64})
  config = sampler_lib.DataConfig(task_modules=(), text_tasks=('toy_*', 'toy2_*'),
                                  vocabulary_path=os.path.join(root, 'vocab.txt'))
  s = sampler_lib.ThreeStreamSampler(batch, config, parts=('text',), shard_index=0,
                                     num_shards=1, with_metadata=True)
  rates = s.rates()['text']
  assert rates['toy_text_aa'] + rates['toy2_text_aa'] == pytest.approx(want['aa'])
  assert rates['toy2_text_aa'] / rates['toy_text_aa'] == pytest.approx(len(extra) / 40)
  counts = collections.Counter()
  for _ in range(40):
    counts.update(l.decode() for l in next(s)['text']['language'])
  n = sum(counts.values())
  for lang, p in want.items():
    assert abs(counts[lang] / n - p) < 4.5 * np.sqrt(p * (1 - p) / n), (lang, counts, want)
  by_task = registry.mixture('text', ('toy_*', 'toy2_*'), 3.0, name='by_task', mix_by='task')
  task_rates = {t.name: by_task.get_rate(t) for t in by_task.tasks}
  aa_by_task = (task_rates['toy_text_aa'] + task_rates['toy2_text_aa']) / sum(task_rates.values())
  assert aa_by_task > want['aa'] + 0.05


def test_language_rates_closed_form():
  rates = registry.language_temperature_rates(
      {'x1': 600, 'x2': 400, 'y': 10, 'z': 0}, {'x1': 'x', 'x2': 'x', 'y': 'y', 'z': 'z'}, 3.0)
  p_x = 10 / (10 + 10 ** (1 / 3))
  assert rates == pytest.approx({'x1': 0.6 * p_x, 'x2': 0.4 * p_x, 'y': 1 - p_x})
  with pytest.raises(ValueError, match='mix_by'):
    registry.mixture('text', mix_by='corpus')


def test_temperature_rates_closed_form():
  rates = registry.temperature_rates({'a': 1000, 'b': 10, 'c': 0}, temperature=3.0)
  assert rates == pytest.approx({'a': 10 / (10 + 10 ** (1 / 3)), 'b': 10 ** (1 / 3) / (
      10 + 10 ** (1 / 3))})
  assert registry.temperature_rates({'a': 3, 'b': 1}, 1.0) == pytest.approx({'a': .75, 'b': .25})
  with pytest.raises(ValueError):
    registry.temperature_rates({'a': 1}, 0.0)


def _take(s, n):
  return [next(s) for _ in range(n)]


def _assert_same(a, b):
  for x, y in zip(a, b):
    for kind in x:
      for key in x[kind]:
        np.testing.assert_array_equal(x[kind][key], y[kind][key], err_msg=f'{kind}/{key}')


def test_deterministic_for_a_seed_and_restored_state_gives_the_same_next_batches(corpus):
  first = make(corpus, with_metadata=True)
  _take(first, 3)
  state = json.loads(json.dumps(first.state()))  # it goes to disk as JSON
  assert state['examples'] == {'speech': 12, 'text': 24, 'paired': 6}
  expected = _take(first, 4)
  restored = make(corpus, with_metadata=True)
  restored.load_state(state)
  _assert_same(expected, _take(restored, 4))
  fresh = make(corpus, with_metadata=True)
  _assert_same(expected, _take(fresh, 7)[3:])
  other_seed = next(make(corpus, seed=1, with_metadata=True))
  assert list(other_seed['text']['id']) != list(expected[0]['text']['id']) or list(
      other_seed['speech']['id']) != list(expected[0]['speech']['id'])


def test_audio_served_from_memory_gives_the_batches_of_decoding_each_time(corpus):
  """DataConfig.feature_cache_mb: the speech and paired examples are decoded once and
  served from memory after. Over several epochs (21 speech records, 4 a batch) the
  batches and their metadata equal those of decoding at every reading, also after a
  resume, and a cropped example is still counted at every reading."""
  from mslam_jax.data import bad_input  # pylint: disable=g-import-not-at-top
  results = {}
  for cache_mb in (0.0, 256.0, 0.001):  # off; on; too small for the toy corpus
    bad_input.LOG.reset()
    s = make(corpus, feature_cache_mb=cache_mb, with_metadata=True)
    batches = _take(s, 10)
    resumed = make(corpus, feature_cache_mb=cache_mb, with_metadata=True)
    resumed.load_state(s.state())
    batches += _take(resumed, 6)
    results[cache_mb] = (batches, bad_input.LOG.total(bad_input.Problem.CROPPED_AUDIO),
                         s.cached_kinds())
    s.close()
    resumed.close()
  bad_input.LOG.reset()
  (off, _, off_kinds), (on, on_cropped, on_kinds), (small, _, small_kinds) = (
      results[0.0], results[256.0], results[0.001])
  assert off_kinds == [] and sorted(on_kinds) == ['paired', 'speech'] and small_kinds == []
  _assert_same(off, on)
  _assert_same(off, small)
  # Cropped speech has no padding left. The count includes rows read ahead, so it is
  # at least the readings consumed, which exceed the distinct records read.
  cropped = [i for b in on for i, p in zip(b['speech']['id'], b['speech']['feature_paddings'])
             if not p.any()]
  assert len(cropped) > len(set(cropped)) and on_cropped >= len(cropped)


def test_fill_feature_cache_says_what_is_held_in_memory(corpus):
  """train.py fills the cache before the first step and prints what it holds: the
  record counts of the toy corpus (21 speech, 21 paired), at most the static limit's
  bytes for cropped speech, and the kinds that did not fit; nothing when it is off."""
  held = make(corpus)
  line = held.fill_feature_cache()
  match = re.fullmatch(r'input held in memory: speech 21 examples \(([\d.]+) MB\), paired 21 '
                       r'examples \(([\d.]+) MB\), decoded once in [\d.]+ s '
                       r'\(DataConfig.feature_cache_mb = 256\)', line)
  assert match, line
  speech_limit = 21 * (BATCH.speech_frames * 80 * 4 + 1024) / 2**20  # features + names
  assert 0 < float(match.group(1)) <= speech_limit and float(match.group(2)) > 0
  assert sorted(held.cached_kinds()) == ['paired', 'speech']
  assert held.fill_feature_cache() == line  # filled once
  held.close()
  assert make(corpus, feature_cache_mb=0.001).fill_feature_cache() == (
      'input decoded at every reading: speech, paired '
      '(larger than DataConfig.feature_cache_mb = 0.001)')
  assert make(corpus, feature_cache_mb=0.0).fill_feature_cache() is None
  assert make(corpus, parts=('text',)).fill_feature_cache() is None


def _global_batches(corpus, hosts, count, state=None, batch=BATCH):
  """`count` global batches read by `hosts` samplers, rows concatenated in host order."""
  samplers = [make(corpus, shard_index=h, num_shards=hosts, with_metadata=True, batch=batch)
              for h in range(hosts)]
  for s in samplers:
    if state is not None:
      s.load_state(state)
  out = []
  for _ in range(count):
    parts = [next(s) for s in samplers]
    out.append({kind: {key: np.concatenate([p[kind][key] for p in parts])
                       for key in parts[0][kind]} for kind in parts[0]})
  return out, samplers[0].state()


def test_the_data_position_is_independent_of_the_host_count(corpus):
  """1 host for 3 batches, then 2 hosts from its state = 1 host throughout (and 2 -> 1).

  Each host holds only its rows, and the examples of a global batch do not
  depend on how many hosts read it.
  """
  uninterrupted, _ = _global_batches(corpus, 1, 6)
  first, state = _global_batches(corpus, 1, 3)
  _assert_same(uninterrupted[:3], first)
  rest, later = _global_batches(corpus, 2, 3, state=state)
  _assert_same(uninterrupted[3:], rest)
  # And back: a state written by 2 hosts resumes on 1.
  _, state_of_two = _global_batches(corpus, 2, 4)
  rest, _ = _global_batches(corpus, 1, 2, state=state_of_two)
  _assert_same(uninterrupted[4:], rest)
  assert later['examples'] == {'speech': 24, 'text': 48, 'paired': 12}


def test_two_hosts_see_disjoint_rows_that_cover_the_corpus(corpus):
  _, meta = corpus
  seen = [set(), set()]
  samplers = [make(corpus, shard_index=h, num_shards=2, with_metadata=True, parts=('speech',))
              for h in range(2)]
  assert samplers[0].per_host_batch_size('speech') == 2
  total = sum(v['examples'] for v in meta['kinds']['speech']['train'].values())
  for _ in range(total // 4):  # one epoch of global batches of 4
    rows = [[i.decode() for i in next(s)['speech']['id']] for s in samplers]
    assert not set(rows[0]) & set(rows[1])
    for host, ids in enumerate(rows):
      seen[host].update(ids)
  assert len(seen[0] | seen[1]) >= 0.9 * total  # the mixture interleaves languages by rate
  with pytest.raises(ValueError, match='does not split over the 3 hosts'):
    make(corpus, shard_index=0, num_shards=3, parts=('speech',))


def test_resume_with_another_batch_size_continues_from_the_same_example(corpus):
  parts = ('text',)
  s = make(corpus, parts=parts, with_metadata=True)
  ids = [i for _ in range(4) for i in next(s)['text']['id']]  # 4 batches of 8
  head = make(corpus, parts=parts, with_metadata=True)
  next(head)  # 8 examples
  bigger = make(corpus, parts=parts, with_metadata=True,
                batch=BatchConfig(**{**BATCH.__dict__, 'text_batch_size': 16}))
  bigger.load_state(head.state())
  assert list(next(bigger)['text']['id']) == ids[8:24]


def test_a_position_for_other_tasks_is_refused_with_what_differs(corpus):
  s = make(corpus)
  next(s)
  state = s.state()
  with pytest.raises(sampler_lib.DataPositionMismatchError, match='seed'):
    make(corpus, seed=5).load_state(state)
  state['plans']['text']['tasks'][0][1] += 1  # the task grew
  with pytest.raises(sampler_lib.DataPositionMismatchError, match='text'):
    make(corpus).load_state(state)


def test_user_task_module_joins_the_mixture(corpus, tmp_path):
  module = toy_corpus.write_user_task_module(str(tmp_path), ['abc abc', 'abd'])
  root, _ = corpus
  config = sampler_lib.DataConfig(task_modules=(), vocabulary_path=os.path.join(root, 'vocab.txt'),
                                  text_tasks=('toy_*', 'user_*'))
  s = sampler_lib.ThreeStreamSampler(BATCH, config, parts=('text',), shard_index=0,
                                     num_shards=1, with_metadata=True,
                                     extra_task_modules=[str(module)])
  assert 'user_text_zz' in s.rates()['text']
  languages = collections.Counter()
  for _ in range(10):
    languages.update(l.decode() for l in next(s)['text']['language'])
  assert languages['zz'] > 0


def test_the_sampler_encodes_text_as_the_seqio_task_does(corpus, tmp_path):
  """The sampler normalises, encodes and crops a whole batch of text at once (not
  example by example in tf.data): each row holds the ids of its line's NFC,
  single-spaced form (unknown characters as UNK), an over-long line a contiguous
  window of them, an empty line nothing; and the same ids as the task's seqio stream."""
  from mslam_jax.data import bad_input  # pylint: disable=g-import-not-at-top
  from mslam_jax.data import vocabulary  # pylint: disable=g-import-not-at-top
  lines = ['abc   abc', 'cafe\u0301 \t a',  # 'e' + combining acute; tabs and spaces
           'abcdefgh abcdefgh', '', 'ab\u2603c']  # over the 12-character limit; empty; unknown
  module = toy_corpus.write_user_task_module(str(tmp_path), lines)
  root, _ = corpus
  config = sampler_lib.DataConfig(task_modules=(), vocabulary_path=os.path.join(root, 'vocab.txt'),
                                  text_tasks=('user_*',))
  bad_input.LOG.reset()
  s = sampler_lib.ThreeStreamSampler(BATCH, config, parts=('text',), shard_index=0,
                                     num_shards=1, with_metadata=True,
                                     extra_task_modules=[str(module)])
  text = next(s)['text']
  s.close()
  vocab = s.vocabulary
  want = {n + 1: vocab.encode(vocabulary.normalize_text(line)) for n, line in enumerate(lines)}
  assert len(want[2]) == len('caf\u00e9 a')  # the normalisation is not a no-op here
  assert special_ids.UNK_ID in want[5]
  seqio_ids = {ex['id'].decode(): ex['ids'].tolist() for ex in seqio.get_mixture_or_task(
      'user_text_zz').get_dataset({'ids': BATCH.text_length}, split='train', shuffle=False,
                                  num_epochs=1).as_numpy_iterator()}
  assert len(text['id']) == BATCH.text_batch_size > len(lines)  # every line, some twice
  for example_id, ids, paddings in zip(text['id'], text['ids'], text['id_paddings']):
    line = int(example_id.decode().rsplit(':', 1)[1])
    got = ids[paddings == 0].tolist()
    assert ids[paddings == 1].tolist() == [special_ids.PAD_ID] * int(paddings.sum())
    if line == 4:
      assert got == [] and example_id.decode() not in seqio_ids
      continue
    assert got == seqio_ids[example_id.decode()]
    if line == 3:
      full = want[3]
      assert len(got) == BATCH.text_length
      assert any(full[i:i + len(got)] == got for i in range(len(full) - len(got) + 1))
    else:
      assert got == want[line]
  unknown = {line for line, ids in want.items() if special_ids.UNK_ID in ids}
  for lines_with, problem in (({3}, bad_input.Problem.CROPPED_TEXT),
                              ({4}, bad_input.Problem.EMPTY_TEXT),
                              (unknown, bad_input.Problem.UNKNOWN_CHARS_CLEANED)):
    examples = bad_input.LOG.examples('user_text_zz', problem)
    assert {int(e.rsplit(':', 1)[1]) for e in examples} == lines_with, problem


def test_crop_starts_are_spread_evenly_over_the_windows():
  """The crop offset (a hash of the example's name) falls in [0, length - limit] and is
  about uniform there; it is 0 when the example fits."""
  from mslam_jax.data import preprocessors  # pylint: disable=g-import-not-at-top
  names = tf.constant([f'corpus/xx.txt:{n}' for n in range(6000)])
  windows = 6
  starts = preprocessors._crop_start(names, tf.fill([6000], 10 + windows - 1), 10).numpy()
  counts = np.bincount(starts, minlength=windows)
  assert len(counts) == windows
  # Binomial(6000, 1/6): sd 29; 5 sd either side.
  assert np.all(np.abs(counts - 1000) < 150), counts
  fits = preprocessors._crop_start(names[:5], tf.fill([5], 10), 10).numpy()
  assert fits.tolist() == [0] * 5


def _paired_lengths(root):
  """Log-mel frames and characters of every toy paired train example, by full decoding."""
  frames, chars = [], []
  for path in sorted(glob.glob(os.path.join(root, 'paired', 'train', '*.tfrecord'))):
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
      features = tf.train.Example.FromString(raw).features.feature
      samples = len(sf.read(io.BytesIO(features['audio'].bytes_list.value[0]))[0])
      frames.append(1 + (samples - 400) // 160)  # 25 ms windows, 10 ms hop, 16 kHz
      chars.append(len(features['transcript'].bytes_list.value[0].decode()))
  return np.array(frames), np.array(chars)


def test_paired_length_survey_warns_with_the_share_over_the_limits(corpus):
  root, _ = corpus
  frames, chars = _paired_lengths(root)
  limit = int(np.median(frames))  # about half the examples are longer
  over = int(np.sum((frames > limit) | (chars > 24)))
  batch = BatchConfig(**{**BATCH.__dict__, 'paired_frames': limit})
  warning = make(corpus, parts=('paired',), batch=batch).paired_length_warning()
  assert f'{over} of {len(frames)} surveyed examples' in warning
  assert f'paired_frames={limit}' in warning and 'paired_text_length=24' in warning
  # The suggested limits keep 99% of the surveyed examples.
  suggested = int(re.search(r'--gin.BatchConfig.paired_frames=(\d+)', warning).group(1))
  assert np.mean(frames <= suggested) >= 0.99 and suggested <= frames.max()
  # Limits that fit everything: nothing to say.
  assert make(corpus, parts=('paired',)).paired_length_warning() is None
  assert frames.max() <= BATCH.paired_frames


def test_vocabulary_larger_than_the_model_fails_at_start(corpus):
  with pytest.raises(ValueError, match='ModelConfig.vocab_size'):
    make(corpus, model_vocab_size=8)


def test_no_matching_task_names_the_fix(corpus):
  root, _ = corpus
  config = sampler_lib.DataConfig(task_modules=(), text_tasks=('nothing_*',),
                                  vocabulary_path=os.path.join(root, 'vocab.txt'))
  with pytest.raises(ValueError, match='no text task matches'):
    sampler_lib.ThreeStreamSampler(BATCH, config, parts=('text',), shard_index=0, num_shards=1)


def test_process_exits_promptly_after_sampling(corpus):
  """tf.data threads in tf.numpy_function must not hang interpreter shutdown."""
  root, _ = corpus
  script = textwrap.dedent(f'''
      from mslam_jax.data import registry, sampler
      from mslam_jax.data.batch_spec import BatchConfig
      registry.add_corpus({root!r}, 'toy')
      config = sampler.DataConfig(task_modules=(), vocabulary_path={root!r} + '/vocab.txt')
      s = sampler.ThreeStreamSampler(BatchConfig(**{BATCH.__dict__!r}), config,
                                     shard_index=0, num_shards=1)
      next(s)
      print('sampled')
  ''')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                       timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'sampled' in out.stdout


@pytest.mark.parametrize('materialize_max', [2**24, 4])  # numpy permutations, grain's index_shuffle
def test_each_epoch_of_a_task_is_a_fresh_permutation(monkeypatch, materialize_max):
  monkeypatch.setattr(sampler_lib, '_MATERIALIZE_MAX', materialize_max)
  n = 7
  order = sampler_lib._shuffled_epochs(n, seed=11)  # pylint: disable=protected-access
  epochs = [[order[e * n + i] for i in range(n)] for e in range(4)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))
  assert len({tuple(e) for e in epochs}) > 1
  again = sampler_lib._shuffled_epochs(n, seed=11)  # pylint: disable=protected-access
  assert [again[i] for i in range(4 * n)] == sum(epochs, [])
  other = sampler_lib._shuffled_epochs(n, seed=12)  # pylint: disable=protected-access
  assert [other[i] for i in range(4 * n)] != sum(epochs, [])
