"""Pure kernels: block views, key compilation and the keyed plan.

Every key set compiles to a :class:`Plan`: one gather index over the ``C*H*W`` positions of an image
plus a value table (256 entries per block position). Applying it to a whole batch is one table
lookup and one gather, on whatever device the batch is on; there is no Python loop over images or
blocks.

Value domains. Pixels are 0..255. An FFX step maps a value to a code in 0..999 (the FFX domain).
A negpos step maps ``v`` to ``D - v`` where ``D`` is the current domain's maximum (255 for pixels,
999 after FFX), which is ``1 - x`` on the ``[0, 1]`` scale. The float output of a position is its
code divided by its own domain maximum: ``v / 255`` for positions no FFX step touched, ``c / 999``
for FFX codes. (The authors divide every position by ``max(E(0..255))``, 996 for the password
"password"; that squeezes untouched pixels into ``[0, 0.256]`` and makes the scale depend on the
key. 999 is the FFX domain's own maximum, is key-independent and keeps every position in [0, 1].)

The authors' code. A single step gives the same integer codes as theirs (see :func:`encrypt_codes`).
A chain with negpos before FFX does not: their FFX step reads its input as ``long(x * 255)``, and
after negpos ``(1 - v/255) * 255`` in float32 truncates to ``254 - v`` for 159 of the 256 pixel
values, so their chain is not one-to-one there. The default (``compat="exact"``) computes the exact
``E(255 - v)`` and decrypts every pixel; ``compat="authors"`` reproduces their float32 arithmetic
(truncation and their ``max(E)`` scaling) for models trained with their code, and cannot decrypt.

Kernels are pure: they never modify their input, never move devices, accept any leading
dimensions ``(..., C, H, W)`` and raise :class:`~blockkey.errors.ShapeError` (a ``ValueError``) for
shapes that do not fit the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import KeyMismatchError, ShapeError
from .keys import FFX, KeySet, NegPos, Shuffle
from .steps import BlockFold
from .steps._base import PIXEL_MAX
from .steps.ffx import FFX_MAX

__all__ = [
    "COMPAT_MODES",
    "BlockPlan",
    "Plan",
    "block_shuffle",
    "block_unshuffle",
    "compile_block_plan",
    "compile_plan",
    "decrypt",
    "decrypt_codes",
    "decrypt_float",
    "encrypt",
    "encrypt_codes",
    "ffx_encrypt",
    "from_blocks",
    "negpos_flip",
    "to_blocks",
]

#: ``"exact"``: blockkey's invertible arithmetic (default). ``"authors"``: the float32 arithmetic of the
#: authors' keydefense.py (truncation before each FFX step, division by ``max(E(0..255))``); not invertible.
COMPAT_MODES = ("exact", "authors")


# --------------------------------------------------------------------------------------------
# Block views
# --------------------------------------------------------------------------------------------


def _check_image(x: Tensor, block_size: int, channels: int | None = None) -> tuple[int, int, int]:
    if x.dim() < 3:
        raise ShapeError(f"expected an image tensor (..., C, H, W); got shape {tuple(x.shape)}")
    c, h, w = x.shape[-3:]
    if channels is not None and c != channels:
        raise ShapeError(f"the key is for {channels}-channel images; got {c} channels (shape {tuple(x.shape)})")
    if h % block_size or w % block_size:
        raise ShapeError(f"image size {h}x{w} is not divisible by the block size {block_size}")
    return c, h, w


def to_blocks(x: Tensor, block_size: int) -> Tensor:
    """``(..., C, H, W)`` -> ``(..., H/M, W/M, M*M*C)`` block vectors, (row, col, channel) order.

    Blocks are in raster order and each vector has the channel varying fastest, as in the authors'
    code (their ``segment``). :func:`from_blocks` is the exact inverse.

    Example:
        >>> x = torch.arange(2 * 4 * 4).view(2, 4, 4)
        >>> to_blocks(x, 2)[0, 0].tolist()  # block (0, 0): (r, c, ch) = (0,0,0), (0,0,1), (0,1,0), ...
        [0, 16, 1, 17, 4, 20, 5, 21]
    """
    c, h, w = _check_image(x, block_size)
    m = block_size
    lead = x.shape[:-3]
    b = x.reshape(*lead, c, h // m, m, w // m, m)
    n = len(lead)
    # (..., C, bh, r, bw, col) -> (..., bh, bw, r, col, C)
    b = b.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)
    return b.reshape(*lead, h // m, w // m, m * m * c)


def from_blocks(b: Tensor, block_size: int, channels: int) -> Tensor:
    """Inverse of :func:`to_blocks`: ``(..., H/M, W/M, M*M*C)`` -> ``(..., C, H, W)``."""
    m, c = block_size, channels
    if b.dim() < 3 or b.shape[-1] != m * m * c:
        raise ShapeError(f"expected block vectors (..., H/M, W/M, {m * m * c}); got shape {tuple(b.shape)}")
    lead = b.shape[:-3]
    bh, bw = b.shape[-3:-1]
    n = len(lead)
    x = b.reshape(*lead, bh, bw, m, m, c)
    # (..., bh, bw, r, col, C) -> (..., C, bh, r, bw, col)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)
    return x.reshape(*lead, c, bh * m, bw * m)


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class BlockPlan:
    """A key set compiled to one block: ``out[k] = codes[k, in[src[k]]]``.

    Attributes:
        block_size, channels: the key's ``M`` and ``C``.
        src: ``(L,)`` int64, the input block position feeding output position ``k``.
        codes: ``(L, 256)`` int64, the output code of output position ``k`` for each input value.
        domain: ``(L,)`` int64, 255 or 999: the maximum code of position ``k`` (its float scale);
            with ``compat="authors"`` 255, or ``max(E(0..255))`` of the last FFX step.
        values: ``(L, 256)`` float32 or None: the authors' float output (``compat="authors"`` only;
            ``codes`` is then ``round(values * domain)``, their integers).
    """

    block_size: int
    channels: int
    src: Tensor
    codes: Tensor
    domain: Tensor
    values: Tensor | None = None

    @property
    def compat(self) -> str:
        """``"exact"`` (invertible) or ``"authors"`` (their float32 arithmetic; not invertible)."""
        return "exact" if self.values is None else "authors"

    @property
    def has_ffx(self) -> bool:
        """True when some position holds FFX codes (0..999): then integer codes need int16."""
        return bool((self.domain != PIXEL_MAX).any())

    def __repr__(self) -> str:  # never the tables: they are the key
        compat = "" if self.values is None else ", compat='authors'"
        return f"BlockPlan(block_size={self.block_size}, channels={self.channels}, has_ffx={self.has_ffx}{compat})"


def _check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {', '.join(COMPAT_MODES)}; got {compat!r}")


def _authors_values(key: KeySet) -> tuple[Tensor, Tensor]:
    """Every pixel value through the authors' float32 steps, at every block position.

    Returns ``(values, domain)``: ``(L, 256)`` float32 outputs and the ``(L,)`` scale of their integers.
    Same operations as their keydefense.py: ``x = v / 255`` (ToTensor), negpos ``1 - x``, FFX
    ``q = long(clamp(x, 0, 1) * 255)`` (truncation), ``E(q)`` where masked, then ``q / max(E(0..255))``
    at every position. IEEE float32 division, subtraction and multiplication are exactly rounded, so
    the tables are the same on any CPU or GPU.
    """
    length = key.block_len
    values = (torch.arange(256, dtype=torch.uint8).float() / PIXEL_MAX).repeat(length, 1)
    domain = torch.full((length,), PIXEL_MAX)
    for step in key.steps:
        values, domain = step.fold_authors(values, domain)
    return values, domain


def compile_block_plan(key: KeySet, compat: str = "exact") -> BlockPlan:
    """Fold the ordered steps of ``key`` into one permutation and one value table per position.

    ``compat="authors"`` builds the tables with the authors' float32 arithmetic instead (see the
    module notes): same permutation, their truncated codes and float values; such a plan cannot decrypt.
    """
    _check_compat(compat)
    length = key.block_len
    block = BlockFold(torch.arange(length), torch.arange(256).repeat(length, 1), torch.full((length,), PIXEL_MAX))
    for step in key.steps:
        block = step.fold(block)
    src, codes, domain = block.src, block.codes, block.domain
    if compat == "authors":
        values, domain = _authors_values(key)
        codes = torch.round(values.double() * domain[:, None]).long()
        return BlockPlan(key.block_size, key.channels, src, codes, domain, values)
    return BlockPlan(key.block_size, key.channels, src, codes, domain)


@dataclass(frozen=True, repr=False)
class Plan:
    """A key set compiled for images of one size ``(C, H, W)`` on one device.

    ``out[j] = table[cls[j], in[index[j]]]``. The tables are deduplicated: a key set has only a few
    distinct per-position tables (identity, ``255 - v``, ``E(v)``, ...), so the lookup table stays
    in cache even for 16x16 blocks. Lookups are done in input order (``cls_in``), then one gather.

    Attributes:
        shape: ``(C, H, W)``.
        index: ``(N,)`` int64 gather index, ``out[j] = in[index[j]]``.
        inv_index: ``(N,)`` int64, its inverse permutation.
        lut: ``(T, 256)`` float32, value of each table class in [0, 1].
        codes: ``(T, 256)`` int16, integer code of each table class.
        inv_codes: ``(T, 1000)`` int16, the inverse of ``codes`` (-1 where a code is impossible).
        cls_in: ``(N,)`` int32, ``256 * class`` of the output that input position ``i`` feeds.
        domain_out: ``(N,)`` int64, maximum code of each output position.
        xor_in: ``(N,)`` uint8 or None: for keys without FFX the table is ``v ^ xor_in`` (0 or 255).
        sign_in, flip_in: ``(N,)`` float32 or None: the float form ``x * sign + flip`` (keys without FFX).
    """

    shape: tuple[int, int, int]
    block: BlockPlan
    index: Tensor
    inv_index: Tensor
    lut: Tensor
    codes: Tensor
    inv_codes: Tensor
    cls_in: Tensor
    cls_in_dec: Tensor
    domain_out: Tensor
    xor_in: Tensor | None
    sign_in: Tensor | None
    flip_in: Tensor | None

    @property
    def numel(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def code_dtype(self) -> torch.dtype:
        """uint8 when every code fits a byte (no FFX step), else int16."""
        return torch.int16 if self.block.has_ffx else torch.uint8

    @property
    def device(self) -> torch.device:
        return self.index.device

    def __repr__(self) -> str:  # never the index or tables: they are the key
        tables, ffx = self.lut.shape[0], self.block.has_ffx
        return f"Plan(shape={self.shape}, tables={tables}, has_ffx={ffx}, device={self.device})"


def _signed_identity(codes: Tensor, domain: Tensor) -> bool:
    """True when every table row is the identity or ``255 - v`` on pixels (shuffle/negpos keys, whatever the
    steps' names): then the plan has the differentiable float form ``x * sign + flip``."""
    ident = torch.arange(256)
    rows_ok = (codes == ident).all(1) | (codes == PIXEL_MAX - ident).all(1)
    return bool((domain == PIXEL_MAX).all() and rows_ok.all())


def compile_plan(
    key: KeySet | BlockPlan, size: Sequence[int], device: torch.device | str | None = None, compat: str = "exact"
) -> Plan:
    """Compile ``key`` for images of spatial size ``size = (H, W)`` on ``device``.

    ``compat="authors"`` reproduces the authors' float32 arithmetic (see the module notes): use it
    only to feed a model trained with their code; its plans refuse to decrypt.

    Example:
        >>> key = KeySet.generate("shuffle,negpos,ffx", block_size=4)
        >>> plan = compile_plan(key, (32, 32))
        >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> y = encrypt(x, plan)                 # float32 in [0, 1]
        >>> torch.equal(decrypt(y, plan), x)     # exact inverse
        True
    """
    _check_compat(compat)
    bp = key if isinstance(key, BlockPlan) else compile_block_plan(key, compat)
    if bp.compat != compat:
        raise ValueError(f"this BlockPlan was compiled with compat={bp.compat!r}; got compat={compat!r}")
    m, c = bp.block_size, bp.channels
    h, w = (int(s) for s in size)
    if h % m or w % m or h < 1 or w < 1:
        raise ShapeError(f"image size {h}x{w} is not divisible by the block size {m}")
    n = c * h * w
    length = m * m * c

    # Table classes: identical (codes, domain[, float bits]) rows share one table.
    parts = [bp.codes, bp.domain[:, None]] + ([] if bp.values is None else [bp.values.view(torch.int32).long()])
    uniq, cls = torch.unique(torch.cat(parts, dim=1), dim=0, return_inverse=True)
    codes_t, dom_t = uniq[:, :256], uniq[:, 256]

    in_flat = to_blocks(torch.arange(n).view(c, h, w), m)  # (bh, bw, L): flat input index per block position
    index = from_blocks(in_flat[..., bp.src], m, c).reshape(n)
    inv_index = torch.empty_like(index)
    inv_index[index] = torch.arange(n)
    cls_out = from_blocks(cls.expand(h // m, w // m, length), m, c).reshape(n)
    cls_in = cls_out[inv_index]  # input i feeds output inv_index[i]
    domain_out = from_blocks(bp.domain.expand(h // m, w // m, length), m, c).reshape(n)

    if bp.values is None:
        lut = codes_t.to(torch.float32) / dom_t[:, None].to(torch.float32)
    else:  # the authors' float values, bit for bit
        lut = uniq[:, 257:].to(torch.int32).view(torch.float32)
    inv_codes = torch.full((len(uniq), FFX_MAX + 1), -1, dtype=torch.int64)
    inv_codes.scatter_(1, codes_t, torch.arange(256).expand_as(codes_t))

    xor_in = sign_in = flip_in = None
    if _signed_identity(codes_t, dom_t):  # every table is v or 255 - v: a linear (affine) key
        flipped = (codes_t[:, 0] == PIXEL_MAX)[cls_in]
        # authors' floats: 1 - v/255 is not always (255 - v)/255 in float32, so uint8 input uses the table
        xor_in = None if bp.values is not None else (flipped.to(torch.uint8) * PIXEL_MAX).to(torch.uint8)
        sign_in = 1.0 - 2.0 * flipped.to(torch.float32)
        flip_in = flipped.to(torch.float32)

    dev = torch.device(device) if device is not None else torch.device("cpu")

    def put(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return t.to(device=dev, dtype=dtype or t.dtype).contiguous()

    def put_optional(t: Tensor | None) -> Tensor | None:
        return None if t is None else put(t)

    return Plan(
        shape=(c, h, w),
        block=bp,
        index=put(index),
        inv_index=put(inv_index),
        lut=put(lut),
        codes=put(codes_t, torch.int16),
        inv_codes=put(inv_codes, torch.int16),
        cls_in=put(cls_in * 256, torch.int32),
        cls_in_dec=put(cls_in * (FFX_MAX + 1), torch.int64),
        domain_out=put(domain_out),
        xor_in=put_optional(xor_in),
        sign_in=put_optional(sign_in),
        flip_in=put_optional(flip_in),
    )


# --------------------------------------------------------------------------------------------
# Applying a plan
# --------------------------------------------------------------------------------------------


def _flat(x: Tensor, plan: Plan) -> Tensor:
    c, h, w = plan.shape
    if x.dim() < 3 or tuple(x.shape[-3:]) != plan.shape:
        if x.dim() >= 3 and x.shape[-3] != c:
            raise ShapeError(f"the key is for {c}-channel images; got {x.shape[-3]} channels (shape {tuple(x.shape)})")
        raise ShapeError(f"plan compiled for images {c}x{h}x{w}; got shape {tuple(x.shape)}")
    if x.device != plan.device:
        raise ValueError(f"input is on {x.device} but the plan is on {plan.device}; move one of them")
    return x.reshape(-1, plan.numel)


def _lookup(xf: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    """``table.flatten()[offsets + xf]`` with int32 index arithmetic (xf: (B, N) integer)."""
    idx = xf.to(torch.int32)
    idx += offsets
    # 1-D index_select is several times faster than advanced indexing on CPU.
    return table.reshape(-1).index_select(0, idx.view(-1)).view(idx.shape)


def encrypt(x: Tensor, plan: Plan) -> Tensor:
    """Apply the keyed plan: ``(..., C, H, W)`` image batch -> float in [0, 1], same shape.

    ``x`` is uint8 (canonical) or float in [0, 1]. The output is float32 (float64 for float64
    input; float16 and bfloat16 are computed and returned in float32, too coarse for ``1 - x``).
    For key sets without FFX, a float input takes the differentiable path (a gather and
    ``x * sign + flip``), so gradients flow through shuffle and negpos. FFX is a table lookup: float
    inputs are quantised with ``round(255 x)`` first and no gradient flows through it.
    """
    xf = _flat(x, plan)
    if x.dtype == torch.uint8:
        if plan.xor_in is not None:
            y = torch.bitwise_xor(xf, plan.xor_in).to(torch.float32).div_(PIXEL_MAX)
        else:
            y = _lookup(xf, plan.cls_in, plan.lut)
    elif x.is_floating_point():
        if x.dtype in (torch.float16, torch.bfloat16):  # too coarse to hold 1 - x exactly: use float32
            xf = xf.float()
        if plan.sign_in is not None and plan.flip_in is not None:  # both set for a plan without FFX
            y = torch.addcmul(plan.flip_in.to(xf.dtype), xf, plan.sign_in.to(xf.dtype))
        else:
            q = xf.detach().clamp(0, 1).mul(PIXEL_MAX).round_().to(torch.uint8)
            y = _lookup(q, plan.cls_in, plan.lut).to(xf.dtype)
    else:
        raise TypeError(f"expected a uint8 or floating-point image tensor; got {x.dtype}")
    return y.index_select(1, plan.index).view(x.shape)


def encrypt_codes(x: Tensor, plan: Plan) -> Tensor:
    """Exact integer form: uint8 pixels -> codes (uint8 without FFX, else int16 in 0..999).

    For a single step these are the authors' integer values: shuffle and negpos outputs times 255,
    FFX codes ``pyffx.Integer(password, length=3).encrypt(v)`` before any scaling. A chain with
    negpos before FFX differs from their code where float32 truncation bites (module notes); with
    ``compat="authors"`` the codes are their integers there too (``E(254 - v)``).
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"encrypt_codes takes uint8 pixels; got {x.dtype}")
    xf = _flat(x, plan)
    y = torch.bitwise_xor(xf, plan.xor_in) if plan.xor_in is not None else _lookup(xf, plan.cls_in, plan.codes)
    return y.index_select(1, plan.index).view(x.shape)


def _refuse_compat(plan: Plan) -> None:
    if plan.block.values is not None:
        raise ValueError(
            "a plan compiled with compat='authors' cannot decrypt: the authors' truncation is not one-to-one "
            "(compile with the default compat='exact')"
        )


def decrypt_codes(codes: Tensor, plan: Plan) -> Tensor:
    """Inverse of :func:`encrypt_codes`: codes -> the original uint8 pixels, bit for bit.

    Raises:
        KeyMismatchError: a code this key cannot produce at that position (wrong key or not a
            ciphertext of this key).
    """
    _refuse_compat(plan)
    if codes.is_floating_point() or codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"decrypt_codes takes integer codes; got {codes.dtype}")
    cf = _flat(codes, plan).index_select(1, plan.inv_index).to(torch.int64)
    if plan.xor_in is not None:
        if cf.numel() and (cf.min() < 0 or cf.max() > PIXEL_MAX):
            raise KeyMismatchError("codes outside 0..255: not a ciphertext of this key (it has no FFX step)")
        return torch.bitwise_xor(cf.to(torch.uint8), plan.xor_in).view(codes.shape)
    if cf.numel() and (cf.min() < 0 or cf.max() > FFX_MAX):
        raise KeyMismatchError(f"codes outside 0..{FFX_MAX}: not a ciphertext of this key")
    x = plan.inv_codes.reshape(-1)[cf + plan.cls_in_dec]
    if x.numel() and x.min() < 0:
        raise KeyMismatchError("codes that this key cannot produce: wrong key, or not a ciphertext of this key")
    return x.to(torch.uint8).view(codes.shape)


def decrypt(y: Tensor, plan: Plan) -> Tensor:
    """Inverse of :func:`encrypt` on its float output: ``round(y * D)`` per position, then exact decode."""
    _refuse_compat(plan)
    if not y.is_floating_point():
        raise TypeError(f"decrypt takes the float output of encrypt; got {y.dtype} (use decrypt_codes)")
    yf = _flat(y, plan)
    codes = torch.round(yf.to(torch.float64) * plan.domain_out).to(torch.int64)
    return decrypt_codes(codes.view(y.shape), plan)


def decrypt_float(y: Tensor, plan: Plan) -> Tensor:
    """Differentiable inverse for key sets without FFX: float [0, 1] -> float [0, 1]."""
    _refuse_compat(plan)
    if plan.sign_in is None:
        raise ValueError("an FFX step has no differentiable inverse; use decrypt() on uint8 data")
    if not y.is_floating_point():
        raise TypeError(f"decrypt_float takes float tensors; got {y.dtype}")
    g = _flat(y, plan).index_select(1, plan.inv_index)
    assert plan.flip_in is not None and plan.sign_in is not None  # set for every plan without FFX
    return ((g - plan.flip_in.to(y.dtype)) * plan.sign_in.to(y.dtype)).view(y.shape)


# --------------------------------------------------------------------------------------------
# Single-transform kernels (convenience forms of the same plan)
# --------------------------------------------------------------------------------------------


def _single(x: Tensor, step: Shuffle | NegPos | FFX, block_size: int) -> Tensor:
    c, h, w = _check_image(x, block_size)
    plan = compile_plan(KeySet(block_size, c, (step,)), (h, w), x.device)
    if x.dtype == torch.uint8:
        return encrypt_codes(x, plan)
    return encrypt(x, plan)


def _as_tuple(v: Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in (v.tolist() if isinstance(v, Tensor) else v))


def block_shuffle(x: Tensor, perm: Tensor | Sequence[int], block_size: int) -> Tensor:
    """Shuffle the pixels of every ``M x M`` block with one permutation: ``out[k] = in[perm[k]]``.

    dtype is preserved; on float tensors it is differentiable.

    Example:
        >>> x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        >>> perm = torch.randperm(48)
        >>> torch.equal(block_unshuffle(block_shuffle(x, perm, 4), perm, 4), x)
        True
    """
    return _single(x, Shuffle(_as_tuple(perm)), block_size)


def block_unshuffle(x: Tensor, perm: Tensor | Sequence[int], block_size: int) -> Tensor:
    """Inverse of :func:`block_shuffle`: shuffle with ``argsort(perm)``."""
    p = torch.as_tensor(_as_tuple(perm))
    return block_shuffle(x, torch.argsort(p), block_size)


def negpos_flip(x: Tensor, mask: Tensor | Sequence[int], block_size: int) -> Tensor:
    """Negative/positive flip: ``255 - v`` (uint8) or ``1 - x`` (float) where ``mask[k]``; its own inverse."""
    return _single(x, NegPos(_as_tuple(mask)), block_size)


def ffx_encrypt(x: Tensor, mask: Tensor | Sequence[int], password: str, block_size: int) -> Tensor:
    """FFX codes (0..999) where ``mask[k]``, the pixel value elsewhere; uint8 input only.

    The result is int16, or uint8 if the mask is all zeros (then no code exceeds 255).
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"ffx_encrypt takes uint8 pixels; got {x.dtype}")
    return _single(x, FFX(_as_tuple(mask), password), block_size)
