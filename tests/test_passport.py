"""Passport baseline (Fan et al. 2019, scheme V1): layers, sign loss, files, trainer, evaluation, CLI."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from blockkey.checkpoint import load_model, read_meta
from blockkey.cli import main
from blockkey.data import stratified_split
from blockkey.evaluate import evaluate_model
from blockkey.models import create_model
from blockkey.passport import PassportConv, PassportError, Passports, passport_layers, sign_loss, signature_match
from blockkey.train import TrainConfig, fit

from .helpers import colour_data, write_folder

SMALL = {"width": 0.125, "passport": True, "image_size": 16}


def small_model():
    return create_model("resnet18_cifar", 3, **SMALL)


class TestLayer:
    def test_scale_and_bias_are_the_mean_of_the_conv_of_the_passports(self):
        torch.manual_seed(0)
        layer = PassportConv(4, 6, 3, 2, 1, size=8)
        pg, pb = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        with torch.no_grad():
            layer.passport_gamma.copy_(pg)
            layer.passport_beta.copy_(pb)
        layer.attached = True
        layer.eval()
        x = torch.randn(3, 4, 8, 8)
        # Independent reference: conv2d by hand, batch norm from its running stats, affine from passports.
        w = layer.conv.weight
        gamma = torch.nn.functional.conv2d(pg, w, stride=2, padding=1).mean((0, 2, 3))
        beta = torch.nn.functional.conv2d(pb, w, stride=2, padding=1).mean((0, 2, 3))
        y = torch.nn.functional.conv2d(x, w, stride=2, padding=1)
        bn = (y - layer.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(layer.bn.running_var.view(1, -1, 1, 1) + 1e-5)
        expect = bn * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        torch.testing.assert_close(layer(x), expect)

    def test_model_without_passports_refuses_to_run(self):
        with pytest.raises(PassportError, match="needs its passports"):
            small_model()(torch.zeros(1, 3, 16, 16))

    def test_passports_are_never_in_the_state_dict(self):
        model = small_model()
        Passports.generate(model).attach(model)
        names = list(model.state_dict())
        assert not any("passport" in n or "signature" in n for n in names)
        assert len(passport_layers(model)) == 4  # every conv of the last stage (2 blocks x 2)

    def test_sign_loss_matches_its_definition_and_signature_match_counts_bits(self):
        model = small_model()
        p = Passports.generate(model, seed=1)
        p.attach(model)
        layers = passport_layers(model)
        expect = sum(
            torch.relu(0.1 - layer.scale_bias()[0] * p.tensors[f"{n}.signature"]).sum() for n, layer in layers.items()
        )
        torch.testing.assert_close(sign_loss(model), expect)
        gammas = {n: layer.scale_bias()[0].detach() for n, layer in layers.items()}
        for sign, match in ((1, 1.0), (-1, 0.0)):  # signature = +-sign(gamma): every bit / no bit reproduced
            for n, layer in layers.items():
                layer.signature.copy_(sign * torch.sign(gammas[n]))
            assert signature_match(model) == match
            hinge = sum(torch.relu(0.1 - sign * g.abs()).sum() for g in gammas.values())
            torch.testing.assert_close(sign_loss(model, alpha=2.0), 2.0 * hinge)


class TestFiles:
    def test_round_trip_mode_0600_and_fingerprint(self, tmp_path):
        p = Passports.generate(small_model())
        path = p.save(tmp_path / "m.passport")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        q = Passports.load(path)
        assert q.fingerprint == p.fingerprint and q.meta["source"] == "os-entropy"
        with pytest.raises(PassportError, match="refusing to overwrite"):
            p.save(path)

    def test_fresh_passports_differ_and_seeded_ones_repeat(self):
        m = small_model()
        assert Passports.generate(m).fingerprint != Passports.generate(m).fingerprint
        assert Passports.generate(m, seed=3).fingerprint == Passports.generate(m, seed=3).fingerprint

    def test_corrupt_missing_and_mismatched_files(self, tmp_path):
        bad = tmp_path / "bad.passport"
        bad.write_bytes(b"garbage")
        with pytest.raises(PassportError, match="not a readable passport file"):
            Passports.load(bad)
        with pytest.raises(PassportError, match="no such passport file"):
            Passports.load(tmp_path / "none")
        other = create_model("resnet18_cifar", 3, width=0.25, passport=True, image_size=16)
        with pytest.raises(PassportError, match="do not fit this model"):
            Passports.generate(other).attach(small_model())
        with pytest.raises(PassportError, match="no passport layers"):
            Passports.generate(small_model()).attach(create_model("resnet18_cifar", 3, width=0.125))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small passport ResNet-18 trained on the toy colour task: run dir, its passports, validation data.

    30 epochs at lr 0.02: the sign loss slows learning, and 8 epochs at 0.01 left one class unlearnt
    (66.7%) on some CPUs, seeds and thread counts. This schedule reached 100% in every case checked
    (15 of seeds 0-3 x ATEN_CPU_CAPABILITY avx2/avx512 x 1/2 threads, and seeds 4-5; docs/reliability.md).
    """
    tmp = tmp_path_factory.mktemp("passport")
    train, val = stratified_split(colour_data(60, size=16), 0.25, 0)
    cfg = TrainConfig(model="resnet18_cifar", model_kwargs=SMALL, epochs=30, batch_size=16, lr=0.02, amp="off")
    passports = Passports.generate(small_model(), seed=0)
    fit(train, val, None, cfg, tmp / "run", progress=False, log=lambda s: None, passports=passports)
    return tmp / "run", passports, val


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_correct_passports_work_forged_ones_collapse_and_signature_is_embedded(trained):
    run, passports, val = trained
    model, meta = load_model(run)
    assert meta["passport"]["fingerprint"] == passports.fingerprint
    report = evaluate_model(model, meta, val, None, passports=passports, wrong_keys=10, progress=False)
    correct, forged = report.rows
    assert correct["setting"] == "correct passports" and correct["accuracy"] > 0.9
    assert correct["signature_match"] == 1.0  # the sign loss embedded every bit
    # 3 classes (chance 33%); on this easy toy the shortcut paths around the last stage keep some accuracy
    # (a forged set now and then leaves it intact: the mean over 10 ranged 33-90% across CPUs, threads and
    # seeds), so what is asserted is that forged passports lose accuracy on average and that they can take
    # the model down: the worst of 10 forged sets was at most 66.7% (often chance) in every case checked.
    assert forged["accuracy"] < correct["accuracy"]
    assert forged["min"] <= correct["accuracy"] - 0.3
    assert 0.3 < forged["signature_match"] < 0.7  # forged passports reproduce about half the bits


