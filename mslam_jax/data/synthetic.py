"""Synthetic batches with learnable structure, for tests and the demo run.

A toy language: words drawn from a fixed random lexicon over a small
alphabet. Its "speech" holds each character for 4-8 log-mel frames of a fixed
per-character spectral template plus noise, so a speech frame predicts its
neighbours, text is predictable from context, and transcripts align with
speech under CTC (every character spans at least one encoder frame after the
4x subsampling). Real corpora replace this with the data issue.
"""

import numpy as np

from mslam_jax import special_ids
from mslam_jax.data.batch_spec import NUM_MEL_BINS, BatchConfig


class SyntheticCorpus:
  """Deterministic generator of three-part batches (numpy), seeded.

  Args:
    seed: fixes the lexicon, the spectral templates and the batch stream.
    num_mel_bins: log-mel channels of the features (BatchConfig.num_mel_bins).
    alphabet_size: characters used, ids NUM_RESERVED_IDS .. + alphabet_size - 1.
    num_words: lexicon size; words are 2-6 characters.
    noise: std of Gaussian noise added to the templates.
  """

  def __init__(self, seed: int = 0, *, num_mel_bins: int = NUM_MEL_BINS,
               alphabet_size: int = 16, num_words: int = 64, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    self.alphabet = np.arange(special_ids.NUM_RESERVED_IDS,
                              special_ids.NUM_RESERVED_IDS + alphabet_size)
    self.space_id = int(self.alphabet[0])
    letters = self.alphabet[1:]
    self.lexicon = [rng.choice(letters, size=rng.integers(2, 7)) for _ in range(num_words)]
    self.templates = rng.normal(0.0, 1.0, (int(self.alphabet[-1]) + 1, num_mel_bins))
    self.noise = noise
    self.num_mel_bins = num_mel_bins
    self._rng = np.random.default_rng(seed + 1)

  def sentence(self, max_chars: int) -> np.ndarray:
    """Space-separated lexicon words, at least 1 and at most `max_chars` characters."""
    target = self._rng.integers(max(1, max_chars // 2), max_chars + 1)
    chars = []
    while len(chars) < target:
      if chars:
        chars.append(self.space_id)
      chars.extend(self.lexicon[self._rng.integers(len(self.lexicon))])
    return np.asarray(chars[:target], np.int32)

  def speak(self, chars: np.ndarray, max_frames: int) -> np.ndarray:
    """Log-mel-like frames [frames, mel] for `chars`, cut at `max_frames`."""
    durations = self._rng.integers(4, 9, size=len(chars))
    frames = np.repeat(self.templates[chars], durations, axis=0)[:max_frames]
    return frames + self.noise * self._rng.normal(size=frames.shape)

  def _text(self, batch_size, length):
    ids = np.zeros((batch_size, length), np.int32)
    paddings = np.ones((batch_size, length), np.float32)
    for b in range(batch_size):
      s = self.sentence(length)
      ids[b, :len(s)] = s
      paddings[b, :len(s)] = 0.0
    return {'ids': ids, 'id_paddings': paddings}

  def _speech(self, batch_size, frames, transcripts=None):
    features = np.zeros((batch_size, frames, self.num_mel_bins), np.float32)
    paddings = np.ones((batch_size, frames), np.float32)
    for b in range(batch_size):
      chars = transcripts[b] if transcripts is not None else self.sentence(frames // 6)
      f = self.speak(chars, frames)
      features[b, :len(f)] = f
      paddings[b, :len(f)] = 0.0
    return {'features': features, 'feature_paddings': paddings}

  def batch(self, config: BatchConfig, parts=('speech', 'text', 'paired')):
    """One batch dict with the shapes of `abstract_batch(config, parts)`."""
    out = {}
    if 'speech' in parts:
      out['speech'] = self._speech(config.speech_batch_size, config.speech_frames)
    if 'text' in parts:
      out['text'] = self._text(config.text_batch_size, config.text_length)
    if 'paired' in parts:
      # Transcripts short enough that their speech (<= 8 frames a character) fits.
      max_chars = min(config.paired_text_length, config.paired_frames // 8)
      text = self._text(config.paired_batch_size, max_chars)
      transcripts = [row[pad < 0.5] for row, pad in zip(text['ids'], text['id_paddings'])]
      pad_width = config.paired_text_length - max_chars
      out['paired'] = {
          **self._speech(config.paired_batch_size, config.paired_frames, transcripts),
          'ids': np.pad(text['ids'], ((0, 0), (0, pad_width))),
          'id_paddings': np.pad(text['id_paddings'], ((0, 0), (0, pad_width)),
                                constant_values=1.0),
      }
    return out
