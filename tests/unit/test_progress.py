"""pyfuse.progress: a bar opened inside another stays silent (rich shows one
live display at a time and raises otherwise), as inside
``pyfuse fuse --compare-policies``, whose fuses open their own bars."""

from __future__ import annotations

from rich.progress import Progress

from pyfuse import progress


def test_a_bar_inside_another_is_silent(monkeypatch):
    monkeypatch.setenv("PYFUSE_PROGRESS", "1")
    with progress.progress_bar() as outer:
        assert isinstance(outer, Progress)
        with progress.progress_bar() as inner:
            assert not isinstance(inner, Progress)
            inner.advance(inner.add_task("inner", total=1))
        assert list(progress.track([1, 2], "inner")) == [1, 2]
    with progress.progress_bar() as again:  # closed bars are forgotten
        assert isinstance(again, Progress)
