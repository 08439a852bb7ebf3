"""The input pipeline: audio features, the character vocabulary, sources, seqio tasks, the
three-kind mixture sampler and bad-input accounting. Corpora are built offline by
mslam_jax.corpus (`python -m mslam_jax.corpus.build`).
"""
