"""Image packs: an ImageFolder of JPEG files in one small ``.npz``, byte-exact, for machines it must travel to.

CIFAR-10's 50,000 training JPEGs take 46 MB as files, but every one starts with the same 623-byte
header (quantisation and Huffman tables, frame and scan headers); only the entropy-coded scan after
it differs (about 300 bytes). A pack stores each distinct header once and each file's remainder,
and stores a file whose bytes equal one of the embedded demo images (:func:`blockkey.data.load_demo`:
9,000 of those same files) as a reference to it. CIFAR-10's training folder becomes 12 MB. Loading
rebuilds every file's exact bytes, checks them against the SHA-256 recorded when packing, and
decodes them; the pixels are those of the folder (:func:`blockkey.data.load_image_folder`).

    pack_image_folder("../shared/datasets/cifar10/train", ".gpudata/cifar10-train.npz")
    data = load_image_pack(".gpudata/cifar10-train.npz")   # or load_dataset("....npz")
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .data import DataError, ImageTensors, _list_image_folder
from .fileio import atomic_path
from .jsonio import loads

__all__ = ["decode_images", "load_image_pack", "pack_image_folder"]

PACK_FORMAT = "blockkey-image-pack"


def _decode(blobs: Sequence[bytes]) -> np.ndarray:
    from .imageio import open_image

    out = []
    for b in blobs:
        with open_image(io.BytesIO(b), "an image of the pack") as im:
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def decode_images(blobs: Sequence[bytes], workers: int | None = None) -> np.ndarray:
    """Encoded same-size images -> uint8 ``(N, H, W, 3)``, decoded in ``workers`` processes (default: all cores)."""
    chunks = [blobs[i : i + 2000] for i in range(0, len(blobs), 2000)]
    workers = min(len(chunks), workers or os.cpu_count() or 1)
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                return np.concatenate(list(pool.map(_decode, chunks)))
        return np.concatenate([_decode(c) for c in chunks])
    except ValueError as e:
        raise DataError(f"images differ in size; the in-memory path needs one size ({e})") from None


def _demo_blobs() -> list[bytes]:
    with resources.as_file(resources.files("blockkey") / "data" / "cifar10_demo.npz") as p, np.load(p) as z:
        blob, offsets = z["jpeg"].tobytes(), z["offsets"]
    return [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _split_jpeg(b: bytes) -> int:
    """Length of a baseline JPEG's header (through the start-of-scan segment); 0 for anything else."""
    if not b.startswith(b"\xff\xd8"):
        return 0
    i = 2
    while i + 4 <= len(b) and b[i] == 0xFF:
        marker, length = b[i + 1], int.from_bytes(b[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            return i
    return 0


def _lengths(parts: Sequence[bytes]) -> np.ndarray:
    return np.array([len(p) for p in parts], dtype=np.uint32)


def _offsets(lengths: np.ndarray) -> list[int]:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()


def pack_image_folder(root: str | os.PathLike[str], dest: str | os.PathLike[str]) -> dict:
    """Pack the ImageFolder tree ``root`` into ``dest`` (.npz); returns a summary (images, bytes, demo references)."""
    classes, samples = _list_image_folder(Path(root))
    demo = {hashlib.sha256(b).digest(): i for i, b in enumerate(_demo_blobs())}
    headers: dict[bytes, int] = {b"": 0}
    head_id, demo_ref, bodies = [], [], []
    digest = hashlib.sha256()
    for path, _ in samples:
        b = Path(path).read_bytes()
        digest.update(b)
        ref = demo.get(hashlib.sha256(b).digest(), -1)
        k = 0 if ref >= 0 else _split_jpeg(b)
        head_id.append(headers.setdefault(b[:k], len(headers)))
        demo_ref.append(ref)
        bodies.append(b"" if ref >= 0 else b[k:])
    heads = list(headers)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        np.savez_compressed(  # the bodies do not compress; the index arrays do
            tmp,
            format=PACK_FORMAT,
            classes=json.dumps(classes),
            labels=np.array([label for _, label in samples], dtype=np.int16),
            heads=np.frombuffer(b"".join(heads), np.uint8),
            head_lengths=_lengths(heads),
            head_id=np.array(head_id, dtype=np.int32),
            demo_ref=np.array(demo_ref, dtype=np.int32),
            body=np.frombuffer(b"".join(bodies), np.uint8),
            body_lengths=_lengths(bodies),
            sha256=digest.hexdigest(),
        )
    refs = sum(r >= 0 for r in demo_ref)
    return {"images": len(samples), "bytes": dest.stat().st_size, "demo_references": refs, "headers": len(heads) - 1}


def load_image_pack(path: str | os.PathLike[str], workers: int | None = None) -> ImageTensors:
    """A pack written by :func:`pack_image_folder` -> :class:`ImageTensors` (the folder's pixels, order and classes)."""
    try:
        with np.load(path) as z:
            if str(z["format"]) != PACK_FORMAT:
                raise DataError(f"{path}: not a blockkey image pack")
            doc = {k: z[k] for k in z.files}
        missing = {"heads", "head_lengths", "body", "body_lengths", "head_id", "demo_ref"} - set(doc)
        if missing:
            raise DataError(f"{path}: the image pack is damaged (missing {', '.join(sorted(missing))})")
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:  # TypeError: a .npy
        raise DataError(f"{path}: cannot read the image pack ({e})") from None
    hb, ho = doc["heads"].tobytes(), _offsets(doc["head_lengths"])
    bb, bo = doc["body"].tobytes(), _offsets(doc["body_lengths"])
    demo = _demo_blobs() if (doc["demo_ref"] >= 0).any() else []
    blobs = []
    for i, (h, ref) in enumerate(zip(doc["head_id"].tolist(), doc["demo_ref"].tolist(), strict=True)):
        blobs.append(demo[ref] if ref >= 0 else hb[ho[h] : ho[h + 1]] + bb[bo[i] : bo[i + 1]])
    digest = hashlib.sha256()
    for b in blobs:
        digest.update(b)
    if digest.hexdigest() != str(doc["sha256"]):
        raise DataError(f"{path}: the rebuilt files do not match the packed checksum (damaged pack?)")
    images = decode_images(blobs, workers).transpose(0, 3, 1, 2).copy()
    labels = torch.from_numpy(doc["labels"].astype(np.int64))
    classes = loads(str(doc["classes"]), f"{path}: the image pack's class names", DataError)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: the image pack's class names are not a list of names")
    return ImageTensors(torch.from_numpy(images), labels, tuple(classes))
