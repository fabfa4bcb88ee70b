"""Ciphertext-only attack: recover the key from transformed images and statistics of natural images.

The attacker sees only transformed images (plus, by the threat model, unlabelled plain images from
the same distribution and the stolen model). Neighbouring pixels of natural images, and the colour
channels of one pixel, are strongly positively correlated; the key's steps leave traces in the
correlations between the ``L`` block positions, measured over every block of every transformed image:

1. FFX positions hold codes above 255 (with overwhelming probability over a few thousand blocks).
2. negpos: a flipped position is negatively correlated with the others; the signs are read off the
   leading eigenvector of the correlation matrix (up to one global sign).
3. shuffle: after un-flipping, the correlation between output positions ``k`` and ``l`` estimates the
   plain images' correlation between ``src[k]`` and ``src[l]``; ``src`` is found by matching the two
   ``L x L`` matrices in least squares over the positions FFX left clear (a quadratic assignment:
   starts from each row's sorted correlations and random ones, steepest-ascent swaps). Natural
   images are nearly isotropic, so the 8 symmetries of the square grid remain as candidates.
4. FFX tables: not derivable from correlations (a keyed bijection); each is estimated by matching
   the quantiles of the codes to the quantiles of the plain values of its source position.

The remaining ambiguity (global sign x 8 grid symmetries) is resolved with the stolen model: the
candidate whose predictions on unlabelled plain images are the most confident wins.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import argtypes as at
from ..data import ImageTensors
from ..functional import FFX_MAX, PIXEL_MAX, BlockPlan, compile_block_plan, to_blocks
from ..runtime import autocast, normalise
from ..transforms import KeyedTransform
from . import AttackReport, Target, accuracy, check_counts, make_report
from .known_plaintext import key_agreement
from .matching import corr as _corr
from .matching import dihedral as _dihedral
from .matching import match as _match
from .registry import AttackData, AttackSpec, option, register_attack, seed_option

__all__ = ["CiphertextOnlySettings", "ciphertext_only_attack", "recover_key_ciphertext_only"]


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
    restarts: int = 24,
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

    src0 = torch.arange(length)
    if "shuffle" in recipe and clear:
        # E[corr(out k, out l)] = corr(in src[k], in src[l]): match the two correlation matrices
        rq = _corr(unflipped)
        ffx_idx = torch.nonzero(ffx).flatten()
        rq[ffx_idx, :] = 0
        rq[:, ffx_idx] = 0
        src0 = _match(rq, _corr(p), restarts, rng, observed=~ffx)

    def plan_for(cell_sym: Tensor | None, global_sign: float) -> BlockPlan:
        src = src0.clone()
        if cell_sym is not None:  # the same solution under a symmetry of the grid
            src = cell_sym[src // c] * c + src % c
        table = torch.arange(256).repeat(length, 1)
        domain = torch.full((length,), PIXEL_MAX)
        for k in range(length):
            if ffx[k]:
                table[k] = _quantile_table(q[:, k], p[:, int(src[k])])
                domain[k] = FFX_MAX
            elif sign[k] * global_sign < 0:
                table[k] = PIXEL_MAX - torch.arange(256)
        return BlockPlan(m, c, src, table, domain)

    syms: list[Tensor | None] = list(_dihedral(m)) if "shuffle" in recipe else [None]
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
        x = normalise(x, nt)
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
    at.COUNT.check_each("counts", counts)
    at.COUNT.check("plain_images", plain_images)
    at.SEED.check("seed", seed)
    t_start = time.perf_counter()
    key = target.keyset
    transform = KeyedTransform(key)
    true_plan = compile_block_plan(key)
    check_counts("--images", counts, len(train) - 1, "attack-pool images (one is kept as a plain image)")
    plain_images = min(plain_images, len(train) - max(counts))  # the plain images are the others
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
                "plain_images": plain_images,
                "attacker_accuracy": accuracy(target, KeyedTransform(plan)),
                **key_agreement(plan, true_plan),
                "best_candidate_source_fraction": best_possible,
                "recovery_seconds": time.perf_counter() - t0,
            }
        )
    return make_report(target, "ciphertext-only", rows, t_start)


@dataclass(frozen=True)
class CiphertextOnlySettings:
    images: list[int] = option([100, 1000], "transformed images seen", type=at.COUNT, nargs="+")
    seed: int = seed_option()


def _run(target: Target, data: AttackData, s: CiphertextOnlySettings) -> AttackReport:
    return ciphertext_only_attack(target, data.train, s.images, seed=s.seed)  # type: ignore[arg-type]


register_attack(
    AttackSpec("ciphertext-only", "the key from transformed images alone", CiphertextOnlySettings, _run, "images")
)
