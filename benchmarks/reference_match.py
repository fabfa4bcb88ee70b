"""When is an inner key safe? The reference-match attack against public-derived and privately trained models.

The "public" model is a plain run that the thief also has (default: the released non-protected reproduction
model, checkpoints/none, upnet trained on the 45,000 CIFAR-10 training images: it stands in for a torchvision
/ timm checkpoint). Three models get the same fresh ``shuffle,negpos,inner`` key:

- converted: the public model given the key by ``blockkey convert`` (no training);
- fine-tuned: the converted model trained further with the key (``init_from``) on a share of the data;
- private: trained with the key from its own random init on a share of the data.

Each is attacked with ``reference-match`` against the public model (the input key given: the attack isolates
the inner key), on a stratified sample of the held-out images: the share of channels recovered and the
stolen model's accuracy with the recovered key, beside the key holder's.

    python benchmarks/reference_match.py                  # about 25 minutes on 2 CPU cores
    python benchmarks/reference_match.py --private-epochs 2 --finetune-images 2000   # quicker
"""

from __future__ import annotations

import time
from pathlib import Path

from blockkey import KeySet, bench
from blockkey.attacks import Target, accuracy
from blockkey.attacks.reference_match import load_reference_state, reference_match_attack
from blockkey.checkpoint import load_model, read_meta
from blockkey.data import load_dataset, stratified_split, stratified_subset
from blockkey.rekey import convert_run
from blockkey.train import TrainConfig, fit
from blockkey.transforms import KeyedTransform

NOTE = "benchmark key (benchmarks/reference_match.py): not for real use"


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="runs/reference-match", resumable=False, table=False)
    ap.add_argument("--public", default="checkpoints/none", help="plain run the thief also has")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="as in reproduce_cifar10.py")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--finetune-images", type=int, default=5000)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=0.02)
    ap.add_argument("--private-images", type=int, default=10000)
    ap.add_argument("--private-epochs", type=int, default=4)
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = bench.Results(out / "results.json", fresh=True)
    train, val = stratified_split(load_dataset(args.data), args.val_fraction, 0)
    val = stratified_subset(val, args.eval_images, 0)
    meta = read_meta(args.public)
    key = KeySet.generate("shuffle,negpos,inner", meta.key.block_size if meta.key else 4).with_note(NOTE)
    key.save(out / "key.json", overwrite=True)
    common = {"model": meta.model, "model_kwargs": dict(meta.model_kwargs), "norm": meta.norm_mode}
    quiet = {"progress": True, "log": print}
    runs = {}
    t0 = time.perf_counter()
    convert_run(args.public, key, out / "converted")
    runs["converted"] = out / "converted"
    tuned = TrainConfig(
        **common, epochs=args.finetune_epochs, lr=args.finetune_lr, init_from=str(out / "converted"), seed=1
    )
    fit(stratified_subset(train, args.finetune_images, 1), None, key, tuned, out / "fine-tuned", **quiet)
    runs["fine-tuned"] = out / "fine-tuned"
    private = TrainConfig(**common, epochs=args.private_epochs, seed=2)
    fit(stratified_subset(train, args.private_images, 2), None, key, private, out / "private", **quiet)
    runs["private"] = out / "private"
    reference = load_reference_state(args.public)
    rows = []
    for name, run in runs.items():
        model, m = load_model(run)
        target = Target(model, m, key, val)
        report = reference_match_attack(target, reference, args.public)
        r = report.rows[0]
        entry = {
            "model": name,
            "key_holder_accuracy": report.key_holder_accuracy,
            "input_key_only_accuracy": accuracy(
                target, KeyedTransform(KeySet(key.block_size, key.channels, key.steps))
            ),
            "channel_fraction": r["channel_fraction"],
            "attacker_accuracy": r["attacker_accuracy"],
            "attack_seconds": r["seconds"],
        }
        store.put(name, entry)
        rows.append(entry)
    print(f"# {bench.machine()['cpu']}; {meta.model} from {args.public}; {len(val)} held-out images")
    print(f"# total {time.perf_counter() - t0:.0f} s")
    print(
        bench.markdown_table(
            ["model", "key holder", "input key only", "channels recovered", "thief with recovered key"],
            [
                [
                    e["model"],
                    f"{e['key_holder_accuracy']:.1%}",
                    f"{e['input_key_only_accuracy']:.1%}",
                    f"{e['channel_fraction']:.1%}",
                    f"{e['attacker_accuracy']:.1%}",
                ]
                for e in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
