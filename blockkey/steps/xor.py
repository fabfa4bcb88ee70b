"""Toy step (shows a one-file key step): XOR the masked pixel values with a secret byte."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KeyFileError
from ._base import PIXEL_MAX, BlockFold, KeyStep, Random, check_mask, int_list, random_mask, register_step

__all__ = ["Xor"]


@register_step
@dataclass(frozen=True, slots=True, repr=False)
class Xor(KeyStep):
    """``v -> v ^ byte`` where ``mask[k] == 1``, on positions that still hold pixels (0..255).

    ``byte`` is 1..254: 0 does nothing and 255 is negpos, so the step is not a signed permutation.
    """

    mask: tuple[int, ...]
    byte: int
    name = "xor"
    linear = False
    nonlinear_reason = "XOR with a byte other than 255 mixes the bits of each pixel value"

    def __repr__(self) -> str:
        return f"Xor(L={len(self.mask)})"

    @classmethod
    def draw(cls, rng: Random, length: int) -> Xor:
        return cls(random_mask(rng, length), 1 + rng.randbelow(254))

    @classmethod
    def from_json(cls, where: str, doc: dict[str, Any]) -> Xor:
        byte = doc.get("byte")
        if not isinstance(byte, int) or isinstance(byte, bool):
            raise KeyFileError(f"{where}: xor needs an integer 'byte'")
        return cls(int_list(where, "mask", doc.get("mask")), byte)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "mask": list(self.mask), "byte": self.byte}

    def validate(self, length: int) -> None:
        check_mask("xor", self.mask, length)
        if not 1 <= self.byte <= 254:
            raise KeyFileError("xor: byte must be in 1..254")

    def key_bits(self) -> float:
        return len(self.mask) + math.log2(254)

    def fold(self, block: BlockFold) -> BlockFold:
        m = torch.tensor(self.mask, dtype=torch.bool) & (block.domain == PIXEL_MAX)
        return BlockFold(block.src, torch.where(m[:, None], block.codes ^ self.byte, block.codes), block.domain)
