"""The environment of a subprocess that compiles for a TPU slice (needs libtpu).

launch/run_tests.sh installs the pinned libtpu beside .venv, in .libtpu
(MSLAM_LIBTPU_DIR), not into it: with libtpu importable, every jax start-up
in the suite would look for a TPU. Only the subprocesses that compile for a
TPU slice get it on their PYTHONPATH. An environment with the `tpu` extra has
libtpu already; elsewhere (libtpu has Linux wheels only) the test is skipped.
"""

import importlib.util
import os

import pytest


def with_libtpu(env):
  """`env` (a dict) with libtpu on its PYTHONPATH; skips the test where there is none."""
  libtpu_dir = os.environ.get('MSLAM_LIBTPU_DIR', '')
  if os.path.isdir(os.path.join(libtpu_dir, 'libtpu')):
    return {**env, 'PYTHONPATH': os.pathsep.join(filter(None, [libtpu_dir,
                                                               env.get('PYTHONPATH')]))}
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip("needs libtpu: launch/run_tests.sh installs it into .libtpu (Linux only), "
                "or pip install -c constraints.txt -e '.[tpu]'")
  return env
