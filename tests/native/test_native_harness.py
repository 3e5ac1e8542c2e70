"""The kernel math built as a Mac would build it, and run: the standalone
harness (tests/native/harness) compiled by GCC and clang, for x86-64 and
for arm64 (run under qemu-aarch64), with warnings as errors, over the same
generated cases (every bits x group size x dtype x policy, zero / tiny /
normal / large deltas, odd shapes, DoRA); its outputs must be byte-identical
across every toolchain and CPU kernel build, and equal to the pure-MLX
reference (pyfuse.kernel.reference) the other tests use.

Slow (each toolchain's first build compiles every kernel at -O3: minutes;
later runs rebuild only what changed, in build/native-harness). The tools
come from Debian (`apt-get install clang g++-aarch64-linux-gnu qemu-user`,
which .ci/run does when it can); a toolchain whose tools are missing is
skipped with the reason."""

from __future__ import annotations

import subprocess

import mlx.core as mx
import pytest

import harness_io
import pyfuse
from pyfuse.kernel import native as _native
from pyfuse.kernel.reference import fuse_requant_reference
from pyfuse.kernel.self_check import case_grid
from pyfuse.options import POLICIES

pytestmark = pytest.mark.slow

# The harness drives the kernels without the calibrated policy's P matrix
# (computed in Python from X^T X), so it checks the policies that need none;
# calibrated is checked bit for bit against its NumPy reference by
# tests/unit/test_calibrated.py and by `pyfuse self-check`.
CASES = case_grid(policies=tuple(p for p in POLICIES if p != "calibrated"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("harness") / "cases.bin"
    return path, harness_io.write_inputs(CASES, path)


def _toolchain_or_skip(tc):
    missing = tc.missing()
    if missing:
        pytest.skip(f"{tc.name}: {', '.join(missing)} not on PATH (Debian: apt-get install -y clang "
                    f"g++-aarch64-linux-gnu qemu-user; .ci/run installs them as root)")


def _build_or_fail(tc):
    try:
        return harness_io.build(tc)
    except subprocess.CalledProcessError as err:
        pytest.fail(f"{tc.name}: build failed\n{err.stdout[-3000:]}\n{err.stderr[-3000:]}")


@pytest.fixture(scope="module")
def outputs(inputs, tmp_path_factory):
    """{toolchain name: {cpu build: output bytes}} for every toolchain
    available here (missing ones are recorded, not built)."""
    path, _ = inputs
    results = {}
    for tc in harness_io.TOOLCHAINS:
        if tc.missing():
            continue
        build_dir = _build_or_fail(tc)
        results[tc.name] = {
            b: harness_io.run(tc, build_dir, path, tmp_path_factory.mktemp(tc.name) / f"{b}.bin", b)
            for b in harness_io.cpu_builds(tc, build_dir)}
    return results


@pytest.mark.parametrize("tc", harness_io.TOOLCHAINS, ids=lambda tc: tc.name)
def test_toolchain_builds_with_warnings_as_errors(tc):
    _toolchain_or_skip(tc)
    _build_or_fail(tc)


@pytest.mark.parametrize("tc", harness_io.TOOLCHAINS, ids=lambda tc: tc.name)
def test_extension_sources_compile_without_warnings(tc):
    """Every csrc/*.cpp (the MLX primitive, bindings, fidelity, the Metal
    simulation) with the same compiler, target and flags, -Werror."""
    _toolchain_or_skip(tc)
    build_dir = _build_or_fail(tc)
    for cmd in harness_io.extension_source_commands(build_dir):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{tc.name}: {cmd[-1]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("tc", harness_io.TOOLCHAINS, ids=lambda tc: tc.name)
def test_outputs_identical_across_toolchains_and_builds(tc, outputs):
    _toolchain_or_skip(tc)
    reference_name = next(iter(outputs))
    reference = outputs[reference_name]["baseline"]
    for build, data in outputs[tc.name].items():
        assert data == reference, f"{tc.name} {build} differs from {reference_name} baseline"


def test_metal_source_equals_cpu_under_metal_rules(outputs):
    """Within the harness: the Metal kernel source through the shim gives
    the CPU kernel's bytes under MLX's Metal rules, every case."""
    for name, by_build in outputs.items():
        for case, out in zip(CASES, harness_io.split_outputs(by_build["baseline"], CASES)):
            assert out["metal-source"] == out["cpu-metal-rules"], (name, case.label)


@pytest.mark.skipif(not pyfuse.native_available(), reason="the DoRA cases compare with the extension")
def test_outputs_equal_the_mlx_reference(inputs, outputs):
    """The harness's CPU path against the pure-MLX reference on the CPU
    (DoRA cases, whose row norm MLX sums in another order, against the
    built extension instead)."""
    _, case_inputs = inputs
    data = next(iter(outputs.values()))["baseline"]
    for case, arrays, out in zip(CASES, case_inputs, harness_io.split_outputs(data, CASES)):
        w, s, b, a, bb, m = arrays
        kw = dict(scale=1.0, group_size=case.group_size, bits=case.bits, policy=case.policy, seed=case.seed)
        if m is None:
            want = fuse_requant_reference(w, s, b, a, bb, **kw, stream=mx.cpu)
        else:
            want = _native.ext.fuse_requant(w, s, b, a, bb, **kw, magnitude=m, stream=mx.cpu)
        assert b"".join(harness_io.raw_bytes(x) for x in want) == out["cpu"], case.label
        sim = _native.ext.simulate_metal_fuse_requant(
            [w, s, b, a, bb] + ([] if m is None else [m]), 1.0, case.group_size, case.bits,
            harness_io.policy_id(case.policy), case.seed)
        assert b"".join(harness_io.raw_bytes(x) for x in sim) == out["metal-source"], case.label
