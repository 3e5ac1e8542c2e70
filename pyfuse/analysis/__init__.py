"""Analyses of adapters and models for the coupling questions: how two
adapters' subspaces overlap (:mod:`.subspace`)."""
