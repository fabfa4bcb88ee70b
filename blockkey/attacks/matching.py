"""Matching block positions by the structure of ``L x L`` matrices (shared by the key-recovery attacks).

Two attacks reduce to the same problem: the attacker holds a matrix ``a`` over the key's output
positions (correlations of transformed pixels, or of the stolen patch embedding's columns) and a
reference ``b`` over plain positions (the same statistic without the key), and looks for the source
map ``pi`` with ``a[k, l] ~ b[pi[k], pi[l]]``: a quadratic assignment, solved here by starts from each
row's sorted entries and random ones, steepest-ascent pairwise swaps, and optionally iterated local
search (random kicks of a few swaps from the best solution, kept when they improve it).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

__all__ = ["corr", "dihedral", "match", "match_objective"]


def corr(x: Tensor) -> Tensor:
    """The correlation matrix of the columns of ``x`` (rows are samples)."""
    x = x - x.mean(0)
    cov = x.T @ x
    d = cov.diagonal().clamp_min(1e-12).sqrt()
    return cov / d[:, None] / d[None, :]


def dihedral(m: int) -> list[Tensor]:
    """The 8 symmetries of the m x m grid as permutations of the m*m cells."""
    g = torch.arange(m * m).view(m, m)
    out = []
    for k in range(4):
        r = torch.rot90(g, k)
        out += [r.flatten(), r.flip(1).flatten()]
    return out


def _signature_start(a: Tensor, b: Tensor, rng: random.Random, noise: float) -> Tensor:
    """Greedy assignment of rows of ``a`` to rows of ``b`` by their sorted entries (a permutation-invariant
    signature: corner, edge and centre cells, and the channels, have different correlation profiles)."""
    n = a.shape[0]
    cost = torch.cdist(a.sort(1).values, b.sort(1).values)
    if noise:
        gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
        cost = cost + noise * torch.rand(cost.shape, generator=gen, dtype=cost.dtype)
    pi, used, left = [-1] * n, [False] * n, n
    for flat in cost.flatten().argsort().tolist():
        k, j = divmod(flat, n)
        if pi[k] < 0 and not used[j]:
            pi[k], used[j], left = j, True, left - 1
            if not left:
                break
    return torch.tensor(pi)


def _swap_gains(a: Tensor, b: Tensor, pi: Tensor) -> Tensor:
    """``gain[i, j]``: the change of ``sum a[k, l] * b[pi[k], pi[l]]`` when ``pi[i]`` and ``pi[j]`` swap."""
    ad = a.diagonal()
    bp = b[pi][:, pi]
    g = a @ bp  # g[i, j] = sum_l a[i, l] bp[j, l]
    gd, bd = g.diagonal(), bp.diagonal()
    d = g + g.T - gd[:, None] - gd[None, :]
    corr_i = (ad[:, None] - a.T) * (bp.T - bd[:, None])  # the l = i and l = j terms the sums miscount
    corr_j = (a - ad[None, :]) * (bd[None, :] - bp)
    return 2 * (d - corr_i - corr_j) + (ad[:, None] - ad[None, :]) * (bd[None, :] - bd[:, None])


def match_objective(a: Tensor, w: Tensor, b: Tensor, pi: Tensor, lin: Tensor | None = None) -> float:
    """``sum 2 a b_pi - w b_pi^2`` (``b_pi = b[pi][:, pi]``): ``-sum w (a - b_pi)^2`` up to a constant;
    plus ``sum_k lin[k, pi[k]]`` when a linear term is given."""
    bp = b[pi][:, pi]
    f = float((2 * a * bp - w * bp * bp).sum())
    return f + (float(lin[torch.arange(len(pi)), pi].sum()) if lin is not None else 0.0)


def _linear_gains(lin: Tensor, pi: Tensor) -> Tensor:
    """``gain[i, j]``: the change of ``sum_k lin[k, pi[k]]`` when ``pi[i]`` and ``pi[j]`` swap."""
    lp = lin[:, pi]  # lp[i, j] = lin[i, pi[j]]
    d = lp.diagonal()
    return lp + lp.T - d[:, None] - d[None, :]


def _ascend(a: Tensor, w: Tensor, b: Tensor, pi: Tensor, lin: Tensor | None = None) -> Tensor:
    """Steepest-ascent pairwise swaps for ``-sum w[k, l] (a[k, l] - b[pi[k], pi[l]])^2`` (up to a constant:
    ``2 a b_pi - w b_pi^2``) plus the optional linear term; ``w`` masks the pairs that were observed.
    All n^2 swap gains per step."""
    n = a.shape[0]
    b2 = b * b
    for _ in range(20 * n):
        gain = 2 * _swap_gains(a, b, pi) - _swap_gains(w, b2, pi)
        if lin is not None:
            gain = gain + _linear_gains(lin, pi)
        gain.fill_diagonal_(0)
        v, flat = gain.flatten().max(0)
        if float(v) <= 1e-9:
            break
        i, j = divmod(int(flat), n)
        pi = pi.clone()
        pi[i], pi[j] = pi[j].clone(), pi[i].clone()
    return pi


def match(
    a: Tensor,
    b: Tensor,
    restarts: int,
    rng: random.Random,
    observed: Tensor | None = None,
    *,
    kicks: int = 0,
    kick_size: int = 3,
    lin: Tensor | None = None,
) -> Tensor:
    """``pi`` minimising ``sum (a[k, l] - b[pi[k], pi[l]])^2`` over the ``observed`` rows/columns of ``a``
    (a quadratic assignment; symmetric ``a``, ``b``). Starts: the sorted-row signature (exact, then
    perturbed) and random permutations (which matter when only part of ``a`` is observed); each start is
    improved by steepest-ascent swaps. ``kicks`` > 0 then runs iterated local search from the best:
    ``kick_size`` random swaps, ascent, kept if the objective rises. ``lin[k, j]`` adds a reward for
    ``pi[k] = j`` (e.g. a constraint known from elsewhere)."""
    n = a.shape[0]
    obs = torch.ones(n, dtype=torch.float64) if observed is None else observed.to(torch.float64)
    w = obs[:, None] * obs[None, :]
    best, best_f = None, -float("inf")
    for r in range(max(1, restarts)):
        if r == 0:
            start = _signature_start(a, b, rng, 0.0)
        elif r % 2:
            start = _signature_start(a, b, rng, 0.05)
        else:
            start = torch.tensor(rng.sample(range(n), n))
        pi = _ascend(a, w, b, start, lin)
        f = match_objective(a, w, b, pi, lin)
        if f > best_f:
            best, best_f = pi, f
    assert best is not None
    for _ in range(kicks):
        pi = best.clone()
        for _ in range(kick_size):
            i, j = rng.sample(range(n), 2)
            pi[i], pi[j] = pi[j].clone(), pi[i].clone()
        pi = _ascend(a, w, b, pi, lin)
        f = match_objective(a, w, b, pi, lin)
        if f > best_f:
            best, best_f = pi, f
    return best
