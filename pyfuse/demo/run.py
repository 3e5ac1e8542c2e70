"""``pyfuse demo``: the stacking-confound experiment, end to end, on the
embedded default model (:mod:`pyfuse.demo.default_model`).

:func:`run_demo` gets the default model and its data (built once, cached),
copies the data into ``OUT/inputs/``, writes the experiment spec
``OUT/demo.yaml`` (:func:`demo_spec`: an ordinary spec for ``pyfuse
experiment``, with comments) and runs it with :func:`pyfuse.experiment.run_experiment`
into ``OUT``: ``results.json``, ``report.md`` and its plots. A rerun on the
same ``OUT`` resumes (finished steps are skipped).

The design is the study's (examples/stacking-confound.yaml), scaled down
(docs/demo.md walks through a run):

* ``base``: the default model (3-bit, group size 64);
* ``persona``: base + an identity LoRA (persona "Pyra") fused with the stock
  re-quantization, as ``mlx_lm fuse`` does;
* Set-G: the rows that both base and persona answer wrong (log-probability
  method), split by category into train / valid / test (mined with the
  models of the conditions ``base`` and ``persona``, which are then scored
  on Set-G test like every other condition);
* ``A1``: persona + a factual LoRA trained on Set-G train (rank 2, alpha 2,
  every linear layer of the two blocks), fused with stock re-quantization;
* ``A0``: its zero-delta twin (every learned delta zeroed) through the
  identical pipeline;
* ``A1-preserve`` / ``A0-preserve``: the same two fused with the
  ``preserve`` policy (the quantization grid is kept; a zero delta changes no
  bit);
* ``A1-unfused`` (the adapter loaded, not fused) and ``A1-stochastic`` (fused
  with stochastic rounding): what the adapter itself does;
* evaluations: multiple choice on Set-G test (``logprob``) and the identity
  suite, for every condition; the noise floor of every fuse setting;
* the pre-registered criterion: ``diff(A1, A0) >= 5pp and mcnemar_p(A1, A0) < 0.05``.

``quick=True`` is a reduced configuration (fewer rows, a shorter identity
suite, fewer training steps) for tests; it runs the same steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..io.files import atomic_write_text, jsonl_text, read_jsonl

__all__ = ["CRITERION", "DEFAULT_OUT", "DemoResult", "demo_config", "demo_spec", "details", "run_demo", "summarize"]

DEFAULT_OUT = "pyfuse-demo"
ALPHA = 0.05
CRITERION = f"diff(A1, A0) >= 5pp and mcnemar_p(A1, A0) < {ALPHA}"
SPEC_FILE = "demo.yaml"
INPUTS = "inputs"

FULL = {
    "per_category": None,  # every row of the default data (120 per category)
    "identity_prompts": None,  # the whole 20-prompt suite
    "persona_iters": 80,
    "factual_iters": 100,
    "factual_lr": 1e-4,
    "train_frac": 0.4,
}
QUICK = {
    "per_category": 14,
    "identity_prompts": 6,
    "persona_iters": 40,
    "factual_iters": 30,
    "factual_lr": 1e-4,
    "train_frac": 0.4,
}


def demo_config(quick: bool = False) -> dict:
    return dict(QUICK if quick else FULL)


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite ``path`` only when its content changes, so that a rerun
    fingerprints the same files (and resumes)."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


def _copy_inputs(assets, dest: Path, cfg: dict) -> dict[str, Path]:
    """The demo's data in ``dest`` (see :func:`_write_if_changed`)."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(assets.mmlu)
    if cfg["per_category"] is not None:
        seen: dict[str, int] = {}
        kept = []
        for r in rows:
            if seen.get(r["category"], 0) < cfg["per_category"]:
                seen[r["category"]] = seen.get(r["category"], 0) + 1
                kept.append(r)
        rows = kept
    suite = yaml.safe_load(assets.identity_suite.read_text(encoding="utf-8"))
    if cfg["identity_prompts"] is not None:
        suite["prompts"] = suite["prompts"][:cfg["identity_prompts"]]
    files = {
        "mmlu.jsonl": jsonl_text(rows),
        "identity_suite.yaml": ("# The demo's identity suite (persona Pyra; the base model calls itself Atlas,\n"
                                "# made by Northwind Labs): pyfuse's template with these names.\n"
                                + yaml.safe_dump(suite, sort_keys=False, allow_unicode=True)),
        "identity/train.jsonl": (assets.identity_data / "train.jsonl").read_text(encoding="utf-8"),
        "identity/valid.jsonl": (assets.identity_data / "valid.jsonl").read_text(encoding="utf-8"),
    }
    for name, text in files.items():
        _write_if_changed(dest / name, text)
    return {"mmlu": dest / "mmlu.jsonl", "identity": dest / "identity",
            "identity_suite": dest / "identity_suite.yaml"}


