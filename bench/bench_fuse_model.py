#!/usr/bin/env python
"""``mlx_lm fuse`` vs ``pyfuse fuse`` on a ~2 GB 3-bit MoE: wall time and peak memory.

The model has the real expert shape (128 experts x 2048 x 512, 3-bit, group
size 64, bf16 scales and biases, 12 layers; random codes and scales, which is
all a fuse looks at) in four shards with an index, a qwen3_moe config and a
tokenizer, so ``mlx_lm fuse`` loads it as it is. The adapter is rank 2 on the
``switch_mlp.down_proj`` of the last three layers (as ``mlx_lm lora
--num-layers 3`` with that key writes it). Both tools run in subprocesses,
one after the other, each with the model's files in the page cache; peak
memory is the child's ru_maxrss (``os.wait4``). The fused tensors of the two
outputs are compared byte for byte.

    python bench/bench_fuse_model.py --workdir /tmp/pyfuse-bench          # ~2 GB model
    python bench/bench_fuse_model.py --workdir /tmp/pyfuse-bench --small  # ~40 MB, seconds

The model is built once per --workdir (``model-full`` / ``model-small``) and
reused; outputs are deleted after each run unless --keep. Goals (issue):
pyfuse's peak memory <= 1/4 and time <= 1/3 of the stock fuse.
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

SIZES = {
    # hidden, moe_intermediate, experts, layers, heads, kv_heads, head_dim, adapted layers
    "full": dict(hidden=2048, inter=512, experts=128, layers=12, heads=16, kv_heads=4, head_dim=128,
                 adapted=3, shards=4),
    "small": dict(hidden=512, inter=256, experts=32, layers=4, heads=4, kv_heads=2, head_dim=128,
                  adapted=2, shards=2),
}
DOWN = "mlp.switch_mlp.down_proj"
BITS, GROUP = 3, 64


def _tensors_of_layer(i: int, s: dict):
    H, I, E = s["hidden"], s["inter"], s["experts"]
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    p = f"model.layers.{i}"
    yield f"{p}.input_layernorm.weight", ("norm", (H,))
    yield f"{p}.post_attention_layernorm.weight", ("norm", (H,))
    yield f"{p}.self_attn.q_norm.weight", ("norm", (s["head_dim"],))
    yield f"{p}.self_attn.k_norm.weight", ("norm", (s["head_dim"],))
    for name, shape in (("q_proj", (q, H)), ("k_proj", (kv, H)), ("v_proj", (kv, H)), ("o_proj", (H, q))):
        yield f"{p}.self_attn.{name}", ("q", shape, BITS)
    yield f"{p}.mlp.gate", ("q", (E, H), 8)
    for name, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I))):
        yield f"{p}.mlp.switch_mlp.{name}", ("q", shape, BITS)


def build_model(out: Path, s: dict, vocab: int) -> None:
    """Random 3-bit codes and plausible scales, written tensor by tensor."""
    import mlx.core as mx

    from pyfuse.io.safetensors import SafetensorsWriter, dtype_of
    from pyfuse.demo.tiny_model import build_tokenizer, tiny_model_config

    out.mkdir(parents=True)
    build_tokenizer(out)
    mx.random.seed(0)
    layers_per_shard = -(-s["layers"] // s["shards"])
    shard_items = []
    for k in range(s["shards"]):
        items = []
        if k == 0:
            items.append(("model.embed_tokens", ("q", (vocab, s["hidden"]), BITS)))
        for i in range(k * layers_per_shard, min(s["layers"], (k + 1) * layers_per_shard)):
            items.extend(_tensors_of_layer(i, s))
        if k == s["shards"] - 1:
            items.append(("model.norm.weight", ("norm", (s["hidden"],))))
            items.append(("lm_head", ("q", (vocab, s["hidden"]), BITS)))
        shard_items.append(items)

    def make(spec):
        if spec[0] == "norm":
            return [("", mx.ones(spec[1], dtype=mx.bfloat16))]
        _, shape, bits = spec
        *lead, n_in = shape
        wshape = (*lead, n_in * bits // 32)
        halves = [mx.random.randint(0, 1 << 16, wshape).astype(mx.uint32) for _ in range(2)]
        w = (halves[0] << 16) | halves[1]
        scales = (0.004 + 0.002 * mx.random.uniform(shape=(*lead, n_in // GROUP))).astype(mx.bfloat16)
        biases = (-(2**bits - 1) / 2 * scales.astype(mx.float32)
                  + 0.001 * mx.random.normal(scales.shape)).astype(mx.bfloat16)
        return [(".weight", w), (".scales", scales), (".biases", biases)]

    weight_map, total = {}, 0
    n = s["shards"]
    for k, items in enumerate(shard_items):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        entries = []
        for name, spec in items:
            if spec[0] == "norm":
                entries.append((name, "BF16", spec[1]))
            else:
                *lead, n_in = spec[1]
                bits = spec[2]
                entries += [(f"{name}.weight", "U32", (*lead, n_in * bits // 32)),
                            (f"{name}.scales", "BF16", (*lead, n_in // GROUP)),
                            (f"{name}.biases", "BF16", (*lead, n_in // GROUP))]
        with SafetensorsWriter(out / fname, entries, metadata={"format": "mlx"}) as writer:
            for name, spec in items:
                for suffix, arr in make(spec):
                    mx.eval(arr)
                    writer.write(name + suffix, arr)
                    weight_map[name + suffix] = fname
                    total += arr.nbytes
                    assert dtype_of(arr)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    cfg = tiny_model_config("qwen3_moe", vocab_size=vocab, hidden_size=s["hidden"],
                            num_layers=s["layers"], num_experts=s["experts"], experts_per_tok=8,
                            moe_intermediate_size=s["inter"], intermediate_size=4 * s["hidden"],
                            num_heads=s["heads"], num_kv_heads=s["kv_heads"], dtype="bfloat16")
    cfg["head_dim"] = s["head_dim"]
    quant = {"group_size": GROUP, "bits": BITS, "mode": "affine"}
    for i in range(s["layers"]):
        quant[f"model.layers.{i}.mlp.gate"] = {"group_size": GROUP, "bits": 8}
    cfg["quantization"] = quant
    cfg["quantization_config"] = dict(quant)
    (out / "config.json").write_text(json.dumps(cfg, indent=4))


def build_adapter(out: Path, s: dict) -> list[str]:
    import mlx.core as mx

    out.mkdir(parents=True)
    mx.random.seed(1)
    E, H, I, r = s["experts"], s["hidden"], s["inter"], 2
    weights = {}
    modules = [f"model.layers.{i}.{DOWN}" for i in range(s["layers"] - s["adapted"], s["layers"])]
    for m in modules:
        weights[f"{m}.lora_a"] = mx.random.uniform(-I**-0.5, I**-0.5, (E, r, I))
        weights[f"{m}.lora_b"] = mx.random.normal((E, H, r)) * 1e-3
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": s["adapted"],
        "lora_parameters": {"rank": r, "scale": 20.0, "dropout": 0.0, "keys": [DOWN]}}, indent=4))
    return modules


def warm(path: Path) -> None:
    """Read every file once so that both tools start with the page cache warm."""
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def run(cmd: list[str], log: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    env = {**os.environ, "PYFUSE_PROGRESS": "0", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux: KiB


def compare(a: Path, b: Path, modules: list[str]) -> list[str]:
    """Names of the fused tensors whose bytes differ between two outputs."""
    from pyfuse.io.model_dir import ModelDir

    bad = []
    with ModelDir(a) as ma, ModelDir(b) as mb:
        for m in modules:
            for leaf in ("weight", "scales", "biases"):
                t = f"{m}.{leaf}"
                ia, ib = ma.tensors[t], mb.tensors[t]
                if (ia.dtype, ia.shape) != (ib.dtype, ib.shape) or \
                        ma.shards[ma.where[t]].read_bytes(t) != mb.shards[mb.where[t]].read_bytes(t):
                    bad.append(t)
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path, help="cache for the model, adapter and outputs")
    ap.add_argument("--small", action="store_true", help="a ~40 MB model for a quick run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (the best is reported)")
    ap.add_argument("--policy", default="stock", help="pyfuse's policy (default stock)")
    ap.add_argument("--link-unchanged", action="store_true", help="also time pyfuse --link-unchanged")
    ap.add_argument("--keep", action="store_true", help="keep the fused outputs")
    args = ap.parse_args()

    size = "small" if args.small else "full"
    s = SIZES[size]
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / f"model-{size}"
    adapter = args.workdir / f"adapter-{size}"
    done = args.workdir / f"model-{size}.done"
    if not done.exists():
        for p in (model, adapter):
            shutil.rmtree(p, ignore_errors=True)
        print(f"building the {size} model in {model} ...", flush=True)
        t0 = time.perf_counter()
        build_model(model, s, vocab=1024)
        build_adapter(adapter, s)
        done.write_text("ok\n")
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    modules = [f"model.layers.{i}.{DOWN}" for i in range(s["layers"] - s["adapted"], s["layers"])]
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))

    tools = {
        "mlx_lm fuse": lambda out: [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(model),
                                    "--adapter-path", str(adapter), "--save-path", str(out)],
        "pyfuse fuse": lambda out: [sys.executable, "-m", "pyfuse", "fuse", "--model", str(model),
                                    "--adapter-path", str(adapter), "--save-path", str(out),
                                    "--policy", args.policy, "--report", str(out) + ".report.json"],
    }
    if args.link_unchanged:
        tools["pyfuse fuse --link-unchanged"] = lambda out: tools["pyfuse fuse"](out) + ["--link-unchanged"]

    import pyfuse

    print(f"model: {model_bytes / 1e9:.2f} GB ({s['layers']} layers, {s['experts']} x {s['hidden']} x "
          f"{s['inter']} experts, {BITS}-bit g{GROUP}); adapter: rank 2 on {len(modules)} down_proj; "
          f"pyfuse kernel: {'native' if pyfuse.native_available() else 'reference (pure MLX)'}; "
          f"cpus: {os.cpu_count()}", flush=True)
    results = {}
    outputs = {}
    for rep in range(args.repeat):
        for name, cmd in tools.items():
            out = args.workdir / f"out-{size}-{name.split()[0]}{'-link' if 'link' in name else ''}"
            shutil.rmtree(out, ignore_errors=True)
            warm(model)
            seconds, rss = run(cmd(out), args.workdir / f"{out.name}.log")
            print(f"  {name:30s} run {rep + 1}: {seconds:7.2f} s  peak RSS {rss / 2**20:8.0f} MiB", flush=True)
            best = results.get(name)
            results[name] = (min(seconds, best[0]) if best else seconds, min(rss, best[1]) if best else rss)
            outputs[name] = out

    bad = compare(outputs["mlx_lm fuse"], outputs["pyfuse fuse"], modules)
    report = json.loads(Path(str(outputs["pyfuse fuse"]) + ".report.json").read_text())["summary"]
    stock_t, stock_m = results["mlx_lm fuse"]
    print()
    print(f"{'tool':32s} {'time (s)':>9s} {'peak RSS (MiB)':>15s} {'time ratio':>11s} {'memory ratio':>13s}")
    for name, (t, m) in results.items():
        print(f"{name:32s} {t:9.2f} {m / 2**20:15.0f} {t / stock_t:11.3f} {m / stock_m:13.3f}")
    t, m = results["pyfuse fuse"]
    print()
    if args.policy == "stock":
        print(f"stock parity of the {3 * len(modules)} fused tensors: "
              + ("identical" if not bad else f"DIFFER: {bad}"))
    print(f"fidelity ({report['policy']}): retention {report['retention']:.3f}, noise "
          f"{report['noise']:.3g}x the delta, codes changed {report['codes_changed']:.2%}")
    print(f"goals: memory <= 1/4: {'met' if m <= stock_m / 4 else 'NOT met'} ({m / stock_m:.3f}); "
          f"time <= 1/3: {'met' if t <= stock_t / 3 else 'NOT met'} ({t / stock_t:.3f})"
          + ("  [--small: process start-up dominates; the goals are for the ~2 GB model]"
             if args.small else ""))
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
    if bad and args.policy == "stock":
        sys.exit(1)


if __name__ == "__main__":
    main()
