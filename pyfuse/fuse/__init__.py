"""The model-level fuse (``pyfuse fuse``), one module per stage: adapter ->
key map (:mod:`.mapping`) -> plan (:mod:`.plan`) -> kernel (:mod:`.compute`)
-> writer (:mod:`.writer`) -> report (:mod:`.report`); :mod:`.api` holds
:func:`fuse_model`, the entry point, and the checks of its options."""

from .api import FuseResult, fuse_model
from .report import format_table

__all__ = ["FuseResult", "format_table", "fuse_model"]
