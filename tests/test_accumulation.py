"""Gradient accumulation equals the whole batch: loss, every metric and every gradient."""

import jax
import numpy as np
import pytest

from conftest import assert_trees_close, init_params, small_batch, tiny_configs
from mslam_jax import accumulation
from mslam_jax import pretrain_loss
from mslam_jax.data.batch_spec import BatchConfig

BATCH = BatchConfig(speech_batch_size=4, text_batch_size=4, paired_batch_size=4,
                    speech_frames=64, text_length=24, paired_frames=48, paired_text_length=8)
# Masks dense enough that every micro-batch has masked positions, and unequal
# counts per example, so that averaging per-micro-batch means would be wrong.
MASKS = ('LossConfig.speech_mask_start_prob = 0.2', 'LossConfig.speech_mask_span = 3',
         'LossConfig.text_mask_rate = 0.3', 'LossConfig.text_mask_span = 3',
         'LossConfig.tlm_text_mask_span = 3', 'LossConfig.num_negatives = 6',
         # One layer per stack: the scans compile faster and test the same thing.
         'ModelConfig.num_speech_layers = 1', 'ModelConfig.num_shared_layers = 1')


def _variable_lengths(batch):
  """Shorter utterances and lines in some rows, so counts differ between micro-batches."""
  batch = jax.tree.map(np.array, batch)
  for part, key, pad_key, lengths in (('speech', 'features', 'feature_paddings', (64, 40, 20, 52)),
                                      ('text', 'ids', 'id_paddings', (24, 6, 15, 24))):
    for row, length in enumerate(lengths):
      batch[part][pad_key][row, length:] = 1.0
      batch[part][key][row, length:] = 0
  return batch


@pytest.mark.parametrize('accumulate_steps', [4])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(accumulate_steps):
  model_config, loss_config = tiny_configs(*MASKS)
  batch = _variable_lengths(jax.device_get(small_batch(config=BATCH)))
  params = init_params(model_config, loss_config, batch)
  rng, step = jax.random.key(7), 3

  @jax.jit
  def whole(p):
    return jax.value_and_grad(pretrain_loss.pretrain_loss, has_aux=True)(
        p, batch, rng, step, model_config=model_config, loss_config=loss_config)

  @jax.jit
  def micro(p):
    return accumulation.loss_and_grads(p, batch, rng, step, accumulate_steps=accumulate_steps,
                                       model_config=model_config, loss_config=loss_config)

  (want_loss, want_metrics), want_grads = whole(params)
  loss, metrics, grads = micro(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert set(metrics) == set(want_metrics)
  for key, value in want_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
  # The diversity term and the count-normalised terms are the ones a plain
  # average of micro-batch means gets wrong: they must be in the comparison.
  assert float(want_metrics['speech/diversity']) > 0
  assert_trees_close(grads, want_grads, rtol=2e-3, atol=2e-6)


def test_averaging_micro_batch_means_would_differ():
  """Sensitivity of the test above: means over two halves, averaged, miss the whole batch."""
  model_config, loss_config = tiny_configs(*MASKS)
  batch = _variable_lengths(jax.device_get(small_batch(config=BATCH)))
  params = init_params(model_config, loss_config, batch)
  batch = loss_config.select(batch)
  masks = pretrain_loss.make_masks(jax.random.key(1), batch, loss_config)
  halves = accumulation.split_micro((batch, masks), 2)

  def loss(b, m):
    totals = pretrain_loss.batch_totals(b, m, loss_config)
    return pretrain_loss.loss_terms(params, b, m, totals, 0, jax.random.key(2),
                                    model_config=model_config, loss_config=loss_config)[1]

  whole = jax.jit(loss)(batch, masks)
  averaged = [jax.jit(loss)(*jax.tree.map(lambda x, i=i: x[i], halves)) for i in range(2)]
  for key in ('speech/contrastive', 'speech/diversity', 'text/span_mlm'):
    mean = (float(averaged[0][key]) + float(averaged[1][key])) / 2
    assert abs(mean - float(whole[key])) > 1e-3 * abs(float(whole[key])), key
