"""Language-ID probes on pooled frozen features: raw against standardised, full-batch Adam.

    python benchmarks/probe_conditioning.py   # after python -m mslam_jax.reproduce (its exports)

Reads the large corpus (en, de, ru, el; 80 train / 25 test utterances per language) and the
seed-0 exports of runs/reproduce; prints, per backbone, how much the mean+std pooled features
vary across utterances relative to their magnitude, and the test accuracy of a linear probe
(300 full-batch Adam steps, learning rate 1e-2) on raw and on standardised features
(training-set mean and std per dimension).
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mslam_jax
from mslam_jax.downstream import backbone as backbone_lib
from mslam_jax.downstream import data
from mslam_jax.downstream import engine

LANGUAGES = ('en', 'de', 'ru', 'el')
EXPORTS = ('mslam_ctc_seed0', 'w2v_bert_seed0', 'random_init_seed0')


def pooled(backbone, examples, batch_size=32):
  """Mean+std pooled encodings [n, 2d] of the examples' speech."""
  inputs = backbone.speech_inputs([e.waveform for e in examples])
  pool = jax.jit(lambda params, batch: engine.mean_and_std(
      *backbone.speech(params, batch['features'], batch['feature_paddings'])))
  out = []
  for rows in engine.in_batches(len(inputs), batch_size):
    batch = engine.speech_batch([inputs[i] for i in rows], batch_size)
    out.append(np.asarray(pool(backbone.params, batch))[:len(rows)])
  return np.concatenate(out)


def probe_accuracy(x_train, y_train, x_test, y_test, standardize, steps=300):
  """Test accuracy of a linear classifier trained with full-batch Adam."""
  if standardize:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  classes = int(y_train.max()) + 1
  params = (jnp.zeros((x_train.shape[1], classes)), jnp.zeros(classes))
  optimizer = optax.adam(1e-2)
  state = optimizer.init(params)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(x_train @ p[0] + p[1], y_train).mean()

  grad = jax.jit(jax.grad(loss))
  for _ in range(steps):
    updates, state = optimizer.update(grad(params), state)
    params = optax.apply_updates(params, updates)
  return float(np.mean(np.argmax(x_test @ params[0] + params[1], -1) == y_test))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--corpus_dir', default='~/mslam_data/corpus_large')
  parser.add_argument('--reproduce_dir', default='runs/reproduce')
  args = parser.parse_args()
  corpus = os.path.expanduser(args.corpus_dir)
  source = data.corpus_speech_source(corpus)
  train = data.load_speech(source, 'train', languages=LANGUAGES, max_per_language=80)
  test = data.load_speech(source, 'test', languages=LANGUAGES, max_per_language=25)
  classes = sorted(LANGUAGES)
  y_train = np.array([classes.index(e.language) for e in train])
  y_test = np.array([classes.index(e.language) for e in test])
  backbones = {name: backbone_lib.MslamBackbone(
      mslam_jax.load_encoder(os.path.join(args.reproduce_dir, 'exports', name)))
               for name in EXPORTS}
  backbones['logmel'] = backbone_lib.make_backbone('logmel',
                                                   vocabulary_path=f'{corpus}/vocab.txt')
  for name, backbone in backbones.items():
    x_train, x_test = pooled(backbone, train), pooled(backbone, test)
    spread = float(x_train.std(0).mean() / np.abs(x_train.mean(0)).mean())
    raw = probe_accuracy(x_train, y_train, x_test, y_test, standardize=False)
    standardised = probe_accuracy(x_train, y_train, x_test, y_test, standardize=True)
    print(f'{name:18s} spread/magnitude {spread:.4f}  accuracy raw {raw:.2f}  '
          f'standardised {standardised:.2f}', flush=True)


if __name__ == '__main__':
  main()
