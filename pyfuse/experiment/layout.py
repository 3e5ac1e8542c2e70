"""The run directory: the names of its files and folders, in one place.

    DIR/
      .lock                  flock: one run per directory at a time
      prereg.json            the pre-registration lock (:mod:`.prereg`)
      spec.yaml              a copy of the spec that was run
      plan.json              the steps of the current spec (:mod:`.plan`)
      run.log.jsonl          one JSON object per event: start, step timings, failures, prunes, finish
      steps/
        <kind>-<key12>/      a finished step (published by one atomic rename)
          done.json          written last: kind, key, options, inputs, summary, seconds, and the
                             size and SHA-256 of every output file (:mod:`.outputs`)
          pruned.json        its fused model was removed (no pending step needed it)
          ...                its outputs (see :mod:`.steps`)
        .tmp-<kind>-<key12>-<pid>-<random>/   a step being run (removed at the next start)
        .<kind>-<key12>.pyfuse-tmp-old-<pid>/   a pruned step being replaced (likewise)
      results.json           (:mod:`.results`)
      report.md, *.png       (:mod:`.report`)
"""

from __future__ import annotations

from pathlib import Path

DIR_LOCK = ".lock"
LOCK_FILE = "prereg.json"
SPEC_COPY = "spec.yaml"
PLAN_FILE = "plan.json"
LOG_FILE = "run.log.jsonl"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"

STEPS_DIR = "steps"
DONE = "done.json"
PRUNED = "pruned.json"
TMP_PREFIX = ".tmp-"

# A step's outputs (inside its directory)
ADAPTER = "adapter"                # train, zero, placebo, dither
MODEL = "model"                    # fuse; train with fine_tune_type full
FUSE_REPORT = "fuse_report.json"   # fuse
HESSIANS = "hessians"              # calibrate: hessians.safetensors + hessians.json (pyfuse.calibration.store)
ROWS = "rows.jsonl"                # eval-mc, eval-identity, eval-persona: one row per item / prompt
SUMMARY = "summary.json"           # eval-mc, eval-identity, eval-persona, pairs
SETG_DATA = "data"                 # setg: train/valid/test.jsonl, items.json, counts.json
SETG_ITEMS = "items"               # setg: <split>.jsonl, the MMLU-Pro rows of each split
NOISE_FLOOR = "noise_floor.json"   # noise-floor
PAIRS_DATA = "data"                # pairs: train.jsonl [+ valid.jsonl] of DPO pairs


def step_dir(out: Path, dirname: str) -> Path:
    """The directory of the finished step ``dirname`` in the run directory ``out``."""
    return Path(out) / STEPS_DIR / dirname
