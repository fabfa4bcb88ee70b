"""Pixel shuffling (SHF): one permutation of the block positions, ``out[k] = in[perm[k]]``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import KeyFileError
from ._base import BlockFold, KeyStep, Random, int_list, random_perm, register_step

__all__ = ["Shuffle"]


@register_step
@dataclass(frozen=True, slots=True, repr=False)
class Shuffle(KeyStep):
    """Pixel shuffling inside each block: ``out[k] = in[perm[k]]``."""

    perm: tuple[int, ...]
    name = "shuffle"
    linear = True
    aliases = ("shf",)

    def __repr__(self) -> str:
        return f"Shuffle(L={len(self.perm)})"  # never the permutation: reprs end up in logs

    @classmethod
    def draw(cls, rng: Random, length: int) -> Shuffle:
        return cls(random_perm(rng, length))

    @classmethod
    def from_json(cls, where: str, doc: dict[str, Any]) -> Shuffle:
        return cls(int_list(where, "perm", doc.get("perm")))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "perm": list(self.perm)}

    def validate(self, length: int) -> None:
        if len(self.perm) != length or sorted(self.perm) != list(range(length)):
            # Never echo the values: error messages end up in terminals and logs.
            raise KeyFileError(
                f"shuffle: perm must be a permutation of 0..{length - 1}; got {len(self.perm)} values, "
                f"{len(set(self.perm))} distinct"
            )

    def key_bits(self) -> float:
        return math.lgamma(len(self.perm) + 1) / math.log(2)

    def fold(self, block: BlockFold) -> BlockFold:
        perm = torch.tensor(self.perm)
        return BlockFold(block.src[perm], block.codes[perm], block.domain[perm])

    def fold_authors(self, values: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        perm = torch.tensor(self.perm)
        return values[perm], domain[perm]
