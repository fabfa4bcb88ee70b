"""The toy key step (xor) and toy attack (plain-images): each one new module, found by the registries."""

from __future__ import annotations

import pytest
import torch

from blockkey import KeySet
from blockkey.attacks import accuracy
from blockkey.attacks.registry import AttackData, attacks, run_attack
from blockkey.cli import build_parser, main
from blockkey.functional import compile_block_plan, compile_plan, decrypt_codes, encrypt_codes, to_blocks
from blockkey.rekey import RekeyError, block_affine
from blockkey.steps.xor import Xor

from .helpers import images, rand_key


def test_xor_keys_draw_save_and_load_like_any_step(tmp_path):
    key = KeySet.generate("shuffle,xor", 2)
    assert key.recipe == ("shuffle", "xor") and 1 <= key.steps[1].byte <= 254
    key.save(tmp_path / "k.json")
    assert KeySet.load(tmp_path / "k.json") == key
    assert rand_key("xor", 2, seed=1) == rand_key("xor", 2, seed=1)
    assert main(["keygen", "--transforms", "xor,negpos", "--block-size", "2", "-o", str(tmp_path / "c.json")]) == 0


def test_xor_encrypts_like_a_reference_and_decrypts():
    key = KeySet(2, 3, (Xor((1, 0) * 6, 0x5A),))
    x = images(2, 3, 4, 4)
    codes = encrypt_codes(x, compile_plan(key, (4, 4)))
    blocks, out = to_blocks(x, 2), to_blocks(codes, 2)
    mask = torch.tensor((1, 0) * 6, dtype=torch.bool)
    assert torch.equal(out[..., mask], blocks[..., mask] ^ 0x5A) and torch.equal(out[..., ~mask], blocks[..., ~mask])
    assert torch.equal(decrypt_codes(codes, compile_plan(key, (4, 4))), x)


def test_rekey_refuses_xor_by_its_linear_flag_and_the_plan_uses_tables():
    key = rand_key("negpos,xor", 2)
    with pytest.raises(RekeyError, match="a key with an xor step cannot be folded"):
        block_affine(key)
    assert compile_plan(key, (2, 2)).sign_in is None  # no float shortcut for a non-linear table
    with pytest.raises(ValueError, match="reproduces the authors' steps only"):
        compile_block_plan(key, "authors")


def test_plain_images_attack_is_registered_with_its_options(tiny_target):
    target, train = tiny_target
    assert "plain-images" in attacks() and attacks()["plain-images"].x_axis is None
    args = build_parser().parse_args(["attack", "plain-images", "--model", "m", "--key", __file__, "--limit", "4"])
    assert args.limit == 4
    rep = run_attack("plain-images", target, AttackData(train))
    assert rep.rows[0]["attacker_accuracy"] == accuracy(target, None) == rep.plain_accuracy
    assert run_attack("plain-images", target, AttackData(train), limit=6).rows[0]["images"] == 6
