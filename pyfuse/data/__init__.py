"""Data files shipped with pyfuse (read them with ``importlib.resources``).

* ``identity_suite.yaml``: the default identity-consistency suite template
  of ``pyfuse eval identity`` (see :mod:`pyfuse.evals.identity`)."""
