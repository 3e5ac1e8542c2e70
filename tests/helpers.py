"""Plain helpers the test files share (``from helpers import ...``; pytest
puts ``tests/`` on ``sys.path`` because ``tests/conftest.py`` is there).
Fixtures live in ``conftest.py``; these are functions, so a test can call
them with its own arguments."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
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
    lays it out."""
    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": fine_tune_type, "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}}, indent=2))
    mx.save_safetensors(str(path / "adapters.safetensors"), tensors, metadata={"format": "mlx"})
    return path


def moe_lora_tensors(model_dir: Path, rank: int, seed: int = 0, std: float = 0.1) -> dict:
    """A random LoRA (mlx-lm's layouts) on every layer's experts' ``down_proj``
    and ``q_proj`` of a tiny qwen3_moe model: ``{name: mx.array}``."""
    import mlx.core as mx
    import numpy as np

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    E, H, inter = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    q_out = cfg["num_attention_heads"] * cfg.get("head_dim", H // cfg["num_attention_heads"])
    rng = np.random.default_rng(seed)
    shapes = {"mlp.switch_mlp.down_proj": ((E, rank, inter), (E, H, rank)),
              "self_attn.q_proj": ((H, rank), (rank, q_out))}
    t = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (a, b) in shapes.items():
            for leaf, shape in (("lora_a", a), ("lora_b", b)):
                t[f"model.layers.{layer}.{module}.{leaf}"] = mx.array(rng.normal(0, std, shape).astype(np.float32))
    return t


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
