"""Evaluation suites and their pieces.

Kept import-light on purpose: the model-running modules (which import
mlx_lm) are imported by whoever needs them, not here."""

from .extract import extract_answer

__all__ = ["extract_answer"]
