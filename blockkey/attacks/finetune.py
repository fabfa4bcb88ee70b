"""Fine-tuning attack: retrain the stolen model on plain labelled data, beside training from scratch.

For each data fraction the attacker fine-tunes the stolen weights on plain images (all layers, only
the first layer, only the last, or one block ``block:N``: see :func:`blockkey.train.layer_blocks`), and
trains the same architecture from random weights on the same images with the same epochs. Each side may
sweep its learning rate (``lrs``, ``scratch_lrs``): a row per (variant, learning rate), and the row with
the best accuracy of each variant carries ``best: True`` (the stolen advantage compares best with best,
so an untuned scratch baseline does not flatter the thief). The protection holds where the stolen model
does not beat scratch: then the weights gave the attacker nothing a fresh model would not have learnt.
Frozen layers keep their weights, but batch-norm statistics still adapt to plain images (a stronger attacker).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import argtypes as at
from ..data import Data, stratified_subset
from ..errors import BlockkeyError
from ..evaluate import evaluate_run
from ..passport import Passports
from ..train import TrainConfig, fit
from . import AttackReport, Target, make_report
from .registry import AttackData, AttackSpec, option, register_attack, seed_option

__all__ = ["FinetuneSettings", "finetune_attack", "mark_best", "stolen_advantage"]


def finetune_attack(
    target: Target,
    stolen_run: str | os.PathLike[str],
    train: Data,
    fractions: list[float],
    out_dir: str | os.PathLike[str],
    *,
    layers: Sequence[str] = ("all", "first", "last"),
    epochs: int = 20,
    lr: float = 0.05,
    scratch_lr: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    lrs: Sequence[float] | None = None,
    scratch_lrs: Sequence[float] | None = None,
    optimizer: str = "sgd",
) -> AttackReport:
    """Fine-tune ``stolen_run`` on stratified ``fractions`` of ``train`` (plain images) into ``out_dir``.

    ``lrs`` / ``scratch_lrs``: the learning rates each fine-tuning variant / the scratch twin tries (default:
    ``[lr]`` / ``[scratch_lr]``; an empty ``scratch_lrs`` skips scratch); ``optimizer``: ``sgd`` or
    ``adam`` for both. Runs are named ``VARIANT-FRACTION`` (one learning rate) or ``VARIANT-lrLR-FRACTION``.
    A passport model is fine-tuned (and its scratch twin trained) with passports the attacker draws
    (forged: seeded, not the owner's), and without the sign loss (the attacker wants accuracy only).
    """
    at.FRACTION.check_each("fractions", fractions)
    at.EPOCHS.check("epochs", epochs)
    at.SEED.check("seed", seed)
    lrs = at.LEARNING_RATE.check_each("lrs", [lr] if lrs is None else lrs)
    scratch_lrs = [scratch_lr] if scratch_lrs is None else list(scratch_lrs)
    at.LEARNING_RATE.check_each("scratch_lrs", scratch_lrs or [1.0])
    for mode in layers:
        at.check_train_layers(mode)
    t_start = time.perf_counter()
    meta = target.meta
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    base: dict[str, Any] = {
        "model": meta.model,
        "model_kwargs": meta.model_kwargs,
        "epochs": epochs,
        "norm": meta.norm_mode,
        "amp": meta.amp,
        "label_smoothing": meta.label_smoothing,
        "seed": seed,
        "optimizer": optimizer,
    }
    forged = None
    if meta.passport:
        forged = Passports.generate(target.model, seed=seed + 1)
        base["sign_loss"] = 0.0
    quiet = (lambda s: None) if not progress else None
    for frac in fractions:
        n = max(len(train.classes), round(frac * len(train)))
        subset = stratified_subset(train, n, seed)
        batch = min(n, 256, max(16, n // 8))  # never more than the images (a tiny share trains in one batch)
        runs: list[tuple[str, float, dict[str, Any]]] = [
            (f"fine-tune {mode}", rate, {"init_from": str(stolen_run), "train_layers": mode})
            for mode in layers
            for rate in lrs
        ]
        runs += [("scratch", rate, {}) for rate in scratch_lrs]
        first = len(rows)
        for variant, rate, extra in runs:
            sweep = len(lrs if variant != "scratch" else scratch_lrs) > 1
            name = f"{variant.replace(' ', '-').replace(':', '')}{f'-lr{rate:g}' if sweep else ''}-{frac:g}"
            cfg = TrainConfig(**base, **extra, batch_size=batch, lr=rate)
            t0 = time.perf_counter()
            fit(subset, None, None, cfg, out / name, progress=progress, log=quiet, passports=forged)
            rep = evaluate_run(out / name, target.val, None, wrong_keys=0, progress=False, passports=forged)
            rows.append(
                {
                    "setting": f"{variant}{f', lr {rate:g}' if sweep else ''}, {frac:.0%} ({n} images)",
                    "variant": variant,
                    "lr": rate,
                    "optimizer": optimizer,
                    "data_fraction": frac,
                    "images": n,
                    "attacker_accuracy": rep.rows[0]["accuracy"],
                    "train_seconds": time.perf_counter() - t0,
                }
            )
        mark_best(rows[first:])
    return make_report(target, "fine-tune", rows, t_start)


def mark_best(rows: list[dict]) -> None:
    """``best: True`` on the most accurate row of each variant (the first of equals), False on the others."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["variant"] not in best or r["attacker_accuracy"] > best[r["variant"]]["attacker_accuracy"]:
            best[r["variant"]] = r
    for r in rows:
        r["best"] = r is best[r["variant"]]


def stolen_advantage(rows: list[dict]) -> float | None:
    """The best fine-tuned accuracy minus the best scratch accuracy over ``rows`` (None without both)."""
    stolen = [r["attacker_accuracy"] for r in rows if r["variant"] != "scratch"]
    scratch = [r["attacker_accuracy"] for r in rows if r["variant"] == "scratch"]
    return max(stolen) - max(scratch) if stolen and scratch else None


@dataclass(frozen=True)
class FinetuneSettings:
    fractions: list[float] = option([0.01, 0.05, 0.1], "labelled data fractions", type=at.FRACTION, nargs="+")
    epochs: int = option(30, "training epochs", type=at.EPOCHS)
    output: str | None = option(
        None, "folder for the attacker's runs (required)", "-o", "--output", type=at.output_path
    )
    layers: list[str] = option(
        ["all", "first", "last"],
        "what each variant trains: all, first, last or block:N",
        type=at.train_layers,
        nargs="+",
    )
    lrs: list[float] | None = option(
        None, "learning rates to sweep (default 0.05; best kept)", type=at.LEARNING_RATE, nargs="+"
    )
    scratch_lrs: list[float] | None = option(
        None, "scratch's learning rates (default 0.2)", type=at.LEARNING_RATE, nargs="+"
    )
    optimizer: str = option("sgd", "optimiser: sgd or adam (AdamW)", choices=["sgd", "adam"])
    seed: int = seed_option()


def _run(target: Target, data: AttackData, s: FinetuneSettings) -> AttackReport:
    if not s.output:
        raise BlockkeyError("fine-tune writes one run per variant: give -o OUTDIR")
    if data.run_dir is None:
        raise BlockkeyError("fine-tune starts from the stolen run directory: AttackData.run_dir is needed")
    return finetune_attack(
        target,
        data.run_dir,
        data.train,
        s.fractions,
        s.output,
        epochs=s.epochs,
        seed=s.seed,
        progress=data.progress,
        layers=tuple(s.layers),
        lrs=s.lrs,
        scratch_lrs=s.scratch_lrs,
        optimizer=s.optimizer,
    )


register_attack(
    AttackSpec("fine-tune", "fine-tune the stolen weights on plain images", FinetuneSettings, _run, "data_fraction")
)
