"""Train one table-stem variant at the explore-small budget (issue 11, defence C), or adopt it into explore's results.

The same ``train_recipe`` call, split (10 % held out, seed 0) and 10,000-image stratified subset as
``explore_recipes.py --train-images 10000``; for quick comparisons of tablenet settings (gain, value_dim,
M) and the thief's plain reference model (recipe ``none``, another model seed).

    python benchmarks/table_probe.py NAME RECIPE '{"shared": true, "value_dim": 8, "gain": 3.0}' \\
        [--block-size 4] [--epochs 6] [--model-seed 0]
    python benchmarks/table_probe.py NAME --adopt CANDIDATE      # into runs/explore-small, 20 wrong keys
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from blockkey import KeySet
from blockkey.bench import Results, parser, train_recipe
from blockkey.data import load_dataset, stratified_split, stratified_subset
from blockkey.evaluate import evaluate_run


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, out="runs/probe11c", resumable=False, table=False)
    ap.add_argument("name")
    ap.add_argument("recipe", nargs="?", help="key recipe, or none")
    ap.add_argument("model_kwargs", nargs="?", default="{}", help="tablenet arguments as JSON")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--adopt", metavar="CANDIDATE", help="copy the finished run into runs/explore-small as CANDIDATE")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = load_dataset(args.data)
    train, val = stratified_split(data, 0.1, 0)
    if args.adopt:
        dst = Path("runs/explore-small")
        shutil.copytree(out / args.name, dst / args.adopt, dirs_exist_ok=True)
        shutil.copy2(out / f"{args.name}.key.json", dst / f"{args.adopt}.key.json")
        entry = json.loads((out / f"{args.name}.json").read_text())
        rep = evaluate_run(dst / args.adopt, val, KeySet.load(dst / f"{args.adopt}.key.json"), wrong_keys=20)
        entry["eval"], entry["adopted_from"] = rep.to_json(), str(out / args.name)
        print(rep.to_markdown())
        Results(dst / "results.json").put(args.adopt, {"train": entry})
        return
    train = stratified_subset(train, args.train_images, 0)
    ns = argparse.Namespace(data=args.data, batch_size=256, lr=0.2, val_fraction=0.1, seed=0)
    recipe = None if args.recipe in (None, "none") else args.recipe
    r = train_recipe(
        out,
        args.name,
        recipe,
        "tablenet",
        args.epochs,
        train,
        val,
        ns,
        wrong_keys=5,
        norm="none",
        model_kwargs=json.loads(args.model_kwargs),
        block_size=args.block_size,
        config={"seed": args.model_seed},
    )
    (out / f"{args.name}.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
