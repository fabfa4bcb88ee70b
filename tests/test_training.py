"""Data, models, trainer, checkpoints and evaluation on small synthetic data the tests make."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from blockkey import KeyedTransform, KeySet
from blockkey.checkpoint import CheckpointError, copy_run_half, load_model
from blockkey.data import (
    BatchLoader,
    DataError,
    ImageTensors,
    Normalize,
    load_image_folder,
    random_cutout,
    stratified_split,
    stratified_subset,
)
from blockkey.errors import OptionError, ShapeError
from blockkey.evaluate import align_classes, evaluate_run
from blockkey.models import create_model, list_models
from blockkey.predict import Predictor
from blockkey.train import TrainConfig, fit

from .helpers import colour_data, rand_key, saved_figures, write_folder


class TestData:
    def test_image_folder_cache_and_invalidation(self, tmp_path):
        data = colour_data(5)
        root = write_folder(tmp_path / "ds", data)
        cache = tmp_path / "cache"
        a = load_image_folder(root, cache_dir=cache, workers=1)
        assert a.classes == data.classes and torch.equal(a.images, data.images) and torch.equal(a.labels, data.labels)
        files = list(cache.glob("*.npz"))
        assert len(files) == 1
        mtime = files[0].stat().st_mtime_ns
        b = load_image_folder(root, cache_dir=cache, workers=1)
        assert torch.equal(b.images, a.images) and files[0].stat().st_mtime_ns == mtime  # served from cache
        time.sleep(0.01)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "class0" / "0000.png")
        c = load_image_folder(root, cache_dir=cache, workers=1)
        assert c.images[0].sum() == 0 and len(list(cache.glob("*.npz"))) == 2  # source changed: rebuilt

    def test_errors(self, tmp_path):
        with pytest.raises(DataError, match="does not exist"):
            load_image_folder(tmp_path / "nope")
        (tmp_path / "ds" / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ds" / "a" / "x.png")
        Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "ds" / "a" / "y.png")
        with pytest.raises(DataError, match="differ in size"):
            load_image_folder(tmp_path / "ds", cache_dir="", workers=1)

    def test_stratified_split_and_subset(self):
        data = colour_data(20)
        tr, va = stratified_split(data, 0.25, seed=1)
        assert len(va) == 15 and len(tr) == 45
        assert torch.bincount(va.labels).tolist() == [5, 5, 5]
        _, va2 = stratified_split(data, 0.25, seed=1)
        assert torch.equal(va.images, va2.images)
        sub = stratified_subset(data, 30, seed=0)
        assert torch.bincount(sub.labels).tolist() == [10, 10, 10]


class TestLoader:
    def test_augment_is_a_padded_crop_or_its_flip(self):
        data = colour_data(4)
        loader = BatchLoader(data, 6, train=True, transform=None, normalize=None, seed=3)
        g = torch.Generator().manual_seed(0)
        x = data.images[:6]
        out = loader.augment(x, g)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        for i in range(6):
            crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
            assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)

    @pytest.mark.parametrize(
        ("padding", "step", "moves"), [(4, 1, range(-4, 5)), (4, 4, (-4, 0, 4)), (5, 2, range(-4, 5, 2)), (3, 4, (0,))]
    )
    def test_crop_step_moves_images_by_its_multiples_only(self, padding, step, moves):
        """Images of distinct pixels (so a crop names its move): every move a multiple of the step within the
        padding, each such move drawn (with 400 draws), the others never."""
        x = (torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8) + 1).expand(400, 3, 8, 8).contiguous()
        data = ImageTensors(x, torch.zeros(400, dtype=torch.long), ("a",))
        loader = BatchLoader(
            data, 400, train=True, transform=None, normalize=None, crop_padding=padding, crop_step=step, flip=False
        )
        out = loader.augment(x, torch.Generator().manual_seed(0))
        padded = torch.nn.functional.pad(x[:1], (8, 8, 8, 8))[0]
        seen = set()
        for img in out:
            found = [
                (dy, dx)
                for dy in range(-8, 9)
                for dx in range(-8, 9)
                if torch.equal(img, padded[:, 8 - dy : 16 - dy, 8 - dx : 16 - dx])
            ]
            assert len(found) == 1
            seen.add(found[0])
        assert seen == {(dy, dx) for dy in moves for dx in moves}

    def test_crop_step_needs_in_memory_data(self, tmp_path):
        from blockkey.data import make_loader, open_image_folder_stream

        stream = open_image_folder_stream(TestStream().make(tmp_path), 16, workers=0)
        with pytest.raises(OptionError, match="in-memory"):
            make_loader(stream, 8, train=True, transform=None, normalize=None, crop_step=4)
        with pytest.raises(OptionError, match="in-memory"):  # refused before the run folder is made
            fit(stream, None, None, TrainConfig(crop_step=4, epochs=1), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
        with pytest.raises(OptionError, match=">= 1"):
            BatchLoader(colour_data(4), 4, train=True, transform=None, normalize=None, crop_step=0)
        with pytest.raises(OptionError, match="crop_step"):
            TrainConfig(crop_step=0)

    @pytest.mark.parametrize("size", [3, 5, 20])
    def test_cutout_zeroes_one_square_inside_each_image_and_nothing_else(self, size):
        """Each image loses exactly one size x size square (clipped to the image) lying wholly inside it,
        at places that vary and that the generator's seed fixes; the other pixels are untouched; evaluation
        batches get no cutout, training batches one square per image."""
        x = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
        out = random_cutout(x, size, torch.Generator().manual_seed(1))
        assert torch.equal(out, random_cutout(x, size, torch.Generator().manual_seed(1)))
        s = min(size, 8)
        corners = set()
        for img in out:
            zero = img == 0
            assert torch.equal(zero, zero[:1].expand_as(zero))  # every channel alike
            ys, xs = zero[0].nonzero(as_tuple=True)
            top, left = int(ys.min()), int(xs.min())
            square = torch.zeros(8, 8, dtype=torch.bool)
            square[top : top + s, left : left + s] = True
            assert torch.equal(zero[0], square) and top + s <= 8 and left + s <= 8
            corners.add((top, left))
        assert len(corners) > 1 if s < 8 else corners == {(0, 0)}
        data = ImageTensors(torch.full((12, 3, 8, 8), 9, dtype=torch.uint8), torch.arange(12) % 3, ("a", "b", "c"))
        train = BatchLoader(data, 6, train=True, transform=None, normalize=None, crop_padding=0, flip=False, cutout=3)
        evaluation = BatchLoader(data, 6, train=False, transform=None, normalize=None, cutout=3)
        xt, _ = next(iter(train))
        assert ((xt == 0).all(1).flatten(1).sum(1) == 9).all()  # exactly one 3x3 square an image
        xe, _ = next(iter(evaluation))
        assert torch.equal(xe, data.images[:6].float() / 255)

    def test_order_depends_only_on_seed_and_epoch(self):
        data = colour_data(10)
        a = BatchLoader(data, 8, train=True, transform=None, normalize=None, seed=5)
        b = BatchLoader(data, 8, train=True, transform=None, normalize=None, seed=5)
        a.set_epoch(2)
        b.set_epoch(2)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        b.set_epoch(3)
        assert not torch.equal(next(iter(a))[1], next(iter(b))[1])

    def test_eval_batches_are_key_then_normalise(self):
        data = colour_data(5)
        key = rand_key("shuffle,negpos,ffx", 4)
        t = KeyedTransform(key)
        norm = Normalize.fit(data, t, "position")
        loader = BatchLoader(data, 7, train=False, transform=t, normalize=norm)
        x, y = next(iter(loader))
        mean, std = norm.tensors(data.image_shape, "cpu")
        assert torch.allclose(x, (t(data.images[:7]) - mean) / std)
        assert torch.equal(y, data.labels[:7])
        assert sum(len(b[1]) for b in loader) == len(data)  # eval keeps the last partial batch

    def test_normalize_fit(self):
        data = colour_data(5)
        n = Normalize.fit(data, None, "channel")
        x = data.images.double() / 255
        assert np.allclose(n.mean, x.mean((0, 2, 3)).tolist())
        assert np.allclose(n.std, x.std((0, 2, 3), unbiased=False).tolist())
        t = KeyedTransform(rand_key("shuffle", 4))
        p = Normalize.fit(data, t, "position")
        assert len(p.mean) == 48 and p.block_size == 4


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model(name):
    model = create_model(name, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "patch", "grid"), [("upnet", 4, 16), ("fullnet", 4, 32), ("fullnet", 2, 32)])
def test_block_embedding_comes_back_to_its_grid(name, patch, grid):
    """upnet's conv groups start at twice the block grid; fullnet's at the image's own resolution."""
    model = create_model(name, 10, patch=patch, width=0.25)
    x = torch.randn(2, 3, 32, 32)
    assert model.stem(model.patch_embed(x)).shape[-2:] == (grid, grid)
    assert model.patch_embed.kernel_size == model.patch_embed.stride == (patch, patch)


