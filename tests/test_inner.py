"""Inner keys: keyed channel permutations inside the network (blockkey.inner)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from blockkey import KeySet
from blockkey.attacks import Target, accuracy
from blockkey.checkpoint import load_model
from blockkey.errors import BlockkeyError, KeyFileError
from blockkey.evaluate import evaluate_run
from blockkey.inner import ChannelKey, inner_points, keyed_points, use_inner_key
from blockkey.models import create_model
from blockkey.rekey import RekeyError, block_affine
from blockkey.transforms import KeyedTransform

from .helpers import colour_data, fit_inner_toy, rand_key, with_inner, write_folder


class TestInnerKeyFile:
    def test_round_trip_version_and_fingerprint(self, tmp_path):
        key = KeySet.generate("shuffle,negpos,inner", 4)
        assert key.recipe == ("shuffle", "negpos") and key.spec == ("shuffle", "negpos", "inner")
        assert key.label == "shuffle+negpos+inner" and dict(key.key_space_bits())["inner"] == 256
        path = key.save(tmp_path / "k.json")
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        doc = json.loads(path.read_text())
        assert doc["version"] == 2 and doc["inner"]["type"] == "inner"
        assert KeySet.load(path) == key and KeySet.load(path).fingerprint == key.fingerprint
        assert key.inner.secret.hex() not in repr(key) + repr(key.inner)

    def test_keys_without_inner_are_unchanged(self, tmp_path):
        plain = rand_key("shuffle,negpos", 4, seed=1)
        assert plain.to_json()["version"] == 1 and "inner" not in plain.to_json()
        assert with_inner(plain).fingerprint != plain.fingerprint  # the secret is part of the fingerprint
        assert with_inner(plain, 1).fingerprint != with_inner(plain, 2).fingerprint

    def test_inner_only_key_is_identity_on_images(self):
        key = KeySet.generate("inner", 4)
        x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        assert key.steps == () and torch.equal(KeyedTransform(key).encode(x), x)

    @pytest.mark.parametrize(
        ("change", "match"),
        [
            (lambda d: d.pop("inner"), "needs an inner key"),
            (lambda d: d.update(version=1), "cannot hold an inner key"),
            (lambda d: d["inner"].update(secret="zz"), "not hex"),
            (lambda d: d["inner"].update(secret="ab"), "32 bytes"),
        ],
    )
    def test_corrupt_files(self, change, match):
        doc = KeySet.generate("negpos,inner", 2).to_json()
        doc.pop("fingerprint")
        change(doc)
        with pytest.raises(KeyFileError, match=match):
            KeySet.from_json(doc)

    def test_points_are_signed_permutations_that_depend_on_secret_name_and_size(self):
        inner = with_inner(rand_key("negpos", 2), 3).inner
        perm, flips = inner.point("a", 64)
        assert sorted(perm) == list(range(64)) and set(flips) == {0, 1}
        assert inner.point("a", 64) == (perm, flips)  # deterministic
        assert inner.point("b", 64)[0] != perm and inner.point("a", 65)[0][:64] != perm
        assert with_inner(rand_key("negpos", 2), 4).inner.point("a", 64)[0] != perm
        assert inner.point("a", 64, signs=False)[1] == (0,) * 64


class TestChannelKey:
    def test_forward_is_signed_permutation_and_no_state(self):
        point = ChannelKey(5)
        x = torch.randn(2, 5, 3, 3)
        assert torch.equal(point(x), x)  # identity until keyed
        perm, sign = torch.tensor([2, 0, 4, 1, 3]), torch.tensor([1.0, -1, 1, -1, -1])
        point.set(perm, sign)
        for j in range(5):
            assert torch.equal(point(x)[:, j], sign[j] * x[:, perm[j]])
        assert list(point.state_dict()) == [] and "perm=" not in repr(point)
        point.set(None)
        assert torch.equal(point(x), x)
        with pytest.raises(BlockkeyError, match="permutation"):
            point.set(torch.tensor([0, 0, 1, 2, 3]))

    def test_forward_over_the_last_dim_for_linear_layers(self):
        point = ChannelKey(4, dim=-1)
        x = torch.randn(2, 3, 4)
        perm, sign = torch.tensor([3, 1, 0, 2]), torch.tensor([-1.0, 1, 1, -1])
        point.set(perm, sign)
        assert torch.equal(point(x), x[..., perm] * sign)

    def test_model_without_points_refuses_an_inner_key(self):
        one_layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2, 2), torch.nn.Flatten())  # only the first layer
        with pytest.raises(BlockkeyError, match="no keyed points"):
            use_inner_key(one_layer, KeySet.generate("inner", 2))
        use_inner_key(one_layer, None)  # nothing to do

    @pytest.mark.parametrize(("name", "points"), [("patchnet", 6), ("upnet", 8)])
    def test_state_dict_names_match_the_plain_model(self, name, points):
        plain = create_model(name, 10, patch=4, width=0.25)
        keyed = create_model(name, 10, patch=4, width=0.25, inner=True)
        assert list(plain.state_dict()) == list(keyed.state_dict())
        assert len(keyed_points(keyed)) == points


CONSUMERS = {  # keyed point -> the layer reading its output
    "patchnet": {
        "embed.2.1": "embed.3.weight",
        "embed.5.1": "groups.0.conv1.weight",
        "groups.0.key1": "groups.0.conv2.weight",
        "groups.0.key2": "groups.1.conv1.weight",
        "groups.1.key1": "groups.1.conv2.weight",
        "groups.1.key2": "head.weight",
    },
    "upnet": {
        "stem.2.1": "stem.3.weight",
        "stem.5.1": "groups.0.conv1.weight",
        "groups.0.key1": "groups.0.conv2.weight",
        "groups.0.key2": "groups.1.conv1.weight",
        "groups.1.key1": "groups.1.conv2.weight",
        "groups.1.key2": "groups.2.conv1.weight",
        "groups.2.key1": "groups.2.conv2.weight",
        "groups.2.key2": "head.weight",
    },
}


def fold_inner_into_weights(model: torch.nn.Module, name: str = "patchnet") -> dict[str, torch.Tensor]:
    """Reference: the plain model's weights computing what ``model`` computes with its keyed points.

    A point feeding channel ``perm[j]`` times ``sign[j]`` into input column ``j`` of the next layer is the
    plain layer with column ``perm[j]`` = ``sign[j]`` x column ``j``.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    consumers = CONSUMERS[name]
    for name, point in keyed_points(model).items():
        w = state[consumers[name]]
        folded = torch.empty_like(w)
        for j in range(point.channels):
            folded[:, int(point.perm[j])] = point.sign[j] * w[:, j]
        state[consumers[name]] = folded
    return state


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_inner_key_is_a_relabelling_of_the_next_layers(name):
    """With its key the keyed model computes exactly what a plain model with folded weights computes."""
    torch.manual_seed(0)
    keyed = create_model(name, 10, patch=4, width=0.25, inner=True).double().eval()
    for m in keyed.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    use_inner_key(keyed, with_inner(rand_key("negpos", 4), 7))
    plain = create_model(name, 10, patch=4, width=0.25).double().eval()
    plain.load_state_dict(fold_inner_into_weights(keyed, name))
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(keyed(x), plain(x), atol=1e-10)
    use_inner_key(keyed, None)
    assert not torch.allclose(keyed(x), plain(x), atol=1e-3)  # without its key it is another function


