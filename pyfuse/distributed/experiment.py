"""``pyfuse experiment run`` under a launcher: rank 0 leads, the others join
its evaluation and fuse steps.

Every rank checks the spec (its model, data and suite paths must exist on
every host). Rank 0 then runs the experiment exactly as one process does:
the run directory, its lock, the pre-registration, the plan, every step,
``results.json`` and the report are its alone, and it is the only rank
that writes. Before each step whose kind is in :data:`SHARDED_KINDS` it
tells the other ranks, which run the same step on their share (the items:
:func:`pyfuse.distributed.map_shard`; the fused modules:
:mod:`pyfuse.distributed.fuse`) into a private scratch directory that is
deleted; the rows or tensors come back to rank 0, which writes and
publishes the step as usual. Steps of other kinds (Set-G, the noise
floor, the zero/placebo/dither adapters) run on rank 0 while the others
wait, as one process (:func:`pyfuse.distributed.alone`); training
(:data:`ALONE_KINDS`) in a child process outside the group, so that the
adapter is one process's bit for bit (data-parallel training,
:mod:`pyfuse.distributed.training`, equals it only to float rounding,
which could change a fused code and so a result), unless the run asks for
data-parallel training (``--data-parallel-train``): then every rank runs
the train steps, each on its share of every batch.

The run directory must be on a filesystem every host sees at the same path
(the others load fused models from it): each rank checks that it sees the
``plan.json`` rank 0 wrote, and that its own spec gives the same plan.
Since no output depends on the number of ranks, a killed run resumes with
any number of ranks, or with none.

Rank 0 always ends the conversation: ``end`` (with the results) or
``stop`` (with its error) when its run fails; a rank that fails in a shared
step makes every rank fail (:mod:`.collect`).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path

from ..errors import UserError
from ..experiment.layout import PLAN_FILE
from ..experiment.load import load_checked_spec
from ..experiment.outputs import sha256_file
from ..experiment.plan import build_plan
from ..experiment.steps import RUNNERS
from .collect import RankError, broadcast_json, describe, together
from .group import LAUNCHER_ENV, alone, current
from .training import data_parallel

# every rank runs these steps: eval-mc on its shard of the items, fuse on its share of the modules
SHARDED_KINDS = frozenset({"eval-mc", "fuse"})
# training on rank 0 alone, in a child process outside the group: the adapter bit for bit one
# process's (data-parallel training equals it to float rounding only)
ALONE_KINDS = frozenset({"train"})

__all__ = ["ALONE_KINDS", "Leader", "SHARDED_KINDS", "check_spec", "follow"]


def check_spec(spec_path):
    """The checked spec, on every rank (a rank that cannot read it, or misses a path, fails them all)."""
    with together("checking the spec"):
        return load_checked_spec(spec_path, check_paths=True)


class Leader:
    """Rank 0's side (inert with one process). A context manager around the
    run: on leaving it tells the other ranks ``end`` or ``stop``."""

    def __init__(self, data_parallel_train: bool = False):
        self.active = current().size > 1
        self.parallel_train = data_parallel_train  # train steps on every rank (pyfuse.distributed.training)
        self.results: dict | None = None

    def check_train(self, plan) -> None:
        """With ``data_parallel_train``: every train step can be shared by the
        ranks (refused before any step runs, not when the step comes)."""
        if not (self.active and self.parallel_train):
            return
        for step in plan.ordered():
            if step.kind == "train":
                try:
                    data_parallel(step.options["batch_size"], step.options.get("train_mode") or "sft")
                except UserError as err:
                    raise UserError(f"--data-parallel-train: step {step.dirname}: {err}") from None

    def share_plan(self, out: Path, split_seed: int | None) -> None:
        """After ``plan.json`` is written: the others check they see it and plan the same."""
        if self.active:
            broadcast_json({"plan": sha256_file(Path(out) / PLAN_FILE), "split_seed": split_seed},
                           "sharing the plan")
            with together("checking that every rank sees the run directory"):
                pass

    def run(self, step, inputs: dict[str, Path], out: Path) -> dict:
        """Run ``step`` into ``out``: with the others if its kind is sharded,
        else on this rank alone; its summary."""
        if self.active and (step.kind in SHARDED_KINDS or (step.kind == "train" and self.parallel_train)):
            broadcast_json({"run": step.dirname}, f"starting step {step.dirname}")
        elif self.active and step.kind in ALONE_KINDS:
            return _outside_the_group(step.kind, step.options, inputs, out)
        elif self.active:
            with alone():  # the others wait for rank 0's next word, not in this step's collectives
                return RUNNERS[step.kind](step.options, inputs, out)
        return RUNNERS[step.kind](step.options, inputs, out)

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        if exc is None:
            broadcast_json({"end": self.results}, "finishing the run")
        elif isinstance(exc, Exception):  # an interrupt just ends: the others see the connection go
            try:
                broadcast_json({"stop": describe(exc)}, "stopping the run")
            except RankError:
                pass  # the others are gone already
        return False


def follow(spec, out) -> dict | None:
    """A rank other than 0: join rank 0's sharded steps until it ends the
    run; rank 0's results (or the error that stopped it)."""
    out = Path(out)
    failure: Exception | None = None
    msg = broadcast_json(None, "waiting for rank 0 to prepare the run")
    steps = {}
    if "plan" in msg:
        try:
            with together("checking that every rank sees the run directory"):
                steps = _same_plan(spec, out, msg)
        except Exception as err:  # noqa: BLE001 - rank 0 stops next
            failure = err
        msg = broadcast_json(None, "waiting for rank 0")
    while "run" in msg:
        try:
            _serve(steps[msg["run"]], out)
        except Exception as err:  # noqa: BLE001 - every rank saw it; rank 0 stops next
            failure = failure or err
        msg = broadcast_json(None, "waiting for rank 0")
    if "stop" in msg:
        raise failure or RankError(f"rank 0 stopped: {msg['stop']}")
    if failure is not None:
        raise failure
    return msg["end"]


