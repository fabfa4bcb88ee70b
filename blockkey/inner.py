"""Keys inside the network: keyed channel permutations and sign flips of feature maps.

The input key (shuffle, negpos) of a block-aligned model is folded into its first layer, so a thief who
re-learns that one layer from a few labelled images gets the rest of the network for free (docs/attacks.md).
An inner key spreads the secret over the network: at each keyed point a :class:`ChannelKey` permutes the
channels of the feature map and flips the sign of some of them, ``out[:, j] = s_j * in[:, p_j]``, after a
non-linearity and before the next convolution (the authors' follow-up, arXiv 2109.00224, keys feature maps
in the same spirit).

A signed channel permutation in front of a convolution is a relabelling of that convolution's input
columns, and random initialisation, SGD and weight decay are all invariant under it: training with an inner
key is distributed exactly like training without one (no accuracy cost). Without the key (identity at every
point) or with a wrong one, each point feeds the next layer the wrong channels.

The permutation and signs of a point derive from the key's 256-bit secret and the point's name and width
(:meth:`blockkey.keys.InnerKey.point`); the model holds them in non-persistent buffers (never in a
checkpoint). Models opt in with an ``inner=True`` argument (``patchnet``, ``convmixer``); the trainer sets it
when the key has an inner part.

    key = KeySet.generate("shuffle,negpos,inner", block_size=4)
    model = create_model("patchnet", 10, patch=4, inner=True)
    use_inner_key(model, key)        # now the model computes with the key's inner part
    use_inner_key(model, None)       # identity at every point: what a thief without the key runs
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .errors import BlockkeyError

if TYPE_CHECKING:
    from .keys import InnerKey, KeySet

__all__ = ["ChannelKey", "inner_points", "keyed_points", "use_inner_key"]


class ChannelKey(nn.Module):
    """``out[:, j] = sign_j * in[:, perm_j]`` over dim 1; identity until a key is set.

    ``signs=False`` keeps every sign (for a point followed by max pooling, which a sign flip would turn
    into min pooling). Permutation and signs are non-persistent buffers: they never reach a state dict.
    """

    # buffers (registered in __init__)
    perm: Tensor
    sign: Tensor

    def __init__(self, channels: int, signs: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.signs = signs
        self.register_buffer("perm", torch.arange(channels), persistent=False)
        self.register_buffer("sign", torch.ones(channels), persistent=False)
        self.keyed = False

    def set(self, perm: torch.Tensor | None, sign: torch.Tensor | None = None) -> None:
        """Set the point's permutation and signs (``None``: identity)."""
        if perm is None:
            self.perm.copy_(torch.arange(self.channels))
            self.sign.fill_(1.0)
            self.keyed = False
            return
        if sorted(perm.tolist()) != list(range(self.channels)):
            raise BlockkeyError(
                f"a keyed point of {self.channels} channels needs a permutation of 0..{self.channels - 1}"
            )
        self.perm.copy_(perm)
        self.sign.copy_(sign if sign is not None else torch.ones(self.channels))
        self.keyed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keyed:
            return x
        return x.index_select(1, self.perm) * self.sign.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:  # never the permutation: it is the key
        return f"{self.channels}, signs={self.signs}, keyed={self.keyed}"


def keyed_points(model: nn.Module) -> dict[str, ChannelKey]:
    """The model's keyed points by qualified name (unwraps DDP)."""
    model = getattr(model, "module", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, ChannelKey)}


def inner_points(model: nn.Module, inner: InnerKey) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{point name: (perm, sign)}`` that ``inner`` gives each keyed point of ``model`` (sign: +1 or -1)."""
    out = {}
    for name, point in keyed_points(model).items():
        perm, flips = inner.point(name, point.channels, point.signs)
        dev = point.perm.device
        sign = 1.0 - 2.0 * torch.tensor(flips, dtype=torch.float32, device=dev)
        out[name] = (torch.tensor(perm, device=dev), sign)
    return out


def use_inner_key(model: nn.Module, key: KeySet | InnerKey | None) -> nn.Module:
    """Set every keyed point of ``model`` from ``key``'s inner part; identity for ``None`` or a key without one.

    Raises :class:`BlockkeyError` when the key has an inner part and the model has no keyed point (it
    would silently run without it). Returns ``model``.
    """
    from .keys import InnerKey

    inner = key if isinstance(key, InnerKey) or key is None else key.inner
    points = keyed_points(model)
    if inner is not None and not points:
        raise BlockkeyError(
            "the key has an inner part but the model has no keyed points (build it with inner=True, e.g. patchnet)"
        )
    keyed = inner_points(model, inner) if inner is not None else {}
    for name, point in points.items():
        perm, sign = keyed.get(name, (None, None))
        point.set(perm, sign)
    return model
