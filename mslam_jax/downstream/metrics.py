"""Evaluation metrics of the mSLAM downstream tasks (plain Python and numpy).

mSLAM (Bapna et al. 2022) reports BLEU for speech translation (CoVoST-2), WER
for speech recognition, accuracy for classification (speech and XNLI-style
text tasks) and recall@k for speech-text retrieval. The implementations here
delegate to the reference libraries where one exists (sacrebleu for BLEU and
chrF, jiwer for the edit distances), so scores are comparable with published
numbers, and add the retrieval and classification scores, which are short.
Everything is corpus level: one number per evaluation set.
"""

from typing import Dict, List, Sequence

import jiwer
import numpy as np
from sacrebleu.metrics import BLEU, CHRF

# Similarities closer than this count as a tie in `retrieval_recall` (ours).
# Cosines are computed in float64 (rounding ~1e-13 for d in the thousands),
# while embeddings come from float32 models whose eps is ~1e-7, so differences
# below 1e-9 carry no information; treating them as ties keeps an exact
# duplicate key a tie even if two BLAS paths round its column differently.
_TIE_ATOL = 1e-9


def _check_same_length(hypotheses: Sequence, references: Sequence, what: str) -> None:
  if len(hypotheses) != len(references):
    raise ValueError(
        f'{what}: got {len(hypotheses)} hypotheses and {len(references)} references; '
        'they must pair up one to one (same order, one reference per hypothesis).')
  if len(hypotheses) == 0:  # pylint: disable=g-explicit-length-test (numpy arrays too)
    raise ValueError(f'{what}: the evaluation set is empty.')


def translation_scores(hypotheses: List[str], references: List[str]) -> Dict:
  """Corpus BLEU and chrF with sacrebleu's defaults (the comparable setting).

  BLEU uses the 13a tokenizer, exponential smoothing and mixed case; chrF is
  chrF2 (character 6-grams, beta 2, whitespace ignored). mSLAM reports BLEU on
  CoVoST-2; chrF is ours, as it is more informative for short character-level
  outputs and for languages without word boundaries.

  Args:
    hypotheses: n system outputs (detokenized text).
    references: n references, references[i] for hypotheses[i].

  Returns:
    {'bleu': float, 'chrf': float (both 0..100), 'bleu_signature': str,
     'chrf_signature': str}; the signatures name the settings and the sacrebleu
    version, to be reported next to the numbers.

  Raises:
    ValueError: the lists differ in length or are empty.
  """
  _check_same_length(hypotheses, references, 'translation_scores')
  refs = [list(references)]  # sacrebleu: one list per reference stream.
  bleu, chrf = BLEU(), CHRF()
  return {
      'bleu': float(bleu.corpus_score(list(hypotheses), refs).score),
      'chrf': float(chrf.corpus_score(list(hypotheses), refs).score),
      'bleu_signature': str(bleu.get_signature()),
      'chrf_signature': str(chrf.get_signature()),
  }


def error_rates(hypotheses: List[str], references: List[str]) -> Dict:
  """Corpus word and character error rates (jiwer's default normalisation).

  WER = (substitutions + deletions + insertions) / reference words, summed over
  the corpus (not averaged per utterance). Words are whitespace separated after
  collapsing repeated spaces and stripping the ends; CER counts characters of
  the stripped strings, spaces inside included. No case or punctuation
  normalisation: apply it to both sides beforehand if the benchmark asks.

  Empty references: an empty (or whitespace-only) reference is allowed inside a
  corpus; its hypothesis words all count as insertions and it adds nothing to
  the denominator. A corpus whose references are *all* empty has no defined
  rate (0 / 0 or x / 0), so that raises ValueError rather than return a number
  that looks meaningful.

  Args:
    hypotheses: n recognised transcripts.
    references: n reference transcripts.

  Returns:
    {'wer': float, 'cer': float} as fractions (0.25 = 25 %; can exceed 1 with
    many insertions), plus the integer counts behind them: 'word_errors',
    'reference_words', 'char_errors', 'reference_chars' (to pool shards).

  Raises:
    ValueError: length mismatch, empty corpus, or all references empty.
  """
  _check_same_length(hypotheses, references, 'error_rates')
  words = jiwer.process_words(list(references), list(hypotheses))
  chars = jiwer.process_characters(list(references), list(hypotheses))

  def counts(out):
    errors = out.substitutions + out.deletions + out.insertions
    reference = out.substitutions + out.deletions + out.hits
    return int(errors), int(reference)

  word_errors, reference_words = counts(words)
  char_errors, reference_chars = counts(chars)
  if reference_words == 0 or reference_chars == 0:
    raise ValueError(
        'error_rates: every reference is empty, so WER/CER are undefined '
        '(the denominator is the number of reference words/characters).')
  return {
      'wer': word_errors / reference_words,
      'cer': char_errors / reference_chars,
      'word_errors': word_errors,
      'reference_words': reference_words,
      'char_errors': char_errors,
      'reference_chars': reference_chars,
  }


