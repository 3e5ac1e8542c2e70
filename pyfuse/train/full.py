"""Full fine-tuning (``fine_tune_type: full``): every parameter of the chosen
layers is trained, and the result is a model directory, not an adapter.

What is trained, as ``mlx_lm lora --fine-tune-type full``: the model is
frozen and the chosen blocks unfrozen (``num_layers``: the last N blocks;
pyfuse's ``layers``: explicit indices), so every parameter in them trains
(projections, experts, router, norms). With ``keys`` only those modules of
the chosen blocks train (their weight and bias).

A quantized base: a quantized weight takes no gradient (MLX's
``QuantizedLinear`` keeps its packed codes, scales and biases frozen, so
mlx-lm's own full fine-tune of a quantized model trains only the norms).
pyfuse dequantizes the chosen blocks' quantized modules first (mlx-lm's
``dequantize_model``: ``mx.dequantize`` to the scales' dtype) and trains
those float weights. The output is then written by pyfuse's fuse machinery
(the trained tensors are an mlx-lm full fine-tune adapter,
:func:`pyfuse.fuse.api.fuse_model` writes it over the base):

* the weight of every trained module that the base stores quantized is
  **re-quantized** at that module's own bits, group size and mode, under
  ``requant_policy``: ``stock`` quantizes the trained weight afresh
  (``mx.quantize``: new codes, scales and biases for every group);
  ``preserve`` / ``stochastic`` keep each group's scale and bias and move
  its codes towards the trained weight (groups whose values leave the grid's
  range are re-fitted);
* every other trained tensor (norms, biases, a float router) replaces the
  base's, in the base's dtype;
* every tensor outside the trained modules is copied byte for byte.

So the output has the base's quantization and config.json, and only the
chosen layers differ. It also holds ``training/``: the run's config, loss
curve, the fuse report and the trained float tensors themselves
(``training/adapters.safetensors`` with ``adapter_config.json``: a full
fine-tune adapter that ``pyfuse fuse --adapter-path DIR/training``
re-quantizes under another policy), and a README note naming the
re-quantized tensors.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..io.names import natural_key
from ..options import GRID_KEEPING_POLICIES
from .trainer import seed_everything

REQUANT_POLICIES = ("stock", *GRID_KEEPING_POLICIES)
DEFAULT_REQUANT_POLICY = "stock"
TRAINING_DIR = "training"
_COPIED = ("adapter_config.json", "adapters.safetensors", "loss.json", "loss.png")

__all__ = ["DEFAULT_REQUANT_POLICY", "REQUANT_POLICIES", "TRAINING_DIR", "check_requant_policy",
           "unfreeze_layers", "write_model"]


def check_requant_policy(policy) -> None:
    if policy not in REQUANT_POLICIES:
        raise UserError(f"requant_policy must be one of {', '.join(REQUANT_POLICIES)}, got {policy!r} "
                        "(calibrated needs calibration data: fuse DIR/training with pyfuse fuse)")


def unfreeze_layers(net, targets, keys_given: bool, seed: int) -> tuple[dict, list[str]]:
    """Freeze ``net``, dequantize the chosen blocks' quantized modules and
    unfreeze the blocks (or, with ``keys_given``, the ``targets`` modules);
    returns ``(trainable parameters by name, trained module paths)``."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    indices = range(len(net.layers)) if targets.layers is None else targets.layers
    for i in indices:
        dequantize_model(net.layers[i])  # in place; float layers are left as they are
    net.freeze()  # after: the dequantized modules are new, hence trainable
    seed_everything(seed)
    if keys_given:
        by_path = dict(net.named_modules())
        for path in targets.modules:
            by_path[path].unfreeze()
    else:
        for i in indices:
            net.layers[i].unfreeze()
    trainable = dict(tree_flatten(net.trainable_parameters()))
    if not trainable:
        raise UserError("no parameter to train in the selected layers")
    modules = sorted({k.rsplit(".", 1)[0] for k in trainable}, key=natural_key)
    return trainable, modules


