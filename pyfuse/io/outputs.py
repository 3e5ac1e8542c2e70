"""Output safety, one mechanism for every command that writes.

* :func:`check_paths`: an output (a save path, a report, ``--out``, an
  adapter path, a cache) is refused when it is, contains or lies inside an
  input (model, adapter, data, spec) or another output, with the reason.
* :func:`staged_dir`: an output directory is written under a temporary name
  next to it (``.NAME.pyfuse-tmp-PID-XXXX``, removed by a later run once PID
  is gone) while a lock (``.NAME.pyfuse-lock``, ``flock``: released when the
  process dies) keeps a second writer of the same destination out, then
  published by :func:`publish`.
* :func:`publish`: a new destination is created or the publish fails, never
  replacing what appeared meanwhile (a no-replace rename:
  ``renameat2(RENAME_NOREPLACE)`` on Linux, ``renamex_np(RENAME_EXCL)`` on
  macOS, a hard link for files elsewhere). With ``force`` an existing one is
  swapped: atomically (``RENAME_EXCHANGE``) where the system can, else the
  old copy is renamed aside to ``.NAME.pyfuse-old-PID-XXXX`` first, and
  :func:`recover` (run before every publish) puts it back if the run died
  before the new copy was in place, or removes it once the new one is.
* :func:`publish_file` / :func:`publish_text`: the same for a single-file
  output (``--out FILE``, ``--report``), refused when it exists unless
  ``force``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from ..errors import UserError
from .files import TMP_MARK, pid_alive, remove_stale_temps, tmp_path_for

OLD_MARK = ".pyfuse-old-"  # the previous copy during a --force swap (restored, never swept)
LOCK_SUFFIX = ".pyfuse-lock"

PathLike = str | os.PathLike


# -- which paths may be written ---------------------------------------------------------


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other.is_relative_to(out):
        return "contains"
    if out.is_relative_to(other):
        return "lies inside"
    return None


def _entries(paths: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[tuple[str, PathLike, Path]]:
    out = []
    for label, value in paths.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        out += [(label, v, _real(v)) for v in values if v is not None and os.fspath(v) != ""]
    return out


def check_paths(inputs: Mapping[str, PathLike | Iterable[PathLike] | None],
                outputs: Mapping[str, PathLike | None], *,
                nested_ok: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse (UserError) every output that is, contains or lies inside an
    input or another output (symlinks resolved). Keys are what the user
    knows the paths by (``--model``, ``--report``...); ``nested_ok`` lists
    ``(inner, outer)`` output pairs allowed inside one another (a report
    written into the directory the same run creates)."""
    ins, outs = _entries(inputs), _entries(outputs)
    allowed = set(nested_ok)
    for i, (label, given, real) in enumerate(outs):
        for other_label, other_given, other_real in ins:
            rel = _relation(real, other_real)
            if rel:
                raise UserError(f"{label} {given} {rel} the input {other_label} {other_given}; "
                                "pyfuse never writes over or into its inputs: choose another path")
        for other_label, other_given, other_real in outs[i + 1:]:
            rel = _relation(real, other_real)
            if rel and (label, other_label) not in allowed and (other_label, label) not in allowed:
                raise UserError(f"{label} {given} {rel} the output {other_label} {other_given}; "
                                "choose separate paths")


# -- renames that never replace -----------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_RENAME_SWAP, _RENAME_EXCL = 2, 4  # macOS sys/stdio.h


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _native_rename(src: PathLike, dst: PathLike, flag: str) -> bool:
    """``renameat2``/``renamex_np`` with ``flag`` (``noreplace`` | ``exchange``);
    False when the system or the file system has no such call."""
    a, b = os.fsencode(src), os.fsencode(dst)
    if _LIBC is not None and hasattr(_LIBC, "renameat2"):
        rc = _LIBC.renameat2(_AT_FDCWD, a, _AT_FDCWD, b,
                             _RENAME_NOREPLACE if flag == "noreplace" else _RENAME_EXCHANGE)
    elif _LIBC is not None and sys.platform == "darwin" and hasattr(_LIBC, "renamex_np"):
        rc = _LIBC.renamex_np(a, b, _RENAME_EXCL if flag == "noreplace" else _RENAME_SWAP)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def rename_noreplace(src: PathLike, dst: PathLike) -> None:
    """Rename ``src`` to ``dst``; FileExistsError when ``dst`` exists (even an
    empty directory, which a plain rename would silently replace)."""
    if _native_rename(src, dst, "noreplace"):
        return
    if not os.path.isdir(src):
        os.link(src, dst)  # fails when dst exists
        os.unlink(src)
        return
    if os.path.lexists(dst):  # no atomic call here: this check's window is all we have
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(src, dst)


# -- publishing -------------------------------------------------------------------------