def _unit_rows(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (float64); an all-zero row stays zero."""
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, np.finfo(np.float64).tiny)


def retrieval_recall(queries: np.ndarray, keys: np.ndarray,
                     ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
  """Recall@k of cosine-similarity retrieval where query i's match is key i.

  Tie rule (conservative, ours): the correct key's rank is
      1 + #{j != i : sim(i, j) >= sim(i, i) - 1e-9},
  i.e. every other key that ties with it (to within float rounding, see
  _TIE_ATOL) is ranked ahead of it. A degenerate encoder that maps everything
  to the same vector therefore scores recall@k = 0 for k < n instead of
  looking perfect, and an exact duplicate of the correct key costs one rank.
  An all-zero vector has cosine 0 with everything.

  Args:
    queries: [n, d] query embeddings (e.g. speech).
    keys: [n, d] key embeddings (e.g. text); keys[i] belongs to queries[i].
    ks: the cut-offs k >= 1 to report.

  Returns:
    {'recall@k': fraction of queries whose correct key has rank <= k} per k.
  """
  queries, keys = np.asarray(queries), np.asarray(keys)
  if queries.ndim != 2 or queries.shape != keys.shape:
    raise ValueError(
        f'retrieval_recall: queries {queries.shape} and keys {keys.shape} must both be '
        '[n, d] with the same n (key i is the match of query i) and the same d.')
  if queries.shape[0] == 0:
    raise ValueError('retrieval_recall: no queries.')
  if any(int(k) != k or k < 1 for k in ks):
    raise ValueError(f'retrieval_recall: cut-offs must be integers >= 1, got {tuple(ks)}.')
  sims = _unit_rows(queries) @ _unit_rows(keys).T  # [n, n]
  correct = np.diag(sims)[:, None]  # [n, 1]
  at_least_as_close = sims >= correct - _TIE_ATOL
  # The diagonal always counts itself once; rank = 1 + the others.
  ranks = np.sum(at_least_as_close, axis=1)  # [n]
  return {f'recall@{int(k)}': float(np.mean(ranks <= k)) for k in ks}


def classification_scores(predictions: Sequence[int], labels: Sequence[int],
                          class_names: Sequence[str]) -> Dict:
  """Accuracy and the confusion matrix of class-id predictions.

  Args:
    predictions: n predicted class ids in [0, len(class_names)).
    labels: n true class ids in the same range.
    class_names: the name of each class id (fixes the matrix size).

  Returns:
    {'accuracy': float, 'confusion': C x C list of int lists with
     confusion[true][predicted] = count, 'num_examples': n}.
  """
  predictions = np.asarray(predictions).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  _check_same_length(predictions, labels, 'classification_scores')
  num_classes = len(class_names)
  for name, ids in (('predictions', predictions), ('labels', labels)):
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'classification_scores: {name} must be integer class ids, '
                       f'got dtype {ids.dtype}.')
    if ids.min() < 0 or ids.max() >= num_classes:
      raise ValueError(
          f'classification_scores: {name} hold ids in [{ids.min()}, {ids.max()}], '
          f'outside [0, {num_classes}) for the {num_classes} class names.')
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  return {
      'accuracy': float(np.mean(predictions == labels)),
      'confusion': confusion.tolist(),
      'num_examples': int(labels.size),
  }


def format_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
  """The confusion matrix as a right-aligned text table (rows true, columns predicted).

      true\\pred  cat  dog
            cat    3    1
            dog    0    2
  """
  corner = 'true\\pred'
  names = [str(n) for n in class_names]
  rows = [[str(int(c)) for c in row] for row in confusion]
  if len(rows) != len(names) or any(len(r) != len(names) for r in rows):
    raise ValueError(f'format_confusion: the matrix must be {len(names)} x {len(names)} '
                     'to match the class names.')
  label_width = max([len(corner)] + [len(n) for n in names])
  col_width = max([len(n) for n in names] + [len(c) for r in rows for c in r])
  lines = [' '.join([corner.rjust(label_width)] + [n.rjust(col_width) for n in names])]
  for name, row in zip(names, rows):
    lines.append(' '.join([name.rjust(label_width)] + [c.rjust(col_width) for c in row]))
  return '\n'.join(lines)
