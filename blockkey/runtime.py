"""What every part that runs a network shares: the device, autocast, normalisation and accuracy.

Training, evaluation, attacks, re-keying and prediction import these from here (never from the
trainer), so that running a model does not pull in the training loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = [
    "AMP_MODES",
    "autocast",
    "native_bf16",
    "normalise",
    "pick_device",
    "predict_accuracy",
    "predict_views",
    "resolve_amp",
]

AMP_MODES = ("auto", "bf16", "fp16", "off")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA if present, else the CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device | str | None = None) -> bool:
    """True where bfloat16 runs at hardware speed: a CUDA device that supports it, or a CPU with AVX-512 BF16
    or AMX. Elsewhere (an AVX2-only CPU) bfloat16 autocast is emulated and several times slower than float32."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return True  # mps and others: autocast decides
    cpu = torch.cpu
    return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_amp(amp: str, device: torch.device | str | None = None) -> str:
    """The autocast mode actually used on ``device`` (default: the CPU): ``auto`` means bfloat16 where it is
    native (:func:`native_bf16`), float32 (``off``) elsewhere."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "off"


def autocast(device: torch.device, amp: str) -> AbstractContextManager[None]:
    """The autocast context for ``amp`` on ``device`` (a disabled one for ``off``; ``auto`` is bf16)."""
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def normalise(x: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
    """``(x - mean) / std`` for ``stats = (mean, std)`` broadcastable to ``x``; ``x`` itself for ``None``."""
    if stats is None:
        return x
    mean, std = stats
    return (x - mean) / std


@torch.no_grad()
def predict_accuracy(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    amp: str = "auto",
    channels_last: bool = True,
    weights: tuple[float, ...] | None = None,
) -> float:
    """Top-1 accuracy of ``model`` over ``loader``'s ``(inputs, labels)`` batches (evaluation mode); inputs
    ``(B, V, C, H, W)`` are test-time views (:mod:`blockkey.tta`), averaged with ``weights``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        with autocast(device, amp):
            pred = predict_views(model, x, weights, channels_last and x.dim() in (4, 5)).argmax(1)
        correct += int((pred == y).sum())
        total += y.numel()
    return correct / max(1, total)


def predict_views(
    model: nn.Module, x: Tensor, weights: tuple[float, ...] | None = None, channels_last: bool = False
) -> Tensor:
    """``model(x)`` for a batch ``(B, C, H, W)``; for views ``(B, V, C, H, W)`` (a loader's ``views``) the
    weighted mean of the V softmax outputs (equal weights if none are given), as log-probabilities. Each
    view is its own forward pass of B images, so views cost time, not a V times larger batch."""

    def run(batch: Tensor) -> Tensor:
        return model(batch.contiguous(memory_format=torch.channels_last) if channels_last else batch)

    if x.dim() != 5:
        return run(x)
    v = x.shape[1]
    w = weights if weights is not None else (1.0,) * v
    if len(w) != v:
        raise ValueError(f"{v} views but {len(w)} weights")
    total = torch.stack([wi * run(x[:, i]).float().softmax(1) for i, wi in enumerate(w)]).sum(0)
    return (total / sum(w)).log()
