"""mslam_jax: mSLAM joint speech and text pre-training in JAX/Flax.

`mslam_jax.load_encoder(path)` loads an export (mslam_jax/encoder.py); it is
imported on first use, so `import mslam_jax` stays light.
"""


def __getattr__(name):
  if name in ('load_encoder', 'Encoder'):
    from mslam_jax import encoder  # pylint: disable=g-import-not-at-top
    return getattr(encoder, name)
  raise AttributeError(f'module mslam_jax has no attribute {name!r}')
