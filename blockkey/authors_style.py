"""The authors' implementation style (fugokidi/block_transform, keydefense.py), re-expressed.

Float [0, 1] NCHW tensors, one transform at a time: segment into block vectors, index with the key,
integrate back. Written from the description in ../shared/reference/paper-digest.md section 6 and
kept deliberately in that style (including FFX's floor quantisation and division by the table's
maximum) so that conformance tests compare against it and benchmarks can time it. Keys are passed in
explicitly instead of being drawn from ``torch.manual_seed``. The library never uses it: it is the
reference of the conformance tests and the baseline of benchmarks/transform_throughput.py (so it
lives in the package, importable by both without path tricks).
"""

from __future__ import annotations

import pyffx
import torch


class AuthorsBlock:
    def __init__(self, block_size: int, height: int, width: int, channels: int = 3) -> None:
        self.m, self.c = block_size, channels
        self.bh, self.bw = height // block_size, width // block_size

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = x.reshape(-1, self.bh, self.m, self.bw, self.m, self.c)
        x = x.permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, self.bh, self.bw, self.m * self.m * self.c)

    def integrate(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.bh, self.bw, self.m, self.m, self.c)
        x = x.permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, self.bh * self.m, self.bw * self.m, self.c)
        return x.permute(0, 3, 1, 2)


class AuthorsShuffle(AuthorsBlock):
    def __init__(self, perm, *args) -> None:
        super().__init__(*args)
        self.key = torch.as_tensor(perm)

    def __call__(self, x: torch.Tensor, decrypt: bool = False) -> torch.Tensor:
        x = self.segment(x)
        x = x[:, :, :, torch.argsort(self.key)] if decrypt else x[:, :, :, self.key]
        return self.integrate(x).contiguous()


class AuthorsNP(AuthorsBlock):
    def __init__(self, mask, *args) -> None:
        super().__init__(*args)
        self.key = torch.as_tensor(mask).bool()

    def __call__(self, x: torch.Tensor, decrypt: bool = False) -> torch.Tensor:
        x = self.segment(x)
        x[:, :, :, self.key] = 1 - x[:, :, :, self.key]
        return self.integrate(x).contiguous()


class AuthorsFFX(AuthorsBlock):
    def __init__(self, mask, password: str, *args) -> None:
        super().__init__(*args)
        self.key = torch.as_tensor(mask).bool()
        fpe = pyffx.Integer(password.encode(), length=3)
        self.lookup = torch.tensor([fpe.encrypt(v) for v in range(256)])
        self.relookup = torch.tensor([fpe.decrypt(v) for v in range(1000)])

    def __call__(self, x: torch.Tensor, decrypt: bool = False) -> torch.Tensor:
        x = self.segment(x)
        if decrypt:
            x = (x * self.lookup.max()).long()
            x[:, :, :, self.key] = self.relookup[x[:, :, :, self.key]]
            x = x.float() / 255.0
        else:
            x = torch.clamp(x, 0, 1)
            x = (x * 255).long()
            x[:, :, :, self.key] = self.lookup[x[:, :, :, self.key]].clone()
            x = x.float() / self.lookup.max()
        return self.integrate(x).contiguous()


def authors_chain(
    steps: list[dict], block_size: int, height: int, width: int, channels: int = 3
) -> list[AuthorsShuffle | AuthorsNP | AuthorsFFX]:
    """The steps of a key file as a list of authors'-style transforms, to be applied in order."""
    args = (block_size, height, width, channels)
    out: list[AuthorsShuffle | AuthorsNP | AuthorsFFX] = []
    for s in steps:
        if s["type"] == "shuffle":
            out.append(AuthorsShuffle(s["perm"], *args))
        elif s["type"] == "negpos":
            out.append(AuthorsNP(s["mask"], *args))
        else:
            out.append(AuthorsFFX(s["mask"], s["password"], *args))
    return out
