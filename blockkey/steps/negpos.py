"""Negative/positive (NP): ``v -> D - v`` where the mask is set (``1 - x`` on the [0, 1] scale)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._base import BlockFold, KeyStep, Random, check_mask, int_list, random_mask, register_step

__all__ = ["NegPos"]


@register_step
@dataclass(frozen=True, slots=True, repr=False)
class NegPos(KeyStep):
    """Negative/positive flip: ``out[k] = 255 - in[k]`` where ``mask[k] == 1`` (``1 - x`` on floats)."""

    mask: tuple[int, ...]
    name = "negpos"
    linear = True
    aliases = ("np", "neg")

    def __repr__(self) -> str:
        return f"NegPos(L={len(self.mask)})"

    @classmethod
    def draw(cls, rng: Random, length: int) -> NegPos:
        return cls(random_mask(rng, length))

    @classmethod
    def from_json(cls, where: str, doc: dict[str, Any]) -> NegPos:
        return cls(int_list(where, "mask", doc.get("mask")))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "mask": list(self.mask)}

    def validate(self, length: int) -> None:
        check_mask("negpos", self.mask, length)

    def key_bits(self) -> float:
        return float(len(self.mask))

    def fold(self, block: BlockFold) -> BlockFold:
        m = torch.tensor(self.mask, dtype=torch.bool)
        codes = torch.where(m[:, None], block.domain[:, None] - block.codes, block.codes)
        return BlockFold(block.src, codes, block.domain)

    def fold_authors(self, values: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        m = torch.tensor(self.mask, dtype=torch.bool)
        return torch.where(m[:, None], 1 - values, values), domain
