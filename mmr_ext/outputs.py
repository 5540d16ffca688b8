"""Output paths: checked before any work, written atomically, every failure naming the path.

- :func:`check_output_file` / :func:`check_output_dir`: a file (or folder) that exists and is
  writable, or can be created (its nearest existing ancestor is a writable folder, tried by
  creating and removing a probe file, so a read-only file system is caught for root too), and is
  not a folder where a file is expected or a file where a folder is expected. Nothing is created.
- :func:`atomic_write_text` / :func:`atomic_write`: through a temporary file in the target folder,
  flushed to disk and moved into place with ``os.replace``; on failure the previous file is left as
  it was and the temporary file is removed.
- :func:`writing`: turns an ``OSError`` (disk full, permission changed mid-run) into an
  :class:`OutputError` naming the path.
"""
from __future__ import annotations

import errno as _errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Union

__all__ = ["OutputError", "check_output_file", "check_output_dir", "atomic_write", "atomic_write_text",
           "atomic_write_png", "writing"]

PathLike = Union[str, os.PathLike]


class OutputError(OSError):
    """An output file or folder cannot be written; ``path`` names it, the message says why."""

    def __init__(self, path: PathLike, reason: str, what: str = "output file",
                 errno: Optional[int] = None):
        super().__init__(f"cannot write {what} '{path}': {reason}")
        self.path = Path(path)
        self.reason = reason
        self.errno = errno

    @classmethod
    def from_os_error(cls, path: PathLike, exc: OSError, what: str = "output file") -> "OutputError":
        reason = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno is not None and exc.errno in _errno.errorcode and exc.strerror:
            reason = f"{reason} ({_errno.errorcode[exc.errno]})"
        return cls(path, reason, what, exc.errno)


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(os.sep)  # pragma: no cover - the root always exists


def _probe(folder: Path, target: Path, what: str) -> None:
    """``folder`` must be a folder in which a file can be created (``target`` names the output)."""
    if not folder.is_dir():
        raise OutputError(target, f"'{folder}' is a regular file, not a folder", what, _errno.ENOTDIR)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(target, f"permission denied: folder '{folder}' is not writable", what, _errno.EACCES)
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmr_ext_probe.", dir=folder)
    except OSError as exc:
        raise OutputError(target, f"cannot create files in '{folder}': {exc.strerror or exc}", what,
                          exc.errno) from exc
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: PathLike, what: str = "output file") -> Path:
    """``path`` (``~`` expanded) if a file can be written there; else :class:`OutputError`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(path, "it is a folder, not a file", what, _errno.EISDIR)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(path, "permission denied: the file is not writable", what, _errno.EACCES)
    _probe(_nearest_existing(path.parent), path, what)
    return path


def check_output_dir(path: PathLike, what: str = "output folder") -> Path:
    """``path`` (``~`` expanded) if it is, or can be created as, a writable folder; else
    :class:`OutputError`."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(path, "it exists and is not a folder", what, _errno.ENOTDIR)
    _probe(_nearest_existing(path), path, what)
    return path


@contextmanager
def writing(path: PathLike, what: str = "output file") -> Iterator[None]:
    """Re-raises an ``OSError`` of the body as :class:`OutputError` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError.from_os_error(path, exc, what) from exc


def atomic_write(path: PathLike, write: Callable[[IO], None], binary: bool = False,
                 what: str = "output file") -> Path:
    """Calls ``write(f)`` on a temporary file next to ``path``, then moves it into place."""
    path = Path(path)
    with writing(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb" if binary else "w") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_text(path: PathLike, text: str, what: str = "output file") -> Path:
    """Writes ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), what=what)


def atomic_write_png(path: PathLike, fig, dpi: int = 90) -> Path:
    """Saves the matplotlib figure ``fig`` to ``path`` as PNG atomically (:func:`atomic_write`), then
    closes it (also when the write fails)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True, what="figure")
    finally:
        plt.close(fig)
