"""Weights-only attack: read the key out of a block-aligned model's patch embedding, with no data of the victim.

In a block-aligned model (kernel = stride = M) a shuffle/negpos key is folded into the first layer:
``W_key[:, k] = s_k W[:, src[k]]`` (:mod:`blockkey.rekey`). A plain-trained embedding has structure
across its columns (the three channels of one pixel, and neighbouring pixels, have strongly related
filters), so the correlation matrix of the stolen columns is a relabelled copy of a plain model's:

1. FFX positions: the network learns to ignore them, so their columns are an order of magnitude
   shorter; split by the largest gap in the sorted log column norms. Their tables do not matter.
2. shuffle: ``|corr|`` of the stolen columns is matched to a reference ``|corr|`` over plain positions
   (a quadratic assignment, :func:`~blockkey.attacks.matching.match`), hierarchically: the columns are
   grouped into pixels (the channels of one pixel correlate most), the groups are placed on the grid by a
   16-cell assignment, channels are labelled consistently across neighbouring pixels (up to one global
   channel order, tried all 6), and pairwise swaps refine the whole. The better (by the matching
   objective) of this and a flat 48-position match is kept. The reference is either a plain model the
   thief trained himself (its embedding's column correlations) or, with no training at all, the partial
   correlations of unlabelled plain images (a trained embedding's column correlations follow them closely).
3. negpos: the signs maximise the agreement of the sign-corrected correlations with the reference (the
   leading eigenvector of ``corr_stolen * corr_ref[src][:, src]``; one global sign left), or, when the
   model's per-position normalisation statistics are used (they ship with the model: the thief has them),
   a flipped position's mean is ``1 - mean`` of its source: compared with unlabelled plain images' means.
4. What the structure cannot tell (the 8 symmetries of the grid, the global sign) is decided by the
   stolen model's confidence on unlabelled plain images.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import argtypes as at
from ..data import ImageTensors
from ..errors import BlockkeyError
from ..functional import PIXEL_MAX, BlockPlan, compile_block_plan, to_blocks
from ..models import patch_embedding
from ..transforms import KeyedTransform
from . import AttackReport, Target, accuracy, make_report
from .ciphertext_only import _confidence_scorer
from .known_plaintext import key_agreement
from .matching import _ascend, corr, dihedral, match, match_objective
from .registry import AttackData, AttackSpec, option, register_attack, seed_option

__all__ = [
    "WeightsOnlySettings",
    "embedding_columns",
    "image_reference",
    "load_reference",
    "model_reference",
    "recover_key_weights_only",
    "weights_only_attack",
]


def embedding_columns(model: nn.Module, block_size: int) -> Tensor:
    """The patch embedding of ``model`` as an ``(out, L)`` float64 matrix, columns in (row, col, channel) order."""
    conv = patch_embedding(model)
    if conv is None or tuple(conv.kernel_size) != (block_size, block_size) or tuple(conv.stride) != conv.kernel_size:
        raise BlockkeyError(
            f"{type(model).__name__} has no patch embedding with kernel = stride = {block_size}: the weights-only "
            "attack needs a block-aligned model (patchnet, convmixer, vit)"
        )
    return to_blocks(conv.weight.detach().to("cpu", torch.float64), block_size)[:, 0, 0, :]


def _unit(g: Tensor) -> Tensor:
    d = g.diagonal().abs().clamp_min(1e-12).sqrt()
    return g / d[:, None] / d[None, :]


def model_reference(model: nn.Module, block_size: int) -> Tensor:
    """The reference structure from a plain model the thief trained: correlations of its embedding's columns."""
    w = embedding_columns(model, block_size)
    return _unit(w.T @ w)


def image_reference(plain: Tensor, block_size: int, ridge: float = 0.01) -> Tensor:
    """The reference structure with no training: partial correlations of the block positions of unlabelled
    plain uint8 images (``-`` the normalised inverse of their ridge-regularised correlation matrix)."""
    length = block_size * block_size * plain.shape[1]
    r = corr(to_blocks(plain.long(), block_size).reshape(-1, length).double())
    p = -_unit(torch.linalg.inv(r + ridge * torch.eye(length, dtype=r.dtype)))
    return p.fill_diagonal_(1.0)


