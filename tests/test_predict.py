"""Predictor and `blockkey predict`: the key holder classifies images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from blockkey import BlockkeyError, KeyMismatchError
from blockkey.checkpoint import load_model
from blockkey.cli import main
from blockkey.data import Normalize, make_loader, stratified_split
from blockkey.models import create_model
from blockkey.passport import PassportError, Passports
from blockkey.predict import Predictor, fit_image, list_images, to_channels
from blockkey.train import TrainConfig, fit
from blockkey.transforms import KeyedTransform

from .helpers import colour_data, rand_key


def quiet_fit(train, val, key, cfg, out, **kw):
    return fit(train, val, key, cfg, out, progress=False, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A protected patchnet (shuffle+negpos+ffx) and a plain twin on 16x16 toy images, trained briefly."""
    t = tmp_path_factory.mktemp("predict")
    data = colour_data(24, size=16)
    tr, va = stratified_split(data, 0.25, 0)
    key = rand_key("shuffle,negpos,ffx", 4, seed=5)
    key.save(t / "key.json")
    rand_key("shuffle,negpos,ffx", 4, seed=6).save(t / "other.json")
    cfg = TrainConfig(
        model="patchnet", model_kwargs={"patch": 4, "width": 0.125}, epochs=4, batch_size=16, lr=0.05, amp="off"
    )
    quiet_fit(tr, va, key, cfg, t / "prot")
    quiet_fit(tr, va, None, cfg, t / "plain")
    return t, key, va


def save_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{i:03d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths


def test_logits_are_the_evaluation_path(runs):
    t, key, va = runs
    model, meta = load_model(t / "prot")
    loader = make_loader(
        va, 100, train=False, transform=KeyedTransform(key), normalize=Normalize.from_json(meta["normalize"])
    )
    with torch.no_grad():
        expect = torch.cat([model(x) for x, _ in loader])
    p = Predictor(t / "prot", key)
    assert torch.allclose(p.logits(va.images), expect, atol=1e-5)
    preds = p(list(va.images), top_k=2)
    assert [q.label for q in preds] == [meta["classes"][i] for i in expect.argmax(1).tolist()]
    assert np.mean([q.label == va.classes[y] for q, y in zip(preds, va.labels.tolist(), strict=True)]) > 0.8
    assert all(len(q.classes) == 2 and q.probs[0] >= q.probs[1] for q in preds)
    assert p(va.images[0]).probs[0] == pytest.approx(expect.softmax(1)[0].max().item(), abs=1e-5)


def test_inputs_of_every_kind_agree(runs, tmp_path):
    t, _, va = runs
    p = Predictor(t / "prot", t / "key.json")
    img = va.images[3]
    path = save_images(tmp_path, [img])[0]
    pil = Image.open(path)
    arr = img.permute(1, 2, 0).numpy()
    probs = [p(x).probs for x in (img, path, str(path), pil, arr)]
    assert all(q == pytest.approx(probs[0], abs=1e-6) for q in probs)
    grey = Image.fromarray(arr[:, :, 0], "L")
    assert torch.equal(p.preprocess(grey), img[:1].expand(3, -1, -1))
    rgba = np.concatenate([arr, np.full((16, 16, 1), 7, np.uint8)], 2)
    assert torch.equal(p.preprocess(rgba), img)


def test_fit_image_centre_crops_and_resizes():
    g = torch.Generator().manual_seed(0)
    inner = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
    wide = torch.full((3, 16, 32), 255, dtype=torch.uint8)
    wide[:, :, 8:24] = inner
    assert torch.equal(fit_image(wide, (3, 16, 16)), inner)  # same height: a pure centre crop
    flat = torch.full((3, 40, 60), 99, dtype=torch.uint8)
    assert torch.equal(fit_image(flat, (3, 16, 16)), torch.full((3, 16, 16), 99, dtype=torch.uint8))
    assert fit_image(flat, (1, 8, 12)).shape == (1, 8, 12)
    assert fit_image(flat, (3, 16, 16), stream_view=True).shape == (3, 16, 16)
    rgb = torch.tensor([[[255]], [[0]], [[0]]], dtype=torch.uint8)
    assert to_channels(rgb, 1).item() == 76  # Pillow's L of pure red
    assert np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)).convert("L")).item() == 76


