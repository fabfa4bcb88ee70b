"""Who gets accuracy out of a protected model: the key holder, plain images, and N wrong keys."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import argtypes as at
from .checkpoint import CheckpointError, RunMeta, load_model
from .data import Data, DataError, ImageFolderStream, ImageTensors, make_loader
from .fileio import atomic_path
from .inner import use_inner_key
from .keys import KeySet
from .passport import PassportError, Passports, signature_match
from .runtime import pick_device, predict_accuracy
from .transforms import KeyedTransform
from .tta import tta_views

__all__ = ["EvalReport", "align_classes", "evaluate_model", "evaluate_run"]


@dataclass
class EvalReport:
    """Rows of ``(setting, accuracy stats)`` plus context; ``to_markdown`` / ``to_json`` / ``plot``."""

    model: str
    model_key: dict[str, Any] | None  # the model's KeyInfo as JSON
    given_key: str | None
    key_matches: bool | None
    images: int
    num_classes: int
    rows: list[dict[str, Any]]
    tta: str = "off"  # test-time views every row averages (blockkey.tta: off | flip | shift)

    def to_json(self) -> dict[str, Any]:
        return {
            "tta": self.tta,
            "model": self.model,
            "model_key": self.model_key,
            "given_key_fingerprint": self.given_key,
            "key_matches_model": self.key_matches,
            "images": self.images,
            "chance": 1 / self.num_classes,
            "rows": self.rows,
        }

    def to_markdown(self) -> str:
        lines = [
            "| setting | accuracy | std | min | max | n |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        sig = any("signature_match" in r for r in self.rows)
        if sig:
            lines = [lines[0] + " owner's signature bits reproduced |", lines[1] + "---:|"]
        for r in self.rows:
            std = f"{r['std']:.1%}" if r.get("n", 1) > 1 else ""
            mn = f"{r['min']:.1%}" if r.get("n", 1) > 1 else ""
            mx = f"{r['max']:.1%}" if r.get("n", 1) > 1 else ""
            line = f"| {r['setting']} | {r['accuracy']:.1%} | {std} | {mn} | {mx} | {r.get('n', 1)} |"
            if sig:
                line += f" {r['signature_match']:.1%} |" if "signature_match" in r else " |"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """A PNG bar plot of the rows at ``path``, written atomically; an existing file only with ``overwrite``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
        names = [r["setting"] for r in self.rows]
        acc = [100 * r["accuracy"] for r in self.rows]
        err = [100 * r.get("std", 0.0) for r in self.rows]
        ax.bar(range(len(acc)), acc, yerr=err, capsize=4, color=["#2b7", "#c44", "#c84", "#888"][: len(acc)])
        ax.set_xticks(range(len(acc)), names, fontsize=8)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 100)
        chance = 100 / self.num_classes
        ax.axhline(chance, ls="--", lw=1, color="k")
        ax.text(len(acc) - 0.5, chance + 1, "chance", ha="right", fontsize=7)
        ax.set_title(f"{self.model}: {self.images} images", fontsize=9)
        for i, a in enumerate(acc):
            ax.text(i, a + 1.5, f"{a:.1f}", ha="center", fontsize=8)
        fig.tight_layout()
        try:
            with atomic_path(path, overwrite=overwrite) as tmp:
                fig.savefig(tmp)
        finally:
            plt.close(fig)


def align_classes(data: Data, model_classes: Sequence[str]) -> Data:
    """Map an ImageFolder's labels to the model's class order by name; refuse a mismatch."""
    if list(data.classes) == list(model_classes):
        return data
    missing = sorted(set(data.classes) - set(model_classes))
    if missing:
        raise DataError(f"classes {missing} are not classes of the model ({', '.join(model_classes)})")
    remap = torch.tensor([model_classes.index(c) for c in data.classes])
    if isinstance(data, ImageFolderStream):
        samples = tuple((p, int(remap[label])) for p, label in data.samples)
        return ImageFolderStream(samples, tuple(model_classes), data.image_size, data.workers, data.stats_images)
    return ImageTensors(data.images, remap[data.labels], tuple(model_classes))


def _stats(name: str, accs: list[float]) -> dict[str, Any]:
    return {
        "setting": name,
        "accuracy": statistics.fmean(accs),
        "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs),
        "max": max(accs),
        "n": len(accs),
    }


