"""The attack suite on small models trained here: each attack does what it claims."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from blockkey import KeyedTransform
from blockkey.attacks import Target, accuracy
from blockkey.attacks.adapter import BlockAdapter, adapter_attack
from blockkey.attacks.key_search import key_search_attack, random_keys_attack
from blockkey.attacks.known_plaintext import key_agreement, known_plaintext_attack, recover_key
from blockkey.checkpoint import load_model, read_meta
from blockkey.data import Normalize, stratified_split
from blockkey.errors import BlockkeyError
from blockkey.functional import compile_block_plan
from blockkey.rekey import block_affine
from blockkey.train import TrainConfig, fit

from .helpers import colour_data, images, rand_key, saved_figures, write_folder


class TestKnownPlaintext:
    @pytest.mark.parametrize("recipe", ["shuffle", "negpos", "shuffle,negpos", "negpos,shuffle,negpos"])
    def test_one_pair_recovers_a_shuffle_negpos_key_exactly(self, recipe):
        key = rand_key(recipe, 4, seed=3)
        x = images(1, 3, 32, 32)
        plan, cand = recover_key(x, KeyedTransform(key).encode(x), 4, ffx=False)
        agree = key_agreement(plan, compile_block_plan(key))
        assert agree == {"source_fraction": 1.0, "position_fraction": 1.0, "table_fraction": 1.0}
        assert (cand == 1).all()
        fresh = images(3, 3, 32, 32)
        assert torch.equal(KeyedTransform(plan).encode(fresh), KeyedTransform(key).encode(fresh))

    @pytest.mark.parametrize("recipe", ["ffx", "shuffle,negpos,ffx", "ffx,negpos,shuffle"])
    def test_ffx_tables_fill_in_with_more_pairs(self, recipe):
        key = rand_key(recipe, 4, seed=4, password="attack-me")
        t, true = KeyedTransform(key), compile_block_plan(key)
        one = images(1, 3, 32, 32)
        a1 = key_agreement(recover_key(one, t.encode(one), 4, ffx=True)[0], true)
        assert a1["source_fraction"] == 1.0 and a1["table_fraction"] < 0.7  # <= 64 of 256 values per position seen
        many = images(80, 3, 32, 32)  # 5120 blocks: every value of every position seen
        plan, _ = recover_key(many, t.encode(many), 4, ffx=True)
        assert key_agreement(plan, true)["table_fraction"] == 1.0
        fresh = images(2, 3, 32, 32)
        assert torch.equal(KeyedTransform(plan).encode(fresh), t.encode(fresh))
        assert torch.equal(KeyedTransform(plan).inverse(t(fresh)), fresh)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="one shape"):
            recover_key(images(1, 3, 8, 8), images(2, 3, 8, 8), 4, ffx=False)


def trained_target(tmp, key, size: int, norm: str = "channel"):
    """A small patchnet trained with ``key`` on a learnable toy set: its Target (held-out quarter) and train set."""
    train, val = stratified_split(colour_data(60, size=size), 0.25, 0)
    kwargs = {"patch": key.block_size, "width": 0.25}
    cfg = TrainConfig(model="patchnet", model_kwargs=kwargs, epochs=8, batch_size=16, lr=0.05, amp="off", norm=norm)
    fit(train, val, key, cfg, tmp / "run", progress=False, log=lambda s: None)
    model, meta = load_model(tmp / "run")
    return Target(model, meta, key, val), train


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    return trained_target(tmp_path_factory.mktemp("attacks"), rand_key("shuffle,negpos", 4, seed=21), 16, "position")


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_known_plaintext_attack_report(protected):
    target, _ = protected
    rep = known_plaintext_attack(target, [1, 2])
    assert rep.key_holder_accuracy > 0.8
    for row in rep.rows:
        assert row["source_fraction"] == 1.0 and row["attacker_accuracy"] == rep.key_holder_accuracy
    doc = json.loads(json.dumps(rep.to_json()))
    assert doc["attack"] == "known-plaintext" and "| 1 pair |" in rep.to_markdown()


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_adapter_identity_init_and_exact_solution(protected):
    target, _ = protected
    plain = accuracy(target, BlockAdapter(4, 3, target.normalize, table=False))
    assert plain == pytest.approx(accuracy(target, None))  # identity init = plain images
    exact = BlockAdapter(4, 3, target.normalize, table=False)  # the key as a linear map: the holder's accuracy
    a = block_affine(target.key)
    with torch.no_grad():
        exact.linear.weight.zero_()
        exact.linear.weight[torch.arange(48), a.src] = a.sign.float()
        exact.linear.bias.copy_(a.offset.float())
    assert accuracy(target, exact) == pytest.approx(accuracy(target, KeyedTransform(target.key)))


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_adapter_attack_recovers_accuracy_on_a_shuffle_negpos_model(protected, tmp_path, monkeypatch):
    target, train = protected
    figures = saved_figures(monkeypatch)
    rep = adapter_attack(target, train, [0.5], epochs=25, progress=False)
    row = rep.rows[0]
    assert rep.plain_accuracy < rep.key_holder_accuracy - 0.2  # the key matters on this model
    assert row["attacker_accuracy"] > rep.plain_accuracy + 0.15  # and the adapter wins most of it back
    rep.plot(tmp_path / "curve.png", "data_fraction")
    (ax,) = figures[0].axes  # the row, then the key holder and chance as horizontal lines
    curve, holder, chance = ax.lines
    assert list(curve.get_xdata()) == [0.5] and list(curve.get_ydata()) == [100 * row["attacker_accuracy"]]
    assert list(holder.get_ydata()) == [100 * rep.key_holder_accuracy] * 2 and list(
        chance.get_ydata()
    ) == pytest.approx([100 / 3] * 2)
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (600, 384)  # 5 x 3.2 inches at 120 dpi


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_training_an_adapter_leaves_the_stolen_model_as_it_was(protected):
    from blockkey.attacks.adapter import train_adapter

    target, train = protected
    before = {n: p.requires_grad for n, p in target.model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in target.model.named_parameters()}
    train_adapter(target, train, table=False, epochs=1)
    assert {n: p.requires_grad for n, p in target.model.named_parameters()} == before
    assert all(torch.equal(p, weights[n]) for n, p in target.model.named_parameters())


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_table_adapter_starts_as_plain_images(protected):
    target, _ = protected
    t = BlockAdapter(4, 3, target.normalize, table=True)
    x = images(4, 3, 16, 16)
    norm = Normalize.from_json(target.meta["normalize"]).tensors((3, 16, 16), "cpu")
    expect = (x.float() / 255 - norm[0]) / norm[1]
    assert torch.allclose(t(x), expect, atol=1e-5) and torch.allclose(t(x.float() / 255), expect, atol=1e-5)


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_attack_cli(tmp_path, capsys, monkeypatch):
    from blockkey.cli import main

    root = write_folder(tmp_path / "ds", colour_data(20, size=16))
    key, other = rand_key("shuffle,negpos", 4, seed=1), rand_key("shuffle,negpos", 4, seed=2)
    key.save(tmp_path / "k.json")
    other.save(tmp_path / "o.json")
    train = ["train", "--data", root, "--key", tmp_path / "k.json", "--model", "patchnet", "--epochs", "2"]
    assert main([str(a) for a in [*train, "--batch-size", "8", "--amp", "off", "-o", tmp_path / "run"]]) == 0
    capsys.readouterr()
    base = ["attack", "--model", tmp_path / "run", "--key", tmp_path / "k.json"]
    assert main([str(a) for a in [*base[:1], "known-plaintext", *base[1:], "--pairs", "1", "--json"]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["attack"] == "known-plaintext" and doc["rows"][0]["source_fraction"] == 1.0
    figures = saved_figures(monkeypatch)
    args = [*base[:1], "adapter", *base[1:], "--fractions", "0.5", "--epochs", "1", "--plot", tmp_path / "a.png"]
    assert main([str(a) for a in [*args, "--json"]]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"][0]["setting"].startswith("50% of the training data") and len(figures) == 1
    curve = figures[0].axes[0].lines[0]  # the registry's x axis for the adapter: the data fraction
    assert list(curve.get_xdata()) == [0.5] and list(curve.get_ydata()) == [100 * rep["rows"][0]["attacker_accuracy"]]
    for name, extra, expect in [
        ("random-keys", ["--keys", "2", "--batch", "16"], "best of 2 random keys"),
        ("key-search", ["--keys", "2", "--iterations", "4", "--batch", "16"], "after 4 swaps/flips"),
        ("ciphertext-only", ["--images", "20"], "20 transformed images"),
        ("fine-tune", ["--fractions", "0.5", "--epochs", "1", "-o", tmp_path / "ft"], "scratch, 50%"),
        (
            "fine-tune",
            [
                "--fractions",
                "0.5",
                "--epochs",
                "1",
                "-o",
                tmp_path / "ft2",
                "--layers",
                "last",
                "--lrs",
                "0.01",
                "0.1",
                "--scratch-lrs",
                "0.2",
                "--optimizer",
                "sgd",
            ],
            "fine-tune last, lr 0.1, 50%",
        ),
    ]:
        assert main([str(a) for a in [*base[:1], name, *base[1:], *extra]]) == 0, name
        assert expect in capsys.readouterr().out, name
    assert main([str(a) for a in [*base[:1], "fine-tune", *base[1:]]]) == 2
    assert "give -o OUTDIR" in capsys.readouterr().err
    wrong = ["attack", "adapter", "--model", tmp_path / "run", "--key", tmp_path / "o.json"]
    assert main([str(a) for a in wrong]) == 2
    err = capsys.readouterr().err
    assert "is not the key of" in err and err.count("\n") == 1
    for name, extra, message in [
        ("known-plaintext", ["--pairs", "0"], "--pairs: must be an integer >= 1"),
        ("adapter", ["--fractions", "2"], "in (0, 1]"),
        ("known-plaintext", ["--fractions", "0.5"], "unrecognized arguments: --fractions"),  # options are per attack
        ("inner-align", ["--seed", "1"], "unrecognized arguments: --seed"),
        ("fine-tune", ["--lrs", "0"], "--lrs: must be a number > 0"),
        ("fine-tune", ["--layers", "middle"], "block:N"),
    ]:
        assert main([str(a) for a in [*base[:1], name, *base[1:], *extra]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def negpos_model(tmp_path_factory):
    return trained_target(tmp_path_factory.mktemp("ks"), rand_key("negpos", 2, seed=5), 8)


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
class TestKeySearch:
    def test_random_keys_reports_the_best_on_held_out_images(self, negpos_model):
        target, train = negpos_model
        rep = random_keys_attack(target, train, keys=10, batch=64, progress=False)
        r = rep.rows[0]
        assert r["batch_accuracy_max"] >= r["batch_accuracy_mean"]
        correct = r["attacker_accuracy"] * len(target.val)  # measured on the held-out images, not the batch
        assert correct == pytest.approx(round(correct), abs=1e-6) and round(correct) <= len(target.val)
        assert 60 <= r["batch_images"] <= 64 and rep.attack == "random-keys"  # stratified: 21 per class

    def test_hill_climb_from_the_complement_finds_a_working_key(self, negpos_model):
        from blockkey import KeySet, NegPos
        from blockkey.attacks.key_search import _batch, _Scorer, hill_climb

        target, train = negpos_model
        true = target.key.steps[0].mask
        start = KeySet(2, 3, (NegPos(tuple(1 - b for b in true)),))  # every bit wrong
        score = _Scorer(target, _batch(train, 96, 0))
        _, rows = hill_climb(target, score, start, 200, seed=1, progress=False)
        first, last = rows[0], rows[-1]
        assert first["position_fraction"] == 0.0 and first["attacker_accuracy"] < 0.6
        assert last["batch_accuracy"] >= first["batch_accuracy"]  # never accepts a worse key
        assert last["attacker_accuracy"] >= target_accuracy(target) - 0.05
        assert last["position_fraction"] >= 0.5

    def test_key_search_is_reproducible(self, negpos_model):
        target, train = negpos_model
        a = key_search_attack(target, train, random_keys=3, iterations=20, batch=32, seed=4, progress=False)
        b = key_search_attack(target, train, random_keys=3, iterations=20, batch=32, seed=4, progress=False)
        assert [r["attacker_accuracy"] for r in a.rows] == [r["attacker_accuracy"] for r in b.rows]
        assert len(a.rows) == 5 and a.rows[-1]["iterations"] == 20


def target_accuracy(target):
    return accuracy(target, KeyedTransform(target.key))


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-image-like uint8 images: smooth luminance, correlated channels with distinct statistics."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)

    def smooth(scale: int) -> torch.Tensor:
        base = torch.rand(n, 1, size // scale, size // scale, generator=g)
        return F.interpolate(base, size=size, mode="bilinear", align_corners=False)

    lum = 0.75 * smooth(8) + 0.25 * smooth(2)
    r = 0.9 * lum + 0.08 + 0.05 * smooth(2)
    b = 0.6 * lum + 0.1 + 0.25 * smooth(4)
    x = torch.cat([r, lum, b], 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class TestCiphertextOnly:
    @pytest.mark.parametrize("recipe", ["negpos", "shuffle", "shuffle,negpos"])
    def test_the_key_is_among_the_few_candidates(self, recipe):
        from blockkey.attacks.ciphertext_only import recover_key_ciphertext_only

        key = rand_key(recipe, 4, seed=8)
        cipher = KeyedTransform(key).encode(smooth_images(300, seed=1))
        plain = smooth_images(300, seed=2)  # other images of the same kind, unlabelled
        _, info = recover_key_ciphertext_only(cipher, plain, 4, key.recipe)
        true = compile_block_plan(key)
        best = max(key_agreement(c, true)["position_fraction"] for c in info["all_candidates"])
        assert best == 1.0
        assert info["candidates"] == {"negpos": 2, "shuffle": 8, "shuffle,negpos": 16}[recipe]

    @pytest.mark.slow  # more than 10 s on a 2-vCPU VM
    def test_with_ffx_the_clear_positions_are_still_recovered(self):
        from blockkey.attacks.ciphertext_only import recover_key_ciphertext_only

        key = rand_key("shuffle,negpos,ffx", 4, seed=10, password="ct-only")
        cipher = KeyedTransform(key).encode(smooth_images(300, seed=1))
        _, info = recover_key_ciphertext_only(cipher, smooth_images(300, seed=2), 4, key.recipe)
        true = compile_block_plan(key)
        clear = true.domain == 255
        best = max(
            int(((c.src == true.src) & (c.codes == true.codes).all(1) & clear).sum()) for c in info["all_candidates"]
        )
        # most positions FFX left clear get the right source and table (all of them on CIFAR-10: docs/attacks.md)
        assert best >= 0.8 * int(clear.sum()) > 0

    def test_ffx_positions_are_found_but_not_their_tables(self):
        from blockkey.attacks.ciphertext_only import recover_key_ciphertext_only

        key = rand_key("ffx", 4, seed=9, password="ct-only")
        cipher = KeyedTransform(key).encode(smooth_images(300, seed=1))
        plan, info = recover_key_ciphertext_only(cipher, smooth_images(300, seed=2), 4, key.recipe)
        true = compile_block_plan(key)
        assert info["ffx_positions"] == sum(key.steps[0].mask)
        assert torch.equal(plan.domain, true.domain) and torch.equal(plan.src, true.src)
        assert key_agreement(plan, true)["table_fraction"] < 0.7

    def test_swap_gains_match_brute_force_and_the_search_finds_a_planted_permutation(self):
        import random

        from blockkey.attacks.ciphertext_only import _match

        g = torch.Generator().manual_seed(0)
        n = 9
        b = torch.rand(n, n, generator=g, dtype=torch.float64)
        b = b + b.T
        pi = torch.randperm(n, generator=g)
        a = b[pi][:, pi]  # a planted permutation of b: the optimum is pi (or an automorphism of b)
        found = _match(a, b, restarts=6, rng=random.Random(0))
        assert torch.allclose(b[found][:, found], a)


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_finetune_attack_trains_what_it_says(protected, tmp_path):
    from blockkey.attacks.finetune import finetune_attack

    target, train = protected
    stolen = tmp_path / "stolen"
    cfg = TrainConfig(model="patchnet", model_kwargs={"patch": 4, "width": 0.25}, epochs=1, batch_size=16, amp="off")
    fit(train, None, target.key, cfg, stolen, progress=False, log=lambda s: None)
    model, meta = load_model(stolen)
    t = Target(model, meta, target.key, target.val)
    rep = finetune_attack(t, stolen, train, [0.5], tmp_path / "ft", epochs=2, progress=False)
    assert [r["variant"] for r in rep.rows] == ["fine-tune all", "fine-tune first", "fine-tune last", "scratch"]
    before = load_model(stolen)[0].state_dict()
    for variant, changed in [("first", "embed.0.weight"), ("last", "head.weight")]:
        after = load_model(tmp_path / "ft" / f"fine-tune-{variant}-0.5")[0].state_dict()
        moved = {n for n, p in after.items() if p.is_floating_point() and not torch.equal(p, before[n])}
        moved = {n for n in moved if "running_" not in n}  # batch-norm statistics adapt by design
        assert moved == {changed}, (variant, moved)


def test_finetune_sweep_marks_the_best_rate_per_variant_and_trains_one_block(protected, tmp_path):
    from blockkey.attacks.finetune import finetune_attack, stolen_advantage
    from blockkey.train import layer_blocks

    target, train = protected
    stolen = tmp_path / "stolen"
    cfg = TrainConfig(model="patchnet", model_kwargs={"patch": 4, "width": 0.25}, epochs=1, batch_size=16, amp="off")
    fit(train, None, target.key, cfg, stolen, progress=False, log=lambda s: None)
    model, meta = load_model(stolen)
    assert [[type(m).__name__ for m in b] for b in layer_blocks(model)][1::5] == [["Conv2d", "BatchNorm2d"], ["Linear"]]
    t = Target(model, meta, target.key, target.val)
    rep = finetune_attack(
        t,
        stolen,
        train,
        [0.5],
        tmp_path / "ft",
        layers=["block:1"],
        epochs=1,
        lrs=[1e-4, 0.05],
        scratch_lrs=[0.1],
        optimizer="adam",
        progress=False,
    )
    assert [(r["variant"], r["lr"], r["optimizer"]) for r in rep.rows] == [
        ("fine-tune block:1", 1e-4, "adam"),
        ("fine-tune block:1", 0.05, "adam"),
        ("scratch", 0.1, "adam"),
    ]
    for variant in ("fine-tune block:1", "scratch"):
        rows = [r for r in rep.rows if r["variant"] == variant]
        assert sum(r["best"] for r in rows) == 1
        assert next(r for r in rows if r["best"])["attacker_accuracy"] == max(r["attacker_accuracy"] for r in rows)
    acc = {
        r["variant"]: max(x["attacker_accuracy"] for x in rep.rows if x["variant"] == r["variant"]) for r in rep.rows
    }
    assert stolen_advantage(rep.rows) == pytest.approx(acc["fine-tune block:1"] - acc["scratch"])
    before = load_model(stolen)[0].state_dict()
    after = load_model(tmp_path / "ft" / "fine-tune-block1-lr0.05-0.5")[0].state_dict()
    moved = {n for n, p in after.items() if p.is_floating_point() and not torch.equal(p, before[n])}
    assert {n for n in moved if "running_" not in n} == {"embed.3.weight", "embed.4.weight", "embed.4.bias"}
    assert read_meta(tmp_path / "ft" / "scratch-0.5")["config"]["optimizer"] == "adam"
    with pytest.raises(BlockkeyError, match="7 blocks"):
        finetune_attack(t, stolen, train, [0.5], tmp_path / "ft2", layers=["block:7"], epochs=1, progress=False)
