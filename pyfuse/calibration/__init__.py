"""Calibration for the ``calibrated`` policy: ``X^T X`` of each fused
module's inputs (per expert for SwitchLinear), from the base model run over
mlx-lm training data (:func:`collect_hessians`)."""

from .collect import MIN_EXPERT_TOKENS, ModuleHessian, collect_hessians
from .store import load_hessians, save_hessians

__all__ = ["MIN_EXPERT_TOKENS", "ModuleHessian", "collect_hessians", "load_hessians", "save_hessians"]