def evaluate_model(
    model: nn.Module,
    meta: RunMeta | Mapping[str, Any],
    data: Data,
    key: KeySet | None,
    *,
    wrong_keys: int = 100,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    progress: bool = True,
    passports: Passports | None = None,
    tta: str | bool = "off",
    plain_images: bool = True,
) -> EvalReport:
    """Accuracy with ``key``, with plain images (unless ``plain_images=False``) and with ``wrong_keys``
    random keys of the model's recipe.

    ``tta``: test-time augmentation (:mod:`blockkey.tta`): ``flip`` averages each image and its mirror image
    (flipped plain, then keyed), ``shift`` adds one-pixel shifts of both (``True``: ``flip``); every row
    then uses it, wrong keys included.

    A passport model instead: accuracy with ``passports`` and with ``wrong_keys`` forged (random)
    passports, each with the fraction of the owner's signature bits that ``sign(gamma)`` reproduces.
    """
    from tqdm import tqdm

    at.NON_NEGATIVE_INT.check("wrong_keys", wrong_keys)
    at.COUNT.check("batch_size", batch_size)
    meta = RunMeta.coerce(meta)
    views = tta_views(tta)
    tta_name = views.name if views is not None else "off"
    # with views, batch_size counts views (images x views), so memory stays that of batch_size images
    per_batch = max(1, batch_size // len(views.offsets)) if views is not None else batch_size
    dev = pick_device(device)
    model = model.to(dev).eval()
    data = align_classes(data, meta.classes)
    if tuple(data.image_shape) != meta.image_shape:
        raise DataError(f"images are {data.image_shape}, the model was trained on {meta.image_shape}")

    def acc(transform: KeyedTransform | None) -> float:
        use_inner_key(model, transform.inner if transform is not None else None)
        loader = make_loader(
            data, per_batch, train=False, transform=transform, normalize=meta.normalize, device=dev, views=views
        )
        weights = views.weights if views is not None else None
        return predict_accuracy(model, loader, dev, meta.amp, meta.channels_last, weights)

    model_key = meta.key
    if meta.passport or passports is not None:
        return _evaluate_passports(model, meta, data, key, passports, wrong_keys, acc, progress, tta_name)
    rows = []
    matches = None
    if key is not None:
        matches = model_key is not None and key.fingerprint == model_key.fingerprint
        label = "correct key" if matches else f"given key {key.fingerprint} (NOT the model's key)"
        rows.append(_stats(label, [acc(KeyedTransform(key))]))
    elif model_key is None:
        rows.append(_stats("non-protected model", [acc(None)]))
    if model_key is not None:
        if plain_images:
            rows.append(_stats("plain images", [acc(None)]))
        if wrong_keys > 0:
            recipe = model_key.steps  # ffx-all draws ffx-all wrong keys
            m, c = model_key.block_size, model_key.channels
            accs = []
            for _ in tqdm(range(wrong_keys), desc="wrong keys", leave=False, disable=not progress):
                accs.append(acc(KeyedTransform(KeySet.generate(recipe, m, c))))
            rows.append(_stats(f"{wrong_keys} random wrong keys", accs))
    given = key.fingerprint if key else None
    key_doc = model_key.to_json() if model_key is not None else None
    return EvalReport(meta.model, key_doc, given, matches, len(data), meta.num_classes, rows, tta_name)


def _evaluate_passports(
    model: nn.Module,
    meta: RunMeta,
    data: Data,
    key: KeySet | None,
    passports: Passports | None,
    forged: int,
    acc: Callable[[KeyedTransform | None], float],
    progress: bool,
    tta: str = "off",
) -> EvalReport:
    from tqdm import tqdm

    model_passport = meta.passport
    if model_passport is None:
        raise PassportError(f"{meta.model} is not a passport model; passports do not apply")
    if key is not None:
        raise PassportError("this model is protected by passports, not a key: give --passport, not --key")
    rows = []
    matches = None
    if passports is not None:
        matches = passports.fingerprint == model_passport["fingerprint"]
        label = "correct passports" if matches else f"given passports {passports.fingerprint} (NOT the model's)"
        passports.attach(model)
        rows.append(_stats(label, [acc(None)]) | {"signature_match": signature_match(model)})
    accs, sigs = [], []
    for _ in tqdm(range(forged), desc="forged passports", leave=False, disable=not progress):
        Passports.generate(model).attach(model)
        accs.append(acc(None))
        sigs.append(signature_match(model, passports) if passports is not None else float("nan"))
    if forged:
        row = _stats(f"{forged} forged passports", accs)
        rows.append(row | ({"signature_match": statistics.fmean(sigs)} if passports is not None else {}))
    if passports is not None:
        passports.attach(model)  # leave the model as given
    given = passports.fingerprint if passports is not None else None
    return EvalReport(meta.model, None, given, matches, len(data), meta.num_classes, rows, tta)


def evaluate_run(run_dir: str | os.PathLike[str], data: Data, key: KeySet | None, **kwargs: Any) -> EvalReport:
    """:func:`evaluate_model` for a run directory written by :func:`blockkey.train.fit`."""
    model, meta = load_model(run_dir)
    model_key = meta.key
    if (
        key is not None
        and model_key is not None
        and (key.block_size, key.channels)
        != (
            model_key.block_size,
            model_key.channels,
        )
    ):
        raise CheckpointError(
            f"the key is for M={key.block_size}, C={key.channels}; the model for "
            f"M={model_key.block_size}, C={model_key.channels}"
        )
    return evaluate_model(model, meta, data, key, **kwargs)
