"""Passport-based protection (Fan et al., NeurIPS 2019, scheme V1): the baseline the paper compares with.

A passport layer replaces ``conv -> BatchNorm`` by ``conv -> BatchNorm (no affine) -> gamma * x + beta``
where ``gamma`` and ``beta`` are not parameters: they are the spatial means of the same convolution
applied to two secret passport tensors. With forged passports the scale and bias are wrong and the
accuracy collapses. A sign loss ``sum(relu(0.1 - gamma * b))`` embeds a signature ``b`` (one +-1 bit
per channel) in ``sign(gamma)``: the owner proves ownership by showing the passports reproduce it.

Passports are secrets handled like keys: drawn from OS entropy, stored apart from the model
(``.safetensors``, mode 0600), never in a checkpoint (the layers' passport buffers are not part of
``state_dict``); checkpoints record the passports' fingerprint only.

    passports = Passports.generate(model)       # model built with passport layers
    passports.attach(model)                     # now the model runs
    loss = task_loss + sign_loss(model)
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import BlockkeyError
from .fileio import atomic_path

__all__ = ["PassportConv", "PassportError", "Passports", "passport_layers", "sign_loss", "signature_match"]

FORMAT = "blockkey.passports"
SIGN_MARGIN = 0.1  # the passport paper's sign-loss margin


class PassportError(BlockkeyError, ValueError):
    """Missing, corrupt or mismatched passports."""


class PassportConv(nn.Module):
    """``conv -> BatchNorm(affine=False) -> gamma * x + beta`` with ``gamma, beta`` from two passports.

    ``gamma = mean_{h,w} conv(P_gamma)``, ``beta = mean_{h,w} conv(P_beta)``: one value per output
    channel. Passports have the shape of the layer's input, ``(1, C_in, size, size)``.
    """

    # buffers (registered in __init__)
    passport_gamma: Tensor
    passport_beta: Tensor
    signature: Tensor

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=False)
        self.passport_shape = (1, cin, size, size)
        # Not in state_dict: passports and signature never reach a checkpoint.
        self.register_buffer("passport_gamma", torch.zeros(self.passport_shape), persistent=False)
        self.register_buffer("passport_beta", torch.zeros(self.passport_shape), persistent=False)
        self.register_buffer("signature", torch.zeros(cout), persistent=False)
        self.attached = False

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.attached:
            raise PassportError("this model has passport layers and needs its passports (--passport FILE)")
        both = torch.cat([self.passport_gamma, self.passport_beta]).to(self.conv.weight.dtype)
        gamma, beta = self.conv(both).mean((2, 3))
        return gamma, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.scale_bias()
        y = self.bn(self.conv(x))
        return y * gamma.view(1, -1, 1, 1).to(y.dtype) + beta.view(1, -1, 1, 1).to(y.dtype)


def passport_layers(model: nn.Module) -> dict[str, PassportConv]:
    """The model's passport layers by qualified name (unwraps DDP)."""
    model = getattr(model, "module", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, PassportConv)}


def sign_loss(model: nn.Module, alpha: float = 1.0) -> torch.Tensor:
    """``alpha * sum relu(0.1 - gamma * b)`` over every passport layer: pushes ``sign(gamma)`` to ``b``."""
    terms = []
    for layer in passport_layers(model).values():
        gamma, _ = layer.scale_bias()
        terms.append(torch.relu(SIGN_MARGIN - gamma.float() * layer.signature).sum())
    if not terms:
        raise PassportError("the model has no passport layers")
    return alpha * torch.stack(terms).sum()


@torch.no_grad()
def signature_match(model: nn.Module, passports: Passports | None = None) -> float:
    """Fraction of signature bits ``b`` reproduced by ``sign(gamma)`` with the attached passports.

    ``passports``: whose signature to check (default: the attached one). 1.0 proves ownership;
    random passports give about 0.5.
    """
    layers = passport_layers(model)
    hits = total = 0
    for name, layer in layers.items():
        gamma, _ = layer.scale_bias()
        b = passports.tensors[f"{name}.signature"].to(gamma.device) if passports is not None else layer.signature
        hits += int((torch.sign(gamma.float()) == b).sum())
        total += b.numel()
    return hits / max(1, total)


