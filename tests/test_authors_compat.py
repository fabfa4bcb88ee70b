"""Where blockkey's codes equal the authors' and where they do not (negpos before FFX), and compat="authors".

The authors' FFX step reads its input as ``long(x * 255)``. After negpos ``x = 1 - v/255`` in float32,
so ``x * 255`` falls just below ``255 - v`` for some ``v`` and truncates to ``254 - v``. These tests pin
that set down as a literal, run the authors'-style chain (tests/authors_style.py) beside blockkey's and
check that every difference is exactly there.
"""

from __future__ import annotations

import pytest
import torch

from blockkey import FFX, KeyedTransform, KeySet, NegPos
from blockkey import functional as F
from blockkey.authors_style import authors_chain
from blockkey.cli import main
from blockkey.imageio import read_codes, read_image
from blockkey.keys import ffx_table

from .helpers import DEVICES, RECIPES, images, rand_key, steps_json

#: Pixel values v whose negpos flip, computed as the authors do in float32, truncates to 254 - v.
TRUNCATED = sorted(set(range(65, 128, 2)) | set(range(128, 255)))
TABLE = torch.tensor(ffx_table("password")[:256])


def authors_float(key: KeySet, x: torch.Tensor) -> torch.Tensor:
    """The authors'-style chain on ``x`` (uint8), their input being ``x.float() / 255`` (ToTensor)."""
    y = x.float() / 255
    for t in authors_chain(steps_json(key), key.block_size, x.shape[-2], x.shape[-1], x.shape[-3]):
        y = t(y)
    return y


def test_float32_truncation_set():
    v = torch.arange(256)
    x = torch.arange(256, dtype=torch.uint8).float() / 255  # ToTensor
    t = (torch.clamp(1 - x, 0, 1) * 255).long()  # their negpos, then their FFX input
    assert len(TRUNCATED) == 159
    assert (v[t != 255 - v]).tolist() == TRUNCATED
    assert torch.equal(t[TRUNCATED], 254 - v[TRUNCATED])
    assert t.unique().numel() == 224  # not one-to-one: 32 pairs of values collide
    unflipped = (torch.clamp(x, 0, 1) * 255).long()
    assert torch.equal(unflipped, v)  # without negpos their truncation is harmless


def test_their_decrypt_truncation_loses_pixels_even_for_ffx_alone():
    """Their FFX decrypt reads ``long(y * max(E))``: documented counts for the password "password"."""
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    lost = {}
    for flip in (0, 1):
        for enc in (0, 1):
            steps = [{"type": "negpos", "mask": [flip]}, {"type": "ffx", "mask": [enc], "password": "password"}]
            chain = authors_chain(steps, 1, 16, 16, 1)
            y = x.float() / 255
            for t in chain:
                y = t(y)
            for t in reversed(chain):
                y = t(y, decrypt=True)
            lost[flip, enc] = int(((y * 255).round().long() != x).sum())
    assert lost == {(0, 0): 9, (0, 1): 5, (1, 0): 160, (1, 1): 161}


