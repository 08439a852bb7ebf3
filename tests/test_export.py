"""Export and load_encoder: the training-time forward, in a fresh process, at any sample rate."""

import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import librosa
import numpy as np
import pytest
import scipy.signal
import seqio
import tensorflow as tf

import mslam_jax
from mslam_jax import checkpoints, encoder as encoder_lib, export, gin_utils, optimizer
from mslam_jax import partitioning, pretrain_loss, trainer
from mslam_jax.data import audio, bad_input, registry
from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.models.config import ModelConfig
from mslam_jax.models.mslam import MSLAM

REPO = mslam_jax.REPO_ROOT
CORPUS = os.path.join(REPO, 'tasks', 'embedded_corpus')
TIMEOUT_S = 900  # generous: a shared CI machine may be several times oversubscribed


def _raw_records(lang='de', split='dev', n=3):
  """(ids, 16 kHz waveforms, transcripts) of the first n records, decoded as the pipeline does."""
  path = os.path.join(CORPUS, 'paired', split, f'{lang}.tfrecord')
  ids, waves, texts = [], [], []
  for raw in tf.data.TFRecordDataset(path).take(n):
    ex = tf.train.Example.FromString(raw.numpy()).features.feature
    wave, status = audio.decode_audio(ex['audio'].bytes_list.value[0])
    assert status == bad_input.Problem.OK
    ids.append(ex['id'].bytes_list.value[0].decode())
    waves.append(wave)
    texts.append(ex['transcript'].bytes_list.value[0].decode())
  return ids, waves, texts


def _checkpoint_params(model_dir):
  """The full MSLAM variables of the run's latest checkpoint (gin of the run parsed)."""
  model_config, loss_config, batch_config = (ModelConfig(), pretrain_loss.LossConfig(),
                                             BatchConfig())
  mesh = partitioning.make_mesh(partitioning.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
  abstract, _ = trainer.state_shardings(optimizer.make_optimizer(), mesh,
                                        partitioning.default_rules(), model_config=model_config,
                                        loss_config=loss_config, batch_config=batch_config)
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1)
  params = ckpt.restore(ckpt.latest_step(), abstract).params
  ckpt.close()
  return params


def _training_time_reference(model_dir, record_ids, lang='de', split='dev'):
  """Encoder outputs of the training pipeline's features/ids for these records.

  Features and ids come from the registered seqio task (the pre-training
  preprocessing), parameters from the run's checkpoint, and the forward is
  MSLAM.encode_speech / encode_text, padded to the tiny run's batch limits.
  """
  gin_utils.parse_gin([os.path.join(model_dir, 'config.gin')])
  try:
    model_config, batch_config = ModelConfig(), BatchConfig()
    params = _checkpoint_params(model_dir)
    registry.set_vocabulary_path(os.path.join(CORPUS, 'vocab.txt'))
    registry.add_corpus(CORPUS, prefix='exporttest')
    ds = seqio.get_mixture_or_task(f'exporttest_paired_{lang}').get_dataset(
        sequence_length=None, split=split, shuffle=False)
    by_id = {ex['id'].decode(): ex for ex in ds.as_numpy_iterator()}
    frames, chars = batch_config.paired_frames, batch_config.paired_text_length
  finally:
    gin.clear_config()
  feats = np.zeros((len(record_ids), frames, model_config.num_mel_bins), np.float32)
  feat_pad = np.ones((len(record_ids), frames), np.float32)
  ids = np.zeros((len(record_ids), chars), np.int32)
  id_pad = np.ones((len(record_ids), chars), np.float32)
  for row, rid in enumerate(record_ids):
    f, t = by_id[rid]['features'], by_id[rid]['ids']
    feats[row, :len(f)], feat_pad[row, :len(f)] = f, 0.0
    ids[row, :len(t)], id_pad[row, :len(t)] = t, 0.0
  model = MSLAM(model_config)
  speech, speech_pad = jax.jit(lambda p, f, fp: model.apply(p, f, fp, method=MSLAM.encode_speech)
                               )(params, feats, feat_pad)
  text, _ = jax.jit(lambda p, i, ip: model.apply(p, i, ip, method=MSLAM.encode_text)
                    )(params, ids, id_pad)
  return (np.asarray(speech), 1.0 - np.asarray(speech_pad), np.asarray(text), 1.0 - id_pad,
          params)