def test_signature_without_sign_loss_is_not_embedded(tmp_path):
    train, _ = stratified_split(colour_data(60, size=16), 0.25, 0)
    cfg = TrainConfig(
        model="resnet18_cifar", model_kwargs=SMALL, epochs=2, batch_size=16, lr=0.05, amp="off", sign_loss=0.0
    )
    passports = Passports.generate(small_model(), seed=5)
    fit(train, None, None, cfg, tmp_path / "run", progress=False, log=lambda s: None, passports=passports)
    model, _ = load_model(tmp_path / "run")
    passports.attach(model)
    assert signature_match(model) < 0.75  # the bits only match where the sign loss pushes them


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_passports_not_in_checkpoint_files(trained):
    run, passports, _ = trained
    needle = passports.tensors[sorted(passports.tensors)[0]].numpy().tobytes()[:64]
    for f in run.rglob("*"):
        if f.is_file():
            assert needle not in f.read_bytes(), f


def test_trainer_refuses_a_passport_model_without_passports_and_key_with_passports(tmp_path):
    train, _ = stratified_split(colour_data(10, size=16), 0.25, 0)
    cfg = TrainConfig(model="resnet18_cifar", model_kwargs=SMALL, epochs=1, batch_size=8, amp="off")
    with pytest.raises(PassportError, match="give it passports"):
        fit(train, None, None, cfg, tmp_path / "a", progress=False, log=lambda s: None)


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_cli_train_and_evaluate(tmp_path, capsys):
    root = write_folder(tmp_path / "ds", colour_data(30, size=16))
    out = tmp_path / "run"
    base = ["train", "--data", str(root), "--model", "resnet18_cifar", "--epochs", "1", "--batch-size", "16"]
    assert main([*base, "--protection", "passport", "-o", str(out)]) == 0
    pfile = tmp_path / "run.passport"
    assert stat.S_IMODE(os.stat(pfile).st_mode) == 0o600
    assert "wrote new passports" in capsys.readouterr().err
    capsys.readouterr()
    ev = ["evaluate", "--model", str(out), "--passport", str(pfile), "--wrong-keys", "2", "--json"]
    assert main(ev) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["setting"] for r in doc["rows"]] == ["correct passports", "2 forged passports"]
    assert "signature_match" in doc["rows"][0]
    # one-line errors
    assert main(["evaluate", "--model", str(out), "--wrong-keys", "0", "--passport", str(tmp_path / "x")]) == 2
    assert "no such passport file" in capsys.readouterr().err
    assert main([*base, "--model", "fastnet", "--protection", "passport", "-o", str(tmp_path / "r2")]) == 2
    assert "has no passport variant" in capsys.readouterr().err


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_finetune_attack_on_a_passport_model_forges_its_own_passports(trained, tmp_path):
    from blockkey.attacks import Target
    from blockkey.attacks.finetune import finetune_attack

    run, passports, val = trained
    model, meta = load_model(run)
    train, _ = stratified_split(colour_data(60, size=16), 0.25, 0)
    rep = finetune_attack(
        Target(model, meta, passports, val),
        run,
        train,
        [0.5],
        tmp_path / "ft",
        layers=("last",),
        epochs=1,
        progress=False,
    )
    assert rep.recipe == ["passport"] and rep.key_holder_accuracy > 0.9
    assert rep.plain_accuracy <= rep.key_holder_accuracy  # "plain" = one forged passport set
    assert [r["variant"] for r in rep.rows] == ["fine-tune last", "scratch"]
    forged = read_meta(tmp_path / "ft" / "fine-tune-last-0.5")["passport"]["fingerprint"]
    assert forged != passports.fingerprint  # the attacker never had the owner's passports