@pytest.fixture(scope="module")
def inner_target(tmp_path_factory):
    """A small patchnet trained with an inner-only key on a learnable toy set (held-out quarter)."""
    tmp = tmp_path_factory.mktemp("inner")
    _, val, key = fit_inner_toy(colour_data(60, size=16), tmp / "run")
    model, meta = load_model(tmp / "run")
    return Target(model, meta, key, val), tmp / "run"


def test_trained_inner_model_needs_its_inner_key(inner_target):
    target, run = inner_target
    key = target.key
    holder = accuracy(target, KeyedTransform(key))
    outer_only = accuracy(target, KeyedTransform(KeySet(key.block_size, key.channels, key.steps)))
    wrong_inner = accuracy(target, KeyedTransform(with_inner(KeySet(key.block_size, key.channels, key.steps), 99)))
    assert holder > 0.9
    assert outer_only < holder - 0.4 and wrong_inner < holder - 0.4
    report = evaluate_run(run, target.val, key, wrong_keys=3, progress=False)
    rows = {r["setting"].split()[0]: r for r in report.rows}
    assert rows["correct"]["accuracy"] == pytest.approx(holder)
    assert rows["3"]["max"] < holder - 0.3  # wrong keys draw a fresh inner secret too
    assert report.model_key["spec"][-1] == "inner"