def test_export_then_load_in_a_fresh_process_gives_the_training_forward(tiny_run, tmp_path):
  model_dir, _ = tiny_run
  out = str(tmp_path / 'export')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  # Relative paths, as a user types them (orbax itself wants absolute ones).
  relative = os.path.relpath(model_dir, tmp_path)
  printed = subprocess.run([sys.executable, '-m', 'mslam_jax.export', f'--model_dir={relative}',
                            '--output=export'], check=True, cwd=str(tmp_path), env=env,
                           timeout=TIMEOUT_S, capture_output=True, text=True).stdout
  manifest = json.loads(open(os.path.join(out, 'manifest.json'), encoding='utf-8').read())
  assert manifest['step'] == 7 and manifest['format_version'] == export.FORMAT_VERSION
  # A line while it reads, then what it wrote.
  assert printed.splitlines() == [
      f'reading the encoder parameters of {relative} (the latest checkpoint)...',
      f'exported {manifest["num_params"]:,} encoder parameters (step 7) to {out}']
  assert set(os.listdir(out)) == {'params', 'config.gin', 'vocab.txt', 'manifest.json'}

  record_ids, waves, texts = _raw_records()
  inputs = str(tmp_path / 'inputs.npz')
  np.savez(inputs, *waves)
  results = str(tmp_path / 'results.npz')
  script = (
      'import json, sys, numpy as np, mslam_jax\n'
      'enc = mslam_jax.load_encoder(sys.argv[1])\n'
      'z = np.load(sys.argv[2]); waves = [z[k] for k in sorted(z, key=lambda k: int(k[4:]))]\n'
      's, sm = enc.encode_speech(waves, sample_rate=16000)\n'
      't, tm = enc.encode_text(json.loads(sys.argv[3]))\n'
      'np.savez(sys.argv[4], s=s, sm=sm, t=t, tm=tm)\n')
  subprocess.run([sys.executable, '-c', script, 'export', inputs, json.dumps(texts), results],
                 check=True, cwd=str(tmp_path), env=env, timeout=TIMEOUT_S)
  got = np.load(results)
  speech, speech_mask, text, text_mask, _ = _training_time_reference(model_dir, record_ids)
  for row in range(len(waves)):
    valid = int(speech_mask[row].sum())
    assert valid > 0 and int(got['sm'][row].sum()) == valid
    np.testing.assert_allclose(got['s'][row, :valid], speech[row, :valid], rtol=1e-4, atol=1e-4)
    chars = int(text_mask[row].sum())
    assert int(got['tm'][row].sum()) == chars == len(texts[row])
    np.testing.assert_allclose(got['t'][row, :chars], text[row, :chars], rtol=1e-4, atol=1e-4)


def test_export_holds_the_checkpoint_weights_not_a_fresh_init(tiny_run):
  model_dir, export_dir = tiny_run
  enc = mslam_jax.load_encoder(export_dir)
  *_, params = _training_time_reference(model_dir, _raw_records(n=1)[0])
  for part in export.ENCODER_PARTS:
    for got, want in zip(jax.tree.leaves(enc.params[part]), jax.tree.leaves(params['params'][part])):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  fresh = jax.tree.leaves(encoder_lib.abstract_encoder_params(enc.config))
  assert len(fresh) == len(jax.tree.leaves(enc.params))
  assert set(enc.params) == set(export.ENCODER_PARTS)  # no heads, no optimizer state


@pytest.fixture(scope='module')
def enc(tiny_run):
  return mslam_jax.load_encoder(tiny_run[1])


def test_encode_speech_resamples_8khz_input(enc):
  """8 kHz input gives the features of the same audio resampled to 16 kHz."""
  _, waves, _ = _raw_records(n=2)
  at_8k = [scipy.signal.resample_poly(w, 1, 2).astype(np.float32) for w in waves]
  # The same resampler through librosa's API: the encoder must equal it exactly.
  via_librosa = [librosa.resample(w, orig_sr=8000, target_sr=16000, res_type='soxr_hq')
                 for w in at_8k]
  got, got_mask = enc.encode_speech(at_8k, sample_rate=8000)
  want, want_mask = enc.encode_speech(via_librosa, sample_rate=16000)
  np.testing.assert_array_equal(got_mask, want_mask)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # Another resampler (scipy's polyphase filter) agrees on the log-mel channels
  # under 3.5 kHz; above 4 kHz 8 kHz audio holds nothing, and per-utterance
  # normalisation scales whatever residue each resampler leaves there.
  polyphase = [scipy.signal.resample_poly(w, 2, 1).astype(np.float32) for w in at_8k]
  bank = audio.mel_filterbank(enc.feature_config)
  bin_hz = np.linspace(0, enc.feature_config.sample_rate / 2, bank.shape[0])
  low = bin_hz[np.argmax(bank, axis=0)] < 3500
  assert 40 < low.sum() < 80
  for a, b in zip(enc.log_mel(at_8k, 8000), enc.log_mel(polyphase, 16000)):
    assert a.shape == b.shape
    err = np.abs(a[:, low] - b[:, low])
    assert np.median(err) < 0.05 and np.percentile(err, 99) < 0.5
  wrong, wrong_mask = enc.encode_speech(at_8k, sample_rate=16000)  # rate not declared
  assert wrong_mask.sum() < 0.6 * want_mask.sum()  # half the frames: it was read as 16 kHz


