"""Run the attack suite against the released CIFAR-10 reproduction models (CPU protocol).

For each model under checkpoints/ (key file beside it) and each attack, the attack runs with the
settings below on the run's own split of ../shared/datasets/cifar10/train (45k attacker pool /
5k held-out evaluation images, as the model was trained). Results accumulate in
OUT/results.json (one entry per model and attack; finished ones are skipped, so the suite can be
run across sessions) and print as Markdown.

    python benchmarks/attack_suite.py                                  # everything not yet done
    python benchmarks/attack_suite.py --models shuffle --attacks known-plaintext adapter
    python benchmarks/attack_suite.py --table
    python benchmarks/attack_suite.py --attacks weights-only --converted 3   # + 3 converted models per recipe

Weights-only uses a plain model as the thief's reference that is not the victim's own plain model:
checkpoints/none for the released models; for the converted models (made from checkpoints/none by
`blockkey convert` with fresh keys) the released shuffle model turned back into a plain one with its
published key (an independently trained network).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockkey import KeySet, bench
from blockkey.attacks import AttackReport, Target
from blockkey.attacks.registry import AttackData, attacks, run_attack
from blockkey.checkpoint import load_model
from blockkey.data import Normalize, load_dataset, stratified_split
from blockkey.rekey import convert_run, rekey_model

MODELS = ["shuffle", "negpos", "ffx", "shuffle-negpos-ffx"]
#: The suite's attacks, cheap ones first (the suite runs attack-major), and its settings beside the CLI defaults.
ATTACKS = ["random-keys", "key-search", "known-plaintext", "ciphertext-only", "adapter", "fine-tune", "weights-only"]
CONVERTED_RECIPES = ["shuffle", "negpos", "shuffle,negpos"]
FRACTIONS = [0.01, 0.05, 0.1]
SETTINGS: dict[str, dict[str, Any]] = {
    "known-plaintext": {"pairs": [1, 2, 4, 16], "pairs_from": "train"},
    "adapter": {"fractions": FRACTIONS},
    "fine-tune": {"fractions": FRACTIONS, "epochs": 15},
}


def run_one(name: str, target: Target, run: Path, train: Any, out: Path) -> AttackReport:
    """Attack ``name`` through the registry with the suite's settings (no progress bars)."""
    settings = dict(SETTINGS.get(name, {}))
    if name == "fine-tune":
        settings["output"] = str(out / "finetune" / run.name)
    if name == "weights-only":
        converted = run.parent.parent.name == "converted"
        settings["reference_model"] = reference(run, converted)
        settings["reference_name"] = (
            "plain model: checkpoints/shuffle un-keyed" if converted else "plain model: checkpoints/none"
        )
    return run_attack(name, target, AttackData(train, run_dir=run, progress=False), **settings)


def reference(run: Path, converted: bool):
    """The thief's own plain model (never the plain model the victim was made from)."""
    if not converted:
        return load_model(run.parent / "none")[0]
    ckpt = Path(json.loads((run / "meta.json").read_text())["conversions"][0]["from_run"]).parent
    model, meta = load_model(ckpt / "shuffle")
    norm = Normalize.from_json(meta["normalize"])
    return rekey_model(model, norm, KeySet.load(ckpt / "shuffle" / "key.json"), None)[0]


def converted_models(checkpoints: Path, out: Path, per_recipe: int) -> list[Path]:
    """``per_recipe`` conversions of checkpoints/none per recipe, fresh keys (OS entropy), made once."""
    runs = []
    for recipe in CONVERTED_RECIPES:
        for i in range(per_recipe):
            run = out / "converted" / f"{recipe.replace(',', '+')}-{i}"
            if not (run / "meta.json").exists():
                key = KeySet.generate(recipe, 4)
                run.mkdir(parents=True, exist_ok=True)
                key.save(run / "key.json")
                convert_run(checkpoints / "none", key, run / "model")
            runs.append(run)
    return runs


def best_row(rep: dict) -> dict:
    return max(rep["rows"], key=lambda r: r["attacker_accuracy"])


def table(results: dict) -> str:
    lines = [
        "| model (M=4) | attack | key holder | plain images | best attacker setting | attacker accuracy "
        "| key recovered |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for model, reports in results.items():
        for name, rep in reports.items():
            b = best_row(rep)
            frac = b.get("position_fraction")
            lines.append(
                f"| {model} | {name} | {rep['key_holder_accuracy']:.1%} | {rep['plain_accuracy']:.1%} | "
                f"{b['setting']} | {b['attacker_accuracy']:.1%} | {'-' if frac is None else f'{frac:.0%}'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="runs/attack-suite")
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--attacks", nargs="*", default=ATTACKS, choices=list(attacks()))
    ap.add_argument("--converted", type=int, default=0, help="also attack N converted models per recipe")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = bench.Results(out / "results.json", fresh=args.fresh)
    if not args.table:
        data = load_dataset(args.data)
        runs = {m: (Path(args.checkpoints) / m, Path(args.checkpoints) / m / "key.json") for m in args.models}
        for run in converted_models(Path(args.checkpoints), out, args.converted):
            runs[f"converted {run.name}"] = (run / "model", run / "key.json")
        for name in args.attacks:  # attack-major: the cheap attacks finish for every model first
            for model_name, (run, key_file) in runs.items():
                if name in results.get(model_name, {}):
                    continue
                model, meta = load_model(run)  # a fresh copy each time: attacks may freeze or move it
                key = KeySet.load(key_file)
                d = meta.get("data", {})
                train, val = stratified_split(data, d.get("val_fraction", 0.1), d.get("split_seed", 0))
                print(f"{model_name}: {name} ...", flush=True)
                rep = run_one(name, Target(model, meta, key, val), run, train, out)
                results.put(model_name, {**results.get(model_name, {}), name: rep.to_json()})
                print(rep.to_markdown(), flush=True)
                x_axis = attacks()[name].x_axis
                if x_axis is not None:
                    rep.plot(out / f"{model_name}-{name}.png", x_axis)
    print(table(results.entries))
    results.write_json(args.json)


if __name__ == "__main__":
    main()
