"""Property-based fuzzing of the CLI: no argument list or input file makes ``blockkey`` crash.

For every subcommand of the parser, hypothesis draws argument lists from the parser itself:
checked numbers at and beyond their ranges (NaN, inf, empty, text), good and bad paths (missing,
empty name, directories, wrong file types, corrupt and truncated files), choices and stray values.
Each list runs in-process through ``main(argv)``; the property: exit code 0 or 2, no traceback,
a usage or user error is one ``blockkey...: error:`` line at the end of stderr, and no input file
changes. A tiny world (data set, keys, three trained runs, images, broken files) is made once per
session; valid numbers are drawn small so that every run stays short. Budget: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockkey import argtypes as at
from blockkey.cli import build_parser, main
from blockkey.imageio import write_png
from blockkey.train import TrainConfig, fit
from blockkey.transforms import KeyedTransform

from .helpers import colour_data, rand_key, with_inner, write_folder

EXAMPLES = {"cheap": 40, "train": 25, "slow": 6, "attack": 4}  # per command (each attack); see docs/reliability.md
COST = {"demo": "slow", "tour": "slow", "train": "train", "evaluate": "train", "attack": "attack", "harden": "train"}
# Options drawn on every example of a command because their defaults are long runs (demo: 8,000 images).
ALWAYS = {
    "demo": {"--epochs", "--limit"},
    "train": {"--epochs", "--batch-size"},
    "evaluate": {"--wrong-keys"},
    "attack": {"--epochs", "--pairs", "--images", "--keys", "--iterations"},
    "harden": {"--batch-size", "--thief-batch"},
}
GOOD = {"--limit": "300", "--batch-size": "8", "--batch": "8", "--sample": "6", "--block-size": "4", "--patch": "4"}
GOOD |= {"--fractions": "1.0", "--stream": "16", "--wrong-keys": "1", "--thief-batch": "8"}
OUT = "@OUT@/"  # replaced by a fresh folder for each example
KEEP = "@KEEP@"  # an existing input given as an output: --force is then left out (it may replace it)
FF = os.fsdecode(b"\xff")  # a file-name byte that is not UTF-8
MAX_PIXELS = 128 * 128  # the fuzz's pixel limit (BLOCKKEY_MAX_PIXELS): the tour's sample is exactly at it
ERROR_LINE = re.compile(r"^blockkey( [a-z-]+){0,2}: error: \S")  # blockkey attack NAME: error: ...


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "out" not in p.relative_to(root).parts[:1]
    }


def _train(data, key, out, model="fastnet", kwargs=None, norm="position"):
    kwargs = {"width": 0.25} if kwargs is None else kwargs
    cfg = TrainConfig(model=model, model_kwargs=kwargs, epochs=1, batch_size=8, lr=0.05, amp="off", norm=norm)
    fit(data, None, key, cfg, out, progress=False, log=lambda s: None, data_info={"source": str(out.parent / "ds")})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs of every kind, good and broken, plus three tiny trained runs (about 3 s on a 2-vCPU VM)."""
    w = tmp_path_factory.mktemp("fuzz")
    data = colour_data(6, size=16)
    write_folder(w / "ds", data)
    write_folder(w / "ds_one", colour_data(1, size=16))
    key = rand_key("shuffle,negpos", 4)
    key.save(w / "key.json")
    rand_key("shuffle,negpos,ffx", 4, seed=1).save(w / "ffx.json")
    rand_key("shuffle", 2, seed=2).save(w / "m2.json")
    (w / "truncated.json").write_text((w / "key.json").read_text()[:50])
    (w / "other.json").write_text('{"format": "something else", "steps": []}')
    (w / "empty").write_bytes(b"")
    (w / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    write_png(w / "plain.png", data.images[0])
    write_png(w / "enc.png", KeyedTransform(key).encode(data.images[:1])[0])
    (w / "truncated.png").write_bytes((w / "plain.png").read_bytes()[:40])
    (w / "nodir").mkdir()
    _train(data, key, w / "run")
    _train(data, None, w / "plain_run", "patchnet", {"patch": 4})
    _train(data, key, w / "key_run", "patchnet", {"patch": 4})
    shutil.copytree(w / "run", w / "corrupt_run")
    (w / "corrupt_run" / "meta.json").write_text("{not json")
    shutil.copytree(w / "run", w / "truncated_run")
    weights = w / "truncated_run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (w / "half_run").mkdir()
    (w / "half_run" / "LATEST").write_text("state-0001")
    _hostile(w, data, key)
    return w


def _hostile(w: Path, data, key) -> None:
    """Files that parse but are hostile, names that are not UTF-8, images at and above the pixel limit."""
    from blockkey.imagepack import pack_image_folder

    doc = json.loads((w / "key.json").read_text())
    deep = "[" * 100_000 + "]" * 100_000
    (w / "deep.json").write_text(deep)
    (w / "bigint.json").write_text(json.dumps(doc).replace('"block_size": 4', '"block_size": ' + "9" * 5000))
    (w / "wrongtype.json").write_text(json.dumps({**doc, "channels": "3"}))
    meta = json.loads((w / "run" / "meta.json").read_text())
    for name, text in {
        "deep_run": '{"format": "blockkey.model", "x": ' + deep + "}",
        "bigint_run": json.dumps({**meta, "world_size": int("1" * 4000)}).replace("1" * 4000, "1" * 5000),
        "badargs_run": json.dumps({**meta, "model_kwargs": {"width": 0.25, "depth": 9}}),
        "wrongtype_run": json.dumps({**meta, "data": {**meta["data"], "limit": "300"}}),
    }.items():
        shutil.copytree(w / "run", w / name)
        (w / name / "meta.json").write_text(text)
    shutil.copy(w / "key.json", w / f"key{FF}.json")
    shutil.copy(w / "plain.png", w / f"plain{FF}.png")
    shutil.copytree(w / "run", w / f"run{FF}")
    write_png(w / "over.png", torch.zeros(3, 129, 128, dtype=torch.uint8))  # one row above the limit
    write_png(w / "at.png", torch.zeros(3, 128, 128, dtype=torch.uint8))  # exactly at it
    pack_image_folder(w / "ds", w / "ds.npz")  # the .npz image pack (--data)
    rand_key("shuffle,negpos", 4, seed=4).save(w / "m4.json")  # rekey's new key
    inner_key = with_inner(rand_key("shuffle", 4, seed=3))
    inner_key.save(w / "inner.json")
    _train(data, inner_key, w / "inner_run", "patchnet", {"patch": 4, "inner": True, "width": 0.25})
    table_key = rand_key("shuffle,negpos,ffx-all", 4, seed=6)  # table-order's target: a shared-table stem
    table_key.save(w / "table.json")
    _train(data, table_key, w / "table_run", "tablenet_shared", {"patch": 4, "width": 0.25}, norm="none")


def _pool(w: Path) -> dict[str, list[str]]:
    """Values by kind: good ones first, then broken ones (hypothesis shrinks towards the first)."""
    files = ["empty", "garbage.png", "truncated.json", "nodir", "missing.bin", "key.json", "plain.png"]
    anyfile = [str(w / f) for f in files] + ["", "-", str(w / f"missing{FF}")]
    keys = ("key.json", "ffx.json", "m2.json", f"key{FF}.json", "inner.json", "truncated.json", "other.json")
    keys += ("deep.json", "bigint.json", "wrongtype.json")
    runs = ("run", "plain_run", "key_run", f"run{FF}", "inner_run", "corrupt_run", "truncated_run", "half_run")
    runs += ("deep_run", "bigint_run", "badargs_run", "wrongtype_run")
    return {
        "key": [str(w / f) for f in keys] + anyfile,
        "image": [str(w / f) for f in ("plain.png", "enc.png", f"plain{FF}.png", "at.png", "truncated.png", "over.png")]
        + anyfile,
        "run": [str(w / d) for d in runs] + anyfile,
        "data": [str(w / "ds"), str(w / "ds.npz"), str(w / "ds_one"), *anyfile],
        "device": ["auto", "cpu", "cuda", "cuda:7", "mps", "meta", "foo", ""],
        "model": ["fastnet", "patchnet", "resnet18_cifar", "tv_nosuchnet", "nosuch", ""],
        "transforms": ["shuffle,negpos", "ffx", "negpos,shuffle,ffx-all", "shuffle,,", "rot13", ""],
        "salt": ["00ff", "zz", "", "0"],
        "passphrase": ["pw", "", "-", "\u00e9\u00e8"],
        "text": ["x", "", "nan", "-1", str(w / "key.json"), str(w / "missing")],
    }


def _numbers(t: at.Int | at.Float) -> st.SearchStrategy[str]:
    """Small valid values (runs stay short), the range's ends, and values beyond it."""
    if isinstance(t, at.Int):
        valid = [t.lo, t.lo + 1, t.lo + 2] + ([t.hi] if t.hi is not None and t.hi <= 256 else [])
        beyond = [t.lo - 1, -(2**70), 2**70] + ([t.hi + 1] if t.hi is not None else [])
        return st.sampled_from([str(v) for v in valid + beyond] + ["1.5", "", "nan", "x"])
    ends = [v for v in (t.lo, t.hi) if v is not None]
    inside = [0.5, 0.05, 1.0] if t.hi is not None else [0.01, 0.5, 2.0]
    beyond = [e + d for e in ends for d in (-1e-9, 1e-9)] + [-1.0, 1e308 * 10, float("nan"), float("-inf")]
    return st.sampled_from([repr(v) for v in inside + ends + beyond] + ["", "1e999", "0x10", "one"])


def _kind(action: argparse.Action) -> str:
    names = {"--transforms": "transforms", "--salt": "salt", "--passphrase": "passphrase", "--device": "device"}
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if flag in names:
        return names[flag]
    if action.type is at.existing_file:
        return "image" if action.dest in ("inputs", "image") else "key"
    if action.type is at.data_source:
        return "data"
    if action.dest == "model" or flag in ("--reference", "--init-from"):
        return "run" if action.type is at.path_name or flag != "--model" else "model"
    return "text"


def _values(action: argparse.Action, pool: dict[str, list[str]]) -> st.SearchStrategy[list[str]]:
    """Two times in three a good value (so that runs get through to a result), else any value of the kind."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if isinstance(action.type, (at.Int, at.Float)):
        one = _numbers(action.type)
        good = GOOD.get(flag, str(action.type.lo) if isinstance(action.type, at.Int) else "0.5")
    elif action.choices:
        one = st.sampled_from([*map(str, action.choices), "bogus", ""])
        good = str(next(iter(action.choices)))
    elif action.type is at.output_path:
        outs = [f"{OUT}o", f"{OUT}o.png", f"{OUT}o.json", f"{OUT}o.jpg", str(Path(pool["key"][0]) / "below"), ""]
        one = st.sampled_from([*outs, KEEP + pool["key"][0], KEEP + pool["image"][0]])
        good = f"{OUT}o.png" if flag == "--plot" else f"{OUT}o.json" if "JSON" in (action.help or "") else f"{OUT}o"
    else:
        one = st.sampled_from(pool[_kind(action)])
        good = pool[_kind(action)][0]
    one = st.one_of(st.just(good), st.just(good), one)
    if action.nargs == "+":
        return st.lists(one, min_size=1, max_size=2, unique=True)
    return one.map(lambda v: [v])


@st.composite
def argv_for(draw, command: str, sub: argparse.ArgumentParser, pool: dict[str, list[str]]) -> list[str]:
    """Positionals in order; required options (and one of each required group) 9 times in 10, others 1 in 3."""
    args: list[str] = command.split()  # "attack adapter": a command of a command
    opts: list[list[str]] = []
    groups = [g._group_actions for g in sub._mutually_exclusive_groups if g.required]
    chosen = {id(draw(st.sampled_from(g))) for g in groups}
    others = {id(a) for g in groups for a in g} - chosen
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1] if action.option_strings else None
        wanted = action.required or flag in ALWAYS.get(command.split()[0], ()) or id(action) in chosen
        odds = [True] * 9 + [False] if wanted else [True] + [False] * (9 if id(action) in others else 2)
        if flag is not None and not draw(st.sampled_from(odds)):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            opts.append([flag])
            continue
        values = draw(_values(action, pool))
        if flag is None:
            args += values
        else:
            opts.append([flag, *values])
    for o in draw(st.permutations(opts)):
        args += o
    return args


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every command, and every attack as its own command (``attack NAME``: each has its own options)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        out.update({f"{name} {n}": p for n, p in nested[0].choices.items()} if nested else {name: parser})
    return out


COMMANDS = sorted(_subparsers())


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_no_arguments_or_files_make_a_command_crash(command, world, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # default outputs (demo, tour without -o) land here, never in the checkout
    pool = _pool(world)
    sub = _subparsers()[command]
    before = _digest(world)
    monkeypatch.setattr("sys.stdin", io.StringIO("passphrase from stdin\n"))
    monkeypatch.setenv("BLOCKKEY_CACHE", str(world / "out" / "cache"))
    monkeypatch.setenv("BLOCKKEY_MAX_PIXELS", str(MAX_PIXELS))
    fresh = itertools.count()
    codes: dict[int, int] = {}

    def check(argv: list[str]) -> int:
        out = world / "out" / command / str(next(fresh))
        out.mkdir(parents=True)
        argv = [a.replace(OUT, f"{out}/") for a in argv]
        code, err = _run(argv)
        assert code in (0, 2), (argv, code, err[-2000:])
        assert "Traceback" not in err, (argv, err[-2000:])
        if code == 2:
            lines = err.strip().splitlines()
            assert lines and ERROR_LINE.match(lines[-1]), (argv, err[-2000:])
            assert sum(bool(ERROR_LINE.match(x)) for x in lines) == 1, (argv, err[-2000:])
            assert len(lines[-1]) < 600, (argv, lines[-1])
        assert _digest(world) == before, argv
        return code

    @settings(
        max_examples=EXAMPLES[COST.get(command.split()[0], "cheap")],
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(argv=argv_for(command, sub, pool))
    def prop(argv):
        if any(a.startswith(KEEP) for a in argv):
            argv = [a.removeprefix(KEEP) for a in argv if a != "--force"]
        code = check(argv)
        codes[code] = codes.get(code, 0) + 1

    prop()
    print(f"{command}: exit codes {codes}")  # pytest -s shows how many examples got through to a result
    assert codes.get(2, 0) >= 1, f"{command}: no drawn example failed (cleanly): {codes}"
    good = [a.replace("@W@", str(world)) for a in SUCCEEDS[command]]
    if not codes.get(0) and good:  # then the command's known-good argument list must get through to a result
        assert check(good) == 0, good


_RUN = ["--model", "@W@/key_run", "--key", "@W@/key.json", "--device", "cpu"]
_INNER = ["--model", "@W@/inner_run", "--key", "@W@/inner.json", "--device", "cpu"]
#: One argument list per command that must succeed (exit 0) in the fuzz world, checked like the drawn ones
#: (empty: the command's success needs a world larger than the fuzz's; its own test file runs it).
SUCCEEDS: dict[str, list[str]] = {
    "demo": ["demo", "-o", f"{OUT}d", "--epochs", "1", "--limit", "30", "--wrong-keys", "1", "--device", "cpu"],
    "tour": ["tour", "-o", f"{OUT}t"],
    "keygen": ["keygen", "--transforms", "shuffle", "--block-size", "4", "-o", f"{OUT}k.json"],
    "info": ["info", f"@W@/key{FF}.json"],
    "encrypt": ["encrypt", "--key", "@W@/key.json", f"@W@/plain{FF}.png", "@W@/at.png", "-o", f"{OUT}e"],
    "decrypt": ["decrypt", "--key", "@W@/key.json", "@W@/enc.png", "-o", f"{OUT}d"],
    "show": ["show", "--key", "@W@/key.json", "@W@/plain.png", "-o", f"{OUT}g.png"],
    "train": "train --data @W@/ds --key @W@/key.json --model fastnet --width 0.25 --epochs 1 --batch-size 8 "
    f"--amp off --device cpu -o {OUT}r".split(),
    "evaluate": ["evaluate", *_RUN, "--wrong-keys", "1", "--plot", f"{OUT}p.png"],
    "harden": ["harden", *_RUN, "-o", f"{OUT}h", "--batch-size", "8", "--thief-batch", "8", "--steps", "1"],
    "convert": ["convert", "--model", "@W@/plain_run", "--key", "@W@/key.json", "-o", f"{OUT}c"],
    "rekey": f"rekey --model @W@/key_run --old-key @W@/key.json --new-key @W@/m4.json -o {OUT}c".split(),
    "predict": ["predict", *_RUN, "@W@/plain.png", "--csv", f"{OUT}p.csv"],
    "export": ["export", "--model", "@W@/key_run", "--key", "@W@/key.json", "-o", f"{OUT}m.onnx"],
    "attack adapter": ["attack", "adapter", *_RUN, "--fractions", "1.0", "--epochs", "1"],
    "attack ciphertext-only": ["attack", "ciphertext-only", *_RUN, "--images", "4"],
    "attack fine-tune": ["attack", "fine-tune", *_RUN, "--fractions", "1.0", "--epochs", "1", "-o", f"{OUT}f"],
    "attack inner-align": ["attack", "inner-align", *_INNER, "--images", "6", "--seconds-per-point", "0.1"],
    "attack key-search": ["attack", "key-search", *_RUN, "--keys", "1", "--iterations", "2", "--batch", "8"],
    "attack known-plaintext": ["attack", "known-plaintext", *_RUN, "--pairs", "1", "--plot", f"{OUT}p.png"],
    "attack random-keys": ["attack", "random-keys", *_RUN, "--keys", "2", "--batch", "8"],
    "attack reference-match": ["attack", "reference-match", *_INNER, "--reference", "@W@/inner_run/model.safetensors"],
    "attack table-order": [
        "attack",
        "table-order",
        "--model",
        "@W@/table_run",
        "--key",
        "@W@/table.json",
        "--device",
        "cpu",
    ],
    "attack weights-only": ["attack", "weights-only", *_RUN, "--reference", "@W@/plain_run"],
}


def test_every_command_is_fuzzed_and_every_number_states_its_range():
    """New options join the fuzz test by their type; a bare ``type=int``/``float`` has no stated range."""
    assert set(SUCCEEDS) == set(COMMANDS)  # every command has an argument list that must succeed
    assert set(COMMANDS) >= {"keygen", "info", "encrypt", "decrypt", "show", "tour", "demo", "train", "evaluate"}
    for name, sub in _subparsers().items():
        for action in sub._actions:
            assert action.type not in (int, float), f"{name} {action.option_strings}: use a blockkey.argtypes range"
            if isinstance(action.type, (at.Int, at.Float)):
                assert f"[{action.type.range}]" in " ".join(sub.format_help().split()), (name, action.dest)
