"""The character vocabulary: ids, unknown characters, files, and every corpus language."""

import glob
import json
import os

import pytest
import tensorflow as tf

from mslam_jax import special_ids
from mslam_jax.data import vocabulary as vocabulary_lib
from mslam_jax.data.vocabulary import CharacterVocabulary

CORPUS = os.path.join(os.path.dirname(__file__), '..', 'tasks', 'embedded_corpus')


def test_build_orders_by_frequency_and_reserves_ids():
  vocab = CharacterVocabulary.build(['aab', 'ab c', 'a'], max_size=7)
  # counts: a 4, b 2, ' ' 1, c 1 -> ties broken by code point (' ' < 'c'); 3 fit after 4 reserved.
  assert vocab.symbols == ['a', 'b', ' ']
  assert vocab.vocab_size == 7
  assert vocab.encode('abc ') == [4, 5, special_ids.UNK_ID, 6]
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.mask_id) == (0, 1, 2, 3)


def test_min_count_and_whitespace():
  vocab = CharacterVocabulary.build(['aa\tb', 'a\nb'], min_count=2)
  assert vocab.symbols == ['a', 'b']  # tab and newline never become symbols


def test_tf_and_python_agree_including_unknown_and_invalid_utf8():
  vocab = CharacterVocabulary.build(['héllo wörld', 'привет мир', 'γειά σου'])
  for text in ['héllo мир', 'xyz', '', 'σου wörld!']:
    want = vocab.encode(text)
    got = vocab.encode_tf(tf.constant(text)).numpy().tolist()
    assert got == want, text
  # Invalid UTF-8 becomes U+FFFD, which is unknown.
  assert vocab.encode_tf(tf.constant(b'h\xffe')).numpy().tolist() == [
      vocab.encode('h')[0], special_ids.UNK_ID, vocab.encode('e')[0]]
  ragged = vocab.encode_tf(tf.constant(['hé', 'мир']))
  assert ragged.to_list() == [vocab.encode('hé'), vocab.encode('мир')]


def test_decode_drops_padding_and_marks_unknown():
  vocab = CharacterVocabulary.build(['abc'])
  ids = vocab.encode('ab') + [special_ids.UNK_ID, special_ids.PAD_ID, special_ids.PAD_ID]
  assert vocab.decode(ids) == 'ab' + vocabulary_lib.UNK_TEXT
  assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == 'ab' + vocabulary_lib.UNK_TEXT
  # seqio's decode stops at EOS.
  assert vocab.decode(vocab.encode('a') + [special_ids.EOS_ID] + vocab.encode('b')) == 'a'


def test_save_load_round_trip_with_awkward_symbols(tmp_path):
  vocab = CharacterVocabulary.build(['"\\ a', 'ü', '\u200b'])
  path = str(tmp_path / 'vocab.txt')
  vocab.save(path)
  assert CharacterVocabulary.load(path) == vocab
  with open(path, encoding='utf-8') as f:
    assert [json.loads(line) for line in f] == vocab.symbols


def test_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='mslam_jax.corpus.build'):
    CharacterVocabulary.load(str(tmp_path / 'missing.txt'))
  with pytest.raises(ValueError, match='exceed'):
    CharacterVocabulary([chr(0x4e00 + i) for i in range(vocabulary_lib.MAX_SIZE)])
  vocab = CharacterVocabulary.build(['abcdef'])
  with pytest.raises(ValueError, match='ModelConfig.vocab_size'):
    vocabulary_lib.check_fits_model(vocab, 8)
  vocabulary_lib.check_fits_model(vocab, 10)


def test_normalize_text():
  # 'e' + combining acute -> precomposed; whitespace runs -> one space.
  assert vocabulary_lib.normalize_text(' e\u0301  a\t\nb ') == '\u00e9 a b'


def _corpus_files():
  return sorted(glob.glob(os.path.join(CORPUS, 'text', 'train', '*.txt')))


@pytest.mark.skipif(not _corpus_files(), reason='embedded corpus not built')
def test_round_trip_on_every_language_of_the_embedded_corpus():
  vocab = CharacterVocabulary.load(os.path.join(CORPUS, 'vocab.txt'))
  with open(os.path.join(CORPUS, 'metadata.json'), encoding='utf-8') as f:
    languages = json.load(f)['languages']
  files = _corpus_files()
  assert len(files) >= 10 and {os.path.basename(f)[:-4] for f in files} == set(languages)
  assert vocab.vocab_size <= vocabulary_lib.MAX_SIZE
  for path in files:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\n') for line in f if line.strip()]
    assert lines, path
    for line in lines:
      ids = vocab.encode(line)
      assert special_ids.UNK_ID not in ids, (path, line)
      assert vocab.decode(ids) == line, (path, line)
    # The TF path on a batch of the language's lines.
    decoded = vocab.decode_tf(vocab.encode_tf(tf.constant(lines[:50])).to_tensor())
    assert [d.decode('utf-8') for d in decoded.numpy()] == lines[:50], path
