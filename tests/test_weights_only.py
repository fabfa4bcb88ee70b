"""Weights-only attack: the key read off a block-aligned model's patch embedding, no victim data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from blockkey import KeySet
from blockkey.attacks import Target
from blockkey.attacks.ciphertext_only import _confidence_scorer
from blockkey.attacks.matching import match
from blockkey.attacks.weights_only import (
    embedding_columns,
    ffx_positions,
    image_reference,
    model_reference,
    recover_key_weights_only,
    stats_signs_channels,
)
from blockkey.checkpoint import load_model
from blockkey.data import Normalize, load_demo
from blockkey.functional import compile_block_plan
from blockkey.rekey import rekey_model

from .helpers import rand_key

CKPT = Path(__file__).resolve().parent.parent / "checkpoints"


def _load(name: str):
    model, meta = load_model(CKPT / name)
    return model, meta, Normalize.from_json(meta["normalize"])


@pytest.fixture(scope="module")
def thief_reference():
    """The thief's own plain model: the released shuffle model turned back into a plain one (an
    independently trained network in plain coordinates; its key is the published demo key)."""
    model, _, norm = _load("shuffle")
    plain, _ = rekey_model(model, norm, KeySet.load(CKPT / "shuffle" / "key.json"), None)
    return model_reference(plain, 4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["shuffle", "shuffle,negpos"])
def test_recovers_the_key_of_a_converted_model(recipe, thief_reference):
    none, meta, norm = _load("none")
    key = rand_key(recipe, 4, seed=11)
    victim, victim_norm = rekey_model(none, norm, None, key)
    plain_train, _ = load_demo()
    plain = plain_train.subset(torch.randperm(len(plain_train), generator=torch.Generator().manual_seed(0))[:256])
    target = Target(victim.eval(), {**meta, "normalize": victim_norm.to_json()}, key, plain)
    plan, info = recover_key_weights_only(
        embedding_columns(victim, 4),
        4,
        3,
        key.recipe,
        thief_reference,
        score=_confidence_scorer(target, plain),
        restarts=8,
    )
    true = compile_block_plan(key)
    assert torch.equal(plan.src, true.src) and torch.equal(plan.codes, true.codes)  # every position, every sign
    assert info["candidates"] == (16 if "negpos" in recipe else 8)


def test_negpos_signs_from_the_weights_and_from_the_statistics():
    none, _, norm = _load("none")
    key = rand_key("negpos", 4, seed=4)
    victim, victim_norm = rekey_model(none, norm, None, key)
    plain = load_demo()[0].images[torch.randperm(8000, generator=torch.Generator().manual_seed(0))[:300]]
    true = compile_block_plan(key)
    w = embedding_columns(victim, 4)
    # spectral signs against the no-training reference (partial correlations of plain images): up to the global sign
    _, info = recover_key_weights_only(w, 4, 3, key.recipe, image_reference(plain, 4))
    assert any(torch.equal(p.codes, true.codes) for p in info["all_candidates"])
    assert info["candidates"] == 2
    # from the per-position normalisation statistics that ship with the model: exact, one candidate
    blocks = plain.long().unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(-1, 48).double() / 255
    stats = (*victim_norm.per_position(4, 3), blocks.mean(0), blocks.std(0))
    plan, info = recover_key_weights_only(w, 4, 3, key.recipe, image_reference(plain, 4), stats=stats)
    assert torch.equal(plan.codes, true.codes) and info["candidates"] == 1
    sign, chan = stats_signs_channels(stats, 3)
    assert torch.equal(sign, torch.where(true.codes[:, 0] == 255, -1.0, 1.0).double())
    # blue stands apart (mean 0.45 against 0.48-0.49 for red and green: those need thousands of images)
    assert torch.equal(chan == 2, torch.arange(48) % 3 == 2)


def test_ffx_positions_are_the_short_columns():
    w = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ffx = torch.zeros(48, dtype=torch.bool)
    ffx[torch.randperm(48, generator=torch.Generator().manual_seed(1))[:20]] = True
    w[:, ffx] *= 0.15
    assert torch.equal(ffx_positions(w), ffx)


def test_match_recovers_a_hidden_relabelling():
    # a noisy relabelled copy of a structured matrix: the matcher finds the relabelling
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 24, dtype=torch.float64, generator=g).cumsum(1)  # smooth: neighbours correlate
    b = torch.corrcoef(x.T)
    pi = torch.randperm(24, generator=g)
    a = b[pi][:, pi] + 0.01 * torch.randn(24, 24, dtype=torch.float64, generator=g)
    a = (a + a.T) / 2
    found = match(a, b, 8, random.Random(0), kicks=20)
    assert torch.equal(found, pi) or torch.equal(found, (23 - pi))  # a chain's one symmetry: reversal


@pytest.mark.slow
def test_cli(tmp_path, capsys):
    import json

    from blockkey.cli import main

    from .helpers import colour_data, write_folder

    root = write_folder(tmp_path / "ds", colour_data(20, size=16))
    train = [
        "train",
        "--data",
        root,
        "--no-key",
        "--model",
        "patchnet",
        "--norm",
        "channel",  # the exactness below needs per-channel statistics (position is train's default now)
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--amp",
        "off",
    ]
    assert main([str(a) for a in [*train, "-o", tmp_path / "plain"]]) == 0
    rand_key("shuffle,negpos", 4, seed=2).save(tmp_path / "k.json")
    assert (
        main(
            [
                str(a)
                for a in ["convert", "--model", tmp_path / "plain", "--key", tmp_path / "k.json", "-o", tmp_path / "v"]
            ]
        )
        == 0
    )
    capsys.readouterr()
    base = ["attack", "weights-only", "--model", tmp_path / "v", "--key", tmp_path / "k.json"]
    assert main([str(a) for a in [*base, "--reference", tmp_path / "plain", "--json"]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["attack"] == "weights-only" and len(doc["rows"]) == 4
    by = {r["setting"]: r for r in doc["rows"]}
    exact = by[f"reference: plain model {tmp_path / 'plain'}, normalisation statistics"]
    # the victim's columns are exactly the reference's, permuted: some grid symmetry is the key itself
    assert exact["best_candidate_clear_source_fraction"] == 1.0 and exact["clear_sign_fraction"] == 1.0
    assert main([str(a) for a in [*base, "--reference", tmp_path / "v"]]) == 2
    err = capsys.readouterr().err
    assert "must be a plain model" in err and err.count("\n") == 1
