"""The embedded corpus (tasks/embedded_corpus/): tasks `embedded_{kind}_{language}`.

Built by `python -m mslam_jax.corpus.build --output=tasks/embedded_corpus
--size=small` from Debian gettext catalogs and fortunes, spoken by espeak-ng
(docs/embedded_corpus.md); metadata.json lists its languages, sizes and sources.
Paired tasks carry the multi-way held-out `dev` and `test` splits.
"""

from mslam_jax.data import registry

TASK_NAMES = registry.add_corpus(registry.EMBEDDED_CORPUS, prefix='embedded')
