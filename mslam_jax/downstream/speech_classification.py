"""Speech language ID: pooled encoder output + a linear classifier (mSLAM, Fleurs LID).

    speech -> backbone [B, T', d] -> mean and std over valid frames [B, 2d]
           -> standardised (training-set statistics) -> dense -> [B, languages]

Statistics pooling (ours; the paper says "pooled"): the mean alone of
per-utterance normalised log-mel is zero, so the log-mel baseline would be
blind, and the spread of a frame sequence carries language information too.

Classes are the training split's languages, sorted. Scores: accuracy and the
confusion matrix (rows: true language, columns: predicted).
"""

from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mslam_jax.downstream import data as data_lib
from mslam_jax.downstream import engine
from mslam_jax.downstream import metrics


class LanguageId(engine.Evaluation):
  """Language ID over `languages` (None: every language of the training split).

  Attributes:
    splits: {'train': [...], 'dev': [...], 'test': [...]} of data.SpeechExample.
  """
  name = 'language_id'

  def __init__(self, splits: Dict[str, Sequence[data_lib.SpeechExample]],
               eval_batch_size: int = 32):
    self.splits = splits
    self.eval_batch_size = eval_batch_size
    self.classes = data_lib.languages_of(splits['train'])
    self.head = nn.Dense(len(self.classes), name='classifier')

  def prepare(self, backbone) -> None:
    self.backbone = backbone
    self.features = {s: backbone.speech_inputs([e.waveform for e in ex])
                     for s, ex in self.splits.items()}
    index = {c: i for i, c in enumerate(self.classes)}
    self.labels = {s: np.asarray([index.get(e.language, -1) for e in ex], np.int32)
                   for s, ex in self.splits.items()}
    self.num_train = len(self.splits['train'])
    self.shift, self.scale = 0.0, 1.0
    pool = jax.jit(self._pooled)
    self.shift, self.scale = engine.standardizer(
        np.asarray(pool(backbone.params, engine.speech_batch(
            [self.features['train'][i] for i in rows], self.eval_batch_size)))[:len(rows)]
        for rows in engine.in_batches(self.num_train, self.eval_batch_size))
    self._predict = jax.jit(self._logits)

  def _pooled(self, encoder_params, batch, rng=None, deterministic=True):
    """Standardised mean+std pooled encodings [B, 2d] (engine.standardizer)."""
    x, paddings = self.backbone.speech(encoder_params, batch['features'],
                                       batch['feature_paddings'],
                                       deterministic=deterministic, rng=rng)
    return (engine.mean_and_std(x, paddings) - self.shift) / self.scale

  def init_head(self, rng):
    return self.head.init(rng, jnp.zeros((1, 2 * self.backbone.dim)))['params']

  def _logits(self, head, encoder_params, batch, rng=None, deterministic=True):
    return self.head.apply({'params': head},
                           self._pooled(encoder_params, batch, rng, deterministic))

  def train_batch(self, indices, step=0):
    speech = engine.speech_batch([self.features['train'][i] for i in indices], len(indices))
    speech['labels'] = self.labels['train'][indices]
    return {'speech': speech}

  def loss(self, head, encoder_params, batch, rng, deterministic):
    b = batch['speech']
    logits = self._logits(head, encoder_params, b, rng, deterministic)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, b['labels']).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == b['labels'])
    return loss, {'accuracy': accuracy}

  def evaluate(self, head, encoder_params, split: str) -> Dict[str, Any]:
    feats, labels = self.features[split], self.labels[split]
    known = labels >= 0
    predictions = []
    for rows in engine.in_batches(len(feats), self.eval_batch_size, f'classifying {split}'):
      batch = engine.speech_batch([feats[i] for i in rows], self.eval_batch_size)
      logits = np.asarray(self._predict(head, encoder_params, batch))
      predictions.extend(np.argmax(logits[:len(rows)], -1).tolist())
    predictions = np.asarray(predictions)
    scores = metrics.classification_scores(predictions[known].tolist(),
                                           labels[known].tolist(), self.classes)
    scores['classes'] = list(self.classes)
    languages = np.asarray([e.language for e in self.splits[split]])
    scores['per_language'] = {
        lang: float(np.mean(predictions[languages == lang] == labels[languages == lang]))
        for lang in sorted(set(languages.tolist()))}
    return scores
