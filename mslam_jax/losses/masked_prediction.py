"""Cross-entropy at masked positions: w2v-BERT code prediction, SpanBERT, TLM."""

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
                         normalizer=None):
  """Cross-entropy summed over masked positions, divided by their count.

  Args:
    logits: [B, T, V].
    targets: int [B, T].
    mask: bool [B, T]; only True positions count.
    normalizer: the divisor; None: this batch's masked count. Gradient
      accumulation passes the whole batch's count (see `mslam_jax.accumulation`).

  Returns:
    (loss, accuracy, count): scalars; loss is 0 when nothing is masked; count
    is this batch's masked positions. A position counts as correct when its
    target's logit is the largest (a tie for the largest counts too).
  """
  logits = logits.astype(jnp.float32)
  weights = mask.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  count = jnp.sum(weights)
  denom = jnp.maximum(count if normalizer is None else jnp.asarray(normalizer, jnp.float32),
                      1.0)
  # The target's logit against the row's largest, not an argmax: XLA:CPU runs
  # an argmax as a separate, slow (value, index) reduction over [B, T, V] (5%
  # of the tiny demo step's op time with the 1,024-character head), while the
  # max and the target's logit are the ones the cross-entropy computes.
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return (jnp.sum(xent * weights) / denom, jnp.sum(correct * weights) / denom, count)
