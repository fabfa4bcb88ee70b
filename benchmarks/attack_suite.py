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

import argparse
import json
from pathlib import Path

from blockkey import KeySet
from blockkey.attacks import Target
from blockkey.attacks.adapter import adapter_attack
from blockkey.attacks.ciphertext_only import ciphertext_only_attack
from blockkey.attacks.finetune import finetune_attack
from blockkey.attacks.key_search import key_search_attack, random_keys_attack
from blockkey.attacks.known_plaintext import known_plaintext_attack
from blockkey.attacks.weights_only import weights_only_attack
from blockkey.checkpoint import load_model
from blockkey.data import Normalize, load_dataset, stratified_split
from blockkey.rekey import convert_run, rekey_model

MODELS = ["shuffle", "negpos", "ffx", "shuffle-negpos-ffx"]
ATTACKS = ["random-keys", "key-search", "known-plaintext", "ciphertext-only", "adapter", "fine-tune", "weights-only"]
CONVERTED_RECIPES = ["shuffle", "negpos", "shuffle,negpos"]
FRACTIONS = [0.01, 0.05, 0.1]
PLOT_X = {
    "adapter": "data_fraction",
    "fine-tune": "data_fraction",
    "key-search": "iterations",
    "known-plaintext": "pairs",
    "ciphertext-only": "images",
}


def run_attack(name: str, target: Target, run: Path, train, out: Path):
    if name == "random-keys":
        return random_keys_attack(target, train, keys=100, batch=256, progress=False)
    if name == "key-search":
        return key_search_attack(target, train, random_keys=100, iterations=2000, batch=256, progress=False)
    if name == "known-plaintext":
        return known_plaintext_attack(target, [1, 2, 4, 16], data=train)
    if name == "ciphertext-only":
        return ciphertext_only_attack(target, train, [100, 1000])
    if name == "adapter":
        return adapter_attack(target, train, FRACTIONS, epochs=30, progress=False)
    if name == "weights-only":
        converted = run.parent.parent.name == "converted"
        ref_name = "plain model: checkpoints/shuffle un-keyed" if converted else "plain model: checkpoints/none"
        return weights_only_attack(target, train, reference_model=reference(run, converted), reference_name=ref_name)
    if name == "fine-tune":
        return finetune_attack(target, run, train, FRACTIONS, out / "finetune" / run.name, epochs=15, progress=False)
    raise ValueError(name)


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
    for model, attacks in results.items():
        for name, rep in attacks.items():
            b = best_row(rep)
            frac = b.get("position_fraction")
            lines.append(
                f"| {model} | {name} | {rep['key_holder_accuracy']:.1%} | {rep['plain_accuracy']:.1%} | "
                f"{b['setting']} | {b['attacker_accuracy']:.1%} | {'-' if frac is None else f'{frac:.0%}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--attacks", nargs="*", default=ATTACKS, choices=ATTACKS)
    ap.add_argument("--out", default="runs/attack-suite")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--converted", type=int, default=0, help="also attack N converted models per recipe")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
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
                rep = run_attack(name, Target(model, meta, key, val), run, train, out)
                results.setdefault(model_name, {})[name] = rep.to_json()
                path.write_text(json.dumps(results, indent=1))
                print(rep.to_markdown(), flush=True)
                if name in PLOT_X:
                    rep.plot(out / f"{model_name}-{name}.png", PLOT_X[name])
    print(table(results))


if __name__ == "__main__":
    main()
