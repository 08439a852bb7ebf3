"""The corpus builder: writes corpora offline, outside the runtime input pipeline.

    python -m mslam_jax.corpus.build --output=DIR [--size=small|large]

  build.py      the command: held-out and downstream splits, TFRecords, vocabulary
  catalogs.py   text: gettext catalogs and fortunes from Debian packages
  synthesis.py  speech: espeak-ng

The runtime pipeline (mslam_jax/data/) reads what it writes and never imports
it; docs/embedded_corpus.md describes the sources, filters and layout.
"""
