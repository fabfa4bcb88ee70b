"""Reproduce the paper's CIFAR-10 table under the CPU protocol, one model at a time.

For each recipe (none = the non-protected baseline, shuffle, negpos, ffx, shuffle+negpos+ffx; M=4)
it trains the same architecture and schedule on the CIFAR-10 training images with a held-out,
stratified validation split, then evaluates on that split: the correct key, plain images and
--wrong-keys random wrong keys. Models already finished in --out are skipped, so the five can be
run across sessions (each fits the 30-minute CPU budget alone). Results accumulate in
OUT/results.json and print as a Markdown table; --release copies a finished model with its key
(marked as a published demo key) to checkpoints/NAME/.

    python benchmarks/reproduce_cifar10.py --data ../shared/datasets/cifar10/train --only none
    python benchmarks/reproduce_cifar10.py --table            # print what has finished
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from blockkey import KeySet
from blockkey.data import load_dataset, stratified_split
from blockkey.evaluate import evaluate_run
from blockkey.models import block_aligned
from blockkey.train import TrainConfig, fit

RECIPES = {
    "none": None,
    "shuffle": "shuffle",
    "negpos": "negpos",
    "ffx": "ffx",
    "shuffle-negpos-ffx": "shuffle,negpos,ffx",
}
PUBLISHED_NOTE = "published demo key: anyone can read it; it protects nothing (blockkey CIFAR-10 reproduction)"


def table(results: dict) -> str:
    lines = [
        "| recipe (M=4) | model | epochs | train time | correct key | plain images | wrong keys: mean (std, max) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in RECIPES:
        r = results.get(name)
        if r is None:
            continue
        rows = r["eval"]["rows"]
        correct = rows[0]["accuracy"]  # correct key, or the non-protected model
        plain = next((f"{x['accuracy']:.1%}" for x in rows if x["setting"] == "plain images"), "-")
        wrong = next(
            (
                f"{x['accuracy']:.1%} ({x['std']:.1%}, {x['max']:.1%}), n={x['n']}"
                for x in rows
                if "wrong" in x["setting"]
            ),
            "-",
        )
        minutes = r["train_seconds"] / 60
        lines.append(
            f"| {name} | {r['model']} | {r['epochs']} | {minutes:.1f} min | {correct:.1%} | {plain} | {wrong} |"
        )
    return "\n".join(lines)


def train_recipe(
    out: Path,
    name: str,
    recipe: str | None,
    model: str,
    epochs: int,
    train,
    val,
    args: argparse.Namespace,
    *,
    wrong_keys: int,
    block_size: int = 4,
    norm: str = "position",
    model_kwargs: dict | None = None,
    config: dict | None = None,
    fit_options: dict | None = None,
    val_each_epoch: bool = True,
) -> dict:
    """Train ``model`` with a fresh key of ``recipe`` (None: non-protected) into OUT/NAME, resuming an
    interrupted run, then evaluate it on ``val``. The key is saved beside the run as OUT/NAME.key.json.

    ``config``: further :class:`TrainConfig` fields (they override the defaults set here);
    ``fit_options``: further :func:`fit` arguments (``progress``, ``device``, ``compile_model``);
    ``val_each_epoch=False``: no validation pass after every epoch (the epoch times are then training alone)."""
    run = out / name
    key_path = out / f"{name}.key.json"
    key = None
    if recipe is not None:
        if key_path.exists():
            key = KeySet.load(key_path)
        else:
            key = KeySet.generate(recipe, block_size).with_note(PUBLISHED_NOTE)
            key.save(key_path)
    kwargs = ({"patch": block_size} if block_aligned(model) else {}) | (model_kwargs or {})
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
    device = options.get("device")
    report = evaluate_run(run, val, key, wrong_keys=wrong_keys, progress=False, device=device)
    print(report.to_markdown(), flush=True)
    return {
        "model": model,
        "model_kwargs": kwargs,
        "epochs": epochs,
        "train_seconds": round(sum(h["seconds"] for h in meta["history"]), 1),
        "wall_seconds_this_session": round(seconds, 1),
        "resumed": resume,
        "eval": report.to_json(),
        "key_fingerprint": key.fingerprint if key else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--out", default="runs/reproduce-cifar10")
    ap.add_argument("--only", nargs="*", choices=list(RECIPES), help="recipes to run (default: all not yet done)")
    ap.add_argument("--model", default="patchnet")
    ap.add_argument("--epochs", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--wrong-keys", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--release", action="store_true", help="copy finished models to checkpoints/NAME/")
    ap.add_argument("--table", action="store_true", help="only print the table of finished models")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not args.table:
        data = load_dataset(args.data)
        train, val = stratified_split(data, args.val_fraction, args.seed)
        for name in args.only or list(RECIPES):
            if name in results:
                print(f"{name}: done already ({results_path})")
                continue
            results[name] = train_recipe(
                out, name, RECIPES[name], args.model, args.epochs, train, val, args, wrong_keys=args.wrong_keys
            )
            results_path.write_text(json.dumps(results, indent=1))
    if args.release:
        for name in results:
            dst = Path("checkpoints") / name
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("model.safetensors", "meta.json"):
                shutil.copy2(out / name / f, dst / f)
            if (out / f"{name}.key.json").exists():
                shutil.copy2(out / f"{name}.key.json", dst / "key.json")
    print(table(results))


if __name__ == "__main__":
    main()