def test_torchvision_models_by_name():
    assert create_model("tv_resnet18", 5)(torch.randn(2, 3, 32, 32)).shape == (2, 5)


CFG = dict(model="fastnet", model_kwargs={"width": 0.25}, batch_size=16, lr=0.05, amp="off")


class TestFit:
    @pytest.mark.slow  # more than 10 s on a 2-vCPU VM
    def test_trains_and_evaluates(self, tmp_path):
        data = colour_data(40)
        tr, va = stratified_split(data, 0.25, 0)
        key = rand_key("shuffle,negpos", 4, seed=0)
        cfg = TrainConfig(epochs=8, norm="position", **CFG)
        meta = fit(tr, va, key, cfg, tmp_path / "run", progress=False, log=lambda s: None)
        assert meta["metrics"]["val_acc"] > 0.8  # chance is 1/3
        report = evaluate_run(tmp_path / "run", va, key, wrong_keys=3, progress=False)
        assert report.key_matches and report.rows[0]["setting"] == "correct key"
        assert report.rows[0]["accuracy"] == pytest.approx(meta["metrics"]["val_acc"], abs=1e-4)
        assert [r["setting"] for r in report.rows[1:]] == ["plain images", "3 random wrong keys"]
        wrong = evaluate_run(tmp_path / "run", va, rand_key("shuffle,negpos", 4, seed=9), wrong_keys=0)
        assert wrong.key_matches is False and "NOT the model's key" in wrong.rows[0]["setting"]

    def test_tta_averages_views_of_the_plain_image_each_keyed_after_it_is_taken(self, tmp_path):
        """Classes that a mirror swaps (bright left half / bright right half / neither), trained without flips:
        evaluation with --tta matches the average of the two views computed here, and differs from without."""
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(60) % 3
        images = torch.randint(0, 60, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
        images[labels == 0, :, :, :16] += 150
        images[labels == 1, :, :, 16:] += 150
        data = ImageTensors(images, labels, ("left", "right", "neither"))
        key = rand_key("shuffle,negpos", 4, seed=3)
        cfg = TrainConfig(epochs=4, norm="position", flip=False, **CFG | {"model": "patchnet"})
        fit(data, None, key, cfg, tmp_path / "run", progress=False, log=lambda s: None)
        model, meta = load_model(tmp_path / "run")
        model.eval()
        mean, std = meta.normalize.tensors(meta.image_shape, "cpu")
        tf = KeyedTransform(key)
        with torch.no_grad():
            views = [model((tf(x) - mean) / std).softmax(1) for x in (images, images.flip(-1))]
        expected = ((views[0] + views[1]).argmax(1) == labels).float().mean().item()
        with_tta = evaluate_run(tmp_path / "run", data, key, wrong_keys=0, progress=False, tta=True)
        without = evaluate_run(tmp_path / "run", data, key, wrong_keys=0, progress=False)
        assert [r["setting"] for r in without.rows] == ["correct key", "plain images"]
        only_key = evaluate_run(tmp_path / "run", data, key, wrong_keys=0, progress=False, plain_images=False)
        assert only_key.rows == without.rows[:1]
        assert with_tta.rows[0]["accuracy"] == pytest.approx(expected) and with_tta.to_json()["tta"] == "flip"
        assert without.rows[0]["accuracy"] == pytest.approx((views[0].argmax(1) == labels).float().mean().item())
        assert without.rows[0]["accuracy"] > 0.9 and with_tta.rows[0]["accuracy"] < 0.8  # the mirror swaps classes

        # shift: the two views above plus each moved one pixel (zero fill) and mirrored, at half weight;
        # the shifts computed here by padding and cropping, then keyed
        def moved(x, dy, dx):
            return torch.nn.functional.pad(x, (1, 1, 1, 1))[..., 1 - dy : 33 - dy, 1 - dx : 33 - dx]

        with torch.no_grad():
            probs = sum(
                0.5 * model((tf(moved(x, dy, dx)) - mean) / std).softmax(1)
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
                for x in (images, images.flip(-1))
            ) + (views[0] + views[1])
        shifted = evaluate_run(tmp_path / "run", data, key, wrong_keys=0, progress=False, tta="shift")
        assert shifted.to_json()["tta"] == "shift"
        assert shifted.rows[0]["accuracy"] == pytest.approx((probs.argmax(1) == labels).float().mean().item())
        predicted = Predictor(tmp_path / "run", key, tta="shift").logits(images).softmax(1)
        torch.testing.assert_close(predicted, probs / 6, atol=1e-4, rtol=1e-3)
        with pytest.raises(OptionError, match="tta must be one of"):
            evaluate_run(tmp_path / "run", data, key, wrong_keys=0, progress=False, tta="rotate")

    def test_fit_refuses_a_cutout_that_blanks_the_image(self, tmp_path):
        with pytest.raises(OptionError, match="cutout 8 would blank whole 8x8 images"):
            fit(colour_data(4), None, None, TrainConfig(epochs=1, cutout=8, **CFG), tmp_path / "r", progress=False)

    def test_checkpoint_has_no_key_material(self, tmp_path):
        data = colour_data(8)
        key = KeySet.generate("shuffle,negpos,ffx", 4)
        fit(data, None, key, TrainConfig(epochs=2, **CFG), tmp_path / "run", progress=False, log=lambda s: None)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["meta.json", "model.safetensors"]
        blob = b"".join(p.read_bytes() for p in (tmp_path / "run").iterdir())
        assert key.steps[2].password.encode() not in blob
        assert json.dumps(list(key.steps[0].perm)).encode() not in blob
        saved = json.loads((tmp_path / "run" / "meta.json").read_text())
        assert saved["key"] == {
            "fingerprint": key.fingerprint,
            "recipe": ["shuffle", "negpos", "ffx"],
            "spec": ["shuffle", "negpos", "ffx"],
            "block_size": 4,
            "channels": 3,
        }

    def test_weight_average_is_the_ema_of_the_raw_steps(self, tmp_path, monkeypatch):
        """--ema: the saved weights and BN statistics are e_1 = w_1, e_k = d e_(k-1) + (1 - d) w_k over the raw
        weights after each optimizer step (recorded by wrapping SGD.step, outside the trainer)."""
        data = colour_data(16)  # 48 images, batch 16: 3 steps an epoch
        key = rand_key("shuffle,negpos", 4)
        cfg = TrainConfig(epochs=2, norm="position", **CFG)
        snapshots: list[dict[str, torch.Tensor]] = []
        step = torch.optim.SGD.step

        def recording_step(opt, *args, **kwargs):
            out = step(opt, *args, **kwargs)
            snapshots.append({k: v.detach().clone() for k, v in recording_step.model.state_dict().items()})
            return out

        real_create = create_model

        def create(*args, **kwargs):
            recording_step.model = real_create(*args, **kwargs)
            return recording_step.model

        monkeypatch.setattr("blockkey.train.create_model", create)
        monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
        fit(data, None, key, dataclasses.replace(cfg, ema=0.6), tmp_path / "ema", progress=False, log=lambda s: None)
        assert len(snapshots) == 6
        expected = {k: v.double() for k, v in snapshots[0].items()}
        for snap in snapshots[1:]:
            expected = {k: 0.6 * expected[k] + 0.4 * snap[k].double() for k in expected}
        saved, _ = load_model(tmp_path / "ema")
        for name, value in saved.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
            else:  # integer buffers (BN step counts) are the model's own, never averaged
                assert torch.equal(value, snapshots[-1][name]), name
        assert not torch.equal(saved.state_dict()["head.weight"], snapshots[-1]["head.weight"])

        snapshots.clear()  # the average does not change the training itself
        fit(data, None, key, cfg, tmp_path / "raw", progress=False, log=lambda s: None)
        raw, _ = load_model(tmp_path / "raw")
        for name, value in raw.state_dict().items():
            assert torch.equal(value, snapshots[-1][name]), name

    @pytest.mark.slow  # more than 10 s on a 2-vCPU VM
    @pytest.mark.parametrize("ema", [0.0, 0.9])
    def test_resume_after_interruption_gives_identical_weights(self, tmp_path, ema):
        data = colour_data(24)
        key = rand_key("shuffle,negpos", 4)
        cfg = TrainConfig(epochs=3, ema=ema, **CFG)
        fit(data, None, key, cfg, tmp_path / "a", progress=False, log=lambda s: None)

        def die_in_epoch_2(line):
            if line.startswith("epoch 2/3"):
                raise KeyboardInterrupt  # killed after epoch 2's work, before its state was saved

        with pytest.raises(KeyboardInterrupt):
            fit(data, None, key, cfg, tmp_path / "b", progress=False, log=die_in_epoch_2)
        assert (tmp_path / "b" / "LATEST").read_text() == "state-0001"
        with pytest.raises(CheckpointError, match="--resume"):
            fit(data, None, key, cfg, tmp_path / "b", progress=False, log=lambda s: None)
        fit(data, None, key, cfg, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
        wa, _ = load_model(tmp_path / "a")
        wb, _ = load_model(tmp_path / "b")
        for (na, ta), (nb, tb) in zip(wa.state_dict().items(), wb.state_dict().items(), strict=True):
            assert na == nb and torch.equal(ta, tb), na
        assert not (tmp_path / "b" / "LATEST").exists()

    def test_resume_refuses_other_key(self, tmp_path):
        data = colour_data(24)
        cfg = TrainConfig(epochs=2, **CFG)

        def die(line):
            if line.startswith("epoch 2/2"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fit(data, None, rand_key("shuffle", 4, seed=1), cfg, tmp_path / "r", progress=False, log=die)
        with pytest.raises(CheckpointError, match="different key"):
            fit(data, None, rand_key("shuffle", 4, seed=2), cfg, tmp_path / "r", resume=True, progress=False)

    def test_resume_a_state_written_before_a_config_field_existed(self, tmp_path):
        """A state saved by an older version lacks newer TrainConfig fields: they take their defaults (resume
        works); a field that differs from the saved run still refuses."""
        data = colour_data(24)
        cfg = TrainConfig(epochs=2, **CFG)
        key = rand_key("shuffle", 4, seed=1)

        def die(line):
            if line.startswith("epoch 2/2"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fit(data, None, key, cfg, tmp_path / "r", progress=False, log=die)
        state_file = tmp_path / "r" / "state-0001" / "state.json"
        state = json.loads(state_file.read_text())
        del state["config"]["optimizer"]  # as written before the field existed
        state_file.write_text(json.dumps(state))
        expected = r"different training configuration \(optimizer: saved 'sgd', now 'adam'; repeat"
        with pytest.raises(CheckpointError, match=expected):
            fit(data, None, key, dataclasses.replace(cfg, optimizer="adam"), tmp_path / "r", resume=True)
        fit(data, None, key, cfg, tmp_path / "r", resume=True, progress=False, log=lambda s: None)
        assert (tmp_path / "r" / "meta.json").exists()

    def test_class_alignment_by_name(self):
        data = colour_data(3)
        swapped = ImageTensors(data.images, 2 - data.labels, ("class2", "class1", "class0"))
        aligned = align_classes(swapped, ["class0", "class1", "class2"])
        assert torch.equal(aligned.labels, data.labels)
        with pytest.raises(DataError, match=r"\['dog'\] are not classes"):
            align_classes(ImageTensors(data.images, data.labels, ("class0", "class1", "dog")), list(data.classes))


def test_half_copy_of_a_run_loads_as_float32_with_float16_rounding_only(tmp_path):
    data = colour_data(8)
    key = rand_key("shuffle,negpos", 4)
    fit(data, None, key, TrainConfig(epochs=1, **CFG), tmp_path / "run", progress=False, log=lambda s: None)
    copy_run_half(tmp_path / "run", tmp_path / "half")
    full, meta = load_model(tmp_path / "run")
    half, half_meta = load_model(tmp_path / "half")
    assert half_meta == meta
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values(), strict=True):
        assert b.dtype == a.dtype, name  # cast back on load
        assert torch.equal(b, a.half().to(a.dtype)) if a.is_floating_point() else torch.equal(a, b), name
    size = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert size < 0.6 * (tmp_path / "run" / "model.safetensors").stat().st_size
    report = evaluate_run(tmp_path / "half", data, key, wrong_keys=0, progress=False)
    assert report.key_matches  # the fingerprint travels in the metadata


def test_block_aligned_model_must_match_the_key_blocks(tmp_path):
    """fit() from Python with a block-aligned model whose patch differs from the key's block size refuses."""
    data = colour_data(8)
    cfg = TrainConfig(epochs=1, model="patchnet", model_kwargs={"patch": 4}, batch_size=8, amp="off")
    with pytest.raises(ShapeError, match="set model_kwargs patch=2"):
        fit(data, None, rand_key("shuffle", 2), cfg, tmp_path / "run", progress=False, log=lambda s: None)


def test_corrupt_checkpoint_refused(tmp_path):
    data = colour_data(8)
    fit(data, None, None, TrainConfig(epochs=1, **CFG), tmp_path / "run", progress=False, log=lambda s: None)
    (tmp_path / "run" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt weights"):
        load_model(tmp_path / "run")
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(tmp_path / "model.pt")
    os.remove(tmp_path / "run" / "meta.json")
    with pytest.raises(CheckpointError, match=r"no meta\.json"):
        load_model(tmp_path / "run")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): trains, rank 0 writes one run, world size recorded."""
    import subprocess
    import sys

    data = colour_data(16)
    root = write_folder(tmp_path / "ds", data)
    key = rand_key("shuffle,negpos", 4)
    key.save(tmp_path / "k.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # picks a free port: no clash with other runs
        "--nproc_per_node",
        "2",
        "-m",
        "blockkey",
        "train",
        "--data",
        str(root),
        "--key",
        str(tmp_path / "k.json"),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--model",
        "fastnet",
        "--amp",
        "off",
        "--val-fraction",
        "0.25",
        "--lr",
        "0.05",
        "-o",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "BLOCKKEY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["epochs_done"] == 2
    model, _ = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert r.stderr.count("training fastnet") == 1  # only rank 0 logs


class TestCLIErrors:
    @pytest.fixture
    def trained(self, tmp_path):
        from blockkey.cli import main

        data = colour_data(8)
        root = write_folder(tmp_path / "ds", data)
        rand_key("shuffle,negpos", 4).save(tmp_path / "k.json")
        args = [
            "train",
            "--data",
            root,
            "--key",
            tmp_path / "k.json",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--amp",
            "off",
            "--model",
            "fastnet",  # the default upnet (and patchnet) need 16x16 images at M=4; these are 8x8
            "-o",
            tmp_path / "run",
        ]
        assert main([str(a) for a in args]) == 0
        return tmp_path

    def run(self, capsys, *argv):
        from blockkey.cli import main

        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err

    def test_width_builds_the_model_it_names(self, trained, capsys):
        t = trained
        base = ["train", "--data", t / "ds", "--no-key", "--epochs", 1, "--batch-size", 8, "--amp", "off"]
        code, _ = self.run(capsys, *base, "--model", "fastnet", "--width", "0.5", "-o", t / "half")
        model, meta = load_model(t / "half")
        assert code == 0 and meta.model_kwargs["width"] == 0.5
        expected = create_model("fastnet", 3, width=0.5)
        assert [p.shape for p in model.parameters()] == [p.shape for p in expected.parameters()]
        code, err = self.run(capsys, *base, "--model", "tv_resnet18", "--width", "2", "-o", t / "tv")
        assert code == 2 and err.count("\n") == 1 and "no width multiplier" in err and not (t / "tv").exists()
        code, err = self.run(capsys, *base, "--width", "0", "-o", t / "zero")
        assert code == 2 and "--width" in err

    def test_train_and_evaluate_errors(self, trained, capsys, monkeypatch):
        t = trained
        code, err = self.run(capsys, "train", "--data", t / "nope", "--no-key", "-o", t / "r2")
        assert code == 2 and "does not exist" in err and err.count("\n") == 1
        rand_key("shuffle", 3).save(t / "k3.json")
        code, err = self.run(
            capsys, "train", "--data", t / "ds", "--key", t / "k3.json", "--batch-size", 8, "-o", t / "r3"
        )
        assert code == 2 and "not divisible by the block size 3" in err
        code, err = self.run(capsys, "train", "--data", t / "ds", "--no-key", "-o", t / "run")
        assert code == 2 and "already holds a run" in err
        code, err = self.run(capsys, "evaluate", "--model", t / "run", "--key", t / "k3.json", "--wrong-keys", "0")
        assert code == 2 and "the key is for M=3" in err
        from blockkey.cli import main

        figures = saved_figures(monkeypatch)
        argv = ["evaluate", "--model", t / "run", "--key", t / "k.json", "--wrong-keys", "2", "--plot", t / "bars.png"]
        assert main([str(a) for a in [*argv, "--tta", "--json"]]) == 0
        doc = json.loads(capsys.readouterr().out)
        rows = doc["rows"]
        assert doc["tta"] == "flip"  # a bare --tta
        bars = figures[0].axes[0].patches  # one bar per row, its height the row's accuracy
        assert [b.get_height() for b in bars] == pytest.approx([100 * r["accuracy"] for r in rows])
        assert [r["setting"] for r in rows][:1] == ["correct key"] and len(rows) == 3
        (t / "run" / "model.safetensors").write_bytes(b"\0" * 64)
        code, err = self.run(capsys, "evaluate", "--model", t / "run", "--key", t / "k.json")
        assert code == 2 and "corrupt weights" in err and err.count("\n") == 1
        code, err = self.run(capsys, "evaluate", "--model", t / "nothing", "--key", t / "k.json")
        assert code == 2 and "not a run directory" in err


def test_block_aligned_model_takes_the_key_block_size(tmp_path):
    from blockkey.cli import main
    from blockkey.models import block_aligned

    assert block_aligned("patchnet") and not block_aligned("fastnet")
    root = write_folder(tmp_path / "ds", colour_data(6))
    rand_key("shuffle,negpos", 2).save(tmp_path / "k.json")
    args = [
        "train",
        "--data",
        root,
        "--key",
        tmp_path / "k.json",
        "--model",
        "patchnet",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--amp",
        "off",
        "-o",
        tmp_path / "run",
    ]
    assert main([str(a) for a in args]) == 0
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["model_kwargs"] == {"patch": 2}
    model, _ = load_model(tmp_path / "run")
    assert model.embed[0].kernel_size == (2, 2) and model.embed[0].stride == (2, 2)


class TestStream:
    """The DataLoader path for ImageFolders too large for memory (any image sizes)."""

    def make(self, tmp_path):
        rng = np.random.default_rng(0)
        for c in range(3):
            d = tmp_path / "big" / f"class{c}"
            d.mkdir(parents=True)
            for i in range(8):
                h, w = rng.integers(20, 40, 2)
                arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                arr[..., c] += 150
                Image.fromarray(arr).save(d / f"{i}.jpg" if i % 2 else d / f"{i}.png")
        return tmp_path / "big"

    def test_loader_batches(self, tmp_path):
        from blockkey.data import StreamLoader, open_image_folder_stream

        stream = open_image_folder_stream(self.make(tmp_path), 16, workers=0)
        assert len(stream) == 24 and stream.image_shape == (3, 16, 16)
        key = KeyedTransform(rand_key("shuffle,negpos,ffx", 4))
        raw = torch.cat(list(stream.batches(10)))
        assert raw.dtype == torch.uint8 and raw.shape == (24, 3, 16, 16)
        norm = Normalize.fit(stream, key, "position")
        loader = StreamLoader(stream, 10, train=False, transform=key, normalize=norm)
        xs, ys = zip(*loader, strict=True)
        mean, std = norm.tensors((3, 16, 16), "cpu")
        assert torch.allclose(torch.cat(xs), (key(raw) - mean) / std)
        assert torch.equal(torch.cat(ys), stream.labels)
        train = StreamLoader(stream, 8, train=True, transform=key, normalize=norm, seed=1)
        assert len(train) == 3 and all(x.shape == (8, 3, 16, 16) for x, _ in train)
        # cutout on the device: one 5x5 square of zeros in each plain image (seen here without the key)
        cut = StreamLoader(stream, 8, train=True, transform=None, normalize=None, seed=1, cutout=5)
        for x, _ in cut:
            assert ((x == 0).all(1).flatten(1).sum(1) >= 25).all()

    def test_augmentation_seeded_without_workers(self, tmp_path):
        """workers=0: the crops and flips come from (seed, epoch), not from (nor into) the global RNG."""
        from blockkey.data import StreamLoader, open_image_folder_stream

        stream = open_image_folder_stream(self.make(tmp_path), 16, workers=0)

        def epoch(seed, n, global_seed):
            loader = StreamLoader(stream, 8, train=True, transform=None, normalize=None, seed=seed)
            loader.set_epoch(n)
            torch.manual_seed(global_seed)
            batches = [x for x, _ in loader]
            return torch.cat(batches), torch.rand(3)

        (a, after_a), (b, _) = epoch(1, 0, 5), epoch(1, 0, 6)
        assert torch.equal(a, b)  # the global RNG's state did not matter
        torch.manual_seed(5)
        assert torch.equal(after_a, torch.rand(3))  # and was neither read nor advanced
        assert not torch.equal(a, epoch(1, 1, 5)[0]) and not torch.equal(a, epoch(2, 0, 5)[0])

    @pytest.mark.slow  # more than 10 s on a 2-vCPU VM
    def test_train_and_evaluate_cli(self, tmp_path, capsys):
        from blockkey.cli import main

        root = self.make(tmp_path)
        rand_key("shuffle,negpos", 4).save(tmp_path / "k.json")
        args = [
            "train",
            "--data",
            root,
            "--stream",
            "16",
            "--workers",
            "2",
            "--key",
            tmp_path / "k.json",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--amp",
            "off",
            "--val-fraction",
            "0.25",
            "-o",
            tmp_path / "run",
        ]
        assert main([str(a) for a in args]) == 0
        meta = json.loads((tmp_path / "run" / "meta.json").read_text())
        assert meta["image_shape"] == [3, 16, 16] and meta["data"]["stream_image_size"] == 16
        capsys.readouterr()
        args = [
            "evaluate",
            "--model",
            tmp_path / "run",
            "--key",
            tmp_path / "k.json",
            "--split",
            "val",
            "--wrong-keys",
            "2",
            "--tta",
            "shift",
            "--json",
        ]
        assert main([str(a) for a in args]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["images"] == 6 and report["key_matches_model"] is True and report["tta"] == "shift"
