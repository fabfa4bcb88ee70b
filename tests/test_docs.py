"""The key file example in docs/key-format.md is a valid key with the fingerprint it shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

from blockkey import KeySet

DOC = Path(__file__).resolve().parents[1] / "docs" / "key-format.md"


def test_key_format_example_loads():
    block = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S).group(1)
    doc = json.loads(block)
    key = KeySet.from_json(doc)  # raises if the shown fingerprint does not match the material
    assert key.fingerprint == doc["fingerprint"]
    assert key.recipe == ("shuffle", "negpos", "ffx")


def test_readme_python_tour_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    saved = KeySet.load(tmp_path / "key.json")  # the file the tour wrote holds the tour's key, mode 0600
    assert saved == scope["key"] and saved.recipe == ("shuffle", "negpos", "ffx") and saved.block_size == 4
    assert (tmp_path / "key.json").stat().st_mode & 0o777 == 0o600


def test_reliability_doc_lists_every_numeric_option_with_its_range():
    import argparse

    from blockkey import argtypes as at
    from blockkey.cli import build_parser

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            for flag in re.findall(r"`(--[a-z-]+)`", cells[0]):
                rows.setdefault(flag, []).append((cells[1].split(", "), cells[2]))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if isinstance(action.type, (at.Int, at.Float)):
                flag = action.option_strings[-1]
                assert flag in rows, f"{name} {flag} is missing from docs/reliability.md"
                ok = [name in cmds and text.startswith(action.type.range) for cmds, text in rows[flag]]
                assert any(ok), (name, flag, action.type.range, rows[flag])
