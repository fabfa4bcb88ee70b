"""Atomic file writes: a file is either absent, its old version or complete, never half written.

Every file blockkey writes (keys, passports, weights, metadata, cards, caches, ciphertexts, exports)
goes through :func:`atomic_path`: the content is written to a temporary file in the same folder
(``.NAME.XXXXXXXX.tmpSUFFIX``, created exclusively, mode 0600 for secrets), flushed to disk, then
renamed over ``path`` (or hard-linked to it when ``overwrite=False``, which fails if ``path`` appeared
meanwhile). A process killed half way leaves only a dot-temporary file, which
:func:`~blockkey.checkpoint.clear_states` removes from run folders.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputExistsError

__all__ = [
    "atomic_path",
    "claim_folder",
    "exists_error",
    "printable",
    "refuse_existing",
    "show_path",
    "write_bytes",
    "write_json",
    "write_text",
]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if the file appeared meanwhile
    except FileExistsError:
        raise exists_error(path) from None
    except OSError:  # a filesystem without hard links
        refuse_existing(path)
        os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, private: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on leaving the block it becomes ``path``.

    The temporary file exists (empty) when the block starts and keeps ``path``'s suffix, so writers that
    add a suffix (``numpy.save``) or take a file name (safetensors) can use it. ``private``: mode 0600
    (keys, passports, exports that hold a key). ``overwrite=False``: ``FileExistsError`` if ``path``
    exists. On an exception nothing is published and the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    except OSError as e:  # name the file the user asked for, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        yield tmp
        if private:
            os.chmod(tmp, 0o600)  # in case the writer re-created the file
        _fsync(tmp)
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, private: bool = False, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, private=private, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, private: bool = False, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), private=private, overwrite=overwrite)


def write_json(path: str | os.PathLike[str], doc: Any, *, private: bool = False, overwrite: bool = True) -> Path:
    """Write ``doc`` as indented JSON (one space, final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(doc, indent=1) + "\n", private=private, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# showing paths, and the one refusal rule for what blockkey writes
# --------------------------------------------------------------------------------------------


def show_path(path: str | os.PathLike[str] | bytes) -> str:
    """``path`` for people: bytes that are not UTF-8 (Linux allows them in names) as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes, as ``os.fsdecode`` makes them) shown as
    ``\\xNN``, so that it can be printed on any UTF-8 terminal (a path in a message, a message in a log)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _odd(text) else text


def _odd(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def exists_error(path: str | os.PathLike[str]) -> OutputExistsError:
    """The one message for an output that exists: ``P exists; refusing to overwrite it (use --force)``."""
    return OutputExistsError(f"{show_path(path)} exists; refusing to overwrite it (use --force)")


def refuse_existing(path: str | os.PathLike[str], force: bool = False) -> None:
    """The refusal rule for one output file: an existing ``path`` is refused unless ``force``."""
    if not force and os.path.lexists(path):
        raise exists_error(path)


def claim_folder(
    path: str | os.PathLike[str],
    force: bool = False,
    ours: Callable[[Path], bool] | None = None,
    *,
    create: bool = True,
) -> Path:
    """The refusal rule for an output folder: a file, or a non-empty folder that ``ours`` does not recognise
    as made by this command, is refused unless ``force``. Creates the folder (unless ``create`` is off)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{show_path(path)} exists and is not a folder")
    if not force and path.is_dir() and any(path.iterdir()) and not (ours is not None and ours(path)):
        raise OutputExistsError(
            f"{show_path(path)} is not empty and was not made by this command; refusing to write into it (use --force)"
        )
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
