"""InfoNCE, diversity loss, perplexity and negative sampling against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_configs
from mslam_jax.losses import contrastive
from mslam_jax.models.quantizer import GumbelQuantizer


def numpy_info_nce(context, quantized, code_ids, mask, negatives, temperature):
  """Plain per-frame InfoNCE: K + 1 cosines each, same-id distractors dropped."""
  losses, hits = [], []
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if not mask[b, t]:
        continue
      c = context[b, t].astype(np.float64)
      cands = [t] + list(negatives[b, t])
      sims = []
      for k, s in enumerate(cands):
        if k > 0 and code_ids[b, s] == code_ids[b, t]:
          continue
        q = quantized[b, s].astype(np.float64)
        sims.append(c @ q / (np.linalg.norm(c) * np.linalg.norm(q)) / temperature)
      sims = np.array(sims)
      m = sims.max()
      losses.append(m + np.log(np.sum(np.exp(sims - m))) - sims[0])
      hits.append(float(np.argmax(sims) == 0))
  return np.mean(losses), np.mean(hits)


def _random_case(seed, batch=3, time=11, dim=6, codes=3, k=5):
  rng = np.random.default_rng(seed)
  context = rng.normal(size=(batch, time, dim)).astype(np.float32)
  codebook = rng.normal(size=(codes, dim)).astype(np.float32)
  # Few distinct codes, so many distractors share the target's id and are dropped.
  code_ids = rng.integers(0, codes, size=(batch, time)).astype(np.int32)
  quantized = codebook[code_ids]
  paddings = np.zeros((batch, time), np.float32)
  paddings[1, 7:] = 1.0  # a shorter utterance: its padded frames are never scored
  context[1, 7:] = 0.0
  mask = (rng.random((batch, time)) < 0.6) & (paddings == 0)
  mask[:, :2] = True
  negatives = np.asarray(contrastive.sample_negative_indices(
      jax.random.key(seed), jnp.asarray(mask), k))
  return context, quantized, code_ids, mask, negatives


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_info_nce_equals_numpy(seed):
  context, quantized, code_ids, mask, negatives = _random_case(seed)
  loss, acc = contrastive.contrastive_loss(context, quantized, code_ids, mask, negatives,
                                           temperature=0.1)
  ref_loss, ref_acc = numpy_info_nce(context, quantized, code_ids, mask, negatives, 0.1)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)


def test_info_nce_gradients_equal_the_candidate_tensor_form():
  """d loss / d (context, quantized) equal those of the [B, T, K+1, C] gather form."""
  context, quantized, code_ids, mask, negatives = _random_case(3)

  def gathered(c, q):
    b, t, k = negatives.shape
    # (The zero context of padded frames needs a norm with a finite gradient.)
    unit = lambda x: x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
    neg = jnp.take_along_axis(q, negatives.reshape(b, t * k)[..., None], axis=1)
    cands = jnp.concatenate([q[:, :, None], neg.reshape(b, t, k, -1)], axis=2)
    logits = jnp.sum(unit(c)[:, :, None] * unit(cands), -1) / 0.1
    same = jnp.take_along_axis(code_ids, negatives.reshape(b, t * k), 1).reshape(b, t, k)
    excluded = jnp.concatenate([jnp.zeros((b, t, 1), bool), same == code_ids[..., None]], -1)
    nll = -jax.nn.log_softmax(jnp.where(excluded, -jnp.inf, logits), -1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0)) / mask.sum()

  ours = lambda c, q: contrastive.contrastive_loss(c, q, code_ids, mask, negatives,
                                                   temperature=0.1)[0]
  want = jax.grad(gathered, argnums=(0, 1))(context, quantized)
  got = jax.grad(ours, argnums=(0, 1))(context, quantized)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_normalizer_divides_the_sums():
  context, quantized, code_ids, mask, negatives = _random_case(4)
  loss, acc = contrastive.contrastive_loss(context, quantized, code_ids, mask, negatives)
  scaled = contrastive.contrastive_loss(context, quantized, code_ids, mask, negatives,
                                        normalizer=4 * mask.sum())
  np.testing.assert_allclose(scaled, (loss / 4, acc / 4), rtol=1e-6)


def test_training_quantizer_output_excludes_every_same_code_distractor():
  """Quantizer output in training mode (float32, Gumbel noise) fed to the loss.

  With the context equal to each frame's target, a distractor that shares the
  target's code is the only thing that can make the loss exceed the loss
  over the other distractors alone: counted here, every one is dropped.
  """
  mc, _ = tiny_configs()
  batch, time = 8, 50
  x = jax.random.normal(jax.random.key(0), (batch, time, mc.d_model))
  quantizer = GumbelQuantizer(mc, deterministic=False)
  keys = jax.random.split(jax.random.key(2), batch)
  params = quantizer.init(jax.random.key(1), x, 2.0, keys)
  quantized, ids, _ = quantizer.apply(params, x, 2.0, keys)
  quantized, ids = np.asarray(quantized), np.asarray(ids)
  mask = np.ones((batch, time), bool)
  negatives = np.asarray(contrastive.sample_negative_indices(jax.random.key(3),
                                                             jnp.asarray(mask), 20))
  same = ids[np.arange(batch)[:, None, None], negatives] == ids[..., None]
  assert same.sum() > 50  # 64 codes, high temperature: plenty of shared codes
  loss, acc = contrastive.contrastive_loss(quantized, quantized, ids, mask, negatives,
                                           temperature=0.1)
  ref_loss, ref_acc = numpy_info_nce(quantized, quantized, ids, mask, negatives, 0.1)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert float(acc) == ref_acc == 1.0
  # Sensitivity: with the same-code distractors kept (every id made unique),
  # each scores as high as its target and the loss is measurably higher.
  unique = np.arange(batch * time).reshape(batch, time)
  kept, _ = contrastive.contrastive_loss(quantized, quantized, unique, mask, negatives,
                                         temperature=0.1)
  np.testing.assert_allclose(
      kept, numpy_info_nce(quantized, quantized, unique, mask, negatives, 0.1)[0], rtol=1e-5)
  assert float(kept) > float(loss) + 0.05


def test_negatives_are_other_masked_frames_of_the_same_utterance():
  rng = np.random.default_rng(2)
  mask = rng.random((4, 50)) < 0.4
  mask[3] = False
  mask[3, 7] = True  # one masked frame: nothing to draw from
  negatives = np.asarray(contrastive.sample_negative_indices(
      jax.random.key(0), jnp.asarray(mask), 100))
  assert negatives.shape == (4, 50, 100)
  for b in range(3):
    masked = set(np.flatnonzero(mask[b]))
    for t in masked:
      drawn = negatives[b, t]
      assert set(drawn) <= masked - {t}
      # 100 uniform draws from n <= 40 others hit >= 92% of them on average.
      assert len(set(drawn)) >= 0.8 * min(len(masked) - 1, 40)
  np.testing.assert_array_equal(negatives[3, 7], 7)


def test_negative_draws_are_uniform():
  mask = np.zeros((1, 12), bool)
  mask[0, [1, 3, 4, 8, 11]] = True
  draws = np.asarray(contrastive.sample_negative_indices(
      jax.random.key(3), jnp.asarray(mask), 20000))[0, 4]
  counts = np.array([np.sum(draws == p) for p in (1, 3, 8, 11)])
  assert np.sum(draws == 4) == 0
  # Each of the 4 others expects 5000 draws; 5 sigma is about 300.
  np.testing.assert_allclose(counts, 5000, atol=300)


def test_diversity_loss_and_perplexities_equal_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 6, 8)).astype(np.float32) * 2
  paddings = np.zeros((2, 6), np.float32)
  paddings[1, 4:] = 1
  prob_sum, count = contrastive.code_probability_sum(logits, paddings)
  assert float(count) == 10
  valid = np.concatenate([logits[0], logits[1, :4]])
  probs = np.exp(valid) / np.exp(valid).sum(-1, keepdims=True)
  mean = probs.mean(0)
  ref_ppl = np.exp(-np.sum(mean * np.log(mean)))
  np.testing.assert_allclose(prob_sum, probs.sum(0), rtol=1e-5)
  np.testing.assert_allclose(contrastive.perplexity_of_counts(prob_sum), ref_ppl, rtol=1e-4)
  np.testing.assert_allclose(contrastive.diversity_of_mean(prob_sum / count),
                             (8 - ref_ppl) / 8, rtol=1e-4)
  ids = np.argmax(logits, -1)
  hist = np.bincount(np.concatenate([ids[0], ids[1, :4]]), minlength=8) / 10
  nz = hist[hist > 0]
  np.testing.assert_allclose(code_perplexity(ids, paddings, 8),
                             np.exp(-np.sum(nz * np.log(nz))), rtol=1e-4)


def code_perplexity(ids, paddings, num_codes):
  """The metric as pretrain_loss.summary_metrics forms it: perplexity of the hard histogram."""
  return contrastive.perplexity_of_counts(contrastive.code_histogram(ids, paddings, num_codes))


def test_code_perplexity_extremes():
  paddings = np.zeros((1, 16), np.float32)
  assert abs(float(code_perplexity(np.zeros((1, 16), int), paddings, 16)) - 1) < 1e-4
  assert abs(float(code_perplexity(np.arange(16)[None], paddings, 16)) - 16) < 1e-3
