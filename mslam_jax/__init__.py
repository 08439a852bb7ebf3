"""mslam_jax: mSLAM joint speech and text pre-training in JAX/Flax.

`mslam_jax.load_encoder(path)` loads an export (mslam_jax/encoder.py); it is
imported on first use, so `import mslam_jax` stays light. `REPO_ROOT` is the
checkout this package runs from (gin files, tasks/ and the embedded corpus
are found relative to it).
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def __getattr__(name):
  if name in ('load_encoder', 'Encoder'):
    from mslam_jax import encoder  # pylint: disable=g-import-not-at-top
    return getattr(encoder, name)
  raise AttributeError(f'module mslam_jax has no attribute {name!r}')
