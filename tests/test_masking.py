"""Span masking rates against their closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslam_jax import masking


def expected_fraction(p, span, length):
  """Mean over t of P(some start in (t - span, t]), starts only inside [0, length)."""
  t = np.arange(length)
  return np.mean(1 - (1 - p) ** np.minimum(t + 1, span))


def test_speech_mask_fraction_near_paper_rate():
  paddings = jnp.zeros((256, 800))
  fractions = [float(jnp.mean(masking.span_mask(jax.random.key(i), paddings,
                                                start_prob=0.065, span_length=10)))
               for i in range(4)]
  # Over 800k frames the sampling error is far below 0.005.
  np.testing.assert_allclose(np.mean(fractions), expected_fraction(0.065, 10, 800), atol=0.005)
  assert abs(np.mean(fractions) - (1 - 0.935 ** 10)) < 0.01  # about 49%


@pytest.mark.parametrize('rate,span', [(0.15, 20), (0.5, 20), (0.75, 10)])
def test_rate_parameterised_masking(rate, span):
  p = masking.start_prob_for_rate(rate, span)
  paddings = jnp.zeros((512, 512))
  got = float(jnp.mean(masking.span_mask(jax.random.key(7), paddings, start_prob=p,
                                         span_length=span)))
  np.testing.assert_allclose(got, expected_fraction(p, span, 512), atol=0.006)
  assert abs(got - rate) < 0.03


def test_mask_respects_padding_and_spans_are_contiguous():
  paddings = np.zeros((64, 40), np.float32)
  paddings[:, 25:] = 1
  mask = np.asarray(masking.span_mask(jax.random.key(0), jnp.asarray(paddings),
                                      start_prob=0.05, span_length=5))
  assert not mask[:, 25:].any()
  # With starts at most every position, every run of masked frames has length
  # >= 5 unless cut by the padding boundary.
  for row in mask:
    runs, n = [], 0
    for t, m in enumerate(row[:25]):
      if m:
        n += 1
      elif n:
        runs.append(n)
        n = 0
    assert all(r >= 5 for r in runs)


def test_mask_is_deterministic_for_a_key():
  paddings = jnp.zeros((4, 30))
  a = masking.span_mask(jax.random.key(5), paddings, start_prob=0.1, span_length=3)
  b = masking.span_mask(jax.random.key(5), paddings, start_prob=0.1, span_length=3)
  np.testing.assert_array_equal(a, b)
