"""The input pipeline: audio features, the character vocabulary, sources, seqio tasks, the
three-kind mixture sampler and bad-input accounting; and the corpus builder (build_corpus).
"""