@dataclass(frozen=True, eq=False)
class Passports:
    """Secret passports (``<layer>.gamma``, ``<layer>.beta``) and signatures (``<layer>.signature``)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def generate(cls, model: nn.Module, *, seed: int | None = None) -> Passports:
        """Fresh Gaussian passports and a random +-1 signature for every passport layer of ``model``.

        From OS entropy (a 128-bit seed from :mod:`secrets` for a private generator); ``seed`` gives
        reproducible, NOT secret passports (forgeries in attacks and tests).
        """
        layers = passport_layers(model)
        if not layers:
            raise PassportError("the model has no passport layers (build it with passport=True)")
        secret = seed is None
        rng = np.random.default_rng(secrets.randbits(128) if secret else seed)
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            for part in ("gamma", "beta"):
                tensors[f"{name}.{part}"] = torch.from_numpy(rng.standard_normal(layer.passport_shape, np.float32))
            bits = rng.integers(0, 2, layer.signature.numel())
            tensors[f"{name}.signature"] = torch.from_numpy(bits.astype(np.float32) * 2 - 1)
        return cls(tensors, {"source": "os-entropy" if secret else "public seed (not secret)"})

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the names and bytes: safe to log and to store."""
        h = hashlib.sha256(FORMAT.encode())
        for name in sorted(self.tensors):
            h.update(name.encode() + b"\0" + self.tensors[name].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        """What a checkpoint may store: fingerprint, layers, signature length; never the passports."""
        layers = sorted({n.rsplit(".", 1)[0] for n in self.tensors})
        bits = sum(t.numel() for n, t in self.tensors.items() if n.endswith(".signature"))
        return {"fingerprint": self.fingerprint, "layers": layers, "signature_bits": bits}

    def _check(self, layers: dict[str, PassportConv]) -> None:
        want = {f"{n}.{p}": tuple(layer.passport_shape) for n, layer in layers.items() for p in ("gamma", "beta")}
        want |= {f"{n}.signature": tuple(layer.signature.shape) for n, layer in layers.items()}
        have = {n: tuple(t.shape) for n, t in self.tensors.items()}
        if have != want:
            missing = sorted(set(want) - set(have))
            wrong = sorted(n for n in set(want) & set(have) if want[n] != have[n])
            extra = sorted(set(have) - set(want))
            raise PassportError(
                "the passports do not fit this model"
                + (f"; missing {missing[0]}" if missing else "")
                + (f"; {wrong[0]} is {have[wrong[0]]}, the layer needs {want[wrong[0]]}" if wrong else "")
                + (f"; unknown {extra[0]}" if extra else "")
            )

    def attach(self, model: nn.Module) -> nn.Module:
        """Copy the passports and signatures into the model's passport layers (in place; returns it)."""
        layers = passport_layers(model)
        if not layers:
            raise PassportError("the model has no passport layers; passports protect only a passport model")
        self._check(layers)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.passport_gamma.copy_(self.tensors[f"{name}.gamma"])
                layer.passport_beta.copy_(self.tensors[f"{name}.beta"])
                layer.signature.copy_(self.tensors[f"{name}.signature"])
                layer.attached = True
        return model

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write a ``.safetensors`` passport file with mode 0600 (refuses to overwrite unless ``force``)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not force:
            raise PassportError(f"{path} exists; refusing to overwrite passports (--force)")
        with atomic_path(path, private=True) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), {"format": FORMAT, **self.meta})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Passports:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise PassportError(f"{path}: no such passport file")
        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError, ValueError) as e:
            raise PassportError(f"{path}: not a readable passport file ({e})") from None
        if meta.pop("format", None) != FORMAT:
            raise PassportError(f"{path}: not a blockkey passport file")
        return cls(tensors, meta)

    def __repr__(self) -> str:
        return f"Passports({len(self.tensors) // 3} layers, fingerprint={self.fingerprint})"
