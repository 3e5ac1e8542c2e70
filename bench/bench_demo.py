#!/usr/bin/env python
"""``pyfuse demo``: how long a first run and a resumed rerun take, same
machine, same run (the rerun as a share of the first run).

Runs ``pyfuse demo`` (``--quick`` unless --full) into a fresh directory,
then again into the same directory, where every step is already done (the
tests check that it resumes; this measures what that saves). The default
model is built first (or taken from --cache) and is not part of either
figure.

    python bench/bench_demo.py                      # quick configuration
    python bench/bench_demo.py --full --cache ~/.cache/pyfuse --json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path


def _timed_demo(out: Path, cache: Path, quick: bool) -> tuple[float, str]:
    from pyfuse.cli import main

    args = ["demo", "--out", str(out), "--cache", str(cache)] + (["--quick"] if quick else [])
    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(args)
    seconds = time.perf_counter() - started
    if code != 0:
        sys.exit(f"pyfuse demo failed ({code}):\n{err.getvalue()[-2000:]}")
    steps = next((line.split("pyfuse demo: ", 1)[1] for line in err.getvalue().splitlines()
                  if "step(s) run" in line), "")
    return seconds, steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full configuration (default: --quick)")
    ap.add_argument("--cache", default=None, help="the default model's cache (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    from pyfuse.demo.default_model import default_assets

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(args.cache).expanduser() if args.cache else tmp / "cache"
        default_assets(cache)  # built (or found) before the clock starts
        first, first_steps = _timed_demo(tmp / "run", cache, not args.full)
        rerun, rerun_steps = _timed_demo(tmp / "run", cache, not args.full)
    figures = {"configuration": "full" if args.full else "quick", "first_run_s": round(first, 2),
               "rerun_s": round(rerun, 2), "rerun_share": round(rerun / first, 4),
               "first_run": first_steps, "rerun": rerun_steps}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"pyfuse demo ({figures['configuration']}): first run {first:.1f} s ({first_steps}); "
              f"rerun {rerun:.1f} s ({rerun_steps}), {100 * rerun / first:.1f} % of the first run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
