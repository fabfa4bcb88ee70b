"""Hostile files, odd names and the user's own files (issue 26): each class of docs/reliability.md.

1. JSON that parses but is hostile (huge integers, deep nesting, wrong field types, model arguments the
   model does not take): one KeyFileError / CheckpointError line, never a traceback.
2. File names that are not UTF-8: every command prints them escaped (``\\xff``), on a strict UTF-8 stream.
3. Outputs: an existing file or a non-empty folder the command did not make is refused without --force.
4. Image sizes: blockkey's own pixel limit, one line above it; Pillow's bomb warning never reaches the user.
5. Counts above the data: refused in one line (blockkey.attacks.check_counts).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from blockkey import jsonio
from blockkey.attacks import check_counts
from blockkey.attacks.ciphertext_only import ciphertext_only_attack
from blockkey.attacks.inner_align import inner_align_attack
from blockkey.attacks.key_search import random_keys_attack
from blockkey.attacks.known_plaintext import known_plaintext_attack
from blockkey.checkpoint import load_model, read_meta
from blockkey.cli import main
from blockkey.errors import CheckpointError, ImageFileError, KeyFileError, OptionError, OutputExistsError
from blockkey.fileio import printable, show_path
from blockkey.imageio import read_codes, read_image, set_max_image_pixels, write_png
from blockkey.keys import KeySet
from blockkey.train import TrainConfig, fit
from blockkey.transforms import KeyedTransform

from .helpers import colour_data, rand_key, write_folder

FF = os.fsdecode(b"\xff")  # a file-name byte that is not UTF-8 (Linux allows it)


def _run(*argv) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr strict UTF-8 byte streams, as a terminal has (StringIO would take
    any string, surrogates included, and hide the bug)."""
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="strict", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    out.flush()
    err.flush()
    return code, out_b.getvalue().decode(), err_b.getvalue().decode()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16x16 three-class data set (18 images), its key, a run trained one epoch on it."""
    w = tmp_path_factory.mktemp("hostile")
    data = colour_data(6, size=16)
    write_folder(w / "ds", data)
    key = rand_key("shuffle,negpos", 4)
    key.save(w / "key.json")
    cfg = TrainConfig(model="fastnet", model_kwargs={"width": 0.25}, epochs=1, batch_size=8, lr=0.05, amp="off")
    fit(data, None, key, cfg, w / "run", progress=False, log=lambda s: None, data_info={"source": str(w / "ds")})
    write_png(w / "plain.png", data.images[0])
    return w


def _meta(world) -> dict:
    return json.loads((world / "run" / "meta.json").read_text())


def _run_with(world, tmp_path, text: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "meta.json").write_text(text)
    return run


# ------------------------------------------------------------------------------------------------
# 1. hostile JSON
# ------------------------------------------------------------------------------------------------


def test_a_key_file_with_a_huge_integer_is_one_key_file_error(world, tmp_path):
    doc = json.loads((world / "key.json").read_text())
    text = json.dumps(doc).replace('"block_size": 4', '"block_size": ' + "9" * 5000)
    (tmp_path / "k.json").write_text(text)
    with pytest.raises(KeyFileError, match="an integer of 5000 digits"):
        KeySet.load(tmp_path / "k.json")  # Python's int-string limit: ValueError before
    code, _, err = _run("info", tmp_path / "k.json")
    assert code == 2 and "5000 digits" in _one_error_line(err)


def test_a_meta_json_with_a_huge_integer_or_deep_nesting_is_one_checkpoint_error(world, tmp_path):
    big = json.dumps(_meta(world)).replace('"world_size": 1', '"world_size": ' + "1" * 5000)
    with pytest.raises(CheckpointError, match="5000 digits"):
        read_meta(_run_with(world, tmp_path / "a", big))
    deep = _run_with(world, tmp_path / "b", '{"format": "blockkey.model", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_meta(deep)  # RecursionError before
    code, _, err = _run("evaluate", "--model", deep, "--wrong-keys", "0")
    assert code == 2 and "nested too deeply" in _one_error_line(err)


def test_json_limits_are_the_documented_constants(monkeypatch):
    ok = '{"a": [[1]], "n": ' + "9" * jsonio.MAX_INT_DIGITS + "}"
    assert jsonio.loads(ok, "x", CheckpointError)["a"] == [[1]]
    with pytest.raises(CheckpointError, match="digits"):
        jsonio.loads(ok.replace('"n": ', '"n": 9'), "x", CheckpointError)
    nested = "[" * jsonio.MAX_JSON_DEPTH + "]" * jsonio.MAX_JSON_DEPTH
    assert jsonio.loads(nested, "x", CheckpointError) is not None
    assert jsonio.loads('["[[[[[[", "]]"]', "x", CheckpointError) == ["[[[[[[", "]]"]  # brackets in strings
    with pytest.raises(CheckpointError, match="nested too deeply"):
        jsonio.loads("[" + nested + "]", "x", CheckpointError)
    monkeypatch.setattr(jsonio, "MAX_JSON_BYTES", 10)
    with pytest.raises(CheckpointError, match="larger than"):
        jsonio.loads('{"a": "0123456789"}', "x", CheckpointError)
    with pytest.raises(KeyFileError, match="not UTF-8"):
        jsonio.loads(b'"\xff"', "x", KeyFileError)


def test_model_arguments_the_model_does_not_take_are_refused_before_construction(world, tmp_path):
    doc = _meta(world)
    doc["model_kwargs"] = {"width": 0.25, "depth": 3}  # fastnet takes width only
    run = _run_with(world, tmp_path, json.dumps(doc))
    with pytest.raises(CheckpointError, match="fastnet takes no argument 'depth'"):
        load_model(run)  # TypeError from the constructor before
    code, _, err = _run("evaluate", "--model", run, "--wrong-keys", "0")
    assert code == 2 and "takes no argument 'depth'" in _one_error_line(err)


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (("model_kwargs", "width"), "wide", "width must be a number in (0, 16]"),
        (("model_kwargs", "width"), 1e9, "width must be a number in (0, 16]"),  # never a 10^9-channel net
        (("world_size",), "one", "world_size"),
        (("classes",), ["a", "b", 3], "classes/2 must be a string"),
        (("image_shape",), [3, 16, "16"], "image_shape/2 must be an integer"),
        (("data", "limit"), "300", "data/limit"),
        (("data", "val_fraction"), 7, "data/val_fraction"),
        (("config", "amp"), 16, "config/amp"),
        (("config", "channels_last"), "yes", "config/channels_last"),
        (("normalize", "std"), [0.5, 0.0, 0.5], "normalize/std/1"),
        (("key", "block_size"), "4", "key/block_size"),
        (("versions",), {"torch": 2}, "versions/torch"),
        (("history",), [1], "history/0"),
        (("model",), ["fastnet"], "model must be a string"),
    ],
)
def test_every_field_of_meta_json_is_type_checked(world, tmp_path, path, value, says):
    doc = _meta(world)
    place = doc
    for p in path[:-1]:
        place = place[p]
    place[path[-1]] = value
    run = _run_with(world, tmp_path, json.dumps(doc))
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("block_size", "4"), ("channels", [3]), ("steps", {"type": "shuffle"}), ("meta", "x"), ("version", "1")],
)
def test_key_file_fields_are_type_checked(world, tmp_path, field, value):
    doc = json.loads((world / "key.json").read_text())
    doc[field] = value
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match=field):
        KeySet.load(tmp_path / "k.json")


# ------------------------------------------------------------------------------------------------
# 2. names that are not UTF-8
# ------------------------------------------------------------------------------------------------


def test_show_path_and_printable_escape_undecodable_bytes():
    assert show_path(f"a{FF}b.png") == "a\\xffb.png" and show_path(b"a\xff") == "a\\xff"
    assert printable(f"blockkey: error: a{FF}b: no such file") == "blockkey: error: a\\xffb: no such file"
    assert printable("caf\u00e9") == "caf\u00e9"  # proper Unicode stays as it is


@pytest.fixture
def odd(world, tmp_path):
    """The world's inputs again, each under a name holding the byte 0xff."""
    d = tmp_path / f"in{FF}"
    d.mkdir()
    shutil.copy(world / "key.json", d / f"key{FF}.json")
    shutil.copy(world / "plain.png", d / f"img{FF}.png")
    shutil.copytree(world / "run", d / f"run{FF}")
    return d


