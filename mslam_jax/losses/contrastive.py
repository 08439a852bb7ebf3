"""w2v-BERT contrastive module losses: InfoNCE against quantized targets, and diversity.

PAPER.md: InfoNCE against K distractors drawn from other masked frames of the
same utterance (K = 100), plus the codebook diversity loss with weight 0.1,
on the output of the N speech-only layers.
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


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(_unit(a) * _unit(b), axis=-1)


def contrastive_loss(context: jax.Array, quantized: jax.Array, mask: jax.Array,
                     negative_indices: jax.Array, *, temperature: float = 0.1):
  """InfoNCE of each masked frame's context against its quantized target.

  logits_t = cos(c_t, [q_t, q_n1, ..., q_nK]) / temperature; a distractor equal
  to the target (same code) is excluded, as in wav2vec 2.0.

  Args:
    context: [B, T, C] projected N-layer outputs.
    quantized: [B, T, C] quantized unmasked features (the targets).
    mask: bool [B, T] masked frames; only these are scored.
    negative_indices: int [B, T, K] from `sample_negative_indices`.
    temperature: kappa (inferred: 0.1, wav2vec 2.0's value).

  Returns:
    (loss, accuracy): mean over masked frames of -log p(target), and how often
    the target has the highest similarity.
  """
  context = context.astype(jnp.float32)
  quantized = quantized.astype(jnp.float32)
  batch, time, num_neg = negative_indices.shape
  negatives = jnp.take_along_axis(
      quantized, negative_indices.reshape(batch, time * num_neg)[..., None], axis=1
  ).reshape(batch, time, num_neg, -1)  # [B, T, K, C]
  candidates = jnp.concatenate([quantized[:, :, None], negatives], axis=2)  # [B, T, K+1, C]
  logits = _cosine(context[:, :, None], candidates) / temperature
  same_as_target = jnp.all(negatives == quantized[:, :, None], axis=-1)  # [B, T, K]
  excluded = jnp.concatenate([jnp.zeros_like(same_as_target[..., :1]), same_as_target], -1)
  logits = jnp.where(excluded, -jnp.inf, logits)
  nll = -jax.nn.log_softmax(logits, axis=-1)[..., 0]
  weights = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / denom
  correct = (jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32)
  return loss, jnp.sum(correct * weights) / denom


def diversity_loss(code_logits: jax.Array, paddings: jax.Array):
  """wav2vec 2.0 codebook diversity loss (V - perplexity(mean softmax)) / V.

  Args:
    code_logits: [B, T, V] quantizer logits (no Gumbel noise).
    paddings: [B, T], 1 = pad; padded frames are left out of the average.

  Returns:
    (loss, prob_perplexity): loss in [0, 1 - 1/V]; perplexity in [1, V].
  """
  num_codes = code_logits.shape[-1]
  probs = jax.nn.softmax(code_logits.astype(jnp.float32), axis=-1)
  weights = (1.0 - paddings.astype(jnp.float32))[..., None]
  mean_probs = jnp.sum(probs * weights, axis=(0, 1)) / jnp.maximum(jnp.sum(weights), 1.0)
  perplexity = _perplexity(mean_probs)
  return (num_codes - perplexity) / num_codes, perplexity


def code_perplexity(code_ids: jax.Array, paddings: jax.Array, num_codes: int) -> jax.Array:
  """exp(entropy) of the hard code histogram over valid frames: 1 = collapsed."""
  counts = jnp.sum(jax.nn.one_hot(code_ids, num_codes) *
                   (1.0 - paddings.astype(jnp.float32))[..., None], axis=(0, 1))
  return _perplexity(counts / jnp.maximum(jnp.sum(counts), 1.0))


def _perplexity(distribution: jax.Array) -> jax.Array:
  entropy = -jnp.sum(distribution * jnp.log(distribution + 1e-7))
  return jnp.exp(entropy)
