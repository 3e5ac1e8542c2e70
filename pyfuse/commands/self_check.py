"""``pyfuse self-check``: do this machine's kernels give the bytes they should?"""

from __future__ import annotations

from ._args import checked_list

HELP = "compare this machine's kernel paths (CPU, Metal) with the pure-MLX reference, bit for bit"
DESCRIPTION = """\
Run every kernel path this install has over a grid of small cases (every
bits x group size x dtype x policy by default, with zero, tiny, normal and
large deltas and odd shapes) and compare the fused bytes, bit for bit:

  cpu:<build>   the native CPU kernel, once per instruction-set build this
                processor runs, against the pure-MLX reference on the CPU
  metal-source  the Metal kernel source, compiled as C++ into the extension
                and run over a simulated grid, against the CPU kernel under
                MLX's Metal quantizer rules
  metal-gpu     (a Mac with Metal) the real Metal kernel on the GPU against
                MLX on the GPU (stock) or the CPU reference (preserve,
                stochastic: the same on every backend)

Prints one line per path and a verdict. Exit status: 0 when every
comparison is identical, 1 on any mismatch (or when the native extension is
not in use, so nothing native could be checked), 2 on bad flags.

  pyfuse self-check
  pyfuse self-check --bits 3,4 --policies stock"""


def add_arguments(p) -> None:
    from ..options import POLICIES, SUPPORTED_BITS, SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES, joined

    p.add_argument("--bits", default=joined(SUPPORTED_BITS).replace(" ", ""),
                   help="bit widths to check, comma-separated (default: all supported)")
    p.add_argument("--group-sizes", default=joined(SUPPORTED_GROUP_SIZES).replace(" ", ""),
                   help="group sizes to check (default: all supported)")
    p.add_argument("--dtypes", default=joined(SUPPORTED_DTYPES).replace(" ", ""),
                   help="scale/bias dtypes to check (default: all supported)")
    p.add_argument("--policies", default=joined(POLICIES).replace(" ", ""),
                   help="re-quantization policies to check (default: all)")
    p.add_argument("--show", type=int, default=5, help="mismatching cases to list per path (default: 5)")


def _values(text: str, flag: str, supported, cast=str) -> list:
    from ..errors import UserError
    from ..options import joined

    values = checked_list(text, flag, cast)
    bad = [v for v in values if v not in supported]
    if bad:
        raise UserError(f"{flag}: {', '.join(map(str, bad))} not supported; supported: {joined(supported)}")
    return values


def run(args) -> int:
    import platform

    from ..kernel import native as _native
    from ..kernel.self_check import case_grid, metal_gpu_available, self_check
    from ..options import POLICIES, SUPPORTED_BITS, SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES
    from ..progress import progress_bar

    cases = case_grid(bits=_values(args.bits, "--bits", SUPPORTED_BITS, int),
                      group_sizes=_values(args.group_sizes, "--group-sizes", SUPPORTED_GROUP_SIZES, int),
                      dtypes=_values(args.dtypes, "--dtypes", SUPPORTED_DTYPES),
                      policies=_values(args.policies, "--policies", POLICIES))
    print(f"pyfuse self-check: {platform.system()} {platform.machine()}, {len(cases)} cases")
    if _native.ext is None:
        print(f"  native kernels: NOT IN USE ({_native.unavailable_reason});\n"
              "  pyfuse would fall back to the pure-MLX reference (exact, but slow)")
        print("verdict: FAIL (nothing native to check)")
        return 1
    if not metal_gpu_available():
        print("  metal-gpu: not checked here (this MLX/pyfuse build has no Metal, or no GPU is visible)")
    with progress_bar() as progress:
        task = progress.add_task("self-check", total=len(cases))
        results = self_check(cases, on_case=lambda: progress.advance(task))
    for r in results:
        status = "identical" if not r.mismatches else f"{len(r.mismatches)} MISMATCH(ES)"
        print(f"  {r.path:<14} {r.compared - len(r.mismatches)}/{r.compared} cases {status}")
        for label in r.mismatches[:args.show]:
            print(f"      {label}")
    failed = sum(len(r.mismatches) for r in results)
    total = sum(r.compared for r in results)
    if failed:
        print(f"verdict: FAIL ({failed} of {total} comparisons differ; please report them with this output)")
        return 1
    print(f"verdict: PASS (all {total} comparisons bit-identical)")
    return 0
