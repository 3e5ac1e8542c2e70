"""Experiment control: declarative specs, zero-delta controls, stacking,
pre-registration, resumable runs and reports. The path of an experiment
through the modules: spec -> plan -> steps -> results -> report.

* :mod:`.spec`: the YAML spec's schema; :mod:`.resolve`: the spec resolved (stages expanded, defaults
  merged, the members of seeded conditions);
* :mod:`.load`: reading a spec file (YAML, field-named errors); :mod:`.validate`: the cross-checks;
* :mod:`.criterion`: the pre-registered criterion's grammar, evaluated exactly;
* :mod:`.power`: power before data (predicted n, unpaired and paired MDE);
* :mod:`.prereg`: the SHA-256 lock (criterion, design, power, data hashes), the split seed;
* :mod:`.plan`: the content-addressed step DAG;
* :mod:`.steps`: what each step kind calls (train, zero, placebo, dither, fuse, evals, Set-G, noise floor);
* :mod:`.runner`: the resumable run (locking, publishing, pruning, the log); :mod:`.outputs`: each step's
  recorded output hashes, checked on resume; :mod:`.estimate`: its time estimates;
* :mod:`.layout`: the names of the run directory's files;
* :mod:`.results`: ``results.json`` and the verdict; :mod:`.analysis`: comparisons, the Holm family, null
  distributions, flips by margin, the decomposition;
* :mod:`.report`: ``report.md`` (:mod:`.report_analysis`: its analysis sections); :mod:`.plots`: its figures.

    from pyfuse.experiment import load_spec, run_experiment, write_report
    run_experiment("examples/stacking-confound.yaml", "runs/confound")
"""

from .criterion import CriterionError, parse as parse_criterion
from .load import load_spec
from .plan import build_plan, fingerprint
from .prereg import prereg_document
from .report import write_report
from .results import assemble_results, load_results
from .runner import RunResult, run_experiment
from .spec import Spec, SpecError
from .validate import missing_paths

__all__ = ["CriterionError", "RunResult", "Spec", "SpecError", "assemble_results", "build_plan",
           "fingerprint", "load_results", "load_spec", "missing_paths", "parse_criterion",
           "prereg_document", "run_experiment", "write_report"]
