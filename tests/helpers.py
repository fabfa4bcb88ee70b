"""Test helpers: seeded test keys drawn through the key-step registry, random images, device params."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from blockkey import KeyFileError, KeySet
from blockkey.data import ImageTensors
from blockkey.keys import InnerKey, parse_recipe
from blockkey.steps import TOKENS

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
#: Recipes the kernel and conformance tests run on (orders and repeats included).
RECIPES = ["shuffle", "negpos", "ffx", "shuffle,negpos,ffx", "ffx,negpos", "negpos,ffx,shuffle,ffx", "negpos,negpos"]


def steps_json(key: KeySet) -> list[dict]:
    return [s.to_json() for s in key.steps]


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


def colour_data(n_per_class: int = 40, size: int = 8, classes: int = 3, seed: int = 0) -> ImageTensors:
    """A learnable toy set: class c has a bright patch in channel c plus noise."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for c in range(classes):
        x = torch.randint(0, 100, (n_per_class, 3, size, size), generator=g)
        x[:, c % 3, : size // 2] += 150
        imgs.append(x.clamp(0, 255).to(torch.uint8))
        labels.append(torch.full((n_per_class,), c))
    return ImageTensors(torch.cat(imgs), torch.cat(labels), tuple(f"class{c}" for c in range(classes)))


def write_folder(root, data: ImageTensors):
    for i, (img, label) in enumerate(zip(data.images, data.labels, strict=True)):
        d = root / data.classes[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return root


def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib figure saved from now on (the files are still written): tests read the plotted data."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved: list = []
    original = Figure.savefig

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def grid_panels(path, width: int, height: int, count: int) -> list[torch.Tensor]:
    """The ``count`` image panels of a :func:`blockkey.show.step_grid` PNG, back at ``width x height`` (C, H, W)."""
    scale = max(1, -(-192 // width))
    pad, title_h = 6, 16
    with Image.open(path) as im:
        assert im.size == (count * (width * scale + pad) + pad, height * scale + title_h + 2 * pad)
        arr = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    x0 = [pad + i * (width * scale + pad) for i in range(count)]
    return [arr[:, title_h + pad :: scale, x : x + width * scale : scale][:, :height] for x in x0]


def with_inner(key: KeySet, seed: int = 0) -> KeySet:
    """``key`` with a fixed (test-only) inner part derived from ``seed``."""
    return KeySet(key.block_size, key.channels, key.steps, inner=InnerKey(bytes((seed + i) % 256 for i in range(32))))


def fit_inner_toy(data: ImageTensors, run) -> tuple[ImageTensors, ImageTensors, KeySet]:
    """A small patchnet, trained into ``run`` with a negpos + inner key on ``data`` (a learnable
    toy set; a quarter held out). Returns ``(train, val, key)``."""
    from blockkey.data import stratified_split
    from blockkey.train import TrainConfig, fit

    train, val = stratified_split(data, 0.25, 0)
    key = with_inner(rand_key("negpos", 4, seed=5), 11)
    cfg = TrainConfig(
        model="patchnet",
        model_kwargs={"patch": 4, "width": 0.25},
        epochs=8,
        batch_size=16,
        lr=0.05,
        amp="off",
    )
    fit(train, val, key, cfg, run, progress=False, log=lambda s: None)
    return train, val, key
