"""The attack suite: how well does the protection hold against an attacker without the key?

Threat model (Kerckhoffs): the attacker has the weights, the architecture, the algorithm and the
block size, plain images and a fraction of the labelled plain training data; not the key. Each
attack returns an :class:`AttackReport` with the attacker's accuracy beside the key holder's, the
data it used, the share of the key it recovered (where that applies) and its wall time.

- :mod:`~blockkey.attacks.known_plaintext`: the key from (plain, transformed) image pairs.
- :mod:`~blockkey.attacks.adapter`: a learned front-end (per-block linear map, per-position value
  table) in front of the frozen stolen model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import Data, Normalize, make_loader
from ..errors import BlockkeyError
from ..fileio import atomic_path
from ..inner import use_inner_key
from ..keys import KeySet
from ..meta import RunMeta
from ..passport import Passports
from ..runtime import predict_accuracy
from ..transforms import KeyedTransform

__all__ = ["AttackReport", "Target", "accuracy", "check_counts", "make_report"]


def check_counts(option: str, counts: int | list[int], available: int, what: str) -> None:
    """The one rule for counts of images (or pairs) an attack draws from its data: a count above what the data
    holds is refused in one line (:class:`~blockkey.errors.OptionError`), never silently lowered."""
    from ..errors import OptionError

    values = [counts] if isinstance(counts, int) else list(counts)
    over = [n for n in values if n > available]
    if over:
        raise OptionError(
            f"{option} {max(over)} is more than the {available} {what} the data holds; give at most {available}"
        )


@dataclass
class Target:
    """What an attack works against: the stolen model and its metadata, plus the evaluation images.

    ``key`` is the true key: attacks never use it to attack, only to report the key holder's accuracy
    and how much of the key was recovered. For a passport model it is the true :class:`Passports`
    (only the fine-tuning attack applies: it forges its own passports).
    """

    model: nn.Module
    meta: RunMeta  # a meta.json-shaped mapping is read into a RunMeta
    key: KeySet | Passports
    val: Data
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.meta = RunMeta.coerce(self.meta)

    @property
    def keyset(self) -> KeySet:
        """The true key of a keyed model (what key attacks score against); a passport model has none."""
        if not isinstance(self.key, KeySet):
            raise BlockkeyError("this attack needs a model protected by a key; this one is protected by passports")
        return self.key

    @property
    def normalize(self) -> Normalize | None:
        return self.meta.normalize

    @property
    def amp(self) -> str:
        """The run's autocast mode, resolved here (``auto``: bf16 where this CPU has it natively, else off)."""
        return self.meta.amp


def accuracy(
    target: Target, transform: KeyedTransform | nn.Module | None, data: Data | None = None, keep_inner: bool = False
) -> float:
    """Accuracy of the stolen model on ``data`` (default: the evaluation images) seen through ``transform``.

    The model's weights are relabelled for the transform's inner key (:func:`blockkey.inner.use_inner_key`;
    the stored form without one), unless ``keep_inner``: then the model stays as it is (e.g. a keyed-point
    view whose points an attack set).
    """
    data = data if data is not None else target.val
    if not keep_inner:
        use_inner_key(target.model, transform.inner if isinstance(transform, KeyedTransform) else None)
    if transform is None or isinstance(transform, KeyedTransform):
        loader = make_loader(
            data, 500, train=False, transform=transform, normalize=target.normalize, device=target.device
        )
        return predict_accuracy(target.model, loader, target.device, target.amp, channels_last=False)
    loader = make_loader(data, 500, train=False, transform=None, normalize=None, device=target.device)
    front = nn.Sequential(transform, target.model).to(target.device)
    return predict_accuracy(front, loader, target.device, target.amp, channels_last=False)


@dataclass
class AttackReport:
    """One attack against one model: rows of ``{setting, attacker accuracy, ...}`` plus context."""

    attack: str
    model: str
    key_fingerprint: str
    recipe: list[str]
    key_holder_accuracy: float
    plain_accuracy: float
    chance: float
    rows: list[dict[str, Any]]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "model": self.model,
            "key_fingerprint": self.key_fingerprint,
            "recipe": self.recipe,
            "key_holder_accuracy": self.key_holder_accuracy,
            "plain_accuracy": self.plain_accuracy,
            "chance": self.chance,
            "rows": self.rows,
            "seconds": round(self.seconds, 2),
        }

    def to_markdown(self) -> str:
        cols = [c for c in self.rows[0] if c not in ("setting",)] if self.rows else []
        lines = [
            f"{self.attack} against {self.model} ({'+'.join(self.recipe)}, key {self.key_fingerprint}): "
            f"key holder {self.key_holder_accuracy:.1%}, plain images {self.plain_accuracy:.1%}, "
            f"chance {self.chance:.1%}",
            "",
            "| setting | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for r in self.rows:
            cells = [_fmt(c, r[c]) for c in cols]
            lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(
        self, path: str | os.PathLike[str], x: str, y: str = "attacker_accuracy", *, overwrite: bool = False
    ) -> None:
        """Attacker accuracy against ``x`` (e.g. the data fraction), key holder and chance as lines; written
        atomically, an existing file replaced only with ``overwrite``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in self.rows:
            if x in r:  # rows without the axis (e.g. a diagnostic row) are not plotted
                groups.setdefault(r.get("variant", self.attack), []).append((r[x], 100 * r[y]))
        if not groups:
            raise BlockkeyError(f"--plot: no row of {self.attack} has a {x.replace('_', ' ')} to plot against")
        for name, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.axhline(100 * self.key_holder_accuracy, color="#2b7", ls="--", lw=1, label="key holder")
        ax.axhline(100 * self.chance, color="k", ls=":", lw=1, label="chance")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel("attacker accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{self.attack}: {self.model}, {'+'.join(self.recipe)}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            with atomic_path(path, overwrite=overwrite) as tmp:
                fig.savefig(tmp)
        finally:
            plt.close(fig)


def make_report(target: Target, attack: str, rows: list[dict[str, Any]], started: float) -> AttackReport:
    """An :class:`AttackReport` for ``rows``, with the key holder's and plain images' accuracy beside them."""
    import time

    key = target.key
    if isinstance(key, Passports):  # holder: the true passports; "plain": forged (seeded) passports
        Passports.generate(target.model, seed=0).attach(target.model)
        forged = accuracy(target, None)
        key.attach(target.model)
        recipe, holder, plain = ["passport"], accuracy(target, None), forged
    else:
        recipe, holder, plain = list(key.spec), accuracy(target, KeyedTransform(key)), accuracy(target, None)
    return AttackReport(
        attack,
        target.meta.model,
        key.fingerprint,
        recipe,
        holder,
        plain,
        1 / target.meta.num_classes,
        rows,
        time.perf_counter() - started,
    )


def _fmt(name: str, v: Any) -> str:
    if isinstance(v, float):
        if "accuracy" in name or "fraction" in name:
            return f"{v:.1%}"
        return f"{v:.2f}"
    return str(v)
