from __future__ import annotations

import json
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blockkey import KeySet
from blockkey.cli import main
from blockkey.imageio import read_codes


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
    with Image.open(tmp_path / "grid.png") as im:
        assert im.width > 5 * 32  # original, 3 steps, decrypted
    code, out, _ = run(capsys, "tour", "-o", tmp_path / "tour", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["roundtrip_exact"] is True
    assert (tmp_path / "tour" / "steps.png").exists()


def test_help_and_module_entry_point():
    for cmd in ["--help", "keygen --help", "encrypt --help", "show --help", "tour --help"]:
        r = subprocess.run([sys.executable, "-m", "blockkey", *cmd.split()], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: blockkey" in r.stdout
