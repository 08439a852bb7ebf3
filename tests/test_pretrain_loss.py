"""The combined pre-training loss: finite gradients per term, learning, variants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import init_params, small_batch, tiny_configs
from mslam_jax import pretrain_loss

LOSS_TERMS = ('speech/contrastive', 'speech/diversity', 'speech/masked_prediction',
              'text/span_mlm', 'paired/tlm_speech', 'paired/tlm_text', 'paired/ctc')


# Small batches hold few frames: raise the mask rates so every term sees
# masked positions (the paper's rates are tested in test_masking.py).
DENSE_MASKS = ('LossConfig.speech_mask_start_prob = 0.3', 'LossConfig.speech_mask_span = 3',
               'LossConfig.text_mask_rate = 0.4', 'LossConfig.text_mask_span = 3',
               'LossConfig.tlm_text_mask_span = 3')


@pytest.fixture
def dense():
  return tiny_configs(*DENSE_MASKS)


def test_every_loss_term_has_finite_nonzero_gradients(dense):
  mc, lc = dense
  batch = small_batch()
  params = init_params(mc, lc, batch)

  def terms(p):
    _, metrics = pretrain_loss.pretrain_loss(p, batch, jax.random.key(1), 0,
                                             model_config=mc, loss_config=lc)
    return jnp.stack([metrics[k] for k in LOSS_TERMS])

  values, grads = jax.jit(lambda p: (terms(p), jax.jacrev(terms)(p)))(params)
  assert np.all(np.isfinite(values)) and np.all(np.asarray(values) > 0)
  for i, name in enumerate(LOSS_TERMS):
    leaves = [g[i] for g in jax.tree.leaves(grads)]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0, name


def test_total_is_the_weighted_sum_of_terms():
  mc, lc = tiny_configs(*DENSE_MASKS, 'LossConfig.speech_weight = 0.7', 'LossConfig.text_weight = 0.2',
                       'LossConfig.paired_weight = 0.05', 'LossConfig.diversity_weight = 0.3')
  batch = small_batch()
  params = init_params(mc, lc, batch)
  total, m = jax.jit(lambda p: pretrain_loss.pretrain_loss(
      p, batch, jax.random.key(2), 0, model_config=mc, loss_config=lc))(params)
  speech = m['speech/contrastive'] + 0.3 * m['speech/diversity'] + m['speech/masked_prediction']
  paired = m['paired/tlm_speech'] + m['paired/tlm_text'] + m['paired/ctc']
  np.testing.assert_allclose(total, 0.7 * speech + 0.2 * m['text/span_mlm'] + 0.05 * paired,
                             rtol=1e-5)


def test_adam_steps_on_a_fixed_batch_lower_the_loss(dense):
  mc, lc = dense
  batch = small_batch(3)
  params = init_params(mc, lc, batch)
  optimizer = optax.adam(3e-3)
  rng = jax.random.key(4)  # fixed masks, so the loss is one function of the params

  @jax.jit
  def step(params, opt_state):
    (loss, _), grads = jax.value_and_grad(
        lambda p: pretrain_loss.pretrain_loss(p, batch, rng, 0, model_config=mc,
                                              loss_config=lc), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(8):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize('variant,present,absent', [
    ('w2v_bert', ['speech/contrastive', 'speech/masked_prediction'],
     ['text/span_mlm', 'paired/tlm_text', 'paired/ctc']),
    ('mslam_tlm', ['speech/contrastive', 'text/span_mlm', 'paired/tlm_speech',
                   'paired/tlm_text'], ['paired/ctc']),
    ('mslam_ctc', ['speech/contrastive', 'text/span_mlm', 'paired/tlm_text', 'paired/ctc'], []),
])
def test_paper_variants_switch_terms(variant, present, absent):
  from mslam_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin(['gin/pretrain_tiny_cpu.gin', f'gin/variants/{variant}.gin'])
  from mslam_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  mc, lc = ModelConfig(), pretrain_loss.LossConfig()
  batch = small_batch()  # all parts fed; disabled ones are dropped
  params = jax.eval_shape(lambda: pretrain_loss.init_params(
      jax.random.key(0), batch, model_config=mc, loss_config=lc))
  _, metrics = jax.eval_shape(lambda p: pretrain_loss.pretrain_loss(
      p, batch, jax.random.key(0), 0, model_config=mc, loss_config=lc), params)
  assert all(k in metrics for k in present), sorted(metrics)
  assert not any(k in metrics for k in absent), sorted(metrics)
  heads = set(params['params'])
  if variant == 'w2v_bert':
    assert not {'text_embedding', 'char_head', 'ctc_head'} & heads
  if variant == 'mslam_tlm':
    assert 'ctc_head' not in heads and 'char_head' in heads


def test_missing_enabled_part_is_a_clear_error(tiny):
  mc, lc = tiny
  with pytest.raises(KeyError, match='use_paired'):
    lc.select(small_batch(parts=('speech', 'text')))


def test_all_parts_off_is_rejected():
  with pytest.raises(ValueError, match='switch at least one'):
    pretrain_loss.LossConfig(use_speech=False, use_text=False, use_paired=False)


def test_an_empty_row_adds_nothing(dense):
  """A skipped example's all-padding row (sampler.py): finite terms and gradients,
  and whatever its padded values hold, the loss is the same."""
  mc, lc = dense
  batch = jax.tree.map(np.array, small_batch())
  for part in batch.values():
    for key in ('feature_paddings', 'id_paddings'):
      if key in part:
        part[key][0] = 1.0
    for key in ('features', 'ids'):
      if key in part:
        part[key][0] = 0
  params = init_params(mc, lc, batch)
  loss = jax.jit(lambda p, b: pretrain_loss.pretrain_loss(
      p, b, jax.random.key(3), 0, model_config=mc, loss_config=lc))
  total, metrics = loss(params, batch)
  grads = jax.grad(lambda p: loss(p, batch)[0])(params)
  assert all(np.isfinite(float(metrics[k])) for k in LOSS_TERMS)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  noisy = jax.tree.map(np.copy, batch)
  rng = np.random.default_rng(0)
  for part in noisy.values():
    if 'features' in part:
      part['features'][0] = rng.normal(size=part['features'][0].shape)
    if 'ids' in part:
      part['ids'][0] = rng.integers(5, 20, size=part['ids'][0].shape)
  np.testing.assert_allclose(loss(params, noisy)[0], total, rtol=1e-5)
