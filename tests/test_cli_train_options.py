"""``blockkey train`` exposes every TrainConfig field, with TrainConfig's own defaults."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields

import pytest

from blockkey.cli import build_parser, main, train_config
from blockkey.train import TrainConfig

REQUIRED = ["train", "--data", "cifar10", "--no-key", "-o", "run"]


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_field_has_an_option_whose_default_is_trainconfigs():
    defaults = {a.dest: a.default for a in _train_parser()._actions}
    for f in fields(TrainConfig):
        if f.name == "model_kwargs":  # built from --patch, --pretrained, the key and the image size
            continue
        assert f.name in defaults, f"TrainConfig.{f.name} cannot be set from blockkey train"
        assert defaults[f.name] == getattr(TrainConfig(), f.name), f.name


def test_defaults_give_the_default_config():
    args = build_parser().parse_args(REQUIRED)
    assert asdict(train_config(args, {})) == asdict(TrainConfig())


def test_each_option_reaches_the_config():
    argv = [
        *REQUIRED,
        "--model", "patchnet", "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--momentum", "0.5",
        "--no-nesterov", "--weight-decay", "0", "--label-smoothing", "0.1", "--peak", "0.5", "--seed", "7",
        "--amp", "off", "--no-channels-last", "--norm", "position", "--crop-padding", "0", "--no-flip",
        "--init-from", "old-run", "--train-layers", "last", "--sign-loss", "0.25", "--cutout", "8", "--ema", "0.9",
        "--crop-step", "4",
    ]  # fmt: skip
    cfg = train_config(build_parser().parse_args(argv), {"patch": 4})
    assert asdict(cfg) == asdict(
        TrainConfig(
            model="patchnet", model_kwargs={"patch": 4}, epochs=3, batch_size=32, lr=0.05, momentum=0.5,
            nesterov=False, weight_decay=0.0, label_smoothing=0.1, peak=0.5, seed=7, amp="off",
            channels_last=False, norm="position", crop_padding=0, flip=False, init_from="old-run",
            train_layers="last", sign_loss=0.25, cutout=8, ema=0.9, crop_step=4,
        )
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--momentum", "1", "[0, 1)"),
        ("--crop-padding", "-1", ">= 0"),
        ("--cutout", "-1", ">= 0"),
        ("--crop-step", "0", ">= 1"),
        ("--sign-loss", "nan", ">= 0"),
    ],
)
def test_new_options_refuse_values_out_of_range_in_one_line(flag, value, says, capsys):
    assert main([*REQUIRED, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and says in err
