"""Downstream metrics against the reference libraries and hand-worked cases."""

import math

import numpy as np
import pytest
import sacrebleu

from mslam_jax.downstream import metrics

# A few real sentence pairs (English), with typical system errors.
HYPOTHESES = [
    'The cat sat on the mat.',
    'He read the book yesterday evening.',
    'We will meet at the station at noon.',
    'It is raining in Paris today.',
]
REFERENCES = [
    'The cat sat on a mat.',
    'Yesterday evening he read the book.',
    'We are meeting at the station at twelve.',
    'It rains in Paris today.',
]


def test_translation_scores_equal_sacrebleu_corpus_functions():
  scores = metrics.translation_scores(HYPOTHESES, REFERENCES)
  want_bleu = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
  want_chrf = sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score
  assert scores['bleu'] == pytest.approx(want_bleu, abs=1e-9)
  assert scores['chrf'] == pytest.approx(want_chrf, abs=1e-9)
  assert 0.0 < scores['bleu'] < 100.0 and 0.0 < scores['chrf'] < 100.0
  assert 'tok:13a' in scores['bleu_signature'] and 'nrefs:1' in scores['bleu_signature']
  assert 'version:' in scores['chrf_signature'] and 'nc:6' in scores['chrf_signature']
  perfect = metrics.translation_scores(REFERENCES, REFERENCES)
  assert perfect['bleu'] == pytest.approx(100.0) and perfect['chrf'] == pytest.approx(100.0)


def test_translation_scores_reject_length_mismatch():
  with pytest.raises(ValueError, match='3 hypotheses and 4 references'):
    metrics.translation_scores(HYPOTHESES[:3], REFERENCES)
  with pytest.raises(ValueError, match='empty'):
    metrics.translation_scores([], [])


def test_error_rates_hand_computed():
  # 'sat' -> 'sit' is one substitution, 'down' one insertion: 2 errors / 3 words.
  one = metrics.error_rates(['the cat sit down'], ['the cat sat'])
  assert one['wer'] == pytest.approx(2 / 3)
  # Characters of 'the cat sat' (11): 'a' -> 'i' substitution, then ' down'
  # inserted (5 characters, the space included): 6 / 11.
  assert one['cer'] == pytest.approx(6 / 11)
  # kitten -> sitting: k->s, e->i, +g = 3 edits over 6 reference characters.
  assert metrics.error_rates(['sitting'], ['kitten'])['cer'] == pytest.approx(0.5)
  # Pooled over the corpus, not averaged per utterance: (2 + 0) / (3 + 2) words.
  pooled = metrics.error_rates(['the cat sit down', 'a b'], ['the cat sat', 'a b'])
  assert pooled['wer'] == pytest.approx(2 / 5)
  assert (pooled['word_errors'], pooled['reference_words']) == (2, 5)
  # Repeated and edge whitespace is normalised away for words.
  assert metrics.error_rates(['  the   cat sat '], ['the cat sat'])['wer'] == 0.0


def test_error_rates_empty_references():
  # An empty reference inside a corpus: its hypothesis words are insertions.
  rates = metrics.error_rates(['x y', 'a b'], ['', 'a b'])
  assert rates['wer'] == pytest.approx(2 / 2)
  assert rates['cer'] == pytest.approx(3 / 3)  # 'x y' is 3 inserted characters.
  # Every reference empty: undefined, so it raises instead of returning a number.
  with pytest.raises(ValueError, match='every reference is empty'):
    metrics.error_rates(['', ''], ['', ' '])
  with pytest.raises(ValueError, match='2 hypotheses and 1 references'):
    metrics.error_rates(['a', 'b'], ['a'])


def test_retrieval_recall_planted_perfect_encoder():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(200, 32))
  keys = queries + 0.01 * rng.normal(size=queries.shape)
  assert metrics.retrieval_recall(queries, keys) == {'recall@1': 1.0, 'recall@5': 1.0}
  # Cosine, so the keys' scale does not matter.
  scaled = keys * rng.uniform(0.1, 10.0, size=(200, 1))
  assert metrics.retrieval_recall(queries, scaled, ks=(1,)) == {'recall@1': 1.0}


def test_retrieval_recall_random_vectors_near_chance():
  n = 200
  rng = np.random.default_rng(1)
  recalls = metrics.retrieval_recall(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)),
                                     ks=(1, 5))
  # Under independence the correct key's rank is uniform on 1..n, so the number
  # of hits is ~Binomial(n, k/n): mean k, std sqrt(k (1 - k/n)) (1.0 for k=1,
  # 2.2 for k=5). Allow 4 std, a bound that a correct implementation misses
  # with probability < 1e-4, while a planted or tie-favouring bug is far out.
  for k in (1, 5):
    hits = recalls[f'recall@{k}'] * n
    std = math.sqrt(k * (1 - k / n))
    assert abs(hits - k) <= 4 * std, (k, hits)


def test_retrieval_recall_ties_count_against_the_correct_key():
  keys = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  queries = np.array([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
  # Query 0 and 1: keys 0 and 1 are identical, so each has one tie ahead of it.
  assert metrics.retrieval_recall(queries, keys, ks=(1, 2)) == {
      'recall@1': pytest.approx(1 / 3), 'recall@2': 1.0}
  # A collapsed encoder (every vector the same) is not rewarded.
  same = np.ones((4, 3))
  assert metrics.retrieval_recall(same, same, ks=(1, 3, 4)) == {
      'recall@1': 0.0, 'recall@3': 0.0, 'recall@4': 1.0}
  with pytest.raises(ValueError, match='same n'):
    metrics.retrieval_recall(np.ones((3, 2)), np.ones((4, 2)))


def test_classification_scores_match_numpy_counting():
  rng = np.random.default_rng(2)
  names = ['entailment', 'neutral', 'contradiction']
  labels = rng.integers(0, 3, size=50)
  predictions = np.where(rng.uniform(size=50) < 0.6, labels, rng.integers(0, 3, size=50))
  scores = metrics.classification_scores(predictions, labels, names)
  assert scores['accuracy'] == pytest.approx(np.mean(predictions == labels))
  want = [[int(np.sum((labels == t) & (predictions == p))) for p in range(3)]
          for t in range(3)]
  assert scores['confusion'] == want
  assert np.trace(np.array(scores['confusion'])) == np.sum(predictions == labels)
  assert scores['num_examples'] == 50
  with pytest.raises(ValueError, match='outside'):
    metrics.classification_scores([0, 3], [0, 1], names)


def test_format_confusion_is_aligned():
  table = metrics.format_confusion([[12, 1], [0, 7]], ['cat', 'dog'])
  lines = table.split('\n')
  assert lines == ['true\\pred cat dog',
                   '      cat  12   1',
                   '      dog   0   7']
  assert len({len(line) for line in lines}) == 1
