"""Which recipe holds best, and what it costs: train candidate recipes at one budget, attack each.

Each candidate (recipe x architecture, M=4) is trained on the 45k CIFAR-10 training split for
--epochs (the same budget for all, the non-protected model included) and evaluated on the 5k
held-out images; then attacked with the threat model's 1 % of labelled plain data (450 images):
random keys, fine-tuning (all / first / last layer, beside scratch with the same data and epochs)
and the adapter; and, beyond that threat model, known-plaintext (1 pair) and ciphertext-only (100
transformed images). Results accumulate in OUT/results.json (finished steps are skipped, so the
benchmark resumes); --table prints the trade-off table and writes OUT/tradeoff.png.

    python benchmarks/explore_recipes.py                 # everything not yet done (~1 h on 2 vCPUs)
    python benchmarks/explore_recipes.py --table
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from blockkey import KeySet, bench
from blockkey.attacks import AttackReport, Target
from blockkey.attacks.registry import AttackData, run_attack
from blockkey.checkpoint import load_model
from blockkey.data import load_dataset, stratified_split, stratified_subset

# name: (recipe, model, normalisation[, model kwargs[, train_recipe options, e.g. block_size]])
CANDIDATES = {
    "none": (None, "patchnet", "position"),
    "shuffle-negpos-ffx": ("shuffle,negpos,ffx", "patchnet", "position"),
    "shuffle-negpos-ffxall": ("shuffle,negpos,ffx-all", "patchnet", "position"),
    "shuffle-negpos-ffxall-tablenet": ("shuffle,negpos,ffx-all", "tablenet", "none"),
    "inner": ("inner", "patchnet", "position", {"inner": True}),
    "shuffle-negpos-ffx-inner": ("shuffle,negpos,ffx,inner", "patchnet", "position", {"inner": True}),
    # issue 11, defence C: FFX on every position with one value table shared by all positions
    "shuffle-negpos-ffxall-shared8": ("shuffle,negpos,ffx-all", "tablenet", "none", {"shared": True, "value_dim": 8}),
    "shuffle-negpos-ffxall-shared8-g3": (
        "shuffle,negpos,ffx-all",
        "tablenet",
        "none",
        {"shared": True, "value_dim": 8, "gain": 3.0},
    ),
    "shuffle-ffxall-shared8-g3": ("shuffle,ffx-all", "tablenet", "none", {"shared": True, "value_dim": 8, "gain": 3.0}),
    "shuffle-negpos-ffxall-shared8-g3-m8": (
        "shuffle,negpos,ffx-all",
        "tablenet",
        "none",
        {"shared": True, "value_dim": 8, "gain": 3.0},
        {"block_size": 8},
    ),
    # Defence B: fine-tuning suppression (blockkey.suppress) after the `inner` candidate's training
    # (then SuppressConfig fields: alpha, thief steps, epochs of suppression)
    "inner-suppress": ("inner", "patchnet", "position", {"inner": True}, {"harden_from": "inner", "epochs": 1}),
    "inner-suppress3": ("inner", "patchnet", "position", {"inner": True}, {"harden_from": "inner", "epochs": 3}),
}
SUPPRESS = {"alpha": 2.0, "steps": 3}  # blockkey.suppress.SuppressConfig fields every harden_from candidate shares
FRACTION = 0.01
ATTACKS = [
    "random-keys",
    "fine-tune",
    "adapter",
    "inner-align",
    "table-order",
    "table-order-finetune",
    "known-plaintext",
    "ciphertext-only",
]
WITHIN_THREAT_MODEL = ("random-keys", "fine-tune", "adapter", "inner-align", "table-order", "table-order-finetune")
SHARED_TABLE_ONLY = ("table-order", "table-order-finetune")  # attacks on tablenet(shared=True) alone


FRACTION_ATTACKS = ("fine-tune", "adapter", "table-order-finetune")  # run again at each --fractions value


def attack(name: str, target: Target, run: Path, train: Any, out: Path, fraction: float = FRACTION) -> AttackReport:
    """Attack ``name`` through the registry with this benchmark's settings (the threat model's 1 % by default)."""
    settings: dict[str, dict[str, Any]] = {
        "fine-tune": {  # both sides at their best learning rate (docs/attacks.md, "A fair baseline")
            "fractions": [fraction],
            "epochs": 15,
            "output": str(out / "finetune" / run.name),
            "lrs": [0.003, 0.01, 0.05, 0.2],
            "scratch_lrs": [0.01, 0.02, 0.05, 0.2],
        },
        "adapter": {"fractions": [fraction], "epochs": 30},
        # the input key given: it isolates the inner key
        "inner-align": {"images": [round(fraction * len(train))], "seconds_per_point": 120},
        "known-plaintext": {"pairs": [1], "pairs_from": "train"},
        "ciphertext-only": {"images": [100]},
    }
    if name == "table-order-finetune":  # table-order's fine-tuning rows alone, one fraction at a time
        from blockkey.attacks.table_order import table_order_finetune

        return table_order_finetune(
            target, train, [fraction], out / "table-order" / run.name / f"{fraction:g}", epochs=15
        )
    return run_attack(name, target, AttackData(train, run_dir=run, progress=False), **settings.get(name, {}))


def harden_candidate(out: Path, name: str, source: str, train, val, **config) -> dict:
    """A candidate made by fine-tuning suppression of the finished candidate ``source`` (same key);
    ``config``: :class:`~blockkey.suppress.SuppressConfig` fields over :data:`SUPPRESS`."""
    import shutil

    from blockkey.evaluate import evaluate_run
    from blockkey.suppress import SuppressConfig, harden

    if not (out / source / "meta.json").exists():
        raise SystemExit(f"{name} starts from {source}: run --only {source} first")
    shutil.copy2(out / f"{source}.key.json", out / f"{name}.key.json")
    key = KeySet.load(out / f"{name}.key.json")
    cfg = SuppressConfig(**(SUPPRESS | config))
    meta = harden(out / source, key, train, out / name, cfg, val=val)
    report = evaluate_run(out / name, val, key, wrong_keys=20, progress=False)
    print(report.to_markdown(), flush=True)
    return {
        "model": meta["model"],
        "model_kwargs": meta["model_kwargs"],
        "suppress": {k: v for k, v in meta["suppress"].items() if k != "history"},
        "history": meta["suppress"]["history"],
        "eval": report.to_json(),
        "key_fingerprint": key.fingerprint,
    }


def summary(results: dict) -> list[dict]:
    """One row per candidate: key-holder accuracy, its cost, and the best attack in / beyond the threat model."""
    base = results.get("none", {}).get("train", {}).get("eval", {}).get("rows", [{}])[0].get("accuracy")
    rows = []
    for name, r in results.items():
        if "train" not in r:
            continue
        holder = r["train"]["eval"]["rows"][0]["accuracy"]
        row = {
            "name": name,
            "model": r["train"]["model"],
            "holder": holder,
            "cost": None if base is None else base - holder,
        }
        attacks = r.get("attacks", {})
        ft = attacks.get("fine-tune", {}).get("rows", [])
        row["scratch"] = max((x["attacker_accuracy"] for x in ft if x["variant"] == "scratch"), default=None)
        for group, names in (("threat", WITHIN_THREAT_MODEL), ("beyond", ("known-plaintext", "ciphertext-only"))):
            best = None
            for a in names:
                for x in attacks.get(a, {}).get("rows", []):
                    if x.get("variant") in ("scratch", "diagnostic"):  # not attacks: a baseline, a key-given check
                        continue
                    if best is None or x["attacker_accuracy"] > best[1]:
                        best = (f"{a}: {x['setting']}", x["attacker_accuracy"])
                if attacks.get(a, {}).get("skipped"):
                    row.setdefault("skipped", []).append(f"{a}: {attacks[a]['skipped']}")
            row[group] = best
        rows.append(row)
    return rows


def _fraction_cells(r: dict) -> dict[float, dict]:
    """Per labelled-data fraction: the best attack on the stolen weights and scratch (same candidate)."""
    per: dict[float, dict] = {}
    for a, rep in r.get("attacks", {}).items():
        base, _, frac = a.partition("@")
        if base not in FRACTION_ATTACKS:
            continue
        cell = per.setdefault(float(frac) if frac else FRACTION, {"best": None, "scratch": None})
        for x in rep.get("rows", []):
            if x.get("variant") == "scratch":
                cell["scratch"] = max(cell["scratch"] or 0.0, x["attacker_accuracy"])
            elif cell["best"] is None or x["attacker_accuracy"] > cell["best"][1]:
                cell["best"] = (f"{base}: {x['setting']}", x["attacker_accuracy"])
    return per


def advantage_table(results: dict) -> str:
    """The stolen advantage per labelled-data fraction: best attack on the stolen weights minus scratch (the
    candidate's own architecture), and minus the best scratch of any candidate's architecture at that fraction."""
    cells = {name: _fraction_cells(r) for name, r in results.items()}
    best_scratch: dict[float, float] = {}
    for per in cells.values():
        for frac, c in per.items():
            if c["scratch"] is not None:
                best_scratch[frac] = max(best_scratch.get(frac, 0.0), c["scratch"])
    lines = [
        "| candidate | data | best attack on the stolen weights | scratch | stolen advantage "
        "| best scratch, any architecture | advantage over it |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, per in cells.items():
        for frac, c in sorted(per.items()):
            if c["best"] is None or c["scratch"] is None:
                continue
            adv = 100 * (c["best"][1] - c["scratch"])
            top = best_scratch[frac]
            lines.append(
                f"| {name} | {frac:.0%} | {c['best'][1]:.1%} ({c['best'][0]}) | {c['scratch']:.1%} | {adv:+.1f} pts "
                f"| {top:.1%} | {100 * (c['best'][1] - top):+.1f} pts |"
            )
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = [
        "| candidate | model | key holder | cost vs none | best attack with 1 % labelled data | scratch, same data "
        "| stolen advantage | best attack beyond the threat model |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]

    def cell(best):
        return "-" if best is None else f"{best[1]:.1%} ({best[0]})"

    for r in summary(results):
        cost = "-" if r["cost"] is None or r["name"] == "none" else f"{100 * r['cost']:+.1f} pts"
        scratch = "-" if r["scratch"] is None else f"{r['scratch']:.1%}"
        # the stolen advantage: the best attack using the stolen weights minus scratch on the same data
        adv = (
            "-" if r["scratch"] is None or r["threat"] is None else f"{100 * (r['threat'][1] - r['scratch']):+.1f} pts"
        )
        lines.append(
            f"| {r['name']} | {r['model']} | {r['holder']:.1%} | {cost} | {cell(r['threat'])} | {scratch} "
            f"| {adv} | {cell(r['beyond'])} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in summary(results):
        if r["name"] == "none" or r["threat"] is None or r["cost"] is None:
            continue
        ax.scatter(100 * r["cost"], 100 * r["threat"][1], color="#c44")
        ax.annotate(
            r["name"], (100 * r["cost"], 100 * r["threat"][1]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
        if r["scratch"] is not None:
            ax.scatter(100 * r["cost"], 100 * r["scratch"], color="#888", marker="x")
    ax.axhline(20, ls="--", lw=1, color="k")
    ax.text(0, 21, "goal: chance + 10 points", fontsize=7)
    ax.axvline(2, ls=":", lw=1, color="k")
    ax.set_xlabel("key-holder accuracy lost vs non-protected (points)")
    ax.set_ylabel("best attack with 1% labelled plain data (%)")
    ax.set_title("CIFAR-10, M=4: protection vs cost (x: scratch, same data)", fontsize=9)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="runs/explore")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--only", nargs="*", choices=list(CANDIDATES))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-images", type=int, help="a stratified subset of the training split (default: all)")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[],
        help=f"also run {', '.join(FRACTION_ATTACKS)} with these shares of the labelled data (besides 1%%)",
    )
    ap.add_argument("--attacks", nargs="*", choices=ATTACKS, help="only these attacks (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = bench.Results(out / "results.json", fresh=args.fresh)
    results = store.entries
    if not args.table:
        data = load_dataset(args.data)
        train, val = stratified_split(data, args.val_fraction, args.seed)
        if args.train_images:
            train = stratified_subset(train, args.train_images, args.seed)
        for name in args.only or list(CANDIDATES):
            recipe, model_name, norm, *extra = CANDIDATES[name]
            entry = results.setdefault(name, {})
            if "train" not in entry and extra[1:] and "harden_from" in extra[1]:
                spec = dict(extra[1])
                entry["train"] = harden_candidate(out, name, spec.pop("harden_from"), train, val, **spec)
                store.put(name, entry)
            if "train" not in entry:
                entry["train"] = bench.train_recipe(
                    out,
                    name,
                    recipe,
                    model_name,
                    args.epochs,
                    train,
                    val,
                    args,
                    wrong_keys=20,
                    norm=norm,
                    model_kwargs=extra[0] if extra else None,
                    **(extra[1] if len(extra) > 1 else {}),
                )
                store.put(name, entry)
            if recipe is None:
                continue
            attacks = args.attacks if args.attacks is not None else ATTACKS
            todo = [(a, FRACTION, a) for a in attacks]
            todo += [
                (a, f, f"{a}@{f}") for f in args.fractions if f != FRACTION for a in FRACTION_ATTACKS if a in attacks
            ]
            for a, fraction, slot in todo:
                if slot in entry.setdefault("attacks", {}):
                    continue
                model, meta = load_model(out / name)
                target = Target(model, meta, KeySet.load(out / f"{name}.key.json"), val)
                t0 = time.perf_counter()
                print(f"{name}: {slot} ...", flush=True)
                if a == "adapter" and model_name == "tablenet":
                    rep = {"skipped": "no gradient through the table lookup (first-layer fine-tuning is its analogue)"}
                elif a in SHARED_TABLE_ONLY and not (extra and extra[0].get("shared")):
                    continue  # not a shared value table: nothing to order
                else:
                    try:
                        rep = attack(a, target, out / name, train, out, fraction).to_json()
                    except Exception as e:  # an attack that cannot run on a recipe is a result, not a crash
                        rep = {"skipped": f"{type(e).__name__}: {e}"}
                rep["seconds"] = round(time.perf_counter() - t0, 1)
                entry["attacks"][slot] = rep
                store.put(name, entry)
    print(table(results))
    print()
    print(advantage_table(results))
    plot(results, out / "tradeoff.png")
    print(f"plot: {out / 'tradeoff.png'}")
    store.write_json(args.json)


if __name__ == "__main__":
    main()
