"""A Hugging Face repo id where a model directory is expected: resolved the
way ``mlx_lm.load`` resolves it (``huggingface_hub.snapshot_download`` with
mlx-lm's file patterns), from the local cache first so that nothing touches
the network when the snapshot is there (offline included)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """``model`` itself when it exists (or does not look like a repo id: the
    reader then says it does not exist), else the repo's snapshot directory."""
    path = Path(model)
    text = str(model)
    if path.exists() or not _REPO_ID.match(text) or text.startswith((".", "/")):
        return path
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception:  # not cached (huggingface_hub's errors vary by version): mlx-lm downloads it
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model {text} is not a directory, and as a Hugging Face repo it is neither in "
                        f"the local cache ({HF_HUB_CACHE}) nor downloadable ({why})") from None
