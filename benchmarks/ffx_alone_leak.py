"""Why FFX alone does not protect: which block positions does the FFX model actually use?

An FFX key encrypts only the positions its mask selects (about half); the others pass in the clear.
This script evaluates the released FFX reproduction model (checkpoints/ffx) on its held-out split
with the correct key, with plain images, and with the correct key but one group of positions blanked
(set to its normalisation mean, i.e. zero after normalisation): the FFX-encrypted positions, or the
clear ones. If blanking the encrypted positions costs little, the model reads the clear half, which
plain images present unchanged.

    python benchmarks/ffx_alone_leak.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from blockkey import KeyedTransform, KeySet, bench
from blockkey.attacks import Target, accuracy
from blockkey.checkpoint import load_model, write_json_atomic
from blockkey.data import load_dataset, stratified_split
from blockkey.functional import from_blocks


class Blanked(nn.Module):
    """uint8 -> key -> normalisation -> zero where ``keep`` is False (a C x H x W mask)."""

    def __init__(self, target: Target, keep: torch.Tensor) -> None:
        super().__init__()
        self.t = KeyedTransform(target.key)
        self.norm = target.normalize
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * 255).round().to(torch.uint8)  # the loader hands [0, 1] floats to front-ends
        y = self.t(x)
        mean, std = self.norm.tensors(tuple(y.shape[-3:]), y.device)
        return ((y - mean) / std) * self.keep.to(y.device)


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__)
    ap.add_argument("--model", default="checkpoints/ffx")
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    args = ap.parse_args(argv)
    model, meta = load_model(args.model)
    key = KeySet.load(f"{args.model}/key.json")
    d = meta["data"]
    _, val = stratified_split(load_dataset(args.data), d.get("val_fraction", 0.1), d.get("split_seed", 0))
    target = Target(model, meta, key, val)
    m, c = key.block_size, key.channels
    h, w = val.image_shape[1:]
    ffx_mask = torch.zeros(m * m * c)
    for step in key.steps:
        if step.name == "ffx":
            ffx_mask = torch.maximum(ffx_mask, torch.tensor(step.mask, dtype=torch.float32))
    encrypted = from_blocks(ffx_mask.expand(h // m, w // m, -1), m, c)
    rows = [
        ("correct key", accuracy(target, KeyedTransform(key))),
        ("plain images", accuracy(target, None)),
        ("correct key, FFX positions blanked (clear half only)", accuracy(target, Blanked(target, 1 - encrypted))),
        ("correct key, clear positions blanked (FFX half only)", accuracy(target, Blanked(target, encrypted))),
    ]
    print(f"{args.model}: {int(ffx_mask.sum())} of {m * m * c} block positions FFX-encrypted; {len(val)} images")
    print(bench.markdown_table(["input", "accuracy"], [(name, f"{acc:.1%}") for name, acc in rows]))
    if args.json:
        write_json_atomic(Path(args.json), {"machine": bench.machine("cpu"), "model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
