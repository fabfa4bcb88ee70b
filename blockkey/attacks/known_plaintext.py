"""Known-plaintext attack: recover the key from (plain, transformed) image pairs.

Every block of every pair is one sample of the same map ``out[k] = table_k(in[src[k]])``. Output
position ``k`` can only come from input position ``j`` if the values seen at ``k`` are a one-to-one
function of the values seen at ``j`` across all blocks: the two columns induce the same partition
of the blocks. Columns are compared through a canonical relabelling (values renamed in order of first
appearance), so the test is exact and vectorised. For key sets without FFX the table must also be
the identity or ``255 - v``; with FFX, the table is read off the pairs for the values seen, and
unseen values take the code of the nearest seen value (so the recovered table is partial).

One CIFAR image gives 64 blocks at M=4: enough to pin most of a shuffle/negpos key; k pairs give
64 k blocks. The result is a :class:`~blockkey.functional.BlockPlan` usable as a key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import argtypes as at
from ..data import DataError, ImageTensors
from ..errors import ShapeError
from ..functional import FFX_MAX, PIXEL_MAX, BlockPlan, compile_block_plan, to_blocks
from ..transforms import KeyedTransform
from . import AttackReport, Target, accuracy, check_counts, make_report
from .registry import AttackData, AttackSpec, option, register_attack, seed_option

__all__ = ["KnownPlaintextSettings", "key_agreement", "known_plaintext_attack", "recover_key"]


def _canonical(cols: Tensor) -> Tensor:
    """``(B, L)`` integer columns -> each column's values renamed 0, 1, 2, ... by first appearance."""
    b, length = cols.shape
    out = torch.empty_like(cols)
    for k in range(length):  # L <= a few hundred; each step is vectorised over the blocks
        _, inv = torch.unique(cols[:, k], return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), b, dtype=torch.long).scatter_reduce(0, inv, torch.arange(b), "amin")
        rank = torch.argsort(torch.argsort(first))
        out[:, k] = rank[inv]
    return out


def recover_key(plain: Tensor, codes: Tensor, block_size: int, *, ffx: bool) -> tuple[BlockPlan, Tensor]:
    """A key consistent with every pair: ``plain`` uint8 ``(N, C, H, W)``, ``codes`` the transformed
    integer codes (``KeyedTransform.encode``). ``ffx``: whether the recipe has an FFX step
    (Kerckhoffs: the attacker knows the algorithm). Returns the plan and, per output position, how
    many input positions were consistent with it (1 = pinned down).
    """
    if plain.shape != codes.shape or plain.dim() != 4:
        raise ShapeError(
            f"plain and transformed images must have one shape (N, C, H, W); got {tuple(plain.shape)} "
            f"and {tuple(codes.shape)}"
        )
    c = plain.shape[1]
    length = block_size * block_size * c
    p = to_blocks(plain.long(), block_size).reshape(-1, length)
    q = to_blocks(codes.long(), block_size).reshape(-1, length)
    cp, cq = _canonical(p), _canonical(q)
    # consistent[k, j]: output k is a one-to-one function of input j over all blocks
    consistent = torch.stack([(cq[:, k : k + 1] == cp).all(0) for k in range(length)])
    ident = torch.stack([(q[:, k : k + 1] == p).all(0) for k in range(length)])
    neg = torch.stack([(q[:, k : k + 1] == PIXEL_MAX - p).all(0) for k in range(length)])
    if not ffx:
        consistent &= ident | neg
    candidates = consistent.sum(1)

    src = torch.full((length,), -1, dtype=torch.long)
    used = torch.zeros(length, dtype=torch.bool)
    for k in torch.argsort(candidates).tolist():  # most constrained first, then a free consistent input
        free = torch.nonzero(consistent[k] & ~used).flatten()
        if len(free) == 0:
            free = torch.nonzero(~used).flatten()  # inconsistent data (or ambiguity ran out): any free input
        j = int(free[0])
        src[k], used[j] = j, True

    table = torch.arange(256).repeat(length, 1)
    domain = torch.full((length,), PIXEL_MAX)
    values = torch.arange(256)
    for k in range(length):
        j = int(src[k])
        if neg[k, j] and not ident[k, j]:
            table[k] = PIXEL_MAX - values
        elif not ident[k, j] and not neg[k, j]:  # an FFX position: read the table off the pairs
            seen_in, idx = torch.unique(p[:, j], return_inverse=True)
            seen_out = torch.zeros_like(seen_in).scatter_(0, idx, q[:, k])
            nearest = (values[:, None] - seen_in[None, :]).abs().argmin(1)
            table[k] = seen_out[nearest]
            table[k, seen_in] = seen_out
            domain[k] = FFX_MAX
    return BlockPlan(block_size, c, src, table, domain), candidates


