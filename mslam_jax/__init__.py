"""mslam_jax: mSLAM joint speech and text pre-training in JAX/Flax."""
