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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_bytes", "write_json", "write_text"]


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
        raise FileExistsError(f"{path} exists; refusing to overwrite it (use --force)") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite it (use --force)") from None
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
