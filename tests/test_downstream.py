"""Downstream evaluations on the tiny export: each trains, lowers its loss, and scores."""

import json
import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import mslam_jax
import toy_corpus
from mslam_jax import trainer
from mslam_jax.downstream import asr, backbone as backbone_lib, data, decoder, engine
from mslam_jax.downstream import metrics, retrieval, speech_classification, suite, translation

REPO = mslam_jax.REPO_ROOT
TIMEOUT_S = 1500  # generous: a shared CI machine may be several times oversubscribed
TINY_DECODER = decoder.DecoderConfig(num_layers=1, d_model=32, num_heads=2, ffn_dim=64,
                                     dropout_rate=0.0)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('downstream_corpus'))
  toy_corpus.write_downstream(root)
  return root


@pytest.fixture(scope='module')
def splits(corpus):
  source = data.corpus_speech_source(corpus)
  return {s: data.load_speech(source, s) for s in data.SPLITS}


@pytest.fixture(scope='module')
def export_backbone(tiny_run):
  return backbone_lib.MslamBackbone(mslam_jax.load_encoder(tiny_run[1]))


def _config(tmp_path, **kw):
  base = dict(model_dir=str(tmp_path / 'ft'), train_steps=12, batch_size=8, learning_rate=3e-3,
              warmup_steps=1, log_every=6, save_every=100, eval_batch_size=8)
  base.update(kw)
  return engine.FinetuneConfig(**base)


def _summary(evaluation, scores):
  return suite.summary({'evaluation': evaluation.name, 'backbone': 'mslam',
                        'freeze_encoder': False, 'train_steps': 12, 'wall_s': 1.0,
                        'test': scores})


def _loss_before_after(evaluation, backbone, config):
  """Loss of one fixed batch (the first 8 training items) before and after fitting."""
  evaluation.prepare(backbone)
  batch = evaluation.train_batch(np.arange(min(8, evaluation.num_train)))
  head = engine.init_head(evaluation, config.seed)
  rng = jax.random.key(0)
  before, _ = evaluation.loss(head, backbone.params, batch, rng, True)
  state = engine.fit(evaluation, backbone, config)
  after, _ = evaluation.loss(state.params['head'], state.params['encoder'], batch, rng, True)
  return float(before), float(after), state


def test_loader_reads_speech_translation_records(splits):
  assert {s: len(v) for s, v in splits.items()} == {'train': 18, 'dev': 9, 'test': 9}
  ex = splits['train'][0]
  assert ex.language == 'aa' and ex.english and ex.transcript and ex.waveform.ndim == 1


def test_evaluation_batches_report_progress(capsys):
  assert [list(r) for r in engine.in_batches(5, 2)] == [[0, 1], [2, 3], [4]]
  covered = [i for rows in engine.in_batches(7, 3, 'translating test', every_s=0.0)
             for i in rows]
  assert covered == list(range(7))
  lines = capsys.readouterr().out.splitlines()
  # A line after every batch but the last, each with an ETA.
  assert [line.split(',')[0] for line in lines] == ['translating test: 1/3 batches',
                                                     'translating test: 2/3 batches']
  assert all('eta=' in line for line in lines)
  list(engine.in_batches(7, 3, 'quiet'))  # the default interval: too fast to print
  assert capsys.readouterr().out == ''


def test_batches_depend_on_the_step_only():
  a = [engine.batch_indices(10, 4, 0, s) for s in range(5)]
  assert [engine.batch_indices(10, 4, 0, s).tolist() for s in range(5)] == [x.tolist() for x in a]
  first_epoch = np.concatenate(a)[:10]
  assert sorted(first_epoch.tolist()) == list(range(10))  # every item once per epoch


@pytest.mark.parametrize('freeze', [True, False])
def test_language_id_learns_and_scores(splits, export_backbone, tmp_path, freeze):
  evaluation = speech_classification.LanguageId(splits, eval_batch_size=8)
  before, after, state = _loss_before_after(evaluation, export_backbone,
                                            _config(tmp_path, freeze_encoder=freeze))
  assert after < before
  encoder_moved = any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(state.params['encoder']), jax.tree.leaves(export_backbone.params)))
  assert encoder_moved == (not freeze)
  scores = evaluation.evaluate(state.params['head'], state.params['encoder'], 'test')
  assert scores['num_examples'] == 9 and scores['classes'] == ['aa', 'bb', 'cc']
  assert np.sum(scores['confusion']) == 9
  with open(os.path.join(str(tmp_path / 'ft'), 'metrics.jsonl'), encoding='utf-8') as f:
    logged = [json.loads(line) for line in f]
  assert logged[-1]['step'] == 12 and 'accuracy' in logged[-1]


