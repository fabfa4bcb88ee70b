"""blockkey.fileio: atomic writes (complete or absent), private mode, no-overwrite, writer-friendly temp names."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from blockkey.fileio import atomic_path, write_bytes, write_json, write_text


def test_write_replaces_content_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    write_text(p, "old")
    write_text(p, "new ü")
    assert p.read_text(encoding="utf-8") == "new ü"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_json_layout_is_indent_one_with_final_newline(tmp_path):
    p = write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert p.read_text() == '{\n "a": [\n  1,\n  2\n ]\n}\n'
    assert json.loads(p.read_text()) == {"a": [1, 2]}


def test_private_files_are_0600_even_under_a_permissive_umask(tmp_path):
    import os

    old = os.umask(0)
    try:
        secret = write_bytes(tmp_path / "k.json", b"x", private=True)
        public = write_bytes(tmp_path / "p.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o666


def test_no_overwrite_refuses_an_existing_file_and_keeps_it(tmp_path):
    p = tmp_path / "k.json"
    p.write_text("keep")
    with pytest.raises(FileExistsError):
        write_text(p, "other", overwrite=False)
    assert p.read_text() == "keep" and len(list(tmp_path.iterdir())) == 1
    write_text(tmp_path / "new.json", "fresh", overwrite=False)
    assert (tmp_path / "new.json").read_text() == "fresh"


def test_an_error_while_writing_publishes_nothing(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert p.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_temporary_keeps_the_suffix_for_writers_that_add_one(tmp_path):
    p = tmp_path / "x.npy"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.npy.") and tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))
    assert np.load(p).tolist() == [0, 1, 2] and len(list(tmp_path.iterdir())) == 1
