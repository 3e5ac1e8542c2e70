#!/usr/bin/env python
"""``pyfuse noise-floor`` on the ~2 GB expert-shape model of the fuse benchmark: time and memory.

The model is the one ``bench/bench_fuse_model.py`` builds (128 experts x
2048 x 512, 3-bit, group size 64, bf16 scales, 12 layers, qwen3_moe; random
codes and scales) and is shared with it: the same ``--workdir`` holds
``model-full`` (or ``model-small``) and the rank-2 adapter on the last
three ``switch_mlp.down_proj``. The measurement runs in a child process
(wall time and peak RSS via ``os.wait4``) which counts its calls of the
native kernel: one call per quantized tensor per policy per round (all 128
experts of a SwitchLinear in one call), plus one per adapted tensor per
policy; never one per expert.

    python bench/bench_noise_floor.py --workdir /tmp/pyfuse-bench           # ~2 GB model
    python bench/bench_noise_floor.py --workdir /tmp/pyfuse-bench --small   # ~40 MB, seconds

The weights of this model are random codes, not trained (or even normal)
weights: the timing is representative, the figures are not (use a real
model for those; see docs/noise_floor_example.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ensure_model(workdir: Path, size: str) -> tuple[Path, Path]:
    """Build (or reuse) the fuse benchmark's model and adapter."""
    sys.path.insert(0, str(HERE))
    import bench_fuse_model as bfm  # the fuse benchmark's builder: one model for both benches

    s = bfm.SIZES[size]
    model, adapter = workdir / f"model-{size}", workdir / f"adapter-{size}"
    done = workdir / f"model-{size}.done"
    if not done.exists():
        for p in (model, adapter):
            shutil.rmtree(p, ignore_errors=True)
        print(f"building the {size} model in {model} ...", flush=True)
        t0 = time.perf_counter()
        bfm.build_model(model, s, vocab=1024)
        bfm.build_adapter(adapter, s)
        done.write_text("ok\n")
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, adapter


def child(args) -> None:
    """The measurement itself, counting kernel calls."""
    import pyfuse
    import pyfuse.noise_floor.measure as nf
    import pyfuse.noise_floor.weights as nf_weights  # where the noise floor calls the kernel

    calls = {"n": 0, "max_experts": 0}
    kernel = nf_weights.fuse_requant

    def counting(w, *a, **k):
        calls["n"] += 1
        if w.ndim == 3:
            calls["max_experts"] = max(calls["max_experts"], w.shape[0])
        return kernel(w, *a, **k)

    nf_weights.fuse_requant = counting
    t0 = time.perf_counter()
    res = nf.measure_noise_floor(
        args.model, group_sizes=[int(x) for x in args.group_sizes.split(",")],
        bits=[int(x) for x in args.bits.split(",")], policies=args.policies.split(","),
        rounds=args.rounds, adapter_path=args.adapter, outputs=args.outputs, out=args.out,
        prompts=args.prompts_file)
    seconds = time.perf_counter() - t0
    summary = {"seconds": seconds, "kernel_calls": calls["n"], "experts_per_call": calls["max_experts"],
               "native": pyfuse.native_available(), "rows": res.rows, "meta": res.meta,
               "tensors": len({t["module"] for t in res.tensors})}
    Path(args.summary).write_text(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path, help="cache for the model (shared with bench_fuse_model)")
    ap.add_argument("--small", action="store_true", help="the ~40 MB model, for a quick run")
    ap.add_argument("--group-sizes", default="64", help="settings to measure (default: the model's own, 64)")
    ap.add_argument("--bits", default="3", help="(default: the model's own, 3)")
    ap.add_argument("--policies", default="stock,preserve,stochastic")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-adapter", action="store_true", help="skip the adapter's retention/noise")
    ap.add_argument("--no-outputs", dest="outputs", action="store_false",
                    help="skip the output level (KL on the built-in prompts)")
    ap.add_argument("--prompts", type=int, default=None, metavar="N",
                    help="use only the first N built-in prompts for the output level (on CPU each "
                         "token costs ~0.5 s on the full model: MLX's gather_qmm); default: all 12")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--summary", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    size = "small" if args.small else "full"
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, adapter = ensure_model(args.workdir, size)
    out = args.workdir / f"noise-floor-{size}"
    summary = args.workdir / f"noise-floor-{size}.summary.json"
    cmd = [sys.executable, __file__, "--child", "--workdir", str(args.workdir), "--model", str(model),
           "--out", str(out), "--summary", str(summary), "--group-sizes", args.group_sizes,
           "--bits", args.bits, "--policies", args.policies, "--rounds", str(args.rounds)]
    if not args.no_adapter:
        cmd += ["--adapter", str(adapter)]
    if not args.outputs:
        cmd += ["--no-outputs"]
    elif args.prompts is not None:
        from pyfuse.io.files import write_jsonl
        from pyfuse.noise_floor.measure import DEFAULT_PROMPTS

        pf = write_jsonl(args.workdir / f"prompts-{args.prompts}.jsonl",
                         [{"text": t} for t in DEFAULT_PROMPTS[:args.prompts]])
        cmd += ["--prompts-file", str(pf)]
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"model: {model} ({model_bytes / 1e9:.2f} GB); settings: g{args.group_sizes} x {args.bits}-bit x "
          f"{args.policies}; rounds {args.rounds}; adapter: {'no' if args.no_adapter else adapter}; "
          f"outputs: {'no' if not args.outputs else (f'{args.prompts} prompts' if args.prompts else 'yes')}; "
          f"cpus: {os.cpu_count()}", flush=True)
    env = {**os.environ, "PYFUSE_PROGRESS": os.environ.get("PYFUSE_PROGRESS", "0"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"noise-floor failed ({os.waitstatus_to_exitcode(status)})")
    s = json.loads(summary.read_text())
    print(f"\nwall {wall:.1f} s (measurement {s['seconds']:.1f} s), peak RSS {usage.ru_maxrss / 2**20:.2f} GiB")
    print(f"kernel: {'native' if s['native'] else 'REFERENCE FALLBACK'}; {s['kernel_calls']} calls for "
          f"{s['tensors']} quantized tensors (up to {s['experts_per_call']} experts per call)")
    for label, sec in s["meta"]["setting_seconds"].items():
        print(f"  {label}: {sec:.1f} s")
    print()
    print(f"{'gs':>4} {'bits':>4} {'policy':>10} {'w. changed':>11} {'codes ch.':>10} {'rel err':>9} "
          f"{'retention':>9} {'noise':>8} {'KL mean':>9} {'top1 flip':>9} {'t weights':>9} {'t outputs':>9}")
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    secs = lambda x: "-" if x is None else f"{x:.1f}s"  # noqa: E731
    for r in s["rows"]:
        print(f"{r['group_size']:>4} {r['bits']:>4} {r['policy']:>10} {f(r['weights_changed'], '.3%'):>11} "
              f"{f(r['codes_changed'], '.3%'):>10} {f(r['rel_error'], '.2e'):>9} {f(r['retention'], '.3f'):>9} "
              f"{f(r['noise'], '.3g'):>8} {f(r['kl_mean'], '.2e'):>9} {f(r['top1_flip'], '.2%'):>9} "
              f"{r['seconds_weights']:>8.1f}s {secs(r.get('seconds_outputs')):>9}")
    if s["meta"].get("prompt_tokens"):
        print(f"\noutput level: {s['meta']['prompts']}, {s['meta']['prompt_tokens']} tokens")
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
