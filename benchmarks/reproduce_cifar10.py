"""Reproduce the paper's CIFAR-10 table under the CPU protocol, one model at a time.

For each recipe (none = the non-protected baseline, shuffle, negpos, ffx, shuffle+negpos+ffx; M=4)
it trains the same architecture and schedule on the CIFAR-10 training images with a held-out,
stratified validation split, then evaluates on that split: the correct key, plain images and
--wrong-keys random wrong keys. Models already finished in --out are skipped, so the five can be
run across sessions (each fits the 30-minute CPU budget alone). Results accumulate in
OUT/results.json and print as a Markdown table (the correct key also with test-time augmentation,
`blockkey.tta`: flip, each image averaged with its mirror image, and shift, also one-pixel moves of
both; every view taken before the key); --release copies a finished model,
its weights stored as float16, with its key (marked as a published demo key) to checkpoints/NAME/.

    python benchmarks/reproduce_cifar10.py --data ../shared/datasets/cifar10/train --only none
    python benchmarks/reproduce_cifar10.py --table            # print what has finished
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from blockkey import bench
from blockkey.bench import PAPER_RECIPES as RECIPES
from blockkey.checkpoint import copy_run_half
from blockkey.data import load_dataset, stratified_split
from blockkey.models import model_accepts

EPOCHS = 32  # fullnet: about 50 s an epoch alone on the 2-vCPU VM, under 30 minutes (docs/results.md)


def table(results: dict) -> str:
    lines = [
        "| recipe (M=4) | model | epochs | train time | correct key | flip TTA | shift TTA | plain images "
        "| wrong keys: mean (std, max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
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
        tta = " | ".join(f"{r[k]:.1%}" if k in r else "-" for k in ("tta_accuracy", "shift_tta_accuracy"))
        lines.append(
            f"| {name} | {r['model']} | {r['epochs']} | {minutes:.1f} min | {correct:.1%} | {tta} | {plain} | {wrong} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="runs/reproduce-cifar10")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--only", nargs="*", choices=list(RECIPES), help="recipes to run (default: all not yet done)")
    ap.add_argument("--model", default="fullnet")
    ap.add_argument("--width", type=float, default=1.0, help="the model's width multiplier")
    ap.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        metavar="JSON",
        help='more model arguments, e.g. \'{"up": 4, "widths": [24, 64, 128, 256]}\' for upnet at full resolution',
    )
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--ema", type=float, default=0.0, help="per-step decay of the saved weight average (0: off)")
    ap.add_argument("--cutout", type=int, default=0, help="side of the square zeroed in each training image (0: off)")
    ap.add_argument("--crop-step", type=int, default=1, help="random crops move images by multiples of this")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--wrong-keys", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--release", action="store_true", help="copy finished models to checkpoints/NAME/")
    args = ap.parse_args(argv)

    out = Path(args.out)
    results = bench.Results(out / "results.json", fresh=args.fresh)
    if not args.table:
        data = load_dataset(args.data)
        train, val = stratified_split(data, args.val_fraction, args.seed)
        for name in args.only or list(RECIPES):
            if name in results:
                print(f"{name}: done already ({results.path})")
                continue
            entry = bench.train_recipe(
                out,
                name,
                RECIPES[name],
                args.model,
                args.epochs,
                train,
                val,
                args,
                wrong_keys=args.wrong_keys,
                model_kwargs=({"width": args.width} if model_accepts(args.model, "width") else {}) | args.model_kwargs,
                config={"ema": args.ema, "cutout": args.cutout, "crop_step": args.crop_step},
            )
            results.put(name, entry)
    if args.release:
        for name in results.entries:
            dst = Path("checkpoints") / name
            copy_run_half(out / name, dst)
            if (out / f"{name}.key.json").exists():
                shutil.copy2(out / f"{name}.key.json", dst / "key.json")
    print(table(results.entries))
    results.write_json(args.json)


if __name__ == "__main__":
    main()
