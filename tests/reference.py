"""Slow, obviously-correct reference: Python loops over images, blocks and positions.

Shares no code with blockkey: it walks every block of every image, builds the block vector in
(row, col, channel) order by hand, applies the steps one after another on Python ints and writes the
vector back. FFX uses pyffx directly. Returns the integer codes and each position's domain maximum.
"""

from __future__ import annotations

import numpy as np
import pyffx


def _ffx(password: str):
    cipher = pyffx.Integer(password.encode("utf-8"), length=3)
    return cipher.encrypt


def reference_encrypt(x: np.ndarray, steps: list[dict], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``x``: uint8 (N, C, H, W); ``steps``: key-file style dicts. Returns (codes int64, domain int64)."""
    n, c, h, w = x.shape
    m = block_size
    codes = np.zeros(x.shape, dtype=np.int64)
    domain = np.zeros(x.shape, dtype=np.int64)
    ciphers = {i: _ffx(s["password"]) for i, s in enumerate(steps) if s["type"] == "ffx"}
    for img in range(n):
        for bi in range(h // m):
            for bj in range(w // m):
                vec, dom = [], []
                for r in range(m):
                    for col in range(m):
                        for ch in range(c):
                            vec.append(int(x[img, ch, bi * m + r, bj * m + col]))
                            dom.append(255)
                for i, s in enumerate(steps):
                    if s["type"] == "shuffle":
                        vec = [vec[p] for p in s["perm"]]
                        dom = [dom[p] for p in s["perm"]]
                    elif s["type"] == "negpos":
                        vec = [dom[k] - v if s["mask"][k] else v for k, v in enumerate(vec)]
                    elif s["type"] == "ffx":
                        vec = [ciphers[i](v) if s["mask"][k] else v for k, v in enumerate(vec)]
                        dom = [999 if s["mask"][k] else d for k, d in enumerate(dom)]
                    else:
                        raise ValueError(s["type"])
                k = 0
                for r in range(m):
                    for col in range(m):
                        for ch in range(c):
                            codes[img, ch, bi * m + r, bj * m + col] = vec[k]
                            domain[img, ch, bi * m + r, bj * m + col] = dom[k]
                            k += 1
    return codes, domain
