"""The one mSLAM pre-training loss: a batch of speech, text and paired parts -> total and terms.

    total = w_speech * (contrastive + 0.1 diversity + masked_prediction)
          + w_text   * span_mlm
          + w_paired * (tlm_speech + tlm_text + ctc)

Each part can be switched off in gin, which gives the paper's variants:
w2v-BERT (speech only: `gin/variants/w2v_bert.gin`), mSLAM-TLM (no CTC:
`gin/variants/mslam_tlm.gin`) and mSLAM-CTC (everything, the default).
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

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
      inferred: 1.0, 0.3, 0.03, as one secondary report gives).
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
  """The step's per-example randomness: span masks, contrastive negatives, Gumbel keys.

  Everything here is drawn for the whole batch, one row per example, so a
  batch split into micro-batches (`mslam_jax.accumulation`) sees exactly the
  masks, negatives and quantizer noise of the whole.

  Returns bool masks 'speech' [Bs, T'], 'text' [Bt, L], 'paired_speech'
  [Bp, T'p], 'paired_text' [Bp, Lp]; int32 'negatives' [Bs, T', K]; and PRNG
  keys 'speech_gumbel' [Bs] and 'paired_gumbel' [Bp], one per example, for the
  quantizer's Gumbel noise.
  """
  keys = jax.random.split(rng, 7)
  masks = {}
  if 'speech' in batch:
    paddings = frontend.encoder_paddings(batch['speech']['feature_paddings'])
    masks['speech'] = masking.span_mask(
        keys[0], paddings, start_prob=config.speech_mask_start_prob,
        span_length=config.speech_mask_span)
    masks['negatives'] = contrastive.sample_negative_indices(
        keys[1], masks['speech'], config.num_negatives)
    masks['speech_gumbel'] = jax.random.split(keys[5], paddings.shape[0])
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
    masks['paired_gumbel'] = jax.random.split(keys[6], paddings.shape[0])
  return masks


def batch_totals(batch: Batch, masks: Dict[str, jax.Array],
                 config: LossConfig) -> Dict[str, jax.Array]:
  """The counts every loss term is divided by, for the whole batch (no parameters).

  Returns float32 scalars: 'speech_masked' and 'speech_valid' (encoder frames),
  'text_masked', 'tlm_speech_masked', 'tlm_text_masked', 'ctc_feasible' and
  'ctc_infeasible' (paired examples), for the parts in `batch`.
  """
  count = lambda x: jnp.sum(x.astype(jnp.float32))
  totals = {}
  if 'speech' in batch:
    paddings = frontend.encoder_paddings(batch['speech']['feature_paddings'])
    totals.update(speech_masked=count(masks['speech']), speech_valid=count(paddings < 0.5))
  if 'text' in batch:
    totals['text_masked'] = count(masks['text'])
  if 'paired' in batch:
    p = batch['paired']
    totals.update(tlm_speech_masked=count(masks['paired_speech']),
                  tlm_text_masked=count(masks['paired_text']))
    feasible = ctc_lib.ctc_feasible(frontend.encoder_paddings(p['feature_paddings']),
                                    p['ids'], p['id_paddings'])
    totals.update(ctc_feasible=count(feasible), ctc_infeasible=count(~feasible))
  return totals


def _diversity(prob_sum, frames, totals, code_stats):
  """The diversity term of this (micro-)batch, from its code probability sum [V].

  Without `code_stats` the batch is whole: the loss of its mean distribution.
  With the whole batch's `code_stats['code_prob_sum']` (gradient
  accumulation), the loss is not a sum over examples, so each micro-batch
  contributes its share of the whole batch's value and the first-order term
  whose gradients add up to the whole batch's gradient:
      value * frames / N + slope . (prob_sum - sg(prob_sum)) / N,
  slope = d diversity / d mean at the whole batch's mean (a constant).
  """
  valid = jnp.maximum(totals['speech_valid'], 1.0)
  if code_stats is None:
    return contrastive.diversity_of_mean(prob_sum / valid)
  mean = jax.lax.stop_gradient(code_stats['code_prob_sum']) / valid
  value, slope = jax.value_and_grad(contrastive.diversity_of_mean)(mean)
  return (value * frames / valid
          + jnp.vdot(slope, prob_sum - jax.lax.stop_gradient(prob_sum)) / valid)


def _speech_terms(out, masks, totals, config: LossConfig, num_codes: int, code_stats):
  mask, paddings = masks['speech'], out['paddings']
  # One target per frame for both terms: the quantizer's code ids (the
  # Gumbel sample in training), whose codebook rows are `quantized`.
  info_nce, nce_acc = contrastive.contrastive_loss(
      out['context'], out['quantized'], out['code_ids'], mask, masks['negatives'],
      temperature=config.contrastive_temperature, normalizer=totals['speech_masked'])
  prob_sum, frames = contrastive.code_probability_sum(out['code_logits'], paddings)
  diversity = _diversity(prob_sum, frames, totals, code_stats)
  mlm, mlm_acc, _ = masked_prediction.masked_cross_entropy(
      out['code_pred_logits'], out['code_ids'], mask, normalizer=totals['speech_masked'])
  loss = (config.contrastive_weight * (info_nce + config.diversity_weight * diversity)
          + config.masked_prediction_weight * mlm)
  metrics = {
      'speech/contrastive': info_nce,
      'speech/diversity': diversity,
      'speech/masked_prediction': mlm,
      'speech/contrastive_accuracy': nce_acc,
      'speech/masked_prediction_accuracy': mlm_acc,
  }
  stats = {'code_prob_sum': jax.lax.stop_gradient(prob_sum),
           'code_counts': contrastive.code_histogram(out['code_ids'], paddings, num_codes)}
  return loss, metrics, stats


def _text_terms(out, batch, masks, totals):
  mlm, acc, _ = masked_prediction.masked_cross_entropy(
      out['char_logits'], batch['ids'], masks['text'], normalizer=totals['text_masked'])
  return mlm, {'text/span_mlm': mlm, 'text/span_mlm_accuracy': acc}


def _paired_terms(out, batch, masks, totals, config: LossConfig):
  loss = 0.0
  metrics = {}
  if config.tlm_weight:
    tlm_speech, _, _ = masked_prediction.masked_cross_entropy(
        out['tlm_code_logits'], out['code_ids'], masks['paired_speech'],
        normalizer=totals['tlm_speech_masked'])
    tlm_text, tlm_text_acc, _ = masked_prediction.masked_cross_entropy(
        out['tlm_char_logits'], batch['ids'], masks['paired_text'],
        normalizer=totals['tlm_text_masked'])
    loss = loss + config.tlm_weight * (tlm_speech + tlm_text)
    metrics.update({'paired/tlm_speech': tlm_speech, 'paired/tlm_text': tlm_text,
                    'paired/tlm_text_accuracy': tlm_text_acc})
  if config.ctc_weight:
    ctc, _, _ = ctc_lib.ctc_loss(out['ctc_logits'], out['paddings'], batch['ids'],
                                 batch['id_paddings'], normalizer=totals['ctc_feasible'])
    loss = loss + config.ctc_weight * ctc
    metrics['paired/ctc'] = ctc
  return loss, metrics


def loss_terms(params: Any, batch: Batch, masks: Dict[str, jax.Array],
               totals: Dict[str, jax.Array], step, dropout_rng: jax.Array, *,
               model_config: ModelConfig, loss_config: LossConfig,
               deterministic: bool = False, code_stats: Optional[Dict[str, jax.Array]] = None):
  """The weighted loss of `batch` with its masks, every term divided by `totals`.

  Every returned value is additive: for a batch cut into micro-batches (with
  their rows of `masks`) and the whole batch's `totals` and `code_stats`,
  the micro-batches' losses, metrics, statistics and gradients sum to the
  whole batch's. `summary_metrics` turns the totals and statistics into the
  metrics that are not sums (perplexities, temperature, rates).

  Args:
    params: the MSLAM params ({'params': ...}).
    batch: the enabled parts (LossConfig.select).
    masks: from `make_masks`; totals: from `batch_totals` (of the whole batch).
    step: train step (drives the Gumbel temperature).
    dropout_rng: PRNG key for dropout.
    model_config, loss_config: from gin.
    deterministic: True disables dropout and Gumbel noise (evaluation).
    code_stats: the whole batch's {'code_prob_sum': [V]} when `batch` is a
      micro-batch (`code_statistics`); None when it is the whole batch.

  Returns:
    (total, metrics, stats): scalar loss; each term and accuracy and each
    part's weighted sum (`*/loss`); {'code_prob_sum', 'code_counts'} [V] of
    the speech part (empty without speech).
  """
  model = MSLAM(model_config, deterministic=deterministic)
  outputs = model.apply(
      params, batch, masks, gumbel_temperature(step),
      tlm=bool(loss_config.tlm_weight), ctc=bool(loss_config.ctc_weight),
      rngs={'dropout': dropout_rng})
  total, metrics, stats = 0.0, {}, {}
  if 'speech' in outputs:
    loss, m, stats = _speech_terms(outputs['speech'], masks, totals, loss_config,
                                   model_config.num_codes, code_stats)
    total += loss_config.speech_weight * loss
    metrics.update(m, **{'speech/loss': loss})
  if 'text' in outputs:
    loss, m = _text_terms(outputs['text'], batch['text'], masks, totals)
    total += loss_config.text_weight * loss
    metrics.update(m, **{'text/loss': loss})
  if 'paired' in outputs:
    loss, m = _paired_terms(outputs['paired'], batch['paired'], masks, totals, loss_config)
    total += loss_config.paired_weight * loss
    metrics.update(m, **{'paired/loss': loss})
  return total, metrics, stats


def summary_metrics(totals: Dict[str, jax.Array], stats: Dict[str, jax.Array],
                    step) -> Dict[str, jax.Array]:
  """Metrics of the whole batch that are not sums over its examples."""
  metrics = {'gumbel_temperature': gumbel_temperature(step)}
  if 'code_counts' in stats:
    metrics['speech/code_perplexity'] = contrastive.perplexity_of_counts(stats['code_counts'])
    metrics['speech/prob_perplexity'] = contrastive.perplexity_of_counts(stats['code_prob_sum'])
    metrics['speech/masked_fraction'] = (
        totals['speech_masked'] / jnp.maximum(totals['speech_valid'], 1.0))
  if 'ctc_infeasible' in totals:
    metrics['paired/ctc_infeasible'] = totals['ctc_infeasible']
  return metrics


def code_statistics(params: Any, batch: Batch, masks: Dict[str, jax.Array], step, *,
                    model_config: ModelConfig) -> Dict[str, jax.Array]:
  """{'code_prob_sum': [V]} of the speech part, from the frontend and quantizer only.

  What `loss_terms` needs beforehand, as `code_stats`, to split the diversity
  loss over micro-batches; summed over the micro-batches of a batch it is
  the batch's. The same forward computation as the training pass (no
  dropout before the quantizer), so the sums agree to float rounding.
  """
  speech = batch['speech']
  model = MSLAM(model_config, deterministic=False)
  _, logits, paddings = model.apply(
      params, speech['features'], speech['feature_paddings'], gumbel_temperature(step),
      masks['speech_gumbel'], method=MSLAM.speech_codes)
  prob_sum, _ = contrastive.code_probability_sum(logits, paddings)
  return {'code_prob_sum': prob_sum}


def pretrain_loss(params: Any, batch: Batch, rng: jax.Array, step, *,
                  model_config: ModelConfig, loss_config: LossConfig,
                  deterministic: bool = False):
  """Total pre-training loss and every term, for one whole batch.

  Args:
    params: the MSLAM params ({'params': ...}).
    batch: {'speech': ..., 'text': ..., 'paired': ...} as in `mslam_jax.models.mslam`.
    rng: PRNG key for masks, negatives, Gumbel noise and dropout.
    step: training step (drives the Gumbel temperature).
    model_config, loss_config: from gin.
    deterministic: True disables dropout and Gumbel noise (evaluation).

  Returns:
    (total, metrics): scalar loss and a flat dict of scalars ('loss' included).
  """
  batch = loss_config.select(batch)
  mask_rng, dropout_rng = jax.random.split(rng)
  masks = make_masks(mask_rng, batch, loss_config)
  totals = batch_totals(batch, masks, loss_config)
  total, metrics, stats = loss_terms(params, batch, masks, totals, step, dropout_rng,
                                     model_config=model_config, loss_config=loss_config,
                                     deterministic=deterministic)
  metrics.update(summary_metrics(totals, stats, step), loss=total)
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