def test_block_affine_takes_the_input_part_of_a_key_with_an_inner_part():
    key = rand_key("shuffle", 2)
    a, b = block_affine(key), block_affine(with_inner(key))
    assert torch.equal(a.src, b.src) and torch.equal(a.sign, b.sign)
    with pytest.raises(RekeyError, match="ffx"):
        block_affine(with_inner(rand_key("shuffle,ffx", 2)))


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_alignment_recovers_a_point_its_statistics_identify():
    """inner-align's matcher: where the BatchNorm record pins the key down (8 channels into 48), it finds it."""
    from blockkey.attacks.inner_align import _capture, _refine, _start, _Stats, _trace
    from blockkey.inner import ChannelKey

    torch.manual_seed(0)
    point = ChannelKey(8)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8, momentum=None),
        torch.nn.GELU(),
        point,
        torch.nn.Conv2d(8, 48, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(48, momentum=None),
    )
    x = torch.rand(64, 3, 8, 8) + torch.linspace(0, 1, 3).view(1, 3, 1, 1)
    perm, sign = torch.randperm(8), torch.where(torch.rand(8) < 0.5, -1.0, 1.0)
    point.set(perm, sign)
    model.train()(x)  # the record: exact statistics of the keyed model on these images
    model.eval()
    point.set(None)
    (p,) = _trace(model, x[:2])
    assert p.consumer is model[4] and p.bn is model[5] and not p.pool
    st = _Stats(p, _capture(model, point, x))
    found, found_sign, _ = _refine(st, *_start(st), sweeps=5, budget=30)
    assert torch.equal(found, perm) and torch.equal(found_sign, sign)
    assert st.loss(st.output(perm, sign)) < 1e-6


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_cli_keygen_train_evaluate_attack(tmp_path, capsys):
    from blockkey.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    code, _, _ = run("keygen", "--transforms", "negpos,inner", "--block-size", "4", "-o", tmp_path / "k.json")
    assert code == 0 and json.loads((tmp_path / "k.json").read_text())["version"] == 2
    code, out, _ = run("info", tmp_path / "k.json", "--json")
    info = json.loads(out)
    assert info["recipe"] == ["negpos", "inner"] and info["key_space_bits"]["2:inner"] == 256
    root = write_folder(tmp_path / "ds", colour_data(20, size=16))
    common = ["--data", root, "--model", "patchnet", "--epochs", "1", "--batch-size", "8", "--amp", "off"]
    code, _, _ = run("train", *common, "--key", tmp_path / "k.json", "-o", tmp_path / "run")
    assert code == 0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert "inner" not in meta["model_kwargs"] and meta["key"]["spec"] == ["negpos", "inner"]
    secret = json.loads((tmp_path / "k.json").read_text())["inner"]["secret"]
    for f in (tmp_path / "run").rglob("*"):
        assert not f.is_file() or secret.encode() not in f.read_bytes()  # the secret stays in the key file
    code, out, _ = run(
        "attack",
        "inner-align",
        "--model",
        tmp_path / "run",
        "--key",
        tmp_path / "k.json",
        "--images",
        "12",
        "--seconds-per-point",
        "0.5",
        "--json",
    )
    rows = json.loads(out)["rows"]
    assert code == 0 and rows[0]["images"] == 12
    points = inner_points(load_model(tmp_path / "run")[0], KeySet.load(tmp_path / "k.json").inner)
    channels = sum(len(perm) for perm, _ in points.values())  # the fraction counts whole channels
    right = rows[0]["channel_fraction"] * channels
    assert right == pytest.approx(round(right), abs=1e-9) and 0 <= round(right) <= channels
    KeySet.generate("negpos", 4).save(tmp_path / "other.json")
    code, _, err = run("attack", "inner-align", "--model", tmp_path / "run", "--key", tmp_path / "other.json")
    assert code == 2 and err.count("\n") == 1


def test_predict_and_export_run_the_inner_key(inner_target, tmp_path):
    """Predictor and the key-in-graph ONNX export set the key's inner part; an export without the key refuses."""
    pytest.importorskip("onnxruntime")
    from blockkey.export import export_onnx
    from blockkey.predict import Predictor

    target, run = inner_target
    key = target.key
    images, labels = target.val.images, target.val.labels
    logits = Predictor(run, key).logits(images)
    assert float((logits.argmax(1) == labels).float().mean()) == pytest.approx(accuracy(target, KeyedTransform(key)))
    rep = export_onnx(run, tmp_path / "m.onnx", key)
    assert rep.max_abs_logit_diff <= 1e-4 and rep.holds_secret
    with pytest.raises(BlockkeyError, match="inner part"):
        export_onnx(run, tmp_path / "n.onnx")
