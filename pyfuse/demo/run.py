"""``pyfuse demo``: the stacking-confound experiment, end to end, on the
embedded default model (:mod:`pyfuse.demo.default_model`).

:func:`run_demo` gets the default model and its data (built once, cached),
copies the data into ``OUT/inputs/``, writes the experiment spec
``OUT/demo.yaml`` (:func:`demo_spec`: an ordinary spec for ``pyfuse
experiment``, with comments) and runs it with :func:`pyfuse.experiment.run_experiment`
into ``OUT``: ``results.json``, ``report.md`` and its plots. A rerun on the
same ``OUT`` resumes (finished steps are skipped).

The design is the study's (examples/stacking-confound.yaml), scaled down,
with every control pyfuse has (docs/demo.md walks through a run):

* ``base``: the default model (3-bit, group size 64);
* ``persona``: base + an identity LoRA (persona "Pyra") fused with the stock
  re-quantization, as ``mlx_lm fuse`` does;
* Set-G: the rows that both base and persona answer wrong (log-probability
  method), split 70/30 by category into train / test, a tenth of train
  carved out for validation (mined with the models of the conditions
  ``base`` and ``persona``, which are then scored on Set-G test like every
  other condition);
* ``A1``: persona + a factual LoRA trained on Set-G train (rank 2, alpha 2,
  every linear layer of the two blocks), fused with stock re-quantization;
* ``A0``: its zero-delta twin (every learned delta zeroed) through the
  identical pipeline;
* ``A1-preserve`` / ``A0-preserve``: the same two fused with the
  ``preserve`` policy (the quantization grid is kept; a zero delta changes no
  bit);
* ``A1-unfused`` (the adapter loaded, not fused) and ``A1-stochastic`` (fused
  with stochastic rounding): what the adapter itself does;
* ``A1-faithful`` / ``A0-faithful``: the faithful fuse (docs/faithful_fuse.md):
  the base moved exactly onto an 8-bit grid (``requant_bits: 8``), codes
  chosen by calibrated error-feedback rounding on ``X^T X`` of the Set-G
  training rows (``calibration: setg``; held-out sequences are taken inside
  :mod:`pyfuse.calibration`); the zero-delta twin changes no weight. The
  stock, preserve and stochastic fuses of the trained adapter get the same
  calibration data for their reports' output error only;
* ``placebo`` (K seeds): the trained adapter's singular values on random
  directions, fused like A1; ``dithered`` (K seeds): A0's fuse with
  stochastic rounding on the stock grid: the null distributions of "an
  adapter of this size" and of "the fuse's noise";
* evaluations: multiple choice (``logprob``) on Set-G test and on
  ``general``, a stratified sample of the rows (``pyfuse setg mine``), and
  the identity suite; the noise floor of every fuse setting;
* the pre-registered criterion ``diff(A1, A0) >= 5pp and mcnemar_p(A1, A0) <
  0.05``, its p value Holm-adjusted in a declared family of five tests (the
  decomposition's), with the power of the design printed and locked before
  any model runs (under-powered, allowed with the reason).

``quick=True`` is a reduced configuration (fewer rows, a shorter identity
suite, fewer training steps, 3 seeds) for tests; it runs the same steps.
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
    "general_per_category": 5,  # the second dataset: 70 rows, a stratified sample
    "identity_prompts": None,  # the whole 20-prompt suite
    "persona_iters": 80,
    "factual_iters": 100,
    "factual_lr": 1e-4,
    "seeds": 8,  # members of each null distribution (placebo, dithered)
}
QUICK = {
    "per_category": 14,
    "general_per_category": 2,
    "identity_prompts": 6,
    "persona_iters": 40,
    "factual_iters": 30,
    "factual_lr": 1e-4,
    "seeds": 3,
}
EXPECTED_BOTH_WRONG = 0.4  # the default model: 679 of 1,680 rows wrong for both base and persona


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
    general = _general_rows(rows, cfg["general_per_category"])
    suite = yaml.safe_load(assets.identity_suite.read_text(encoding="utf-8"))
    if cfg["identity_prompts"] is not None:
        suite["prompts"] = suite["prompts"][:cfg["identity_prompts"]]
    files = {
        "mmlu.jsonl": jsonl_text(rows),
        "general.jsonl": jsonl_text(general),
        "identity_suite.yaml": ("# The demo's identity suite (persona Pyra; the base model calls itself Atlas,\n"
                                "# made by Northwind Labs): pyfuse's template with these names.\n"
                                + yaml.safe_dump(suite, sort_keys=False, allow_unicode=True)),
        "identity/train.jsonl": (assets.identity_data / "train.jsonl").read_text(encoding="utf-8"),
        "identity/valid.jsonl": (assets.identity_data / "valid.jsonl").read_text(encoding="utf-8"),
    }
    for name, text in files.items():
        _write_if_changed(dest / name, text)
    return {"mmlu": dest / "mmlu.jsonl", "general": dest / "general.jsonl", "identity": dest / "identity",
            "identity_suite": dest / "identity_suite.yaml"}


def _general_rows(rows: list[dict], per_category: int) -> list[dict]:
    """The second dataset: ``per_category`` rows of each category, drawn by
    pyfuse's stratified sampler (what ``pyfuse setg mine --allocation equal``
    does to a file)."""
    from ..data.mmlu import MCItem
    from ..data.sampler import choose

    items = [MCItem.model_validate(r) for r in rows]
    n = per_category * len({it.category for it in items})
    return [rows[i] for i in choose(items, n, seed=0, allocation="equal")]


def demo_spec(model: str | os.PathLike, *, mmlu: str = f"{INPUTS}/mmlu.jsonl",
              general: str = f"{INPUTS}/general.jsonl", identity: str = f"{INPUTS}/identity",
              suite: str = f"{INPUTS}/identity_suite.yaml", quick: bool = False) -> str:
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
# delta set to zero, fused through the identical pipeline; the null
# distributions (placebo, dithered) show what an adapter of the same size, and
# the fuse's own noise, do by chance.
version: 1
name: pyfuse-demo{'-quick' if quick else ''}
seed: 0

models:
  tiny-moe: {q(str(model))}   # qwen3_moe, 2 layers x 8 experts, 3-bit g64 (pyfuse.demo.default_model)

data:
  mmlu: {q(mmlu)}               # synthetic MMLU-Pro rows, 14 categories
  general: {q(general)}         # {cfg['general_per_category']} rows per category of them (pyfuse's stratified sampler)
  identity: {q(identity)}       # mlx-lm chat data that teaches the persona "Pyra"

setg:                      # evaluate base and persona on `mmlu`, keep the rows both get wrong
  data: mmlu
  base: base
  persona: persona
  method: logprob
  split: {{train: 0.7, test: 0.3}}   # stratified by category (the study's 70/30)
  valid_frac: 0.1                   # a tenth of train carved out for the validation loss
  expected_both_wrong: {EXPECTED_BOTH_WRONG}         # predicts the test n before any model runs

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
      - fuse: {{policy: stock, calibration: setg}}   # calibration: for the report's output error only
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
      - fuse: {{policy: stochastic, seed: 0, calibration: setg}}
  A1-preserve:
    from: persona
    description: the factual LoRA fused keeping the quantization grid
    stages:
      - train: *factual
      - fuse: {{policy: preserve, calibration: setg}}
  A0-preserve:
    from: persona
    description: the zero-delta control fused keeping the grid (bit-identical to persona)
    stages:
      - train: *factual
      - zero
      - fuse: {{policy: preserve}}
  A1-faithful:
    from: persona
    evaluate: [mc]
    description: the factual LoRA fused faithfully - the base moved exactly onto an 8-bit grid, codes chosen by error-feedback rounding on X^T X of the Set-G training rows
    stages:
      - train: *factual
      - fuse: &faithful {{policy: calibrated, requant_bits: 8, calibration: setg}}
  A0-faithful:
    from: persona
    evaluate: [mc]
    description: the zero-delta control through the identical faithful fuse (every dequantized weight as in persona)
    stages:
      - train: *factual
      - zero
      - fuse: *faithful
  placebo:
    from: persona
    seeds: {cfg['seeds']}                   # members placebo.0 .. placebo.{cfg['seeds'] - 1}
    evaluate: [mc]
    description: the factual LoRA's singular values on random directions (its size, no content), fused like A1
    stages:
      - train: *factual
      - placebo
      - fuse: {{policy: stock}}
  dithered:
    from: persona
    seeds: {cfg['seeds']}
    evaluate: [mc]
    description: A0's fuse with stochastic rounding on the stock grid (draws of the fuse's noise, no delta)
    stages:
      - train: *factual
      - zero
      - fuse: {{policy: stock, dither: true}}

evaluation:
  mc:
    - {{data: setg.test, method: logprob}}   # the primary dataset (the criterion's)
    - {{data: general, method: logprob}}     # items of every kind: what the fuses do to the rest
  identity: {{suite: {q(suite)}}}

analysis:                      # the decomposition and the null distributions of the report
  trained: A1
  zero: A0
  reference: persona
  unfused: A1-unfused
  placebo: placebo
  dithered: dithered

comparisons:
  - [A1, A0]                   # the content-specific effect
  - [A1, persona]              # the naive "knowledge injection" number
  - [A0, persona]              # what the fuse and re-quantization alone do
  - [A1-unfused, persona]      # what the adapter does before any fuse
  - [A1-stochastic, persona]  # the adapter fused with stochastic rounding (kept in expectation)
  - [A1-preserve, persona]    # the adapter fused on each group's own grid
  - [A0-preserve, persona]    # the same with a zero delta (changes nothing)
  - [A1-faithful, persona]    # refined to 8 bits + calibrated rounding: the adapter's effect kept
  - [A0-faithful, persona]    # the same with a zero delta (changes nothing)

preregistration:
  hypothesis: the factual LoRA trained on Set-G injects knowledge into the persona model
  criterion: "{CRITERION}"
  kill: the knowledge-injection line is closed (the fused LoRA adds nothing beyond what the fuse does)
  family:                      # Holm-adjusted together: the decomposition's tests
    - mcnemar_p(A0, persona)   # the fuse effect
    - mcnemar_p(A1, A0)        # the content effect (the criterion reads its adjusted p)
    - null_p(A1, placebo)      # the content effect against adapters of the same size
    - null_p(A0, dithered)     # the zero-delta fuse against draws of the fuse's noise
    - mcnemar_p(A1, A1-unfused)  # fused vs applied at run time
  alpha: {ALPHA}
  power: 0.8
  baseline_accuracy: 0.05      # expected accuracy of the control A0 on Set-G test
  expected_discordance: 0.1    # expected share of items answered right by one of A1, A0 only (the noise
                               # floor's MC flips say ~0.1 for this model's zero-delta stock fuse)
  allow_underpowered: true
  underpowered_reason: >-
    a demonstration on a tiny model with about 200 test items; the power table shows what a real
    study needs (pyfuse stats mde / paired)

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


def _primary_comparisons(results: dict) -> dict:
    primary = (results.get("datasets") or [None])[0]
    return {(c["a"], c["b"]): c for c in results["comparisons"] if c.get("dataset", primary) == primary}


def summarize(results: dict, alpha: float = 0.05) -> str:
    """The demo's verdict in one sentence (from ``results.json``): what the
    pre-registered criterion says, with the numbers that decide it."""
    conds = results["conditions"]
    comps = _primary_comparisons(results)
    passed = bool((results.get("verdict") or {}).get("passed"))
    a1, a0 = conds["A1"], conds["A0"]
    c10, c1p, c0p = comps[("A1", "A0")], comps[("A1", "persona")], comps[("A0", "persona")]
    adjusted = c10.get("mcnemar_p_holm")
    head = (f"{'MET' if passed else 'NOT MET'}. On {a1['n']} held-out Set-G items (wrong for both base and "
            f"persona) the stock-fused factual LoRA A1 scores {_pct(a1['accuracy'])}, "
            f"{_pts(c1p['diff'])} over the persona (McNemar p = {_p(c1p['mcnemar_p'])}), and its zero-delta twin "
            f"A0 scores {_pct(a0['accuracy'])} ({_pts(c0p['diff'])}, p = {_p(c0p['mcnemar_p'])}): "
            f"A1 - A0 = {_pts(c10['diff'])} (p = {_p(c10['mcnemar_p'])}"
            + (f", Holm-adjusted {_p(adjusted)} in a family of {len(results.get('family') or [])})"
               if adjusted is not None else ")"))
    if passed:
        return head + "; the trained content adds knowledge beyond what the fuse and re-quantization do."
    if c0p["diff"] > 0 and c0p["mcnemar_p"] < alpha:
        return head + "; the apparent knowledge injection is re-quantization noise, not the LoRA's content."
    if c1p["mcnemar_p"] >= alpha:
        return head + "; the fused LoRA changes nothing detectable, and neither does the fuse alone."
    return head + "; A1's gain over the persona is not distinguishable from its zero-delta twin's."


def details(results: dict) -> list[str]:
    """A few more lines for the screen: the adapter before fusing, the
    preserve twins, the null distributions and the flips by margin, when
    the run has them."""
    conds = results["conditions"]
    comps = _primary_comparisons(results)
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
    out += _faithful_line(results)
    for role, fam in ((results.get("nulls") or {}).get("families") or {}).items():
        tested = "; ".join(f"{name} {_pts(t['gain'])} (empirical p = {_p(t['p_gain'])}), {t['changed']} changed "
                           f"(p = {_p(t['p_changed'])})" for name, t in fam["tested"].items())
        out.append(f"Against {len(fam['gain'])} {role} draws (gain {_pts(min(fam['gain']))} to "
                   f"{_pts(max(fam['gain']))}, {min(fam['changed'])}-{max(fam['changed'])} answers changed): {tested}.")
    flips = (results.get("flips") or {}).get("A1")
    if flips and flips.get("test"):
        t = flips["test"]
        out.append(f"A1 flips {flips['flipped']} of {flips['n']} answers of the persona; their median margin "
                   f"{t['median_flipped']:.3g} vs {t['median_unflipped']:.3g} (Mann-Whitney p = {_p(t['pvalue'])}).")
    ident = {n: c for n, c in conds.items() if c.get("identity") is not None}
    if "base" in ident and "persona" in ident:
        rest = ", ".join(f"{n} {c['identity']}" for n, c in ident.items() if n not in ("base", "persona"))
        out.append(f"Identity (persona Pyra, of {ident['persona']['identity_n']} prompts): base "
                   f"{ident['base']['identity']}, persona {ident['persona']['identity']}"
                   + (f"; {rest}." if rest else "."))
    return out


def _faithful_line(results: dict) -> list[str]:
    """The faithful fuse against the stock one, from the per-policy table."""
    rows = {r["condition"]: r for r in (results.get("policies") or {}).get("rows") or []}
    if "A1-faithful" not in rows or "A1" not in rows:
        return []
    f, a = rows["A1-faithful"], rows["A1"]

    def g(x):
        return "-" if x is None else f"{x:.3g}"

    return [f"The faithful fuse (refined to 8 bits, calibrated rounding) keeps {g(f['weight_retention'])} of the "
            f"delta (stock A1: {g(a['weight_retention'])}), output error {g(f['output_error'])} (A1: "
            f"{g(a['output_error'])}); it changes {f['changed_vs_unfused']} answer(s) against the unfused adapter "
            f"(A1: {a['changed_vs_unfused']}) and its zero-delta twin {f['twin_changed']} (A0: {a['twin_changed']}), "
            f"for {'-' if f['bytes_added'] is None else format(f['bytes_added'], ',')} more bytes."]


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