def test_scoring_says_what_it_prepares_before_it_works(splits, export_backbone, tmp_path,
                                                       capsys):
  """A frozen export's probe first encodes every item once (PrecomputedSpeech): a line says
  so while it works, and how long it took."""
  evaluation = speech_classification.LanguageId(splits, eval_batch_size=8)
  scores = engine.run_and_score(evaluation, export_backbone,
                                _config(tmp_path, freeze_encoder=True, train_steps=0),
                                splits=('test',))
  lines = capsys.readouterr().out.splitlines()
  items = len(splits['train']) + len(splits['dev']) + len(splits['test'])
  assert lines[0] == f'language_id: preparing {items} items (features and frozen encodings)...'
  assert lines[1].startswith('language_id: prepared in ') and lines[1].endswith('s')
  # The frozen copy still says which export's weights it holds.
  manifest = export_backbone.encoder.manifest
  assert scores['backbone_origin'] == {'step': manifest['step'], 'source': manifest['source']}


def test_sigterm_saves_the_head_and_writes_no_scores_then_a_rerun_resumes(
    splits, export_backbone, tmp_path, monkeypatch, capsys):
  """A fine-tuning stopped by SIGTERM must not score its half-trained head: it saves and
  exits (trainer.Preempted, code 0); the same call again resumes and scores."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are installed from the main thread only')
  batches_from = engine.batches_from

  def signalled(evaluation, config, start_step):
    for i, batch in enumerate(batches_from(evaluation, config, start_step)):
      if start_step == 0 and i == 5:  # while the sixth batch is fetched
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(engine, 'batches_from', signalled)
  config = _config(tmp_path, freeze_encoder=True)
  evaluation = speech_classification.LanguageId(splits, eval_batch_size=8)
  with pytest.raises(trainer.Preempted) as stop:
    engine.run_and_score(evaluation, export_backbone, config, splits=('test',))
  assert (stop.value.code, stop.value.step) == (0, 6)
  assert not os.path.exists(os.path.join(config.model_dir, 'scores.json'))
  out = capsys.readouterr().out
  assert ('SIGTERM: saved step 6; exiting (6 of 12 steps done: the same command resumes from '
          'there)') in out and 'language_id: stopped at step 6, no scores written' in out
  scores = engine.run_and_score(speech_classification.LanguageId(splits, eval_batch_size=8),
                                export_backbone, config, splits=('test',))
  assert 'language_id: resuming from step 6' in capsys.readouterr().out
  assert scores['train_steps'] == 12 and scores['test']['num_examples'] == 9
  assert os.path.exists(os.path.join(config.model_dir, 'scores.json'))


def test_frozen_backbone_precomputes_the_same_encodings(splits, export_backbone):
  """Probes read encodings computed once; they equal the live encoder's, padding and all."""
  frozen = export_backbone.frozen()
  waves = [e.waveform for e in splits['dev'][:5]]
  live_inputs = export_backbone.speech_inputs(waves)
  batch = engine.speech_batch(live_inputs, 8)
  live, live_paddings = jax.jit(export_backbone.speech)(
      export_backbone.params, batch['features'], batch['feature_paddings'])
  encodings = frozen.speech_inputs(waves)
  assert encodings[0].shape[1] == export_backbone.dim
  for row, x in enumerate(encodings):
    valid = int(np.sum(np.asarray(live_paddings[row]) < 0.5))
    assert len(x) == valid
    np.testing.assert_allclose(x, np.asarray(live[row, :valid]), rtol=1e-4, atol=1e-4)
  same = engine.speech_batch(encodings, 8)
  out, out_paddings = frozen.speech(frozen.params, same['features'], same['feature_paddings'])
  np.testing.assert_array_equal(out, same['features'])
  # The encoder's paddings are the frontend's; the identity keeps them (up to bucket length).
  n = min(out_paddings.shape[1], live_paddings.shape[1])
  np.testing.assert_array_equal(out_paddings[:, :n], np.asarray(live_paddings)[:, :n])
  # Text still runs the encoder.
  ids = engine.ids_batch(export_backbone.text_ids(['abc', 'de']), 2)
  np.testing.assert_allclose(
      frozen.text(frozen.params, ids['ids'], ids['id_paddings'])[0],
      export_backbone.text(export_backbone.params, ids['ids'], ids['id_paddings'])[0],
      rtol=1e-5, atol=1e-5)


