"""Re-keyable models: fold a shuffle/negpos key into a block-aligned patch embedding, an inner key into any model.

A network whose first layer is a patch embedding with kernel = stride = M (``patchnet``,
``convmixer``, ``vit``, torchvision ViT / ConvNeXt / Swin stems) sees each M x M block through one
linear map ``W`` (``out x L``, ``L = M*M*C``). Shuffle and negpos steps, in any order and any number,
compose to a per-block affine map of the [0, 1] pixels::

    e[k] = sign[k] * x[src[k]] + offset[k]        (sign = -1 and offset = 1 where the position is flipped)

With per-position normalisation ``n = (x - mean) / std`` a signed permutation commutes with the
normalisation when the statistics are permuted the same way (``mean'[k] = sign[k] * mean[src[k]] +
offset[k]``, ``std'[k] = std[src[k]]``: exactly the statistics of the transformed images), so the
encrypted, normalised block is ``n'[k] = sign[k] * n[src[k]]`` and the weights
``W'[:, k] = sign[k] * W[:, src[k]]`` give the same pre-activations bit for bit up to rounding:

- :func:`rekey_model` (``old_key=None``): a plain-trained model becomes a protected model, no training;
- with both keys: a protected model moves to a new key, no data;
- with ``new_key=None``: a protected model is turned back into a plain one (for audits).

Only a column permutation and sign changes touch the weights, so the result is exact in any
precision; the normalisation becomes per-position (``mode="position"``) whatever it was. Every
conversion is checked: the new model on images encrypted with the new key must give the old model's
logits on the same images encrypted with the old key (float64, random images), else it is refused.

An inner key (:mod:`blockkey.inner`) is folded into any architecture: it relabels the input columns of
every keyed point's layer, so a plain model gets one (convert), changes it (rekey) or loses it, exactly.

FFX cannot be folded in: it maps each pixel value through a keyed non-linear table, and no linear
first layer reproduces that (see :data:`FFX_REFUSAL`).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .card import carried_evaluation, write_model_card
from .checkpoint import CheckpointError, RunMeta, load_model, save_run
from .data import Normalize
from .errors import BlockkeyError, KeyMismatchError
from .functional import PIXEL_MAX, compile_block_plan, from_blocks, to_blocks
from .inner import refold_inner, use_inner_key
from .keys import FFX, KeySet
from .meta import KeyInfo
from .models import patch_embedding
from .runtime import normalise
from .steps import KeyStep
from .transforms import KeyedTransform

__all__ = [
    "FFX_REFUSAL",
    "BlockAffine",
    "RekeyError",
    "block_affine",
    "convert_run",
    "logit_error",
    "nonlinear_refusal",
    "rekey_model",
    "rekey_run",
]


def nonlinear_refusal(step: type[KeyStep]) -> str:
    """Why a key with ``step`` (a class whose ``linear`` is False) cannot be folded into a first layer."""
    return (
        f"a key with a{'n' if step.name[0] in 'aeioufx' else ''} {step.name} step cannot be folded into a "
        f"model: {step.nonlinear_reason}, while the patch embedding is linear in the pixel values, so no weights "
        "reproduce it; train with that key instead (blockkey train --key)"
    )


FFX_REFUSAL = nonlinear_refusal(FFX)
EXACT_TOLERANCE = 1e-6  # float64 relative logit error above which a conversion is refused


class RekeyError(BlockkeyError, ValueError):
    """A model or key that cannot be converted (FFX, no aligned patch embedding, mismatch)."""


@dataclass(frozen=True)
class BlockAffine:
    """A shuffle/negpos key set as one affine map of a block on [0, 1]: ``e[k] = sign[k] * x[src[k]] + offset[k]``."""

    src: Tensor  # (L,) int64
    sign: Tensor  # (L,) float64, +1 or -1
    offset: Tensor  # (L,) float64, 0 or 1


def block_affine(key: KeySet) -> BlockAffine:
    """The block map of ``key`` (any order and number of linear steps: shuffle, negpos); FFX and every
    other step whose class is not ``linear`` is refused."""
    nonlinear = [type(s) for s in key.steps if not s.linear]  # each step class declares it (blockkey.steps)
    if nonlinear:
        raise RekeyError(nonlinear_refusal(nonlinear[0]))
    bp = compile_block_plan(key)
    flipped = (bp.codes[:, 0] == PIXEL_MAX).to(torch.float64)  # each table is v or 255 - v
    return BlockAffine(bp.src, 1.0 - 2.0 * flipped, flipped)


def _aligned_embedding(model: nn.Module, block_size: int) -> nn.Conv2d:
    conv = patch_embedding(model)
    name = type(model).__name__
    if conv is None:
        raise RekeyError(
            f"{name} has no patch embedding (a first convolution with kernel = stride = block size); "
            "only block-aligned models (patchnet, convmixer, vit, torchvision ViT/ConvNeXt/Swin) can be re-keyed"
        )
    m = (block_size, block_size)
    if tuple(conv.kernel_size) != m or tuple(conv.stride) != m:
        raise RekeyError(
            f"{name}'s patch embedding has kernel {tuple(conv.kernel_size)} and stride {tuple(conv.stride)}; "
            f"the key's blocks are {block_size}x{block_size}: they must be equal"
        )
    if tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        raise RekeyError(
            f"{name}'s patch embedding is padded, dilated or grouped: its patches are not the key's blocks"
        )
    return conv


def rekey_model(
    model: nn.Module,
    normalize: Normalize | None,
    old_key: KeySet | None,
    new_key: KeySet | None,
) -> tuple[nn.Module, Normalize]:
    """A copy of ``model`` and its normalisation for ``new_key``, from a model for ``old_key``.

    ``old_key=None``: ``model`` was trained on plain images. ``new_key=None``: the result takes plain
    images. The returned model on ``normalize'(encrypt(x, new_key))`` computes what ``model`` computes
    on ``normalize(encrypt(x, old_key))``; check it with :func:`logit_error`.
    """
    keys = [k for k in (old_key, new_key) if k is not None]
    if not keys:
        raise RekeyError("give an old key, a new key or both")
    m, c = keys[0].block_size, keys[0].channels
    if any((k.block_size, k.channels) != (m, c) for k in keys):
        raise RekeyError(
            f"the old and new keys differ in shape (M={old_key.block_size}, C={old_key.channels} vs "  # type: ignore[union-attr]
            f"M={new_key.block_size}, C={new_key.channels}); a model has one block size"  # type: ignore[union-attr]
        )
    out = copy.deepcopy(model)
    refold_inner(out, old_key, new_key)  # the inner part: a relabelling of the consumers' columns, any model
    if not any(k.steps for k in keys):  # an inner key alone: the first layer and the normalisation stay
        return out, normalize if normalize is not None else Normalize((0.0,) * c, (1.0,) * c)
    old = block_affine(old_key) if old_key is not None else None
    new = block_affine(new_key) if new_key is not None else None
    conv = _aligned_embedding(out, m)
    if conv.in_channels != c:
        raise RekeyError(f"the key is for {c}-channel images; the model takes {conv.in_channels} channels")

    norm = normalize if normalize is not None else Normalize((0.0,) * c, (1.0,) * c)
    mean, std = norm.per_position(m, c)
    weight = to_blocks(conv.weight.detach().to(torch.float64), m)[:, 0, 0, :]  # (out, L), (row, col, channel)
    if old is not None:  # back to plain-image coordinates
        w_plain, mean_plain, std_plain = torch.empty_like(weight), torch.empty_like(mean), torch.empty_like(std)
        w_plain[:, old.src] = weight * old.sign
        mean_plain[old.src] = old.sign * (mean - old.offset)
        std_plain[old.src] = std
        weight, mean, std = w_plain, mean_plain, std_plain
    if new is not None:
        weight = weight[:, new.src] * new.sign
        mean = new.sign * mean[new.src] + new.offset
        std = std[new.src]
    with torch.no_grad():
        conv.weight.copy_(from_blocks(weight[:, None, None, :], m, c).to(conv.weight.dtype))
    return out, Normalize(tuple(mean.tolist()), tuple(std.tolist()), "position", m)


def logit_error(
    model_a: nn.Module,
    norm_a: Normalize | None,
    key_a: KeySet | None,
    model_b: nn.Module,
    norm_b: Normalize | None,
    key_b: KeySet | None,
    image_shape: tuple[int, int, int],
    *,
    images: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> float:
    """``max |a - b| / max |a|`` over the logits of ``model_a`` on ``key_a``-encrypted random images
    and ``model_b`` on the same images encrypted with ``key_b`` (in ``dtype``, eval mode, on CPU)."""
    u = torch.randint(0, 256, (images, *image_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

    def logits(model: nn.Module, norm: Normalize | None, key: KeySet | None) -> Tensor:
        x = (KeyedTransform(key).encode(u) if key is not None else u).to(dtype) / PIXEL_MAX  # exact codes / 255
        x = normalise(x, norm.tensors(image_shape, "cpu", dtype) if norm is not None else None)
        net = use_inner_key(copy.deepcopy(model).cpu().to(dtype).eval(), key)  # the key holder's network
        with torch.no_grad():
            return net(x)

    a, b = logits(model_a, norm_a, key_a), logits(model_b, norm_b, key_b)
    return float((a - b).abs().max() / a.abs().max().clamp_min(torch.finfo(dtype).tiny))


# --------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------


def _rekey_run(
    run_dir: str | os.PathLike[str],
    old_key: KeySet | None,
    new_key: KeySet | None,
    output: str | os.PathLike[str],
    action: str,
) -> RunMeta:
    out_dir = Path(output)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} is not empty; pick a new folder for the converted model")
    t0 = time.perf_counter()
    model, meta = load_model(run_dir)
    model_key = meta.key
    if old_key is None and model_key is not None:
        raise KeyMismatchError(
            f"{run_dir} is already protected (key {model_key.fingerprint}); use `blockkey rekey --old-key`"
        )
    if old_key is not None:
        if model_key is None:
            raise KeyMismatchError(f"{run_dir} is not protected; use `blockkey convert`")
        if old_key.fingerprint != model_key.fingerprint:
            raise KeyMismatchError(
                f"the old key {old_key.fingerprint} is not the key of {run_dir} ({model_key.fingerprint})"
            )
    normalize = meta.normalize
    new_model, new_norm = rekey_model(model, normalize, old_key, new_key)
    error = logit_error(model, normalize, old_key, new_model, new_norm, new_key, meta.image_shape)
    if not error < EXACT_TOLERANCE:
        raise RekeyError(
            f"conversion check failed (relative logit error {error:.1e}): {meta.model} does not feed pixels "
            "only through its patch embedding"
        )
    seconds = time.perf_counter() - t0
    step = {
        "action": action,
        "from_run": str(run_dir),
        "from_key": model_key.fingerprint if model_key else None,
        "to_key": new_key.fingerprint if new_key else None,
        "max_rel_logit_error_float64": error,
        "seconds": round(seconds, 3),
    }
    new_meta = replace(
        meta,
        key=KeyInfo.from_key(new_key),
        normalize=new_norm,
        conversions=[*meta.conversions, step],
        evaluation=carried_evaluation(meta, str(run_dir)),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run(out_dir, new_model, new_meta)
    write_model_card(out_dir, new_meta)
    return new_meta


def convert_run(run_dir: str | os.PathLike[str], key: KeySet, output: str | os.PathLike[str]) -> RunMeta:
    """Protect a plain-trained block-aligned model with ``key`` (shuffle/negpos) into ``output``; no training."""
    return _rekey_run(run_dir, None, key, output, "convert")


def rekey_run(
    run_dir: str | os.PathLike[str], old_key: KeySet, new_key: KeySet, output: str | os.PathLike[str]
) -> RunMeta:
    """Move a protected model from ``old_key`` to ``new_key`` into ``output``; no data, no training."""
    return _rekey_run(run_dir, old_key, new_key, output, "rekey")
