"""Writing the fused model: nothing half-written, inputs never modified.

The output is written into ``<parent>/.<name>.pyfuse-tmp-<pid>-XXXX`` tensor
by tensor in the input's shard layout (untouched tensors are copied byte for
byte, shards without touched tensors are copied or hard-linked whole, every
other file is copied as it is), fsynced, and renamed to ``save_path`` at the
end. Any error, Ctrl-C or SIGTERM removes the temporary directory; a
SIGKILLed run leaves a hidden temporary directory that the next run removes.

The writer knows tensors, not fuses: the new tensors of a job come from the
``compute`` callback, called once per job when the shard holding its first
output is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .. import progress
from ..io.files import TMP_MARK
from ..io.outputs import staged_dir
from ..io.model_dir import CONFIG_FILE, INDEX_FILE, ModelDir
from ..io.safetensors import SafetensorsFile, SafetensorsWriter, nbytes_of
from .plan import Job, Plan

Compute = Callable[[Job], dict[str, mx.array]]


def write_model(mdir: ModelDir, plan: Plan, save_path: Path, *, compute: Compute,
                link_unchanged: bool, force: bool = False) -> dict:
    """Write the fused model to ``save_path`` (through
    :func:`pyfuse.io.outputs.staged_dir`: created, or replaced with ``force``,
    only when complete). Returns ``{"shards": {name: "written" | "copied" |
    "linked"}, "total_size", "added"}``."""
    save_path = Path(os.path.abspath(save_path))
    with staged_dir(save_path, force, "--save-path") as tmp:
        written = _write_all(mdir, plan, tmp, save_path.resolve(), compute=compute,
                             link_unchanged=link_unchanged)
        fsync_path(tmp)
    return written


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path, link: bool = False) -> str:
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    fsync_path(dst)
    return "copied"


def _write_all(mdir: ModelDir, plan: Plan, out: Path, final: Path, *, compute: Compute,
               link_unchanged: bool) -> dict:
    jobs_by_tensor = {t: job for job in plan.jobs for t in job.inputs}
    written = {"shards": {}, "total_size": 0, "added": {}}
    _copy_other_files(mdir, out, final)
    if plan.config_changes is None:
        (out / CONFIG_FILE).write_bytes(mdir.config_raw)
    else:
        (out / CONFIG_FILE).write_text(json.dumps(plan.config_changes, indent=4) + "\n")
    fsync_path(out / CONFIG_FILE)

    total = sum(info.nbytes for info in mdir.tensors.values())
    pending: dict[str, mx.array] = {}  # computed outputs not yet written
    with progress.progress_bar() as bar:
        task = bar.add_task("pyfuse fuse: MiB", total=max(1, total) / 2**20)
        for shard_name, shard in mdir.shards.items():
            names = list(shard.tensors)
            if not any(t in jobs_by_tensor for t in names):
                how = _copy_file(shard.path, out / shard_name, link=link_unchanged)
                written["shards"][shard_name] = how
                written["total_size"] += sum(shard.tensors[t].nbytes for t in names)
                bar.advance(task, sum(shard.tensors[t].nbytes for t in names) / 2**20)
                continue
            entries = _shard_entries(shard, shard_name, jobs_by_tensor, written["added"])
            layout = [(t, d, shp) for t, d, shp, _, _ in entries if t is not None]
            _write_shard(out / shard_name, shard, entries, layout, pending, compute,
                         lambda size: bar.advance(task, size / 2**20))
            written["shards"][shard_name] = "written"
            written["total_size"] += sum(nbytes_of(d, s) for _, d, s in layout)
    if mdir.index is not None:
        _write_index(mdir, plan, out, written)
    return written


def _copy_other_files(mdir: ModelDir, out: Path, final: Path) -> None:
    """Every file other than the shards, the index and config.json: as it is."""
    special = set(mdir.shards) | {INDEX_FILE, CONFIG_FILE}
    for entry in (mdir.path / n for n in mdir.entries):
        if entry.name in special or TMP_MARK in entry.name or entry.resolve() == final:
            continue
        target = out / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        elif entry.is_file():
            _copy_file(entry, target)


def _shard_entries(shard: SafetensorsFile, shard_name: str, jobs_by_tensor: dict[str, Job],
                   added: dict[str, str]) -> list[tuple]:
    """``(output name, dtype, shape, job or None to copy, input size for the
    bar)`` of a shard with touched tensors; a job's new tensors (e.g. biases
    when mxfp4 becomes affine) follow its weight (recorded in ``added``), a
    dropped input (--dequantize: scales, biases) has no output name."""
    entries = []
    for t in shard.tensors:
        job = jobs_by_tensor.get(t)
        size = shard.tensors[t].nbytes
        if job is None:
            info = shard.tensors[t]
            entries.append((t, info.dtype, info.shape, None, size))
            continue
        if t in job.out:
            entries.append((t, *job.out[t], job, size))
            size = 0
        if t == f"{job.path}.weight":
            for extra in job.out:
                if extra not in job.inputs:
                    entries.append((extra, *job.out[extra], job, 0))
                    added[extra] = shard_name
        if size:
            entries.append((None, None, None, None, size))
    return entries


def _write_shard(path: Path, shard: SafetensorsFile, entries, layout, pending: dict[str, mx.array],
                 compute: Compute, advance: Callable[[int], None]) -> None:
    names = list(shard.tensors)
    # the same tensors, dtypes and shapes: the input header is reused byte for byte
    same = [t for t, *_ in layout] == names and all(
        shard.tensors[t].dtype == d and shard.tensors[t].shape == tuple(shp) for t, d, shp in layout)
    with SafetensorsWriter(path, layout, metadata=shard.metadata,
                           header_bytes=shard.header_bytes if same else None) as writer:
        for t, _, _, job, size in entries:
            if t is not None and job is None:
                writer.copy_from(shard, t)
            elif t is not None:
                if t not in pending:
                    pending.update(compute(job))
                writer.write(t, pending.pop(t))
            advance(size)


def _write_index(mdir: ModelDir, plan: Plan, out: Path, written: dict) -> None:
    """The index as it was, or with the dropped and added tensors and the new total size."""
    changed = any(j.out.keys() != set(j.inputs) or
                  any(mdir.tensors[t].shape != tuple(s) or mdir.tensors[t].dtype != d
                      for t, (d, s) in j.out.items() if t in mdir.tensors)
                  for j in plan.jobs)
    if not changed:
        (out / INDEX_FILE).write_bytes(mdir.index_raw)
    else:
        index = json.loads(mdir.index_raw)
        dropped = {t for j in plan.jobs for t in j.inputs if t not in j.out}
        weight_map = {k: v for k, v in index["weight_map"].items() if k not in dropped}
        weight_map.update(written["added"])
        index["weight_map"] = dict(sorted(weight_map.items()))
        meta = index.setdefault("metadata", {})
        if isinstance(meta, dict):
            meta["total_size"] = written["total_size"]
        (out / INDEX_FILE).write_text(json.dumps(index, indent=4))
    fsync_path(out / INDEX_FILE)
