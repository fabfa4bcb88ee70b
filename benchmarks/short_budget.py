"""Short-budget study: how much accuracy a key costs, per architecture and normalisation.

Trains one model on a stratified 10,000-image sample of the CIFAR-10 training images for a few
epochs and evaluates it on a stratified 2,000-image sample of the held-out split (correct key,
plain images, 3 wrong keys). One configuration per call, so a shell loop can sweep them:

    python benchmarks/short_budget.py none fastnet channel 5
    python benchmarks/short_budget.py shuffle,negpos,ffx patchnet position 5

Arguments: recipe (or none), model, normalisation (channel | position | none), epochs. The key is
derived from a fixed passphrase so every configuration sees the same key.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from blockkey import KeySet, bench
from blockkey.checkpoint import write_json_atomic
from blockkey.data import load_dataset, stratified_split, stratified_subset
from blockkey.evaluate import evaluate_run
from blockkey.models import model_kwargs_for
from blockkey.train import TrainConfig, fit


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__)
    ap.add_argument("recipe")
    ap.add_argument("model")
    ap.add_argument("norm", choices=["channel", "position", "none"])
    ap.add_argument("epochs", type=int)
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--train-images", type=int, default=10_000)
    ap.add_argument("--model-arg", action="append", default=[], help="extra model argument NAME=INT, e.g. value_dim=4")
    args = ap.parse_args(argv)

    data = load_dataset(args.data)
    train, val = stratified_split(data, 0.1, 0)
    train, val = stratified_subset(train, args.train_images, 0), stratified_subset(val, 2000, 0)
    key = None if args.recipe == "none" else KeySet.derive("exp", args.recipe, 4, salt=b"exp")
    kwargs = model_kwargs_for(args.model, key, train.image_shape)
    kwargs |= {k: int(v) for k, v in (a.split("=", 1) for a in args.model_arg)}
    cfg = TrainConfig(
        model=args.model, model_kwargs=kwargs, epochs=args.epochs, norm=args.norm, lr=0.2, label_smoothing=0.1
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        fit(train, val, key, cfg, f"{run}/run", progress=False, log=lambda s: None)
        report = evaluate_run(f"{run}/run", val, key, wrong_keys=3 if key else 0, progress=False)
    cells = " | ".join(f"{r['setting']}: {r['accuracy']:.1%}" for r in report.rows)
    seconds = time.perf_counter() - start
    print(f"| {args.recipe} | {args.model} | {args.norm} | {args.epochs} | {seconds:.0f} s | {cells} |")
    if args.json:
        doc = {"machine": bench.machine("cpu"), "args": vars(args), "seconds": seconds, "eval": report.to_json()}
        write_json_atomic(Path(args.json), doc)


if __name__ == "__main__":
    main()
