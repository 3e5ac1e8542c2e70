"""What the subcommand modules share: flags that mean the same in every
command, comma-separated list values, the rich consoles and warning lines.

Each ``add_*`` takes the part of the help text that differs between
commands, so that a flag is spelled, typed and defaulted in one place.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable

from ..errors import UserError


# -- values -----------------------------------------------------------------------------


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (an argparse ``type=``)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def checked_list(text: str, flag: str, cast: Callable = str) -> list:
    """A non-empty comma-separated list of ``cast`` values, or a one-line
    UserError naming ``flag``."""
    items = comma_list(text)
    if not items:
        raise UserError(f"{flag}: empty list")
    if cast is str:
        return items
    out = []
    for t in items:
        try:
            out.append(cast(t))
        except ValueError:
            raise UserError(f"{flag}: {t!r} is not {'an integer' if cast is int else 'valid'}") from None
    return out


class Default(str):
    """A flag's default value (``default=Default("x")``): argparse keeps the
    object, so a command tells it apart from the same value given explicitly
    (:func:`given`)."""


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether ``dest`` was set on the command line (its default is a :class:`Default`)."""
    return not isinstance(getattr(args, dest), Default)


# -- flags ------------------------------------------------------------------------------


def add_model(p: argparse.ArgumentParser, help: str = "the mlx-lm model directory", **kwargs) -> None:
    """``--model`` (required unless a ``default`` is given)."""
    kwargs.setdefault("required", "default" not in kwargs)
    p.add_argument("--model", help=help, **kwargs)


def add_out(p: argparse.ArgumentParser, help: str, *, default: str | None = None, required: bool = False,
            metavar: str = "DIR") -> None:
    """``--out``: where the command writes."""
    p.add_argument("--out", default=default, required=required, metavar=metavar, help=help)


def add_seed(p: argparse.ArgumentParser, what: str) -> None:
    """``--seed`` (default 0); ``what`` it seeds."""
    p.add_argument("--seed", type=int, default=0, help=f"{what} (default: 0)")


def add_quiet(p: argparse.ArgumentParser, help: str) -> None:
    """``--quiet``; ``help`` says what is left out."""
    p.add_argument("--quiet", action="store_true", help=help)


def add_force(p: argparse.ArgumentParser, flag: str) -> None:
    """``--force``: replace an existing output (``flag`` names it)."""
    p.add_argument("--force", action="store_true", help=f"replace an existing {flag}")


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print the result as JSON instead of a table."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


# -- output -----------------------------------------------------------------------------


def console(*, stderr: bool = False, min_width: int | None = None):
    """A rich console that prints text as it is (no markup, no
    highlighting: names and paths may hold ``[``), on stderr with
    ``stderr`` (soft-wrapped, for progress lines), at least ``min_width``
    columns wide (tables must not wrap in narrow terminals or pipes)."""
    from rich.console import Console

    if stderr:
        return Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
    if min_width is None:
        return Console(markup=False, highlight=False)
    return Console(markup=False, highlight=False, width=max(min_width, Console().width))


def print_warnings(prog: str, warnings: Iterable[str], label: str = "warning") -> None:
    """``pyfuse CMD: warning: ...`` on stderr, one line each."""
    for w in warnings:
        print(f"{prog}: {label}: {w}", file=sys.stderr)
