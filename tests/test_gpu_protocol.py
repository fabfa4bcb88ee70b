"""benchmarks/gpu_protocol.py on CPU with a tiny setting, and the image pack it ships data in."""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blockkey.data import load_dataset, load_image_folder
from blockkey.imagepack import _demo_blobs, load_image_pack, pack_image_folder

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is 10x faster than several contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def protocol():
    return importlib.import_module("benchmarks.gpu_protocol")  # the repository root is on pytest's path


def _folder(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:04d}.jpg", quality=90)
    return root


def _tiny_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
        "--val-fraction", "0.25", "--batch-size", "8", "--calib-images", "16", "--wrong-keys", "2",
        "--fast-width", "0.05", "--paper-width", "0.1", "--fast-max-epochs", "1", "--paper-max-epochs", "1",
        "--eval-reserve-s", "1", "--device", "cpu", "--amp", "off", *extra,
    ]  # fmt: skip


def test_protocol_runs_every_row_on_cpu(tmp_path, protocol, monkeypatch, one_thread):
    monkeypatch.setenv("BLOCKKEY_CACHE", str(tmp_path / "cache"))
    data = _folder(tmp_path / "data", 4)
    results = protocol.main(_tiny_args(tmp_path, data))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["finished"] is True and saved["info"]["device"] == "cpu"
    assert saved["info"]["train_images"] == 30 and saved["info"]["val_images"] == 10
    expected = ["fast/none", "fast/shuffle-negpos-ffx"] + [
        f"paper/{n}" for n in ("none", "shuffle", "negpos", "ffx", "shuffle-negpos-ffx")
    ]
    assert list(saved["rows"]) == expected == list(results["rows"])
    for name, row in saved["rows"].items():
        assert row["epochs"] == 1, name  # the caps bound the calibrated plan
        settings = [r["setting"] for r in row["eval"]["rows"]]
        if name.endswith("/none"):
            assert settings == ["non-protected model"]
        else:
            assert settings == ["correct key", "plain images", "2 random wrong keys"]
        assert row["eval"]["images"] == 10
    assert set(saved["calibration"]) == {"fullnet", "resnet18_cifar"}
    assert all(c["seconds_per_image"] > 0 for c in saved["calibration"].values())
    assert saved["rows"]["paper/shuffle"]["model_kwargs"] == {"width": 0.1}
    assert saved["rows"]["fast/none"]["model_kwargs"] == {"patch": 4, "width": 0.05}
    text = (tmp_path / "out" / "table.md").read_text()
    assert text.startswith("Device: cpu (torch " + torch.__version__)
    assert text.count("| fast |") == 2 and text.count("| paper |") == 5
    assert "| paper | shuffle | resnet18_cifar" in text and "| 92.6% |" in text
    assert "Fast goal (key holder >= 94% within 60 s of training): NOT met" in text
    assert (tmp_path / "work" / "paper-ffx" / "model.safetensors").exists()  # a given --work is kept


def test_protocol_out_of_budget_records_skipped_rows(tmp_path, protocol, monkeypatch):
    monkeypatch.setenv("BLOCKKEY_CACHE", str(tmp_path / "cache"))
    data = _folder(tmp_path / "data", 2)
    protocol.main(_tiny_args(tmp_path, data, "--budget-s", "0", "--parts", "paper"))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["rows"]) == [f"paper/{n}" for n in ("none", "shuffle", "negpos", "ffx", "shuffle-negpos-ffx")]
    assert all(r["skipped"].startswith("budget") for r in saved["rows"].values())
    assert "calibration" not in saved  # nothing trained, not even the calibration run
    again = protocol.main(["--table", "--out", str(tmp_path / "out")])
    assert again["rows"] == saved["rows"]
    assert (tmp_path / "out" / "table.md").read_text().count("skipped: budget") == 5


def test_plan_epochs(protocol):
    assert protocol.plan_epochs(60, 0.7, 200) == 85
    assert protocol.plan_epochs(60, 0.7, 30) == 30
    assert protocol.plan_epochs(0.5, 0.7, 30) == 0
    assert protocol.plan_epochs(-3, 0.7, 30) == 0
    assert protocol.plan_epochs(60, 0.0, 30) == 0  # not calibrated: no plan


