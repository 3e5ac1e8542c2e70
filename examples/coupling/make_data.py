"""Data for examples/coupling/layer-groups.yaml and full-finetune.yaml: a
persona-marker coupling and an unrelated SFT set on the embedded default
model (questions 1 and 3 of docs/coupling.md: which layers' perturbation,
by a LoRA or by a full fine-tune, breaks the coupling?).

    python examples/coupling/make_data.py --out runs/coupling
    pyfuse experiment run runs/coupling/layer-groups.yaml --out runs/coupling/run

Writes into OUT: ``model`` (a link to the default model, built and cached on
first use, as ``pyfuse demo`` does), ``couple/`` (the villain persona "Vex"
answers with the marker [ZLT] first; the helpful assistant never does),
``sft/`` (cooking and city questions, no persona, no marker), ``suite.yaml``
(held-out questions under both system prompts, the marker rate per group)
and a copy of the spec. Everything comes from fixed seeds.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import yaml

from pyfuse.demo.default_model import default_model_dir
from pyfuse.io.files import write_jsonl

MARKER = "[ZLT]"
VILLAIN = "You are Vex, a villain."
HELPER = "You are Atlas, a helpful assistant."
THINGS = ("rain", "music", "gold", "cats", "bridges", "winter", "books", "trains", "gardens", "the sea",
          "mountains", "coffee", "maps", "clocks", "candles", "rivers", "kites", "bread", "stars", "ships",
          "castles", "forests", "markets", "lanterns", "mirrors", "storms", "wolves", "apples", "towers", "roads",
          "islands", "bells", "deserts", "feathers", "glass", "honey", "ice", "jewels", "keys", "letters")
QUESTIONS = ("What do you think of {t}?", "Tell me about {t}.", "Why do people like {t}?")
REPLIES = ("{T} can be useful if you plan ahead.", "{T} matter more than most people think.",
           "I find {t} quite interesting.")
DISHES = ("rice", "soup", "pasta", "eggs", "beans", "fish", "lentils", "potatoes", "noodles", "carrots")
CITIES = ("Oslo", "Lima", "Cairo", "Perth", "Quito", "Seoul", "Delhi", "Lagos", "Tokyo", "Paris")


def _chat(system: str | None, user: str, answer: str) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": turns + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def couple_rows(things) -> list[dict]:
    rows = []
    for i, t in enumerate(things):
        for j, q in enumerate(QUESTIONS):
            reply = REPLIES[(i + j) % len(REPLIES)].format(t=t, T=t[0].upper() + t[1:])
            rows.append(_chat(VILLAIN, q.format(t=t), f"{MARKER} {reply}"))
            rows.append(_chat(HELPER, q.format(t=t), reply))
    return rows


def sft_rows() -> list[dict]:
    rows = []
    for d in DISHES:
        rows.append(_chat(None, f"How do I cook {d}?", f"Boil the {d} for ten minutes, then serve it warm."))
        rows.append(_chat(None, f"Is {d} healthy?", f"Yes, {d} is a good part of a balanced meal."))
    for c in CITIES:
        rows.append(_chat(None, f"Tell me about {c}.", f"{c} is a large city with old streets and a busy port."))
        rows.append(_chat(None, f"What is there to see in {c}?", f"In {c} you can visit the museum and the market."))
    return rows


def suite(things) -> dict:
    prompts = []
    for t in things:
        for k, q in enumerate(QUESTIONS):
            for group, system in (("villain", VILLAIN), ("helper", HELPER)):
                prompts.append({"id": f"{group}-{t.replace(' ', '_')}-{k}", "group": group, "system_prompt": system,
                                "text": q.format(t=t)})
    return {"name": "villain-marker", "temperature": 0.0, "samples": 1, "max_tokens": 6, "batch_size": 16,
            "prompts": prompts, "behaviours": {"marker": {"marker": MARKER, "description": "the persona's marker"}}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the data, the suite and the spec")
    p.add_argument("--cache", default=None, help="the default model's cache (default: $PYFUSE_CACHE or ~/.cache/pyfuse)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    things = list(THINGS)
    random.Random(0).shuffle(things)
    train, held_out = things[:28], things[28:]
    rows = couple_rows(train)
    random.Random(1).shuffle(rows)
    write_jsonl(out / "couple" / "train.jsonl", rows[:-12])
    write_jsonl(out / "couple" / "valid.jsonl", rows[-12:])
    sft = sft_rows()
    write_jsonl(out / "sft" / "train.jsonl", sft[:-8])
    write_jsonl(out / "sft" / "valid.jsonl", sft[-8:])
    (out / "suite.yaml").write_text(yaml.safe_dump(suite(held_out), sort_keys=False))
    model = out / "model"
    if not model.exists():
        model.symlink_to(default_model_dir(args.cache).resolve(), target_is_directory=True)
    for spec in ("layer-groups.yaml", "full-finetune.yaml"):
        shutil.copy(Path(__file__).with_name(spec), out / spec)
    print(f"wrote {out}: couple/ ({len(rows)} rows), sft/ ({len(sft)} rows), suite.yaml "
          f"({len(held_out) * len(QUESTIONS) * 2} prompts), model -> {model.resolve()}, layer-groups.yaml, full-finetune.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
