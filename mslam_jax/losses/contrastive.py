"""w2v-BERT contrastive module losses: InfoNCE against quantized targets, and diversity.

mSLAM (Bapna et al. 2022) keeps w2v-BERT's contrastive module (Chung et al.
2021): InfoNCE against K distractors drawn from other masked frames of the
same utterance (K = 100, wav2vec 2.0), plus the codebook diversity loss with
weight 0.1, on the output of the N speech-only layers.
"""

import jax
import jax.numpy as jnp


def sample_negative_indices(rng: jax.Array, mask: jax.Array, num_negatives: int) -> jax.Array:
  """For each frame, `num_negatives` other masked frames of the same utterance.

  Draws are uniform with replacement over the utterance's masked frames other
  than the frame itself (as in wav2vec 2.0). Where an utterance has fewer than
  two masked frames there is nothing to draw, and the indices point at the
  frame itself, which `contrastive_loss` then ignores as identical to the
  positive.

  Args:
    rng: PRNG key.
    mask: bool [B, T], True = masked (and valid).
    num_negatives: K.

  Returns:
    int32 [B, T, K] time indices into the same utterance; meaningful only at
    masked frames.
  """
  batch, time = mask.shape
  mask = mask.astype(bool)
  count = jnp.sum(mask, axis=-1).astype(jnp.int32)  # [B]
  # Masked positions first, in time order: masked_positions[b, r] is the
  # r-th masked frame of utterance b.
  masked_positions = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
  rank = jnp.cumsum(mask, axis=-1).astype(jnp.int32) - 1  # [B, T]
  draws = jax.random.randint(rng, (batch, time, num_negatives), 0,
                             jnp.maximum(count - 1, 1)[:, None, None])
  # Skip over the frame's own rank, so draws cover the other count-1 frames.
  draws = draws + (draws >= rank[..., None]).astype(jnp.int32)
  negatives = jnp.take_along_axis(
      masked_positions, draws.reshape(batch, time * num_negatives), axis=1
  ).reshape(batch, time, num_negatives)
  self_index = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32)[None, :, None],
                                negatives.shape)
  return jnp.where((count >= 2)[:, None, None], negatives, self_index)


def _unit(x: jax.Array) -> jax.Array:
  # rsqrt of the clamped squared norm: unlike jnp.linalg.norm, its gradient
  # stays finite for all-zero vectors (the context at padded frames).
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def contrastive_loss(context: jax.Array, quantized: jax.Array, code_ids: jax.Array,
                     mask: jax.Array, negative_indices: jax.Array, *,
                     temperature: float = 0.1, normalizer=None):
  """InfoNCE of each masked frame's context against its quantized target.

  logits_t = cos(c_t, [q_t, q_n1, ..., q_nK]) / temperature; a distractor with
  the target's code id is left out (wav2vec 2.0), decided on the ids, not on
  the vectors.

  Memory: no [B, T, K + 1, C] candidate tensor. Contexts and targets are
  unit-normalised once, each utterance's frames are scored against all of its
  targets in one [T, C] x [C, T] matmul, and the K + 1 logits of a frame are
  gathered from that row: O(B T^2) floats instead of O(B T K C), the same
  numbers (a dot product of unit vectors either way).

  Args:
    context: [B, T, C] projected N-layer outputs.
    quantized: [B, T, C] quantized unmasked features (the targets).
    code_ids: int [B, T] the targets' code ids (the quantizer's `ids`).
    mask: bool [B, T] masked frames; only these are scored.
    negative_indices: int [B, T, K] from `sample_negative_indices`.
    temperature: kappa (inferred: 0.1, wav2vec 2.0's value).
    normalizer: the count the sums are divided by; None: this batch's masked
      frames. Gradient accumulation passes the whole batch's count, so that
      the micro-batches' losses add up to the whole batch's.

  Returns:
    (loss, accuracy): sum over masked frames of -log p(target), and of how
    often no distractor scores above the target, each divided by the
    normalizer.
  """
  batch, time, num_neg = negative_indices.shape
  c = _unit(context.astype(jnp.float32))
  q = _unit(quantized.astype(jnp.float32))
  similarity = jnp.einsum('btc,bsc->bts', c, q) / temperature  # [B, T, T]
  positive = jnp.diagonal(similarity, axis1=1, axis2=2)  # [B, T]
  negatives = jnp.take_along_axis(similarity, negative_indices, axis=2)  # [B, T, K]
  negative_ids = jnp.take_along_axis(
      code_ids, negative_indices.reshape(batch, time * num_neg), axis=1
  ).reshape(batch, time, num_neg)
  negatives = jnp.where(negative_ids == code_ids[..., None], -jnp.inf, negatives)
  logits = jnp.concatenate([positive[..., None], negatives], axis=-1)  # [B, T, K + 1]
  nll = jax.nn.logsumexp(logits, axis=-1) - positive
  correct = positive >= jnp.max(negatives, axis=-1)  # argmax's rule: a tie goes to the target
  if normalizer is None:
    normalizer = jnp.sum(mask)
  denom = jnp.maximum(jnp.asarray(normalizer, jnp.float32), 1.0)
  return (jnp.sum(jnp.where(mask, nll, 0.0)) / denom,
          jnp.sum(jnp.where(mask, correct, False)) / denom)


def code_probability_sum(code_logits: jax.Array, paddings: jax.Array):
  """Sum over valid frames of softmax(code_logits), and the valid frame count.

  Args:
    code_logits: [B, T, V] quantizer logits (no Gumbel noise).
    paddings: [B, T], 1 = pad.

  Returns:
    (prob_sum [V] float32, count scalar float32); prob_sum / count is the
    batch's mean code distribution, the argument of `diversity_of_mean`.
  """
  probs = jax.nn.softmax(code_logits.astype(jnp.float32), axis=-1)
  weights = (1.0 - paddings.astype(jnp.float32))[..., None]
  return jnp.sum(probs * weights, axis=(0, 1)), jnp.sum(weights)


def diversity_of_mean(mean_probs: jax.Array) -> jax.Array:
  """wav2vec 2.0 diversity loss (V - perplexity(mean_probs)) / V, in [0, 1 - 1/V]."""
  num_codes = mean_probs.shape[-1]
  return (num_codes - _perplexity(mean_probs)) / num_codes


def code_histogram(code_ids: jax.Array, paddings: jax.Array, num_codes: int) -> jax.Array:
  """How often each code was chosen over valid frames: float32 [V]."""
  return jnp.sum(jax.nn.one_hot(code_ids, num_codes) *
                 (1.0 - paddings.astype(jnp.float32))[..., None], axis=(0, 1))


def perplexity_of_counts(counts: jax.Array) -> jax.Array:
  """exp(entropy) of a histogram [V] (normalised here): 1 = one code, V = uniform."""
  return _perplexity(counts / jnp.maximum(jnp.sum(counts), 1.0))


def _perplexity(distribution: jax.Array) -> jax.Array:
  entropy = -jnp.sum(distribution * jnp.log(distribution + 1e-7))
  return jnp.exp(entropy)
