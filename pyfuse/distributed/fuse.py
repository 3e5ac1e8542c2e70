"""``pyfuse fuse`` under a launcher: the fused modules computed across ranks,
the model written by rank 0.

Every rank reads the model and the adapter and makes the same plan (the
same code on the same files); the jobs are taken in the order the writer
asks for them (shard by shard, tensor by tensor: :func:`job_order`). In
round ``k`` rank ``r`` computes job ``k*N + r``: its new tensors and its
report record travel to rank 0 (:func:`.collect.all_gather_bytes`, so no
shared directory is needed), which writes them as one process would. A job
is a pure function of its inputs (the fuse kernels are deterministic and do
not depend on the thread or process), so the model rank 0 writes is the
one process's, byte for byte.

Rank 0 leads: each round starts with its word (``round`` or ``stop`` with
its error), so a failure on rank 0 (a full disk) stops the others, and a
rank whose job fails sends its error instead of tensors (every rank
stops, :class:`.collect.RankError`).

Memory: rank 0 holds one round's results (N jobs) until it writes them,
as one process holds one job's.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from typing import Callable

from .collect import RankError, all_gather_bytes, broadcast_json, describe
from .group import current

__all__ = ["follow_fuse", "job_order", "leading", "with_record"]


def job_order(mdir, plan) -> list:
    """The jobs in the order :mod:`pyfuse.fuse.writer` computes them."""
    by_tensor = {t: job for job in plan.jobs for t in job.inputs}
    order, seen = [], set()
    for shard in mdir.shards.values():
        for t in shard.tensors:
            job = by_tensor.get(t)
            if job is not None and job.path not in seen:
                seen.add(job.path)
                order.append(job)
    return order + [j for j in plan.jobs if j.path not in seen]


def with_record(run: Callable, records: list) -> Callable:
    """``run(job) -> tensors`` (which appends a fused module's record to
    ``records``) as ``job -> (tensors, record or None)``."""
    def both(job):
        n = len(records)
        tensors = run(job)
        return tensors, (records.pop() if len(records) > n else None)

    return both


@contextmanager
def leading(mdir, plan, run: Callable, records: list):
    """Rank 0 (or one process): ``(compute, finish)`` for the writer:
    ``compute(job)`` the job's tensors (one process: ``run`` itself), and
    ``finish(report)`` to call at the end (it sends the report to the
    others). An error in the block stops the others' rounds."""
    if current().size == 1:
        yield run, lambda report: None
        return
    compute, finish = _lead(job_order(mdir, plan), with_record(run, []), records)
    try:
        yield compute, finish
    except BaseException as err:
        finish(None, err)
        raise


def _pack(tensors: dict, record) -> bytes:
    import mlx.core as mx
    import numpy as np

    out = {}
    for name, arr in tensors.items():
        mx.eval(arr)
        out[name] = (str(arr.dtype).rsplit(".", 1)[-1], tuple(arr.shape),
                     np.array(arr.view(mx.uint8) if arr.size else mx.zeros((0,), mx.uint8)).tobytes())
    return pickle.dumps({"tensors": out, "record": record})


def _unpack(data: bytes) -> tuple[dict, dict | None]:
    import mlx.core as mx
    import numpy as np

    part = pickle.loads(data)
    tensors = {}
    for name, (dtype, shape, raw) in part["tensors"].items():
        flat = mx.array(np.frombuffer(raw, dtype=np.uint8))
        tensors[name] = flat.view(getattr(mx, dtype)).reshape(shape)
    return tensors, part["record"]


def _compute(run: Callable, job) -> bytes:
    """``run(job)``'s tensors and record, packed (``run`` appends the record to its own list)."""
    tensors, record = run(job)
    return _pack(tensors, record)


def _round(jobs: list, k: int, run: Callable) -> list[tuple[dict, dict | None]]:
    """Round ``k``: this rank's job computed, every rank's result gathered."""
    g = current()
    i = k * g.size + g.rank
    local, payload = None, b""
    try:
        payload = pickle.dumps(("ok", _compute(run, jobs[i]) if i < len(jobs) else None))
    except Exception as err:  # noqa: BLE001 - sent to the others, re-raised here
        local = err
        payload = pickle.dumps(("error", describe(err)))
    parts = [pickle.loads(p) for p in all_gather_bytes(payload, f"fusing modules (round {k + 1})")]
    failed = [(r, msg) for r, (status, msg) in enumerate(parts) if status == "error"]
    if local is not None:
        raise local
    if failed:
        raise RankError(f"rank {failed[0][0]} failed while fusing modules: {failed[0][1]}")
    return [_unpack(p) for status, p in parts if p is not None]


def _lead(jobs: list, run: Callable, records: list) -> tuple[Callable, Callable]:
    """Rank 0's ``compute(job)`` (from the rounds, results kept until the
    writer asks for them, their records appended to ``records`` in the
    writer's order) and ``finish(report, error=None)``, which ends the
    others' rounds."""
    done: dict[str, tuple[dict, dict | None]] = {}
    state = {"k": 0, "agreed": False}  # agreed: every rank already stopped on the same failed round
    n_rounds = -(-len(jobs) // current().size)

    def compute(job):
        while job.path not in done and state["k"] < n_rounds:
            broadcast_json({"round": state["k"]}, "fusing modules")
            first = state["k"] * current().size
            state["agreed"] = True
            results = _round(jobs, state["k"], run)
            state["agreed"] = False
            for j, result in zip(jobs[first:], results):
                done[j.path] = result
            state["k"] += 1
        tensors, record = done.pop(job.path)
        if record is not None:
            records.append(record)
        return tensors

    def finish(report, error: BaseException | None = None) -> None:
        if state["agreed"]:
            return
        msg = {"stop": describe(error)} if error is not None else {"end": report}
        try:
            broadcast_json(msg, "finishing the fuse")
        except RankError:
            if error is None:
                raise

    return compute, finish


def follow_fuse(jobs: list, run: Callable) -> dict:
    """A rank other than 0: compute its share of each round rank 0 starts;
    rank 0's report at the end."""
    while True:
        msg = broadcast_json(None, "waiting for rank 0 (fusing modules)")
        if "round" not in msg:
            if "stop" in msg:
                raise RankError(f"rank 0 stopped: {msg['stop']}")
            return msg["end"]
        _round(jobs, msg["round"], run)
