"""Only rank 0 talks: the other ranks' standard output is discarded and
their progress bars off (``mlx.launch`` prints every rank's output); errors
are printed by the rank they happened on, tagged with it, and another
rank's failure (:class:`.collect.RankError`) only by rank 0. Before exiting
every rank waits for the others (:func:`farewell`): ``mlx.launch`` stops
the remaining ranks as soon as one exits with an error, which would
otherwise cut rank 0's report short."""

from __future__ import annotations

import os
import sys

from .collect import RankError, all_gather_bytes
from .group import current, peek

__all__ = ["farewell", "quiet_followers", "rank_tag", "reports"]


def quiet_followers() -> None:
    """Start the group (before mlx-lm asks for it) and silence ranks other than 0."""
    g = current()
    if g.is_main:
        return
    os.environ["PYFUSE_PROGRESS"] = "0"
    sys.stdout = open(os.devnull, "w", encoding="utf-8")


def rank_tag() -> str:
    """`` (rank r of s)`` under a launcher, else empty."""
    g = peek()
    return f" (rank {g.rank} of {g.size})" if g.size > 1 else ""


def reports(err: BaseException) -> bool:
    """Whether this rank prints ``err``: its own errors, and on rank 0 every error."""
    return peek().is_main or not isinstance(err, RankError)


def farewell() -> None:
    """Wait until every rank got here (a lost rank does not count)."""
    if peek().size > 1:
        try:
            all_gather_bytes(b"", "finishing")
        except RankError:
            pass
