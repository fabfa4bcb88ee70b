"""The benchmark harness: arguments, machine and git metadata, resumable results, Markdown tables.

Every script in ``benchmarks/`` builds its parser with :func:`parser`, records where it ran with
:func:`machine` and keeps what finished in a :class:`Results` file (``OUT/results.json``): one entry per
finished step, written atomically and merged per entry, so a script can be stopped and run again across
sessions (and two runs writing different entries do not lose each other's work). :func:`train_recipe`
is the one training step the CIFAR-10 benchmarks share.

Example:
    >>> print(markdown_table(["recipe", "accuracy"], [["shuffle", "91.0%"]], align="lr"))
    | recipe | accuracy |
    |---|---:|
    | shuffle | 91.0% |
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .fileio import write_json as write_json_atomic
from .jsonio import read_json

__all__ = [
    "PAPER_RECIPES",
    "PUBLISHED_NOTE",
    "RESULTS_FORMAT",
    "Results",
    "cpu_name",
    "git_commit",
    "machine",
    "markdown_table",
    "parser",
    "train_recipe",
]

RESULTS_FORMAT = "blockkey.bench-results"
#: The paper's CIFAR-10 table (M=4): row name -> recipe (None: the non-protected baseline).
PAPER_RECIPES: dict[str, str | None] = {
    "none": None,
    "shuffle": "shuffle",
    "negpos": "negpos",
    "ffx": "ffx",
    "shuffle-negpos-ffx": "shuffle,negpos,ffx",
}
PUBLISHED_NOTE = "published demo key: anyone can read it; it protects nothing (blockkey CIFAR-10 reproduction)"


def parser(
    doc: str | None, *, out: str | None = None, resumable: bool = True, table: bool = True
) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc`` (a script's docstring) with the shared options:
    ``--out DIR`` (when ``out`` is its default), ``--fresh`` (ignore finished entries; ``resumable`` scripts),
    ``--table`` (only print what has finished; ``table``) and ``--json FILE`` (also write the results there)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    if out is not None:
        ap.add_argument("--out", default=out, help="folder of results.json and the runs (default %(default)s)")
        if resumable:
            ap.add_argument("--fresh", action="store_true", help="start over: ignore the entries finished in --out")
        if table:
            ap.add_argument("--table", action="store_true", help="only print the table of what has finished")
    ap.add_argument("--json", metavar="FILE", help="also write the results and the machine to this JSON file")
    return ap


def cpu_name() -> str:
    """The CPU model and its logical core count, e.g. ``Intel(R) Xeon(R) ... (2 cores)``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit(where: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the checkout holding ``where`` (default: this package), ``+dirty`` with local changes."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine(device: str | torch.device | None = None) -> dict[str, Any]:
    """Where a benchmark ran: CPU model, threads, accelerator, library versions and the git commit."""
    from . import __version__

    dev = torch.device(device) if device is not None else None
    cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "device": str(dev) if dev is not None else None,
        "accelerator": torch.cuda.get_device_name(dev) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "blockkey": __version__,
        "commit": git_commit(),
    }


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` holds one ``l`` or ``r`` per column (default: first left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} columns, headers {len(headers)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row of {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


class Results:
    """``results.json``: the finished entries of a benchmark, each with where and when it was made.

    The file holds ``{"format", "entries": {name: entry}, "provenance": {name: machine + time}}``; files
    written before the harness (the entries alone, at the top level) load too. :meth:`put` re-reads the
    file, replaces one entry and writes atomically: an interrupted run keeps every finished entry, and two
    runs writing different entries keep both.
    """

    def __init__(self, path: str | os.PathLike[str], *, fresh: bool = False, device: str | None = None) -> None:
        self.path = Path(path)
        self.device = device
        self.fresh = fresh  # then what an earlier run finished is replaced, never read back
        self.entries: dict[str, Any] = {} if fresh else self._read()[0]
        self._machine: dict[str, Any] | None = None

    def _read(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if not self.path.exists():
            return {}, {}
        doc = read_json(self.path, CheckpointError, "results file")
        if isinstance(doc, dict) and doc.get("format") == RESULTS_FORMAT:
            return dict(doc.get("entries", {})), dict(doc.get("provenance", {}))
        return (doc, {}) if isinstance(doc, dict) else ({}, {})

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, default: Any = None) -> Any:
        return self.entries.get(name, default)

    def put(self, name: str, entry: Any) -> None:
        """Record ``entry`` as ``name`` (replacing it) and write the file, keeping the other entries on disk."""
        if self._machine is None:
            self._machine = machine(self.device)
        entries, provenance = self._read()
        if self.fresh:  # only what this run finished
            entries = dict(self.entries)
            provenance = {k: v for k, v in provenance.items() if k in entries}
        entries[name] = self.entries[name] = entry
        provenance[name] = {**self._machine, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"format": RESULTS_FORMAT, "entries": entries, "provenance": provenance})
        for k, v in entries.items():  # what other runs finished meanwhile
            self.entries.setdefault(k, v)

    def write_json(self, path: str | os.PathLike[str] | None, **extra: Any) -> None:
        """Also write the entries, the machine and ``extra`` to ``path`` (``--json``), if given."""
        if path:
            doc = {"machine": machine(self.device), "entries": self.entries, **extra}
            write_json_atomic(Path(path), doc)


def train_recipe(
    out: Path,
    name: str,
    recipe: str | None,
    model: str,
    epochs: int,
    train: Any,
    val: Any,
    args: argparse.Namespace,
    *,
    wrong_keys: int,
    block_size: int = 4,
    norm: str = "position",
    model_kwargs: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    fit_options: dict[str, Any] | None = None,
    val_each_epoch: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with a fresh key of ``recipe`` (None: non-protected) into OUT/NAME, resuming an
    interrupted run, then evaluate it on ``val``. The key is saved beside the run as OUT/NAME.key.json.

    ``args`` gives ``batch_size``, ``lr``, ``seed``, ``data`` and ``val_fraction``; ``config``: further
    :class:`~blockkey.train.TrainConfig` fields (they override the defaults set here); ``fit_options``: further
    :func:`~blockkey.train.fit` arguments (``progress``, ``device``, ``compile_model``);
    ``val_each_epoch=False``: no validation pass after every epoch (the epoch times are then training alone)."""
    from .evaluate import evaluate_run
    from .keys import KeySet
    from .models import model_kwargs_for
    from .train import TrainConfig, fit

    run = out / name
    key_path = out / f"{name}.key.json"
    out.mkdir(parents=True, exist_ok=True)
    key = None
    if recipe is not None:
        if key_path.exists():
            key = KeySet.load(key_path)
        else:
            key = KeySet.generate(recipe, block_size).with_note(PUBLISHED_NOTE)
            key.save(key_path)
    kwargs = model_kwargs_for(model, key, train.image_shape, patch=block_size) | (model_kwargs or {})
    cfg = TrainConfig(
        model=model,
        model_kwargs=kwargs,
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        label_smoothing=0.1,
        norm=norm,
        seed=args.seed,
    )
    if config:
        cfg = replace(cfg, **config)
    resume = (run / "LATEST").exists()
    start = time.perf_counter()
    info = {"source": args.data, "val_fraction": args.val_fraction, "split_seed": args.seed}
    options = fit_options or {}
    meta = fit(train, val if val_each_epoch else None, key, cfg, run, resume=resume, data_info=info, **options)
    seconds = time.perf_counter() - start
    report = evaluate_run(run, val, key, wrong_keys=wrong_keys, progress=False, device=options.get("device"))
    print(report.to_markdown(), flush=True)
    tta = {  # the correct key's row only: plain images and wrong keys are in the report above
        mode: evaluate_run(
            run, val, key, wrong_keys=0, progress=False, device=options.get("device"), tta=mode, plain_images=False
        )
        for mode in ("flip", "shift")
    }
    return {
        "tta_accuracy": tta["flip"].rows[0]["accuracy"],  # correct key (or the twin), image + mirror averaged
        "shift_tta_accuracy": tta["shift"].rows[0]["accuracy"],  # also one-pixel shifts (blockkey.tta)
        "model": model,
        "model_kwargs": kwargs,
        "config": dict(config or {}),  # the TrainConfig fields set beyond the defaults here (cutout, ema, ...)
        "epochs": epochs,
        "train_seconds": round(sum(h["seconds"] for h in meta["history"]), 1),
        "wall_seconds_this_session": round(seconds, 1),
        "resumed": resume,
        "eval": report.to_json(),
        "key_fingerprint": key.fingerprint if key else None,
    }
