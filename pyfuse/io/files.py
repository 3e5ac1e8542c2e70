"""File handling shared by every command: atomic writes (a reader sees the
old file or the new one, never half of one), saving plots, opening user files with one-line
errors, and SIGTERM turned into an exception so that cleanup runs."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UserError

# In the name of every temporary file or directory pyfuse creates next to an
# output (so that stale ones from a killed run are recognisable).
TMP_MARK = ".pyfuse-tmp-"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory
    and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the mode open() would
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure as PNG atomically (no timestamp metadata, so
    the same figure gives the same bytes)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png", metadata={"Software": None},
                    **savefig_kwargs)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


@contextmanager
def _reading(path: Path, expected: str):
    """Turn the errors of reading a user's file into one-line UserErrors."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected {expected}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def read_text(path: Path, expected: str) -> str:
    """A user's UTF-8 text file, or a one-line UserError."""
    with _reading(path, expected):
        return path.read_text(encoding="utf-8")


def open_text(path: Path, expected: str = "a JSON Lines file"):
    """Open a user's text file, or raise a one-line UserError."""
    with _reading(path, expected):
        return path.open(encoding="utf-8")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that temporary outputs are removed."""


@contextmanager
def sigterm_as_interrupt():
    """Within the block (main thread only), SIGTERM raises Terminated."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a temp dir it owns is not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_path_for(final: Path) -> Path:
    """A fresh temporary name next to ``final`` that carries this process's
    id (``.NAME.pyfuse-tmp-PID-RANDOM``), so that :func:`remove_stale_temps`
    can tell a killed run's leftovers from a running one's."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_temps(parent: Path, pattern: str) -> None:
    """Remove the temporary directories matching ``pattern`` (a glob) in
    ``parent`` whose process (the id after :data:`TMP_MARK`) no longer runs."""
    for entry in parent.glob(pattern):
        pid = entry.name.rsplit(TMP_MARK, 1)[-1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- JSON and JSON Lines ------------------------------------------------------


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, parsed object)`` for each non-blank line."""
    fh = open_text(path)
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (expected JSON Lines)") from None


def _plain(obj: Any) -> Any:
    # pydantic models (MCItem, results) as their JSON form
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else obj


def jsonl_text(rows: Iterable[Any]) -> str:
    """One JSON object per line (dicts or pydantic models), UTF-8 as it is."""
    return "".join(json.dumps(_plain(r), ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """:func:`jsonl_text` of ``rows``, atomically."""
    return atomic_write_text(path, jsonl_text(rows))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The objects of a JSON Lines file (blank lines skipped)."""
    return [row for _, row in iter_jsonl(Path(path))]
