"""``nn.Module`` forms of the keyed plan.

The key's compiled block tables are non-persistent buffers: ``.to(device)`` moves them, but
``state_dict()`` (and so every checkpoint) never contains key material. ``repr`` shows the recipe
and the fingerprint only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import functional as F
from .errors import ShapeError
from .keys import KeySet

__all__ = ["KeyedTransform"]


class KeyedTransform(nn.Module):
    """Module form of :func:`blockkey.functional.encrypt` for one key set.

    ``forward`` maps a uint8 (or float [0, 1]) batch ``(..., C, H, W)`` to float32 in [0, 1]; plans
    for each image size and device are compiled on first use and cached. Normalise after it.

    Example:
        >>> key = KeySet.generate("shuffle,negpos", block_size=4)
        >>> t = KeyedTransform(key)
        >>> x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        >>> torch.equal(t.inverse(t(x)), x)
        True
        >>> list(t.state_dict())
        []
    """

    # buffers (registered in __init__)
    src: Tensor
    codes: Tensor
    domain: Tensor
    value_bits: Tensor | None

    recipe: tuple[str, ...]

    def __init__(self, key: KeySet | F.BlockPlan, compat: str = "exact") -> None:
        """``compat="authors"``: the authors' float32 arithmetic (see :mod:`blockkey.functional`), for a
        model trained with their code; its ``inverse``/``decode`` refuse (not one-to-one). A ``BlockPlan``
        keeps the mode it was compiled with."""
        super().__init__()
        if isinstance(key, F.BlockPlan):  # e.g. a key an attack recovered: no steps, no fingerprint
            bp, self.recipe, self.fingerprint = key, ("compiled",), "compiled"
        else:
            bp, self.recipe, self.fingerprint = F.compile_block_plan(key, compat), key.recipe, key.fingerprint
        #: The key's inner part (keyed points inside the model, :mod:`blockkey.inner`), or None.
        self.inner = key.inner if isinstance(key, KeySet) else None
        self.block_size = bp.block_size
        self.channels = bp.channels
        self.compat = bp.compat
        self.register_buffer("src", bp.src, persistent=False)
        self.register_buffer("codes", bp.codes, persistent=False)
        self.register_buffer("domain", bp.domain, persistent=False)
        # float bits as int32: a module-wide .half() / .to(dtype) must not round the authors' values
        bits = None if bp.values is None else bp.values.view(torch.int32)
        self.register_buffer("value_bits", bits, persistent=False)
        self._plans: dict[tuple[int, int, str], F.Plan] = {}

    @property
    def has_ffx(self) -> bool:
        """True when some position holds FFX codes: integer codes are then int16 (16-bit PNG files)."""
        return bool((self.domain != F.PIXEL_MAX).any())

    def plan(self, size: tuple[int, int] | torch.Size, device: torch.device | str | None = None) -> F.Plan:
        """The compiled plan for images of spatial size ``(H, W)`` on ``device`` (cached)."""
        dev = torch.device(device) if device is not None else self.src.device
        h, w = int(size[0]), int(size[1])
        cache_key = (h, w, str(dev))
        plan = self._plans.get(cache_key)
        if plan is None:
            values = None if self.value_bits is None else self.value_bits.cpu().view(torch.float32)
            tables = (self.src.cpu(), self.codes.cpu(), self.domain.cpu(), values)
            bp = F.BlockPlan(self.block_size, self.channels, *tables)
            plan = self._plans[cache_key] = F.compile_plan(bp, (h, w), dev, self.compat)
        return plan

    def _plan_for(self, x: Tensor) -> F.Plan:
        if x.dim() < 3:
            raise ShapeError(f"expected an image tensor (..., C, H, W); got shape {tuple(x.shape)}")
        if x.shape[-3] != self.channels:
            raise ShapeError(
                f"the key is for {self.channels}-channel images; got {x.shape[-3]} channels (shape {tuple(x.shape)})"
            )
        return self.plan(x.shape[-2:], x.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.encrypt(x, self._plan_for(x))

    def encode(self, x: Tensor) -> Tensor:
        """uint8 pixels -> exact integer codes (see :func:`blockkey.functional.encrypt_codes`)."""
        return F.encrypt_codes(x, self._plan_for(x))

    def decode(self, codes: Tensor) -> Tensor:
        """Integer codes -> uint8 pixels, bit for bit."""
        return F.decrypt_codes(codes, self._plan_for(codes))

    def inverse(self, y: Tensor) -> Tensor:
        """Float output of ``forward`` -> the original uint8 pixels, bit for bit."""
        return F.decrypt(y, self._plan_for(y))

    def inverse_float(self, y: Tensor) -> Tensor:
        """Differentiable float inverse (key sets without FFX)."""
        return F.decrypt_float(y, self._plan_for(y))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> KeyedTransform:
        self._plans = {}  # buffers moved or cast: drop cached plans
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        compat = "" if self.compat == "exact" else f", compat={self.compat}"
        return f"recipe={'+'.join(self.recipe)}, block_size={self.block_size}, fingerprint={self.fingerprint}{compat}"