def test_layers_and_top_match_the_model(enc, tiny_run):
  _, waves, texts = _raw_records(n=2)
  top, _ = enc.encode_speech(waves)
  np.testing.assert_array_equal(enc.encode_speech(waves, layer=enc.num_speech_layers +
                                                  enc.num_shared_layers)[0], top)
  feats = enc.log_mel(waves)
  frames = max(len(f) for f in feats)
  x = np.zeros((2, frames, enc.config.num_mel_bins), np.float32)
  pad = np.ones((2, frames), np.float32)
  for i, f in enumerate(feats):
    x[i, :len(f)], pad[i, :len(f)] = f, 0.0
  gin_utils.parse_gin([os.path.join(tiny_run[0], 'config.gin')])
  try:
    variables = _checkpoint_params(tiny_run[0])
  finally:
    gin.clear_config()

  def n_layer(module, f, p):
    h, hp = module.frontend(f, p)
    return module.speech_layers(h, hp), hp

  want, want_pad = MSLAM(enc.config).apply(variables, x, pad, method=n_layer)
  got, mask = enc.encode_speech(waves, layer=enc.num_speech_layers)
  valid = 1.0 - np.asarray(want_pad)
  np.testing.assert_array_equal(mask, valid[:, :mask.shape[1]] > 0)
  np.testing.assert_allclose(got[mask], np.asarray(want)[:, :mask.shape[1]][mask], atol=1e-5)
  assert not np.allclose(got[mask], top[mask], atol=1e-2)

  ids = enc.text_ids(texts)
  length = max(map(len, ids))
  id_arr = np.zeros((2, length), np.int32)
  id_pad = np.ones((2, length), np.float32)
  for i, t in enumerate(ids):
    id_arr[i, :len(t)], id_pad[i, :len(t)] = t, 0.0
  emb = MSLAM(enc.config).apply(variables, id_arr, id_pad,
                                method=lambda m, i, p: m.text_embedding(i, p))
  got, mask = enc.encode_text(texts, layer=0)
  np.testing.assert_allclose(got[mask], np.asarray(emb)[mask], atol=1e-6)
  with pytest.raises(ValueError, match='outside 0..2'):
    enc.encode_text(texts, layer=3)


def test_batching_and_buckets_do_not_change_features(enc):
  _, waves, _ = _raw_records(n=3)
  waves = waves + [waves[0][:8000], waves[1][:12000]]
  one, one_mask = enc.encode_speech(waves, batch_size=1)
  many, many_mask = enc.encode_speech(waves, batch_size=16)
  np.testing.assert_array_equal(one_mask, many_mask)
  np.testing.assert_allclose(one, many, atol=1e-5)
  assert encoder_lib.bucket_length(100) == 128 and encoder_lib.bucket_length(129) == 192
  assert all(encoder_lib.bucket_length(n) >= n for n in range(1, 3000))


def _copy(export_dir, tmp_path):
  dst = str(tmp_path / 'copy')
  shutil.copytree(export_dir, dst)
  return dst


def test_mismatched_vocabulary_fails_clearly(tiny_run, tmp_path):
  path = _copy(tiny_run[1], tmp_path)
  with open(os.path.join(path, 'vocab.txt'), 'w', encoding='utf-8') as f:
    f.write('"a"\n"b"\n')
  with pytest.raises(encoder_lib.ExportMismatchError, match='vocab.txt has 6 ids'):
    mslam_jax.load_encoder(path)


def test_mismatched_dims_fail_clearly(tiny_run, tmp_path):
  path = _copy(tiny_run[1], tmp_path)
  manifest_path = os.path.join(path, 'manifest.json')
  manifest = json.loads(open(manifest_path, encoding='utf-8').read())
  manifest['model']['d_model'] = 32
  with open(manifest_path, 'w', encoding='utf-8') as f:
    json.dump(manifest, f)
  with pytest.raises(encoder_lib.ExportMismatchError, match=r'has shape .*64.* but manifest'):
    mslam_jax.load_encoder(path)


def test_random_init_export_differs_from_the_trained_one(tiny_run, tmp_path, capsys):
  try:
    export.main(['--random_init', '--gin_file=gin/pretrain_tiny_cpu.gin',
                 f'--output={tmp_path / "random"}'])
  finally:
    gin.clear_config()
  assert capsys.readouterr().out.splitlines()[0] == \
      'initialising the encoder of gin/pretrain_tiny_cpu.gin (seed 0)...'
  random_enc = mslam_jax.load_encoder(str(tmp_path / 'random'))
  trained = mslam_jax.load_encoder(tiny_run[1])
  assert random_enc.manifest['step'] == 0
  a = jax.tree.leaves(random_enc.params)
  b = jax.tree.leaves(trained.params)
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_a_speech_only_model_exports_without_text_input(tmp_path):
  import conftest  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / 'w2v_bert')
  conftest._write_tiny_run(model_dir, seed=5, step=3, gin_files=['gin/variants/w2v_bert.gin'])
  try:
    export.export(model_dir, str(tmp_path / 'export'))
  finally:
    gin.clear_config()
  enc = mslam_jax.load_encoder(str(tmp_path / 'export'))
  assert not enc.has_text and 'text_embedding' not in enc.params
  feats, mask = enc.encode_speech(_raw_records(n=1)[1])
  assert feats.shape[-1] == enc.d_model and mask.sum() > 0
  with pytest.raises(ValueError, match='no text input'):
    enc.encode_text(['Hallo'])
