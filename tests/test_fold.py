"""Inner keys folded into the weights (blockkey.inner): exactness, the keyed-point reference, training, convert."""

from __future__ import annotations

import copy

import pytest
import torch

from blockkey import KeySet
from blockkey.inner import (
    ChannelKey,
    fold_optimizer_tensors,
    inner_points,
    keyed_points,
    model_points,
    set_points,
    stored_state_dict,
    use_inner_key,
    with_keyed_points,
)
from blockkey.models import create_model
from blockkey.rekey import logit_error, rekey_model

from .helpers import rand_key, with_inner

ARCHITECTURES = {  # name -> model arguments (every registry family, torchvision's ResNet-18, a timm ViT)
    "patchnet": {"patch": 4, "width": 0.25},
    "upnet": {"patch": 4, "width": 0.25},
    "fullnet": {"patch": 4, "width": 0.25},
    "fastnet": {"width": 0.25},
    "resnet18_cifar": {"width": 0.125},
    "convmixer": {"patch": 4, "dim": 32, "depth": 2},
    "vit": {"patch": 4, "dim": 32, "depth": 2, "heads": 2},
    "tablenet": {"patch": 4, "width": 0.25},
    "tv_resnet18": {},
    "timm_vit_tiny_patch16_224": {"patch": 4, "image_size": 16},
}
#: the view keys a layer through a forward pre-hook; nn.TransformerEncoderLayer reads its linear layers'
#: weights itself (its fast path and nn.MultiheadAttention's out_proj), so the view misses them
VIEW_MISSES = {"vit"}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    if name.startswith("timm_"):
        pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = create_model(name, 10, **ARCHITECTURES[name]).double().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return model


KEY = with_inner(rand_key("negpos", 4), 7)
X = torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fold_then_unfold_is_bit_exact(name):
    model = build(name)
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    points = model_points(model)
    assert points and all(model.get_submodule(p.consumer).weight.shape[1] == p.channels for p in points)
    use_inner_key(model, KEY)  # the stored weights unfolded: the key holder's plain network
    changed = [
        p.consumer
        for p in points
        if not torch.equal(model.state_dict()[f"{p.consumer}.weight"], stored[f"{p.consumer}.weight"])
    ]
    assert len(changed) == len(points)  # every consumer is relabelled
    again = stored_state_dict(model)
    assert all(torch.equal(again[k], stored[k]) for k in stored)  # folding gives the stored weights back
    use_inner_key(model, with_inner(rand_key("negpos", 4), 8))  # another key, then back: still exact
    use_inner_key(model, None)
    assert all(torch.equal(model.state_dict()[k], stored[k]) for k in stored)


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in VIEW_MISSES])
def test_unfolded_model_computes_what_the_keyed_point_view_computes(name):
    """The fold against the gather: ChannelKey modules in front of every consumer, set from the key."""
    model = build(name)
    view = set_points(with_keyed_points(model), KEY)
    with torch.no_grad():
        keyed = view(X)
        use_inner_key(model, KEY)
        plain = model(X)
        assert torch.allclose(keyed, plain, rtol=0, atol=1e-10 * plain.abs().max())
        use_inner_key(model, None)
        assert not torch.allclose(model(X), plain, atol=1e-6)  # the stored form is another function


CONSUMERS = {  # the version 0.1 keyed points of the block-aligned families -> the layer reading each
    "patchnet": {
        "embed.2.1": "embed.3",
        "embed.5.1": "groups.0.conv1",
        "groups.0.key1": "groups.0.conv2",
        "groups.0.key2": "groups.1.conv1",
        "groups.1.key1": "groups.1.conv2",
        "groups.1.key2": "head",
    },
    "upnet": {
        "stem.2.1": "stem.3",
        "stem.5.1": "groups.0.conv1",
        "groups.0.key1": "groups.0.conv2",
        "groups.0.key2": "groups.1.conv1",
        "groups.1.key1": "groups.1.conv2",
        "groups.1.key2": "groups.2.conv1",
        "groups.2.key1": "groups.2.conv2",
        "groups.2.key2": "head",
    },
}


