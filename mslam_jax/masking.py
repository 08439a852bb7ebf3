"""Span masking with static shapes, for speech frames and text characters.

Every valid position starts a span with probability `start_prob`; a position
is masked when some span covering it started at a valid position. Spans may
overlap, so far from the edges the masked fraction is
1 - (1 - start_prob)^span_length (wav2vec 2.0, Baevski et al. 2020, as used by
w2v-BERT and mSLAM: speech p = 0.065, span 10, about 49% of frames). For text
mSLAM (Bapna et al. 2022) gives a target rate (about 15%, spans of 20):
`start_prob_for_rate` inverts the formula above.
"""

import jax
import jax.numpy as jnp


def start_prob_for_rate(mask_rate: float, span_length: int) -> float:
  """Span start probability that masks `mask_rate` of a long sequence."""
  if not 0.0 <= mask_rate < 1.0:
    raise ValueError(f'mask_rate={mask_rate} must be in [0, 1).')
  return 1.0 - (1.0 - mask_rate) ** (1.0 / span_length)


def span_mask(rng: jax.Array, paddings: jax.Array, *, start_prob: float,
              span_length: int) -> jax.Array:
  """Random span mask over valid positions.

  Args:
    rng: PRNG key.
    paddings: [B, T] float, 1 = pad.
    start_prob: probability that a valid position starts a span.
    span_length: positions covered by each span (truncated at padding and the end).

  Returns:
    bool [B, T], True = masked; never True at a padded position.
  """
  valid = paddings < 0.5
  starts = jax.random.bernoulli(rng, start_prob, paddings.shape) & valid
  # Position t is covered when a span started in (t - span_length, t].
  counts = jnp.cumsum(starts.astype(jnp.int32), axis=-1)
  shifted = jnp.pad(counts, ((0, 0), (span_length, 0)))[:, :counts.shape[1]]
  return (counts - shifted > 0) & valid
