"""The key-step registry: declared once, read by key files, recipes, the plan and rekey."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockkey import FFX, KeyFileError, KeySet, NegPos, Shuffle
from blockkey.functional import compile_plan
from blockkey.keys import RECIPE_TOKENS, STEP_NAMES, parse_recipe
from blockkey.rekey import FFX_REFUSAL, RekeyError, block_affine
from blockkey.steps import ALIASES, STEP_TYPES, TOKENS, KeyStep, register_step

from .helpers import rand_key

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def test_builtin_steps_are_registered_in_the_papers_order():
    assert STEP_NAMES[:3] == ("shuffle", "negpos", "ffx")  # then any step module added to blockkey/steps
    assert STEP_TYPES["shuffle"] is Shuffle and STEP_TYPES["negpos"] is NegPos and STEP_TYPES["ffx"] is FFX
    assert RECIPE_TOKENS[:4] == ("shuffle", "negpos", "ffx", "ffx-all") and RECIPE_TOKENS[-1] == "inner"
    assert {Shuffle.linear, NegPos.linear, FFX.linear} == {True, False} and not FFX.linear
    assert ALIASES == {"shf": "shuffle", "np": "negpos", "neg": "negpos"}
    assert parse_recipe("np+shf,NEG") == ("negpos", "shuffle", "negpos")


# Fingerprints of keys drawn from public seeds and a passphrase before the registry existed (commit 91d91dc):
# the draw order, the key material and its canonical bytes must never change.
KNOWN_FINGERPRINTS = {
    ("seed", "shuffle,negpos,ffx", 4, 3): "3f2ece7df1d7ce76",
    ("seed", "negpos,ffx,shuffle,ffx", 2, 1): "c5ad53b223be7b8c",
    ("seed", "np+shf,ffx-all", 4, 3): "ff91582208f5089e",
    ("seed", "shuffle,negpos,inner", 2, 1): "0f80b7efa491b51c",
    ("derive", "shuffle,negpos,ffx", 2, 3): "2f8b84e1a7963587",
    ("derive", "ffx-all", 2, 3): "9dc4d46f887f0bea",
}


@pytest.mark.parametrize("how,recipe,m,c", list(KNOWN_FINGERPRINTS))
def test_drawn_keys_are_the_same_as_before_the_registry(how, recipe, m, c):
    key = KeySet.from_seed(0, recipe, m, c) if how == "seed" else KeySet.derive("pw", recipe, m, c, salt=b"salt")
    assert key.fingerprint == KNOWN_FINGERPRINTS[how, recipe, m, c]


@pytest.mark.parametrize("path", sorted(CHECKPOINTS.glob("*/key.json")), ids=lambda p: p.parent.name)
def test_released_key_files_load_and_save_to_the_same_bytes(path, tmp_path):
    key = KeySet.load(path)
    key.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert KeySet.load(tmp_path / "again.json").fingerprint == key.fingerprint


def test_rekey_refuses_by_the_linear_flag_not_by_the_name(monkeypatch):
    key = rand_key("shuffle,negpos", 2)
    assert block_affine(key).src.shape == (12,)
    monkeypatch.setattr(NegPos, "linear", False)
    with pytest.raises(RekeyError, match="a negpos step cannot be folded"):
        block_affine(key)
    with pytest.raises(RekeyError) as e:
        block_affine(rand_key("ffx", 2))
    assert str(e.value) == FFX_REFUSAL


def test_rand_key_draws_through_the_registry_and_refuses_unknown_names():
    key = rand_key("shuffle,np,ffx-all", 2, seed=3, password="pw")
    assert key.recipe == ("shuffle", "negpos", "ffx") and key.spec == ("shuffle", "negpos", "ffx-all")
    assert key.steps[2].password == "pw" and rand_key("shuffle", 2, seed=3) == rand_key("shuffle", 2, seed=3)
    assert rand_key("shuffle", 2, seed=3) != rand_key("shuffle", 2, seed=4)
    for bad in ("rot13", "inner"):
        with pytest.raises(KeyFileError):
            rand_key(bad, 2)


def test_unknown_step_types_in_a_key_file_name_the_registered_ones():
    doc = rand_key("negpos", 1).to_json()
    doc["steps"][0]["type"] = "rot13"
    del doc["fingerprint"]
    with pytest.raises(KeyFileError, match="unknown type 'rot13'; expected one of shuffle, negpos, ffx"):
        KeySet.from_json(doc)


def test_register_step_refuses_a_taken_name_and_non_steps():
    class Again(Shuffle):  # type: ignore[misc]
        __slots__ = ()

    with pytest.raises(ValueError, match="shuffle, shf already registered"):
        register_step(Again)
    with pytest.raises(TypeError):
        register_step(int)  # type: ignore[type-var]
    assert STEP_TYPES["shuffle"] is Shuffle and all(issubclass(t.step, KeyStep) for t in TOKENS.values())


def test_a_plan_takes_the_float_path_exactly_for_signed_permutation_tables():
    lin = compile_plan(rand_key("negpos,shuffle", 2), (4, 4))
    nonlin = compile_plan(rand_key("shuffle,ffx", 2), (4, 4))
    assert lin.sign_in is not None and nonlin.sign_in is None
