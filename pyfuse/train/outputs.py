"""What a training run writes besides its checkpoints: ``adapter_config.json``
(mlx-lm's keys and pyfuse's), the final ``adapters.safetensors``, the loss
curve (``loss.json``, ``loss.png``)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .checkpoint import BEST_WEIGHTS, CHECKPOINTS
from .data import TrainingData
from .targets import Targets

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
LOSS_FILE = "loss.json"
LOSS_PLOT = "loss.png"

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LOSS_FILE", "LOSS_PLOT", "adapter_config", "finish_dir",
           "read_run_config", "write_json"]


def adapter_config(model_name: str, td: TrainingData, fine_tune_type: str, targets: Targets,
                   lora_parameters: dict, settings: dict, n_params: int, final: Path, **extra) -> dict:
    """mlx-lm's ``adapter_config.json`` (what ``load_adapters`` needs:
    ``fine_tune_type``, ``num_layers``, ``lora_parameters``) with every
    training setting and pyfuse's ``layers`` and ``alpha``."""
    config = {
        "model": model_name,
        "data": td.source,
        "data_format": td.format,
        "fine_tune_type": fine_tune_type,
        "num_layers": targets.num_layers,
        "layers": targets.layers,
        "lora_parameters": lora_parameters,
        "alpha": None if lora_parameters is None else lora_parameters["scale"] * lora_parameters["rank"],
        **settings,
        **extra,
        "train_rows": len(td.train),
        "valid_rows": len(td.valid),
        "trainable_parameters": n_params,
        "adapter_path": str(final),
        "trainer": "pyfuse.train.loop (mlx-lm's step)",
    }
    try:
        import mlx_lm

        config["mlx_lm_version"] = mlx_lm.__version__
    except AttributeError:
        pass
    from .. import __version__

    config["pyfuse_version"] = __version__
    return config


def read_run_config(run_dir: Path) -> dict | None:
    """The config a run directory was started with (without the versions
    of pyfuse, which may differ between a run and its resumption)."""
    try:
        with open(run_dir / ADAPTER_CONFIG, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    config.pop("pyfuse_version", None)
    return config


def write_json(path: Path, obj, indent: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def _plot_losses(path: Path, losses: list[dict], val_losses: list[dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:  # plotting is optional
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if losses:
        ax.plot([r["iteration"] for r in losses], [r["train_loss"] for r in losses], label="train", marker=".")
    if val_losses:
        ax.plot([r["iteration"] for r in val_losses], [r["val_loss"] for r in val_losses], label="valid",
                marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def finish_dir(out: Path, net, trainable: dict, config: dict, prog, title: str, warnings: list[str]) -> None:
    """Write the final adapter (the model's current weights: the last
    step's, or the best ones after ``select_best``), the config and the
    loss curve into the run directory ``out``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(net.trainable_parameters()))
    if set(weights) != set(trainable):
        raise RuntimeError("the model's trainable tensors changed during training")
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), weights)
    losses = [r["train_loss"] for r in prog.train] + [r["val_loss"] for r in prog.val]
    if any(not math.isfinite(x) for x in losses):
        warnings.append("the loss became NaN/inf: lower learning_rate")
    if config.get("select_best") and not (out / BEST_WEIGHTS).exists():
        warnings.append("select_best: no validation data, the last step's adapter was written")
    write_json(out / ADAPTER_CONFIG, config, 4)
    write_json(out / LOSS_FILE, {"steps_per_report": config["steps_per_report"], "train": prog.train,
                                 "val": prog.val}, 2)
    _plot_losses(out / LOSS_PLOT, prog.train, prog.val, title)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # a finished run is not resumed: no optimizer state
