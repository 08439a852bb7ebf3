"""InfoNCE, diversity loss, perplexity and negative sampling against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from mslam_jax.losses import contrastive


def numpy_info_nce(context, quantized, mask, negatives, temperature):
  losses, hits = [], []
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if not mask[b, t]:
        continue
      c = context[b, t]
      cands = [quantized[b, t]] + [quantized[b, n] for n in negatives[b, t]]
      sims = []
      for k, q in enumerate(cands):
        if k > 0 and np.array_equal(q, quantized[b, t]):
          sims.append(-np.inf)
        else:
          sims.append(c @ q / (np.linalg.norm(c) * np.linalg.norm(q)) / temperature)
      sims = np.array(sims)
      m = sims.max()
      log_z = m + np.log(np.sum(np.exp(sims - m)))
      losses.append(log_z - sims[0])
      hits.append(float(np.argmax(sims) == 0))
  return np.mean(losses), np.mean(hits)


def test_info_nce_equals_numpy():
  rng = np.random.default_rng(0)
  batch, time, dim, k = 2, 9, 5, 4
  context = rng.normal(size=(batch, time, dim)).astype(np.float32)
  codebook = rng.normal(size=(3, dim)).astype(np.float32)
  # Few distinct codes, so some distractors equal the target and are excluded.
  quantized = codebook[rng.integers(0, 3, size=(batch, time))]
  mask = rng.random((batch, time)) < 0.6
  mask[:, 0] = True
  mask[:, 1] = True
  negatives = np.asarray(contrastive.sample_negative_indices(
      jax.random.key(1), jnp.asarray(mask), k))
  loss, acc = contrastive.contrastive_loss(context, quantized, mask, negatives,
                                           temperature=0.1)
  ref_loss, ref_acc = numpy_info_nce(context, quantized, mask, negatives, 0.1)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)


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
  loss, ppl = contrastive.diversity_loss(logits, paddings)
  valid = np.concatenate([logits[0], logits[1, :4]])
  probs = np.exp(valid) / np.exp(valid).sum(-1, keepdims=True)
  mean = probs.mean(0)
  ref_ppl = np.exp(-np.sum(mean * np.log(mean)))
  np.testing.assert_allclose(ppl, ref_ppl, rtol=1e-4)
  np.testing.assert_allclose(loss, (8 - ref_ppl) / 8, rtol=1e-4)
  ids = np.argmax(logits, -1)
  hist = np.bincount(np.concatenate([ids[0], ids[1, :4]]), minlength=8) / 10
  nz = hist[hist > 0]
  np.testing.assert_allclose(contrastive.code_perplexity(ids, paddings, 8),
                             np.exp(-np.sum(nz * np.log(nz))), rtol=1e-4)


def test_code_perplexity_extremes():
  paddings = np.zeros((1, 16), np.float32)
  assert abs(float(contrastive.code_perplexity(np.zeros((1, 16), int), paddings, 16)) - 1) < 1e-4
  assert abs(float(contrastive.code_perplexity(np.arange(16)[None], paddings, 16)) - 16) < 1e-3