def test_asr_ctc_learns_and_scores(splits, export_backbone, tmp_path):
  evaluation = asr.Asr(splits, eval_batch_size=8)
  before, after, state = _loss_before_after(evaluation, export_backbone, _config(tmp_path))
  assert after < before
  scores = evaluation.evaluate(state.params['head'], state.params['encoder'], 'dev')
  hyps = evaluation.transcribe(state.params['head'], state.params['encoder'], 'dev')
  refs = [e.transcript for e in splits['dev']]
  assert scores['cer'] == metrics.error_rates(hyps, refs)['cer']
  assert f'CER {scores["cer"]:.3f}' in _summary(evaluation, scores)


def test_ctc_greedy_merges_repeats_and_drops_blanks():
  assert asr.ctc_greedy(np.array([5, 5, 0, 5, 6, 6, 0, 0, 7]), 9) == [5, 5, 6, 7]
  assert asr.ctc_greedy(np.array([5, 0, 6, 7]), 2) == [5]  # padded frames ignored


@pytest.mark.parametrize('multimodal', [False, True])
def test_translation_learns_and_scores_with_sacrebleu(splits, corpus, export_backbone,
                                                      tmp_path, multimodal):
  pairs = data.corpus_text_pairs(corpus, 'train') if multimodal else None
  evaluation = translation.Translation(splits, decoder_config=TINY_DECODER, text_pairs=pairs,
                                       beam_size=2, eval_batch_size=8)
  before, after, state = _loss_before_after(evaluation, export_backbone, _config(tmp_path))
  assert after < before
  head, enc = state.params['head'], state.params['encoder']
  # Every training step has one shape (one compile), whatever items it draws.
  order = np.argsort([len(f) for f in evaluation.features['train']])
  shapes = {repr(jax.tree.map(np.shape, evaluation.train_batch(rows, step)))
            for step, rows in enumerate([order[:8], order[-8:], order[4:12]])}
  assert len(shapes) == 1, shapes  # the shortest and the longest items alike
  if multimodal:
    batch = evaluation.train_batch(np.arange(8))
    assert batch['text']['ids'].shape[0] == batch['speech']['features'].shape[0]
    limit = max(len(ids) for ids in evaluation.sources['train'])
    assert max(len(ids) for ids in evaluation.text_sources) <= translation.bucket_length(
        limit, 8)
  scores = evaluation.evaluate(head, enc, 'test')
  hyps = evaluation.translate(head, enc, 'test', modality='speech', beam=True)
  refs = [e.english for e in evaluation.splits['test']]
  import sacrebleu  # pylint: disable=g-import-not-at-top
  assert scores['bleu'] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert ('text' if multimodal else 'text_zero_shot') in scores
  assert f'test: BLEU {scores["bleu"]:.1f}' in _summary(evaluation, scores)
  assert scores['bleu_signature'].startswith('nrefs:1')


def test_retrieval_scores_both_directions(splits, export_backbone):
  evaluation = retrieval.Retrieval(splits, eval_batch_size=8)
  evaluation.prepare(export_backbone)
  scores = evaluation.evaluate({}, export_backbone.params, 'test')
  speech, text = evaluation.embeddings(export_backbone.params, 'test')
  assert speech.shape == text.shape == (9, export_backbone.dim)
  want = metrics.retrieval_recall(speech - speech.mean(0), text - text.mean(0))
  assert scores['speech_to_text_recall@1'] == want['recall@1']
  assert scores['uncentred_speech_to_text_recall@5'] == metrics.retrieval_recall(
      speech, text)['recall@5']
  assert scores['chance@1'] == pytest.approx(1 / 9)
  assert 'speech->text R@1' in _summary(evaluation, scores)


def test_retrieval_centring_removes_a_shared_hub(splits, monkeypatch):
  """Planted pairs under a large shared offset: uncentred recall is the hub's 1/n, centred 1.0."""
  evaluation = retrieval.Retrieval(splits, eval_batch_size=8)
  rng = np.random.default_rng(0)
  n = len(splits['test'])
  distinct = rng.normal(size=(n, 16))
  hub = np.ones(16)
  # Speech barely varies around the shared vector; then the text keys' own spread decides
  # every uncentred ranking alike (the same key on top for every query).
  speech = hub + 1e-4 * distinct
  text = hub + 0.01 * (distinct + 0.1 * rng.normal(size=(n, 16)))
  monkeypatch.setattr(evaluation, 'embeddings', lambda params, split: (speech, text))
  scores = evaluation.evaluate({}, {}, 'test')
  assert scores['speech_to_text_recall@1'] == scores['text_to_speech_recall@1'] == 1.0
  assert scores['uncentred_speech_to_text_recall@1'] == pytest.approx(1 / n)


