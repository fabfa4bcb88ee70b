"""Protect a plain-trained CIFAR-10 model without training, and move it to new keys without data.

Takes the non-protected reproduction model (checkpoints/none: patchnet, patch 4, trained on the
CIFAR-10 training images, 45k/5k split), converts it with fresh keys of each shuffle/negpos recipe
(`blockkey convert`), re-keys the first conversion (`blockkey rekey`), and evaluates every model on
the same held-out 5,000 images: the correct key, plain images and random wrong keys. The
non-protected model's own accuracy is printed beside them (the converted ones should equal it).
Each converted model's key is written beside it (OUT/NAME/key.json), so the attack suite can run on
it: `python benchmarks/attack_suite.py --checkpoints runs/convert-cifar10 --models shuffle-negpos`.

    python benchmarks/convert_cifar10.py                       # about 15 minutes on 2 CPU cores
    python benchmarks/convert_cifar10.py --wrong-keys 10       # quicker
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from blockkey import KeySet, bench
from blockkey.checkpoint import load_model
from blockkey.data import Normalize, load_dataset, stratified_split
from blockkey.evaluate import evaluate_run
from blockkey.rekey import RekeyError, convert_run, rekey_model, rekey_run

RECIPES = ["shuffle", "negpos", "shuffle,negpos", "negpos,shuffle,negpos"]
NOTE = "benchmark key (benchmarks/convert_cifar10.py): not for real use"


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="runs/convert-cifar10", resumable=False, table=False)
    ap.add_argument("--model", default="checkpoints/none", help="plain-trained block-aligned run directory")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="as in reproduce_cifar10.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wrong-keys", type=int, default=100)
    args = ap.parse_args(argv)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = bench.Results(out / "results.json", fresh=True)  # fresh keys every run: nothing to resume
    _, val = stratified_split(load_dataset(args.data), args.val_fraction, args.seed)
    base = evaluate_run(args.model, val, None, progress=False).rows[0]["accuracy"]
    print(f"non-protected model {args.model}: {base:.2%} on {len(val)} held-out images")

    model, meta = load_model(args.model)
    norm = Normalize.from_json(meta["normalize"])
    rows: list[str] = []
    store.put("base", {"base_model": args.model, "base_accuracy": base, "images": len(val)})

    def record(name: str, run: Path, key: KeySet, seconds: float, fold_ms: float, wrong: int) -> None:
        rep = evaluate_run(run, val, key, wrong_keys=wrong, progress=False)
        acc = {r["setting"]: r for r in rep.rows}
        w = next((r for r in rep.rows if "wrong" in r["setting"]), None)
        conv = json.loads((run / "meta.json").read_text())["conversions"][-1]
        row = {
            "model": name,
            "key": key.fingerprint,
            "seconds": round(seconds, 2),
            "fold_ms": round(fold_ms, 2),
            "max_rel_logit_error_float64": conv["max_rel_logit_error_float64"],
            "correct": acc["correct key"]["accuracy"],
            "plain": acc["plain images"]["accuracy"],
            "wrong": w,
        }
        store.put(name, row)
        fold = f" ({fold_ms:.1f} ms fold)" if fold_ms == fold_ms else ""  # NaN: not measured (rekey)
        wtxt = f"{w['accuracy']:.1%} ({w['std']:.1%}, {w['max']:.1%}), n={w['n']}" if w else "-"
        rows.append(
            f"| {name} | {key.fingerprint} | {seconds:.2f} s{fold} | "
            f"{conv['max_rel_logit_error_float64']:.0e} | {base:.2%} | {row['correct']:.2%} | {row['plain']:.1%} "
            f"| {wtxt} |"
        )
        print(rows[-1], flush=True)

    first: tuple[Path, KeySet] | None = None
    for recipe in RECIPES:
        key = KeySet.generate(recipe, 4)
        t0 = time.perf_counter()
        rekey_model(model, norm, None, key)
        fold_ms = 1000 * (time.perf_counter() - t0)
        run = out / recipe.replace(",", "-")
        t0 = time.perf_counter()
        convert_run(args.model, key, run)  # load, fold, float64 check, write
        seconds = time.perf_counter() - t0
        key.with_note(NOTE).save(run / "key.json")  # beside the model, for the attack suite
        record(f"convert {recipe.replace(',', '+')}", run, key, seconds, fold_ms, args.wrong_keys)
        if first is None or recipe == "shuffle,negpos":
            first = (run, key)
    assert first is not None
    new = KeySet.generate("shuffle,negpos", 4)
    t0 = time.perf_counter()
    rekey_run(first[0], first[1], new, out / "rekeyed")
    new.with_note(NOTE).save(out / "rekeyed" / "key.json")
    record("rekey shuffle+negpos -> new key", out / "rekeyed", new, time.perf_counter() - t0, float("nan"), 0)
    try:
        convert_run(args.model, KeySet.generate("shuffle,negpos,ffx", 4), out / "ffx")
    except RekeyError as e:
        print(f"ffx refused: {e}")
        store.put("ffx", str(e))

    print()
    print(
        "| model | key | conversion time | max rel. logit error (float64) | non-protected | correct key "
        "| plain images | wrong keys: mean (std, max) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    store.write_json(args.json)


if __name__ == "__main__":
    main()
