from __future__ import annotations

import hashlib
import json
import math
import random
import stat

import numpy as np
import pytest
import torch

from blockkey import FFX, KeyFileError, KeySet, NegPos, Shuffle
from blockkey.keys import parse_recipe


class TestGenerate:
    def test_material_is_valid_and_fresh(self):
        a = KeySet.generate("shuffle,negpos,ffx", 4)
        b = KeySet.generate("shuffle,negpos,ffx", 4)
        assert a.recipe == ("shuffle", "negpos", "ffx") and a.block_len == 48
        assert sorted(a.steps[0].perm) == list(range(48))
        assert a.fingerprint != b.fingerprint
        assert a.steps[2].password != b.steps[2].password and len(a.steps[2].password) == 25

    def test_global_rngs_untouched(self):
        states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        KeySet.generate("shuffle,negpos,ffx", 8)
        KeySet.derive("pass", "shuffle,negpos", 4, salt=b"s")
        assert torch.equal(torch.get_rng_state(), states[0])
        assert random.getstate() == states[1]
        assert np.array_equal(np.random.get_state()[1], states[2])

    def test_masks_are_not_biased(self):
        # 200 keys x 48 bits: the ones should be near 50 % (authors' code fixes L/2 - 1 ones).
        ones = sum(sum(KeySet.generate("negpos", 4).steps[0].mask) for _ in range(200))
        assert 0.45 < ones / (200 * 48) < 0.55

    def test_recipe_parsing(self):
        assert parse_recipe("shuffle+np,FFX") == ("shuffle", "negpos", "ffx")
        with pytest.raises(KeyFileError, match="unknown transform 'blur'"):
            parse_recipe("shuffle,blur")
        with pytest.raises(KeyFileError, match="at least one"):
            parse_recipe(" , ")


class TestDerive:
    def test_deterministic(self):
        a = KeySet.derive("correct horse", "shuffle,negpos,ffx", 4, salt=b"salt")
        b = KeySet.derive("correct horse", "shuffle,negpos,ffx", 4, salt=b"salt")
        assert a.fingerprint == b.fingerprint and a.steps == b.steps
        assert a.meta["kdf"]["salt"] == b"salt".hex()

    @pytest.mark.parametrize(
        "change",
        [
            dict(passphrase="correct horsf"),
            dict(salt=b"salu"),
            dict(block_size=8),
            dict(recipe="negpos,shuffle,ffx"),
        ],
    )
    def test_every_input_matters(self, change):
        base = dict(passphrase="correct horse", recipe="shuffle,negpos,ffx", block_size=4, salt=b"salt")
        a = KeySet.derive(**base)
        b = KeySet.derive(**{**base, **change})
        assert a.fingerprint != b.fingerprint
        assert a.steps[-1].password != b.steps[-1].password

    def test_random_salt_when_missing(self):
        a = KeySet.derive("pw", "shuffle", 4)
        b = KeySet.derive("pw", "shuffle", 4)
        assert a.meta["kdf"]["salt"] != b.meta["kdf"]["salt"]
        again = KeySet.derive("pw", "shuffle", 4, salt=bytes.fromhex(a.meta["kdf"]["salt"]))
        assert again.fingerprint == a.fingerprint


