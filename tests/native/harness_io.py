"""Builds and runs the standalone harness of the kernel math
(tests/native/harness) for one compiler x target, and moves cases in and
outputs out of it. The cases are pyfuse.kernel.self_check's grid, so the
harness, `pyfuse self-check` and the Python tests share one generator."""

from __future__ import annotations

import json
import shlex
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "tests" / "native" / "harness"
BUILD_ROOT = ROOT / "build" / "native-harness"  # kept between runs: ninja rebuilds what changed
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
PATHS = ("cpu", "cpu-metal-rules", "metal-source")
MLX_INCLUDE = Path(mx.__file__).parent / "include"


@dataclass(frozen=True)
class Toolchain:
    """One compiler x target. ``tools``: what must be on PATH; ``emulator``:
    how to run its binaries here."""

    name: str
    cxx: str
    toolchain_file: str | None = None
    cxx_flags: str = ""
    emulator: tuple = ()
    tools: tuple = ()

    def missing(self) -> list[str]:
        return [t for t in ("cmake", "ninja", *self.tools) if shutil.which(t) is None]


QEMU = ("qemu-aarch64",)
TOOLCHAINS = (
    Toolchain("gcc-x86_64", "g++", tools=("g++",)),
    Toolchain("clang-x86_64", "clang++", tools=("clang++",)),
    Toolchain("gcc-arm64", "aarch64-linux-gnu-g++", "aarch64-gcc.cmake", emulator=QEMU,
              tools=("aarch64-linux-gnu-g++", *QEMU)),
    # A Mac's configuration: clang, arm64 with FP16 arithmetic, where MLX's
    # float16_t is the native __fp16 instead of its software struct.
    Toolchain("clang-arm64-apple-m1", "clang++", "aarch64-clang.cmake", "-mcpu=apple-m1", QEMU,
              tools=("clang++", "aarch64-linux-gnu-g++", *QEMU)),
)


def build(tc: Toolchain) -> Path:
    """Configures (once) and builds the harness with warnings as errors;
    returns its build directory. Raises CalledProcessError with the
    compiler's output on any error or warning."""
    out = BUILD_ROOT / tc.name
    if not (out / "build.ninja").exists():
        cmd = ["cmake", "-S", str(HARNESS), "-B", str(out), "-G", "Ninja", f"-DMLX_INCLUDE_DIR={MLX_INCLUDE}",
               "-DPYFUSE_WERROR=ON", f"-DPYFUSE_HARNESS_PYTHON={sys.executable}",
               f"-DCMAKE_CXX_FLAGS={tc.cxx_flags}"]
        if tc.toolchain_file:
            cmd.append(f"-DCMAKE_TOOLCHAIN_FILE={HARNESS / tc.toolchain_file}")
        else:
            cmd.append(f"-DCMAKE_CXX_COMPILER={tc.cxx}")
        _run(cmd)
    _run(["ninja", "-C", str(out)])
    return out


def _run(cmd) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, cmd, result.stdout, result.stderr)
    return result.stdout


def harness_command(tc: Toolchain, build_dir: Path) -> list[str]:
    emulator = list(tc.emulator)
    return emulator + [str(build_dir / "math_harness")]


def cpu_builds(tc: Toolchain, build_dir: Path) -> list[str]:
    return _run(harness_command(tc, build_dir) + ["--builds"]).split()


def run(tc: Toolchain, build_dir: Path, inputs: Path, outputs: Path, cpu_build: str) -> bytes:
    _run(harness_command(tc, build_dir) + [inputs, outputs, cpu_build])
    return outputs.read_bytes()


def write_inputs(cases, path: Path) -> list:
    """Writes the cases in the harness's input format; returns each case's
    inputs (w, scales, biases, a, b, magnitude) as MLX arrays."""
    from pyfuse.kernel.self_check import case_inputs

    all_inputs = []
    with open(path, "wb") as f:
        f.write(b"PFHARN1\0" + struct.pack("<I", len(cases)))
        for case in cases:
            inputs = case_inputs(case)
            all_inputs.append(inputs)
            w, s, b, a, bb, m = inputs
            experts = case.lead[0] if case.lead else 0
            f.write(struct.pack("<9iIf", case.bits, case.group_size, DTYPE_CODES[case.dtype],
                                policy_id(case.policy), experts, case.out_dims, case.in_dims, case.rank,
                                int(m is not None), case.seed, 1.0))
            for x in (w, s, b, a, bb) + (() if m is None else (m,)):
                f.write(raw_bytes(x))
    return all_inputs


def policy_id(policy: str) -> int:
    from pyfuse.options import POLICIES

    return POLICIES.index(policy)


def raw_bytes(x: mx.array) -> bytes:
    """The array's bytes, row-major (bfloat16 through a uint16 view)."""
    if x.dtype in (mx.bfloat16, mx.float16):
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x)).tobytes()


def split_outputs(data: bytes, cases) -> list[dict[str, bytes]]:
    """Per case, ``{path: w + scales + biases bytes}``."""
    out, at = [], 0
    for case in cases:
        rows = (case.lead[0] if case.lead else 1) * case.out_dims
        size = rows * case.in_dims * case.bits // 8
        size += 2 * rows * (case.in_dims // case.group_size) * (4 if case.dtype == "float32" else 2)
        out.append({p: data[at + i * size: at + (i + 1) * size] for i, p in enumerate(PATHS)})
        at += len(PATHS) * size
    assert at == len(data), (at, len(data))
    return out


def extension_source_commands(build_dir: Path) -> list[list[str]]:
    """Syntax-only compile commands for every csrc/*.cpp of the extension,
    with the flags the harness build used for csrc/cpu_isa.cpp (the kernel
    flags, -Wall -Wextra -Werror, the target), plus the nanobind and Python
    headers bindings.cpp needs."""
    import sysconfig

    import nanobind

    entries = json.loads((build_dir / "compile_commands.json").read_text())
    entry = next(e for e in entries if e["file"].endswith("csrc/cpu_isa.cpp"))
    base = shlex.split(entry["command"])
    src_at = base.index(entry["file"])
    out_at = base.index("-o")
    commands = []
    for source in sorted((ROOT / "csrc").glob("*.cpp")):
        cmd = [c for i, c in enumerate(base) if i not in (out_at, out_at + 1, src_at) and c != "-c"]
        cmd += ["-fsyntax-only", "-isystem", nanobind.include_dir(), "-isystem",
                sysconfig.get_paths()["include"], str(source)]
        commands.append(cmd)
    return commands
