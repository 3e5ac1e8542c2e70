"""Fault injection over every subcommand, as a hostile or careless user
would try it: outputs aimed at inputs, damaged and absurd inputs, read-only
and full disks, an output that is a directory, a second writer.

Every case asserts the same four things: the exit code (2), one line on
stderr naming the problem (no traceback), nothing half-written at the
destination (as it was before: absent, or the same files), and the SHA-256
of every input file unchanged. The signal cases (SIGTERM/SIGINT/SIGKILL
mid-write, then a rerun) are in tests/e2e/test_signals.py.

Read-only and full disks are real file systems: a small tmpfs mounted for
the test (read-only, or filled up); where mounting is not allowed the cases
are skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from helpers import file_digests, make_adapter, mmlu_row, result_row, run_cli, write_jsonl

import pyfuse.cli
from pyfuse.errors import UserError
from pyfuse.io.outputs import OLD_MARK, publish_file, recover, staged_dir, writer_lock


# -- the inputs ---------------------------------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _model_variant(src: Path, dst: Path, **quant) -> Path:
    shutil.copytree(src, dst)

    def edit(c):
        for key in ("quantization", "quantization_config"):
            if key in c:
                c[key].update(quant)

    _edit_json(dst / "config.json", edit)
    return dst


def _adapter_variant(src: Path, dst: Path, *, params=None, tensor=None, value=None, factor=None) -> Path:
    """A copy of adapter ``src``: ``params`` merged into lora_parameters; the
    first entry of the first tensor whose name ends with ``tensor`` set to
    ``value`` (or the whole tensor multiplied by ``factor``)."""
    import mlx.core as mx

    shutil.copytree(src, dst)
    if params:
        _edit_json(dst / "adapter_config.json", lambda c: c["lora_parameters"].update(params))
    if tensor:
        weights = dict(mx.load(str(dst / "adapters.safetensors")))
        name = next(n for n in sorted(weights) if n.endswith(tensor))
        arr = weights[name]
        if factor is not None:
            weights[name] = arr * factor
        else:
            weights[name] = mx.where(mx.arange(arr.size).reshape(arr.shape) == 0, value, arr)
        mx.save_safetensors(str(dst / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    return dst


@dataclass
class Ctx:
    inp: Path  # every input lives below: its digests must not change
    out: Path  # where the outputs go


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_moe_dir, moe_adapter) -> Ctx:
    root = tmp_path_factory.mktemp("faults")
    inp, out = root / "in", root / "out"
    out.mkdir()
    (out / "afile").write_text("a user's file")
    shutil.copytree(tiny_moe_dir, inp / "M")
    shutil.copytree(moe_adapter, inp / "ads" / "x")
    A = inp / "ads" / "x"
    write_jsonl(inp / "d.jsonl", [mmlu_row(i) for i in range(1, 4)])
    write_jsonl(inp / "train.jsonl", [{"text": f"row {i} of some text"} for i in range(8)])
    write_jsonl(inp / "base.jsonl", [result_row(i, False) for i in range(1, 4)])
    write_jsonl(inp / "persona.jsonl", [result_row(i, False) for i in range(1, 4)])
    (inp / "spec.yaml").write_text("models: {}\n")
    for name, kw in {"b7g48": {"bits": 7, "group_size": 48}, "g16": {"group_size": 16}, "b1": {"bits": 1},
                     "b4": {"bits": 4}}.items():
        _model_variant(inp / "M", inp / f"M_{name}", **kw)
    truncated = shutil.copytree(inp / "M", inp / "M_truncated")
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    nan, inf = float("nan"), float("inf")
    variants = {"nan_a": dict(tensor="lora_a", value=nan), "inf_b": dict(tensor="lora_b", value=inf),
                "scale_nan": dict(params={"scale": "nan"}), "scale_1e39": dict(params={"scale": 1e39}),
                "rank0": dict(params={"rank": 0}), "alpha_inf": dict(params={"alpha": "inf"}),
                "overflow": dict(params={"scale": 3e38}, tensor="lora_b", factor=1e6)}
    for name, kw in variants.items():
        _adapter_variant(A, inp / "ads" / name, **kw)
    dora = make_adapter(inp / "M", root / "dora", keys=["self_attn.q_proj"], dora=True)
    _adapter_variant(dora, inp / "ads" / "nan_m", tensor=".m", value=nan)
    return Ctx(inp, out)


# -- real read-only and full file systems ----------------------------------------------------


def _mount(where: Path, options: str) -> str | None:
    """Mount a tmpfs at ``where``; the reason when that is not possible."""
    where.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount"):
        return "no mount command"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs ({r.stderr.strip() or r.returncode})"


@pytest.fixture(scope="module")
def disks(ctx):
    """``{"ro": read-only dir or None, "full": full dir or None, "why": reason}``."""
    base = ctx.out.parent / "disks"
    found, reasons, mounted = {}, [], []
    try:
        yield _mount_disks(base, found, reasons, mounted)
    finally:
        for m in mounted:
            subprocess.run(["umount", str(m)], capture_output=True)


def _mount_disks(base: Path, found: dict, reasons: list, mounted: list) -> dict:
    why = _mount(base / "ro", "ro,size=64k")
    if why is None:
        mounted.append(base / "ro")
        found["ro"] = base / "ro"
    else:
        reasons.append(why)
    why = _mount(base / "full", "size=64k")
    if why is None:
        mounted.append(base / "full")
        (base / "full" / "sub").mkdir()
        fd = os.open(base / "full" / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill it up
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        found["full"] = base / "full"
    else:
        reasons.append(why)
    found["why"] = "; ".join(reasons)
    return found


# -- the cases ----------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx, dict], list]
    message: str  # in the one error line
    dest: Callable[[Ctx, dict], Path] | None = None  # must be as before (absent or unchanged)
    disk: str | None = None  # "ro" | "full": needs that mount


def _fuse(c, adapter="x", model="M", save="F", *extra):
    return ["fuse", "--model", c.inp / model, "--adapter-path", c.inp / "ads" / adapter, "--save-path",
            c.out / save if isinstance(save, str) else save, "--quiet", *extra]


def _nf(c, *extra, model="M"):
    return ["noise-floor", "--model", c.inp / model, "--bits", "3", "--group-sizes", "64", "--policies", "stock",
            "--no-outputs", "--quiet", *extra]


INSIDE = "pyfuse never writes over or into its inputs"
CASES = [
    # outputs aimed at inputs: refused before any work, with the reason
    Case("fuse-report-on-model-config", lambda c, d: _fuse(c, "x", "M", "F", "--report", c.inp / "M" / "config.json"),
         "--report {inp}/M/config.json lies inside the input --model", lambda c, d: c.out / "F"),
    Case("fuse-report-on-adapter-weights",
         lambda c, d: _fuse(c, "x", "M", "F", "--report", c.inp / "ads" / "x" / "adapters.safetensors"),
         "lies inside the input --adapter-path", lambda c, d: c.out / "F"),
    Case("fuse-save-path-inside-model", lambda c, d: _fuse(c, "x", "M", c.inp / "M" / "fused"),
         "lies inside the input --model", lambda c, d: c.inp / "M" / "fused"),
    Case("fuse-save-path-holds-adapter", lambda c, d: _fuse(c, "x", "M", c.inp / "ads", "--force"),
         "contains the input --adapter-path", lambda c, d: c.inp / "ads"),
    Case("fuse-report-is-save-path", lambda c, d: _fuse(c, "x", "M", "F", "--report", c.out / "F"),
         "--report", lambda c, d: c.out / "F"),
    Case("train-adapter-path-is-model",
         lambda c, d: ["train", "--model", c.inp / "M", "--num-layers", "-1", "--data", c.inp / "train.jsonl", "--adapter-path",
                       c.inp / "M", "--force", "--iters", "1", "--quiet"],
         "--adapter-path {inp}/M is the input --model", lambda c, d: c.inp / "M"),
    Case("train-adapter-path-holds-data",
         lambda c, d: ["train", "--model", c.inp / "M", "--num-layers", "-1", "--data", c.inp / "train.jsonl", "--adapter-path",
                       c.inp, "--force", "--iters", "1", "--quiet"],
         "contains the input", lambda c, d: c.inp),
    Case("zero-adapter-out-holds-adapter",
         lambda c, d: ["zero-adapter", "--adapter-path", c.inp / "ads" / "x", "--out", c.inp / "ads", "--force"],
         "--out {inp}/ads contains the input --adapter-path", lambda c, d: c.inp / "ads"),
    Case("zero-adapter-out-is-adapter",
         lambda c, d: ["zero-adapter", "--adapter-path", c.inp / "ads" / "x", "--out", c.inp / "ads" / "x", "--force"],
         "is the input --adapter-path", lambda c, d: c.inp / "ads" / "x"),
    Case("eval-out-is-data",
         lambda c, d: ["eval", "mc", "--model", c.inp / "M", "--data", c.inp / "d.jsonl", "--out", c.inp / "d.jsonl"],
         "--out {inp}/d.jsonl is the input --data", lambda c, d: c.inp / "d.jsonl"),
    Case("noise-floor-out-is-model", lambda c, d: _nf(c, "--out", c.inp / "M"),
         "--out {inp}/M is the input --model", lambda c, d: c.inp / "M"),
    Case("setg-out-is-base",
         lambda c, d: ["setg", "--base", c.inp / "base.jsonl", "--persona", c.inp / "persona.jsonl", "--data",
                       c.inp / "d.jsonl", "--out", c.inp / "base.jsonl"],
         "is the input --base", lambda c, d: c.inp / "base.jsonl"),
    Case("setg-mine-out-is-data",
         lambda c, d: ["setg", "mine", "--data", c.inp / "d.jsonl", "--n", "2", "--out", c.inp / "d.jsonl"],
         "is the input --data", lambda c, d: c.inp / "d.jsonl"),
    Case("experiment-out-holds-spec",
         lambda c, d: ["experiment", "run", c.inp / "spec.yaml", "--out", c.inp],
         "--out {inp} contains the input SPEC", lambda c, d: c.inp),
    Case("demo-out-is-cache", lambda c, d: ["demo", "--out", c.out / "D", "--cache", c.out / "D" / "cache"],
         "--out {out}/D contains the output --cache", lambda c, d: c.out / "D"),
    # bad numbers: refused, nothing written
    Case("fuse-nan-lora-a", lambda c, d: _fuse(c, "nan_a"), "lora_a: 1 of", lambda c, d: c.out / "F"),
    Case("fuse-inf-lora-b", lambda c, d: _fuse(c, "inf_b"), "are NaN or infinite", lambda c, d: c.out / "F"),
    Case("fuse-nan-dora-magnitude", lambda c, d: _fuse(c, "nan_m"), ".m: 1 of", lambda c, d: c.out / "F"),
    Case("fuse-scale-nan", lambda c, d: _fuse(c, "scale_nan"), "lora_parameters.scale must be a finite number",
         lambda c, d: c.out / "F"),
    Case("fuse-scale-1e39", lambda c, d: _fuse(c, "scale_1e39"), "lora_parameters.scale must be a finite number",
         lambda c, d: c.out / "F"),
    Case("fuse-alpha-inf", lambda c, d: _fuse(c, "alpha_inf"), "lora_parameters.alpha must be a finite number",
         lambda c, d: c.out / "F"),
    Case("fuse-rank-0", lambda c, d: _fuse(c, "rank0"), "lora_parameters.rank must be > 0", lambda c, d: c.out / "F"),
    Case("fuse-result-overflows", lambda c, d: _fuse(c, "overflow", "M", "F", "--dequantize"),
         "the adapter's delta overflows", lambda c, d: c.out / "F"),
    Case("noise-floor-nan-adapter", lambda c, d: _nf(c, "--adapter-path", c.inp / "ads" / "nan_a", "--out", c.out / "N"),
         "are NaN or infinite", lambda c, d: c.out / "N"),
    Case("eval-nan-adapter",
         lambda c, d: ["eval", "mc", "--model", c.inp / "M", "--data", c.inp / "d.jsonl", "--adapter-path",
                       c.inp / "ads" / "inf_b", "--out", c.out / "r.jsonl"],
         "are NaN or infinite", lambda c, d: c.out / "r.jsonl"),
    Case("zero-adapter-nan", lambda c, d: ["zero-adapter", "--adapter-path", c.inp / "ads" / "nan_a", "--out",
                                           c.out / "Z"], "are NaN or infinite", lambda c, d: c.out / "Z"),
    # config.json against the stored shapes, with the supported values
    Case("fuse-config-bits7-g48", lambda c, d: _fuse(c, "x", "M_b7g48"), "supported: bits 2, 3, 4, 5, 6, 8, group sizes 32, 64, 128",
         lambda c, d: c.out / "F"),
    Case("fuse-config-g16", lambda c, d: _fuse(c, "x", "M_g16"), "says bits 3, group size 16; supported",
         lambda c, d: c.out / "F"),
    Case("fuse-config-1bit", lambda c, d: _fuse(c, "x", "M_b1"), "says bits 1, group size 64; supported",
         lambda c, d: c.out / "F"),
    Case("fuse-config-misstates-bits", lambda c, d: _fuse(c, "x", "M_b4"), "do not fit that (they fit 3-bit g64",
         lambda c, d: c.out / "F"),
    Case("noise-floor-config-misstates-bits", lambda c, d: _nf(c, "--out", c.out / "N", model="M_b4"),
         "do not fit that", lambda c, d: c.out / "N"),
    Case("noise-floor-truncated-shard", lambda c, d: _nf(c, "--out", c.out / "N", model="M_truncated"),
         "model.safetensors", lambda c, d: c.out / "N"),
    # an output that is a directory
    Case("eval-out-is-a-directory",
         lambda c, d: ["eval", "mc", "--model", c.inp / "M", "--data", c.inp / "d.jsonl", "--out", c.out],
         "exists and is not a file; not replacing it", lambda c, d: c.out),
    Case("fuse-report-is-a-directory", lambda c, d: _fuse(c, "x", "M", "F", "--report", c.out),
         "is a directory", lambda c, d: c.out / "F"),
    Case("setg-mine-out-is-a-directory",
         lambda c, d: ["setg", "mine", "--data", c.inp / "d.jsonl", "--n", "2", "--out", c.out, "--force"],
         "exists and is not a file; not replacing it", lambda c, d: c.out),
    Case("zero-adapter-force-over-a-file",
         lambda c, d: ["zero-adapter", "--adapter-path", c.inp / "ads" / "x", "--out", c.out / "afile", "--force"],
         "exists and is not a directory; not replacing it", lambda c, d: c.out / "afile"),
    Case("train-force-over-a-file",
         lambda c, d: ["train", "--model", c.inp / "M", "--num-layers", "-1", "--data", c.inp / "train.jsonl", "--adapter-path",
                       c.out / "afile", "--force", "--iters", "1", "--quiet"],
         "exists and is not a directory; not replacing it", lambda c, d: c.out / "afile"),
    Case("noise-floor-out-is-a-file", lambda c, d: _nf(c, "--out", c.out / "afile", "--force"),
         "exists and is not a directory; not replacing it", lambda c, d: c.out / "afile"),
    # an existing output: refused without --force, byte-identical (replaced with it: test_force_replaces_...)
    Case("eval-mc-out-exists",
         lambda c, d: ["eval", "mc", "--model", c.inp / "M", "--data", c.inp / "d.jsonl", "--out", c.out / "afile"],
         "--out {out}/afile exists; pass --force to replace it", lambda c, d: c.out / "afile"),
    Case("eval-identity-out-exists",
         lambda c, d: ["eval", "identity", "--model", c.inp / "M", "--persona-name", "Nova", "--out",
                       c.out / "afile"],
         "--out {out}/afile exists; pass --force to replace it", lambda c, d: c.out / "afile"),
    Case("eval-behaviour-out-exists",
         lambda c, d: ["eval", "behaviour", "--model", c.inp / "M", "--suite", c.inp / "spec.yaml", "--out",
                       c.out / "afile"],
         "--out {out}/afile exists; pass --force to replace it", lambda c, d: c.out / "afile"),
    Case("eval-persona-out-exists",
         lambda c, d: ["eval", "persona", "--model", c.inp / "M", "--out", c.out / "afile"],
         "--out {out}/afile exists; pass --force to replace it", lambda c, d: c.out / "afile"),
    Case("fuse-report-exists", lambda c, d: _fuse(c, "x", "M", "F", "--report", c.out / "afile"),
         "--report {out}/afile exists; pass --force to replace it", lambda c, d: c.out / "afile"),
    Case("setg-mine-out-exists",
         lambda c, d: ["setg", "mine", "--data", c.inp / "d.jsonl", "--n", "2", "--out", c.out / "afile"],
         "--out {out}/afile exists; pass --force to replace it", lambda c, d: c.out / "afile"),
    Case("setg-out-exists",
         lambda c, d: ["setg", "--base", c.inp / "base.jsonl", "--persona", c.inp / "persona.jsonl", "--data",
                       c.inp / "d.jsonl", "--out", c.out],
         "--out {out} already exists; pass --force to replace it", lambda c, d: c.out),
    Case("noise-floor-out-exists", lambda c, d: _nf(c, "--out", c.out),
         "--out {out} already exists; pass --force to replace it", lambda c, d: c.out),
    Case("probe-out-exists",
         lambda c, d: ["probe", "--model", c.inp / "M", "--prompts", c.inp / "d.jsonl", "--out", c.out],
         "--out {out} already exists; pass --force to replace it", lambda c, d: c.out),
    Case("train-rank-too-large",
         lambda c, d: ["train", "--model", c.inp / "M", "--data", c.inp / "train.jsonl", "--adapter-path",
                       c.out / "T", "--rank", "4097", "--iters", "1", "--quiet"],
         "rank must be at most 4096, got 4097", lambda c, d: c.out / "T"),
    Case("demo-out-is-a-file", lambda c, d: ["demo", "--out", c.out / "afile", "--cache", c.out / "cache", "--quiet"],
         "not a directory", lambda c, d: c.out / "afile"),
    Case("stats-mcnemar-on-directories", lambda c, d: ["stats", "mcnemar", c.inp, c.inp], "directory", None),
    Case("experiment-report-missing-dir", lambda c, d: ["experiment", "report", c.out / "nothing"], "nothing",
         lambda c, d: c.out / "nothing"),
    # read-only file system
    Case("fuse-read-only", lambda c, d: _fuse(c, "x", "M", d["ro"] / "F"), "cannot write into",
         lambda c, d: d["ro"] / "F", "ro"),
    Case("fuse-report-read-only", lambda c, d: _fuse(c, "x", "M", "F2", "--report", d["ro"] / "r.json"),
         "cannot write the report", lambda c, d: d["ro"] / "r.json", "ro"),
    Case("zero-adapter-read-only", lambda c, d: ["zero-adapter", "--adapter-path", c.inp / "ads" / "x", "--out",
                                                 d["ro"] / "Z"], "Read-only file system", lambda c, d: d["ro"] / "Z", "ro"),
    Case("noise-floor-read-only", lambda c, d: _nf(c, "--out", d["ro"] / "N"), "Read-only file system",
         lambda c, d: d["ro"] / "N", "ro"),
    Case("eval-read-only",
         lambda c, d: ["eval", "mc", "--model", c.inp / "M", "--data", c.inp / "d.jsonl", "--method", "logprob",
                       "--out", d["ro"] / "r.jsonl"], "Read-only file system", lambda c, d: d["ro"] / "r.jsonl", "ro"),
    Case("train-read-only",
         lambda c, d: ["train", "--model", c.inp / "M", "--num-layers", "-1", "--data", c.inp / "train.jsonl", "--adapter-path",
                       d["ro"] / "T", "--iters", "1", "--batch-size", "1", "--quiet"],
         "Read-only file system", lambda c, d: d["ro"] / "T", "ro"),
    Case("setg-mine-read-only",
         lambda c, d: ["setg", "mine", "--data", c.inp / "d.jsonl", "--n", "2", "--out", d["ro"] / "m.jsonl"],
         "Read-only file system", lambda c, d: d["ro"] / "m.jsonl", "ro"),
    Case("demo-read-only", lambda c, d: ["demo", "--out", d["ro"] / "D", "--cache", d["ro"] / "cache", "--quiet"],
         "Read-only file system", lambda c, d: d["ro"] / "D", "ro"),
    # full disk
    Case("fuse-full-disk", lambda c, d: _fuse(c, "x", "M", d["full"] / "sub" / "F"), "No space left on device",
         lambda c, d: d["full"] / "sub" / "F", "full"),
    Case("zero-adapter-full-disk", lambda c, d: ["zero-adapter", "--adapter-path", c.inp / "ads" / "x", "--out",
                                                 d["full"] / "sub" / "Z"], "No space left on device",
         lambda c, d: d["full"] / "sub" / "Z", "full"),
    Case("noise-floor-full-disk", lambda c, d: _nf(c, "--out", d["full"] / "sub" / "N"), "No space left on device",
         lambda c, d: d["full"] / "sub" / "N", "full"),
    Case("eval-full-disk",
         lambda c, d: ["eval", "mc", "--model", c.inp / "M", "--data", c.inp / "d.jsonl", "--method", "logprob",
                       "--out", d["full"] / "sub" / "r.jsonl"], "No space left on device",
         lambda c, d: d["full"] / "sub" / "r.jsonl", "full"),
    Case("train-full-disk",
         lambda c, d: ["train", "--model", c.inp / "M", "--num-layers", "-1", "--data", c.inp / "train.jsonl", "--adapter-path",
                       d["full"] / "sub" / "T", "--iters", "1", "--batch-size", "1", "--quiet"],
         "No space left on device", lambda c, d: d["full"] / "sub" / "T", "full"),
    Case("self-check-unsupported-bits", lambda c, d: ["self-check", "--bits", "7"], "--bits: 7 not supported; supported: 2, 3, 4, 5, 6, 8"),
    # the analysis commands: bad numbers and outputs aimed at inputs
    Case("adapters-compare-nan", lambda c, d: ["adapters", "compare", c.inp / "ads" / "x", c.inp / "ads" / "nan_a"],
         "lora_a: 1 of"),
    Case("pairs-out-holds-data",
         lambda c, d: ["pairs", "--model", c.inp / "M", "--data", c.inp / "train.jsonl", "--out", c.inp, "--force"],
         "contains the input", lambda c, d: c.inp),
    Case("probe-out-is-model",
         lambda c, d: ["probe", "--model", c.inp / "M", "--prompts", c.inp / "d.jsonl", "--out", c.inp / "M"],
         "--out {inp}/M is the input --model", lambda c, d: c.inp / "M"),
]


def _state(path: Path | None):
    """What is at ``path``: None (absent), a file's digest or a directory's digests."""
    if path is None or not os.path.lexists(path):
        return None
    if path.is_dir():
        return file_digests(path)
    return file_digests(path.parent).get(path.name)


def _pyfuse_leftovers(parent: Path) -> list[str]:
    if not parent.is_dir():
        return []
    return [p.name for p in parent.iterdir() if ".pyfuse-" in p.name]


def test_every_subcommand_has_a_fault_case():
    names = set(pyfuse.cli.COMMANDS)
    seen = set()
    dummy = Ctx(Path("/i"), Path("/o"))
    for case in CASES:
        seen.add(case.argv(dummy, {"ro": Path("/r"), "full": Path("/f")})[0])
    assert names <= seen, names - seen


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case, ctx, disks):
    if case.disk and case.disk not in disks:
        pytest.skip(f"no {case.disk} file system for this case: {disks['why']}")
    argv = case.argv(ctx, disks)
    dest = case.dest(ctx, disks) if case.dest else None
    inputs_before = file_digests(ctx.inp)
    dest_before = _state(dest)
    r = run_cli(*argv)
    prog = f"pyfuse {argv[0]}"
    assert r.code == 2, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.err
    assert "Traceback" not in r.err
    assert case.message.format(inp=ctx.inp, out=ctx.out) in lines[0], lines[0]
    assert file_digests(ctx.inp) == inputs_before  # every input as it was
    if dest is not None:
        assert _state(dest) == dest_before  # nothing half-written: absent, or as it was
        assert _pyfuse_leftovers(dest.parent) == []


# -- publishing: create-or-fail, one writer, a --force swap that survives a crash ---------------


def test_a_destination_that_appears_mid_write_is_never_replaced(tmp_path):
    final = tmp_path / "out"
    for made_by_hand in ({"mine.txt": "keep me"}, {}):  # a user's folder, even an empty one
        with pytest.raises(UserError, match="appeared while this run was writing it"):
            with staged_dir(final, force=False) as tmp:
                (tmp / "new.txt").write_text("new")
                final.mkdir()
                for name, text in made_by_hand.items():
                    (final / name).write_text(text)
        assert {p.name: p.read_text() for p in final.iterdir()} == made_by_hand
        assert _pyfuse_leftovers(tmp_path) == []
        shutil.rmtree(final)


def test_a_second_writer_of_one_destination_is_refused(ctx, tiny_moe_dir, moe_adapter):
    dest = ctx.out / "locked"
    with writer_lock(dest):
        r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", dest, "--quiet")
    assert r.code == 2 and r.err.strip() == f"pyfuse fuse: error: another pyfuse run is writing {dest}; " \
                                            "wait for it or choose another path"
    assert not dest.exists() and _pyfuse_leftovers(ctx.out) == []


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_force_swap_killed_at_any_point_loses_nothing(tmp_path, tiny_moe_dir, moe_adapter):
    """A --force swap without an atomic exchange renames the old copy aside
    first: a run killed then (final missing) gets it back, a run killed after
    the new copy arrived has it removed; a rerun publishes as usual."""
    dest = tmp_path / "F"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", dest, "--quiet")
    assert r.code == 0
    complete = file_digests(dest)
    aside = tmp_path / f".F{OLD_MARK}{_dead_pid()}-0badc0de"
    # killed between the two renames: only the old copy exists, under its aside name
    os.rename(dest, aside)
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", dest, "--quiet")
    assert r.code == 2 and "already exists; pass --force" in r.err  # the old copy is back, so refused
    assert file_digests(dest) == complete and not aside.exists()
    # killed after the new copy arrived: the old copy is removed, the new one kept
    shutil.copytree(dest, aside)
    (dest / "marker").write_text("new")
    recover(dest)
    assert not aside.exists() and (dest / "marker").exists()
    # and a --force rerun over a crash's leftovers gives the complete output
    os.rename(dest, aside)
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", dest, "--quiet",
                "--force")
    assert r.code == 0 and file_digests(dest) == complete and _pyfuse_leftovers(tmp_path) == []


def test_a_force_swap_keeps_a_file_where_a_directory_is_expected(tmp_path, tiny_moe_dir, moe_adapter):
    dest = tmp_path / "F"
    dest.write_text("a user's file")
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", dest, "--force",
                "--quiet")
    assert r.code == 2 and "not a directory" in r.err and dest.read_text() == "a user's file"


def test_the_fuse_report_is_written_atomically_next_to_the_model(tmp_path, tiny_moe_dir, moe_adapter):
    dest = tmp_path / "F"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", dest, "--quiet",
                "--report", dest / "report.json")
    assert r.code == 0 and json.loads((dest / "report.json").read_text())["summary"]["modules_fused"] > 0
    assert _pyfuse_leftovers(dest) == [] and _pyfuse_leftovers(tmp_path) == []



def test_a_killed_runs_temporary_files_are_swept_by_the_next_write(tmp_path):
    from pyfuse.io.files import TMP_MARK, atomic_write_text

    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".r.json{TMP_MARK}{dead}-x.tmp"
    running = tmp_path / f".r.json{TMP_MARK}{alive}-y.tmp"  # a live process's: left alone
    other = tmp_path / f".q.json{TMP_MARK}{dead}-z.tmp"  # another output's: not this write's business
    for p in (stale, running, other):
        p.write_text("partial")
    atomic_write_text(tmp_path / "r.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", running.name, other.name])


def _single_file_outputs(c: Ctx, tiny_moe_dir, moe_adapter, dest: Path) -> dict[str, list]:
    """Every subcommand's single-file output, aimed at ``dest``."""
    return {
        "eval-mc": ["eval", "mc", "--model", tiny_moe_dir, "--data", c.inp / "d.jsonl", "--method", "logprob",
                    "--limit", "2", "--out", dest],
        "fuse-report": ["fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path",
                        dest.parent / "F", "--quiet", "--report", dest],
        "setg-mine": ["setg", "mine", "--data", c.inp / "d.jsonl", "--n", "2", "--out", dest],
    }