class TestFile:
    def test_roundtrip_and_mode(self, tmp_path):
        key = KeySet.generate("shuffle,negpos,ffx", 4)
        path = key.save(tmp_path / "k.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        loaded = KeySet.load(path)
        assert loaded == key and loaded.fingerprint == key.fingerprint
        with pytest.raises(FileExistsError, match="refusing to overwrite"):
            key.save(path)

    def test_hand_written_key(self, tmp_path):
        perm = list(range(12))[::-1]
        doc = {
            "format": "blockkey.keyset",
            "version": 1,
            "block_size": 2,
            "channels": 3,
            "steps": [
                {"type": "shuffle", "perm": perm},
                {"type": "ffx", "mask": [1, 0] * 6, "password": "password"},
            ],
        }
        (tmp_path / "k.json").write_text(json.dumps(doc))
        key = KeySet.load(tmp_path / "k.json")
        assert key.steps == (Shuffle(tuple(perm)), FFX((1, 0) * 6, "password"))
        # Fingerprint: SHA-256 over the canonical JSON of the key material (independent recomputation).
        body = {"version": 1, "block_size": 2, "channels": 3, "steps": doc["steps"]}
        canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert key.fingerprint == hashlib.sha256(canon).hexdigest()[:16]

    @pytest.mark.parametrize(
        "mutate,message",
        [
            (lambda d: "{not json", "not valid JSON"),
            (lambda d: {**d, "format": "other"}, "not a blockkey key file"),
            (lambda d: {**d, "version": 99}, "unsupported key file version 99"),
            (lambda d: {**d, "block_size": 0}, "block_size must be a positive integer"),
            (lambda d: {**d, "steps": [{"type": "shuffle", "perm": [0, 0, 1, 2] * 3}]}, "must be a permutation"),
            (lambda d: {**d, "steps": [{"type": "negpos", "mask": [2] * 12}]}, "each 0 or 1"),
            (lambda d: {**d, "steps": [{"type": "negpos", "mask": [1] * 11}]}, "mask must be 12 values"),
            (lambda d: {**d, "steps": [{"type": "ffx", "mask": [1] * 12}]}, "needs a 'password'"),
            (lambda d: {**d, "steps": [{"type": "rot13"}]}, "unknown type 'rot13'"),
            (lambda d: {**d, "steps": []}, "at least one step"),
            (lambda d: {**d, "fingerprint": "0000000000000000"}, "fingerprint .* does not match"),
            (lambda d: [1, 2], "expected a JSON object"),
        ],
    )
    def test_corrupt_files_refused(self, tmp_path, mutate, message):
        doc = KeySet(2, 3, (NegPos((1, 0) * 6),)).to_json()
        bad = mutate(doc)
        (tmp_path / "k.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(KeyFileError, match=message):
            KeySet.load(tmp_path / "k.json")

    def test_missing_file(self, tmp_path):
        with pytest.raises(KeyFileError, match="does not exist"):
            KeySet.load(tmp_path / "nope.json")


class TestReport:
    def test_key_space(self):
        key = KeySet.generate("shuffle,negpos,ffx", 4)
        bits = dict(key.key_space_bits())
        assert bits["shuffle"] == pytest.approx(math.log2(math.factorial(48)))
        assert bits["negpos"] == 48
        assert bits["ffx"] == pytest.approx(48 + 25 * math.log2(36))  # 25 random base-36 characters
        assert key.key_space_total() == pytest.approx(sum(bits.values()))
        hand = KeySet(4, 3, (FFX((1,) * 48, "password"),))  # every position: the mask is public (ffx-all)
        assert dict(hand.key_space_bits())["ffx"] == pytest.approx(8 * math.log2(26))
        half = KeySet(4, 3, (FFX((1, 0) * 24, "password"),))
        assert dict(half.key_space_bits())["ffx"] == pytest.approx(48 + 8 * math.log2(26))

    def test_repr_hides_material(self):
        key = KeySet.generate("ffx", 2)
        text = repr(key) + str(key) + repr(key.steps)
        assert key.fingerprint in text and key.steps[0].password not in text
        assert "0, 1" not in repr(KeySet.generate("shuffle,negpos", 2).steps)


class TestReviewRegressions:
    def test_errors_do_not_echo_key_material(self):
        perm = list(range(12))
        perm[3] = 7  # duplicated 7: the message must say so by counts, never list the values
        doc = {
            "format": "blockkey.keyset",
            "version": 1,
            "block_size": 2,
            "channels": 3,
            "steps": [{"type": "shuffle", "perm": perm}, {"type": "negpos", "mask": [5] + [1] * 11}],
        }
        with pytest.raises(KeyFileError) as e:
            KeySet.from_json(doc)
        assert str(e.value) == "shuffle: perm must be a permutation of 0..11; got 12 values, 11 distinct"
        doc["steps"] = doc["steps"][1:]
        with pytest.raises(KeyFileError) as e:
            KeySet.from_json(doc)
        assert str(e.value) == "negpos: mask must be 12 values, each 0 or 1; got 12 values, 1 invalid"

    def test_key_space_ignores_unverified_meta(self):
        doc = KeySet(4, 3, (FFX((1,) * 48, "a"),)).to_json()
        doc["meta"] = {"source": "os-entropy"}
        assert dict(KeySet.from_json(doc).key_space_bits())["ffx"] == pytest.approx(math.log2(26))

    def test_bad_unicode_and_deep_json(self, tmp_path):
        with pytest.raises(KeyFileError, match="not valid Unicode"):
            KeySet.derive("\ud800", "shuffle", 2, salt=b"s")
        doc = KeySet(2, 3, (FFX((1,) * 12, "x"),)).to_json()
        doc["steps"][0]["password"] = "\ud800"
        doc.pop("fingerprint")
        (tmp_path / "k.json").write_text(json.dumps(doc))
        with pytest.raises(KeyFileError, match="not valid Unicode"):
            KeySet.load(tmp_path / "k.json")
        (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(KeyFileError, match="nested too deeply"):
            KeySet.load(tmp_path / "deep.json")

    def test_generated_masks_are_never_empty(self):
        assert all(any(KeySet.generate("ffx", 1, 1).steps[0].mask) for _ in range(50))


def test_from_seed_is_reproducible_and_marked_public():
    from blockkey import KeySet

    a = KeySet.from_seed("attack/0/1", "shuffle,negpos,ffx", 4)
    assert a == KeySet.from_seed("attack/0/1", "shuffle,negpos,ffx", 4)
    assert a != KeySet.from_seed("attack/0/2", "shuffle,negpos,ffx", 4)
    assert sorted(a.steps[0].perm) == list(range(48)) and any(a.steps[1].mask)
    assert "not secret" in a.meta["source"]
