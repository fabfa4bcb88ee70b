from __future__ import annotations

import json
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from blockkey import FFX, KeySet
from blockkey.cli import main
from blockkey.imageio import read_codes, sample_image
from blockkey.keys import RECIPE_TOKENS, RECOMMENDED_RECIPE
from blockkey.transforms import KeyedTransform

from .helpers import grid_panels


def write_rgb(path, h=32, w=32, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def key_path(tmp_path, capsys):
    p = tmp_path / "key.json"
    assert run(capsys, "keygen", "--transforms", "shuffle,negpos,ffx", "--block-size", 4, "-o", p)[0] == 0
    return p


class TestKeygenInfo:
    def test_keygen_writes_0600_and_info_reports(self, key_path, capsys):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        code, out, _ = run(capsys, "info", key_path, "--json")
        rep = json.loads(out)
        assert code == 0 and rep["recipe"] == ["shuffle", "negpos", "ffx"]
        assert rep["fingerprint"] == KeySet.load(key_path).fingerprint
        assert rep["key_space_bits"]["1:shuffle"] == pytest.approx(202.95, abs=0.01)
        code, out, _ = run(capsys, "info", key_path)
        assert "fingerprint" in out and KeySet.load(key_path).steps[2].password not in out

    def test_passphrase_is_reproducible(self, tmp_path, capsys):
        args = ["keygen", "--transforms", "shuffle,ffx", "--block-size", 2, "--passphrase", "pw", "--salt", "00ff"]
        assert run(capsys, *args, "-o", tmp_path / "a.json")[0] == 0
        assert run(capsys, *args, "-o", tmp_path / "b.json", "--json")[0] == 0
        assert KeySet.load(tmp_path / "a.json") == KeySet.load(tmp_path / "b.json")

    def test_refuses_overwrite_and_bad_salt(self, key_path, capsys):
        code, _, err = run(capsys, "keygen", "--transforms", "shuffle", "--block-size", 4, "-o", key_path)
        assert code == 2 and "refusing to overwrite" in err and err.count("\n") == 1
        code, _, err = run(
            capsys,
            "keygen",
            "--transforms",
            "np",
            "--block-size",
            4,
            "--passphrase",
            "x",
            "--salt",
            "zz",
            "-o",
            key_path.with_name("n.json"),
        )
        assert code == 2 and "--salt takes hex digits" in err


class TestEncryptDecrypt:
    @pytest.mark.parametrize("recipe,bits", [("shuffle,negpos", 8), ("shuffle,negpos,ffx", 16)])
    @pytest.mark.parametrize("mode", ["RGB", "L"])
    def test_roundtrip_files(self, tmp_path, capsys, recipe, bits, mode):
        channels = len(mode)
        key = tmp_path / "k.json"
        run(capsys, "keygen", "--transforms", recipe, "--block-size", 4, "--channels", channels, "-o", key)
        srcs = [write_rgb(tmp_path / f"img{i}.png", 16, 24, mode, seed=i) for i in range(3)]
        assert run(capsys, "encrypt", "--key", key, *srcs, "-o", tmp_path / "enc")[0] == 0
        enc = sorted((tmp_path / "enc").glob("*.png"))
        assert len(enc) == 3
        with Image.open(enc[0]) as im:
            assert im.size == (24, 16)
        codes = read_codes(enc[0])
        assert codes.dtype.itemsize * 8 == bits
        assert run(capsys, "decrypt", "--key", key, *enc, "-o", tmp_path / "dec")[0] == 0
        for s in srcs:
            original = pixels(s)
            restored = pixels(tmp_path / "dec" / s.name)
            assert np.array_equal(original, restored)
            assert not np.array_equal(original, pixels(tmp_path / "enc" / s.name))

    def test_jpeg_input_is_fine_lossy_output_refused(self, tmp_path, key_path, capsys):
        src = tmp_path / "a.jpg"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src)
        assert run(capsys, "encrypt", "--key", key_path, src, "-o", tmp_path / "out")[0] == 0
        code, _, err = run(capsys, "show", "--key", key_path, src, "-o", tmp_path / "grid.jpg")
        assert code == 2 and "lossy" in err

    @pytest.mark.parametrize(
        "make,message",
        [
            (lambda p: write_rgb(p / "odd.png", 30, 32), "not divisible by the block size 4"),
            (lambda p: write_rgb(p / "gray.png", 32, 32, "L"), "3-channel images; got 1"),
            (lambda p: (p / "junk.png").write_bytes(b"not an image") and p / "junk.png", "cannot read image"),
            (lambda p: p / "missing.png", "no such file"),
        ],
    )
    def test_bad_images_one_line_exit_2(self, tmp_path, key_path, capsys, make, message):
        src = make(tmp_path)
        code, _, err = run(capsys, "encrypt", "--key", key_path, src, "-o", tmp_path / "out")
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err

    def test_wrong_or_corrupt_key(self, tmp_path, key_path, capsys):
        src = write_rgb(tmp_path / "a.png")
        run(capsys, "encrypt", "--key", key_path, src, "-o", tmp_path / "enc")
        other = tmp_path / "other.json"
        run(capsys, "keygen", "--transforms", "shuffle,negpos,ffx", "--block-size", 4, "-o", other)
        code, _, err = run(capsys, "decrypt", "--key", other, tmp_path / "enc" / "a.png", "-o", tmp_path / "d")
        assert code == 2 and "cannot produce" in err
        eight = tmp_path / "eight.json"
        run(capsys, "keygen", "--transforms", "shuffle", "--block-size", 4, "-o", eight)
        code, _, err = run(capsys, "decrypt", "--key", eight, tmp_path / "enc" / "a.png", "-o", tmp_path / "d")
        assert code == 2 and "16-bit image, but this key has no FFX step" in err
        m8 = tmp_path / "m8.json"
        run(capsys, "keygen", "--transforms", "shuffle", "--block-size", 8, "-o", m8)
        code, _, err = run(capsys, "encrypt", "--key", m8, write_rgb(tmp_path / "b.png", 36, 36), "-o", tmp_path / "e")
        assert code == 2 and "block size 8" in err
        bad = tmp_path / "bad.json"
        bad.write_text(key_path.read_text()[:-40])
        code, _, err = run(capsys, "encrypt", "--key", bad, src, "-o", tmp_path / "e2")
        assert code == 2 and "not valid JSON" in err and err.count("\n") == 1

    def test_no_overwrite_without_force(self, tmp_path, key_path, capsys):
        src = write_rgb(tmp_path / "a.png")
        assert run(capsys, "encrypt", "--key", key_path, src, "-o", tmp_path / "enc")[0] == 0
        code, _, err = run(capsys, "encrypt", "--key", key_path, src, "-o", tmp_path / "enc")
        assert code == 2 and "refusing to overwrite" in err
        assert run(capsys, "encrypt", "--key", key_path, src, "-o", tmp_path / "enc", "--force")[0] == 0
        code, _, err = run(capsys, "encrypt", "--key", key_path, src, "-o", tmp_path)
        assert code == 2 and "overwrite its own input" in err


