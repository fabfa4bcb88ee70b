"""The attack registry: one run(target, data, settings) per attack, read by the CLI and the benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from blockkey.attacks import AttackReport
from blockkey.attacks.known_plaintext import known_plaintext_attack
from blockkey.attacks.registry import (
    ATTACKS,
    AttackData,
    AttackSpec,
    add_attack_parsers,
    attacks,
    get_attack,
    register_attack,
    run_attack,
    settings_from_args,
)
from blockkey.cli import build_parser
from blockkey.errors import BlockkeyError

BUILTIN = {
    "adapter": "data_fraction",
    "ciphertext-only": "images",
    "fine-tune": "data_fraction",
    "inner-align": "images",
    "key-search": "iterations",
    "known-plaintext": "pairs",
    "random-keys": None,
    "weights-only": None,
}


def test_every_attack_registers_itself_with_its_plot_axis():
    specs = attacks()
    assert {n: s.x_axis for n, s in specs.items() if n in BUILTIN} == BUILTIN
    for spec in specs.values():
        assert dataclasses.is_dataclass(spec.settings) and spec.settings() is not None  # defaults for every field


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_cli_subparser_offers_exactly_the_attacks_settings(name):
    spec = get_attack(name)
    cli = {f.name for f in dataclasses.fields(spec.settings) if "help" in f.metadata}
    args = build_parser().parse_args(["attack", name, "--model", "m", "--key", __file__])
    common = {
        "model",
        "key",
        "data",
        "data_root",
        "sample",
        "plot",
        "force",
        "device",
        "json",
        "command",
        "attack",
        "func",
    }
    common |= {"max_pixels"}  # blockkey --max-pixels
    assert set(vars(args)) - common - {"attack_spec"} == cli and args.attack_spec is spec
    assert settings_from_args(spec, args) == spec.settings()  # the CLI defaults are the settings' defaults


def test_cli_options_reach_the_settings():
    args = build_parser().parse_args(
        ["attack", "fine-tune", "--model", "m", "--key", __file__, "--fractions", "0.5", "0.2", "-o", "out"]
    )
    s = settings_from_args(get_attack("fine-tune"), args)
    assert s.fractions == [0.5, 0.2] and s.output == "out" and s.epochs == 30 and s.seed == 0


def test_unknown_attack_and_duplicate_names_are_refused():
    with pytest.raises(BlockkeyError, match="unknown attack 'nope'; expected one of"):
        get_attack("nope")
    spec = get_attack("adapter")
    with pytest.raises(ValueError, match="already registered"):
        register_attack(spec)
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_attack(AttackSpec("not-a-dataclass", "x", dict, spec.run))
    assert "not-a-dataclass" not in ATTACKS


def test_a_registered_attack_gets_its_own_subparser():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        rounds: int = dataclasses.field(default=3, metadata={"help": "rounds", "flags": (), "argparse": {"type": int}})

    spec = AttackSpec("probe", "a probe", Settings, lambda t, d, s: None)  # type: ignore[arg-type,return-value]
    ATTACKS["probe"] = spec
    try:
        p = argparse.ArgumentParser()
        add_attack_parsers(p.add_subparsers(dest="attack"))
        args = p.parse_args(["probe", "--rounds", "5"])
        assert settings_from_args(spec, args) == Settings(5) and args.attack_spec is spec
        with pytest.raises(SystemExit):
            p.parse_args(["adapter", "--rounds", "5"])  # not an option of another attack
    finally:
        del ATTACKS["probe"]


def _rows(rep: AttackReport) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rep.rows]


def test_running_through_the_registry_is_the_direct_call(tiny_target):
    target, train = tiny_target
    direct = known_plaintext_attack(target, [1, 3], data=train, seed=5)
    via = run_attack("known-plaintext", target, AttackData(train), pairs=[1, 3], pairs_from="train", seed=5)
    assert via.attack == direct.attack == "known-plaintext" and _rows(via) == _rows(direct)
    assert [r["pairs"] for r in via.rows] == [1, 3] and json.dumps(via.to_json())


def test_fine_tune_needs_an_output_folder_and_the_stolen_run(tiny_target):
    target, train = tiny_target
    with pytest.raises(BlockkeyError, match="give -o OUTDIR"):
        run_attack("fine-tune", target, AttackData(train))
    with pytest.raises(BlockkeyError, match="run_dir"):
        run_attack("fine-tune", target, AttackData(train), output="x")


def test_plot_skips_rows_without_its_axis_and_refuses_when_none_has_it(tmp_path):
    from blockkey.errors import BlockkeyError

    rows = [
        {"setting": "weights only", "attacker_accuracy": 0.2},  # no data fraction: not plotted
        {"setting": "1%", "variant": "fine-tune", "data_fraction": 0.01, "attacker_accuracy": 0.3},
    ]
    report = AttackReport("table-order", "tablenet", "f" * 16, ["ffx-all"], 0.5, 0.1, 0.1, rows)
    report.plot(tmp_path / "a.png", "data_fraction")
    assert (tmp_path / "a.png").stat().st_size > 0
    with pytest.raises(BlockkeyError, match="data fraction"):
        report.rows = rows[:1]
        report.plot(tmp_path / "b.png", "data_fraction")
    assert not (tmp_path / "b.png").exists()
