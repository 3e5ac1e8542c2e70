"""Experiment control: declarative specs, zero-delta controls, stacking,
pre-registration, resumable runs and reports.

* :mod:`.spec`: the YAML spec, validated (field-named errors);
* :mod:`.criterion`: the pre-registered criterion's grammar, evaluated exactly;
* :mod:`.prereg`: the SHA-256 lock, the split seed, power warnings;
* :mod:`.engine`: the content-addressed step DAG and the resumable run;
* :mod:`.steps`: what each step kind calls (train, zero, fuse, evals, Set-G, noise floor);
* :mod:`.results`: ``results.json`` and the verdict;
* :mod:`.report`: ``report.md`` and its plots.

    from pyfuse.experiment import load_spec, run_experiment, write_report
    run_experiment("examples/stacking-confound.yaml", "runs/confound")
"""

from .criterion import CriterionError, parse as parse_criterion
from .engine import RunResult, build_plan, fingerprint, run_experiment
from .prereg import prereg_document
from .report import write_report
from .results import assemble_results, load_results
from .spec import Spec, SpecError, load_spec, missing_paths

__all__ = ["CriterionError", "RunResult", "Spec", "SpecError", "assemble_results", "build_plan",
           "fingerprint", "load_results", "load_spec", "missing_paths", "parse_criterion",
           "prereg_document", "run_experiment", "write_report"]
