"""Ciphertext-only attack: recover the key from transformed images and statistics of natural images.

The attacker sees only transformed images (plus, by the threat model, unlabelled plain images from
the same distribution and the stolen model). Neighbouring pixels of natural images, and the colour
channels of one pixel, are strongly positively correlated; the key's steps leave traces in the
correlations between the ``L`` block positions, measured over every block of every transformed image:

1. FFX positions hold codes above 255 (with overwhelming probability over a few thousand blocks).
2. negpos: a flipped position is negatively correlated with the others; the signs are read off the
   leading eigenvector of the correlation matrix (up to one global sign).
3. shuffle: after un-flipping, the ``C`` positions of one pixel are the most correlated: greedy
   grouping finds the pixels; each pixel's channels are labelled by matching the plain images'
   channel statistics (means and the three channel-pair correlations); the pixels are placed on the
   ``M x M`` grid by a local search that matches the group-to-group correlations to the plain images'
   spatial correlations (a quadratic assignment; its 8 symmetries of the square remain).
4. FFX tables: not derivable from correlations (a keyed bijection); each is estimated by matching
   the quantiles of the codes to the quantiles of the plain values of its source position.

The remaining ambiguity (global sign x 8 grid symmetries) is resolved with the stolen model: the
candidate whose predictions on unlabelled plain images are the most confident wins.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..data import ImageTensors
from ..functional import FFX_MAX, PIXEL_MAX, BlockPlan, compile_block_plan, to_blocks
from ..train import autocast
from ..transforms import KeyedTransform
from . import AttackReport, Target, accuracy
from .known_plaintext import key_agreement

__all__ = ["ciphertext_only_attack", "recover_key_ciphertext_only"]


def _corr(x: Tensor) -> Tensor:
    x = x - x.mean(0)
    cov = x.T @ x
    d = cov.diagonal().clamp_min(1e-12).sqrt()
    return cov / d[:, None] / d[None, :]


def _dihedral(m: int) -> list[Tensor]:
    """The 8 symmetries of the m x m grid as permutations of the m*m cells."""
    g = torch.arange(m * m).view(m, m)
    out = []
    for k in range(4):
        r = torch.rot90(g, k)
        out += [r.flatten(), r.flip(1).flatten()]
    return out


def _place(group_corr: Tensor, template: Tensor, restarts: int, rng: random.Random) -> Tensor:
    """Assign groups to grid cells maximising sum G[a, b] T[phi(a), phi(b)] (pairwise-swap local search)."""
    n = group_corr.shape[0]
    best_phi, best = None, -float("inf")
    for _ in range(restarts):
        phi = torch.tensor(rng.sample(range(n), n))
        score = float((group_corr * template[phi][:, phi]).sum())
        improved = True
        while improved:
            improved = False
            for a, b in itertools.combinations(range(n), 2):
                cand = phi.clone()
                cand[a], cand[b] = phi[b], phi[a]
                s = float((group_corr * template[cand][:, cand]).sum())
                if s > score + 1e-12:
                    phi, score, improved = cand, s, True
        if score > best:
            best_phi, best = phi, score
    assert best_phi is not None
    return best_phi


def _groups(r: Tensor, usable: list[int], size: int) -> list[list[int]]:
    """Greedy average-linkage grouping of positions into groups of ``size`` (the pixels)."""
    groups = [[k] for k in usable]
    while True:
        best, pair = -float("inf"), None
        for i, j in itertools.combinations(range(len(groups)), 2):
            if len(groups[i]) + len(groups[j]) > size:
                continue
            s = float(r[groups[i]][:, groups[j]].mean())
            if s > best:
                best, pair = s, (i, j)
        if pair is None:
            return groups
        i, j = pair
        groups[i] = groups[i] + groups[j]
        del groups[j]


def _quantile_table(codes: Tensor, values: Tensor) -> Tensor:
    """A 256-entry table mapping plain values to codes by matching quantiles."""
    v_sorted = values.double().sort().values
    c_sorted = codes.double().sort().values
    # quantile of each value 0..255 in the plain distribution, then the code at that quantile
    ranks = torch.searchsorted(v_sorted, torch.arange(256, dtype=torch.float64), right=True).double() / len(v_sorted)
    idx = (ranks.clamp(0, 1) * (len(c_sorted) - 1)).round().long()
    return c_sorted[idx].round().long()


def recover_key_ciphertext_only(
    codes: Tensor,
    plain: Tensor,
    block_size: int,
    recipe: tuple[str, ...] | list[str],
    *,
    score: Callable[[BlockPlan], float] | None = None,
    restarts: int = 8,
    seed: int = 0,
) -> tuple[BlockPlan, dict]:
    """A key estimated from transformed ``codes`` (``(N, C, H, W)`` integer) and unlabelled ``plain``
    uint8 images. ``score`` ranks the remaining candidates (e.g. the stolen model's confidence)."""
    c = codes.shape[1]
    m = block_size
    length = m * m * c
    q = to_blocks(codes.long(), m).reshape(-1, length).double()
    p = to_blocks(plain.long(), m).reshape(-1, length).double()
    rng = random.Random(seed)
    info: dict = {}

    ffx = (q > PIXEL_MAX).any(0) if "ffx" in recipe else torch.zeros(length, dtype=torch.bool)
    clear = [k for k in range(length) if not ffx[k]]
    info["ffx_positions"] = int(ffx.sum())

    sign = torch.ones(length, dtype=torch.float64)
    if "negpos" in recipe and len(clear) > 1:
        r = _corr(q[:, clear])
        v = torch.linalg.eigh(r).eigenvectors[:, -1]
        s = torch.where(v >= 0, 1.0, -1.0).double()
        s = s * (1.0 if s.sum() >= 0 else -1.0)  # majority unflipped; the global sign is a candidate below
        sign[clear] = s
    unflipped = torch.where(sign < 0, PIXEL_MAX - q, q)

    # src candidates: cell of the grid and channel for each clear output position
    cells_of_groups: list[list[int]] = []  # group -> output positions ordered by channel
    if "shuffle" in recipe and clear:
        rq = _corr(unflipped[:, clear])
        rq_full = torch.zeros(length, length, dtype=torch.float64)
        rq_full[torch.tensor(clear)[:, None], torch.tensor(clear)[None, :]] = rq
        groups = _groups(rq_full, clear, c)
        rp = _corr(p)
        # channel statistics of plain pixels: means and the pair correlations at one location
        ch_mean = p.mean(0).view(m * m, c).mean(0)
        ch_corr = torch.stack([rp[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(m * m)]).mean(0)
        q_mean = unflipped.mean(0)
        for g in groups:
            if len(g) != c:
                continue
            best, order = float("inf"), None
            for perm in itertools.permutations(range(c)):  # perm[i]: channel of g[i]
                e = sum(float((q_mean[g[i]] / 255 - ch_mean[perm[i]] / 255) ** 2) for i in range(c))
                e += sum(
                    float((rq_full[g[i], g[j]] - ch_corr[perm[i], perm[j]]) ** 2)
                    for i, j in itertools.combinations(range(c), 2)
                )
                if e < best:
                    best, order = e, perm
            assert order is not None
            by_channel = [0] * c
            for i, ch in enumerate(order):
                by_channel[ch] = g[i]
            cells_of_groups.append(by_channel)
        info["pixel_groups"] = len(cells_of_groups)
        # spatial template: plain correlation between cells, averaged over channels
        template = torch.stack([rp[ch::c, ch::c] for ch in range(c)]).mean(0)  # (m*m, m*m)
        n = len(cells_of_groups)
        gcorr = torch.zeros(n, n, dtype=torch.float64)
        for a, b in itertools.product(range(n), range(n)):
            if a != b:
                gcorr[a, b] = sum(rq_full[cells_of_groups[a][ch], cells_of_groups[b][ch]] for ch in range(c)) / c
        placement = _place(gcorr, template[:n, :n] if n < m * m else template, restarts, rng)

    def plan_for(cell_sym: Tensor | None, global_sign: float) -> BlockPlan:
        src = torch.full((length,), -1, dtype=torch.long)
        if "shuffle" in recipe and cells_of_groups:
            for gi, outs in enumerate(cells_of_groups):
                cell = int(placement[gi]) if cell_sym is None else int(cell_sym[placement[gi]])
                for ch, k in enumerate(outs):
                    src[k] = cell * c + ch
        elif "shuffle" not in recipe:
            src = torch.arange(length)
        free = [j for j in range(length) if j not in set(src.tolist())]
        for k in range(length):  # positions left (FFX, odd groups): the free sources in order
            if src[k] < 0:
                src[k] = free.pop(0)
        table = torch.arange(256).repeat(length, 1)
        domain = torch.full((length,), PIXEL_MAX)
        for k in range(length):
            if ffx[k]:
                table[k] = _quantile_table(q[:, k], p[:, int(src[k])])
                domain[k] = FFX_MAX
            elif sign[k] * global_sign < 0:
                table[k] = PIXEL_MAX - torch.arange(256)
        return BlockPlan(m, c, src, table, domain)

    syms: list[Tensor | None] = _dihedral(m) if ("shuffle" in recipe and cells_of_groups) else [None]
    signs = [1.0, -1.0] if "negpos" in recipe else [1.0]
    candidates = [plan_for(s, g) for s in syms for g in signs]
    info["candidates"] = len(candidates)
    if score is None or len(candidates) == 1:
        info["all_candidates"] = candidates
        return candidates[0], info
    scores = [score(plan) for plan in candidates]
    info["candidate_scores"] = scores
    info["all_candidates"] = candidates
    return candidates[max(range(len(scores)), key=scores.__getitem__)], info


def _confidence_scorer(target: Target, plain: ImageTensors) -> Callable[[BlockPlan], float]:
    """Mean max-softmax of the stolen model on unlabelled plain images seen through a candidate key."""
    x0 = plain.images.to(target.device)
    norm = target.normalize
    nt = norm.tensors(plain.image_shape, target.device) if norm is not None else None

    @torch.no_grad()
    def score(plan: BlockPlan) -> float:
        x = KeyedTransform(plan).to(target.device)(x0)
        if nt is not None:
            x = (x - nt[0]) / nt[1]
        with autocast(target.device, target.amp):
            logits = target.model.eval()(x).float()
        return float(logits.softmax(1).max(1).values.mean())

    return score


def ciphertext_only_attack(
    target: Target,
    train: ImageTensors,
    counts: list[int],
    *,
    plain_images: int = 512,
    seed: int = 0,
) -> AttackReport:
    """For each ``n`` in ``counts``: estimate the key from ``n`` transformed images (drawn from the
    evaluation images' distribution: ``train`` here), with ``plain_images`` unlabelled plain images."""
    t_start = time.perf_counter()
    key = target.key
    transform = KeyedTransform(key)
    true_plan = compile_block_plan(key)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g)
    plain = ImageTensors(train.images[order[:plain_images]], train.labels[order[:plain_images]], train.classes)
    score = _confidence_scorer(target, plain)
    rows = []
    for n in counts:
        t0 = time.perf_counter()
        cipher = transform.encode(train.images[order[plain_images : plain_images + n]])
        plan, info = recover_key_ciphertext_only(
            cipher, plain.images, key.block_size, key.recipe, score=score, seed=seed
        )
        best_possible = max(key_agreement(c, true_plan)["source_fraction"] for c in info["all_candidates"])
        rows.append(
            {
                "setting": f"{n} transformed images",
                "images": n,
                "attacker_accuracy": accuracy(target, KeyedTransform(plan)),
                **key_agreement(plan, true_plan),
                "best_candidate_source_fraction": best_possible,
                "recovery_seconds": time.perf_counter() - t0,
            }
        )
    return AttackReport(
        "ciphertext-only",
        target.meta["model"],
        key.fingerprint,
        list(key.recipe),
        accuracy(target, transform),
        accuracy(target, None),
        1 / len(target.meta["classes"]),
        rows,
        time.perf_counter() - t_start,
    )