def test_logmel_baseline_stacks_frames_as_the_frontend_subsamples(splits, corpus, tmp_path):
  base = backbone_lib.make_backbone('logmel', vocabulary_path=f'{corpus}/vocab.txt')
  feats = base.speech_inputs([splits['test'][0].waveform])[0]
  x, paddings = base.speech({}, feats[None], np.zeros((1, len(feats)), np.float32))
  assert x.shape == (1, -(-len(feats) // 4), 320) and paddings.shape == x.shape[:2]
  np.testing.assert_allclose(np.asarray(x)[0, 0], feats[:4].reshape(-1), rtol=1e-6)
  normalized = backbone_lib.make_backbone('logmel_normalized',
                                          vocabulary_path=f'{corpus}/vocab.txt')
  assert not np.allclose(normalized.speech_inputs([splits['test'][0].waveform])[0], feats)
  evaluation = speech_classification.LanguageId(splits, eval_batch_size=8)
  before, after, _ = _loss_before_after(evaluation, base, _config(tmp_path))
  assert after < before


def test_unknown_characters_fail_with_a_clear_message(tmp_path, export_backbone):
  root = str(tmp_path / 'cjk')
  toy_corpus.write_downstream(root, alphabets={'zz': '漢字仮名交じり文'}, train=2, dev=1,
                              test=1)
  source = data.corpus_speech_source(root)
  splits = {s: data.load_speech(source, s) for s in data.SPLITS}
  with pytest.raises(ValueError, match='not in the backbone.s vocabulary'):
    asr.Asr(splits).prepare(export_backbone)


def test_finetune_command_resumes_and_writes_scores(tiny_run, corpus, tmp_path):
  model_dir = str(tmp_path / 'lid')
  command = [sys.executable, '-m', 'mslam_jax.finetune',
             '--gin_file=gin/downstream/language_id.gin', '--gin_file=gin/downstream/tiny.gin',
             f"--gin.EXPORT_DIR='{tiny_run[1]}'", f"--gin.MODEL_DIR='{model_dir}'",
             f"--gin.DownstreamConfig.corpus_dir='{corpus}'",
             '--gin.FinetuneConfig.save_every=4', '--gin.FinetuneConfig.log_every=4']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  subprocess.run(command + ['--gin.FinetuneConfig.train_steps=4'], check=True, cwd=REPO,
                 env=env, timeout=TIMEOUT_S)
  out = subprocess.run(command + ['--gin.FinetuneConfig.train_steps=8'], check=True, cwd=REPO,
                       env=env, timeout=TIMEOUT_S, capture_output=True, text=True).stdout
  assert 'resuming from step 4' in out and 'accuracy' in out
  scores = json.load(open(os.path.join(model_dir, 'scores.json'), encoding='utf-8'))
  assert scores['evaluation'] == 'language_id' and scores['train_steps'] == 8
  assert 0.0 <= scores['test']['accuracy'] <= 1.0
  # A line while the inputs and the frozen encodings are prepared, before training starts.
  lines = out.splitlines()
  [prepare] = [i for i, line in enumerate(lines) if line.startswith('language_id: preparing ')]
  [train] = [i for i, line in enumerate(lines) if ' training items, ' in line]
  assert prepare < train and lines[prepare + 1].startswith('language_id: prepared in ')
  items = int(lines[train].split()[1]) + scores['dev']['num_examples'] + \
      scores['test']['num_examples']
  # Fine-tuned (gin/downstream/base.gin): nothing is encoded ahead.
  assert lines[prepare] == f'language_id: preparing {items} items (features)...'
  # Which weights were probed: the export's step and source, from its manifest.
  manifest = json.load(open(os.path.join(tiny_run[1], 'manifest.json'), encoding='utf-8'))
  assert scores['backbone_origin'] == {'step': manifest['step'], 'source': manifest['source']}
  assert manifest['step'] > 0
  assert lines[train].endswith(f'(mslam at step {manifest["step"]}, fine-tuned)')


def test_probe_inputs_are_standardised_with_training_statistics(splits, export_backbone):
  evaluation = speech_classification.LanguageId(splits, eval_batch_size=8)
  evaluation.prepare(export_backbone)
  feats = evaluation.features['train']
  pooled = np.concatenate([
      np.asarray(evaluation._pooled(export_backbone.params,
                                    engine.speech_batch([feats[i] for i in rows], 8)))[:len(rows)]
      for rows in engine.in_batches(len(feats), 8)])
  np.testing.assert_allclose(pooled.mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(pooled.std(0), 1.0, atol=1e-2)
  shift, scale = engine.standardizer([np.array([[1.0, 2.0], [3.0, 2.0]])])
  np.testing.assert_allclose(shift, [2.0, 2.0])
  np.testing.assert_allclose(scale, [1.0, 1e-6], rtol=1e-5)
