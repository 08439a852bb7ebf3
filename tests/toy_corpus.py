"""A small corpus in the corpus builder's layout (mslam_jax/corpus/build.py), written by tests in a few hundred ms.

Audio is tones (FLAC, 16 kHz); each language has its own alphabet, so tests
can tell languages apart and check vocabulary handling. Sizes differ per
language so that temperature rates differ from uniform.
"""

import io
import json
import os
import textwrap

import numpy as np
import soundfile as sf
import tensorflow as tf

from mslam_jax.data.vocabulary import CharacterVocabulary

ALPHABETS = {'aa': 'abcdefgh', 'bb': 'абвгдежз', 'cc': 'αβγδεζηθ'}


def flac_bytes(waveform, rate=16000, fmt='FLAC', subtype='PCM_16'):
  buf = io.BytesIO()
  sf.write(buf, waveform, rate, format=fmt, subtype=subtype)
  return buf.getvalue()


def tone(rng, seconds, rate=16000):
  t = np.arange(int(seconds * rate)) / rate
  return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)).astype(np.float32)


def example(ex_id, language, audio, transcript):
  feats = {'id': ex_id.encode(), 'language': language.encode(), 'audio': audio,
           'transcript': transcript.encode('utf-8')}
  return tf.train.Example(features=tf.train.Features(feature={
      k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feats.items()}))


def sentence(rng, alphabet, words):
  return ' '.join(''.join(rng.choice(list(alphabet), rng.integers(2, 6)))
                  for _ in range(words))


def write(root, *, text_sizes=(40, 10, 3), audio_sizes=(12, 6, 3), seconds=(0.5, 1.5),
          seed=0):
  """Writes the corpus under `root`; returns its metadata dict."""
  rng = np.random.default_rng(seed)
  meta = {'name': 'toy', 'sample_rate': 16000, 'languages': list(ALPHABETS),
          'kinds': {'speech': {'train': {}}, 'paired': {'train': {}, 'dev': {}},
                    'text': {'train': {}}}, 'vocabulary': 'vocab.txt', 'audio_format': 'flac'}
  all_text = []
  for (lang, alphabet), n_text, n_audio in zip(ALPHABETS.items(), text_sizes, audio_sizes):
    lines = [sentence(rng, alphabet, rng.integers(1, 6)) for _ in range(n_text)]
    all_text += lines
    os.makedirs(os.path.join(root, 'text', 'train'), exist_ok=True)
    with open(os.path.join(root, 'text', 'train', f'{lang}.txt'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(lines) + '\n')
    meta['kinds']['text']['train'][lang] = {'examples': n_text}
    for kind, split, n in (('speech', 'train', n_audio), ('paired', 'train', n_audio),
                           ('paired', 'dev', 2)):
      os.makedirs(os.path.join(root, kind, split), exist_ok=True)
      path = os.path.join(root, kind, split, f'{lang}.tfrecord')
      with tf.io.TFRecordWriter(path) as w:
        for i in range(n):
          text = sentence(rng, alphabet, 2)
          all_text.append(text)
          audio = flac_bytes(tone(rng, rng.uniform(*seconds)))
          w.write(example(f'{lang}-{kind}-{split}-{i:03d}', lang, audio,
                          text).SerializeToString())
      meta['kinds'][kind][split][lang] = {'examples': n}
  CharacterVocabulary.build(all_text).save(os.path.join(root, 'vocab.txt'))
  with open(os.path.join(root, 'metadata.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, ensure_ascii=False, indent=1)
  return meta


def write_user_task_module(folder, lines, size=None):
  """A task module registering text task `user_text_zz` over `lines`; returns its path."""
  text = os.path.join(folder, 'zz.txt')
  with open(text, 'w', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))
  module = os.path.join(folder, 'user_tasks.py')
  with open(module, 'w', encoding='utf-8') as f:
    f.write(textwrap.dedent(f'''
        from mslam_jax.data import registry, sources
        registry.add_task('user_text_zz', kind='text', language='zz',
                          source=sources.text_lines({text!r}, 'zz'), size={size!r})
    '''))
  return module


# Each toy language speaks in its own frequency band, so language ID is
# learnable in a few steps; English translations use Latin letters.
BANDS = {'aa': (200, 500), 'bb': (900, 1400), 'cc': (2000, 3000)}
ENGLISH = 'abcdefghij'


def write_downstream(root, *, train=6, dev=3, test=3, text_pairs=8, seconds=(0.6, 1.2),
                     alphabets=None, seed=1):
  """Downstream splits in the corpus builder's layout (speech train, paired dev/test, text tsv).

  alphabets: language -> characters of its transcripts (ALPHABETS by default).
  """
  rng = np.random.default_rng(seed)
  alphabets = alphabets or ALPHABETS
  if not os.path.exists(os.path.join(root, 'vocab.txt')):
    os.makedirs(root, exist_ok=True)
    CharacterVocabulary.build([' ' + ENGLISH] + list(alphabets.values())).save(
        os.path.join(root, 'vocab.txt'))
  for lang, alphabet in alphabets.items():
    low, high = BANDS.get(lang, (200, 3000))
    for folder, n in ((('downstream', 'speech', 'train'), train), (('paired', 'dev'), dev),
                      (('paired', 'test'), test)):
      os.makedirs(os.path.join(root, *folder), exist_ok=True)
      with tf.io.TFRecordWriter(os.path.join(root, *folder, f'{lang}.tfrecord')) as w:
        for i in range(n):
          t = np.arange(int(rng.uniform(*seconds) * 16000)) / 16000
          wave = (0.3 * np.sin(2 * np.pi * rng.uniform(low, high) * t)).astype(np.float32)
          ex = example(f'ds-{folder[-1]}-{i:03d}', lang, flac_bytes(wave),
                       sentence(rng, alphabet, 2))
          ex.features.feature['english'].bytes_list.value.append(
              sentence(rng, ENGLISH, 2).encode())
          w.write(ex.SerializeToString())
    for split, n in (('train', text_pairs), ('dev', dev), ('test', test)):
      folder = os.path.join(root, 'downstream', 'text', split)
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, f'{lang}.tsv'), 'w', encoding='utf-8') as f:
        for _ in range(n):
          f.write(f'{sentence(rng, alphabet, 2)}\t{sentence(rng, ENGLISH, 2)}\n')
