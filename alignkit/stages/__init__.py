"""Prepare stages: the cached, fingerprinted stage runner (:mod:`~alignkit.stages.runner`) and
the stages recipes share: self-sampled preference pairs (:mod:`~alignkit.stages.pairs`), the
unsafe set (:mod:`~alignkit.stages.unsafe_set`), knowledge-state queries
(:mod:`~alignkit.stages.knowledge`), uncertainty signals and clustering
(:mod:`~alignkit.stages.uncertainty`) and balanced dual-use pairs (:mod:`~alignkit.stages.dualuse`)."""
