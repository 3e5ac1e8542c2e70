"""The run directory of a training run: checkpoints to resume from after a
kill, the best weights, and mlx-lm's own files.

A run writes into ``.<name>.run/`` next to the adapter directory ``<name>``
and renames it to ``<name>`` when it finishes: the adapter directory is
complete or absent, and an interrupted run leaves its run directory for
``resume``. Inside, as ``mlx_lm lora`` writes them: ``adapters.safetensors``
(the latest weights) and ``NNNNNNN_adapters.safetensors`` (every saved
step); pyfuse adds ``best_adapters.safetensors`` (the weights of the best
validation loss) and ``checkpoints/NNNNNNN/`` (the latest complete one
only): ``adapters.safetensors``, ``optimizer.safetensors`` (the optimizer
state flattened, and MLX's random key under ``__mlx_random_key__``),
``grad.safetensors`` (a partial gradient sum, when the step falls inside a
gradient accumulation) and ``state.json`` (written last: the step, the data
order, the report window, the reports, the best validation loss).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from .loop import Progress

RUN_SUFFIX = ".run"
CHECKPOINTS = "checkpoints"
BEST_WEIGHTS = "best_adapters.safetensors"
WEIGHTS = "adapters.safetensors"
_RNG_KEY = "__mlx_random_key__"

__all__ = ["BEST_WEIGHTS", "RunStore", "run_dir_for"]


def run_dir_for(adapter_path: Path) -> Path:
    return adapter_path.parent / f".{adapter_path.name}{RUN_SUFFIX}"


def _trainable(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def _save(path: Path, tensors: dict) -> None:
    """``mx.save_safetensors`` through a temporary name (never half written)."""
    import mlx.core as mx

    tmp = path.with_name(path.name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), tensors)
    os.replace(tmp, path)


class RunStore:
    """Saves and restores the checkpoints of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.restored_grad = None

    # -- writing --------------------------------------------------------------------

    def save_best(self, model) -> None:
        _save(self.dir / BEST_WEIGHTS, _trainable(model))

    def save_checkpoint(self, model, optimizer, grad, prog: Progress) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        weights = _trainable(model)
        it = prog.iteration
        _save(self.dir / WEIGHTS, weights)
        _save(self.dir / f"{it:07d}_{WEIGHTS}", weights)
        root = self.dir / CHECKPOINTS
        tmp = root / f".{it:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / WEIGHTS), weights)
        opt_state = dict(tree_flatten(optimizer.state))
        opt_state[_RNG_KEY] = mx.random.state[0]
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        if grad is not None:
            mx.save_safetensors(str(tmp / "grad.safetensors"), dict(tree_flatten(grad)))
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(asdict(prog), f)
        final = root / f"{it:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.iterdir():  # only the latest complete checkpoint is kept
            if old != final and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)

    # -- reading --------------------------------------------------------------------

    def latest(self) -> Path | None:
        root = self.dir / CHECKPOINTS
        done = sorted(p for p in root.iterdir() if (p / "state.json").exists()) if root.is_dir() else []
        return done[-1] if done else None

    def restore(self, model, optimizer) -> Progress:
        """Load the latest checkpoint into ``model``, ``optimizer`` and MLX's
        random state; returns its progress (``restored_grad`` is set)."""
        import mlx.core as mx
        from mlx.utils import tree_map_with_path

        ckpt = self.latest()
        if ckpt is None:
            raise UserError(f"{self.dir}: no complete checkpoint to resume from (the run was interrupted "
                            "before its first save_every step; start again with --force)")
        weights = mx.load(str(ckpt / WEIGHTS))
        expected = _trainable(model)
        if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
            raise UserError(f"{ckpt}: the checkpoint's adapter does not match this run's settings")
        model.load_weights(list(weights.items()), strict=False)
        saved = mx.load(str(ckpt / "optimizer.safetensors"))
        k0, k1 = (int(x) for x in saved.pop(_RNG_KEY).tolist())
        mx.random.seed((k0 << 32) | k1)  # MLX's key of a seed is its two 32-bit halves
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_map_with_path(lambda path, _: saved[path], optimizer.state)
        grad_file = ckpt / "grad.safetensors"
        self.restored_grad = None
        if grad_file.exists():  # shaped like the trainable parameters, as the step's sum
            grads = mx.load(str(grad_file))
            self.restored_grad = tree_map_with_path(lambda path, _: grads[path], model.trainable_parameters())
        with open(ckpt / "state.json", encoding="utf-8") as f:
            return Progress(**json.load(f))