@pytest.mark.parametrize("command", ["eval-mc", "fuse-report", "setg-mine"])
def test_an_existing_single_file_output_is_replaced_only_with_force(command, ctx, tmp_path, tiny_moe_dir,
                                                                    moe_adapter):
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(b"a user's file\n")
    argv = _single_file_outputs(ctx, tiny_moe_dir, moe_adapter, dest)[command]
    r = run_cli(*argv)
    flag = "--report" if command == "fuse-report" else "--out"
    assert r.code == 2 and r.err.strip().endswith(f"{flag} {dest} exists; pass --force to replace it"), r.err
    assert dest.read_bytes() == b"a user's file\n" and not (tmp_path / "F").exists()
    r = run_cli(*argv, "--force")
    assert r.code == 0, r.err
    text = dest.read_text()
    assert text != "a user's file\n" and all(json.loads(line) for line in text.splitlines() if line) \
        if command != "fuse-report" else json.loads(text)["summary"]["modules_fused"] > 0
    assert _pyfuse_leftovers(tmp_path) == []


def test_a_single_file_that_appears_mid_write_is_never_replaced(tmp_path):
    from pyfuse.io.outputs import publish_text

    final = tmp_path / "r.jsonl"
    with pytest.raises(UserError, match="appeared while this run was writing it"):
        publish_file(final, lambda tmp: (tmp.write_text("new\n"), final.write_text("made by hand\n")), False)
    assert final.read_text() == "made by hand\n" and _pyfuse_leftovers(tmp_path) == []
    with pytest.raises(UserError, match="exists; pass --force to replace it"):
        publish_text(final, "new\n", False)
    assert publish_text(final, "new\n", True) == final and final.read_text() == "new\n"
    assert _pyfuse_leftovers(tmp_path) == []
