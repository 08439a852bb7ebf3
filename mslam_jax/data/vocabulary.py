"""The character vocabulary: one id per Unicode character, shared by all languages.

mSLAM (Bapna et al. 2022): a character vocabulary of 4096 symbols over all
languages. Ids 0-3 are reserved (mslam_jax/special_ids.py: PAD = CTC blank, EOS,
UNK, MASK); the characters of the training text follow, most frequent first, so
a smaller `max_size` keeps the common ones and maps the rest to UNK.

The file format is one JSON string per line (so space, quote and backslash are
unambiguous), in id order starting at id 4. `CharacterVocabulary` is a
`seqio.Vocabulary`: seqio tasks tokenise with it in TF, and tests and export
use the same object in Python.
"""

import collections
import json
import os
import re
import unicodedata
from typing import Iterable, List, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from mslam_jax import special_ids

MAX_SIZE = 4096  # mSLAM (Bapna et al. 2022)
UNK_TEXT = '\u2047'  # what an unknown character decodes to (as sentencepiece does)
MASK_TEXT = '[MASK]'
_SPACES = re.compile(r'\s+')


def normalize_text(text: str) -> str:
  """NFC, every run of whitespace made one space, stripped.

  NFC first so that a character typed as base + combining mark and its
  precomposed form get one id; our choice, as most multilingual tokenisers.
  """
  return _SPACES.sub(' ', unicodedata.normalize('NFC', text)).strip()


