"""Stratified sampling of a local MMLU-Pro copy: ``N`` rows spread over its
categories (the study mined 6,000 of MMLU-Pro's 12,032 test questions over
its 14 categories), deterministic from a seed.

* Every row is validated as an MMLU-Pro row (:class:`pyfuse.data.mmlu.MCItem`:
  question_id, question, options, answer, answer_index, cot_content,
  category, src) and written back exactly as read (every column kept).
* Allocation over the categories: ``proportional`` (each category's share of
  the file, rounded by largest remainders: the quotas sum to ``N`` exactly;
  ties go to the category that sorts first) or ``equal`` (the same number
  from each category, a category too small to give its share gives all it
  has and the rest is shared among the others).
* Within a category the rows are ordered by id, then permuted by a generator
  seeded with ``(seed, crc32(category))``: a category's sample depends only
  on the seed, its own rows and its quota, not on the file's row order.
* The sample keeps the input file's row order.

Written atomically as JSON Lines, or Parquet when ``out`` ends in
``.parquet``/``.pq``.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io.outputs import check_file_destination, publish_file, publish_text
from .mmlu import PARQUET_SUFFIXES, id_key, load_mc_rows

ALLOCATIONS = ("proportional", "equal")

__all__ = ["ALLOCATIONS", "SampleResult", "allocate", "choose", "sample_mmlu"]


@dataclass
class SampleResult:
    """What :func:`sample_mmlu` chose: ``counts`` is ``{category: {"available",
    "chosen"}}`` (sorted by category)."""

    n_rows: int
    n: int
    seed: int
    allocation: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    ids: list = field(default_factory=list)  # the chosen question ids, in file order
    out: Path | None = None


def allocate(available: dict[str, int], n: int, allocation: str = "proportional") -> dict[str, int]:
    """How many rows each category gives (see the module doc); the quotas
    sum to ``n`` and none exceeds what its category has."""
    total = sum(available.values())
    if allocation not in ALLOCATIONS:
        raise UserError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if not 1 <= n <= total:
        raise UserError(f"cannot sample {n} rows from {total}")
    cats = sorted(available)
    if allocation == "proportional":
        exact = {c: n * available[c] / total for c in cats}
        quota = {c: int(exact[c]) for c in cats}
        by_remainder = sorted(cats, key=lambda c: (-(exact[c] - quota[c]), c))
        for c in by_remainder[:n - sum(quota.values())]:
            quota[c] += 1
        return quota
    quota = {c: 0 for c in cats}
    left = n
    while left:
        open_ = [c for c in cats if quota[c] < available[c]]
        share, extra = divmod(left, len(open_))
        for i, c in enumerate(open_):
            give = min(share + (1 if i < extra else 0), available[c] - quota[c])
            quota[c] += give
            left -= give
    return quota


def _rng(seed: int, label: str) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process.
    return np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])


def _write(out: Path, rows: list[dict], force: bool) -> None:
    if out.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow as pa
        import pyarrow.parquet as pq

        publish_file(out, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), str(tmp)), force, "--out")
        return
    import json

    publish_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), force, "--out")


def choose(items: list, n: int, *, seed: int = 0, allocation: str = "proportional") -> list[int]:
    """The indices (ascending) of the ``n`` items (:class:`MCItem`) the
    stratified sample keeps (see the module doc)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise UserError(f"n must be an integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    by_cat: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_cat.setdefault(item.category, []).append(i)
    quota = allocate({c: len(v) for c, v in by_cat.items()}, n, allocation)
    chosen: list[int] = []
    for cat in sorted(by_cat):
        members = sorted(by_cat[cat], key=lambda i: id_key(items[i].question_id))
        order = _rng(seed, f"category:{cat}").permutation(len(members))
        chosen += [members[j] for j in order[:quota[cat]]]
    return sorted(chosen)


def sample_mmlu(data: str | os.PathLike, n: int, *, seed: int = 0, allocation: str = "proportional",
                out: str | os.PathLike | None = None, force: bool = False) -> SampleResult:
    """Sample ``n`` rows of the MMLU-Pro file ``data`` (JSONL or Parquet),
    stratified by category (see the module doc); with ``out``, write them
    there (never over ``data`` itself; over an existing file only with
    ``force``)."""
    if out is not None and Path(out).resolve() == Path(data).resolve():
        raise UserError(f"--out {out} is the input data; choose another file")
    if out is not None:
        check_file_destination(out, force, "--out")  # before any work
    pairs = load_mc_rows(data)
    items = [item for item, _ in pairs]
    chosen = choose(items, n, seed=seed, allocation=allocation)
    available: dict[str, int] = {}
    for item in items:
        available[item.category] = available.get(item.category, 0) + 1
    picked: dict[str, int] = {}
    for i in chosen:
        picked[items[i].category] = picked.get(items[i].category, 0) + 1
    result = SampleResult(n_rows=len(pairs), n=n, seed=seed, allocation=allocation,
                          counts={c: {"available": available[c], "chosen": picked.get(c, 0)} for c in sorted(available)},
                          ids=[items[i].question_id for i in chosen])
    if out is not None:
        result.out = Path(out)
        _write(result.out, [pairs[i][1] for i in chosen], force)
    return result
