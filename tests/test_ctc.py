"""CTC against a brute-force sum over every alignment."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mslam_jax.losses import ctc


def brute_force_nll(log_probs, labels, blank=0):
  """-log sum over all frame paths that collapse to `labels`."""
  time, vocab = log_probs.shape
  total = 0.0
  for path in itertools.product(range(vocab), repeat=time):
    collapsed = [k for k, _ in itertools.groupby(path) if k != blank]
    if collapsed == list(labels):
      total += np.exp(sum(log_probs[t, path[t]] for t in range(time)))
  return -np.log(total)


def test_ctc_equals_brute_force_over_alignments():
  rng = np.random.default_rng(0)
  vocab, max_frames, max_labels = 4, 6, 3
  cases = [(6, [1, 2, 3]), (5, [2, 2]), (4, [3]), (6, [1, 1, 1])]
  logits = rng.normal(size=(len(cases), max_frames, vocab)).astype(np.float32)
  logit_pad = np.ones((len(cases), max_frames), np.float32)
  labels = np.zeros((len(cases), max_labels), np.int32)
  label_pad = np.ones((len(cases), max_labels), np.float32)
  for b, (frames, lab) in enumerate(cases):
    logit_pad[b, :frames] = 0
    labels[b, :len(lab)] = lab
    label_pad[b, :len(lab)] = 0
  _, per_example, infeasible = ctc.ctc_loss(
      jnp.asarray(logits), jnp.asarray(logit_pad), jnp.asarray(labels), jnp.asarray(label_pad))
  for b, (frames, lab) in enumerate(cases):
    log_probs = np.asarray(jax.nn.log_softmax(logits[b, :frames], axis=-1))
    np.testing.assert_allclose(per_example[b], brute_force_nll(log_probs, lab), rtol=1e-4)
  assert float(infeasible) == 0.0


def test_ctc_loss_is_per_character_mean_and_skips_infeasible():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
  logit_pad = np.zeros((3, 4), np.float32)
  labels = np.array([[1, 2, 0, 0], [1, 1, 1, 0], [3, 0, 0, 0]], np.int32)
  label_pad = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]], np.float32)
  # Example 1 needs 3 labels + 2 repeats = 5 frames > 4: infeasible.
  np.testing.assert_array_equal(
      ctc.ctc_min_frames(jnp.asarray(labels), jnp.asarray(label_pad)), [2, 5, 1])
  loss, per_example, infeasible = ctc.ctc_loss(logits, logit_pad, labels, label_pad)
  expected = (per_example[0] / 2 + per_example[2] / 1) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(infeasible) == 1.0
