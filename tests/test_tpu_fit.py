"""benchmarks/tpu_fit.py: its table cells (the K it tries: test_compile.py)."""

import tpu_fit  # benchmarks/tpu_fit.py (tests/conftest.py puts benchmarks/ on the path)


def test_needed_text_for_a_step_that_compiled_fitting_or_not():
  """XLA:TPU can compile a step whose total is over the chip's HBM: the total is shown."""
  assert tpu_fit.needed_text({'fits': True, 'per_device_bytes': 5 * 2 ** 30}) == '5.0 GiB'
  assert tpu_fit.needed_text({'fits': False, 'per_device_bytes': 40.26 * 2 ** 30}) == '40.3 GiB'


def test_needed_text_for_a_step_xla_refused():
  error = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory on HBM, '
           'temporaries 105.92G, available 30.75G (compiled for 64 devices)')
  assert tpu_fit.needed_text({'fits': False, 'error': error}) == (
      'over: temporaries 105.92G, available 30.75G')