def _assert_escaped(out: str, err: str) -> None:
    assert "\\xff" in out + err and "Traceback" not in err
    assert not any("\ud800" <= ch <= "\udfff" for ch in out + err)


def test_commands_that_succeed_print_odd_names_escaped(odd, tmp_path):
    key, img, run = odd / f"key{FF}.json", odd / f"img{FF}.png", odd / f"run{FF}"
    out = tmp_path / f"out{FF}"
    out.mkdir()
    for argv in (
        ["keygen", "--transforms", "shuffle", "--block-size", "4", "-o", out / "k.json"],
        ["info", key],
        ["encrypt", "--key", key, img, "-o", out / "enc"],
        ["decrypt", "--key", key, out / "enc" / f"img{FF}.png", "-o", out / "dec"],
        ["show", "--key", key, img, "-o", out / "grid.png"],
        ["tour", "-o", out / "tour", "--transforms", "shuffle"],
        ["predict", "--model", run, "--key", key, img],
        ["evaluate", "--model", run, "--key", key, "--wrong-keys", "0", "--plot", out / "e.png"],
    ):
        code, o, e = _run(*argv)
        assert code == 0, (argv, e)
        _assert_escaped(o, e)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "@/missing", "--key", "@/key\xff.json", "-o", "@/o"],
        ["train", "--data", "@/", "--no-key", "--epochs", "1", "-o", "@/o\xff"],  # the folder is not a data set
        ["evaluate", "--model", "@/missing"],
        ["attack", "known-plaintext", "--model", "@/missing", "--key", "@/key\xff.json"],
        ["harden", "--model", "@/missing", "--key", "@/key\xff.json", "-o", "@/o"],
        ["convert", "--model", "@/missing", "--key", "@/key\xff.json", "-o", "@/o"],
        ["rekey", "--model", "@/missing", "--old-key", "@/key\xff.json", "--new-key", "@/key\xff.json", "-o", "@/o"],
        ["export", "--model", "@/missing", "-o", "@/o.onnx"],
        ["predict", "--model", "@/missing", "@/img\xff.png"],
        ["demo", "-o", "@/", "--epochs", "1", "--limit", "30"],  # a non-empty folder it did not make
        ["info", "@/missing.json"],
        ["encrypt", "--key", "@/key\xff.json", "@/missing.png", "-o", "@/o"],
        ["show", "--key", "@/key\xff.json", "@/img\xff.png", "-o", "@/img\xff.png"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_commands_that_fail_print_odd_names_escaped(odd, argv):
    argv = [a.replace("@", str(odd)).replace("\xff", FF) for a in argv]
    code, out, err = _run(*argv)  # UnicodeEncodeError in the error handler before
    assert code == 2, err
    _one_error_line(err)
    _assert_escaped(out, err)


def test_a_real_process_prints_an_odd_name_escaped(tmp_path):
    name = os.fsencode(tmp_path) + b"/missing\xff.json"
    proc = subprocess.run([sys.executable, "-m", "blockkey", "info", name], capture_output=True, timeout=300)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"missing\\xff.json" in proc.stderr and proc.stderr.count(b"\n") == 1


# ------------------------------------------------------------------------------------------------
# 3. the user's files: refused without --force
# ------------------------------------------------------------------------------------------------


def _mine(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"the user's own file")
    return path.read_bytes()


def test_evaluate_plot_refuses_an_existing_file(world, tmp_path):
    plot = tmp_path / "plot.png"
    before = _mine(plot)
    base = ["evaluate", "--model", world / "run", "--key", world / "key.json", "--wrong-keys", "0", "--plot", plot]
    code, _, err = _run(*base)
    assert code == 2 and "exists" in err and "--force" in _one_error_line(err) and plot.read_bytes() == before
    assert _run(*base, "--force")[0] == 0 and plot.read_bytes()[:4] == b"\x89PNG"


def test_attack_plot_refuses_an_existing_file_before_attacking(world, tmp_path):
    plot = tmp_path / "plot.png"
    before = _mine(plot)
    base = ["attack", "known-plaintext", "--model", world / "run", "--key", world / "key.json", "--pairs", "1"]
    code, out, err = _run(*base, "--plot", plot)
    assert code == 2 and "--force" in _one_error_line(err) and plot.read_bytes() == before and not out
    assert _run(*base, "--plot", plot, "--force")[0] == 0 and plot.read_bytes()[:4] == b"\x89PNG"


def test_tour_refuses_a_folder_holding_other_files(tmp_path):
    out = tmp_path / "tour"
    before = _mine(out / "steps.png")
    code, _, err = _run("tour", "-o", out, "--transforms", "shuffle")
    assert code == 2 and "--force" in _one_error_line(err) and (out / "steps.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["steps.png"]  # nothing written beside it
    assert _run("tour", "-o", out, "--transforms", "shuffle", "--force")[0] == 0
    assert (out / "steps.png").read_bytes() != before
    assert _run("tour", "-o", out, "--transforms", "shuffle")[0] == 0  # now its own folder


@pytest.mark.parametrize("command", ["train", "harden"])
def test_train_and_harden_refuse_a_non_empty_folder_that_holds_no_run(world, tmp_path, command):
    out = tmp_path / "o"
    before = _mine(out / "README.md")  # the model card would replace it
    if command == "train":
        argv = ["train", "--data", world / "ds", "--key", world / "key.json", "--model", "fastnet", "--width", "0.25"]
        argv += ["--epochs", "1", "--batch-size", "8", "--amp", "off", "-o", out]
    else:
        argv = ["harden", "--model", world / "run", "--key", world / "key.json", "-o", out, "--batch-size", "8"]
        argv += ["--thief-batch", "8", "--steps", "1"]
    code, _, err = _run(*argv)
    assert code == 2 and "--force" in _one_error_line(err) and (out / "README.md").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    before = _mine(tmp_path / "d" / "notes.txt")
    code, _, err = _run("demo", "-o", tmp_path / "d", "--epochs", "1", "--limit", "30")
    assert code == 2 and "not empty" in _one_error_line(err) and (tmp_path / "d" / "notes.txt").read_bytes() == before


@pytest.mark.parametrize("command", ["show", "encrypt --npy", "predict --csv"])
def test_single_file_outputs_refuse_an_existing_file(world, tmp_path, command):
    target = tmp_path / ("o.npy" if "npy" in command else "o.csv" if "csv" in command else "o.png")
    before = _mine(target)
    key, img = world / "key.json", world / "plain.png"
    argv = {
        "show": ["show", "--key", key, img, "-o", target],
        "encrypt --npy": ["encrypt", "--key", key, img, "--npy", "-o", target],
        "predict --csv": ["predict", "--model", world / "run", "--key", key, img, "--csv", target],
    }[command]
    code, _, err = _run(*argv)
    assert code == 2 and "exists; refusing to overwrite it (use --force)" in _one_error_line(err)
    assert target.read_bytes() == before
    assert _run(*argv, "--force")[0] == 0 and target.read_bytes() != before


def test_the_library_plots_refuse_an_existing_file_too(world, tmp_path):
    from blockkey.evaluate import evaluate_run

    data = colour_data(2, size=16)
    rep = evaluate_run(world / "run", data, KeySet.load(world / "key.json"), wrong_keys=0, progress=False)
    before = _mine(tmp_path / "p.png")
    with pytest.raises(OutputExistsError, match="use --force"):
        rep.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["p.png"]
    rep.plot(tmp_path / "p.png", overwrite=True)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# 4. image sizes: blockkey's limit, no library noise
# ------------------------------------------------------------------------------------------------


def test_pillows_bomb_warning_never_reaches_the_user(world, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # the 16x16 image (256 pixels) is a "bomb" for Pillow
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert read_image(world / "plain.png").shape == (3, 16, 16)
        code, _, err = _run("encrypt", "--key", world / "key.json", world / "plain.png", "-o", tmp_path / "e")
    assert code == 0 and not err and not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_images_above_blockkeys_pixel_limit_are_one_line(world, tmp_path, monkeypatch):
    enc = tmp_path / "enc.png"
    write_png(enc, KeyedTransform(KeySet.load(world / "key.json")).encode(read_image(world / "plain.png")[None])[0])
    set_max_image_pixels(255)
    try:
        with pytest.raises(ImageFileError, match=r"16x16 = 256 pixels is above blockkey's limit of 255"):
            read_image(world / "plain.png")
        with pytest.raises(ImageFileError, match="above blockkey's limit"):
            read_codes(enc)
    finally:
        set_max_image_pixels(None)
    assert read_image(world / "plain.png").shape == (3, 16, 16)  # exactly at the limit: read
    argv = ["encrypt", "--key", world / "key.json", world / "plain.png", "-o", tmp_path / "e"]
    code, _, err = _run("--max-pixels", "100", *argv)
    assert code == 2 and "--max-pixels" in _one_error_line(err)
    monkeypatch.setenv("BLOCKKEY_MAX_PIXELS", "100")
    code, _, err = _run(*argv)
    assert code == 2 and "limit of 100" in _one_error_line(err)
    assert _run("--max-pixels", "256", *argv)[0] == 0  # the option raises the limit over the environment


# ------------------------------------------------------------------------------------------------
# 5. counts above the data
# ------------------------------------------------------------------------------------------------


def test_check_counts_is_the_one_rule():
    check_counts("--pairs", [1, 20], 20, "images")
    with pytest.raises(OptionError, match="--pairs 1000000 is more than the 20 images the data holds"):
        check_counts("--pairs", [1, 1000000], 20, "images")


@pytest.mark.parametrize(
    ("attack", "options", "says"),
    [
        ("known-plaintext", ["--pairs", "1", "1000000"], "--pairs 1000000 is more than the"),
        ("ciphertext-only", ["--images", "100"], "--images 100 is more than the"),
        ("random-keys", ["--keys", "1", "--batch", "5000"], "--batch 5000 is more than the"),
    ],
)
def test_attacks_refuse_counts_above_their_data(world, attack, options, says):
    code, out, err = _run("attack", attack, "--model", world / "run", "--key", world / "key.json", *options)
    assert code == 2 and says in _one_error_line(err) and not out  # ran with fewer and said nothing before


def test_attack_functions_refuse_counts_above_their_data(tiny_target):
    target, train = tiny_target
    with pytest.raises(OptionError, match="evaluation images"):
        known_plaintext_attack(target, [len(target.val) + 1])
    with pytest.raises(OptionError, match="attack-pool images"):
        ciphertext_only_attack(target, train, [len(train)])
    with pytest.raises(OptionError, match="--batch"):
        random_keys_attack(target, train, keys=1, batch=len(train) + 1, progress=False)
    with pytest.raises(OptionError, match="--images"):
        inner_align_attack(target, train, [len(train) + 1])
    rep = ciphertext_only_attack(target, train, [len(train) - 1])  # the largest count that fits runs
    assert rep.rows[0]["images"] == len(train) - 1 and rep.rows[0]["plain_images"] == 1
