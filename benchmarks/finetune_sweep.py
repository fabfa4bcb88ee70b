"""The stolen advantage with a fair baseline: fine-tuning and scratch each at their best learning rate.

For each candidate of an `explore_recipes.py` output folder (trained run + key), at each labelled-data
fraction and seed: the stolen weights fine-tuned (``--layers``, each over ``--lrs``) against the same
architecture trained from scratch over ``--scratch-lrs`` on the same images (the subset and the
initialisation change with the seed). The stolen advantage = the best fine-tuned accuracy minus the best
scratch accuracy. Scratch does not depend on the candidate when the candidates share the architecture and
normalisation (patchnet, position norm: a model's identity keyed points compute nothing), so it is
trained once per (fraction, seed, optimiser) and reused. Results accumulate in OUT/results.json (resumable).

    cd benchmarks && python finetune_sweep.py --explore ../runs/explore-small --out ../runs/sweep \\
        --only inner shuffle-negpos-ffx-inner shuffle-negpos-ffx --fractions 0.01 0.05 0.1 --seeds 0
    python finetune_sweep.py --out ../runs/sweep --table
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from blockkey import KeySet, bench
from blockkey.attacks import Target
from blockkey.attacks.finetune import finetune_attack
from blockkey.checkpoint import load_model
from blockkey.data import load_dataset, stratified_split, stratified_subset

LRS = {"sgd": [0.01, 0.05, 0.2], "adam": [1e-3, 3e-3]}
SCRATCH_LRS = {"sgd": [0.05, 0.2, 0.5], "adam": [1e-3, 3e-3]}


def run_one(args, store: bench.Results, slot, target, run, train, frac, seed, optimizer, scratch: bool) -> None:
    if slot in store:
        return
    t0 = time.perf_counter()
    print(f"{slot} ...", flush=True)
    runs = Path(args.out) / "runs" / slot.replace("|", "_")
    shutil.rmtree(runs, ignore_errors=True)  # a slot interrupted earlier starts again
    rep = finetune_attack(
        target,
        run,
        train,
        [frac],
        runs,
        layers=() if scratch else args.layers,
        epochs=args.epochs,
        seed=seed,
        lrs=LRS[optimizer] if not args.lrs else args.lrs,
        scratch_lrs=(SCRATCH_LRS[optimizer] if not args.scratch_lrs else args.scratch_lrs) if scratch else [],
        optimizer=optimizer,
        progress=False,
    )
    store.put(slot, {**rep.to_json(), "wall_seconds": round(time.perf_counter() - t0, 1), "tag": args.tag})
    best = max(rep.rows, key=lambda r: r["attacker_accuracy"])
    print(f"{slot}: best {best['setting']} {best['attacker_accuracy']:.1%}", flush=True)


def advantages(results: dict) -> list[dict]:
    """Per candidate, fraction and optimiser (``any``: the best over optimisers): best stolen, best scratch and
    the stolen advantage, each a list over the seeds both sides ran."""
    cells: dict[tuple, dict[int, dict]] = {}
    for slot, rep in results.items():
        name, frac, seed, opt = slot.split("|")
        best = max(rep["rows"], key=lambda r: r["attacker_accuracy"])
        cells.setdefault((name, float(frac), opt, rep.get("tag", "")), {})[int(seed)] = best
        anyopt = cells.setdefault((name, float(frac), "any", rep.get("tag", "")), {})  # best over optimisers too
        if int(seed) not in anyopt or best["attacker_accuracy"] > anyopt[int(seed)]["attacker_accuracy"]:
            anyopt[int(seed)] = best
    out = []
    for (name, frac, opt, tag), by_seed in sorted(cells.items()):
        if name.startswith("scratch"):
            continue
        scratch = cells.get((f"scratch{tag}", frac, opt, tag), cells.get(("scratch", frac, opt, ""), {}))
        seeds = sorted(s for s in by_seed if s in scratch)
        if seeds:
            stolen = [by_seed[s]["attacker_accuracy"] for s in seeds]
            base = [scratch[s]["attacker_accuracy"] for s in seeds]
            adv = [100 * (a - b) for a, b in zip(stolen, base, strict=True)]
            out.append(
                {"name": name, "fraction": frac, "optimizer": opt, "seeds": seeds, "first": by_seed[seeds[0]]}
                | {"stolen": stolen, "scratch": base, "advantage": adv}
            )
    return out


def table(results: dict) -> str:
    """Per candidate, fraction and optimiser: best stolen, best scratch, advantage (mean and range over seeds)."""
    lines = [
        "| candidate | data | optimiser | seeds | best stolen (setting, seed 0) | best scratch | stolen advantage |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for c in advantages(results):
        first, adv = c["first"], c["advantage"]
        spread = f" (range {min(adv):+.1f} to {max(adv):+.1f})" if len(adv) > 1 else ""
        lines.append(
            f"| {c['name']} | {c['fraction']:.0%} | {c['optimizer']} | {len(c['seeds'])} | "
            f"{statistics.mean(c['stolen']):.1%} ({first['variant']}, {first.get('optimizer', 'sgd')} lr "
            f"{first['lr']:g}) | {statistics.mean(c['scratch']):.1%} | {statistics.mean(adv):+.1f} pts{spread} |"
        )
    return "\n".join(lines)


def plot(results: dict, explore: Path, path: Path) -> None:
    """The trade-off: key-holder accuracy lost against the non-protected model (explore's results) on x, the
    worst stolen advantage over the fractions (best over optimisers, mean over seeds) on y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = bench.Results(explore / "results.json").entries
    holder = {n: e["train"]["eval"]["rows"][0]["accuracy"] for n, e in trained.items() if "train" in e}
    worst: dict[str, float] = {}
    for c in advantages(results):
        if c["optimizer"] == "any" and c["name"] in holder:
            worst[c["name"]] = max(worst.get(c["name"], -100.0), statistics.mean(c["advantage"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, adv in worst.items():
        cost = 100 * (holder["none"] - holder[name])
        ax.scatter(cost, adv, color="#c44")
        ax.annotate(name, (cost, adv), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, ls="--", lw=1, color="k")
    ax.axvline(2, ls=":", lw=1, color="k")
    ax.set_xlabel("key-holder accuracy lost vs non-protected (points)")
    ax.set_ylabel("worst stolen advantage over 1/5/10% (points)")
    ax.set_title("fine-tuning thief vs scratch, both at their best learning rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="../runs/sweep")
    ap.add_argument("--data", default="../../shared/datasets/cifar10/train")
    ap.add_argument("--explore", default="../runs/explore-small", help="an explore_recipes.py output folder")
    ap.add_argument("--only", nargs="*", default=["inner", "shuffle-negpos-ffx-inner", "shuffle-negpos-ffx"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--optimizers", nargs="+", default=["sgd"], choices=list(LRS))
    ap.add_argument("--layers", nargs="+", default=["all", "first", "last"])
    ap.add_argument("--lrs", type=float, nargs="*", help="override the fine-tuning grid")
    ap.add_argument("--scratch-lrs", type=float, nargs="*", help="override the scratch grid")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--no-scratch", action="store_true")
    ap.add_argument("--tag", default="", help="appended to the candidate name in the results (e.g. unseen settings)")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", nargs="*", default=[], help="other results.json files to tabulate with these")
    ap.add_argument("--plot", help="write the trade-off plot (cost against the worst stolen advantage) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = bench.Results(out / "results.json", fresh=args.fresh)
    results = store.entries
    if not args.table:
        train, val = stratified_split(load_dataset(args.data), 0.1, 0)  # explore_recipes' split
        train = stratified_subset(train, args.train_images, 0)
        explore = Path(args.explore)
        for seed in args.seeds:
            for frac in args.fractions:
                for opt in args.optimizers:
                    for i, name in enumerate(args.only):
                        model, meta = load_model(explore / name)
                        target = Target(model, meta, KeySet.load(explore / f"{name}.key.json"), val)
                        if i == 0 and not args.no_scratch:
                            slot = f"scratch{args.tag}|{frac:g}|{seed}|{opt}"
                            run_one(args, store, slot, target, explore / name, train, frac, seed, opt, True)
                        slot = f"{name}{args.tag}|{frac:g}|{seed}|{opt}"
                        run_one(args, store, slot, target, explore / name, train, frac, seed, opt, False)
    for extra in args.merge:  # other sweep folders: rows of the same slot join (e.g. a wider learning-rate grid)
        for slot, rep in bench.Results(extra).entries.items():
            results[slot] = {**rep, "rows": results[slot]["rows"] + rep["rows"]} if slot in results else rep
    print(table(results))
    if args.plot:
        plot(results, Path(args.explore), Path(args.plot))
    store.write_json(args.json)


if __name__ == "__main__":
    main()