def _same_plan(spec, out: Path, hello: dict) -> dict:
    plan_path = out / PLAN_FILE
    if not plan_path.is_file() or sha256_file(plan_path) != hello["plan"]:
        raise UserError(f"this rank does not see the run directory {out} as rank 0 wrote it (its {PLAN_FILE} is "
                        "missing or differs): the run directory must be on a filesystem every host shares, at "
                        "the same path")
    plan = build_plan(spec, hello["split_seed"])
    if json.dumps(plan.to_json(), indent=2, sort_keys=True) + "\n" != plan_path.read_text(encoding="utf-8"):
        raise UserError("this rank plans differently from rank 0 (its spec, models or data differ): every host "
                        "needs the same files at the same paths")
    return {st.dirname: st for st in plan.ordered()}


def _serve(step, out: Path) -> None:
    """Run ``step`` as rank 0 does, its outputs into a scratch directory that is then deleted."""
    inputs = {k: a.path(out) for k, a in step.inputs.items()}
    with tempfile.TemporaryDirectory(prefix="pyfuse-rank-") as scratch:
        RUNNERS[step.kind](step.options, inputs, Path(scratch))


def _outside_the_group(kind: str, options: dict, inputs: dict[str, Path], out: Path) -> dict:
    """``RUNNERS[kind]`` in a child process started without the launcher's
    variables (one process, which never joins the group)."""
    import multiprocessing

    saved = {k: os.environ.pop(k) for k in (*LAUNCHER_ENV, "MLX_HOSTFILE") if k in os.environ}
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            status, value = pool.apply(_step_in_child, (kind, options, inputs, out))
    finally:
        os.environ.update(saved)
    if status == "user":
        raise UserError(value)
    if status == "error":
        raise RuntimeError(value)
    return value


def _step_in_child(kind: str, options: dict, inputs: dict[str, Path], out: Path):
    try:
        return "ok", RUNNERS[kind](options, inputs, out)
    except UserError as err:
        return "user", str(err)
    except Exception as err:  # noqa: BLE001 - re-raised in the parent (its traceback printed here)
        traceback.print_exc()
        return "error", describe(err)