def demo_spec(model: str | os.PathLike, *, mmlu: str = f"{INPUTS}/mmlu.jsonl",
              identity: str = f"{INPUTS}/identity", suite: str = f"{INPUTS}/identity_suite.yaml",
              quick: bool = False) -> str:
    """The demo's experiment spec (YAML text with comments). Relative paths
    are relative to the spec file."""
    # Over 80 lines: one YAML document written out whole, so that it reads
    # as the spec file it becomes.
    cfg = demo_config(quick)
    q = json.dumps
    return f"""\
# pyfuse demo: the stacking-confound study on pyfuse's built-in tiny MoE model
# ({'quick, reduced configuration' if quick else 'full configuration'}). An ordinary `pyfuse experiment` spec: copy it, point
# `models` and `data` at your own model and data, and run
#   pyfuse experiment run THIS.yaml --out DIR
#
# Does a factual LoRA, trained on the items that both the base and the persona
# model get wrong (Set-G) and fused into the 3-bit persona model, inject
# knowledge? The decisive control is A0: the same adapter with every learned
# delta set to zero, fused through the identical pipeline.
version: 1
name: pyfuse-demo{'-quick' if quick else ''}
seed: 0

models:
  tiny-moe: {q(str(model))}   # qwen3_moe, 2 layers x 8 experts, 3-bit g64 (pyfuse.demo.default_model)

data:
  mmlu: {q(mmlu)}               # synthetic MMLU-Pro rows, 14 categories
  identity: {q(identity)}       # mlx-lm chat data that teaches the persona "Pyra"

setg:                      # evaluate base and persona on `mmlu`, keep the rows both get wrong
  data: mmlu
  base: base
  persona: persona
  method: logprob
  train_frac: {cfg['train_frac']}         # the rest is halved into valid / test (stratified by category)

conditions:
  base:
    from: tiny-moe
    description: the quantized base model
  persona:
    from: tiny-moe
    description: base + identity LoRA (persona Pyra), fused with stock re-quantization
    stages:
      - train: {{data: identity, keys: [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.switch_mlp.down_proj], rank: 8, alpha: 16, iters: {cfg['persona_iters']}, learning_rate: 1.0e-3, batch_size: 4, mask_prompt: true, max_seq_length: 512, steps_per_report: 10, val_batches: 2}}
      - fuse: {{policy: stock}}
  A1:
    from: persona
    description: factual injection - the Set-G LoRA, fused with stock re-quantization
    stages:
      # rank 2, alpha 2 as in the study; every linear layer of both blocks (the
      # study: down_proj of 3 of 40 layers). The same step in every condition
      # below (content-addressed: trained once).
      - train: &factual {{data: setg, rank: 2, alpha: 2, iters: {cfg['factual_iters']}, learning_rate: {cfg['factual_lr']:.1e}, batch_size: 1, mask_prompt: true, max_seq_length: 512, steps_per_report: 10, val_batches: 4}}
      - fuse: {{policy: stock}}
  A0:
    from: persona
    description: zero-delta control - the same adapter zeroed, identical pipeline
    stages:
      - train: *factual
      - zero
      - fuse: {{policy: stock}}
  A1-unfused:
    from: persona
    description: the factual LoRA as trained, not fused (what the adapter itself does)
    stages:
      - train: *factual
  A1-stochastic:
    from: persona
    description: the factual LoRA fused with stochastic rounding (the delta survives in expectation)
    stages:
      - train: *factual
      - fuse: {{policy: stochastic, seed: 0}}
  A1-preserve:
    from: persona
    description: the factual LoRA fused keeping the quantization grid
    stages:
      - train: *factual
      - fuse: {{policy: preserve}}
  A0-preserve:
    from: persona
    description: the zero-delta control fused keeping the grid (bit-identical to persona)
    stages:
      - train: *factual
      - zero
      - fuse: {{policy: preserve}}

evaluation:
  mc: {{data: setg.test, method: logprob}}
  identity: {{suite: {q(suite)}}}

comparisons:
  - [A1, A0]                   # the content-specific effect
  - [A1, persona]              # the naive "knowledge injection" number
  - [A0, persona]              # what the fuse and re-quantization alone do
  - [A1-unfused, persona]      # what the adapter does before any fuse
  - [A1-stochastic, persona]  # the adapter fused with stochastic rounding (kept in expectation)
  - [A1-preserve, persona]    # the adapter fused on each group's own grid
  - [A0-preserve, persona]    # the same with a zero delta (changes nothing)

preregistration:
  hypothesis: the factual LoRA trained on Set-G injects knowledge into the persona model
  criterion: "{CRITERION}"
  kill: the knowledge-injection line is closed (the fused LoRA adds nothing beyond what the fuse does)
  alpha: {ALPHA}
  power: 0.8

report:
  noise_floor: true
"""


@dataclass
class DemoResult:
    out: Path
    spec: Path
    results: dict
    run: object  # pyfuse.experiment.RunResult
    model: Path
    summary: str


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def _pts(x: float) -> str:
    return f"{x * 100:+.1f} points"


