"""The benchmark harness (blockkey.bench) and every script in benchmarks/ using it."""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import pytest

from blockkey import bench

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
STDLIB = set(sys.stdlib_module_names)


def test_results_resume_and_merge_per_entry(tmp_path):
    path = tmp_path / "out" / "results.json"
    a, b = bench.Results(path), bench.Results(path)  # two runs of one benchmark, started together
    a.put("shuffle", {"accuracy": 0.9})
    b.put("negpos", {"accuracy": 0.8})  # b never saw a's entry: it must not drop it
    again = bench.Results(path)
    assert again.entries == {"shuffle": {"accuracy": 0.9}, "negpos": {"accuracy": 0.8}}
    assert "shuffle" in again and again.get("ffx") is None and "ffx" not in again
    doc = json.loads(path.read_text())
    assert doc["format"] == bench.RESULTS_FORMAT and set(doc["provenance"]) == {"shuffle", "negpos"}
    assert doc["provenance"]["negpos"]["torch"] and "cores" in doc["provenance"]["negpos"]["cpu"]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left behind
    fresh = bench.Results(path, fresh=True)
    assert fresh.entries == {}
    fresh.put("ffx", {"accuracy": 0.7})  # --fresh: what earlier runs finished is not read back by a put
    assert "shuffle" not in fresh and "negpos" not in fresh
    doc = json.loads(path.read_text())
    assert set(doc["entries"]) == set(doc["provenance"]) == {"ffx"}


def test_results_read_files_written_before_the_harness(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"none": {"train_seconds": 3.0}}))
    old = bench.Results(path)
    assert old.entries == {"none": {"train_seconds": 3.0}}
    old.put("shuffle", {"train_seconds": 4.0})
    assert set(json.loads(path.read_text())["entries"]) == {"none", "shuffle"}


def test_markdown_table():
    text = bench.markdown_table(["a", "b", "c"], [(1, "x", 2.5)], align="lrr")
    assert text.splitlines() == ["| a | b | c |", "|---|---:|---:|", "| 1 | x | 2.5 |"]
    with pytest.raises(ValueError, match="3 columns"):
        bench.markdown_table(["a", "b", "c"], [(1, 2)])


def test_machine_names_the_commit_and_the_versions():
    import torch

    import blockkey

    m = bench.machine("cpu")
    assert m["torch"] == torch.__version__ and m["blockkey"] == blockkey.__version__ and m["device"] == "cpu"
    assert m["threads"] == torch.get_num_threads() and m["accelerator"] is None
    commit = bench.git_commit(Path(__file__).parent)
    assert commit is None or len(commit.removesuffix("+dirty")) == 40  # None outside a git checkout
    assert bench.git_commit("/") is None


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmarks_import_only_the_package_and_libraries(path):
    """No sys.path edits, no imports of another benchmark or of the tests."""
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0] if node.level == 0 else ".")
    assert roots - STDLIB <= {"blockkey", "torch", "numpy", "PIL", "onnxruntime", "matplotlib", "pyffx"}
    assert "sys.path" not in path.read_text()


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_every_benchmark_parses_its_arguments_through_the_harness(path, capsys):
    module = importlib.import_module(f"benchmarks.{path.stem}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "--json FILE" in capsys.readouterr().out  # the harness's shared option


def test_table_only_runs_read_finished_results(tmp_path, capsys):
    """--table prints what a previous session finished, without data or training."""
    suite = importlib.import_module("benchmarks.attack_suite")
    rep = {
        "key_holder_accuracy": 0.9,
        "plain_accuracy": 0.1,
        "rows": [{"setting": "1 pair", "attacker_accuracy": 0.9, "position_fraction": 1.0}],
    }
    bench.Results(tmp_path / "results.json").put("shuffle", {"known-plaintext": rep})
    suite.main(["--table", "--out", str(tmp_path)])
    assert "| shuffle | known-plaintext | 90.0% | 10.0% | 1 pair | 90.0% | 100% |" in capsys.readouterr().out
    repro = importlib.import_module("benchmarks.reproduce_cifar10")
    assert set(repro.RECIPES) == set(bench.PAPER_RECIPES)
    repro.main(["--table", "--out", str(tmp_path / "empty")])
    assert capsys.readouterr().out.count("\n") == 2  # the header alone
    study = importlib.import_module("benchmarks.architecture_study")
    study.main(["--table", "--out", str(tmp_path / "empty")])
    assert capsys.readouterr().out.count("\n") == 2
