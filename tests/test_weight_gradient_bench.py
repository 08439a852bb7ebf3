"""benchmarks/weight_gradient.py: each form it times is the weight gradient (numpy's x^T dy)."""

import jax
import jax.numpy as jnp
import numpy as np

import weight_gradient  # benchmarks/ (tests/conftest.py puts it on the path)


def test_every_timed_form_is_the_weight_gradient():
  rng = np.random.default_rng(5)
  x, dy = rng.standard_normal((24, 12)), rng.standard_normal((24, 5))
  w = rng.standard_normal((12, 5))
  x, dy, w = (jnp.asarray(a, jnp.float32) for a in (x, dy, w))
  expected = np.asarray(x).T @ np.asarray(dy)
  for form, fn in weight_gradient.FORMS.items():
    np.testing.assert_allclose(weight_gradient.weight_gradient(fn)(x, w, dy), expected,
                               rtol=1e-5, atol=1e-5, err_msg=form)
  # Each form's own backward pass is what is timed: the flipped and the transposed
  # ones keep their barrier, autodiff's has none.
  barriers = {form: str(jax.make_jaxpr(weight_gradient.weight_gradient(fn))(x, w, dy)).count(
      'optimization_barrier') for form, fn in weight_gradient.FORMS.items()}
  assert barriers == {'autodiff': 0, 'flipped': 1, 'transposed': 1}
