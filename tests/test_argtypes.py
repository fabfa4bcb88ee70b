"""Range checks shared by the CLI's argparse types and the library (blockkey/argtypes.py)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from blockkey import KeySet
from blockkey import argtypes as at
from blockkey.attacks.adapter import adapter_attack
from blockkey.attacks.known_plaintext import known_plaintext_attack
from blockkey.cli import main
from blockkey.data import DataError
from blockkey.errors import KeyFileError, OptionError, ShapeError
from blockkey.keys import MAX_BLOCK_LEN
from blockkey.train import TrainConfig, fit

from .helpers import colour_data


@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", 0),
        ("epochs", 2.0),
        ("batch_size", 1),
        ("lr", 0.0),
        ("lr", math.nan),
        ("weight_decay", -1e-9),
        ("label_smoothing", 1.0),
        ("peak", 1.5),
        ("seed", -1),
        ("seed", 2**63),
        ("momentum", math.inf),
        ("amp", "fp8"),
        ("norm", "batch"),
        ("train_layers", "middle"),
        ("train_layers", "block:-1"),
        ("train_layers", "block:"),
        ("train_layers", "block:\u00b2"),  # a Unicode digit int() does not take
        ("optimizer", "rmsprop"),
    ],
)
def test_train_config_refuses_each_field_out_of_range(field, value):
    with pytest.raises(OptionError, match=field):
        TrainConfig(**{field: value})


def test_types_parse_check_and_state_their_range():
    assert at.PROBABILITY("0") == 0.0 and at.FRACTION("1") == 1.0 and at.SEED(str(2**63 - 1)) == 2**63 - 1
    for t, bad in [(at.PROBABILITY, "1"), (at.FRACTION, "0"), (at.LEARNING_RATE, "inf"), (at.COUNT, "1.0")]:
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected|must be"):
            t(bad)
    assert at.Float(0, 1, hi_open=True).range == "a number in [0, 1)"
    assert at.Int(0, 64).range == "an integer in 0..64"
    with pytest.raises(OptionError, match="needs at least one value"):
        at.COUNT.check_each("pairs", [])


def test_attacks_check_before_they_touch_the_target():
    with pytest.raises(OptionError, match="pairs must be an integer >= 1; got 0"):
        known_plaintext_attack(None, [1, 0])
    with pytest.raises(OptionError, match=r"fractions must be a number in \(0, 1\]"):
        adapter_attack(None, None, [0.5, 1.5])


def test_key_length_is_bounded_before_allocation():
    with pytest.raises(KeyFileError, match=f"at most {MAX_BLOCK_LEN}"):
        KeySet.generate("shuffle", 100000)
    assert KeySet.generate("negpos", 128, 4).block_len == MAX_BLOCK_LEN


def test_cli_range_errors_are_one_line_and_help_shows_ranges(capsys, tmp_path):
    assert main(["train", "--data", str(tmp_path), "--no-key", "--epochs", "0", "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --epochs: must be an integer >= 1; got 0" in err
    assert main(["train", "--help"]) == 0
    assert "[a number in [0, 1)]" in " ".join(capsys.readouterr().out.split())


def test_too_few_images_and_too_small_images_say_what_is_wrong(tmp_path):
    train = colour_data(1).subset(torch.tensor([0, 1]))  # 2 images for 3 classes
    cfg = TrainConfig(model="fastnet", model_kwargs={"width": 0.25}, epochs=1, batch_size=2, amp="off")
    with pytest.raises(DataError, match="without any"):
        fit(train, None, None, cfg, tmp_path / "a", progress=False, log=lambda s: None)
    cfg = TrainConfig(model="patchnet", model_kwargs={"patch": 4}, epochs=1, batch_size=2, amp="off")
    with pytest.raises(ShapeError, match="patchnet cannot take 3x8x8 images"):
        fit(colour_data(4), None, None, cfg, tmp_path / "b", progress=False, log=lambda s: None)