def set_channel_keys(model: torch.nn.Module, key: KeySet) -> None:
    """Version 0.1's path: the ChannelKey modules of an ``inner=True`` model set from the key (a gather)."""
    for name, (perm, sign) in inner_points(model, key.inner).items():
        keyed_points(model)[name].set(perm, sign)


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_fold_reproduces_the_keyed_points_of_version_01(name):
    """Runs trained with 0.1's keyed points hold exactly the stored form: the same names, perms, consumers."""
    torch.manual_seed(0)
    old = create_model(name, 10, patch=4, width=0.25, inner=True).double().eval()
    for m in old.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    assert {p.name: p.consumer for p in model_points(old)} == CONSUMERS[name]
    assert {n: p.signs for n, p in keyed_points(old).items()} == {p.name: p.signs for p in model_points(old)}
    set_channel_keys(old, KEY)
    new = create_model(name, 10, patch=4, width=0.25).double().eval()
    new.load_state_dict(old.state_dict())  # the file 0.1 wrote
    use_inner_key(new, KEY)
    # an independent fold: plain column perm[j] = sign[j] x stored column j, one column at a time
    reference = {k: v.clone() for k, v in old.state_dict().items()}
    for point_name, consumer in CONSUMERS[name].items():
        point, w = keyed_points(old)[point_name], old.state_dict()[f"{consumer}.weight"]
        for j in range(point.channels):
            reference[f"{consumer}.weight"][:, int(point.perm[j])] = point.sign[j] * w[:, j]
    assert all(torch.equal(new.state_dict()[k], reference[k]) for k in reference)
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(old(x), new(x), atol=1e-10)


