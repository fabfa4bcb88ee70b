"""Test helpers: seeded test keys drawn through the key-step registry, random images, device params."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from blockkey import KeyFileError, KeySet
from blockkey.keys import parse_recipe
from blockkey.steps import TOKENS

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


class SeededRandom:
    """The registry's randomness interface on a seeded ``random.Random``: reproducible test keys, never secret."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def token(self, nbytes: int) -> bytes:
        return self._rng.randbytes(nbytes)


def rand_key(recipe: str, block_size: int, channels: int = 3, seed: int = 0, password: str = "password") -> KeySet:
    """A key drawn by the registered steps from a seeded test RNG (reproducible test cases).

    Steps with a password get ``password`` (tests compare against tables of known passwords). Unknown
    names raise :class:`KeyFileError`, as ``KeySet.generate`` does.
    """
    rng = SeededRandom(seed)
    length = block_size * block_size * channels
    steps = []
    for name in parse_recipe(recipe):
        if name not in TOKENS:
            raise KeyFileError(f"rand_key: {name!r} is not a block step ({', '.join(TOKENS)})")
        step = TOKENS[name].draw(rng, length)
        if "password" in {f.name for f in dataclasses.fields(step)}:  # type: ignore[arg-type]
            step = dataclasses.replace(step, password=password)  # type: ignore[type-var]
        steps.append(step)
    return KeySet(block_size, channels, tuple(steps))


def images(n: int, c: int, h: int, w: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8).to(device)
