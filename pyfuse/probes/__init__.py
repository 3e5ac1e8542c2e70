"""Representation probes for the coupling questions: per-layer hidden-state
centroids of prompt sets and MoE routing profiles (:mod:`.hidden`), their
comparison between models and the alignment of an adapter's deltas with
them (:mod:`.compare`)."""