class CharacterVocabulary(seqio.Vocabulary):
  """Characters <-> ids, in Python and in TF (no lookup-table resources).

  Attributes:
    symbols: the characters, symbols[i] has id i + NUM_RESERVED_IDS.
  """

  def __init__(self, symbols: Sequence[str]):
    super().__init__(extra_ids=0)
    symbols = list(symbols)
    for s in symbols:
      if len(s) != 1:
        raise ValueError(f'vocabulary symbols are single characters, got {s!r}')
    if len(set(symbols)) != len(symbols):
      raise ValueError('vocabulary has duplicate symbols')
    if len(symbols) + special_ids.NUM_RESERVED_IDS > MAX_SIZE:
      raise ValueError(f'{len(symbols)} symbols + {special_ids.NUM_RESERVED_IDS} reserved '
                       f'ids exceed the paper\'s {MAX_SIZE}')
    self.symbols = symbols
    self._ids = {s: i + special_ids.NUM_RESERVED_IDS for i, s in enumerate(symbols)}
    # Sorted code points and their ids, for a stateless searchsorted lookup in TF.
    points = np.array([ord(s) for s in symbols], np.int32)
    order = np.argsort(points, kind='stable')
    self._sorted_points = points[order]
    self._sorted_ids = (order + special_ids.NUM_RESERVED_IDS).astype(np.int32)
    self._id_texts = (['', '', UNK_TEXT, MASK_TEXT] + symbols)

  # --- building, saving, loading ---------------------------------------------

  @classmethod
  def build(cls, texts: Iterable[str], max_size: int = MAX_SIZE,
            min_count: int = 1) -> 'CharacterVocabulary':
    """The most frequent characters of `texts` (ties by code point), at most max_size ids.

    Whitespace other than ' ' is never a symbol: normalize_text removes it.
    """
    if max_size <= special_ids.NUM_RESERVED_IDS:
      raise ValueError(f'max_size must exceed the {special_ids.NUM_RESERVED_IDS} reserved ids')
    counts = collections.Counter()
    for text in texts:
      counts.update(text)
    kept = [c for c, n in counts.items()
            if n >= min_count and (c == ' ' or not c.isspace())]
    kept.sort(key=lambda c: (-counts[c], ord(c)))
    return cls(kept[:max_size - special_ids.NUM_RESERVED_IDS])

  def save(self, path: str) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path) or '.')
    with tf.io.gfile.GFile(path, 'w') as f:
      for s in self.symbols:
        f.write(json.dumps(s, ensure_ascii=False) + '\n')

  @classmethod
  def load(cls, path: str) -> 'CharacterVocabulary':
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(
          f'vocabulary file {path} not found; build the corpus with '
          '`python -m mslam_jax.corpus.build --output=DIR` (it writes DIR/vocab.txt)')
    symbols = []
    with tf.io.gfile.GFile(path, 'r') as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          symbols.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{line_no}: not a JSON string ({e}); each line of a '
                           'vocabulary file holds one character as JSON, e.g. "a"') from e
    return cls(symbols)

  # --- seqio.Vocabulary --------------------------------------------------------

  @property
  def eos_id(self) -> int:
    return special_ids.EOS_ID

  @property
  def unk_id(self) -> int:
    return special_ids.UNK_ID

  @property
  def mask_id(self) -> int:
    return special_ids.MASK_ID

  @property
  def _base_vocab_size(self) -> int:
    return len(self.symbols) + special_ids.NUM_RESERVED_IDS

  def _encode(self, s: str) -> List[int]:
    return [self._ids.get(c, special_ids.UNK_ID) for c in s]

  def _decode(self, ids: Iterable[int]) -> str:
    texts = self._id_texts
    return ''.join(texts[i] if 0 <= i < len(texts) else UNK_TEXT for i in ids)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """UTF-8 string(s) -> int32 ids; invalid UTF-8 and unknown characters -> UNK.

    A scalar gives [length]; a batch gives a tf.RaggedTensor [batch, None].
    """
    points = tf.strings.unicode_decode(s, 'UTF-8', errors='replace',
                                       replacement_char=0xFFFD)
    flat = points.flat_values if isinstance(points, tf.RaggedTensor) else points
    if len(self.symbols) == 0:  # pylint: disable=g-explicit-length-test
      ids = tf.fill(tf.shape(flat), special_ids.UNK_ID)
    else:
      table = tf.constant(self._sorted_points)
      pos = tf.searchsorted(table, flat, side='left', out_type=tf.int32)
      pos = tf.minimum(pos, len(self.symbols) - 1)
      found = tf.equal(tf.gather(table, pos), flat)
      ids = tf.where(found, tf.gather(tf.constant(self._sorted_ids), pos), special_ids.UNK_ID)
    if isinstance(points, tf.RaggedTensor):
      return points.with_flat_values(ids)
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int ids [..., length] -> UTF-8 strings [...]; PAD and EOS give nothing."""
    texts = tf.constant(self._id_texts)
    ids = tf.cast(ids, tf.int32)
    ids = tf.where((ids < 0) | (ids >= len(self._id_texts)), special_ids.UNK_ID, ids)
    return tf.strings.reduce_join(tf.gather(texts, ids), axis=-1)

  def __eq__(self, other) -> bool:
    return isinstance(other, CharacterVocabulary) and self.symbols == other.symbols

  def __hash__(self) -> int:
    return hash(tuple(self.symbols))

  def __repr__(self) -> str:
    return f'CharacterVocabulary({self.vocab_size} ids)'


def count_unknown(vocab: CharacterVocabulary, text: str) -> int:
  """Characters of `text` that `vocab` maps to UNK."""
  return sum(1 for i in vocab.encode(text) if i == special_ids.UNK_ID)


def check_fits_model(vocab: CharacterVocabulary, model_vocab_size: Optional[int],
                     where: str = '') -> None:
  """Fails with the fix when the model's output layer is smaller than the vocabulary."""
  if model_vocab_size is not None and vocab.vocab_size > model_vocab_size:
    raise ValueError(
        f'the vocabulary{" of " + where if where else ""} has {vocab.vocab_size} ids but '
        f'ModelConfig.vocab_size is {model_vocab_size}; set '
        f'--gin.ModelConfig.vocab_size={vocab.vocab_size} (or larger), or rebuild the '
        'corpus with a smaller --max_vocab_size')
