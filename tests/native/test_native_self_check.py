"""``pyfuse self-check``: its verdict follows the comparisons, and a
deliberately wrong kernel is caught (the check can fail)."""

from __future__ import annotations

import pytest

from pyfuse.options import POLICIES

import pyfuse
from helpers import run_cli
from pyfuse.kernel import native as _native
from pyfuse.kernel import self_check

needs_ext = pytest.mark.skipif(not pyfuse.native_available(),
                               reason=f"native extension unavailable: {_native.unavailable_reason}")


@needs_ext
def test_self_check_passes_on_this_machine():
    run = run_cli("self-check", "--bits", "3,8", "--group-sizes", "32", "--dtypes", "bfloat16")
    assert run.code == 0, run.out + run.err
    assert "verdict: PASS" in run.out
    for build in _native.ext.cpu_kernels()["available"]:
        assert f"cpu:{build}" in run.out
    assert "metal-source" in run.out
    # every path compared every case: 2 bits x every policy x 4 delta sizes
    n = 2 * len(POLICIES) * 4
    assert run.out.count(f"{n}/{n} cases identical") == len(self_check.paths())


@needs_ext
def test_self_check_reports_a_mismatch(monkeypatch):
    """A reference that differs in one byte of one policy: exit 1, named."""
    real = self_check.fuse_requant_reference

    def off_by_one(*args, **kw):
        w, s, b = real(*args, **kw)
        return (w ^ 1, s, b) if kw["policy"] == "preserve" else (w, s, b)

    monkeypatch.setattr(self_check, "fuse_requant_reference", off_by_one)
    run = run_cli("self-check", "--bits", "4", "--group-sizes", "64", "--dtypes", "float16")
    assert run.code == 1
    assert "verdict: FAIL" in run.out
    assert "4-bit g64 float16 preserve" in run.out
    listed = [line.strip() for line in run.out.splitlines() if line.startswith("      ")]
    assert listed and all(" preserve " in line for line in listed)


def test_self_check_refuses_unsupported_values():
    run = run_cli("self-check", "--bits", "7")
    assert run.code == 2
    assert "--bits: 7 not supported; supported: 2, 3, 4, 5, 6, 8" in run.err


def test_self_check_without_native_kernels_fails(monkeypatch):
    monkeypatch.setattr(_native, "ext", None)
    monkeypatch.setattr(_native, "unavailable_reason", "not built (test)")
    run = run_cli("self-check", "--bits", "4", "--group-sizes", "64")
    assert run.code == 1
    assert "NOT IN USE (not built (test))" in run.out
