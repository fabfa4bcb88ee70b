"""FFX format-preserving encryption of the masked positions (pixel values 0..255 -> codes 0..999)."""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..errors import KeyFileError
from ._base import PIXEL_MAX, BlockFold, KeyStep, Random, check_mask, int_list, random_mask, register_step

__all__ = ["FFX", "FFX_MAX", "ffx_table", "password_bits", "random_password"]

FFX_MAX = 999
_PASSWORD_ALPHABET = string.digits + string.ascii_lowercase
_GENERATED_PASSWORD_CHARS = 25  # 25 base-36 characters: 129.2 bits, exactly what password_bits() credits


def password_bits(password: str) -> float:
    """Upper bound on a password's entropy: length x log2(size of the character classes it uses).

    Generated passwords are 25 uniformly random base-36 characters, for which the bound is exact
    (129.2 bits). Only the string is looked at: nothing outside the key material is trusted.
    """
    classes = [string.ascii_lowercase, string.ascii_uppercase, string.digits]
    size = sum(len(c) for c in classes if any(ch in c for ch in password))
    if any(not any(ch in c for c in classes) for ch in password):
        size += 33  # printable punctuation and space
    return len(password) * math.log2(max(size, 2))


def random_password(rng: Random) -> str:
    """25 uniformly random base-36 characters (129.2 bits)."""
    return "".join(_PASSWORD_ALPHABET[rng.randbelow(len(_PASSWORD_ALPHABET))] for _ in range(_GENERATED_PASSWORD_CHARS))


@lru_cache(maxsize=64)
def ffx_table(password: str) -> tuple[int, ...]:
    """The 1000-entry FFX codebook ``E(v)`` for ``v`` in 0..999 (a permutation of 0..999).

    ``pyffx.Integer(password.encode(), length=3)``, as in the authors' code. Cached per password.
    """
    import pyffx  # imported here: the kernels stay pure torch

    cipher = pyffx.Integer(password.encode("utf-8"), length=3)
    return tuple(int(cipher.encrypt(v)) for v in range(1000))


@register_step
@dataclass(frozen=True, slots=True, repr=False)
class FFX(KeyStep):
    """FFX format-preserving encryption of the values where ``mask[k] == 1``.

    ``E = pyffx.Integer(password, length=3)`` is a bijection on 0..999, so the step maps pixel values
    (0..255) to codes 0..999, exactly as the authors' code does. The paper draws the mask at
    random; the recipe step ``ffx-all`` encrypts every position (no value is left in the clear).
    """

    mask: tuple[int, ...]
    password: str
    name = "ffx"
    linear = False
    nonlinear_reason = "FFX maps each pixel value through a keyed non-linear table (a bijection of 0..255 into 0..999)"

    def __repr__(self) -> str:
        return f"FFX(L={len(self.mask)}, password=<hidden>)"

    @classmethod
    def tokens(cls) -> dict[str, Callable[[Random, int], KeyStep]]:
        return {"ffx": cls.draw, "ffx-all": cls.draw_all}

    def token(self) -> str:
        return "ffx-all" if all(self.mask) else self.name

    @classmethod
    def draw(cls, rng: Random, length: int) -> FFX:
        return cls(random_mask(rng, length), random_password(rng))

    @classmethod
    def draw_all(cls, rng: Random, length: int) -> FFX:
        """``ffx-all``: every position encrypted (the mask is public; the password is the key)."""
        return cls((1,) * length, random_password(rng))

    @classmethod
    def from_json(cls, where: str, doc: dict[str, Any]) -> FFX:
        password = doc.get("password")
        if not isinstance(password, str):
            raise KeyFileError(f"{where}: ffx needs a 'password' string")
        return cls(int_list(where, "mask", doc.get("mask")), password)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "mask": list(self.mask), "password": self.password}

    def validate(self, length: int) -> None:
        check_mask("ffx", self.mask, length)
        if not isinstance(self.password, str) or not self.password:
            raise KeyFileError("ffx: password must be a non-empty string")
        try:
            self.password.encode("utf-8")
        except UnicodeEncodeError:
            raise KeyFileError("ffx: password is not valid Unicode text") from None

    def key_bits(self) -> float:
        mask_bits = 0.0 if all(self.mask) else float(len(self.mask))  # ffx-all: the mask is public
        return mask_bits + password_bits(self.password)

    def fold(self, block: BlockFold) -> BlockFold:
        m = torch.tensor(self.mask, dtype=torch.bool)
        table = torch.tensor(ffx_table(self.password))
        codes = torch.where(m[:, None], table[block.codes], block.codes)
        return BlockFold(block.src, codes, torch.where(m, FFX_MAX, block.domain))

    def fold_authors(self, values: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        m = torch.tensor(self.mask, dtype=torch.bool)
        table = torch.tensor(ffx_table(self.password)[:256])  # their lookup: E on 0..255 only
        q = (torch.clamp(values, 0, 1) * PIXEL_MAX).long()
        q = torch.where(m[:, None], table[q], q)
        return q.float() / table.max(), torch.full((len(self.mask),), int(table.max()))
