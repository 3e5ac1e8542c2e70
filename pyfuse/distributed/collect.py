"""Collectives on bytes, results gathered by item, failures agreed on.

Every function here is called by every rank at the same point (a
collective); with one process each is a plain pass-through (no
``mx.distributed`` call, the caller's exception propagates unchanged).

A rank whose own work fails still joins the next collective and sends its
error, so the others stop with a clear :class:`RankError` naming it
instead of waiting forever in a collective it never reaches; the failing
rank re-raises its own exception. A rank that dies (killed, out of memory)
closes its connections: the collective raises on the others, which
becomes a :class:`RankError` too. A rank that hangs blocks the others (MLX
collectives have no timeout).
"""

from __future__ import annotations

import json
import threading
import zlib
from contextlib import contextmanager
from typing import Any, Callable

from ..errors import UserError
from .group import current
from .shard import shard_batches

__all__ = ["RankError", "all_gather_bytes", "broadcast_json", "map_shard", "together"]


class RankError(UserError):
    """Another rank failed or was lost: this rank's work is discarded (rank 0
    reports it; the failed rank reports its own error)."""


def _lost(what: str, detail) -> RankError:
    return RankError(f"lost the connection to another rank while {what} (a rank died or was killed: see its "
                     f"output; {detail}); nothing of this step was written, run again to resume")


# Every rank's part starts with this mark: MLX's ring backend may hand back a zero-filled part
# for a peer that died instead of raising, so a part without its mark, or whose bytes fail their
# CRC, is a lost rank, never data.
_MARK = 0x5059_4655_5345_0016


def all_gather_bytes(data: bytes, what: str) -> list[bytes]:
    """Every rank's ``data``, in rank order: a header per rank (mark,
    length, CRC-32), then the bytes padded to the longest as uint8 and
    trimmed back; a part that fails its checks is a lost rank."""
    g = current()
    if g.size == 1:
        return [bytes(data)]
    import mlx.core as mx
    import numpy as np

    def gather(x):
        try:
            return _waiting(lambda: np.array(mx.distributed.all_gather(mx.array(x), group=g.handle,
                                                                        stream=mx.cpu)))
        except RuntimeError as err:  # the backend's error for a closed or failed connection
            raise _lost(what, f"MLX: {err}") from None

    heads = gather(np.array([_MARK, len(data), zlib.crc32(data)], dtype=np.int64)).reshape(g.size, 3)
    _check([h[0] == _MARK for h in heads], what)
    lengths = [int(h[1]) for h in heads]
    width = max(lengths)
    buf = np.zeros(max(width, 1), dtype=np.uint8)
    buf[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    out = gather(buf)
    out = out.reshape(g.size, max(width, 1))
    parts = [out[r, :lengths[r]].tobytes() for r in range(g.size)]
    _check([zlib.crc32(p) == int(h[2]) for p, h in zip(parts, heads)], what)
    return parts


def _waiting(collective):
    """Run ``collective`` in a thread while this one waits: signal handlers keep running here (when a
    rank dies, mlx.launch stops the others with SIGTERM, and a collective waiting for the dead rank may
    never return)."""
    box = {}

    def run():
        try:
            box["value"] = collective()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = err

    worker = threading.Thread(target=run, name="pyfuse-collective", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.25)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _check(intact: list[bool], what: str) -> None:
    lost = [r for r, ok in enumerate(intact) if not ok]
    if lost:
        raise _lost(what, f"nothing came from rank {', '.join(map(str, lost))}")


def broadcast_json(obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` (JSON) on every rank; the other ranks' ``obj`` is ignored."""
    g = current()
    if g.size == 1:
        return obj
    data = json.dumps(obj).encode() if g.is_main else b""
    return json.loads(all_gather_bytes(data, what)[0])


def describe(err: BaseException) -> str:
    """One line for another rank's error report."""
    if isinstance(err, UserError):
        return str(err)
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0]}" if first else type(err).__name__


def _settle(errors: list[str | None], local: Exception | None, what: str) -> None:
    """Raise on every rank when any rank failed: the failed rank its own exception, the others a RankError."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if local is not None:
        raise local
    r, msg = failed[0]
    more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise RankError(f"rank {r} failed while {what}{more}: {msg}")


@contextmanager
def together(what: str):
    """Run the block on every rank; if it fails on any rank, it fails on all
    (after it, every rank has the same outcome)."""
    if current().size == 1:
        yield
        return
    local = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - reported to the other ranks, then re-raised
        local = err
    notes = all_gather_bytes(json.dumps(describe(local) if local else None).encode(), what)
    _settle([json.loads(b) for b in notes], local, what)


def map_shard(n: int, batch_size: int, score: Callable[[Any], list], what: str) -> list:
    """``score(shard)`` on this rank's :func:`shard_batches` share of ``n``
    items (one result per item of ``shard.items``, JSON-serialisable), the
    results of every rank gathered and put back in item order, on every
    rank. One process: ``score`` of the whole range, as it is."""
    g = current()
    shard = shard_batches(n, batch_size, g.rank, g.size)
    if g.size == 1:
        return score(shard)
    local, rows = None, None
    try:
        rows = list(score(shard))
        if len(rows) != len(shard.items):
            raise RuntimeError(f"{len(rows)} results for {len(shard.items)} items")
    except Exception as err:  # noqa: BLE001 - reported to the other ranks, then re-raised
        local = err
    payload = {"error": describe(local)} if local else {"rows": rows}
    parts = [json.loads(b) for b in all_gather_bytes(json.dumps(payload).encode(), what)]
    _settle([p.get("error") for p in parts], local, what)
    out: list = [None] * n
    for r, part in enumerate(parts):
        for i, row in zip(shard_batches(n, batch_size, r, g.size).items, part["rows"]):
            out[i] = row
    return out
