"""Content fingerprints of user-supplied paths (part of every step key that
reads them, :mod:`.plan`): SHA-256 of every file up to 64 MB, size and
modification time of larger ones (model shards)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import UserError
from .outputs import HASH_LIMIT, sha256_file
from .prereg import canonical_json

__all__ = ["fingerprint"]


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    if st.st_size <= HASH_LIMIT:
        return {"size": st.st_size, "sha256": sha256_file(path)}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(path: Path) -> dict:
    """Content fingerprint of a file or directory (hidden entries skipped);
    independent of where it lives."""
    path = Path(path)
    if path.is_file():
        return {"type": "file", **_file_fingerprint(path)}
    if path.is_dir():
        entries = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            entries.append([rel.as_posix(), _file_fingerprint(p)])
        return {"type": "dir", "sha256": hashlib.sha256(canonical_json(entries).encode()).hexdigest(),
                "files": len(entries)}
    raise UserError(f"{path} does not exist")
