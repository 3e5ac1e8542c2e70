"""What ``mlx_lm fuse`` does after writing the fused model, through
mlx-lm's own functions: ``--export-gguf`` (``mlx_lm.gguf.convert_to_gguf``)
and ``--upload-repo`` (``mlx_lm.utils.upload_to_hub``, huggingface_hub's
upload). The checks run before anything is written; the GGUF file appears
under its name only when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..io.files import tmp_path_for
from ..io.model_dir import ModelDir

# The model types mlx-lm's GGUF export supports (mlx_lm/fuse.py).
GGUF_MODEL_TYPES = ("llama", "mixtral", "mistral")


def check_gguf(mdir: ModelDir, dequantize: bool) -> None:
    """Refuse up front what ``convert_to_gguf`` would refuse after the fuse."""
    model_type = mdir.config.get("model_type")
    if model_type not in GGUF_MODEL_TYPES:
        raise UserError(f"--export-gguf: model type {model_type!r} is not supported by mlx-lm's GGUF export "
                        f"({', '.join(GGUF_MODEL_TYPES)})")
    if mdir.declared_quantization is not None and not dequantize:
        raise UserError("--export-gguf: mlx-lm exports full-precision models only; add --dequantize")
    if not (mdir.path / "tokenizer.json").exists():
        raise UserError(f"--export-gguf: {mdir.path} has no tokenizer.json (mlx-lm's GGUF export needs it)")


def export_gguf(save_path: Path, gguf_path: str) -> Path:
    """``save_path / gguf_path`` (as mlx-lm joins them) from the fused model."""
    import mlx.core as mx
    from mlx_lm.gguf import convert_to_gguf

    weights = {}
    for shard in sorted(save_path.glob("model*.safetensors")):
        weights.update(mx.load(str(shard)))
    config = json.loads((save_path / "config.json").read_text())
    final = save_path / gguf_path
    tmp = tmp_path_for(final).with_suffix(".gguf")
    try:
        convert_to_gguf(save_path, weights, config, str(tmp))
        os.replace(tmp, final)
    except (OSError, ValueError, NotImplementedError) as err:
        raise UserError(f"--export-gguf failed ({err}); the fused model is in {save_path}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def upload(save_path: Path, repo: str) -> None:
    """Upload ``save_path`` to the Hub repo ``repo`` as ``mlx_lm fuse
    --upload-repo`` does (its model card, written by mlx-lm when the
    directory has none)."""
    from mlx_lm.utils import create_model_card, upload_to_hub

    try:
        if not (save_path / "README.md").exists():
            create_model_card(save_path, None)
        upload_to_hub(str(save_path), repo)
    except Exception as err:  # network, authentication, offline mode: huggingface_hub's many errors
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--upload-repo {repo}: the upload failed ({type(err).__name__}: {why}); "
                        f"the fused model is in {save_path}") from None
