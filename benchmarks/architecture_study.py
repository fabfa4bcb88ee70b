"""Which block-aligned architecture learns CIFAR-10 best per CPU minute, with a key.

Trains each candidate with the same recipe (default shuffle+negpos+ffx, M=4), schedule and data (the
45,000 training images left after the stratified 10% split, seed 0) for --epochs, then evaluates on the
5,000 held-out images with the correct key, without and with flip test-time augmentation. Train time is
the sum of the epochs' wall times: compare candidates within one run of this script on one machine (run
them one at a time; two at once share the cores). Results accumulate in OUT/results.json (resumable).

    python benchmarks/architecture_study.py --epochs 8 --only patchnet upnet
    python benchmarks/architecture_study.py --table
"""

from __future__ import annotations

from pathlib import Path

from blockkey import bench
from blockkey.data import load_dataset, stratified_split
from blockkey.models import create_model

#: name -> (registered model, model arguments); every first layer is a kernel = stride = M patch embedding.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "patchnet": ("patchnet", {}),  # 8x8 after the embedding
    "patchnet-w1.5": ("patchnet", {"width": 1.5}),
    "upnet": ("upnet", {}),  # depth-to-space x2: 16x16 after the embedding; 64, 128, 256, 256 channels
    "upnet-64-64-128-256": ("upnet", {"widths": [64, 64, 128, 256]}),
    "upnet-48-96-192-384": ("upnet", {"widths": [48, 96, 192, 384]}),
    "upnet-full-res": ("upnet", {"up": 4, "widths": [24, 64, 128, 256]}),  # 32x32 after the embedding: fullnet
}


def parameters(model: str, kwargs: dict) -> int:
    return sum(p.numel() for p in create_model(model, 10, patch=4, **kwargs).parameters())


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="runs/architecture-study")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="candidates to run (default: all not done)")
    ap.add_argument("--recipe", default="shuffle,negpos,ffx", help="key recipe (none: non-protected)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--ema", type=float, default=0.0, help="per-step decay of the saved weight average (0: off)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    out = Path(args.out)
    results = bench.Results(out / "results.json", fresh=args.fresh)
    if not args.table:
        train, val = stratified_split(load_dataset(args.data), args.val_fraction, args.seed)
        recipe = None if args.recipe == "none" else args.recipe
        for name in args.only or list(CANDIDATES):
            if name in results:
                print(f"{name}: done already ({results.path})")
                continue
            model, kwargs = CANDIDATES[name]
            entry = bench.train_recipe(
                out,
                name,
                recipe,
                model,
                args.epochs,
                train,
                val,
                args,
                wrong_keys=0,
                model_kwargs=kwargs,
                config={"ema": args.ema},
                val_each_epoch=False,
            )
            results.put(name, entry | {"recipe": args.recipe, "parameters": parameters(model, kwargs)})
    rows = [
        [
            name,
            f"{r['model']} {r['model_kwargs']}",
            f"{r['parameters'] / 1e6:.2f} M",
            r["epochs"],
            f"{r['train_seconds'] / r['epochs']:.0f} s",
            f"{r['eval']['rows'][0]['accuracy']:.1%}",
            f"{r['tta_accuracy']:.1%}",
        ]
        for name, r in results.entries.items()
    ]
    head = ["candidate", "model", "parameters", "epochs", "time an epoch", "correct key", "with flip TTA"]
    print(bench.markdown_table(head, rows, align="lllrrrr"))
    results.write_json(args.json)


if __name__ == "__main__":
    main()
