"""The distributed group of this process: a no-op without a launcher.

``mlx.launch`` (ring, JACCL) sets ``MLX_RANK`` in every rank's environment
and MPI sets its own rank variable; without one of them this is one
process (rank 0 of 1) and ``mx.distributed`` is never initialised. Under a
launcher the group is initialised strictly: a backend that does not start
is an error, never a silent fall-back to size 1 (every rank would then run
the whole job and write the same files). ``mlx.launch -n 1`` gives an empty
hostfile: one process.

Call :func:`current` before importing mlx-lm pieces that ask MLX for its
group (the CLI does it first thing).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

LAUNCHER_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")

__all__ = ["Group", "LAUNCHER_ENV", "alone", "current", "launched", "peek", "writes"]


@dataclass(frozen=True)
class Group:
    rank: int
    size: int
    handle: Any = None  # the mx.distributed.Group when size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current: Group | None = None


def launched() -> bool:
    """Whether a distributed launcher started this process."""
    return any(os.environ.get(k) not in (None, "") for k in LAUNCHER_ENV)


def current() -> Group:
    """This process's group (initialised once)."""
    global _current
    if _current is None:
        _current = _init()
    return _current


def peek() -> Group:
    """This process's group if it was started, else one process (never starts it)."""
    return _current or Group(0, 1)


@contextmanager
def alone():
    """The block runs as one process (rank 0 of 1): for work one rank does
    while the others wait (pyfuse.distributed.experiment), whose own
    collectives would otherwise wait for ranks that do not take part."""
    global _current
    saved = current()
    _current = Group(0, 1)
    try:
        yield
    finally:
        _current = saved


def writes() -> bool:
    """Whether this process writes outputs (rank 0; the only process without a launcher)."""
    return current().is_main


def _empty_hostfile() -> bool:
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            return not fh.read().strip()
    except OSError:
        return False


def _init() -> Group:
    if not launched():
        return Group(0, 1)
    import mlx.core as mx

    try:
        g = mx.distributed.init(strict=True)
    except RuntimeError as err:
        if _empty_hostfile():  # mlx.launch -n 1
            return Group(0, 1)
        raise UserError(f"started by a distributed launcher (rank {os.environ.get('MLX_RANK', '?')}) but "
                        f"MLX's distributed backend did not start: {err}") from None
    if g.size() == 1:
        return Group(0, 1)
    return Group(g.rank(), g.size(), g)