@pytest.mark.parametrize("m", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_chain_differs_exactly_at_flipped_truncated_positions(m, seed):
    key = rand_key("shuffle,negpos,ffx", m, seed=seed)
    shuffle, negpos, ffx = key.steps
    x = images(6, 3, 16, 16)
    theirs = (authors_float(key, x) * TABLE.max()).round().long()  # their integers: output * max(E)
    ours = F.encrypt_codes(x, F.compile_plan(key, (16, 16))).long()
    theirs_b, ours_b = F.to_blocks(theirs, m), F.to_blocks(ours, m)

    v = F.to_blocks(x, m).long()[..., list(shuffle.perm)]  # value arriving at each output position
    flipped = torch.tensor(negpos.mask, dtype=torch.bool).expand_as(v)
    enc = torch.tensor(ffx.mask, dtype=torch.bool).expand_as(v)
    bites = flipped & torch.isin(v, torch.tensor(TRUNCATED))
    assert bites.any() and (flipped & ~bites).any() and (~flipped).any()

    def ffx_of(w):
        return torch.where(enc, TABLE[w], w)

    assert torch.equal(theirs_b[~flipped], ours_b[~flipped])  # identical wherever negpos did not flip
    assert torch.equal(theirs_b[flipped & ~bites], ours_b[flipped & ~bites])
    assert torch.equal(theirs_b[bites], ffx_of(254 - v)[bites])  # theirs: E(254 - v) (or 254 - v unencrypted)
    assert torch.equal(ours_b[bites], ffx_of(255 - v)[bites])  # ours: the exact E(255 - v)
    assert torch.equal(theirs_b != ours_b, bites)  # and nowhere else


@pytest.mark.parametrize("recipe", [*RECIPES, "ffx,ffx", "negpos,ffx,negpos"])
@pytest.mark.parametrize("m", [2, 8])
def test_compat_authors_reproduces_their_floats_bit_for_bit(recipe, m):
    key = rand_key(recipe, m, seed=m)
    x = images(3, 3, 16, 16)
    theirs = authors_float(key, x)
    t = KeyedTransform(key, compat="authors")
    assert torch.equal(t(x), theirs)
    assert torch.equal(t.half()(x), theirs)  # a module-wide dtype cast does not round the tables
    scale = 255 if "ffx" not in recipe else int(TABLE.max())
    assert torch.equal(t.encode(x).long(), (theirs.double() * scale).round().long())
    if "ffx" in recipe:  # float input v/255 is quantised to v first: same values
        assert torch.equal(t(x.float() / 255), theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_compat_authors_on_device(device):
    key = rand_key("shuffle,negpos,ffx", 4, seed=2)
    x = images(2, 3, 16, 16)
    t = KeyedTransform(key, compat="authors").to(device)
    assert torch.equal(t(x.to(device)).cpu(), authors_float(key, x))


def test_compat_is_not_one_to_one_and_refuses_decrypt():
    key = KeySet(1, 1, (NegPos((1,)), FFX((1,), "password")))  # every pixel flipped, then encrypted
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    exact, authors = F.compile_plan(key, (16, 16)), F.compile_plan(key, (16, 16), compat="authors")
    assert F.encrypt_codes(x, exact).unique().numel() == 256
    assert F.encrypt_codes(x, authors).unique().numel() == 224
    assert torch.equal(F.decrypt(F.encrypt(x, exact), exact), x)
    for fn in (F.decrypt, F.decrypt_codes):
        with pytest.raises(ValueError, match="compat='authors' cannot decrypt"):
            fn(F.encrypt(x, authors), authors)
    plain = F.compile_plan(KeySet(1, 1, (NegPos((1,)),)), (16, 16), compat="authors")
    with pytest.raises(ValueError, match="cannot decrypt"):
        F.decrypt_float(x.float() / 255, plain)
    with pytest.raises(ValueError, match="cannot decrypt"):
        KeyedTransform(key, compat="authors").inverse(F.encrypt(x, authors))


def test_compat_argument_checks():
    key = rand_key("negpos,ffx", 2)
    with pytest.raises(ValueError, match="compat must be one of exact, authors"):
        F.compile_plan(key, (4, 4), compat="paper")
    with pytest.raises(ValueError, match="compiled with compat='authors'"):
        F.compile_plan(F.compile_block_plan(key, "authors"), (4, 4))
    assert "compat='authors'" in repr(F.compile_block_plan(key, "authors"))
    assert "compat=authors" in repr(KeyedTransform(key, compat="authors"))


def test_cli_encrypt_compat_authors_and_decrypt_refuses(tmp_path, capsys):
    key = rand_key("shuffle,negpos,ffx", 4, seed=1)
    key_path = tmp_path / "key.json"
    key.save(key_path)
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(images(1, 3, 16, 16)[0].permute(1, 2, 0).numpy()).save(img)
    assert main(["encrypt", "--key", str(key_path), "--compat", "authors", str(img), "-o", str(tmp_path / "a")]) == 0
    assert main(["encrypt", "--key", str(key_path), str(img), "-o", str(tmp_path / "e")]) == 0
    x = read_image(img)[None]
    theirs = (authors_float(key, x) * TABLE.max()).round().long()[0]
    assert torch.equal(read_codes(tmp_path / "a" / "img.png").long(), theirs)
    assert not torch.equal(read_codes(tmp_path / "e" / "img.png").long(), theirs)
    capsys.readouterr()
    argv = ["decrypt", "--key", str(key_path), "--compat", "authors", str(tmp_path / "a" / "img.png")]
    assert main([*argv, "-o", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not one-to-one" in err
    assert not (tmp_path / "d").exists()
