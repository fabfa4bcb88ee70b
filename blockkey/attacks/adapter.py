"""Adapter attack: learn a front-end that undoes the key, in front of the frozen stolen model.

The front-end works block by block on plain images: an optional per-position value table
(``L x 256``, initialised to ``v / 255``; FFX is a per-position table) and a linear map of each block
vector (``L x L`` plus bias, initialised to the identity; shuffle and negpos are exactly such a map,
so a perfect adapter reproduces the key holder's accuracy). Its output is normalised with the stolen
model's statistics and fed to the frozen model; only the front-end is trained, with cross-entropy
on a fraction of the labelled plain training data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import argtypes as at
from ..data import Data, Normalize, make_loader, stratified_subset
from ..functional import from_blocks, to_blocks
from ..runtime import autocast, normalise
from . import AttackReport, Target, accuracy, make_report
from .registry import AttackData, AttackSpec, option, register_attack, seed_option

__all__ = ["AdapterSettings", "BlockAdapter", "adapter_attack", "train_adapter"]


class BlockAdapter(nn.Module):
    """uint8 or [0, 1] float images -> per-position table (optional) -> per-block linear map -> normalisation."""

    def __init__(
        self, block_size: int, channels: int, normalize: Normalize | None, *, table: bool, linear: bool = True
    ) -> None:
        super().__init__()
        self.block_size, self.channels = block_size, channels
        length = block_size * block_size * channels
        self.table = nn.Parameter(torch.arange(256.0).div(255).repeat(length, 1)) if table else None
        self.linear = nn.Linear(length, length) if linear else None
        if self.linear is not None:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(length))
                self.linear.bias.zero_()
        self.normalize = normalize
        self._norm: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        m, c = self.block_size, self.channels
        if self.table is not None:
            v = x if x.dtype == torch.uint8 else (x * 255).round().to(torch.uint8)
            b = to_blocks(v.long(), m)  # (N, bh, bw, L)
            length = b.shape[-1]
            flat = (b + 256 * torch.arange(length, device=b.device)).reshape(-1)
            b = self.table.reshape(-1)[flat].view(b.shape)
        else:
            b = to_blocks(x.float() / 255 if x.dtype == torch.uint8 else x, m)
        if self.linear is not None:
            b = self.linear(b)
        y = from_blocks(b, m, c)
        if self.normalize is not None:
            if self._norm is None or self._norm[0].device != y.device or self._norm[0].shape != y.shape[-3:]:
                c, h, w = y.shape[-3:]
                self._norm = self.normalize.tensors((c, h, w), y.device)
            y = normalise(y, self._norm)
        return y


def train_adapter(
    target: Target,
    train: Data,
    *,
    table: bool,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> BlockAdapter:
    """Fit a :class:`BlockAdapter` for the frozen ``target.model`` on plain labelled ``train`` images."""
    model = target.model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # frozen while the adapter trains; restored below
        p.requires_grad_(False)
    try:
        return _fit_adapter(target, model, train, table, epochs, lr, batch_size, seed)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _fit_adapter(
    target: Target, model: nn.Module, train: Data, table: bool, epochs: int, lr: float, batch_size: int, seed: int
) -> BlockAdapter:
    m = target.keyset.block_size
    adapter = BlockAdapter(m, target.keyset.channels, target.normalize, table=table).to(target.device)
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    batch_size = max(1, min(batch_size, len(train) // 4))  # small fractions still get several steps an epoch
    loader = make_loader(train, batch_size, train=True, transform=None, normalize=None, device=target.device, seed=seed)
    steps = max(1, epochs * len(loader))
    # OneCycleLR divides by pct_start * steps - 1: zero for 0.2 and exactly 5 steps (a tiny data fraction)
    pct = 0.2 if steps != 5 else 0.25
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=pct)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:  # x: plain images on [0, 1]
            with autocast(target.device, target.amp):
                loss = loss_fn(model(adapter(x)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return adapter.eval()


def adapter_attack(
    target: Target,
    train: Data,
    fractions: list[float],
    *,
    table: bool | None = None,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> AttackReport:
    """Train adapters on stratified fractions of ``train`` (the attacker's labelled plain data).

    ``table``: learn a per-position value table too (default: when the recipe has an FFX step).
    """
    from tqdm import tqdm

    at.FRACTION.check_each("fractions", fractions)
    at.EPOCHS.check("epochs", epochs)
    at.SEED.check("seed", seed)
    t_start = time.perf_counter()
    key = target.keyset
    use_table = ("ffx" in key.recipe) if table is None else table
    rows = []
    for frac in tqdm(fractions, desc="adapter", disable=not progress, leave=False):
        n = max(len(train.classes), round(frac * len(train)))
        subset = stratified_subset(train, n, seed)
        t0 = time.perf_counter()
        adapter = train_adapter(target, subset, table=use_table, epochs=epochs, seed=seed)
        rows.append(
            {
                "setting": f"{frac:.0%} of the training data ({n} images)",
                "variant": "table + linear" if use_table else "linear",
                "data_fraction": frac,
                "images": n,
                "attacker_accuracy": accuracy(target, adapter),
                "train_seconds": time.perf_counter() - t0,
            }
        )
    return make_report(target, "adapter", rows, t_start)


@dataclass(frozen=True)
class AdapterSettings:
    fractions: list[float] = option([0.01, 0.05, 0.1], "labelled data fractions", type=at.FRACTION, nargs="+")
    epochs: int = option(30, "training epochs", type=at.EPOCHS)
    seed: int = seed_option()


def _run(target: Target, data: AttackData, s: AdapterSettings) -> AttackReport:
    return adapter_attack(target, data.train, s.fractions, epochs=s.epochs, seed=s.seed, progress=data.progress)


register_attack(
    AttackSpec("adapter", "a learned front-end before the frozen stolen model", AdapterSettings, _run, "data_fraction")
)