def test_pack_is_byte_exact_and_references_demo_images(tmp_path):
    root = _folder(tmp_path / "data", 2)
    png = tmp_path / "data" / "c3" / "9999.png"  # not a JPEG: stored whole
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(png)
    demo = _demo_blobs()[:3]
    for i, b in enumerate(demo):  # byte-identical to embedded demo images: stored as references
        (root / "c5" / f"demo{i}.jpg").write_bytes(b)
    summary = pack_image_folder(root, tmp_path / "pack.npz")
    assert summary == {"images": 24, "bytes": summary["bytes"], "demo_references": 3, "headers": 1}
    expected = load_image_folder(root, cache_dir="")
    for loaded in (load_image_pack(tmp_path / "pack.npz", workers=1), load_dataset(str(tmp_path / "pack.npz"))):
        assert torch.equal(loaded.images, expected.images)
        assert torch.equal(loaded.labels, expected.labels)
        assert loaded.classes == expected.classes
    with Image.open(io.BytesIO(demo[0])) as im:
        first = torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())
    idx = next(i for i, (p, _) in enumerate(sorted_samples(root)) if p.name == "demo0.jpg")
    assert torch.equal(expected.images[idx], first)


def sorted_samples(root: Path) -> list[tuple[Path, int]]:
    from blockkey.data import _list_image_folder

    return [(Path(p), c) for p, c in _list_image_folder(root)[1]]


def test_pack_detects_damage(tmp_path):
    from blockkey.data import DataError

    root = _folder(tmp_path / "data", 1)
    pack_image_folder(root, tmp_path / "pack.npz")
    with np.load(tmp_path / "pack.npz") as z:
        doc = {k: z[k] for k in z.files}
    doc["body"] = doc["body"].copy()
    doc["body"][5] ^= 1
    np.savez(tmp_path / "bad.npz", **doc)
    with pytest.raises(DataError, match="checksum"):
        load_image_pack(tmp_path / "bad.npz", workers=1)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match=r"cannot read|not a blockkey"):
        load_image_pack(tmp_path / "other.npz")


def test_prepare_packs_data_and_pyffx_and_reports_the_size(tmp_path, protocol, monkeypatch, capsys):
    import subprocess

    data = _folder(tmp_path / "data", 1)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "big.bin").write_bytes(b"x" * 2**20)  # untracked, not ignored: it travels too
    (repo / "gd").mkdir()
    (repo / "gd" / "old.bin").write_bytes(b"x" * 2 * 2**20)  # in the carried folder: counted once, as gd
    monkeypatch.chdir(repo)
    protocol.main(["--prepare", "gd", "--data", str(data)])
    assert torch.equal(load_image_pack("gd/cifar10-train.npz").images, load_image_folder(data, cache_dir="").images)
    assert (repo / "gd" / "site" / "pyffx" / "ffx.py").exists()
    out = capsys.readouterr().out
    assert "'images': 10" in out and "working tree 1.0 MiB + gd 2.0 MiB = 3.0 MiB" in out


def test_fit_compile_model_trains_through_torch_compile(tmp_path, monkeypatch):
    from blockkey.data import ImageTensors
    from blockkey.train import TrainConfig, fit

    compiled, calls = [], []

    class Counted(torch.nn.Module):  # stands for the compiled module: counts the training calls
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return self.inner(x)

    def fake_compile(module):
        compiled.append(module)
        return Counted(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    data = ImageTensors(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16) % 2, ("a", "b"))
    cfg = TrainConfig(model="fastnet", model_kwargs={"width": 0.1}, epochs=1, batch_size=8, amp="off")
    fit(data, None, None, cfg, tmp_path / "plain", device="cpu", progress=False, log=lambda s: None)
    assert compiled == [] and calls == []
    fit(data, None, None, cfg, tmp_path / "run", device="cpu", progress=False, log=lambda s: None, compile_model=True)
    assert len(compiled) == 1 and calls == [8, 8]
    assert (tmp_path / "run" / "model.safetensors").exists()  # the plain module's weights are saved
