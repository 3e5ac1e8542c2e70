"""Progress estimates: how long a step will take, from the steps of its
kind already timed (in this run and in earlier runs in the same directory,
read back from ``run.log.jsonl``), scaled by each step's work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def rate_group(kind: str, options: dict) -> str:
    """Steps whose durations are comparable (per unit of work): the same
    kind, and for eval-mc the same method (generating costs far more per
    item than scoring log-probabilities)."""
    if kind == "eval-mc" and options.get("method"):
        return f"{kind}/{options['method']}"
    return kind


_COUNTS: dict[tuple, int] = {}


def _cached_count(path: Path, count: Callable[[Path], int]) -> int | None:
    """``count(path)``, cached by path, size and mtime; None if the file
    cannot be read (yet) or the count fails (an estimate only, never an error)."""
    try:
        st = path.stat()
        if not path.is_file():
            return None
        key = (count.__name__, str(path), st.st_size, st.st_mtime_ns)
        if key not in _COUNTS:
            _COUNTS[key] = int(count(path))
        return _COUNTS[key] or None
    except Exception:
        return None


def count_rows(path: Path) -> int:
    """Rows of a JSONL (non-blank lines) or Parquet (from its metadata) file."""
    from ..data.mmlu import PARQUET_SUFFIXES

    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _prompts(path: Path) -> int:
    """Prompts of an identity suite file (YAML or JSON)."""
    import yaml

    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    return len(data["prompts"])


def work_units(kind: str, options: dict, inputs: dict[str, Path]) -> float | None:
    """How much work a step is, in units whose cost is about constant within
    a rate group: items scored (eval-mc), prompts answered (eval-identity),
    examples trained on (train: iters x batch_size). None when unknown (other
    kinds, or an input that does not exist yet)."""
    try:
        if kind == "train":
            iters = options.get("iters")
            if not iters:
                return None
            return float(iters) * float(options.get("batch_size") or 1)
        if kind == "eval-mc":
            if "data" not in inputs:
                return None
            n = _cached_count(Path(inputs["data"]), count_rows)
            limit = options.get("limit")
            if n is not None and limit:
                n = min(n, int(limit))
            return float(n) if n else None
        if kind == "eval-identity":
            from ..evals.identity import default_suite_path

            suite = inputs.get("suite")
            n = _cached_count(Path(suite) if suite is not None else default_suite_path(), _prompts)
            return float(n) if n else None
    except (TypeError, ValueError):
        return None
    return None


class Estimator:
    """Seconds a step will take, from the steps of its rate group (see
    :func:`rate_group`) already run, in this run and earlier runs in the same
    directory: the seconds per unit of work observed so far times the step's
    units (:func:`work_units`); without units, the mean duration of the
    group."""

    def __init__(self, history: list[dict] = ()):
        self.by_group: dict[str, list[float]] = {}
        self.work: dict[str, list[tuple[float, float]]] = {}  # group -> [(seconds, units)]
        for rec in history:
            if rec.get("event") == "step" and isinstance(rec.get("seconds"), (int, float)):
                units = rec.get("units")
                self.add(rec.get("group") or rec.get("kind"), rec["seconds"],
                         units if isinstance(units, (int, float)) else None)

    def add(self, group: str, seconds: float, units: float | None = None) -> None:
        self.by_group.setdefault(group, []).append(float(seconds))
        if units and units > 0:
            self.work.setdefault(group, []).append((float(seconds), float(units)))

    def estimate(self, group: str, units: float | None = None) -> float | None:
        done = self.work.get(group)
        if units and units > 0 and done:
            seconds = sum(s for s, _ in done)
            total = sum(u for _, u in done)
            return seconds / total * units
        xs = self.by_group.get(group)
        return sum(xs) / len(xs) if xs else None


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