def test_key_checks(runs):
    t, key, _ = runs
    with pytest.raises(KeyMismatchError, match="is not the key of"):
        Predictor(t / "prot", t / "other.json")
    with pytest.raises(KeyMismatchError, match="give its key"):
        Predictor(t / "prot")
    with pytest.raises(KeyMismatchError, match="not protected"):
        Predictor(t / "plain", key)
    plain = Predictor(t / "plain")
    assert plain(torch.zeros(3, 16, 16, dtype=torch.uint8)).label in plain.classes
    with pytest.raises(BlockkeyError, match="not a passport model"):
        Predictor(t / "prot", key, passports=Passports({}, {}))


def test_passport_model(tmp_path):
    data = colour_data(8, size=16)
    tr, va = stratified_split(data, 0.25, 0)
    kwargs = {"passport": True, "image_size": 16, "width": 0.125}
    cfg = TrainConfig(model="resnet18_cifar", model_kwargs=kwargs, epochs=1, batch_size=8, lr=0.05, amp="off")
    model = create_model("resnet18_cifar", 3, 3, **kwargs)
    pp = Passports.generate(model, seed=1)
    quiet_fit(tr, va, None, cfg, tmp_path / "pp", passports=pp)
    p = Predictor(tmp_path / "pp", passports=pp)
    assert len(p(list(va.images))) == len(va)
    with pytest.raises(PassportError, match="are not those of"):
        Predictor(tmp_path / "pp", passports=Passports.generate(model, seed=2))
    with pytest.raises(PassportError, match="give its passports"):
        Predictor(tmp_path / "pp")
    with pytest.raises(PassportError, match="not a key"):
        Predictor(tmp_path / "pp", rand_key("shuffle", 4), passports=pp)


def test_cli_predict(runs, tmp_path, capsys):
    t, _, va = runs
    folder = tmp_path / "imgs"
    paths = save_images(folder / "sub", va.images[:5])
    (folder / "broken.png").write_bytes(b"not a png")
    argv = ["predict", "--model", str(t / "prot"), "--key", str(t / "key.json")]
    assert main([*argv, str(folder), "--top-k", "2", "--csv", str(tmp_path / "p.csv")]) == 2
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 5 and "broken.png" in err and "1 of 6 files" in err
    assert "Traceback" not in err
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["path"].endswith("broken.png") and rows[0]["error"]
    probs = Predictor(t / "prot", t / "key.json").logits(va.images[:5]).softmax(1)  # the images before PNG
    for row, p in zip(rows[1:], probs, strict=True):  # sub/000.png .. sub/004.png, in order
        top2 = p.topk(2)
        assert [row["class_1"], row["class_2"]] == [va.classes[i] for i in top2.indices.tolist()]
        assert [float(row["prob_1"]), float(row["prob_2"])] == pytest.approx(top2.values.tolist(), abs=1e-4)
    assert main([*argv, *map(str, paths), "--json", "--csv", str(tmp_path / "p.csv")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*argv, *map(str, paths), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    expect = Predictor(t / "prot", t / "key.json")(paths, top_k=5)
    assert [r["top"][0]["class"] for r in doc["predictions"]] == [q.label for q in expect]
    assert doc["failed"] == 0 and len(doc["predictions"][0]["top"]) == 3  # 3 classes < top-k 5
    assert main([*argv, "--tta", "shift", *map(str, paths), "--json"]) == 0  # --tta takes its mode here
    doc = json.loads(capsys.readouterr().out)
    expect = Predictor(t / "prot", t / "key.json", tta="shift")(paths, top_k=5)
    assert doc["tta"] == "shift" and [r["top"][0]["prob"] for r in doc["predictions"]] == pytest.approx(
        [q.probs[0] for q in expect], abs=1e-4
    )
    for bad, message in [
        ([*argv, "--tta", str(paths[0])], "invalid choice"),  # an image is never taken for a mode
        (["predict", "--model", str(t / "prot"), "--key", str(t / "other.json"), str(paths[0])], "is not the key"),
        (["predict", "--model", str(t / "prot"), str(paths[0])], "give its key"),
        ([*argv, str(tmp_path / "empty")], "no image files"),
        ([*argv, "--top-k", "0", str(paths[0])], "must be an integer >= 1"),
    ]:
        if "empty" in bad[-1]:
            (tmp_path / "empty").mkdir()
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_list_images(tmp_path):
    save_images(tmp_path / "a" / "b", [torch.zeros(3, 4, 4, dtype=torch.uint8)] * 2)
    (tmp_path / "a" / "notes.txt").write_text("x")
    assert [p.name for p in list_images([tmp_path / "a", tmp_path / "x.jpg"])] == ["000.png", "001.png", "x.jpg"]
