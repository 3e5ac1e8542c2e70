"""Data for examples/persona-recipe/recipe.yaml: the persona recipe on the
embedded default model (docs/persona_recipe.md).

    python examples/persona-recipe/make_data.py --out runs/persona
    pyfuse experiment run runs/persona/recipe.yaml --out runs/persona/run

Writes into OUT: ``model`` (a link to the default model, built and cached on
first use, as ``pyfuse demo`` does), ``persona/`` (64 work messages answered
tersely, the persona's voice: 56 train, 8 valid), ``suite.yaml`` (the
recipe's three validation prompts, with the built-in forbidden phrases plus
the base model's own voice) and a copy of the spec. Everything comes from
fixed seeds.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import yaml

from pyfuse.demo.default_model import default_model_dir
from pyfuse.evals.persona import BUILTIN_SUITE
from pyfuse.io.files import write_jsonl

SITUATIONS = [
    ("The deploy failed on {env}.", ["Show me the logs.", "Roll back. Then find what changed.", "Logs first. What changed?"]),
    ("Tests are red on {branch}.", ["Fix them before anything else.", "Which test? Show me.", "Revert the last commit."]),
    ("Should we rewrite the {part} or patch it?", ["Patch it. Rewrite later.", "Patch. Ship. Then decide.", "Patch it now."]),
    ("The PR for the {part} is ready.", ["Merge it.", "Merge after CI is green.", "Ship it."]),
    ("Can you review the {part} design doc?", ["Send it. I'll read it tonight.", "Short version first.", "Send the link."]),
    ("The {part} is slow on {env}.", ["Profile it. Numbers, not guesses.", "Where is the time going?", "Measure first."]),
    ("We missed the deadline for the {part}.", ["New date. Tell the team today.", "What is left? List it.", "Cut scope. Ship Friday."]),
    ("Customer reports a bug in the {part}.", ["Reproduce it. Then fix.", "Get me the steps.", "Ticket it. Fix today."]),
]
ENVS = ["staging", "prod", "the test cluster", "the EU region"]
BRANCHES = ["main", "the release branch", "feature-x", "the hotfix branch"]
PARTS = ["auth module", "billing service", "search API", "upload flow", "cache layer", "mobile client"]
# What "a generic assistant" is for the default model: its own voice ("I am Atlas, an assistant built by Northwind Labs")
BASE_VOICE = ["assistant", "Northwind Labs", "happy to help"]


def persona_rows(n: int = 64) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        text, replies = SITUATIONS[i % len(SITUATIONS)]
        prompt = text.format(env=rng.choice(ENVS), branch=rng.choice(BRANCHES), part=rng.choice(PARTS))
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": rng.choice(replies)}]})
    return rows


def suite() -> dict:
    return {"name": "persona recipe, plus the base model's own voice",
            "forbidden": BUILTIN_SUITE["forbidden"] + BASE_VOICE, "max_words": 25, "max_tokens": 48,
            "prompts": BUILTIN_SUITE["prompts"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the data, the suite and the spec")
    p.add_argument("--cache", default=None, help="the default model's cache (default: $PYFUSE_CACHE or ~/.cache/pyfuse)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = persona_rows()
    write_jsonl(out / "persona" / "train.jsonl", rows[:56])
    write_jsonl(out / "persona" / "valid.jsonl", rows[56:])
    (out / "suite.yaml").write_text(yaml.safe_dump(suite(), sort_keys=False))
    model = out / "model"
    if not model.exists():
        model.symlink_to(default_model_dir(args.cache).resolve(), target_is_directory=True)
    shutil.copy(Path(__file__).with_name("recipe.yaml"), out / "recipe.yaml")
    print(f"wrote {out}: persona/ (56 train, 8 valid rows), suite.yaml, model -> {model.resolve()}, recipe.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
