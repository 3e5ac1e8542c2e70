"""Numbers in specs: YAML 1.1 reads ``5e-6`` (no dot) as a string."""

from __future__ import annotations

from typing import Any

__all__ = ["yaml_number"]


def yaml_number(v: Any) -> Any:
    """A number, or a numeric string as a float; a bool is refused."""
    if isinstance(v, bool):
        raise ValueError(f"must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"must be a number, got {v!r}") from None
    return v
