"""The one mSLAM pre-training loss: a batch of speech, text and paired parts -> total and terms.

    total = w_speech * (contrastive + 0.1 diversity + masked_prediction)
          + w_text   * span_mlm
          + w_paired * (tlm_speech + tlm_text + ctc)

Each part can be switched off in gin, which gives the paper's variants:
w2v-BERT (speech only: `gin/variants/w2v_bert.gin`), mSLAM-TLM (no CTC:
`gin/variants/mslam_tlm.gin`) and mSLAM-CTC (everything, the default).
"""

import dataclasses
from typing import Any, Dict, Tuple

import gin
import jax
import jax.numpy as jnp

from mslam_jax import masking
from mslam_jax.losses import contrastive
from mslam_jax.losses import ctc as ctc_lib
from mslam_jax.losses import masked_prediction
from mslam_jax.models import frontend
from mslam_jax.models.config import ModelConfig
from mslam_jax.models.mslam import MSLAM
from mslam_jax.models.quantizer import gumbel_temperature

Batch = Dict[str, Dict[str, jax.Array]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which data kinds and terms are on, their weights, and the masking.

  Attributes:
    use_speech, use_text, use_paired: data kinds in the batch (False drops that part).
    speech_weight, text_weight, paired_weight: per-kind weights (unpublished;
      PAPER.md quotes one report: 1.0, 0.3, 0.03).
    contrastive_weight, masked_prediction_weight: w2v-BERT's two terms (paper: 1, 1).
    diversity_weight: codebook diversity inside the contrastive term (paper: 0.1).
    tlm_weight, ctc_weight: paired terms; ctc_weight = 0 gives mSLAM-TLM, and a
      zero weight skips that computation altogether.
    num_negatives: contrastive distractors K (paper: 100).
    contrastive_temperature: InfoNCE kappa (inferred: 0.1, wav2vec 2.0).
    speech_mask_start_prob, speech_mask_span: speech masking (paper: 0.065, 10).
    text_mask_rate, text_mask_span: SpanBERT masking (paper: about 15%, spans of 20).
    tlm_speech_mask_rate, tlm_text_mask_rate: TLM masking of the paired halves
      (SLAM: about 75% of frames, 50% of characters).
    tlm_speech_mask_span, tlm_text_mask_span: span lengths for TLM (inferred:
      as for unpaired speech and text).
  """
  use_speech: bool = True
  use_text: bool = True
  use_paired: bool = True
  speech_weight: float = 1.0
  text_weight: float = 0.3
  paired_weight: float = 0.03
  contrastive_weight: float = 1.0
  diversity_weight: float = 0.1
  masked_prediction_weight: float = 1.0
  tlm_weight: float = 1.0
  ctc_weight: float = 1.0
  num_negatives: int = 100
  contrastive_temperature: float = 0.1
  speech_mask_start_prob: float = 0.065
  speech_mask_span: int = 10
  text_mask_rate: float = 0.15
  text_mask_span: int = 20
  tlm_speech_mask_rate: float = 0.75
  tlm_speech_mask_span: int = 10
  tlm_text_mask_rate: float = 0.5
  tlm_text_mask_span: int = 20

  def __post_init__(self):
    if not (self.use_speech or self.use_text or self.use_paired):
      raise ValueError('LossConfig: use_speech, use_text and use_paired are all False; '
                       'switch at least one data kind on in gin.')
    if self.use_paired and self.tlm_weight == 0 and self.ctc_weight == 0:
      raise ValueError('LossConfig: use_paired=True but tlm_weight and ctc_weight are 0; '
                       'set LossConfig.use_paired = False instead.')

  @property
  def parts(self) -> Tuple[str, ...]:
    names = (('speech', self.use_speech), ('text', self.use_text),
             ('paired', self.use_paired))
    return tuple(name for name, on in names if on)

  def select(self, batch: Batch) -> Batch:
    """The enabled parts of `batch`; a missing enabled part is an error."""
    missing = [p for p in self.parts if p not in batch]
    if missing:
      raise KeyError(f'LossConfig enables {missing} but the batch has only '
                     f'{sorted(batch)}; feed those parts or switch them off in gin '
                     '(LossConfig.use_speech / use_text / use_paired).')
    return {p: batch[p] for p in self.parts}


def make_masks(rng: jax.Array, batch: Batch, config: LossConfig) -> Dict[str, jax.Array]:
  """Span masks for every enabled part, and contrastive negatives for speech.

  Returns bool masks 'speech' [Bs, T'], 'text' [Bt, L], 'paired_speech'
  [Bp, T'p], 'paired_text' [Bp, Lp], and int32 'negatives' [Bs, T', K].
  """
  keys = jax.random.split(rng, 5)
  masks = {}
  if 'speech' in batch:
    paddings = frontend.encoder_paddings(batch['speech']['feature_paddings'])
    masks['speech'] = masking.span_mask(
        keys[0], paddings, start_prob=config.speech_mask_start_prob,
        span_length=config.speech_mask_span)
    masks['negatives'] = contrastive.sample_negative_indices(
        keys[1], masks['speech'], config.num_negatives)
  if 'text' in batch:
    masks['text'] = masking.span_mask(
        keys[2], batch['text']['id_paddings'],
        start_prob=masking.start_prob_for_rate(config.text_mask_rate, config.text_mask_span),
        span_length=config.text_mask_span)
  if 'paired' in batch:
    paddings = frontend.encoder_paddings(batch['paired']['feature_paddings'])
    masks['paired_speech'] = masking.span_mask(
        keys[3], paddings,
        start_prob=masking.start_prob_for_rate(config.tlm_speech_mask_rate,
                                               config.tlm_speech_mask_span),
        span_length=config.tlm_speech_mask_span)
    masks['paired_text'] = masking.span_mask(
        keys[4], batch['paired']['id_paddings'],
        start_prob=masking.start_prob_for_rate(config.tlm_text_mask_rate,
                                               config.tlm_text_mask_span),
        span_length=config.tlm_text_mask_span)
  return masks


def _speech_terms(out, masks, config: LossConfig, num_codes: int):
  mask = masks['speech']
  paddings = out['paddings']
  info_nce, nce_acc = contrastive.contrastive_loss(
      out['context'], out['quantized'], mask, masks['negatives'],
      temperature=config.contrastive_temperature)
  diversity, prob_ppl = contrastive.diversity_loss(out['code_logits'], paddings)
  mlm, mlm_acc, _ = masked_prediction.masked_cross_entropy(
      out['code_pred_logits'], jax.lax.stop_gradient(out['code_ids']), mask)
  loss = (config.contrastive_weight * (info_nce + config.diversity_weight * diversity)
          + config.masked_prediction_weight * mlm)
  valid = jnp.maximum(jnp.sum(1.0 - paddings), 1.0)
  metrics = {
      'speech/contrastive': info_nce,
      'speech/diversity': diversity,
      'speech/masked_prediction': mlm,
      'speech/contrastive_accuracy': nce_acc,
      'speech/masked_prediction_accuracy': mlm_acc,
      'speech/prob_perplexity': prob_ppl,
      'speech/code_perplexity': contrastive.code_perplexity(out['code_ids'], paddings,
                                                            num_codes),
      'speech/masked_fraction': jnp.sum(mask) / valid,
  }
  return loss, metrics


def _text_terms(out, batch, masks):
  mlm, acc, _ = masked_prediction.masked_cross_entropy(
      out['char_logits'], batch['ids'], masks['text'])
  return mlm, {'text/span_mlm': mlm, 'text/span_mlm_accuracy': acc}


def _paired_terms(out, batch, masks, config: LossConfig):
  loss = 0.0
  metrics = {}
  if config.tlm_weight:
    tlm_speech, _, _ = masked_prediction.masked_cross_entropy(
        out['tlm_code_logits'], jax.lax.stop_gradient(out['code_ids']),
        masks['paired_speech'])
    tlm_text, tlm_text_acc, _ = masked_prediction.masked_cross_entropy(
        out['tlm_char_logits'], batch['ids'], masks['paired_text'])
    loss = loss + config.tlm_weight * (tlm_speech + tlm_text)
    metrics.update({'paired/tlm_speech': tlm_speech, 'paired/tlm_text': tlm_text,
                    'paired/tlm_text_accuracy': tlm_text_acc})
  if config.ctc_weight:
    ctc, _, infeasible = ctc_lib.ctc_loss(
        out['ctc_logits'], out['paddings'], batch['ids'], batch['id_paddings'])
    loss = loss + config.ctc_weight * ctc
    metrics.update({'paired/ctc': ctc, 'paired/ctc_infeasible': infeasible})
  return loss, metrics


def pretrain_loss(params: Any, batch: Batch, rng: jax.Array, step, *,
                  model_config: ModelConfig, loss_config: LossConfig,
                  deterministic: bool = False):
  """Total pre-training loss and every term.

  Args:
    params: the MSLAM params ({'params': ...}).
    batch: {'speech': ..., 'text': ..., 'paired': ...} as in `mslam_jax.models.mslam`.
    rng: PRNG key for masks, negatives, dropout and Gumbel noise.
    step: training step (drives the Gumbel temperature).
    model_config, loss_config: from gin.
    deterministic: True disables dropout and Gumbel noise (evaluation).

  Returns:
    (total, metrics): scalar loss and a flat dict of scalars ('loss' included).
  """
  batch = loss_config.select(batch)
  mask_rng, dropout_rng, gumbel_rng = jax.random.split(rng, 3)
  masks = make_masks(mask_rng, batch, loss_config)
  temperature = gumbel_temperature(step)
  model = MSLAM(model_config, deterministic=deterministic)
  outputs = model.apply(
      params, batch, masks, temperature,
      tlm=bool(loss_config.tlm_weight), ctc=bool(loss_config.ctc_weight),
      rngs={'dropout': dropout_rng, 'gumbel': gumbel_rng})
  total = 0.0
  metrics = {'gumbel_temperature': temperature}
  if 'speech' in outputs:
    loss, m = _speech_terms(outputs['speech'], masks, loss_config, model_config.num_codes)
    total += loss_config.speech_weight * loss
    metrics.update(m, **{'speech/loss': loss})
  if 'text' in outputs:
    loss, m = _text_terms(outputs['text'], batch['text'], masks)
    total += loss_config.text_weight * loss
    metrics.update(m, **{'text/loss': loss})
  if 'paired' in outputs:
    loss, m = _paired_terms(outputs['paired'], batch['paired'], masks, loss_config)
    total += loss_config.paired_weight * loss
    metrics.update(m, **{'paired/loss': loss})
  metrics['loss'] = total
  return total, metrics


def init_params(rng: jax.Array, batch: Batch, *, model_config: ModelConfig,
                loss_config: LossConfig):
  """MSLAM variables for the parts and heads that `loss_config` enables.

  Call under `jax.eval_shape` to get abstract (shape-only) parameters.
  """
  batch = loss_config.select(batch)
  masks = make_masks(rng, batch, loss_config)
  model = MSLAM(model_config, deterministic=True)
  return model.init(rng, batch, masks, 1.0, tlm=bool(loss_config.tlm_weight),
                    ctc=bool(loss_config.ctc_weight))
