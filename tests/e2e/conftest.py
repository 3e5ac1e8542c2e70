"""End-to-end tests: whole pipelines (the demo, the default model's build,
experiments, training) on tiny models. Every test here is marked ``slow``,
so ``python -m pytest -m "not slow"`` is the fast inner loop."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
