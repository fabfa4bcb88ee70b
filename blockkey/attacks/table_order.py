"""Table-order attack: read FFX's code order off a shared value table (issue 11, defence C), no data of the victim.

With FFX on every position and one password, every block position uses the same code table ``E``, so a
table stem can share one value table across positions (``tablenet(shared=True)``): row ``E(u)`` holds what
the network learnt for the (post-negpos) value ``u``. If that embedding varies smoothly with ``u``, the
rows of the 256 codes in use lie on a curve, and ordering them along it gives ``E^-1`` up to a reversal
(which negpos cannot tell from a global sign flip anyway):

1. The codes in use: rows of the 744 unused codes never receive a gradient. When the run's init seed is
   known (``meta.json`` records it; the thief re-creates the init), the learnt part of each row is
   ``row - c * init`` (``c``: the weight-decay shrinkage, fitted on all rows) and the unused rows' learnt part
   is 0: the 256 largest are the codes in use. Without the seed, the 256 rows of largest norm.
2. The order: a spectral ordering (the Fiedler vector of a Gaussian k-nearest-neighbour graph of the
   rows) refined by 2-opt moves that shorten the path through them; rank ``r`` is the estimate of ``u``.
3. With the codes ordered, the stem is an embedding of the value ``u`` at each position; its slope in
   ``u`` per position (the mix's column block times the rows' slope) is a linear patch embedding keyed by
   shuffle and negpos, ``W[:, k] = s_k W_plain[:, src k]``: the weights-only matcher
   (:mod:`~blockkey.attacks.weights_only`) recovers those against plain images' partial correlations or a
   plain model the thief trained, and the stolen model's confidence on unlabelled plain images settles
   the grid's symmetries and the global sign.

The result is a compiled key (:class:`~blockkey.functional.BlockPlan`, every position's source and 256
codes), usable as a key; :func:`plain_input_model` folds the order (and shuffle) into the stolen model so
that it reads plain images: the start of a fine-tuning attack with labelled data (:func:`table_order_finetune`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import argtypes as at
from ..data import ImageTensors
from ..errors import BlockkeyError
from ..functional import FFX_MAX, PIXEL_MAX, BlockPlan, compile_block_plan
from ..inner import stored_state_dict
from ..keys import FFX, KeySet, ffx_table
from ..meta import RunMeta
from ..models import TableEmbed, create_model
from ..transforms import KeyedTransform
from . import AttackReport, Target, accuracy, make_report
from .ciphertext_only import _confidence_scorer
from .registry import AttackData, AttackSpec, option, register_attack, seed_option
from .weights_only import embedding_columns, image_reference, load_reference, recover_key_weights_only

__all__ = [
    "TableOrderSettings",
    "effective_columns",
    "learned_rows",
    "order_agreement",
    "order_rows",
    "plain_input_model",
    "recover_key_table_order",
    "shared_table",
    "table_order_attack",
    "table_order_finetune",
]

VALUES = PIXEL_MAX + 1


def shared_table(model: nn.Module) -> TableEmbed:
    """The shared value table stem of ``model`` (``tablenet(shared=True)``)."""
    stem = getattr(model, "patch_embed", None)
    if not isinstance(stem, TableEmbed) or not stem.shared:
        raise BlockkeyError(
            f"{type(model).__name__} has no shared value table: table-order attacks tablenet(shared=True) models"
        )
    return stem


def _rows(stem: TableEmbed) -> Tensor:
    return stem.table.weight.detach().to("cpu", torch.float64) * stem.gain


def init_rows(meta: Mapping[str, Any]) -> Tensor | None:
    """The table as initialised, re-created from the run's recorded seed (None when it records none)."""
    seed = meta.get("config", {}).get("seed")
    if seed is None:
        return None
    kwargs = {k: v for k, v in meta.get("model_kwargs", {}).items() if k != "pretrained"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(meta["model"], len(meta["classes"]), meta["image_shape"][0], **kwargs)
    return _rows(shared_table(model))


def learned_rows(rows: Tensor, init: Tensor | None, used: int = VALUES) -> Tensor:
    """What training added to each row: ``rows - c * init``, the shrinkage ``c`` (weight decay shrinks every
    row, trained or not) fitted on all rows, then again on the rows that moved least (all but the ``used``
    that moved most: there the fit is exact); ``rows`` itself when the init is unknown."""
    if init is None:
        return rows
    keep = torch.ones(len(rows), dtype=torch.bool)
    for _ in range(2):
        c = float((rows[keep] * init[keep]).sum() / (init[keep] * init[keep]).sum())
        learned = rows - c * init
        keep = torch.ones(len(rows), dtype=torch.bool)
        keep[learned.norm(dim=1).topk(min(used, len(rows) - 1)).indices] = False
    return learned


def _two_opt(d: np.ndarray, order: np.ndarray, rounds: int = 100) -> np.ndarray:
    """Shorten the open path ``order`` through the points (distances ``d``) by segment reversals."""
    order = order.copy()
    n = len(order)
    for _ in range(rounds):
        improved = False
        for i in range(n - 1):
            a = order[i - 1] if i > 0 else -1
            b = order[i]
            cs = order[i + 1 :]
            es = np.append(order[i + 2 :], -1)
            old = (d[a, b] if a >= 0 else 0.0) + np.where(es >= 0, d[cs, np.maximum(es, 0)], 0.0)
            new = (d[a, cs] if a >= 0 else 0.0) + np.where(es >= 0, d[b, np.maximum(es, 0)], 0.0)
            gain = old - new
            j = int(gain.argmax())
            if gain[j] > 1e-12:
                order[i : i + j + 2] = order[i : i + j + 2][::-1].copy()
                improved = True
        if not improved:
            break
    return order


def order_rows(x: Tensor, neighbours: int = 8) -> Tensor:
    """An order of the rows of ``x`` along the curve they lie on: the Fiedler vector of a Gaussian
    k-nearest-neighbour graph, then 2-opt on the path length. Returns row indices, one end to the other."""
    xd = x.double()
    d = torch.cdist(xd, xd)
    n = len(xd)
    k = min(neighbours, n - 1)
    knn = d.topk(k + 1, largest=False).values[:, -1]
    sigma = float(knn.median().clamp_min(1e-12))
    w = torch.exp(-(d**2) / (2 * sigma**2))
    near = d <= knn[:, None]
    w = w * (near | near.T)
    w.fill_diagonal_(0)
    deg = w.sum(1).clamp_min(1e-12)
    lap = torch.eye(n, dtype=xd.dtype) - w / deg.sqrt()[:, None] / deg.sqrt()[None, :]
    fiedler = torch.linalg.eigh(lap).eigenvectors[:, 1] / deg.sqrt()
    start = fiedler.argsort().numpy()
    return torch.from_numpy(_two_opt(d.numpy(), start))


def effective_columns(stem: TableEmbed, rows: Tensor, codes_by_value: Tensor) -> Tensor:
    """The stem as a linear patch embedding ``(dim, L)``: per position, the mix's column block times the
    slope of the rows of ``codes_by_value`` (the code of value 0, 1, ..., 255) in the value."""
    x = rows[codes_by_value]
    v = torch.arange(len(codes_by_value), dtype=x.dtype)
    vc = v - v.mean()
    slope = (x - x.mean(0)).T @ vc / (vc @ vc)  # (d,)
    mix = stem.mix.weight.detach().to("cpu", torch.float64).view(-1, stem.length, stem.value_dim)
    return mix @ slope


def _plain_codes(n: int = VALUES) -> Tensor:
    """The table rows a clear value reads (``round(999 v / 255)``, :class:`TableEmbed`)."""
    return torch.round(torch.arange(n, dtype=torch.float64) * FFX_MAX / PIXEL_MAX).long()


def reference_columns(model: nn.Module, block_size: int) -> Tensor:
    """A plain model's embedding columns: a patch embedding's, or a plain shared table's linearised."""
    stem = getattr(model, "patch_embed", None)
    if isinstance(stem, TableEmbed):
        return effective_columns(shared_table(model), _rows(stem), _plain_codes())
    return embedding_columns(model, block_size)


def _compose(plan: BlockPlan, codes_by_value: Tensor) -> BlockPlan:
    """``plan`` (shuffle and signs on values) followed by the code table ``codes_by_value``."""
    length = len(plan.src)
    return BlockPlan(
        plan.block_size, plan.channels, plan.src, codes_by_value[plan.codes], torch.full((length,), FFX_MAX)
    )


def recover_key_table_order(
    model: nn.Module,
    meta: Mapping[str, Any],
    recipe: tuple[str, ...] | list[str],
    reference: Tensor,
    *,
    use_init: bool = True,
    score: Any = None,
    seed: int = 0,
) -> tuple[BlockPlan, dict[str, Any]]:
    """A key for ``model`` from its weights: the code order of the shared table, then the shuffle and signs
    from the linearised stem against ``reference`` (``(L, L)`` structure, e.g. :func:`image_reference`)."""
    stem = shared_table(model)
    rows = _rows(stem)
    init = init_rows(meta) if use_init else None
    learned = learned_rows(rows, init)
    used = learned.norm(dim=1).topk(VALUES).indices
    order = order_rows(learned[used])
    codes_by_value = used[order]
    info: dict[str, Any] = {"init_known": init is not None, "codes_by_value": codes_by_value}
    w = effective_columns(stem, learned, codes_by_value)
    m = stem.patch
    c = stem.length // (m * m)
    steps = tuple(s for s in recipe if s in ("shuffle", "negpos"))
    _, sub = recover_key_weights_only(w, m, c, steps, reference, score=None, seed=seed)
    candidates = [_compose(p, codes_by_value) for p in sub["all_candidates"]]
    if "negpos" not in steps:  # with negpos, its global sign is the order's direction; else try both
        candidates += [replace(p, codes=p.codes.flip(1)) for p in candidates]
    info["all_candidates"] = candidates
    if score is None:
        return candidates[0], info
    scores = [score(p) for p in candidates]
    info["candidate_scores"] = scores
    return candidates[max(range(len(scores)), key=scores.__getitem__)], info


def order_agreement(codes_by_value: Tensor, true_codes: Tensor) -> dict[str, float]:
    """How well ``codes_by_value`` (recovered) matches ``true_codes`` (``E(0..255)``), either direction:
    share of the codes in use found, Spearman correlation of the ranks, share of exact values, mean error."""
    true_value = torch.full((FFX_MAX + 1,), -1, dtype=torch.long)
    true_value[true_codes] = torch.arange(VALUES)
    found = true_value[codes_by_value]
    ok = found >= 0
    ranks = torch.arange(VALUES)
    best = {"exact": 0.0, "error": float("inf")}
    for est in (ranks, PIXEL_MAX - ranks):
        best["exact"] = max(best["exact"], float((est == found)[ok].double().mean()) if ok.any() else 0.0)
        best["error"] = min(best["error"], float((est - found)[ok].abs().double().mean()) if ok.any() else 255.0)
    rho = 0.0
    if int(ok.sum()) > 2:
        a = ranks[ok].double()
        b = found[ok].argsort().argsort().double()
        a = a.argsort().argsort().double()
        rho = abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    return {
        "codes_in_use_found": float(ok.double().mean()),
        "order_spearman": rho,
        "order_exact_fraction": best["exact"],
        "order_mean_error": best["error"],
    }


def plain_input_model(
    model: nn.Module, meta: Mapping[str, Any], codes_by_value: Tensor, src: Tensor | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Fold a recovered code order (and, when given, a recovered shuffle ``src``) into ``model``: the same
    shared tablenet, reading plain images: row ``bin(v)`` = the stolen row of code ``codes_by_value[v]``, mix
    column block ``src k`` = the stolen block ``k``; and its run metadata (no key). Exact when the key has
    no negpos: ``new(x) == model(key(x))`` for the true order and shuffle. Negpos is left to fine-tuning
    (a shared table cannot flip single positions)."""
    stem = shared_table(model)
    new = create_model(meta["model"], len(meta["classes"]), meta["image_shape"][0], **meta.get("model_kwargs", {}))
    new.load_state_dict(stored_state_dict(model))  # the stolen weights, whatever key the model runs now
    ns = shared_table(new)
    d = stem.value_dim
    src = torch.arange(stem.length) if src is None else src
    with torch.no_grad():
        ns.table.weight[_plain_codes()] = stem.table.weight[codes_by_value]
        for k in range(stem.length):
            s = int(src[k])
            ns.mix.weight[:, s * d : (s + 1) * d] = stem.mix.weight[:, k * d : (k + 1) * d]
    return new.eval(), {**meta, "key": None}


def _true_code_table(key: KeySet) -> Tensor:
    last = key.steps[-1] if key.steps else None
    if not isinstance(last, FFX) or not all(last.mask):
        raise BlockkeyError(
            f"table-order attacks keys whose last step is FFX on every position (ffx-all); got {'+'.join(key.spec)}"
        )
    return torch.tensor(ffx_table(last.password)[:VALUES])


def table_order_attack(
    target: Target,
    train: ImageTensors,
    *,
    reference_model: nn.Module | None = None,
    reference_name: str = "plain model",
    plain_images: int = 256,
    seed: int = 0,
) -> AttackReport:
    """The key from the stolen shared table: with the run's init seed (``meta.json``) and without it,
    against plain images' partial correlations and, when given, a plain model the thief trained.
    ``plain_images`` unlabelled plain images build the image reference and score the candidates.
    A last row (diagnostic, uses the key's shuffle and signs) isolates the code order."""

    t_start = time.perf_counter()
    at.COUNT.check("plain_images", plain_images)
    at.SEED.check("seed", seed)
    key = target.key
    if not isinstance(key, KeySet):
        raise BlockkeyError("table-order attacks keyed models")
    true_codes = _true_code_table(key)
    shared_table(target.model)
    true_plan = compile_block_plan(key)
    m = key.block_size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    plain = ImageTensors(train.images[order[:plain_images]], train.labels[order[:plain_images]], train.classes)
    score = _confidence_scorer(target, plain)
    refs = [("plain images (no training)", image_reference(plain.images, m))]
    if reference_model is not None:
        w = reference_columns(reference_model, m)
        if w.shape[1] != len(true_plan.src):
            raise BlockkeyError(
                f"the reference model reads {w.shape[1]} values per block; the key has {len(true_plan.src)}"
            )
        g = w.T @ w
        dg = g.diagonal().clamp_min(1e-12).sqrt()
        refs.append((reference_name, g / dg[:, None] / dg[None, :]))
    rows = []
    for use_init in (True, False):
        for ref_name, ref in refs:
            t0 = time.perf_counter()
            plan, info = recover_key_table_order(
                target.model, target.meta, key.recipe, ref, use_init=use_init, score=score, seed=seed
            )
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "setting": f"init seed {'known (meta.json)' if use_init else 'unknown'}, reference: {ref_name}",
                    "attacker_accuracy": accuracy(target, KeyedTransform(plan)),
                    **order_agreement(info["codes_by_value"], true_codes),
                    **_source_sign_agreement(plan, true_plan, true_codes),
                    "recovery_seconds": seconds,
                }
            )
            if use_init and ref_name == refs[0][0]:
                diag = _order_only(true_plan, true_codes, info["codes_by_value"], target)
                diag_row = {
                    "variant": "diagnostic",
                    "setting": "diagnostic (uses the key): recovered order + the key's shuffle, signs, direction",
                    "attacker_accuracy": accuracy(target, KeyedTransform(diag)),
                    **order_agreement(info["codes_by_value"], true_codes),
                    **_source_sign_agreement(diag, true_plan, true_codes),
                    "recovery_seconds": seconds,
                }
    rows.append(diag_row)
    return make_report(target, "table-order", rows, t_start)


def _source_sign_agreement(plan: BlockPlan, true_plan: BlockPlan, true_codes: Tensor) -> dict[str, float]:
    """Share of positions with the right source, and with the right sign: the value read back through the
    true code table rises with the input value in both plans, or falls in both."""
    inverse = torch.zeros(FFX_MAX + 1, dtype=torch.float64)
    inverse[true_codes] = torch.arange(VALUES, dtype=torch.float64)
    v = torch.arange(VALUES, dtype=torch.float64) - PIXEL_MAX / 2

    def signs(p: BlockPlan) -> Tensor:
        return torch.sign(inverse[p.codes] @ v)

    return {
        "source_fraction": float((plan.src == true_plan.src).double().mean()),
        "sign_fraction": float((signs(plan) == signs(true_plan)).double().mean()),
    }


def _values_plan(plan: BlockPlan, true_codes: Tensor) -> BlockPlan:
    """``plan`` with its codes read back to values through the true code table (for the source/sign shares)."""
    inverse = torch.zeros(FFX_MAX + 1, dtype=torch.long)
    inverse[true_codes] = torch.arange(VALUES)
    length = len(plan.src)
    return BlockPlan(plan.block_size, plan.channels, plan.src, inverse[plan.codes], torch.full((length,), PIXEL_MAX))


def _order_only(true_plan: BlockPlan, true_codes: Tensor, codes_by_value: Tensor, target: Target) -> BlockPlan:
    """What the recovered order alone is worth: composed with the key's shuffle and signs, in the direction
    that scores better on the labelled evaluation images (a diagnostic: it uses the key and the labels)."""
    values = _values_plan(true_plan, true_codes)
    options = [_compose(values, codes_by_value), _compose(values, codes_by_value.flip(0))]
    return max(options, key=lambda p: accuracy(target, KeyedTransform(p)))


def table_order_finetune(
    target: Target,
    train: ImageTensors,
    fractions: list[float],
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 15,
    layers: tuple[str, ...] = ("all", "first", "last"),
    plain_images: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> AttackReport:
    """The thief's best use of labelled plain data here: recover the code order and shuffle from the weights
    (init seed known, plain images' reference), fold them into the stolen model (:func:`plain_input_model`),
    then fine-tune it on ``fractions`` of ``train`` (:func:`~blockkey.attacks.finetune.finetune_attack`,
    scratch beside it); the first row is the folded model on plain images with no labels."""
    from ..checkpoint import save_run
    from .finetune import finetune_attack

    t_start = time.perf_counter()
    key = target.key
    if not isinstance(key, KeySet):
        raise BlockkeyError("table-order attacks keyed models")
    _true_code_table(key)
    m = key.block_size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    plain = ImageTensors(train.images[order[:plain_images]], train.labels[order[:plain_images]], train.classes)
    score = _confidence_scorer(target, plain)
    plan, info = recover_key_table_order(
        target.model, target.meta, key.recipe, image_reference(plain.images, m), score=score, seed=seed
    )
    model, meta = plain_input_model(target.model, target.meta, info["codes_by_value"], plan.src)
    start = Path(out_dir) / "table-order-start"
    if (start / "meta.json").exists():
        raise BlockkeyError(f"{start} already holds a run; pick another output folder")
    start.mkdir(parents=True, exist_ok=True)
    save_run(start, model, meta)
    folded = Target(model, RunMeta.coerce(meta), key, target.val, target.device)
    rows = [
        {
            "setting": "folded stolen model, no labels",
            "variant": "folded",
            "data_fraction": 0.0,
            "images": 0,
            "attacker_accuracy": accuracy(folded, None),
        }
    ]
    rep = finetune_attack(
        folded, start, train, fractions, out_dir, layers=layers, epochs=epochs, seed=seed, progress=progress
    )
    for row in rep.rows:
        if row["variant"] != "scratch":
            row["variant"] = f"table-order + {row['variant']}"
            row["setting"] = f"table-order + {row['setting']}"
        rows.append(row)
    return make_report(target, "table-order-finetune", rows, t_start)


@dataclass(frozen=True)
class TableOrderSettings:
    reference: str | None = option(
        None, "a plain model the attacker trained (same patch size)", type=at.path_name, metavar="RUN_DIR"
    )
    output: str | None = option(
        None,
        "also fine-tune the folded model on labelled plain data, runs in this folder",
        "-o",
        "--output",
        type=at.output_path,
    )
    fractions: list[float] = option([0.01, 0.05, 0.1], "labelled data fractions (with -o)", type=at.FRACTION, nargs="+")
    epochs: int = option(15, "fine-tuning epochs (with -o)", type=at.EPOCHS)
    seed: int = seed_option()


def _run(target: Target, data: AttackData, s: TableOrderSettings) -> AttackReport:
    if not isinstance(data.train, ImageTensors):
        raise BlockkeyError("table-order needs the attacker's images in memory (an image folder or pack, not a stream)")
    ref = load_reference(s.reference) if s.reference else None
    report = table_order_attack(
        target, data.train, reference_model=ref, reference_name=f"plain model {s.reference}", seed=s.seed
    )
    if s.output:  # then fine-tune the folded model on labelled plain data
        tuned = table_order_finetune(
            target, data.train, s.fractions, s.output, epochs=s.epochs, seed=s.seed, progress=data.progress
        )
        report.rows += tuned.rows
    return report


register_attack(
    AttackSpec(
        "table-order", "the FFX code order from a stolen shared-table stem", TableOrderSettings, _run, "data_fraction"
    )
)
