"""masked_cross_entropy against a numpy reference (log-softmax and argmax written out)."""

import numpy as np
import jax.numpy as jnp

from mslam_jax.losses import masked_prediction


def _reference(logits, targets, mask):
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  xent = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  correct = logits.argmax(-1) == targets
  count = mask.sum()
  return (xent * mask).sum() / count, (correct * mask).sum() / count, count


def test_loss_accuracy_and_count_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 7))
  # Make about half the targets the argmax, so accuracy is neither 0 nor 1.
  best = logits.argmax(-1)
  targets = np.where(rng.random((3, 7)) < 0.5, best, targets)
  mask = rng.random((3, 7)) < 0.6
  loss, accuracy, count = masked_prediction.masked_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  ref_loss, ref_accuracy, ref_count = _reference(logits, targets, mask)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(accuracy, ref_accuracy, rtol=1e-6)
  assert 0 < ref_accuracy < 1
  assert count == ref_count


def test_nothing_masked_gives_zero_loss_and_accuracy():
  logits = jnp.ones((2, 3, 5))
  loss, accuracy, count = masked_prediction.masked_cross_entropy(
      logits, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), bool))
  assert float(loss) == 0 and float(accuracy) == 0 and float(count) == 0


def test_normalizer_replaces_the_masked_count():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
  targets = rng.integers(0, 6, size=(2, 4))
  mask = np.ones((2, 4), bool)
  loss, _, _ = masked_prediction.masked_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), normalizer=16.0)
  ref_loss, _, _ = _reference(logits, targets, mask)
  np.testing.assert_allclose(loss, ref_loss * 8 / 16, rtol=1e-5)
