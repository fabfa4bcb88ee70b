"""RunMeta: meta.json as a typed record; the file format is unchanged and old runs still load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from blockkey.checkpoint import read_meta, save_run
from blockkey.data import Normalize
from blockkey.errors import CheckpointError
from blockkey.meta import META_FORMAT, META_VERSION, KeyInfo, RunMeta, key_info
from blockkey.runtime import native_bf16
from tests.helpers import rand_key

CHECKPOINTS = sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*/meta.json"))


def _full() -> RunMeta:
    return RunMeta(
        model="patchnet",
        model_kwargs={"patch": 4},
        classes=("cat", "dog"),
        image_shape=(3, 8, 8),
        key=KeyInfo("0123456789abcdef", ("shuffle", "ffx"), 4, 3, ("shuffle", "ffx-all")),
        normalize=Normalize((0.25, 0.5, 0.75), (0.2, 0.3, 0.4), "channel", 1),
        config={"amp": "fp16", "channels_last": False, "norm": "position", "label_smoothing": 0.1},
        data={"source": "imgs", "val_fraction": 0.1, "split_seed": 0, "limit": None, "stream_image_size": 8},
        world_size=2,
        versions={"blockkey": "0.1.0"},
        epochs_done=3,
        history=[{"epoch": 3, "train_loss": 0.5}],
        metrics={"epoch": 3, "train_loss": 0.5},
        conversions=[{"action": "rekey", "to_key": "0123456789abcdef"}],
        evaluation={"rows": []},
        extra={"future_field": [1, 2]},
    )


def test_json_round_trip_is_exact_through_a_file():
    meta = _full()
    doc = json.loads(json.dumps(meta.to_json()))
    assert list(doc)[:2] == ["format", "version"] and doc["version"] == META_VERSION
    assert RunMeta.from_json(doc) == meta
    assert RunMeta.from_json(doc).to_json() == doc


def test_resolved_settings_come_from_the_config():
    meta = _full()
    assert (meta.amp, meta.channels_last, meta.norm_mode, meta.label_smoothing) == ("fp16", False, "position", 0.1)
    assert meta.key is not None and meta.key.steps == ("shuffle", "ffx-all") and not meta.key.has_inner
    assert (meta.fingerprint, meta.stream_image_size, meta.data_source, meta.num_classes) == (
        "0123456789abcdef",
        8,
        "imgs",
        2,
    )


def test_a_minimal_old_document_loads_with_the_documented_defaults():
    doc = {
        "format": META_FORMAT,
        "version": 1,
        "model": "fastnet",
        "classes": ["a", "b", "c"],
        "image_shape": [1, 4, 4],
    }
    meta = RunMeta.from_json(doc)
    native = "bf16" if native_bf16() else "off"  # auto: bfloat16 only where this CPU has it natively
    assert (meta.amp, meta.channels_last, meta.norm_mode, meta.label_smoothing) == (native, True, "channel", 0.0)
    assert meta.key is None and meta.normalize is None and meta.passport is None and meta.fingerprint is None
    assert meta.image_shape == (1, 4, 4) and meta.classes == ("a", "b", "c")
    old_key = {"fingerprint": "ab", "recipe": ["shuffle", "negpos"], "block_size": 2, "channels": 1}  # no spec
    meta = RunMeta.from_json({**doc, "key": old_key})
    assert meta.key is not None and meta.key.steps == ("shuffle", "negpos") and meta.key.to_json() == old_key


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"format": "other"}, "not blockkey model metadata"),
        ({"version": 2}, "unsupported metadata version 2"),
        ({"image_shape": [3, 8]}, "image_shape must hold at least 3 items"),
        ({"model": None}, "model must be a string; got None"),
    ],
)
def test_bad_documents_are_one_checkpoint_error(change, says):
    doc = {**_full().to_json(), **change}
    with pytest.raises(CheckpointError, match=says):
        RunMeta.from_json(doc, "x/meta.json")


def test_mapping_view_reads_like_the_json_document():
    meta = _full()
    assert meta["key"]["spec"] == ["shuffle", "ffx-all"] and meta.get("passport") is None
    assert dict(meta) == meta.to_json() and "future_field" in meta and len(meta) == len(meta.to_json())
    assert RunMeta.coerce(dict(meta)) == meta and RunMeta.coerce(meta) is meta


def test_key_info_matches_the_key():
    key = rand_key("shuffle,negpos", 4, seed=1)
    info = KeyInfo.from_key(key)
    assert info is not None and info.fingerprint == key.fingerprint and info.steps == tuple(key.spec)
    assert key_info(key) == info.to_json() and key_info(None) is None and KeyInfo.from_key(None) is None


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.parent.name)
def test_released_checkpoints_load_and_write_back_the_same_document(path, tmp_path):
    doc = json.loads(path.read_text())
    meta = read_meta(path.parent)
    assert meta.model == doc["model"] and list(meta.classes) == doc["classes"]
    assert meta.normalize == Normalize.from_json(doc["normalize"])
    # the same keys and values; a run written before passports gains the explicit "passport": null
    assert meta.to_json() == {"passport": None, **doc}
    order = list(doc)
    if "passport" not in order:  # released before passports existed
        order.insert(order.index("key") + 1, "passport")
    assert list(meta.to_json()) == order  # and in the same order


def test_save_run_writes_meta_json_that_reads_back(tmp_path):
    from torch import nn

    meta = replace(_full(), extra={})
    save_run(tmp_path, nn.Linear(2, 2), meta)
    assert read_meta(tmp_path) == meta
    assert json.loads((tmp_path / "meta.json").read_text()) == meta.to_json()
