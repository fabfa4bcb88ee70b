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
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "key.json").exists()