def key_agreement(recovered: BlockPlan, true: BlockPlan) -> dict[str, float]:
    """Shares of the true key recovered: positions with the right source, with the right source and the
    whole 256-entry table, and of all table entries (right source and right code)."""
    src_ok = recovered.src == true.src
    entries = (recovered.codes == true.codes) & src_ok[:, None]
    return {
        "source_fraction": float(src_ok.double().mean()),
        "position_fraction": float((entries.all(1)).double().mean()),
        "table_fraction": float(entries.double().mean()),
    }


def known_plaintext_attack(
    target: Target, pairs: list[int], data: ImageTensors | None = None, seed: int = 0
) -> AttackReport:
    """Recover the key from ``k`` (plain, transformed) pairs for each ``k`` in ``pairs``; report how much
    of the key came back and the stolen model's accuracy with the recovered key.

    Pairs are drawn (seeded) from ``data`` (default: the evaluation images, as an attacker who saw some
    inputs of the deployed model); accuracy is measured on the evaluation images.
    """
    at.COUNT.check_each("pairs", pairs)
    at.SEED.check("seed", seed)
    t_start = time.perf_counter()
    key = target.keyset
    true_plan = compile_block_plan(key)
    transform = KeyedTransform(key)
    source = data if data is not None else target.val
    if not isinstance(source, ImageTensors):
        raise DataError("known-plaintext pairs need the images in memory, not a streamed folder")
    check_counts("--pairs", pairs, len(source), "evaluation images" if data is None else "attack-pool images")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source), generator=g)
    rows = []
    for k in pairs:
        t0 = time.perf_counter()
        plain = source.images[order[:k]]
        codes = transform.encode(plain)
        plan, cand = recover_key(plain, codes, key.block_size, ffx="ffx" in key.recipe)
        rec_seconds = time.perf_counter() - t0
        agree = key_agreement(plan, true_plan)
        rows.append(
            {
                "setting": f"{k} pair{'s' if k != 1 else ''}",
                "pairs": k,
                "attacker_accuracy": accuracy(target, KeyedTransform(plan)),
                **agree,
                "pinned_fraction": float((cand == 1).double().mean()),
                "recovery_seconds": rec_seconds,
            }
        )
    return make_report(target, "known-plaintext", rows, t_start)


@dataclass(frozen=True)
class KnownPlaintextSettings:
    pairs: list[int] = option([1, 2, 4], "pairs per try", type=at.COUNT, nargs="+")
    pairs_from: str = option(
        "eval", "draw the pairs from the evaluation images or the attack pool", choices=("eval", "train")
    )
    seed: int = seed_option()


def _run(target: Target, data: AttackData, s: KnownPlaintextSettings) -> AttackReport:
    source = data.train if s.pairs_from == "train" else None
    return known_plaintext_attack(target, s.pairs, data=source, seed=s.seed)  # type: ignore[arg-type]


register_attack(
    AttackSpec(
        "known-plaintext", "the key from (plain, transformed) image pairs", KnownPlaintextSettings, _run, "pairs"
    )
)
