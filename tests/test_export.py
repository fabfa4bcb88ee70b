"""ONNX export: onnxruntime against PyTorch, with and without the key compiled into the graph."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch
from torch import nn

from blockkey import BlockkeyError, KeySet
from blockkey.checkpoint import META_FORMAT, META_VERSION, save_run
from blockkey.cli import main
from blockkey.data import Normalize
from blockkey.export import export_onnx, keyed_input
from blockkey.functional import compile_plan
from blockkey.models import create_model
from blockkey.predict import Predictor
from blockkey.train import key_info

from .helpers import rand_key

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MODELS = {
    "patchnet": ({"patch": 4, "width": 0.125}, "position"),
    "upnet": ({"patch": 4, "width": 0.125}, "position"),
    "fullnet": ({"patch": 4, "width": 0.25}, "position"),
    "resnet18_cifar": ({"width": 0.125}, "channel"),
    "vit": ({"patch": 4, "dim": 32, "depth": 2, "heads": 2}, "position"),
}


def make_run(run, name, kwargs, key, norm, seed=0):
    """A randomly initialised run directory (no training): what a run's loader and exporter see."""
    torch.manual_seed(seed)
    model = create_model(name, 3, 3, **kwargs).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(seed)
    n = 48 if norm == "position" else 3
    normalize = Normalize(
        tuple(torch.rand(n, generator=g).mul(0.5).add(0.25).tolist()),
        tuple(torch.rand(n, generator=g).mul(0.2).add(0.2).tolist()),
        norm,
        4 if norm == "position" else 1,
    )
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "model": name,
        "model_kwargs": kwargs,
        "classes": ["cat", "dog", "ship"],
        "image_shape": [3, 16, 16],
        "key": key_info(key),
        "passport": None,
        "normalize": normalize.to_json(),
        "data": {},
    }
    run.mkdir()
    save_run(run, model, meta)
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One randomly initialised run per architecture (16x16 images, key shuffle+negpos+ffx, M=4)."""
    t = tmp_path_factory.mktemp("export")
    key = rand_key("shuffle,negpos,ffx", 4, seed=3)
    key.save(t / "key.json")
    for i, (name, (kwargs, norm)) in enumerate(MODELS.items()):
        make_run(t / name, name, kwargs, key, norm, seed=i)
    return t, key


def random_images(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def assert_same(onnx_logits, torch_logits):
    assert np.abs(onnx_logits - torch_logits.numpy()).max() <= 1e-4
    assert np.array_equal(onnx_logits.argmax(1), torch_logits.argmax(1).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_matches_pytorch(trained, tmp_path, name):
    t, key = trained
    x = random_images()
    want = Predictor(t / name, key).logits(x)

    rep = export_onnx(t / name, tmp_path / "k.onnx")  # without the key: input = the key's output
    assert rep.mode == "keyed-input" and not rep.holds_secret and rep.max_abs_logit_diff <= 1e-4
    assert_same(run_onnx(tmp_path / "k.onnx", keyed_input(x, key)), want)
    assert_same(run_onnx(tmp_path / "k.onnx", keyed_input(x[:1], key)), want[:1])  # dynamic batch

    rep = export_onnx(t / name, tmp_path / "g.onnx", key)  # the key in the graph: input = plain uint8
    assert rep.mode == "key-in-graph" and rep.holds_secret
    assert stat.S_IMODE((tmp_path / "g.onnx").stat().st_mode) == 0o600
    assert_same(run_onnx(tmp_path / "g.onnx", x.numpy()), want)
    assert_same(run_onnx(tmp_path / "g.onnx", x[:1].numpy()), want[:1])


def int_initializers(path):
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT64]


def test_graph_shape_and_key_material(trained, tmp_path):
    t, key = trained
    plan = compile_plan(key, (16, 16))
    export_onnx(t / "patchnet", tmp_path / "k.onnx")
    export_onnx(t / "patchnet", tmp_path / "g.onnx", key)
    index = plan.index.numpy()
    assert not any(
        a.size == index.size and np.array_equal(a.ravel(), index) for a in int_initializers(tmp_path / "k.onnx")
    )
    assert any(a.size == index.size and np.array_equal(a.ravel(), index) for a in int_initializers(tmp_path / "g.onnx"))
    g = onnx.load(str(tmp_path / "g.onnx"))
    k = onnx.load(str(tmp_path / "k.onnx"))
    assert g.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert k.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    gathers = [n for n in g.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2 and not any(n.op_type == "Gather" for n in k.graph.node)
    assert g.opset_import[0].version >= 18
    props = {p.key: p.value for p in g.metadata_props}
    assert props["blockkey.key_fingerprint"] == key.fingerprint and json.loads(props["blockkey.classes"])


def test_cli_export_and_npy(trained, tmp_path, capsys):
    t, key = trained
    argv = ["export", "--model", str(t / "patchnet"), "-o", str(tmp_path / "m.onnx")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "holds no key" in out and "onnxruntime" in out
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--key", str(t / "key.json"), "--force"]) == 0
    assert "HOLDS THE KEY" in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o600

    from PIL import Image

    x = random_images(3)
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    big = tmp_path / "big.png"
    Image.fromarray(np.kron(x[0].permute(1, 2, 0).numpy(), np.ones((2, 2, 1), np.uint8))).save(big)
    npy = tmp_path / "x.npy"
    assert main(["encrypt", "--key", str(t / "key.json"), "--npy", *map(str, paths), "-o", str(npy)]) == 0
    arr = np.load(npy)
    assert arr.dtype == np.float32 and arr.shape == (3, 3, 16, 16)
    assert np.array_equal(arr, keyed_input(x, key))
    assert (
        main(["encrypt", "--key", str(t / "key.json"), "--npy", str(paths[0]), str(big), "-o", str(npy) + "2.npy"]) == 2
    )
    assert "differ in size" in capsys.readouterr().err
    args = ["encrypt", "--key", str(t / "key.json"), "--npy", "--size", "16", str(big), "-o", str(npy), "--force"]
    assert main(args) == 0 and np.load(npy).shape == (1, 3, 16, 16)


class Eigh(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        v = x[:, 0]
        return self.head(torch.linalg.eigh(v @ v.transpose(-1, -2))[0])


def test_refusals(trained, tmp_path, capsys, monkeypatch):
    from blockkey import models

    t, _ = trained
    other = rand_key("shuffle,negpos,ffx", 4, seed=9)
    other.save(tmp_path / "other.json")
    for argv, message in [
        (
            [
                "export",
                "--model",
                str(t / "vit"),
                "--key",
                str(tmp_path / "other.json"),
                "-o",
                str(tmp_path / "a.onnx"),
            ],
            "is not the key of",
        ),
        (["export", "--model", str(t / "vit"), "-o", str(tmp_path / "a.txt")], "*.onnx"),
        (["export", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "a.onnx")], "not a run directory"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.setitem(models._REGISTRY, "eigh", Eigh)
    run = tmp_path / "eigh"
    run.mkdir()
    meta = json.loads((t / "vit" / "meta.json").read_text()) | {"model": "eigh", "model_kwargs": {}, "key": None}
    save_run(run, Eigh(3, 3), meta | {"normalize": None})
    assert main(["export", "--model", str(run), "-o", str(tmp_path / "e.onnx")]) == 2
    err = capsys.readouterr().err
    assert "ONNX has no operator for aten._linalg_eigh" in err and err.count("\n") == 1
    assert not (tmp_path / "e.onnx").exists()
    with pytest.raises(BlockkeyError, match="differ in size"):
        keyed_input([torch.zeros(3, 16, 16, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8)], other)
    assert isinstance(KeySet.load(tmp_path / "other.json"), KeySet)


@pytest.mark.slow
def test_plain_and_passport_models(tmp_path):
    from blockkey.passport import Passports

    plain = make_run(tmp_path / "plain", "patchnet", MODELS["patchnet"][0], None, "position")
    x = random_images(6)
    rep = export_onnx(plain, tmp_path / "p.onnx")
    assert rep.mode == "plain" and not rep.holds_secret and rep.input_dtype == "uint8"
    assert_same(run_onnx(tmp_path / "p.onnx", x.numpy()), Predictor(plain).logits(x))

    kwargs = {"width": 0.125, "passport": True, "image_size": 16}
    run = make_run(tmp_path / "pp", "resnet18_cifar", kwargs, None, "channel")
    pp = Passports.generate(create_model("resnet18_cifar", 3, 3, **kwargs), seed=1)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps(meta | {"passport": pp.info()}))
    with pytest.raises(BlockkeyError, match="give its passports"):
        export_onnx(run, tmp_path / "pp.onnx")
    rep = export_onnx(run, tmp_path / "pp.onnx", passports=pp)
    assert rep.mode == "passports-in-graph" and rep.holds_secret
    assert stat.S_IMODE((tmp_path / "pp.onnx").stat().st_mode) == 0o600
    assert_same(run_onnx(tmp_path / "pp.onnx", x.numpy()), Predictor(run, passports=pp).logits(x))


def test_missing_extra_is_one_line(trained, tmp_path, monkeypatch, capsys):
    import importlib.util

    import blockkey

    t, _ = trained
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    assert main(["export", "--model", str(t / "vit"), "-o", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'blockkey[export]'" in err and err.count("\n") == 1
    assert blockkey.keyed_input is keyed_input and blockkey.Predictor is Predictor
