"""A picture of what a key does: the original, the output after each step, and the decryption."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from . import functional as F
from .keys import KeySet

__all__ = ["step_grid", "step_panels"]


def step_panels(key: KeySet, image: Tensor) -> list[tuple[str, Tensor]]:
    """``[(title, uint8 (C, H, W))]``: original, after steps 1..k (cumulative), decrypted.

    Outputs are shown on the [0, 1] float scale the network sees, times 255.
    """
    h, w = image.shape[-2:]
    panels = [("original", image)]
    for i in range(len(key.steps)):
        prefix = KeySet(key.block_size, key.channels, key.steps[: i + 1])
        y = F.encrypt(image[None], F.compile_plan(prefix, (h, w)))[0]
        panels.append(("+".join(prefix.recipe), (y * 255).round().to(torch.uint8)))
    plan = F.compile_plan(key, (h, w))
    panels.append(("decrypted", F.decrypt(F.encrypt(image[None], plan), plan)[0]))
    return panels


def step_grid(key: KeySet, image: Tensor, *, min_width: int = 192) -> Image.Image:
    """The panels of :func:`step_panels` side by side with titles, upscaled (nearest) for small images."""
    panels = step_panels(key, image)
    c, h, w = image.shape
    scale = max(1, -(-min_width // w))
    pad, title_h = 6, 16
    width = len(panels) * (w * scale + pad) + pad
    canvas = Image.new("RGB", (width, h * scale + title_h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, img) in enumerate(panels):
        arr = img[:3] if c >= 3 else img[:1].expand(3, h, w)
        pil = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), "RGB")
        pil = pil.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        x0 = pad + i * (w * scale + pad)
        canvas.paste(pil, (x0, title_h + pad))
        draw.text((x0, 2), title, fill="black")
    return canvas
