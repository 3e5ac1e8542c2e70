"""The demo (``pyfuse demo``): the embedded default model built in code
(:mod:`.default_model`, :mod:`.tiny_model`), its synthetic data
(:mod:`.data`) and the stacking-confound study run on it (:mod:`.run`).
The library never imports this package; tests and the CLI do."""
