"""Test helpers: seeded test keys with explicit material, random images, device params."""

from __future__ import annotations

import random

import pytest
import torch

from blockkey import FFX, KeySet, NegPos, Shuffle

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


def rand_key(recipe: str, block_size: int, channels: int = 3, seed: int = 0, password: str = "password") -> KeySet:
    """A key with explicit material drawn from a seeded test RNG (reproducible test cases)."""
    rng = random.Random(seed)
    length = block_size * block_size * channels
    steps = []
    for name in recipe.split(","):
        if name == "shuffle":
            perm = list(range(length))
            rng.shuffle(perm)
            steps.append(Shuffle(tuple(perm)))
        elif name == "negpos":
            steps.append(NegPos(tuple(rng.randint(0, 1) for _ in range(length))))
        else:
            steps.append(FFX(tuple(rng.randint(0, 1) for _ in range(length)), password))
    return KeySet(block_size, channels, tuple(steps))


def images(n: int, c: int, h: int, w: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8).to(device)