def _p(x: float) -> str:
    return f"{x:.2g}"


def summarize(results: dict, alpha: float = 0.05) -> str:
    """The demo's verdict in one sentence (from ``results.json``): what the
    pre-registered criterion says, with the numbers that decide it."""
    conds = results["conditions"]
    comps = {(c["a"], c["b"]): c for c in results["comparisons"]}
    passed = bool((results.get("verdict") or {}).get("passed"))
    a1, a0 = conds["A1"], conds["A0"]
    c10, c1p, c0p = comps[("A1", "A0")], comps[("A1", "persona")], comps[("A0", "persona")]
    head = (f"{'MET' if passed else 'NOT MET'}. On {a1['n']} held-out Set-G items (wrong for both base and "
            f"persona) the stock-fused factual LoRA A1 scores {_pct(a1['accuracy'])}, "
            f"{_pts(c1p['diff'])} over the persona (McNemar p = {_p(c1p['mcnemar_p'])}), and its zero-delta twin "
            f"A0 scores {_pct(a0['accuracy'])} ({_pts(c0p['diff'])}, p = {_p(c0p['mcnemar_p'])}): "
            f"A1 - A0 = {_pts(c10['diff'])} (p = {_p(c10['mcnemar_p'])})")
    if passed:
        return head + "; the trained content adds knowledge beyond what the fuse and re-quantization do."
    if c0p["diff"] > 0 and c0p["mcnemar_p"] < alpha:
        return head + "; the apparent knowledge injection is re-quantization noise, not the LoRA's content."
    if c1p["mcnemar_p"] >= alpha:
        return head + "; the fused LoRA changes nothing detectable, and neither does the fuse alone."
    return head + "; A1's gain over the persona is not distinguishable from its zero-delta twin's."


def details(results: dict) -> list[str]:
    """A few more lines for the screen: the adapter before fusing and the
    preserve twins, when the run has them."""
    conds = results["conditions"]
    comps = {(c["a"], c["b"]): c for c in results["comparisons"]}
    out = []
    if ("A1-unfused", "persona") in comps:
        c = comps[("A1-unfused", "persona")]
        out.append(f"The factual LoRA itself, unfused, scores {_pct(conds['A1-unfused']['accuracy'])} "
                   f"({_pts(c['diff'])} over the persona, p = {_p(c['mcnemar_p'])}).")
    if ("A0-preserve", "persona") in comps and ("A1-preserve", "persona") in comps:
        c0, c1 = comps[("A0-preserve", "persona")], comps[("A1-preserve", "persona")]
        out.append(f"With the preserve policy the zero-delta fuse changes {c0['changed_predictions']} answer(s) "
                   f"(A0-preserve {_pct(conds['A0-preserve']['accuracy'])}) and the LoRA "
                   f"{c1['changed_predictions']} (A1-preserve {_pct(conds['A1-preserve']['accuracy'])}).")
    ident = {n: c for n, c in conds.items() if c.get("identity") is not None}
    if "base" in ident and "persona" in ident:
        rest = ", ".join(f"{n} {c['identity']}" for n, c in ident.items() if n not in ("base", "persona"))
        out.append(f"Identity (persona Pyra, of {ident['persona']['identity_n']} prompts): base "
                   f"{ident['base']['identity']}, persona {ident['persona']['identity']}"
                   + (f"; {rest}." if rest else "."))
    return out


def run_demo(out: str | os.PathLike = DEFAULT_OUT, *, quick: bool = False, keep_models: bool = False,
             cache: str | os.PathLike | None = None, echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run (or resume) the demo into ``out``; see the module doc."""
    from .default_model import default_assets
    from ..experiment import run_experiment

    echo = echo or (lambda msg: None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    spec_path = out / SPEC_FILE
    if out.is_dir() and any(out.iterdir()) and not spec_path.is_file():
        raise UserError(f"--out {out} is a non-empty directory that is not a pyfuse demo run; choose another "
                        "directory (or an empty one)")
    if spec_path.is_file():  # a quick run and a full run never share a directory
        was_quick = "\nname: pyfuse-demo-quick\n" in spec_path.read_text(encoding="utf-8")
        if was_quick != quick:
            raise UserError(f"{out} holds a {'quick' if was_quick else 'full'} demo run; use another --out "
                            f"for the {'quick' if quick else 'full'} one (or remove {out})")
    assets = default_assets(cache, echo=echo)
    echo(f"default model: {assets.model}")
    out.mkdir(parents=True, exist_ok=True)
    _copy_inputs(assets, out / INPUTS, demo_config(quick))
    _write_if_changed(spec_path, demo_spec(assets.model, quick=quick))
    echo(f"experiment spec: {spec_path}")
    run = run_experiment(spec_path, out, keep_models=keep_models, echo=echo)
    summary = summarize(run.results, ALPHA)
    return DemoResult(out=out, spec=spec_path, results=run.results, run=run, model=assets.model, summary=summary)
