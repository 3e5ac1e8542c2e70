"""The model-level fuse (``pyfuse fuse``): adapter -> key map -> plan ->
kernel -> writer -> report. :func:`fuse_model` is the entry point."""

from .api import FuseResult, format_table, fuse_model

__all__ = ["FuseResult", "format_table", "fuse_model"]
