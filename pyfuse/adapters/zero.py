"""The zero-delta twin of an adapter: the control that tells a learned change
from the fuse-and-requantize pipeline itself.

:func:`zero_adapter` writes an adapter directory that is structurally
identical to its parent (the same ``adapter_config.json`` byte for byte, the
same tensor names, shapes, dtypes, order and safetensors metadata) whose
learned delta is exactly zero:

* LoRA: ``lora_b`` is all zeros and ``lora_a`` is kept, so ``scale * B @ A``
  is exactly 0 for every module and layout (Linear, SwitchLinear, Embedding);
  ``mlx_lm fuse`` and ``pyfuse fuse`` then run every step of the real fuse
  (dequantize, add, re-quantize) on the same modules with nothing to add;
* DoRA: ``lora_b`` zeros as above, and the magnitude ``m`` of every row set
  to the norm of that row of the base weight as the fuse computes it
  (``||dequantize(W)||`` in float32, the default of mlx-lm's DoRALinear), so
  the DoRA rescale ``m / ||W + 0||`` is 1 up to float noise and each row is
  left as it was. That needs the base model (``model``): a DoRA adapter's
  ``m`` cannot be zeroed without knowing the weights it rescales.

With ``pyfuse fuse --policy preserve`` a zero adapter leaves the model
byte-identical (LoRA, and DoRA through the kernel's snapping of a rescale
within 1e-5 of 1); with ``--policy stock`` (what ``mlx_lm fuse`` does) the
fused modules are re-quantized with nothing added, which is the
re-quantization noise the zero-delta control measures.

Next to the adapter files, ``zero_adapter.json`` records the parent and what
was zeroed. Output is written to a temporary directory next to ``out`` and
renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..fuse.mapping import match_module
from ..fuse.writer import fsync_path
from ..io.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from ..errors import UserError
from ..io.outputs import check_destination, check_paths, staged_dir
from ..io.safetensors import SafetensorsFile, SafetensorsWriter

PROVENANCE = "zero_adapter.json"

__all__ = ["ZeroAdapterResult", "zero_adapter", "is_zero_adapter"]


@dataclass
class ZeroAdapterResult:
    out: Path
    fine_tune_type: str
    modules: list[str] = field(default_factory=list)  # modules whose lora_b was zeroed
    magnitudes: list[str] = field(default_factory=list)  # DoRA modules whose m was reset


def _base_row_norms(model_dir, path: str, mod) -> mx.array:
    """``||row||`` (float32) of the base weight of module ``path``, as
    pyfuse.fuse.compute / mlx-lm's DoRALinear compute it for a missing magnitude."""
    from ..fuse.compute import row_norms

    weight = model_dir.tensors.get(f"{path}.weight")
    if weight is None:
        raise UserError(f"the adapter has a DoRA magnitude for {path}, which the model "
                        f"{model_dir.path} does not have")
    match = match_module(mod, weight)
    w, s, b = model_dir.read_module(path)
    q = model_dir.quant_params(path, match.in_dims) if s is not None else None
    norms = row_norms(w, s, b, q)
    mx.eval(norms)
    return norms


def zero_adapter(adapter_path: str | os.PathLike, out: str | os.PathLike, *,
                 model: str | os.PathLike | None = None, force: bool = False) -> ZeroAdapterResult:
    """Write the zero-delta twin of ``adapter_path`` to ``out`` (see the
    module doc). ``model`` (the base model directory the adapter is fused
    into) is required for DoRA adapters and ignored otherwise.

    Raises:
        UserError: unreadable adapter, a DoRA adapter without ``model``, a
            model that does not fit, ``out`` existing without ``force``.
    """
    src = Path(adapter_path)
    final = Path(out)
    adapter = read_adapter(src)  # validates config and tensor names
    check_paths({"--adapter-path": src, "--model": model}, {"--out": final})
    check_destination(final, force, "--out")
    if adapter.is_dora and model is None:
        raise UserError(f"{src} is a DoRA adapter: its zero-delta twin needs the base model "
                        "(--model) to set each magnitude to the norm of the row it rescales")

    for mod in adapter.modules.values():  # a magnitude alone would keep a rescale
        if mod.magnitude is not None and mod.lora_b is None:
            raise UserError(f"{src}: {mod.path} has a DoRA magnitude but no lora_a/lora_b")
    model_dir = None
    if adapter.is_dora:
        from ..io.model_dir import ModelDir

        model_dir = ModelDir(model)
    result = ZeroAdapterResult(out=final, fine_tune_type=adapter.fine_tune_type)
    try:
        with staged_dir(final, force, "--out") as tmp:
            _write_twin(src, tmp, adapter, model_dir, model, result)
    finally:
        if model_dir is not None:
            model_dir.close()
    return result


def _write_twin(src: Path, tmp: Path, adapter, model_dir, model, result: ZeroAdapterResult) -> None:
    """The zero-delta twin's files, into ``tmp``."""
    shutil.copyfile(src / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
    with SafetensorsFile(src / ADAPTER_WEIGHTS) as f:
        entries = [(t.name, t.dtype, t.shape) for t in f.tensors.values()]
        with SafetensorsWriter(tmp / ADAPTER_WEIGHTS, entries, metadata=f.metadata) as w:
            for name, info in f.tensors.items():
                module, _, leaf = name.rpartition(".")
                if leaf == "lora_b":
                    arr = f.read(name)
                    w.write(name, mx.zeros(arr.shape, dtype=arr.dtype))
                    result.modules.append(module)
                elif leaf == "m":
                    m = f.read(name)
                    norms = _base_row_norms(model_dir, module, adapter.modules[module])
                    if tuple(norms.shape) != tuple(m.shape):
                        raise UserError(f"adapter does not fit the model: {module}.m has shape "
                                        f"{list(m.shape)}, the model's rows {list(norms.shape)}")
                    w.write(name, norms.astype(m.dtype))
                    result.magnitudes.append(module)
                else:
                    w.copy_from(f, name)
    provenance = {
        "zero_delta_of": str(src.resolve()),
        "fine_tune_type": adapter.fine_tune_type,
        "zeroed": "lora_b" + (" (and m set to the base rows' norms)" if adapter.is_dora else ""),
        "model": str(Path(model).resolve()) if adapter.is_dora else None,
        "modules": len(result.modules),
    }
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    for p in tmp.iterdir():
        fsync_path(p)


def is_zero_adapter(adapter_path: str | os.PathLike) -> bool:
    """Whether every ``lora_b`` of the adapter is exactly zero."""
    adapter = read_adapter(adapter_path)
    for mod in adapter.modules.values():
        if mod.lora_b is not None and bool(mx.any(mod.lora_b != 0).item()):
            return False
    return True
