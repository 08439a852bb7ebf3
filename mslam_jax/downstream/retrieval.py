"""Cross-modal retrieval on the frozen encoder: does speech land near its own transcript?

    speech  -> backbone (layer) -> mean over valid frames -> [n, d] -> minus its mean over n
    text    -> backbone (layer) -> mean over characters   -> [n, d] -> minus its mean over n
    cosine similarities [n, n] -> recall@1 and @5, speech->text and text->speech

Nothing is trained: this reads the shared space mSLAM claims (Bapna et al.
2022) directly. Chance is k/n. Needs a backbone with a text input (an export).

Each modality is centred on its own mean over the split (ours). Pooled
encodings of a briefly pre-trained encoder share one large common component
(benchmarks/RESULTS.md); uncentred, every speech query then ranks the text
keys in the same order, a "hub" that scores exactly 1/n and k/n whatever the
encoder learned. Centring removes only that shared offset, not what tells
utterances apart; the uncentred recalls are reported too ('uncentred_' keys).
"""

from typing import Any, Dict, Sequence

import jax
import numpy as np

from mslam_jax.downstream import data as data_lib
from mslam_jax.downstream import engine
from mslam_jax.downstream import metrics


class Retrieval(engine.Evaluation):
  """Speech <-> transcript retrieval over each split's utterances."""
  name = 'retrieval'

  def __init__(self, splits: Dict[str, Sequence[data_lib.SpeechExample]],
               eval_batch_size: int = 32, ks: Sequence[int] = (1, 5)):
    self.splits = splits
    self.eval_batch_size = eval_batch_size
    self.ks = tuple(ks)

  def prepare(self, backbone) -> None:
    if not backbone.has_text:
      raise ValueError(f'retrieval needs a backbone with a text input; {backbone.name} has none')
    self.backbone = backbone
    self.features = {s: backbone.speech_inputs([e.waveform for e in ex])
                     for s, ex in self.splits.items() if s != 'train'}
    self.ids = {s: backbone.text_ids([e.transcript for e in ex])
                for s, ex in self.splits.items() if s != 'train'}
    self._speech = jax.jit(lambda p, b: engine.masked_mean(
        *backbone.speech(p, b['features'], b['feature_paddings'])))
    self._text = jax.jit(lambda p, b: engine.masked_mean(
        *backbone.text(p, b['ids'], b['id_paddings'])))

  def init_head(self, rng):
    return {}

  def embeddings(self, encoder_params, split: str):
    """(speech [n, d], text [n, d]) mean-pooled encodings of the split."""
    speech, text = [], []
    feats, ids = self.features[split], self.ids[split]
    for rows in engine.in_batches(len(feats), self.eval_batch_size, f'encoding {split}'):
      s = self._speech(encoder_params, engine.speech_batch([feats[i] for i in rows],
                                                           self.eval_batch_size))
      t = self._text(encoder_params, engine.ids_batch([ids[i] for i in rows],
                                                      self.eval_batch_size))
      speech.append(np.asarray(s)[:len(rows)])
      text.append(np.asarray(t)[:len(rows)])
    return np.concatenate(speech), np.concatenate(text)

  def evaluate(self, head, encoder_params, split: str) -> Dict[str, Any]:
    speech, text = self.embeddings(encoder_params, split)
    scores = {'examples': len(speech)}
    for prefix, (s, t) in (('', (speech - speech.mean(0), text - text.mean(0))),
                           ('uncentred_', (speech, text))):
      for name, (q, k) in {'speech_to_text': (s, t), 'text_to_speech': (t, s)}.items():
        for key, value in metrics.retrieval_recall(q, k, self.ks).items():
          scores[f'{prefix}{name}_{key}'] = value
    scores['chance@1'] = 1.0 / len(speech)
    return scores