def test_show_and_tour(tmp_path, key_path, capsys):
    src = write_rgb(tmp_path / "a.png")
    assert run(capsys, "show", "--key", key_path, src, "-o", tmp_path / "grid.png")[0] == 0
    with Image.open(src) as im:
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    panels = grid_panels(tmp_path / "grid.png", 32, 32, 5)  # original, 3 steps, decrypted
    encrypted = (KeyedTransform(KeySet.load(key_path))(x[None])[0] * 255).round().to(torch.uint8)
    assert torch.equal(panels[0], x) and torch.equal(panels[3], encrypted) and torch.equal(panels[4], x)
    code, out, _ = run(capsys, "tour", "-o", tmp_path / "tour", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["roundtrip_exact"] is True
    steps = len([s for s in rep["key"]["recipe"] if s != "inner"])  # the inner part changes no image
    tour = grid_panels(tmp_path / "tour" / "steps.png", 128, 128, steps + 2)
    assert torch.equal(tour[0], sample_image()) and torch.equal(tour[-1], sample_image())


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_help_and_module_entry_point():
    for cmd in ["--help", "keygen --help", "encrypt --help", "show --help", "tour --help"]:
        r = subprocess.run([sys.executable, "-m", "blockkey", *cmd.split()], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: blockkey" in r.stdout


def crafted_png(path, width, height, bitdepth=8, colour=2, data=b"", corrupt=False):
    """A PNG written by hand: valid chunks and CRCs, optionally a corrupt compressed stream."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = data if corrupt else zlib.compress(data)
    ihdr = struct.pack(">IIBBBBB", width, height, bitdepth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


class TestReviewRegressions:
    def test_zero_mask_ffx_key_roundtrips(self, tmp_path, capsys):
        key = KeySet(1, 3, (KeySet.generate("shuffle", 1).steps[0], FFX((0, 0, 0), "pw")))
        key.save(tmp_path / "k.json")
        src = write_rgb(tmp_path / "a.png", 4, 4)
        assert run(capsys, "encrypt", "--key", tmp_path / "k.json", src, "-o", tmp_path / "e")[0] == 0
        assert (
            run(capsys, "decrypt", "--key", tmp_path / "k.json", tmp_path / "e" / "a.png", "-o", tmp_path / "d")[0] == 0
        )
        assert np.array_equal(pixels(src), pixels(tmp_path / "d" / "a.png"))

    def test_broken_and_hostile_images(self, tmp_path, key_path, capsys):
        cases = {
            "badz.png": crafted_png(tmp_path / "badz.png", 4, 4, data=b"\x00" * 40, corrupt=True),
            "bomb.png": crafted_png(tmp_path / "bomb.png", 20000, 10000, data=b"\x00" * 10),
            "deep16.png": crafted_png(tmp_path / "deep16.png", 4, 4, 16, data=(b"\x00" + b"\x01" * 24) * 4),
        }
        for name, path in cases.items():
            code, _, err = run(capsys, "encrypt", "--key", key_path, path, "-o", tmp_path / "out")
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, name
        code, _, err = run(capsys, "decrypt", "--key", key_path, cases["badz.png"], "-o", tmp_path / "out")
        assert code == 2 and "not a readable PNG" in err
        code, _, err = run(capsys, "encrypt", "--key", key_path, tmp_path, "-o", tmp_path / "out")
        assert code == 2 and "is a directory" in err

    def test_errors_name_the_real_path_not_a_temp_file(self, tmp_path, capsys):
        target = tmp_path / "missing-dir" / "k.json"
        code, _, err = run(capsys, "keygen", "--transforms", "shuffle", "--block-size", 2, "-o", target)
        assert code == 2 and str(target) in err and ".tmp" not in err

    def test_stdin_passphrase_ignores_crlf(self, tmp_path, capsys, monkeypatch):
        import io

        args = ["keygen", "--transforms", "shuffle", "--block-size", 2, "--salt", "00"]
        assert run(capsys, *args, "--passphrase", "secret", "-o", tmp_path / "a.json")[0] == 0
        monkeypatch.setattr("sys.stdin", io.StringIO("secret\r\n"))
        assert run(capsys, *args, "--passphrase", "-", "-o", tmp_path / "b.json")[0] == 0
        assert KeySet.load(tmp_path / "a.json") == KeySet.load(tmp_path / "b.json")

    def test_tour_never_replaces_a_real_key(self, tmp_path, capsys):
        real = tmp_path / "keys"
        real.mkdir()
        KeySet.generate("shuffle", 4).save(real / "key.json")
        before = (real / "key.json").read_text()
        code, _, err = run(capsys, "tour", "-o", real)
        assert code == 2 and "not made by this command" in err and (real / "key.json").read_text() == before
        assert run(capsys, "tour", "-o", tmp_path / "t")[0] == 0
        assert run(capsys, "tour", "-o", tmp_path / "t")[0] == 0  # its own demo key may be replaced
        code, _, err = run(capsys, "tour", "-o", tmp_path / "t64", "--block-size", 64)
        assert code == 2 and "block size dividing 32" in err and not (tmp_path / "t64").exists()


@pytest.mark.slow  # a few seconds each on a 2-vCPU VM
@pytest.mark.parametrize("recipe", [*RECIPE_TOKENS, RECOMMENDED_RECIPE])
def test_demo_runs_every_recipe_keygen_accepts(tmp_path, capsys, recipe):
    """Each recipe token alone, and the recommended mode (the demo's default), trains and evaluates."""
    args = ["demo", "-o", tmp_path / "d", "--epochs", "1", "--limit", "300", "--wrong-keys", "1", "--json"]
    code, stdout, err = run(capsys, *args, "--transforms", recipe)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["recipe"] == recipe.split(",") and len(res["rows"]) == 4
    meta = json.loads((tmp_path / "d" / "protected" / "meta.json").read_text())
    assert meta["key"]["spec"] == recipe.split(",")


def test_keygen_and_demo_default_to_the_recommended_mode(tmp_path, capsys):
    from blockkey.cli import build_parser

    assert build_parser().parse_args(["demo"]).transforms == RECOMMENDED_RECIPE
    assert run(capsys, "keygen", "-o", tmp_path / "k.json")[0] == 0
    key = KeySet.load(tmp_path / "k.json")
    assert key.spec == tuple(RECOMMENDED_RECIPE.split(",")) and key.block_size == 4


@pytest.mark.slow  # more than 10 s on a 2-vCPU VM
def test_demo_quick(tmp_path, capsys):
    """The README's main job, shrunk: trains both models, evaluates, never touches a real key."""
    out = tmp_path / "demo"
    args = ["demo", "-o", out, "--epochs", "1", "--limit", "400", "--wrong-keys", "2", "--json"]
    code, stdout, _ = run(capsys, *args)
    res = json.loads(stdout)
    assert code == 0 and [r["input"] for r in res["rows"]] == [
        "plain images",
        "the correct key",
        "plain images",
        "2 random wrong keys",
    ]
    assert (out / "protected" / "model.safetensors").exists() and (out / "twin" / "meta.json").exists()
    assert json.loads((out / "protected" / "meta.json").read_text())["key"]["fingerprint"] == res["key_fingerprint"]
    assert run(capsys, *args)[0] == 0  # runs again over its own folder
    (tmp_path / "mine").mkdir()
    KeySet.generate("shuffle", 4).save(tmp_path / "mine" / "key.json")
    code, _, err = run(capsys, "demo", "-o", tmp_path / "mine", "--epochs", "1", "--limit", "200")
    assert code == 2 and "not a key made by this command" in err
