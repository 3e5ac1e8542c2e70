"""The native sources against their one source of truth, pyfuse/options.py,
and the split of the shared math: the Metal library's instantiations, the
extension's error messages (from the header CMake generates from options.py)
and every csrc/math header compiling on its own."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import pyfuse
from pyfuse.kernel import native as _native
from pyfuse.options import POLICIES, SUPPORTED_BITS, SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES, joined

ROOT = Path(__file__).resolve().parents[2]
needs_ext = pytest.mark.skipif(not pyfuse.native_available(),
                               reason=f"native extension unavailable: {_native.unavailable_reason}")


def metal_instantiations():
    """(type names, group sizes, bits) that metal/fuse_requant.metal instantiates."""
    text = (ROOT / "metal" / "fuse_requant.metal").read_text()
    bits = re.findall(r"instantiate_fuse\(type_name, type, gs, (\d+)\)", text)
    sizes = re.findall(r"instantiate_fuse_bits\(type_name, type, (\d+)\)", text)
    types = re.findall(r"^instantiate_fuse_type\((\w+), \w+\)", text, flags=re.M)
    return types, [int(g) for g in sizes], [int(b) for b in bits]


def test_metal_library_instantiates_exactly_the_supported_values():
    types, sizes, bits = metal_instantiations()
    assert sorted(types) == sorted(SUPPORTED_DTYPES)
    assert sizes == list(SUPPORTED_GROUP_SIZES)
    assert bits == list(SUPPORTED_BITS)


@needs_ext
@pytest.mark.parametrize("kwargs,expected", [
    (dict(bits=7), f"bits=7 is not supported; supported: {joined(SUPPORTED_BITS)}"),
    (dict(group_size=16), f"group_size=16 is not supported; supported: {joined(SUPPORTED_GROUP_SIZES)}"),
    (dict(policy="nearest"), f"policy 'nearest' is not supported; supported: {joined(POLICIES)}"),
])
def test_extension_checks_quote_options(kwargs, expected):
    # The extension itself (not pyfuse.kernel.ops, which checks first).
    w = mx.zeros((4, 16), dtype=mx.uint32)
    s = mx.ones((4, 2))
    call = dict(group_size=64, bits=4, policy="stock") | kwargs
    with pytest.raises(ValueError) as err:
        _native.ext.fuse_requant(w, s, s, mx.zeros((1, 128)), mx.zeros((4, 1)), **call)
    assert str(err.value) == f"[pyfuse.fuse_requant] {expected}"


@needs_ext
def test_extension_dtype_check_quotes_options():
    w = mx.zeros((4, 16), dtype=mx.uint32)
    s = mx.ones((4, 2), dtype=mx.int32)
    with pytest.raises(ValueError, match=f"supported: {joined(SUPPORTED_DTYPES)}$"):
        _native.ext.fuse_requant(w, s, s, mx.zeros((1, 128)), mx.zeros((4, 1)))


@pytest.mark.slow  # ~5-15 s: ten compiler runs
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="no C++ compiler (g++ or clang++) on PATH")
def test_each_math_header_compiles_on_its_own(tmp_path):
    """Every csrc/math header includes what it uses (the split is real)."""
    (tmp_path / "csrc").mkdir()
    subprocess.run([sys.executable, str(ROOT / "pyfuse" / "options.py"), "--cpp-header",
                    str(tmp_path / "csrc" / "options.h")], check=True)
    mlx_include = Path(mx.__file__).parent / "include"
    headers = sorted((ROOT / "csrc" / "math").glob("*.h")) + [ROOT / "csrc" / "fuse_math.h"]
    cxx = shutil.which("g++") or shutil.which("clang++")
    sources = []
    for header in headers:  # a source that includes only this header
        sources.append(tmp_path / f"{header.stem}_alone.cpp")
        sources[-1].write_text(f'#include "{header.relative_to(ROOT).as_posix()}"\n')
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT),
           "-I", str(tmp_path), "-isystem", str(mlx_include), *map(str, sources)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
