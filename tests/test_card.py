"""Model cards: RUN_DIR/README.md from train, convert and rekey, checked against the run's meta."""

from __future__ import annotations

import json
import re

import pytest

from blockkey import KeySet
from blockkey.card import model_card
from blockkey.checkpoint import read_meta
from blockkey.cli import main

from .helpers import colour_data, write_folder


def key_material(key: KeySet) -> list[str]:
    """Strings that would betray the key: its permutation, masks and passwords as written in the key file."""
    out = []
    for step in key.to_json()["steps"]:
        for field in ("perm", "mask"):
            if field in step:
                out.append(json.dumps(step[field]))
                out.append(",".join(map(str, step[field][:12])))
        if "password" in step:
            out.append(step["password"])
    return out


def table_rows(card: str) -> dict[str, str]:
    """``setting -> accuracy cell`` of the card's accuracy table."""
    section = card.split("## Accuracy", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 2 and cells[0] not in ("setting",):
            rows[cells[0]] = cells[1]
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    t = tmp_path_factory.mktemp("card")
    root = write_folder(t / "ds", colour_data(12, size=16))
    key = KeySet.generate("shuffle,negpos,ffx", 4)
    key.save(t / "key.json")
    KeySet.generate("negpos,shuffle", 4).save(t / "sn.json")
    KeySet.generate("shuffle", 4).save(t / "s.json")
    common = ["--data", str(root), "--model", "patchnet", "--epochs", "1", "--batch-size", "8", "--amp", "off"]
    common += ["--val-fraction", "0.25"]
    assert main(["train", *common, "--key", str(t / "key.json"), "-o", str(t / "run")]) == 0
    assert main(["train", *common, "--no-key", "--norm", "position", "-o", str(t / "plain")]) == 0
    return t, key


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_train_writes_a_card_matching_its_meta(trained, capsys):
    t, key = trained
    meta = read_meta(t / "run")
    card = (t / "run" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: blockkey\n")
    assert key.fingerprint in card and meta["key"]["fingerprint"] == key.fingerprint
    for secret in key_material(key):
        assert secret not in card
    assert "shuffle -> negpos -> ffx" in card and "4x4, 3 channels" in card
    assert "3 x 16 x 16 uint8" in card and ", ".join(meta["classes"]) in card
    assert str(t / "ds") in card  # the data source
    ev = meta["evaluation"]
    assert ev["images"] == 9 and ev["key_matches_model"] is True
    rows = table_rows(card)
    assert set(rows) == {"correct key", "plain images", "10 random wrong keys"}
    for r in ev["rows"]:
        assert rows[r["setting"]] == f"{r['accuracy']:.1%}"
    assert f"blockkey predict --model {t.name}" not in card and "blockkey predict --model run --key KEY.json" in card
    assert "blockkey export --model run --key KEY.json" in card and "--npy photo.jpg --size 16 " in card
    assert card == model_card(meta, "run", re.search(r"\| parameters \| ([\d,]+) \|", card).group(1))


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_non_protected_card(trained):
    t, _ = trained
    card = (t / "plain" / "README.md").read_text()
    assert "Not protected" in card and "fingerprint" not in card
    assert list(table_rows(card)) == ["non-protected model"]
    assert "--key" not in card.split("## How to use", 1)[1]


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_convert_and_rekey_cards(trained, capsys):
    t, _ = trained
    assert main(["convert", "--model", str(t / "plain"), "--key", str(t / "sn.json"), "-o", str(t / "conv")]) == 0
    argv = ["rekey", "--model", str(t / "conv"), "--old-key", str(t / "sn.json"), "--new-key", str(t / "s.json")]
    assert main([*argv, "-o", str(t / "moved")]) == 0
    src = read_meta(t / "plain")["evaluation"]["rows"][0]["accuracy"]
    for run, key_file, actions in (("conv", "sn.json", ["convert"]), ("moved", "s.json", ["convert", "rekey"])):
        card = (t / run / "README.md").read_text()
        meta = read_meta(t / run)
        key = KeySet.load(t / key_file)
        assert key.fingerprint in card and meta["key"]["fingerprint"] == key.fingerprint
        for secret in key_material(key):
            assert secret not in card
        assert table_rows(card) == {"correct key": f"{src:.1%}"} and "carried over" in card
        assert [c["action"] for c in meta["conversions"]] == actions and "## Conversions" in card