def ffx_positions(w: Tensor) -> Tensor:
    """Positions whose columns are much shorter than the rest (the network ignores FFX'd positions):
    the split at the largest gap of the sorted log column norms."""
    norms = w.norm(dim=0).clamp_min(1e-12).log()
    s, order = norms.sort()
    gaps = s[1:] - s[:-1]
    cut = int(gaps.argmax())
    out = torch.zeros(len(s), dtype=torch.bool)
    out[order[: cut + 1]] = True
    return out


def _pixel_groups(a: Tensor, clear: Tensor, c: int, chan: Tensor | None = None) -> list[list[int]]:
    """Greedy partition of the clear positions into groups of at most ``c`` (one pixel's channels),
    joining the most correlated pairs first (never two of one channel when ``chan`` labels are known)."""
    idx = torch.nonzero(clear).flatten().tolist()
    n_groups = -(-len(idx) // c)
    sub = a[idx][:, idx]
    iu = torch.triu_indices(len(idx), len(idx), 1)
    order = sub[iu[0], iu[1]].argsort(descending=True)
    group_of: dict[int, int] = {}
    groups: list[list[int]] = []
    for t in order.tolist():
        k, j = idx[int(iu[0, t])], idx[int(iu[1, t])]
        gk, gj = group_of.get(k), group_of.get(j)
        if chan is not None and (
            chan[k] == chan[j]
            or (gj is not None and any(chan[x] == chan[k] for x in groups[gj]))
            or (gk is not None and any(chan[x] == chan[j] for x in groups[gk]))
        ):
            continue
        if gk is None and gj is None and len(groups) < n_groups:
            groups.append([k, j])
            group_of[k] = group_of[j] = len(groups) - 1
        elif gk is None and gj is not None and len(groups[gj]) < c:
            groups[gj].append(k)
            group_of[k] = gj
        elif gj is None and gk is not None and len(groups[gk]) < c:
            groups[gk].append(j)
            group_of[j] = gk
    groups += [[k] for k in idx if k not in group_of]
    return groups


def _consistent_channels(a: Tensor, groups: list[list[int]], link: Tensor) -> list[list[int]]:
    """Reorder each group's members so that equal indices are the same channel: grown along the strongest
    links between groups, each new group ordered to maximise same-index correlation with its neighbour."""
    done = {int(link.sum(1).argmax())}
    out = {i: list(g) for i, g in enumerate(groups)}
    while len(done) < len(groups):
        rest = [j for j in range(len(groups)) if j not in done]
        sub = link[list(done)][:, rest]
        flat = int(sub.argmax())
        g, h = list(done)[flat // len(rest)], rest[flat % len(rest)]
        ref, mem = out[g], out[h]
        best = max(
            itertools.permutations(mem),
            key=lambda p: sum(float(a[ref[i], p[i]]) for i in range(min(len(ref), len(p)))),
        )
        out[h] = list(best)
        done.add(h)
    return [out[i] for i in range(len(groups))]


def _hierarchical_match(
    a: Tensor, b: Tensor, clear: Tensor, c: int, rng: random.Random, restarts: int, chan: Tensor | None
) -> Tensor | None:
    """Pixels first (groups of ``c`` positions), then the channels inside each; None when the greedy
    grouping leaves more groups than the block has pixels (the flat match stands alone then)."""
    length = a.shape[0]
    cells = length // c
    groups = _pixel_groups(a, clear, c, chan)
    if len(groups) > cells:
        return None
    link = torch.zeros(cells, cells, dtype=a.dtype)
    for i, gi in enumerate(groups):
        for j, gj in enumerate(groups):
            if i != j:
                link[i, j] = a[gi][:, gj].mean()
    ref = b.view(cells, c, cells, c).mean((1, 3)).clone().fill_diagonal_(0)
    observed = torch.arange(cells) < len(groups)
    cell = match(link, ref, restarts, rng, observed=observed, kicks=restarts)
    lin = _channel_bonus(a, chan, c)
    if chan is None:
        groups = _consistent_channels(a, groups, link[: len(groups), : len(groups)])
        orders = list(itertools.permutations(range(c)))  # the one channel order consistency leaves open
    else:
        orders = [()]
    w = (clear[:, None] & clear[None, :]).to(a.dtype)
    best, best_f = None, -float("inf")
    for order in orders:
        src = torch.full((length,), -1, dtype=torch.long)
        for i, g in enumerate(groups):
            for ch, k in enumerate(g):
                src[k] = int(cell[i]) * c + (order[ch] if chan is None else int(chan[k]))
        free = [j for j in range(length) if j not in set(src.tolist())]
        src[src < 0] = torch.tensor(free[: int((src < 0).sum())], dtype=torch.long)
        src = _ascend(a * w, w, b, src, lin)
        f = match_objective(a * w, w, b, src, lin)
        if f > best_f:
            best, best_f = src, f
    assert best is not None
    return best


def _channel_bonus(a: Tensor, chan: Tensor | None, c: int) -> Tensor | None:
    """A linear term that keeps each position on its known channel (outweighs any quadratic change)."""
    if chan is None:
        return None
    agree = chan[:, None] == (torch.arange(a.shape[0]) % c)[None, :]
    return torch.where(agree, 0.0, -4 * float(a.abs().sum()) - 1).to(a.dtype) * (chan >= 0)[:, None]


def _match_positions(
    a: Tensor, b: Tensor, clear: Tensor, c: int, rng: random.Random, restarts: int, chan: Tensor | None = None
) -> Tensor:
    """The better (matching objective) of the hierarchical and the flat match of ``a`` to ``b``; ``chan``:
    each position's channel where known (-1 elsewhere)."""
    w = (clear[:, None] & clear[None, :]).to(a.dtype)
    lin = _channel_bonus(a, chan, c)
    flat = match(a * w, b, restarts, rng, observed=clear, lin=lin)
    candidates = [flat]
    if c > 1 and int(clear.sum()) > c:
        grouped = _hierarchical_match(a, b, clear, c, rng, restarts, chan)
        candidates += [grouped] if grouped is not None else []
    return max(candidates, key=lambda s: match_objective(a * w, w, b, s, lin))


def _spectral_signs(g: Tensor, ref: Tensor, src: Tensor, clear: Tensor) -> Tensor:
    """Signs ``s`` maximising ``sum s_k s_l g[k, l] ref[src k, src l]`` over the clear positions (leading
    eigenvector, then single flips while they help); the majority positive, the global sign is left open."""
    m = g * ref[src][:, src] * (clear[:, None] & clear[None, :])
    s = torch.where(torch.linalg.eigh(m).eigenvectors[:, -1] >= 0, 1.0, -1.0).double()
    for _ in range(4 * len(s)):
        gain = -4 * s * (m @ s - m.diagonal() * s)  # change of s^T m s when s_k flips
        k = int(gain.argmax())
        if float(gain[k]) <= 1e-12:
            break
        s[k] = -s[k]
    s[~clear] = 1.0
    return s if s[clear].sum() >= 0 else torch.where(clear, -s, s)


def stats_signs_channels(stats: tuple[Tensor, Tensor, Tensor, Tensor], c: int) -> tuple[Tensor, Tensor]:
    """Each position's sign and channel from the model's per-position normalisation statistics (mean, std on
    [0, 1]; a flipped position has mean ``1 - mean`` of its source and the same std) against plain images'
    per-channel statistics: the nearest of the ``2 c`` (sign, channel) predictions."""
    mean, std, plain_mean, plain_std = stats
    mu = plain_mean.view(-1, c).mean(0)
    sd = plain_std.view(-1, c).mean(0)
    pred_mean = torch.cat([mu, 1 - mu])  # (2c,): unflipped channels, then flipped
    pred_std = torch.cat([sd, sd])
    d = (mean[:, None] - pred_mean[None, :]) ** 2 + (std[:, None] - pred_std[None, :]) ** 2
    best = d.argmin(1)
    return torch.where(best >= c, -1.0, 1.0).double(), best % c


def recover_key_weights_only(
    weight: Tensor,
    block_size: int,
    channels: int,
    recipe: tuple[str, ...] | list[str],
    reference: Tensor,
    *,
    stats: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    score: Callable[[BlockPlan], float] | None = None,
    restarts: int = 32,
    seed: int = 0,
) -> tuple[BlockPlan, dict[str, Any]]:
    """A key estimated from the stolen patch embedding ``weight`` (``(out, L)``, :func:`embedding_columns`)
    and a ``reference`` ``(L, L)`` structure (:func:`model_reference` or :func:`image_reference`).
    ``stats``: (the model's per-position means and stds, plain images' per-position means and stds), all
    on [0, 1], to read signs and channels from the normalisation statistics (:func:`stats_signs_channels`).
    ``score`` ranks the remaining candidates."""
    c, length = channels, weight.shape[1]
    rng = random.Random(seed)
    info: dict[str, Any] = {}
    clear = ~ffx_positions(weight) if "ffx" in recipe else torch.ones(length, dtype=torch.bool)
    info["ffx_positions"] = int((~clear).sum())
    g = _unit(weight.T @ weight)
    stat_sign, chan = stats_signs_channels(stats, c) if stats is not None else (None, None)
    if chan is not None:
        chan = torch.where(clear, chan, -1)
    src0 = torch.arange(length)
    if "shuffle" in recipe:
        src0 = _match_positions(g.abs(), reference.abs(), clear, c, rng, restarts, chan)

    def variant(cell_sym: Tensor | None) -> Tensor:
        return src0 if cell_sym is None else cell_sym[src0 // c] * c + src0 % c

    syms: list[Tensor | None] = list(dihedral(block_size)) if "shuffle" in recipe else [None]
    candidates = []
    for sym in syms:
        src = variant(sym)
        if "negpos" not in recipe:
            sign_options = [torch.ones(length, dtype=torch.float64)]
        elif stat_sign is not None:
            sign_options = [torch.where(clear, stat_sign, 1.0)]
        else:
            s = _spectral_signs(g, reference, src, clear)
            sign_options = [s, torch.where(clear, -s, s)]
        for sign in sign_options:
            table = torch.arange(256).repeat(length, 1)
            table[sign < 0] = PIXEL_MAX - torch.arange(256)
            candidates.append(BlockPlan(block_size, c, src.clone(), table, torch.full((length,), PIXEL_MAX)))
    info["candidates"] = len(candidates)
    info["all_candidates"] = candidates
    info["clear"] = clear
    if score is None or len(candidates) == 1:
        return candidates[0], info
    scores = [score(p) for p in candidates]
    info["candidate_scores"] = scores
    return candidates[max(range(len(scores)), key=scores.__getitem__)], info


def _clear_agreement(plan: BlockPlan, true: BlockPlan) -> dict[str, float]:
    """Shares over the positions the key leaves clear (the ones the network reads): right source, right sign."""
    clear = true.domain == PIXEL_MAX
    src_ok = (plan.src == true.src)[clear]
    sign_ok = (plan.codes[:, 0] == true.codes[:, 0])[clear]
    return {
        "clear_source_fraction": float(src_ok.double().mean()),
        "clear_sign_fraction": float(sign_ok.double().mean()),
    }


def weights_only_attack(
    target: Target,
    train: ImageTensors,
    *,
    reference_model: nn.Module | None = None,
    reference_name: str = "plain model",
    plain_images: int = 256,
    stats_images: int = 5000,
    restarts: int = 32,
    seed: int = 0,
) -> AttackReport:
    """The key from the stolen weights alone, against each reference (plain images' partial correlations;
    ``reference_model``, a plain model the thief trained, when given) with and without the normalisation
    statistics (signs and channels; ``stats_images`` unlabelled plain images give the plain statistics).
    ``plain_images`` unlabelled plain images (from ``train``) build the image reference and decide the
    grid's symmetries by the stolen model's confidence."""
    t_start = time.perf_counter()
    for name, n in (("plain_images", plain_images), ("stats_images", stats_images), ("restarts", restarts)):
        at.COUNT.check(name, n)
    at.SEED.check("seed", seed)
    key = target.keyset
    m, c = key.block_size, key.channels
    true_plan = compile_block_plan(key)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    plain = ImageTensors(train.images[order[:plain_images]], train.labels[order[:plain_images]], train.classes)
    score = _confidence_scorer(target, plain)
    weight = embedding_columns(target.model, m)
    length = m * m * c
    model_stats = target.normalize.per_position(m, c) if target.normalize is not None else None
    pool = to_blocks(train.images[order[:stats_images]].long(), m).reshape(-1, length).double() / PIXEL_MAX
    plain_stats = (pool.mean(0), pool.std(0))
    refs = [("plain images (no training)", image_reference(plain.images, m))]
    if reference_model is not None:
        ref = model_reference(reference_model, m)
        if ref.shape != (m * m * c, m * m * c):
            raise BlockkeyError(
                f"the reference model's patch embedding reads {ref.shape[0]} values per block; the key has {m * m * c}"
            )
        refs.append((reference_name, ref))
    stats_options: list[bool] = [False] + ([True] if model_stats is not None else [])
    rows = []
    for ref_name, ref in refs:
        for use_stats in stats_options:
            t0 = time.perf_counter()
            stats = (*model_stats, *plain_stats) if use_stats and model_stats is not None else None
            plan, info = recover_key_weights_only(
                weight, m, c, key.recipe, ref, stats=stats, score=score, restarts=restarts, seed=seed
            )
            seconds = time.perf_counter() - t0
            best = max(_clear_agreement(p, true_plan)["clear_source_fraction"] for p in info["all_candidates"])
            rows.append(
                {
                    "setting": f"reference: {ref_name}" + (", normalisation statistics" if use_stats else ""),
                    "attacker_accuracy": accuracy(target, KeyedTransform(plan)),
                    **key_agreement(plan, true_plan),
                    **_clear_agreement(plan, true_plan),
                    "best_candidate_clear_source_fraction": best,
                    "ffx_positions_found": info["ffx_positions"],
                    "ffx_positions_right": bool((~info["clear"] == (true_plan.domain != PIXEL_MAX)).all()),
                    "recovery_seconds": seconds,
                }
            )
    return make_report(target, "weights-only", rows, t_start)


@dataclass(frozen=True)
class WeightsOnlySettings:
    reference: str | None = option(
        None, "a plain model the attacker trained (same patch size)", type=at.path_name, metavar="RUN_DIR"
    )
    seed: int = seed_option()
    #: Library use: a reference model already in memory (and its name in the report), instead of ``reference``.
    reference_model: nn.Module | None = None
    reference_name: str | None = None


def load_reference(run_dir: str | os.PathLike[str]) -> nn.Module:
    """The thief's own plain model (``--reference``) for the weights-only matchers; refuses a protected one."""
    from ..checkpoint import load_model

    ref, ref_meta = load_model(run_dir)
    if ref_meta.get("key") is not None:
        raise BlockkeyError(f"--reference {run_dir} is protected; the reference must be a plain model")
    return ref


def _run(target: Target, data: AttackData, s: WeightsOnlySettings) -> AttackReport:
    ref, name = s.reference_model, s.reference_name
    if ref is None and s.reference:
        ref = load_reference(s.reference)
    name = name or f"plain model {s.reference}"
    return weights_only_attack(target, data.train, reference_model=ref, reference_name=name, seed=s.seed)  # type: ignore[arg-type]


register_attack(AttackSpec("weights-only", "the key from the stolen weights alone", WeightsOnlySettings, _run))
