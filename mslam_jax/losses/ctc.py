"""CTC from speech frames to characters, on optax.ctc_loss."""

import jax
import jax.numpy as jnp
import optax

from mslam_jax import special_ids


def ctc_min_frames(labels: jax.Array, label_paddings: jax.Array) -> jax.Array:
  """Fewest frames that can emit each label sequence: its length plus its repeats.

  labels [B, L], label_paddings [B, L] -> int32 [B].
  """
  valid = label_paddings < 0.5
  repeats = (labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
  return (jnp.sum(valid, axis=-1) + jnp.sum(repeats, axis=-1)).astype(jnp.int32)


def ctc_feasible(logit_paddings: jax.Array, labels: jax.Array,
                 label_paddings: jax.Array) -> jax.Array:
  """bool [B]: the example has labels and enough frames to emit them."""
  num_labels = jnp.sum(1.0 - label_paddings, axis=-1)
  num_frames = jnp.sum(1.0 - logit_paddings, axis=-1)
  return (num_labels > 0) & (ctc_min_frames(labels, label_paddings) <= num_frames)


def ctc_loss(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array,
             label_paddings: jax.Array, *, blank_id: int = special_ids.CTC_BLANK_ID,
             normalizer=None):
  """CTC negative log-likelihood per label character, averaged over examples.

  Each example's -log p(labels | frames) is divided by its label count
  (our choice: keeps the scale independent of transcript length). Examples
  with no labels or too few frames for their labels get weight 0 and are
  counted as infeasible rather than producing a huge loss.

  Args:
    logits: [B, T, V] with V including the blank.
    logit_paddings: [B, T], 1 = pad.
    labels: int32 [B, L]; label_paddings: [B, L].
    blank_id: the blank's id in V.
    normalizer: the divisor of the per-character sum; None: this batch's
      feasible examples. Gradient accumulation passes the whole batch's.

  Returns:
    (loss, per_example [B] negative log-likelihoods, num_infeasible).
  """
  per_example = optax.ctc_loss(
      logits.astype(jnp.float32), logit_paddings.astype(jnp.float32), labels,
      label_paddings.astype(jnp.float32), blank_id=blank_id)
  num_labels = jnp.sum(1.0 - label_paddings, axis=-1)
  feasible = ctc_feasible(logit_paddings, labels, label_paddings)
  weights = feasible.astype(jnp.float32)
  per_char = jnp.where(feasible, per_example / jnp.maximum(num_labels, 1.0), 0.0)
  if normalizer is None:
    normalizer = jnp.sum(weights)
  loss = jnp.sum(per_char) / jnp.maximum(jnp.asarray(normalizer, jnp.float32), 1.0)
  return loss, per_example, jnp.sum(1.0 - weights)
