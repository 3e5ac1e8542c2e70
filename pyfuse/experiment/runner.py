"""Running a plan: resumable, and safe to kill at any moment.

Each step runs into ``DIR/steps/.tmp-<kind>-<key12>-<pid>-<random>/``; its
``done.json`` is written there last, then the directory is renamed to
``DIR/steps/<kind>-<key12>/`` (one atomic rename); ``done.json`` records the
size and SHA-256 of every output file. A rerun skips every step whose
directory exists, after checking its outputs against those records (files
up to 64 MB by SHA-256, larger ones, such as model shards, by size): an
output edited after its step finished is refused, not reused. The
temporary directories of killed runs are
removed at the start (a ``flock`` on ``DIR/.lock`` keeps two runs out of one
directory). Fused models that no pending step needs are pruned (their
``model/`` removed, ``pruned.json`` written) unless ``keep_models``; a later
step that needs a pruned model re-runs its fuse (deterministic, so the same
bytes come back). The results are assembled from the step outputs only, so
an interrupted-and-resumed run writes the same ``results.json`` as an
uninterrupted one. The files of DIR: :mod:`.layout`. Under ``mlx.launch``
rank 0 runs all this and the other ranks join its evaluation steps
(:mod:`pyfuse.distributed.experiment`).
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import secrets
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..distributed import experiment as ranks
from ..distributed import writes
from ..errors import UserError
from ..io.files import TMP_MARK, atomic_write_text, sigterm_as_interrupt
from ..io.outputs import OLD_MARK, fsync_dir, publish
from . import prereg
from .estimate import Estimator, fmt_seconds, rate_group, work_units
from .layout import (DIR_LOCK, DONE, LOG_FILE, MODEL, PLAN_FILE, PRUNED, RESULTS_FILE, SPEC_COPY, STEPS_DIR,
                     TMP_PREFIX)
from .outputs import check_outputs, record_outputs
from .plan import ENGINE_VERSION, Plan, Step, build_plan
from .power import power_lines
from .report import write_report
from .results import assemble_results
from .spec import Spec
from .steps import RUNNERS


@dataclass
class RunResult:
    out: Path
    results: dict
    executed: list[str]
    skipped: list[str]
    pruned: list[str]
    warnings: list[str]
    seconds: float


def run_experiment(spec_path: str | os.PathLike, out: str | os.PathLike, *, keep_models: bool = False,
                   echo: Callable[[str], None] | None = None, data_parallel_train: bool = False) -> RunResult:
    """Run (or resume) the experiment of ``spec_path`` in ``out`` and write
    ``results.json`` and ``report.md`` there. See the module doc.
    ``data_parallel_train``: under mlx.launch, train steps run on every rank,
    each on its share of every batch (the adapters then equal one process's
    to float rounding, not bit for bit: docs/distributed.md)."""
    started = time.monotonic()
    echo = echo or (lambda msg: None)
    spec = ranks.check_spec(spec_path)  # load_checked_spec on every rank of an mlx.launch
    if not writes():  # a rank other than 0 under mlx.launch: it joins rank 0's evaluation steps
        return RunResult(out=Path(out), results=ranks.follow(spec, out), executed=[], skipped=[], pruned=[],
                         warnings=[], seconds=time.monotonic() - started)
    warnings: list[str] = []
    lead = ranks.Leader(data_parallel_train)  # under mlx.launch: tells the others what to join, when it ends
    with lead, _dir_lock(out := _make_run_dir(Path(out))), sigterm_as_interrupt():
        _clean_temps(out / STEPS_DIR)
        lock = _lock_prereg(spec, out, echo, warnings)
        plan = build_plan(spec, lock.split_seed if lock is not None else None)
        lead.check_train(plan)  # --data-parallel-train: every train step shareable, before any work
        plan_json = plan.to_json()
        atomic_write_text(out / PLAN_FILE, json.dumps(plan_json, indent=2, sort_keys=True) + "\n")
        lead.share_plan(out, plan.split_seed)
        if spec._path is not None:
            atomic_write_text(out / SPEC_COPY, spec._path.read_text(encoding="utf-8"))
        runner = Runner(plan, out, keep_models=keep_models, echo=echo, lead=lead)
        runner.log.write("start", spec=str(spec._path), steps=len(plan.steps))
        runner.run()
        results = assemble_results(plan_json, out, lock)
        atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True) + "\n")
        write_report(out)
        lead.results = results
        runner.log.write("finish", seconds=round(time.monotonic() - started, 3),
                         executed=len(runner.executed), skipped=len(runner.skipped))
    return RunResult(out=out, results=results, executed=runner.executed, skipped=runner.skipped,
                     pruned=runner.pruned, warnings=warnings, seconds=time.monotonic() - started)


def _make_run_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / STEPS_DIR).mkdir(exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out} ({err.strerror})") from None
    return out


def _lock_prereg(spec: Spec, out: Path, echo: Callable[[str], None], warnings: list[str]) -> prereg.Lock | None:
    """Lock (or check) the pre-registration before any step runs, after
    printing what the design can detect (:mod:`.power`); an allowed
    under-powered threshold is echoed and added to ``warnings``."""
    finished = any((p / DONE).is_file() for p in (out / STEPS_DIR).iterdir())
    for line in power_lines(spec):
        echo(line)
    lock = prereg.lock(spec, out, has_finished_steps=finished)
    if lock is not None:
        echo(("locked" if lock.created else "checked") + f" the pre-registration: sha256 {lock.sha256[:12]}, "
             f"split seed {lock.split_seed}, {len(lock.document.get('data') or {})} data file(s) hashed")
        for rec in lock.document.get("power_before_data") or []:
            if rec["underpowered"]:
                msg = (f"under-powered design (allowed: {lock.document['underpowered_reason']}): {rec['text']}")
                warnings.append(msg)
                echo("warning: " + msg)
    return lock


@contextmanager
def _dir_lock(out: Path):
    fd = os.open(out / DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{out} is in use by another pyfuse experiment run") from None
        yield
    finally:
        os.close(fd)


def _clean_temps(steps_dir: Path) -> None:
    """Remove what killed runs left (under the directory lock: no other run uses them)."""
    for p in steps_dir.iterdir():
        if p.name.startswith(TMP_PREFIX) or TMP_MARK in p.name or OLD_MARK in p.name:  # a step is rerun
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir() and not p.name.startswith(".") and not (p / DONE).exists():
            shutil.rmtree(p, ignore_errors=True)  # a step directory without its marker is not a step


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file() and not p.is_symlink():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
    fsync_dir(path)


class RunLog:
    """``run.log.jsonl``: one JSON object per event, appended."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, **fields) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")

    def history(self) -> list[dict]:
        """The events so far (none when the log is missing or unreadable: it only feeds estimates)."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        except (OSError, ValueError):
            return []


class Runner:
    """Runs the pending steps of a plan in order, with progress lines, and
    prunes fused models as soon as nothing pending needs them."""

    def __init__(self, plan: Plan, out: Path, *, keep_models: bool = False,
                 echo: Callable[[str], None] | None = None, lead: ranks.Leader | None = None):
        self.plan = plan
        self.out = out
        self.steps_dir = out / STEPS_DIR
        self.keep_models = keep_models
        self.echo = echo or (lambda msg: None)
        self.log = RunLog(out / LOG_FILE)
        self.estimator = Estimator(self.log.history())
        self.executed: list[str] = []
        self.skipped: list[str] = []
        self.pruned: list[str] = []
        self.consumers = plan.consumers()
        self.lead = lead

    def step_dir(self, st: Step) -> Path:
        return self.steps_dir / st.dirname

    def done(self, st: Step) -> bool:
        return (self.step_dir(st) / DONE).is_file()

    def available(self, st: Step) -> bool:
        return self.done(st) and not (self.step_dir(st) / PRUNED).exists()

    def run(self) -> None:
        order = self.plan.ordered()
        total = len(order)
        pending = [s for s in order if not self.done(s)]
        for s in order:
            if self.done(s):
                check_outputs(self.step_dir(s), label=s.label)
                self.skipped.append(s.dirname)
        if self.skipped:
            self.echo(f"{len(self.skipped)} of {total} steps already done in {self.out} (skipped)")
        self._prune()
        for i, st in enumerate(pending, 1):
            if self.done(st):  # re-run earlier as a pruned dependency
                continue
            left = self._remaining(pending[i - 1:])
            self.echo(f"[{total - len(pending) + i}/{total}] {st.kind} · {st.label}"
                      + (f"  (estimated {left})" if left else ""))
            self._ensure_inputs(st)
            self._execute(st)
            self._prune()

    # -- estimates -------------------------------------------------------------

    def _units(self, st: Step) -> float | None:
        return work_units(st.kind, st.options, {k: a.path(self.out) for k, a in st.inputs.items()})

    def _estimate(self, st: Step) -> float | None:
        return self.estimator.estimate(rate_group(st.kind, st.options), self._units(st))

    def _remaining(self, steps: list[Step]) -> str | None:
        known, unknown = 0.0, 0
        this = None
        for n, s in enumerate(steps):
            e = self._estimate(s)
            if n == 0:
                this = e
            if e is None:
                unknown += 1
            else:
                known += e
        if this is None and known == 0:
            return None
        parts = []
        if this is not None:
            parts.append(f"~{fmt_seconds(this)} for this step")
        parts.append(f"~{fmt_seconds(known)} left" + (f" + {unknown} step(s) not yet timed" if unknown else ""))
        return ", ".join(parts)

    # -- running one step ------------------------------------------------------

    def _ensure_inputs(self, st: Step) -> None:
        for art in st.inputs.values():
            if art.step is not None and not self.available(art.step):
                self._ensure_inputs(art.step)
                self.echo(f"      re-running {art.step.kind} · {art.step.label} (its output was pruned)")
                self._execute(art.step)
            elif art.step is None and not art.source.exists():
                raise UserError(f"{art.source} (an input of {st.label}) no longer exists")

    def _execute(self, st: Step) -> None:
        tmp = self.steps_dir / f"{TMP_PREFIX}{st.dirname}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        started = time.monotonic()
        try:
            summary = self._call(st, tmp)
            seconds = time.monotonic() - started
            self._publish(st, tmp, summary, seconds)
            if st.kind == "compare":  # stacked adapters that share their subspaces
                for w in summary["warnings"]:
                    self.echo(f"      warning: {w}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            gc.collect()
            try:
                import mlx.core as mx

                mx.clear_cache()
            except Exception:  # pragma: no cover - cache clearing is best effort
                pass
        group, units = rate_group(st.kind, st.options), self._units(st)
        self.estimator.add(group, seconds, units)
        self.log.write("step", step=st.dirname, kind=st.kind, seconds=round(seconds, 3),
                       iters=st.options.get("iters") if st.kind == "train" else None, group=group,
                       units=units, label=st.label)
        self.executed.append(st.dirname)
        self.echo(f"      done in {fmt_seconds(seconds)}")

    def _call(self, st: Step, tmp: Path) -> dict:
        """Run the step into ``tmp``; a failure becomes one UserError naming
        the step (a bug's traceback goes to the log)."""
        inputs = {k: a.path(self.out) for k, a in st.inputs.items()}
        try:
            if self.lead is not None:  # under mlx.launch: with the other ranks, or alone
                return self.lead.run(st, inputs, tmp)
            return RUNNERS[st.kind](st.options, inputs, tmp)
        except UserError as err:
            self.log.write("fail", step=st.dirname, kind=st.kind, error=str(err))
            raise UserError(f"step {st.dirname} ({st.label}) failed: {err}\n(the finished steps are "
                            f"kept in {self.steps_dir}; fix the cause and run again to resume)") from None
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:  # a bug or a library error: keep the traceback in the log
            self.log.write("fail", step=st.dirname, kind=st.kind, error=repr(err),
                           traceback=traceback.format_exc())
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"step {st.dirname} ({st.label}) failed: {type(err).__name__}: {first} "
                            f"(traceback in {self.out / LOG_FILE}; the finished steps are kept, run "
                            "again to resume)") from None

    def _publish(self, st: Step, tmp: Path, summary: dict, seconds: float) -> None:
        """``done.json`` last, everything on disk, then one rename (replacing a pruned step)."""
        marker = {"engine": ENGINE_VERSION, "kind": st.kind, "key": st.key, "options": st.options,
                  "inputs": {k: a.ref() for k, a in st.inputs.items()}, "labels": st.labels,
                  "summary": summary, "seconds": round(seconds, 3), "outputs": record_outputs(tmp)}
        _fsync_tree(tmp)
        atomic_write_text(tmp / DONE, json.dumps(marker, indent=2, default=str) + "\n")
        fsync_dir(tmp)
        publish(tmp, self.step_dir(st), force=True)
        fsync_dir(self.steps_dir)

    def _prune(self) -> None:
        if self.keep_models:
            return
        for st in self.plan.ordered():
            if st.kind != "fuse" or not self.available(st):
                continue
            if all(self.done(c) for c in self.consumers[st.key]):
                atomic_write_text(self.step_dir(st) / PRUNED, json.dumps(
                    {"removed": "model", "reason": "no pending step needs it (run with --keep-models to keep "
                     "fused models)"}, indent=2) + "\n")
                shutil.rmtree(self.step_dir(st) / MODEL, ignore_errors=True)
                self.pruned.append(st.dirname)
                self.log.write("prune", step=st.dirname)