def _train(model: torch.nn.Module, opt_name: str, steps: int = 5) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(3)
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-2)
    model.train()
    for _ in range(steps):
        x = torch.rand(8, 3, 16, 16, dtype=torch.float64, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{k}": v
        for i, s in opt.state_dict()["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    }


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_with_keyed_points_equals_training_plain_then_folding(opt_name):
    """The identity the fold rests on: the same seed trained through 0.1's gathers and trained plain (what
    ``fit`` does now) reach the same stored weights and optimizer state, to float64 rounding."""
    torch.manual_seed(0)
    keyed = create_model("patchnet", 10, patch=4, width=0.25, inner=True).double()
    torch.manual_seed(0)
    plain = create_model("patchnet", 10, patch=4, width=0.25).double()
    set_channel_keys(keyed, KEY)
    use_inner_key(plain, KEY)  # the seeded init read as stored weights, unfolded
    opt_keyed, opt_plain = _train(keyed, opt_name), _train(plain, opt_name)
    a, b = keyed.state_dict(), stored_state_dict(plain)
    assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()) < 1e-9
    assert any(not torch.equal(plain.state_dict()[k], b[k]) for k in b)  # the plain weights are not stored
    sa, sb = _opt_tensors(opt_keyed), fold_optimizer_tensors(plain, opt_plain, _opt_tensors(opt_plain))
    assert sa.keys() == sb.keys() and max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-9
    back = fold_optimizer_tensors(plain, opt_plain, sb, unfold=True)
    assert all(torch.equal(back[k], v) for k, v in _opt_tensors(opt_plain).items())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_convert_folds_an_inner_key_into_any_architecture_exactly(name):
    model = build(name)
    key = KeySet.generate("inner", 4)
    shape = (3, 16, 16)
    converted, norm = rekey_model(model, None, None, key)
    assert logit_error(model, None, None, converted, norm, key, shape) <= 1e-6
    assert logit_error(model, None, None, converted, norm, None, shape) > 1e-3  # without the key: another function
    other = KeySet.generate("inner", 4)
    moved, norm2 = rekey_model(converted, norm, key, other)  # rekey: the old key needed, no data
    assert logit_error(model, None, None, moved, norm2, other, shape) <= 1e-6
    assert logit_error(model, None, None, moved, norm2, key, shape) > 1e-3


def test_convert_with_input_and_inner_key():
    model = build("patchnet")
    key = KeySet.generate("shuffle,negpos,inner", 4)
    converted, norm = rekey_model(model, None, None, key)
    assert logit_error(model, None, None, converted, norm, key, (3, 16, 16)) <= 1e-6
    outer_only = KeySet(key.block_size, key.channels, key.steps)
    assert logit_error(model, None, None, converted, norm, outer_only, (3, 16, 16)) > 1e-3


def test_view_and_wrappers_find_the_same_points():
    """DDP/EMA/compile wrappers: the points and the stored state dict see through them."""
    from torch.optim.swa_utils import AveragedModel

    model = build("fastnet")
    use_inner_key(model, KEY)
    ema = AveragedModel(model, use_buffers=True)
    sd = stored_state_dict(ema)
    assert all(torch.equal(sd[f"module.{k}"], v) for k, v in stored_state_dict(model).items())
    view = with_keyed_points(model)
    assert [type(view.get_submodule(p.consumer).inner_point) for p in model_points(view)] == [ChannelKey] * len(
        model_points(model)
    )
    assert list(view.state_dict()) == list(model.state_dict())  # the view's points hold no state
    again = copy.deepcopy(model)
    assert torch.equal(stored_state_dict(again)["head.weight"], stored_state_dict(model)["head.weight"])


@pytest.fixture(scope="module")
def public_and_stolen(tmp_path_factory):
    """A "public" plain patchnet, a protected model fine-tuned from it, and one trained from its own init."""
    from blockkey.data import stratified_split
    from blockkey.train import TrainConfig, fit

    from .helpers import colour_data

    tmp = tmp_path_factory.mktemp("refmatch")
    train, val = stratified_split(colour_data(60, size=16), 0.25, 0)
    key = with_inner(rand_key("negpos", 4, seed=5), 12)
    common = {"model": "patchnet", "model_kwargs": {"patch": 4, "width": 0.25}, "batch_size": 16, "amp": "off"}
    quiet = {"progress": False, "log": lambda s: None}
    fit(train, None, None, TrainConfig(**common, epochs=6, lr=0.05), tmp / "public", **quiet)
    tuned = TrainConfig(**common, epochs=2, lr=0.005, init_from=str(tmp / "public"), seed=1)
    fit(train, None, key, tuned, tmp / "tuned", **quiet)
    fit(train, None, key, TrainConfig(**common, epochs=6, lr=0.05, seed=2), tmp / "private", **quiet)
    return tmp, key, val


def test_fine_tuning_from_a_plain_run_starts_from_its_network(public_and_stolen):
    """init_from a plain run with an inner key: the key holder's network is the source's, nudged."""
    from blockkey.checkpoint import load_model

    tmp, key, _ = public_and_stolen
    public = load_model(tmp / "public")[0]
    tuned = use_inner_key(load_model(tmp / "tuned")[0], key)
    stolen = load_model(tmp / "tuned")[0]
    w = "groups.0.conv2.weight"
    near = float((tuned.state_dict()[w] - public.state_dict()[w]).norm() / public.state_dict()[w].norm())
    far = float((stolen.state_dict()[w] - public.state_dict()[w]).norm() / public.state_dict()[w].norm())
    assert near < 0.2 and far > 0.8


def test_reference_match_recovers_a_public_derived_key_and_not_a_private_one(public_and_stolen):
    from blockkey.attacks import Target, accuracy
    from blockkey.attacks.reference_match import load_reference_state, reference_match_attack
    from blockkey.checkpoint import load_model
    from blockkey.transforms import KeyedTransform

    tmp, key, val = public_and_stolen
    reference = load_reference_state(tmp / "public")
    rows = {}
    for name in ("tuned", "private"):
        model, meta = load_model(tmp / name)
        target = Target(model, meta, key, val)
        report = reference_match_attack(target, reference, "public")
        rows[name] = report.rows[0]
        assert report.key_holder_accuracy == pytest.approx(accuracy(target, KeyedTransform(key)))
    assert rows["tuned"]["channel_fraction"] > 0.9 and rows["private"]["channel_fraction"] < 0.2
    assert rows["tuned"]["attacker_accuracy"] > 0.9 > 0.6 > rows["private"]["attacker_accuracy"], rows


def test_cli_convert_and_rekey_an_inner_key_into_a_trained_model(public_and_stolen, tmp_path, capsys):
    """blockkey convert/rekey with an inner key: the key holder keeps the plain model's accuracy, the same
    weights without the inner key fall to the toy's chance, and a wrong inner key does not help."""
    from blockkey.attacks import Target, accuracy
    from blockkey.checkpoint import load_model
    from blockkey.cli import main
    from blockkey.evaluate import evaluate_run
    from blockkey.transforms import KeyedTransform

    tmp, _, val = public_and_stolen
    k1, k2 = KeySet.generate("shuffle,negpos,inner", 4), KeySet.generate("shuffle,negpos,inner", 4)
    k1.save(tmp_path / "k1.json")
    k2.save(tmp_path / "k2.json")
    assert (
        main(["convert", "--model", str(tmp / "public"), "--key", str(tmp_path / "k1.json"), "-o", str(tmp_path / "c")])
        == 0
    )
    args = ["rekey", "--model", str(tmp_path / "c"), "--old-key", str(tmp_path / "k1.json")]
    assert main([*args, "--new-key", str(tmp_path / "k2.json"), "-o", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    plain = evaluate_run(tmp / "public", val, None, wrong_keys=0, progress=False).rows[0]["accuracy"]
    assert plain > 0.9
    for run, key in ((tmp_path / "c", k1), (tmp_path / "r", k2)):
        rows = evaluate_run(run, val, key, wrong_keys=0, progress=False).rows
        assert rows[0]["accuracy"] == pytest.approx(plain, abs=1 / len(val))
        outer_only = KeySet(key.block_size, key.channels, key.steps)
        model, meta = load_model(run)
        target = Target(model, meta, key, val)
        assert accuracy(target, KeyedTransform(outer_only)) < 0.6  # the input key alone: near the toy's chance
        wrong = KeySet(key.block_size, key.channels, key.steps, inner=KeySet.generate("inner", 4).inner)
        assert accuracy(target, KeyedTransform(wrong)) < 0.6


def test_epoch_states_hold_folded_weights(tmp_path):
    """A run stopped after its first epoch leaves a state whose weights are in the stored (folded) form:
    next to the finished run's stored weights, far from their unfolded form (momenta: the equivalence test
    above checks their fold)."""
    from blockkey.checkpoint import load_weights
    from blockkey.data import stratified_split
    from blockkey.train import TrainConfig, fit

    from .helpers import colour_data

    train, _ = stratified_split(colour_data(20, size=16), 0.25, 0)
    cfg = TrainConfig(
        model="patchnet", model_kwargs={"patch": 4, "width": 0.25}, epochs=2, batch_size=16, lr=0.01, amp="off"
    )

    def stop_after_first(line: str) -> None:
        if line.startswith("epoch 2/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(train, None, KEY, cfg, tmp_path / "run", progress=False, log=stop_after_first)
    state = load_weights(tmp_path / "run" / "state-0001" / "model.safetensors")
    fit(train, None, KEY, cfg, tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    final = load_weights(tmp_path / "run" / "model.safetensors")
    model = create_model("patchnet", 3, patch=4, width=0.25)
    model.load_state_dict(final)
    use_inner_key(model, KEY)
    unfolded = model.state_dict()
    for p in model_points(model):
        w = f"{p.consumer}.weight"
        assert (state[w] - final[w]).norm() < 0.3 * (state[w] - unfolded[w]).norm()


def test_fit_gives_a_block_aligned_model_the_keys_block_size(tmp_path):
    """The model-argument policy lives in the library: fit sets patch from the key where it is not given."""
    from blockkey.train import TrainConfig, fit

    from .helpers import colour_data

    cfg = TrainConfig(model="patchnet", model_kwargs={"width": 0.25}, epochs=1, batch_size=4, amp="off")
    meta = fit(colour_data(4, size=8), None, rand_key("shuffle", 2), cfg, tmp_path / "r", progress=False, log=print)
    assert meta.model_kwargs == {"width": 0.25, "patch": 2}


@pytest.mark.parametrize("name", ["fullnet", "resnet18_cifar"])
def test_the_folded_network_runs_the_plain_networks_operations(name):
    """No op on the hot path: the traced graph of the key holder's network is the plain network's."""
    plain = build(name)
    folded = use_inner_key(copy.deepcopy(plain), KEY)

    def graph(m: torch.nn.Module) -> str:
        return str(torch.export.export(m, (X[:1],)).graph)

    assert graph(plain) == graph(folded) and "index_select" not in graph(folded)
    view = set_points(with_keyed_points(plain), KEY)  # 0.1's path: a gather at every point
    assert "index_select" in graph(view)
