"""Fine-tuning attack: retrain the stolen model on plain labelled data, beside training from scratch.

For each data fraction the attacker fine-tunes the stolen weights on plain images (all layers, only
the first layer, or only the last), and trains the same architecture from random weights on the same
images with the same epochs. The protection holds where the stolen model does not beat scratch:
then the weights gave the attacker nothing a fresh model would not have learnt. Frozen layers keep
their weights, but batch-norm statistics still adapt to plain images (a stronger attacker).
"""

from __future__ import annotations

import os
import time
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

__all__ = ["FinetuneSettings", "finetune_attack"]


def finetune_attack(
    target: Target,
    stolen_run: str | os.PathLike[str],
    train: Data,
    fractions: list[float],
    out_dir: str | os.PathLike[str],
    *,
    layers: tuple[str, ...] = ("all", "first", "last"),
    epochs: int = 20,
    lr: float = 0.05,
    scratch_lr: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> AttackReport:
    """Fine-tune ``stolen_run`` on stratified ``fractions`` of ``train`` (plain images) into ``out_dir``.

    A passport model is fine-tuned (and its scratch twin trained) with passports the attacker draws
    (forged: seeded, not the owner's), and without the sign loss (the attacker wants accuracy only).
    """
    at.FRACTION.check_each("fractions", fractions)
    at.EPOCHS.check("epochs", epochs)
    at.SEED.check("seed", seed)
    t_start = time.perf_counter()
    meta = target.meta
    out = Path(out_dir)
    rows = []
    base: dict[str, Any] = {
        "model": meta.model,
        "model_kwargs": meta.model_kwargs,
        "epochs": epochs,
        "norm": meta.norm_mode,
        "amp": meta.amp,
        "label_smoothing": meta.label_smoothing,
        "seed": seed,
    }
    forged = None
    if meta.passport:
        forged = Passports.generate(target.model, seed=seed + 1)
        base["sign_loss"] = 0.0
    quiet = (lambda s: None) if not progress else None
    for frac in fractions:
        n = max(len(train.classes), round(frac * len(train)))
        subset = stratified_subset(train, n, seed)
        batch = min(256, max(16, n // 8))
        runs = [
            (
                f"fine-tune {mode}",
                TrainConfig(**base, batch_size=batch, lr=lr, init_from=str(stolen_run), train_layers=mode),
            )
            for mode in layers
        ]
        runs.append(("scratch", TrainConfig(**base, batch_size=batch, lr=scratch_lr)))
        for variant, cfg in runs:
            run = out / f"{variant.replace(' ', '-')}-{frac:g}"
            t0 = time.perf_counter()
            fit(subset, None, None, cfg, run, progress=progress, log=quiet, passports=forged)
            rep = evaluate_run(run, target.val, None, wrong_keys=0, progress=False, passports=forged)
            acc = rep.rows[0]["accuracy"]
            rows.append(
                {
                    "setting": f"{variant}, {frac:.0%} ({n} images)",
                    "variant": variant,
                    "data_fraction": frac,
                    "images": n,
                    "attacker_accuracy": acc,
                    "train_seconds": time.perf_counter() - t0,
                }
            )
    return make_report(target, "fine-tune", rows, t_start)


@dataclass(frozen=True)
class FinetuneSettings:
    fractions: list[float] = option([0.01, 0.05, 0.1], "labelled data fractions", type=at.FRACTION, nargs="+")
    epochs: int = option(30, "training epochs", type=at.EPOCHS)
    output: str | None = option(
        None, "folder for the attacker's runs (required)", "-o", "--output", type=at.output_path
    )
    seed: int = seed_option()


def _run(target: Target, data: AttackData, s: FinetuneSettings) -> AttackReport:
    if not s.output:
        raise BlockkeyError("fine-tune writes one run per variant: give -o OUTDIR")
    if data.run_dir is None:
        raise BlockkeyError("fine-tune starts from the stolen run directory: AttackData.run_dir is needed")
    return finetune_attack(
        target, data.run_dir, data.train, s.fractions, s.output, epochs=s.epochs, seed=s.seed, progress=data.progress
    )


register_attack(
    AttackSpec("fine-tune", "fine-tune the stolen weights on plain images", FinetuneSettings, _run, "data_fraction")
)