def _cast_to_base(weights_file: Path, mdir) -> dict[str, list[str]]:
    """The trained tensors that replace a base tensor of the same shape, in
    its dtype (the output keeps the base's dtypes); the float weights of
    quantized modules stay as trained (the re-quantization reads them).
    Returns ``{"requantized": [...], "replaced": [...]}`` (tensor names)."""
    import mlx.core as mx

    from ..fuse.compute import _MX_DTYPE

    weights = mx.load(str(weights_file))
    kinds: dict[str, list[str]] = {"requantized": [], "replaced": []}
    for name, arr in weights.items():
        info = mdir.tensors.get(name)
        quantized = name.endswith(".weight") and f"{name[:-len('.weight')]}.scales" in mdir.tensors
        kinds["requantized" if quantized else "replaced"].append(name)
        if info is not None and tuple(info.shape) == tuple(arr.shape) and info.dtype in _MX_DTYPE:
            weights[name] = arr.astype(_MX_DTYPE[info.dtype])
    tmp = weights_file.with_name(weights_file.name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, weights_file)
    return {k: sorted(v, key=natural_key) for k, v in kinds.items()}


def _note(model: str, config: dict, kinds: dict) -> str:
    """README.md of ``training/``: what was trained and what re-quantized."""
    requant = [n[: -len(".weight")] for n in kinds["requantized"]]
    replaced = kinds["replaced"]
    layers = config.get("layers")
    lines = [
        "# Full fine-tune (pyfuse train --fine-tune-type full)", "",
        f"Base model: `{model}`. Trained blocks: {'all' if layers is None else ', '.join(map(str, layers))}"
        f" ({config.get('trainable_parameters', 0):,} parameters, {config.get('iters')} iterations).", "",
    ]
    if requant:
        lines += [f"Re-quantized under `requant_policy: {config['requant_policy']}` (each at the base module's "
                  "own bits, group size and mode; `weight`, `scales` and `biases` rewritten; "
                  + ("codes, scales and biases fitted afresh by mx.quantize" if config["requant_policy"] == "stock"
                     else "each group's scale and bias kept unless its values left the grid's range")
                  + f"), {len(requant)} module{'s' if len(requant) != 1 else ''}:", ""]
        lines += [f"- `{m}`" for m in requant] + [""]
    else:
        lines += ["The base stores none of the trained modules quantized: nothing was re-quantized.", ""]
    if replaced:
        lines += [f"Written as trained, in the base's dtype ({len(replaced)} float tensors: norms, "
                  "biases, unquantized weights):", ""] + [f"- `{m}`" for m in replaced] + [""]
    lines += ["Every other tensor is byte-identical to the base's.", "",
              "`adapters.safetensors` + `adapter_config.json` here are the trained float tensors (an mlx-lm "
              "full fine-tune adapter of the base): `pyfuse fuse --model BASE --adapter-path THIS_DIR "
              "--policy preserve` writes them under another re-quantization policy. `fuse_report.json`: "
              "the report of writing them over the base.", ""]
    return "\n".join(lines)


def write_model(model_path: str, run_dir: Path, final: Path, config: dict, *, policy: str, seed: int,
                force: bool) -> dict:
    """Write the trained tensors of ``run_dir`` over the base ``model_path``
    into the model directory ``final`` (see the module doc); returns the
    fuse report (``config`` gains the lists ``requantized`` and ``replaced``:
    tensor names). ``run_dir`` is removed once ``final`` is in place."""
    from ..fuse.api import fuse_model
    from ..io.files import write_json
    from ..io.model_dir import ModelDir
    from ..io.outputs import publish

    with ModelDir(model_path) as mdir:
        kinds = _cast_to_base(run_dir / "adapters.safetensors", mdir)
    config.update(requantized=kinds["requantized"], replaced=kinds["replaced"])
    staging = final.parent / f".{final.name}.model.run"
    try:  # a failed fuse leaves no staging directory behind either
        res = fuse_model(model_path, run_dir, staging, policy=policy, seed=seed, force=True)
        training = staging / TRAINING_DIR
        if training.exists():  # a base that is itself a full fine-tune: its record is not this run's
            shutil.rmtree(training)
        training.mkdir()
        for name in _COPIED:
            if (run_dir / name).exists():
                shutil.copyfile(run_dir / name, training / name)
        write_json(training / "fuse_report.json", res.report)
        write_json(training / "adapter_config.json", config)  # with the lists
        (training / "README.md").write_text(_note(model_path, config, kinds), encoding="utf-8")
        publish(staging, final, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    return res.report
