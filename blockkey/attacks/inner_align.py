"""Inner-key alignment: recover the keyed channel permutations of a model's inner key from its own statistics.

An inner key (:mod:`blockkey.inner`) permutes and sign-flips the channels between two layers. BatchNorm
layers keep the mean and variance of their input over the training data (``running_mean``/``running_var``)
and those were recorded *with* the key. The thief runs plain images up to a keyed point (the layers before
it are intact once the earlier points are recovered), so he knows the statistics of what enters the point;
the key is the signed permutation that makes the next convolution's output statistics match the
BatchNorm's record. Point by point, from the input on:

1. start: the BatchNorm mean is linear in the channel means entering the convolution,
   ``m = W_sum @ (s * mu[perm])``: solve it for the signed means by least squares, take the signs, and
   assign the magnitudes to the measured channel means (Hungarian);
2. refine: swap two columns' channels or flip one column's sign while the exact batch statistics of the
   BatchNorm's input (through any pooling between) move closer to its record.

A point read by a linear head (no BatchNorm) is matched with the threat model's labelled images instead:
the head's weight for class ``c`` correlates with the class-mean features, so columns are assigned to
channels by the correlation of the two (Hungarian). The input key is outside this attack: it is given
(``outer``), or recovered by another attack first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import argtypes as at
from ..data import Data
from ..functional import BlockPlan
from ..inner import ChannelKey, set_points, view_points
from ..keys import KeySet
from ..transforms import KeyedTransform
from . import AttackReport, Target, check_counts, make_report
from ._inner import channel_fraction, inner_view, input_key, recovered_accuracy
from .registry import AttackData, AttackSpec, option, register_attack

__all__ = ["InnerAlignSettings", "align_inner", "inner_align_attack"]


@dataclass
class _Point:
    name: str
    point: ChannelKey
    consumer: nn.Module  # the Conv2d or Linear reading the point's output
    bn: nn.BatchNorm2d | None  # the BatchNorm after the consumer, if any
    pool: bool  # a max pool between consumer and BatchNorm


def _trace(model: nn.Module, x: torch.Tensor) -> list[_Point]:
    """Each keyed point with the layer reading it and the BatchNorm after that, in forward order."""
    order: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in model.named_modules()} | {point: p.name for p, point in view_points(model)}
    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, (ChannelKey, nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_pre_hook(lambda mod, inp: order.append((names[mod], mod))) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    points = []
    for i, (name, mod) in enumerate(order):
        if not isinstance(mod, ChannelKey):
            continue
        later = order[i + 1 :]
        j = next((k for k, (_, m) in enumerate(later) if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if j is None:
            raise ValueError(f"keyed point {name} is read by no convolution or linear layer")
        consumer, bn, pool = later[j][1], None, False
        for _, m in later[j + 1 :]:
            if isinstance(m, nn.BatchNorm2d):
                bn = m
                break
            if isinstance(m, (nn.Conv2d, nn.Linear, ChannelKey)):
                break
            pool = pool or isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
        points.append(_Point(name, mod, consumer, bn, pool))
    return points


def _capture(model: nn.Module, point: ChannelKey, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The input of ``point`` for images ``x`` (already keyed and normalised)."""
    got: list[torch.Tensor] = []
    hook = point.register_forward_pre_hook(lambda mod, inp: got.append(inp[0].detach().float()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
    finally:
        hook.remove()
    return torch.cat(got)


class _Stats:
    """Exact BatchNorm-input statistics for a signed channel assignment, with cheap column updates."""

    def __init__(self, p: _Point, h: torch.Tensor) -> None:
        conv, bn = p.consumer, p.bn
        assert isinstance(conv, nn.Conv2d) and bn is not None
        assert bn.running_mean is not None and bn.running_var is not None  # BatchNorm tracks statistics
        self.conv, self.bn, self.pool = conv, bn, p.pool
        self.h = h
        self.w = self.conv.weight.detach().float()
        self.mean = bn.running_mean.detach().float()
        self.std = bn.running_var.detach().float().clamp_min(1e-8).sqrt()

    def _conv(self, z: torch.Tensor, cols: list[int]) -> torch.Tensor:
        c = self.conv
        return nn.functional.conv2d(z, self.w[:, cols], None, c.stride, c.padding, c.dilation)

    def output(self, perm: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        z = self.h[:, perm] * sign.view(1, -1, 1, 1)
        return self._conv(z, list(range(len(perm))))

    def objective(self, y: torch.Tensor) -> torch.Tensor:
        if self.pool:
            y = nn.functional.max_pool2d(y, 2)
        mean = y.mean((0, 2, 3))
        std = y.var((0, 2, 3), unbiased=False).clamp_min(1e-8).sqrt()
        return (((mean - self.mean) ** 2 + (std - self.std) ** 2) / self.std**2).mean()

    def loss(self, y: torch.Tensor) -> float:
        return float(self.objective(y))

    def delta(self, perm: torch.Tensor, sign: torch.Tensor, cols: list[int], new_src: list[int], new_sign: list[float]):
        """The change of the convolution output when columns ``cols`` read ``new_src`` with ``new_sign``."""
        old = self.h[:, perm[cols]] * sign[cols].view(1, -1, 1, 1)
        new = self.h[:, new_src] * torch.tensor(new_sign, device=self.h.device).view(1, -1, 1, 1)
        return self._conv(new - old, cols)


def _hungarian(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def _start(st: _Stats, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed means from the BatchNorm mean by least squares, magnitudes assigned to channel means; then
    linearised assignment steps (as in Git Re-Basin's weight matching): the gradient of the statistics
    mismatch gives each (column, channel, sign) a first-order gain, the Hungarian method picks the best
    signed permutation, repeated while the exact mismatch falls."""
    mu = st.h.mean((0, 2, 3))
    w_sum = st.w.sum((2, 3))
    v = torch.linalg.lstsq(w_sum.double().cpu(), st.mean.double().cpu().unsqueeze(1)).solution.squeeze(1)
    v = v.float().to(mu.device)
    sign = torch.where(v < 0, -1.0, 1.0)
    cost = (v.abs()[:, None] - mu.abs()[None, :]).pow(2).cpu().numpy()
    perm = torch.from_numpy(_hungarian(cost)).to(v.device)
    best = (st.loss(st.output(perm, sign)), perm, sign)
    n = len(perm)
    for _ in range(iterations):
        z = (st.h[:, perm] * sign.view(1, -1, 1, 1)).requires_grad_(True)
        (grad,) = torch.autograd.grad(st.objective(st._conv(z, list(range(n)))), z)
        gain = torch.einsum("njhw,nihw->ji", grad, st.h)  # d objective / d (column j reads +channel i)
        perm = torch.from_numpy(_hungarian(-gain.abs().cpu().numpy())).to(gain.device)
        sign = torch.where(gain[torch.arange(n), perm] > 0, -1.0, 1.0)
        loss = st.loss(st.output(perm, sign))
        if loss >= best[0]:
            break
        best = (loss, perm, sign)
    return best[1].clone(), best[2].clone()


def _refine(st: _Stats, perm: torch.Tensor, sign: torch.Tensor, sweeps: int, budget: float) -> tuple[Any, ...]:
    """First-improvement local search over column swaps and sign flips on the exact statistics."""
    y = st.output(perm, sign)
    best = st.loss(y)
    n = len(perm)
    deadline = time.perf_counter() + budget
    for _ in range(sweeps):
        improved = False
        for a in range(n):
            d = st.delta(perm, sign, [a], [int(perm[a])], [-float(sign[a])])
            if (loss := st.loss(y + d)) < best:
                y, best, improved = y + d, loss, True
                sign[a] = -sign[a]
            for b in range(a + 1, n):
                src = [int(perm[b]), int(perm[a])]
                d = st.delta(perm, sign, [a, b], src, [float(sign[a]), float(sign[b])])
                if (loss := st.loss(y + d)) < best:
                    y, best, improved = y + d, loss, True
                    perm[a], perm[b] = src[0], src[1]
            if time.perf_counter() > deadline:
                return perm, sign, best
        if not improved:
            break
    return perm, sign, best


def _head(p: _Point, h: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A point read by a linear head: columns to channels by head-weight / class-mean-feature correlation."""
    f = h.amax((2, 3)) if h.dim() == 4 else h
    means = torch.stack([f[labels == c].mean(0) for c in range(classes)]).nan_to_num()  # a class without images: 0
    means = (means - means.mean(0)) / means.std(0).clamp_min(1e-8)
    weight = p.consumer.weight
    assert isinstance(weight, torch.Tensor)  # a Linear (or Conv2d) consumer
    w = weight.detach().float()  # (classes, columns)
    w = (w - w.mean(0)) / w.std(0).clamp_min(1e-8)
    corr = (w.T @ means) / classes  # (columns, channels)
    perm = torch.from_numpy(_hungarian(-(corr.abs() if p.point.signs else corr).cpu().numpy())).to(corr.device)
    sign = torch.ones(len(perm), device=corr.device)
    if p.point.signs:
        sign = torch.where(corr[torch.arange(len(perm)), perm] < 0, -1.0, 1.0)
    return perm, sign


def align_inner(
    target: Target,
    outer: KeySet | BlockPlan | None,
    data: Data,
    images: int = 512,
    sweeps: int = 3,
    seconds_per_point: float = 60.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Recover every keyed point of ``target.model`` from ``images`` labelled plain images of ``data``.

    ``outer`` is the input key the images are keyed with (the true one given, or one an attack recovered).
    ``target.model`` is a keyed-point view (:func:`blockkey.inner.with_keyed_points`) of the stolen model.
    Returns ``{point name: (perm, sign)}``; the view's points are left as recovered.
    """
    from ..data import make_loader, stratified_subset

    model = set_points(target.model.eval(), None)
    transform = KeyedTransform(outer) if outer is not None else None
    sample = stratified_subset(data, images, seed=0)
    loader = make_loader(
        sample, 256, train=False, transform=transform, normalize=target.normalize, device=target.device
    )
    batches = list(loader)
    x, labels = torch.cat([b[0].float() for b in batches]), torch.cat([b[1] for b in batches])
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for p in _trace(model, x[:2]):
        h = _capture(model, p.point, x)
        if p.bn is not None and isinstance(p.consumer, nn.Conv2d):
            st = _Stats(p, h)
            perm, sign = _start(st)
            perm, sign, _ = _refine(st, perm, sign, sweeps, seconds_per_point)
        else:
            perm, sign = _head(p, h, labels, target.meta.num_classes)
        p.point.set(perm, sign)
        found[p.name] = (perm.clone(), sign.clone())
    return found


def inner_align_attack(
    target: Target, data: Data, images: list[int], sweeps: int = 3, seconds_per_point: float = 60.0
) -> AttackReport:
    """The alignment attack with the true input key given (it isolates the inner key) for each image count.

    Rows: the share of channels whose source and sign came out right over all points, and the stolen
    model's accuracy with the recovered inner key.
    """
    check_counts("--images", images, len(data), "attack-pool images")
    outer = input_key(target, "inner-align")
    started = time.perf_counter()
    view = inner_view(target)
    rows = []
    for n in images:
        t0 = time.perf_counter()
        found = align_inner(view, outer, data, n, sweeps, seconds_per_point)
        rows.append(
            {
                "setting": f"{n} labelled images, input key given",
                "images": n,
                "channel_fraction": channel_fraction(view, found),
                "attacker_accuracy": recovered_accuracy(view, outer),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    return make_report(target, "inner-align", rows, started)


@dataclass(frozen=True)
class InnerAlignSettings:
    images: list[int] = option([100, 1000], "labelled plain images used", type=at.COUNT, nargs="+")
    seconds_per_point: float = option(60.0, "local-search time per keyed point", type=at.SECONDS)


def _run(target: Target, data: AttackData, s: InnerAlignSettings) -> AttackReport:
    return inner_align_attack(target, data.train, s.images, seconds_per_point=s.seconds_per_point)


register_attack(
    AttackSpec("inner-align", "the inner key by aligning batch-norm statistics", InnerAlignSettings, _run, "images")
)
