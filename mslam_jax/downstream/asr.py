"""ASR with a CTC head over characters; also the CTC probe of frozen speech encodings.

    speech -> backbone [B, T', d] -> standardised (training-set statistics per channel)
           -> dense -> [B, T', vocab] -> CTC (blank = PAD id)

The targets are the transcripts in the backbone's character vocabulary.
Decoding is greedy (best path, repeats merged, blanks dropped); scores are CER
and WER from jiwer (metrics.error_rates). With a frozen encoder this is the
paper's cross-modal evidence: a linear CTC probe reads text back from speech
encodings (mSLAM, Bapna et al. 2022).
"""

from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mslam_jax import special_ids
from mslam_jax.downstream import data as data_lib
from mslam_jax.downstream import engine
from mslam_jax.downstream import metrics
from mslam_jax.losses import ctc as ctc_lib


def ctc_greedy(ids: np.ndarray, valid: int) -> list:
  """Best-path ids [T'] -> labels: merge repeats, drop blanks, first `valid` frames only."""
  out, previous = [], None
  for i in ids[:valid].tolist():
    if i != previous and i != special_ids.CTC_BLANK_ID:
      out.append(i)
    previous = i
  return out


class Asr(engine.Evaluation):
  """CTC ASR on `splits` (data.SpeechExample lists with transcripts)."""
  name = 'asr'

  def __init__(self, splits: Dict[str, Sequence[data_lib.SpeechExample]],
               eval_batch_size: int = 32):
    self.splits = splits
    self.eval_batch_size = eval_batch_size

  def prepare(self, backbone) -> None:
    self.backbone = backbone
    self.vocab_size = backbone.vocabulary.vocab_size
    engine.check_vocabulary_covers(backbone.vocabulary,
                                   [e.transcript for e in self.splits['train']],
                                   f'{self.name} transcripts')
    self.head = nn.Dense(self.vocab_size, name='ctc_head')
    self.features = {s: backbone.speech_inputs([e.waveform for e in ex])
                     for s, ex in self.splits.items()}
    self.labels = {s: backbone.text_ids([e.transcript for e in ex])
                   for s, ex in self.splits.items()}
    self.num_train = len(self.splits['train'])
    frames = jax.jit(lambda p, b: self.backbone.speech(p, b['features'], b['feature_paddings']))
    valid_frames = []
    for rows in engine.in_batches(self.num_train, self.eval_batch_size):
      x, paddings = jax.device_get(frames(backbone.params, engine.speech_batch(
          [self.features['train'][i] for i in rows], self.eval_batch_size)))
      valid_frames.append(x[paddings < 0.5])
    self.shift, self.scale = engine.standardizer(valid_frames)
    self._predict = jax.jit(self._logits)

  def init_head(self, rng):
    return self.head.init(rng, jnp.zeros((1, 1, self.backbone.dim)))['params']

  def _logits(self, head, encoder_params, batch, rng=None, deterministic=True):
    x, paddings = self.backbone.speech(encoder_params, batch['features'],
                                       batch['feature_paddings'],
                                       deterministic=deterministic, rng=rng)
    return self.head.apply({'params': head}, (x - self.shift) / self.scale), paddings

  def train_batch(self, indices, step=0):
    speech = engine.speech_batch([self.features['train'][i] for i in indices], len(indices))
    speech.update(engine.ids_batch([self.labels['train'][i] for i in indices], len(indices)))
    return {'speech': speech}

  def loss(self, head, encoder_params, batch, rng, deterministic):
    b = batch['speech']
    logits, paddings = self._logits(head, encoder_params, b, rng, deterministic)
    loss, _, infeasible = ctc_lib.ctc_loss(logits, paddings, b['ids'], b['id_paddings'])
    return loss, {'ctc_infeasible': infeasible}

  def transcribe(self, head, encoder_params, split: str):
    feats = self.features[split]
    hypotheses = []
    for rows in engine.in_batches(len(feats), self.eval_batch_size, f'transcribing {split}'):
      batch = engine.speech_batch([feats[i] for i in rows], self.eval_batch_size)
      logits, paddings = jax.device_get(self._predict(head, encoder_params, batch))
      best = np.argmax(logits, -1)
      for row in range(len(rows)):
        valid = int(np.sum(paddings[row] < 0.5))
        hypotheses.append(self.backbone.vocabulary.decode(ctc_greedy(best[row], valid)))
    return hypotheses

  def evaluate(self, head, encoder_params, split: str) -> Dict[str, Any]:
    hypotheses = self.transcribe(head, encoder_params, split)
    references = [e.transcript for e in self.splits[split]]
    scores = metrics.error_rates(hypotheses, references)
    languages = [e.language for e in self.splits[split]]
    scores['per_language'] = {}
    for lang in sorted(set(languages)):
      pick = [i for i, l in enumerate(languages) if l == lang]
      scores['per_language'][lang] = metrics.error_rates(
          [hypotheses[i] for i in pick], [references[i] for i in pick])['cer']
    scores['examples'] = [{'reference': r, 'hypothesis': h}
                          for r, h in list(zip(references, hypotheses))[:3]]
    return scores
