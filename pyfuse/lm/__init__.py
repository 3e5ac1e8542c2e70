"""Language-model use: loading an mlx-lm model for inference (one compute-dtype
policy), the one chat renderer, batched greedy generation and the one
multiple-choice scorer.

``load`` -> ``chat`` -> ``generate`` (``pyfuse eval``) or ``scorer``
(``pyfuse eval mc --method logprob``, the noise floor's MC flips, and the
experiments through :mod:`pyfuse.evals.mc`).

Kept import-light on purpose: import the submodule you need."""
