"""Loss and gradients of a whole batch, computed in micro-batches (gradient accumulation).

    whole batch -> masks, negatives, Gumbel keys (one row per example)
                -> totals: the counts each term is divided by (masked frames,
                   masked characters, feasible CTC examples, valid frames)
                -> [speech on] pass 1: the whole batch's code probability sum,
                   from the frontend and quantizer of each micro-batch
                -> pass 2, per micro-batch: value_and_grad of the terms divided
                   by the whole batch's totals; losses, metrics and gradients summed

Averaging per-micro-batch means is not the whole batch's mean when a term is
divided by a count that varies between micro-batches (masked frames differ per
utterance), and the diversity loss is a nonlinear function of the whole batch's
mean code distribution. Summing numerators and dividing by the whole batch's
counts makes the result equal the whole batch's loss and gradient, to float
rounding, at 1/k of the activation memory. The only other cost is pass 1 (the
conv frontend and the quantizer, forward only) when the batch has speech.

Dropout is the one piece of randomness drawn per micro-batch (Flax draws it
per call): with dropout on, the accumulated gradient is another sample from
the same distribution, not the whole batch's sample.
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from mslam_jax import pretrain_loss
from mslam_jax.models.config import ModelConfig


def split_micro(tree, num_micro: int):
  """[B, ...] -> [num_micro, B / num_micro, ...] for every leaf (PRNG key arrays too).

  Micro-batch i holds rows i, i + num_micro, i + 2 num_micro, ...: a batch
  sharded over devices in contiguous blocks then gives every device an equal
  share of every micro-batch (with contiguous micro-batches, each would sit
  on a few devices and the others would wait or receive copies).
  """
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by accumulate_steps='
                       f'{num_micro}; make every BatchConfig batch size a multiple of it')
    strided = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    return jnp.swapaxes(strided, 0, 1)
  return jax.tree.map(split, tree)


def _zeros_like_tree(shapes):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def loss_and_grads(params: Any, batch, rng: jax.Array, step, *, accumulate_steps: int,
                   model_config: ModelConfig, loss_config: pretrain_loss.LossConfig
                   ) -> Tuple[jax.Array, Dict[str, jax.Array], Any]:
  """(loss, metrics, grads) of the whole batch, as `pretrain_loss.pretrain_loss` gives them.

  Args:
    params: the MSLAM params ({'params': ...}).
    batch: the global batch (every enabled part's batch size divisible by
      accumulate_steps).
    rng: the step's PRNG key, split as `pretrain_loss` splits it.
    step: train step (Gumbel temperature).
    accumulate_steps: k micro-batches; 1 differentiates `pretrain_loss` directly.
    model_config, loss_config: from gin.

  Returns:
    the scalar loss, the metrics dict of `pretrain_loss` and the gradients
    with respect to params.
  """
  kwargs = dict(model_config=model_config, loss_config=loss_config)
  if accumulate_steps == 1:
    (loss, metrics), grads = jax.value_and_grad(pretrain_loss.pretrain_loss, has_aux=True)(
        params, batch, rng, step, **kwargs)
    return loss, metrics, grads

  batch = loss_config.select(batch)
  mask_rng, dropout_rng = jax.random.split(rng)
  masks = pretrain_loss.make_masks(mask_rng, batch, loss_config)
  totals = pretrain_loss.batch_totals(batch, masks, loss_config)
  micro = split_micro((batch, masks), accumulate_steps)
  first = jax.tree.map(lambda x: x[0], micro)

  code_stats = None
  if 'speech' in batch:
    def stats_of(micro_batch):
      return pretrain_loss.code_statistics(params, *micro_batch, step,
                                           model_config=model_config)

    def add_stats(carry, micro_batch):
      return jax.tree.map(jnp.add, carry, stats_of(micro_batch)), None

    code_stats, _ = jax.lax.scan(add_stats, _zeros_like_tree(jax.eval_shape(stats_of, first)),
                                 micro)

  def terms(p, micro_batch, micro_masks, dropout_key):
    total, metrics, stats = pretrain_loss.loss_terms(
        p, micro_batch, micro_masks, totals, step, dropout_key, code_stats=code_stats,
        **kwargs)
    return total, (metrics, stats)

  grad_fn = jax.value_and_grad(terms, has_aux=True)

  def add_micro(carry, xs):
    index, (micro_batch, micro_masks) = xs
    out = grad_fn(params, micro_batch, micro_masks, jax.random.fold_in(dropout_rng, index))
    return jax.tree.map(jnp.add, carry, out), None

  shapes = jax.eval_shape(grad_fn, params, *first, dropout_rng)
  (loss, (metrics, stats)), grads = jax.lax.scan(
      add_micro, _zeros_like_tree(shapes), (jnp.arange(accumulate_steps), micro))[0]
  metrics.update(pretrain_loss.summary_metrics(totals, stats, step), loss=loss)
  return loss, metrics, grads