def _sibling(final: Path, mark: str) -> Path:
    return final.with_name(f".{final.name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries survive a power cut); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover(final: PathLike) -> None:
    """Finish what a killed ``--force`` swap of ``final`` left: the old copy
    goes back when ``final`` is missing (the new one never arrived), and is
    removed when ``final`` is there (the new one did). Copies of a running
    process are left alone."""
    final = Path(final)
    for old in sorted(final.parent.glob(f".{final.name}{OLD_MARK}*")):
        pid = old.name.rsplit(OLD_MARK, 1)[-1].split("-", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and pid_alive(int(pid))):
            continue
        if os.path.lexists(final):
            _remove(old)
        else:
            os.rename(old, final)


def publish(tmp: PathLike, final: PathLike, force: bool) -> None:
    """Move the finished ``tmp`` (a file or a directory) to ``final``. Without
    ``force`` it must not exist, at the very moment of the rename; with
    ``force`` an existing one of the same kind is replaced, keeping the old
    copy until the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    recover(final)
    if force and os.path.lexists(final):
        if final.is_symlink() or final.is_dir() != tmp.is_dir():
            kind = "a symlink" if final.is_symlink() else ("a directory" if final.is_dir() else "a file")
            raise UserError(f"{final} exists and is {kind}; not replacing it")
        if _native_rename(tmp, final, "exchange"):
            _remove(tmp)  # tmp now holds the old copy; a crash here leaves a temp the next run sweeps
        else:
            old = _sibling(final, OLD_MARK)
            os.rename(final, old)
            os.rename(tmp, final)
            _remove(old)
    else:
        try:
            rename_noreplace(tmp, final)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise UserError(f"{final} appeared while this run was writing it (another run, or made by hand); "
                            "not replacing it (pass --force to replace it); this run's output was discarded"
                            ) from None
        except OSError as err:
            if err.errno != errno.ENOTEMPTY:
                raise
            raise UserError(f"{final} appeared while this run was writing it; not replacing it") from None
    fsync_dir(final.parent)


# -- staging ----------------------------------------------------------------------------


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def writer_lock(final: PathLike) -> Iterator[None]:
    """Hold ``.NAME.pyfuse-lock`` next to ``final`` for the block; a second
    writer of the same destination gets a UserError at once. ``flock`` is
    released by the kernel when a process dies, so a killed run leaves no
    lock to clear by hand."""
    final = Path(final)
    lock = final.with_name(f".{final.name}{LOCK_SUFFIX}")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"another pyfuse run is writing {final}; wait for it or choose another path") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it between our open and our lock: take the new one
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


def check_destination(final: PathLike, force: bool, flag: str = "the output") -> None:
    """Refuse (before any work) an existing directory ``final`` without
    ``force``, and anything else there even with it."""
    final = Path(final)
    recover(final)
    if not os.path.lexists(final):
        return
    if not force:
        raise UserError(f"{flag} {final} already exists; pass --force to replace it")
    if final.is_symlink() or not final.is_dir():
        raise UserError(f"{flag} {final} exists and is not a directory; not replacing it")


@contextmanager
def _locked_temp(final: PathLike, check: Callable[[Path], None]) -> Iterator[tuple[Path, Path]]:
    """``(final made absolute, a fresh temporary name next to it)`` under
    :func:`writer_lock`, once ``check(final)`` passed and a killed run's
    temporaries of ``final`` are swept."""
    final = Path(os.path.abspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(final):
        check(final)
        remove_stale_temps(final.parent, f".{final.name}{TMP_MARK}*")
        yield final, tmp_path_for(final)


@contextmanager
def staged_dir(final: PathLike, force: bool, flag: str = "the output") -> Iterator[Path]:
    """A temporary directory next to ``final`` (with the mode ``mkdir``
    would give) to write an output into, under :func:`writer_lock`;
    published as ``final`` (:func:`publish`) when the block ends, removed if
    it raises, so that ``final`` is complete or as it was."""
    with _locked_temp(final, lambda f: check_destination(f, force, flag)) as (final, tmp):
        tmp.mkdir()
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            try:
                yield tmp
            except RuntimeError as err:  # MLX reports a failed write as "[write] Unable to write..."
                if not str(err).startswith("[write]"):
                    raise
                raise OSError(_write_errno(tmp), f"{os.strerror(_write_errno(tmp))} ({err})", os.fspath(final)) \
                    from None
            publish(tmp, final, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_file_destination(final: PathLike, force: bool, flag: str = "the output") -> None:
    """Refuse (before any work) an existing file ``final`` without ``force``,
    and a directory or symlink there even with it."""
    final = Path(final)
    recover(final)
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_file():
        raise UserError(f"{flag} {final} exists and is not a file; not replacing it")
    if not force:
        raise UserError(f"{flag} {final} exists; pass --force to replace it")


def publish_file(final: PathLike, write: Callable[[Path], object], force: bool,
                 flag: str = "the output") -> Path:
    """Write a single-file output: ``write(tmp)`` fills a temporary file next
    to ``final`` (under :func:`writer_lock`), which is then published
    (:func:`publish`): ``final`` is created, or replaced only with ``force``,
    and is complete or as it was. Returns ``final`` as given."""
    given = Path(final)
    with _locked_temp(final, lambda f: check_file_destination(f, force, flag)) as (final, tmp):
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the mode open() gives
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            publish(tmp, final, force)
        except BaseException:
            _remove(tmp)
            raise
    return given


def publish_text(final: PathLike, text: str, force: bool, flag: str = "the output") -> Path:
    """:func:`publish_file` of ``text`` (UTF-8, ``\\n`` line ends)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    return publish_file(final, write, force, flag)


def _write_errno(path: Path) -> int:
    """Why a write below ``path`` failed, when the library that failed does not say."""
    try:
        return errno.ENOSPC if os.statvfs(path).f_bavail == 0 else errno.EIO
    except OSError:
        return errno.EIO

