"""convert / rekey: folding shuffle and negpos keys into a block-aligned patch embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from blockkey import BlockkeyError, KeySet
from blockkey.checkpoint import load_model
from blockkey.data import Normalize, stratified_split
from blockkey.evaluate import evaluate_run
from blockkey.models import PatchNet, create_model
from blockkey.rekey import RekeyError, block_affine, convert_run, logit_error, rekey_model, rekey_run
from blockkey.train import TrainConfig, fit

from .helpers import colour_data, rand_key
from .reference import reference_encrypt

RECIPES = ["shuffle", "negpos", "shuffle,negpos", "negpos,shuffle", "shuffle,negpos,shuffle,negpos"]
SMALL = {
    "patchnet": {"width": 0.125},
    "upnet": {"width": 0.125},
    "fullnet": {"width": 0.25},
    "convmixer": {"dim": 32, "depth": 2, "kernel": 3},
    "vit": {"dim": 32, "depth": 2, "heads": 2},
}
NORMS = {
    "channel": lambda m, c: Normalize((0.49, 0.48, 0.45)[:c], (0.25, 0.24, 0.26)[:c]),
    "position": lambda m, c: Normalize(
        tuple(torch.rand(m * m * c, generator=torch.Generator().manual_seed(m)).mul(0.6).add(0.2).tolist()),
        tuple(torch.rand(m * m * c, generator=torch.Generator().manual_seed(m + 1)).mul(0.3).add(0.1).tolist()),
        "position",
        m,
    ),
}


def model(name: str, m: int, c: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, 10, c, patch=m, **SMALL[name]).eval()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m,c", [(2, 3), (4, 3), (4, 1)])
def test_block_affine_is_the_reference_transform(recipe, m, c):
    key = rand_key(recipe, m, c, seed=7)
    a = block_affine(key)
    x = np.random.default_rng(0).integers(0, 256, (6, c, m, m), dtype=np.uint8)
    codes, _ = reference_encrypt(x, [s.to_json() for s in key.steps], m)
    for img, out in zip(x, codes, strict=True):
        v = [int(img[ch, r, col]) for r in range(m) for col in range(m) for ch in range(c)]  # one block
        e = [int(out[ch, r, col]) for r in range(m) for col in range(m) for ch in range(c)]
        expect = [v[s] if sg > 0 else 255 - v[s] for s, sg in zip(a.src.tolist(), a.sign.tolist(), strict=True)]
        assert e == expect
    assert torch.equal(a.offset, (a.sign < 0).double())


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("recipe", ["shuffle", "negpos", "negpos,shuffle,negpos"])
def test_convert_is_exact(name, norm, recipe):
    m = 4
    net, normalize = model(name, m), NORMS[norm](m, 3)
    key = rand_key(recipe, m, seed=3)
    prot, prot_norm = rekey_model(net, normalize, None, key)
    assert prot_norm.mode == "position" and prot_norm.block_size == m
    assert logit_error(net, normalize, None, prot, prot_norm, key, (3, 32, 32)) < 1e-9
    assert logit_error(net, normalize, None, prot, prot_norm, key, (3, 32, 32), dtype=torch.float32) < 1e-5
    # the original network is untouched, and the key matters: plain images on the converted model differ
    assert logit_error(net, normalize, None, prot, prot_norm, None, (3, 32, 32)) > 1e-2
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), model(name, m).state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("name", list(SMALL))
def test_rekey_is_exact_and_round_trips(name):
    m = 2
    net, normalize = model(name, m), NORMS["channel"](m, 3)
    k1, k2 = rand_key("shuffle,negpos", m, seed=1), rand_key("negpos,shuffle,negpos", m, seed=2)
    p1, n1 = rekey_model(net, normalize, None, k1)
    p2, n2 = rekey_model(p1, n1, k1, k2)
    assert logit_error(p1, n1, k1, p2, n2, k2, (3, 16, 16)) < 1e-9
    assert logit_error(net, normalize, None, p2, n2, k2, (3, 16, 16)) < 1e-9
    assert logit_error(p1, n1, k1, p2, n2, k1, (3, 16, 16)) > 1e-2  # the old key no longer fits
    back, back_norm = rekey_model(p2, n2, k2, None)  # a signed permutation and its inverse: bit for bit
    for a, b in zip(net.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert np.allclose(back_norm.mean, normalize.per_position(m, 3)[0].numpy(), atol=1e-15)


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_torchvision_convnext_stem():
    torch.manual_seed(0)
    net = create_model("tv_convnext_tiny", 5).eval()
    key = rand_key("shuffle,negpos", 4, seed=5)
    prot, norm = rekey_model(net, None, None, key)
    assert logit_error(net, None, None, prot, norm, key, (3, 32, 32), images=2) < 1e-9


def test_refusals():
    net = model("patchnet", 4)
    with pytest.raises(RekeyError, match="non-linear table"):
        rekey_model(net, None, None, rand_key("shuffle,ffx", 4))
    with pytest.raises(RekeyError, match=r"kernel \(4, 4\).*blocks are 2x2"):
        rekey_model(net, None, None, rand_key("shuffle", 2))
    with pytest.raises(RekeyError, match="no patch embedding"):
        rekey_model(create_model("fastnet", 10), None, None, rand_key("shuffle", 4))
    with pytest.raises(RekeyError, match="1-channel images; the model takes 3"):
        rekey_model(net, None, None, rand_key("shuffle", 4, channels=1))
    with pytest.raises(RekeyError, match="differ in shape"):
        rekey_model(net, None, rand_key("shuffle", 4), rand_key("shuffle", 2))


class LeakyPatchNet(PatchNet):
    """Pixels also reach the output around the patch embedding: no folding can be exact."""

    def forward(self, x):
        return super().forward(x) + x[:, :, 0, 0].sum(1, keepdim=True)


@pytest.fixture
def plain_run(tmp_path):
    data = colour_data(40, size=16)
    tr, va = stratified_split(data, 0.25, 0)
    cfg = TrainConfig(
        model="patchnet", model_kwargs={"patch": 4, "width": 0.25}, epochs=6, batch_size=16, lr=0.05, amp="off"
    )
    meta = fit(tr, va, None, cfg, tmp_path / "plain", progress=False, log=lambda s: None)
    return tmp_path, va, meta


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_convert_and_rekey_runs(plain_run):
    t, va, _ = plain_run
    plain = evaluate_run(t / "plain", va, None, progress=False).rows[0]["accuracy"]
    assert plain > 0.8  # chance is 1/3
    k1, k2 = rand_key("shuffle,negpos", 4, seed=11), rand_key("shuffle,negpos", 4, seed=12)
    m1 = convert_run(t / "plain", k1, t / "k1")
    assert m1["key"]["fingerprint"] == k1.fingerprint and m1["conversions"][-1]["max_rel_logit_error_float64"] < 1e-9
    rep = evaluate_run(t / "k1", va, k1, wrong_keys=8, progress=False)
    rows = {r["setting"].split(" ")[-1] if "wrong" in r["setting"] else r["setting"]: r for r in rep.rows}
    assert rep.key_matches and rows["correct key"]["accuracy"] == pytest.approx(plain, abs=1e-9)
    assert rows["plain images"]["accuracy"] < plain - 0.3
    assert rows["keys"]["accuracy"] < plain - 0.3
    m2 = rekey_run(t / "k1", k1, k2, t / "k2")
    assert [c["action"] for c in m2["conversions"]] == ["convert", "rekey"]
    assert evaluate_run(t / "k2", va, k2, wrong_keys=0, progress=False).rows[0]["accuracy"] == pytest.approx(plain)
    blob = b"".join(p.read_bytes() for p in (t / "k2").iterdir())
    assert json.dumps(list(k2.steps[0].perm)).encode() not in blob  # no key material in the checkpoint
    with pytest.raises(BlockkeyError, match="not empty"):
        convert_run(t / "plain", k1, t / "k1")
    with pytest.raises(BlockkeyError, match="already protected"):
        convert_run(t / "k1", k2, t / "x")
    with pytest.raises(BlockkeyError, match="is not the key of"):
        rekey_run(t / "k1", k2, k1, t / "x")
    with pytest.raises(BlockkeyError, match="not protected"):
        rekey_run(t / "plain", k1, k2, t / "x")


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_check_refuses_a_model_that_bypasses_its_patch_embedding(plain_run, monkeypatch):
    from blockkey import models

    t, _, _ = plain_run
    monkeypatch.setitem(
        models._REGISTRY,
        "patchnet",
        lambda num_classes, in_channels, **kw: LeakyPatchNet(
            num_classes, in_channels, kw["patch"], tuple(max(8, round(w * kw["width"])) for w in (128, 256, 256))
        ),
    )
    with pytest.raises(RekeyError, match="conversion check failed"):
        convert_run(t / "plain", rand_key("shuffle", 4), t / "leaky")
    assert not (t / "leaky").exists()


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_cli(plain_run, capsys):
    from blockkey.cli import main

    t, _, _ = plain_run
    KeySet.generate("negpos,shuffle", 4).save(t / "a.json")
    KeySet.generate("shuffle,negpos", 4).save(t / "b.json")
    KeySet.generate("shuffle,ffx", 4).save(t / "f.json")
    assert main(["convert", "--model", str(t / "plain"), "--key", str(t / "a.json"), "-o", str(t / "A")]) == 0
    assert "no training; checked" in capsys.readouterr().out
    argv = ["rekey", "--model", str(t / "A"), "--old-key", str(t / "a.json"), "--new-key", str(t / "b.json")]
    assert main([*argv, "-o", str(t / "B"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "rekey" and out["max_rel_logit_error_float64"] < 1e-9
    _, meta = load_model(t / "B")
    assert meta["key"]["fingerprint"] == KeySet.load(t / "b.json").fingerprint
    for args, message in [
        (["convert", "--model", str(t / "plain"), "--key", str(t / "f.json"), "-o", str(t / "F")], "non-linear"),
        ([*argv[:4], str(t / "b.json"), *argv[5:], "-o", str(t / "C")], "is not the key of"),
        (["convert", "--model", str(t / "nope"), "--key", str(t / "a.json"), "-o", str(t / "D")], "not a run"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", ["convmixer", "vit"])
def test_block_aligned_models_train_and_convert(name, tmp_path):
    data = colour_data(20, size=16)
    tr, va = stratified_split(data, 0.25, 0)
    kwargs = {"patch": 4, **SMALL[name]}
    cfg = TrainConfig(model=name, model_kwargs=kwargs, epochs=2, batch_size=16, lr=0.02, amp="off", norm="position")
    fit(tr, va, None, cfg, tmp_path / "plain", progress=False, log=lambda s: None)
    key = rand_key("negpos,shuffle", 4, seed=31)
    meta = convert_run(tmp_path / "plain", key, tmp_path / "prot")
    assert meta["conversions"][-1]["max_rel_logit_error_float64"] < 1e-9
    plain = evaluate_run(tmp_path / "plain", va, None, progress=False).rows[0]["accuracy"]
    prot = evaluate_run(tmp_path / "prot", va, key, wrong_keys=0, progress=False).rows[0]["accuracy"]
    assert prot == pytest.approx(plain)
