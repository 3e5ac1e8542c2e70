"""Plain helpers the test files share (``from helpers import ...``; pytest
puts ``tests/`` on ``sys.path`` because ``tests/conftest.py`` is there).
Fixtures live in ``conftest.py``; these are functions, so a test can call
them with its own arguments."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

LETTERS = "ABCDEFGHIJ"


# -- the CLI ------------------------------------------------------------------------------


@dataclass
class CliRun:
    code: int
    out: str
    err: str


def run_cli(*args) -> CliRun:
    """``pyfuse ARGS...`` in this process, its exit code and what it printed."""
    from pyfuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliRun(code, out.getvalue(), err.getvalue())


# -- files --------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line; a ``str`` row is written as it is (for
    broken lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_yaml(path: Path, data) -> Path:
    """``data`` as YAML, keys in their order (an experiment spec)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def file_digests(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def file_mtimes(root: Path) -> dict[str, int]:
    """``{relative path: mtime in ns}`` of every file below ``root`` (what a
    rerun that resumes must leave alone)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(Path(root).rglob("*")) if p.is_file()}


# -- experiment run directories ------------------------------------------------------------


def run_plan(out: Path) -> dict:
    """``OUT/plan.json`` of an experiment run."""
    return read_json(Path(out) / "plan.json")


def step_rows(out: Path, step: str) -> list[dict]:
    """The per-item rows an evaluation step wrote."""
    return read_jsonl(Path(out) / "steps" / step / "rows.jsonl")


# -- models and adapters --------------------------------------------------------------------


def model_tensors(model_dir: Path) -> dict:
    """Every tensor of an mlx-lm model directory (all shards), as MLX arrays."""
    import mlx.core as mx

    out = {}
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def write_adapter_dir(path: Path, tensors: dict, *, keys, rank: int, scale: float, num_layers: int,
                      fine_tune_type: str = "lora") -> Path:
    """An mlx-lm adapter directory (``adapters.safetensors`` with the given
    ``{name: array}`` and ``adapter_config.json``), as ``mlx_lm lora``
    lays it out. ``keys=None``: no ``keys`` entry (mlx-lm's default modules)."""
    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True)
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = list(keys)
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": params}, indent=2))
    mx.save_safetensors(str(path / "adapters.safetensors"), tensors, metadata={"format": "mlx"})
    return path


# -- fusing, with mlx-lm as the oracle ----------------------------------------------------------

# The tiny MoE's expert projections (pyfuse.demo.tiny_model, arch qwen3_moe).
DOWN = "mlp.switch_mlp.down_proj"
UP = "mlp.switch_mlp.up_proj"
GATE = "mlp.switch_mlp.gate_proj"


def make_adapter(model_dir, out, *, keys=None, num_layers=2, rank=4, scale=20.0, dora=False,
                 b_std=2e-3, seed=0, drop=(), m_jitter=0.01) -> Path:
    """An adapter directory as ``mlx_lm lora`` writes it, with random lora_b:
    made with mlx-lm's own ``linear_to_lora_layers`` (so its key names and
    shapes are mlx-lm's) and saved like its trainer. ``drop``: leave out the
    tensors whose name holds one of these; ``m_jitter``: perturb DoRA
    magnitudes so that they matter."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = list(keys)
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    mx.random.seed(seed)
    model.update(tree_map_with_path(
        lambda p, v: mx.random.normal(v.shape) * b_std if p.endswith("lora_b") else v,
        model.trainable_parameters()))
    weights = dict(tree_flatten(model.trainable_parameters()))
    for k in weights:
        if k.endswith(".m"):
            weights[k] = weights[k] * (1 + m_jitter * mx.random.normal(weights[k].shape))
    weights = {k: v for k, v in weights.items() if not any(d in k for d in drop)}
    return write_adapter_dir(out, weights, keys=keys, rank=rank, scale=scale, num_layers=num_layers,
                             fine_tune_type="dora" if dora else "lora")


def mlx_fuse(model, adapter, out, *extra) -> Path:
    """``mlx_lm fuse`` (its own main, in process, quiet)."""
    import mlx_lm.fuse

    argv = sys.argv
    sys.argv = ["mlx_lm.fuse", "--model", str(model), "--adapter-path", str(adapter),
                "--save-path", str(out), *extra]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mlx_lm.fuse.main()
    finally:
        sys.argv = argv
    return Path(out)


def identical(x, y) -> bool:
    """Two MLX arrays with the same dtype, shape and bytes."""
    import mlx.core as mx
    import numpy as np

    def raw(a) -> bytes:
        return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()

    return x.dtype == y.dtype and x.shape == y.shape and raw(x) == raw(y)


def differing(a: dict, b: dict) -> list[str]:
    """The names whose tensors are not ``identical`` (both hold the same names)."""
    assert set(a) == set(b), set(a) ^ set(b)
    return sorted(k for k in a if not identical(a[k], b[k]))


def module_tensors(names, module: str) -> set[str]:
    """The tensor names of ``module`` (its weight, scales, biases, ...)."""
    return {n for n in names if n.rsplit(".", 1)[0] == module}


def leftovers(parent: Path) -> list[str]:
    """pyfuse's temporary files and directories in ``parent``."""
    from pyfuse.io.files import TMP_MARK

    return [p.name for p in Path(parent).iterdir() if TMP_MARK in p.name]


# -- whole-model agreement, with mlx-lm and scipy as the oracle ----------------------------------


def mlx_lm_logits(model_dir, seqs, adapter=None) -> list:
    """Per sequence, float64 next-token logits of one plain forward pass of the
    model as ``mlx_lm.load`` builds it (with ``adapter_path`` unfused)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=None if adapter is None else str(adapter))
    return [np.asarray(model(mx.array([s]))[0].astype(mx.float32)).astype(np.float64) for s in seqs]


def scipy_kl_top1(ref: list, got: list):
    """Per token ``KL(softmax(ref) || softmax(got))`` (``scipy.special.rel_entr``)
    and top-1 agreement, concatenated over sequences."""
    import numpy as np
    from scipy.special import rel_entr, softmax

    kl = np.concatenate([rel_entr(softmax(a, -1), softmax(b, -1)).sum(-1) for a, b in zip(ref, got)])
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, got)])
    return kl, agree


# -- multiple-choice rows and results ---------------------------------------------------------


def mmlu_row(qid: int = 1, **over) -> dict:
    """A valid MMLU-Pro row (4 options, answer B); ``over`` replaces fields."""
    row = {"question_id": qid, "question": f"What is {qid} + 1?",
           "options": [str(qid + d) for d in range(4)], "answer": "B", "answer_index": 1,
           "cot_content": "A: Let's think step by step. Add one. The answer is (B).",
           "category": "math", "src": "ori_mmlu-test"}
    row.update(over)
    return row


def result_row(item_id, correct: bool, **over) -> dict:
    """One line of a ``pyfuse eval mc`` result file; ``over`` replaces fields."""
    row = {"id": item_id, "category": "x", "gold": "A", "prediction": "A" if correct else "B",
           "rule": "boxed", "correct": correct, "output": "..."}
    row.update(over)
    return row
