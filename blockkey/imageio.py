"""Image files <-> uint8 / code tensors, losslessly.

Plain images are read with Pillow (any format it reads; palette images are expanded). Ciphertexts
are PNG: 8-bit when every code fits a byte (shuffle, negpos), 16-bit when FFX codes (0..999) are
present. 16-bit PNGs are read and written with pypng because Pillow reduces 16-bit RGB to 8 bits.
Lossy output formats are refused: they would destroy a ciphertext.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import IO

import numpy as np
import png
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import ImageFileError
from .fileio import atomic_path, refuse_existing, show_path

__all__ = [
    "LOSSLESS_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "check_output_suffix",
    "check_pixels",
    "max_image_pixels",
    "open_image",
    "read_codes",
    "read_image",
    "sample_image",
    "set_max_image_pixels",
    "write_png",
]

#: Largest image (width x height) blockkey decodes: 8192 x 8192. Raise it with ``blockkey --max-pixels N``,
#: the environment variable ``BLOCKKEY_MAX_PIXELS`` or :func:`set_max_image_pixels`; docs/reliability.md.
MAX_IMAGE_PIXELS = 8192 * 8192
_max_pixels: int | None = None


def max_image_pixels() -> int:
    """The pixel limit in force: :func:`set_max_image_pixels`, else ``BLOCKKEY_MAX_PIXELS``, else the default."""
    if _max_pixels is not None:
        return _max_pixels
    env = os.environ.get("BLOCKKEY_MAX_PIXELS", "").strip()
    if env:
        if not (env.isascii() and env.isdigit() and 0 < len(env) <= 18 and int(env) > 0):
            raise ImageFileError(f"BLOCKKEY_MAX_PIXELS must be a positive integer of pixels; got {env[:40]!r}")
        return int(env)
    return MAX_IMAGE_PIXELS


def set_max_image_pixels(pixels: int | None) -> None:
    """Decode images of up to ``pixels`` pixels (``None``: back to the environment or the default)."""
    global _max_pixels
    if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1):
        raise ImageFileError(f"the pixel limit must be a positive integer; got {pixels!r}")
    _max_pixels = pixels
    if pixels is not None and Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = pixels  # Pillow's own bomb check must not undercut the limit asked for


def check_pixels(width: int, height: int, source: str) -> None:
    """Refuse an image above the pixel limit, in one line, before it is decoded."""
    limit = max_image_pixels()
    if width * height > limit:
        raise ImageFileError(
            f"{source}: {width}x{height} = {width * height} pixels is above blockkey's limit of {limit} "
            "(raise it with blockkey --max-pixels N or BLOCKKEY_MAX_PIXELS)"
        )


@contextmanager
def open_image(file: str | os.PathLike[str] | IO[bytes], source: str | None = None) -> Iterator[Image.Image]:
    """``PIL.Image.open`` under blockkey's pixel limit: one :class:`ImageFileError` line above it, and
    Pillow's own decompression-bomb warning never printed (the limit is ours)."""
    name = source if source is not None else show_path(file) if isinstance(file, (str, os.PathLike)) else "image"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(file)
        except Image.DecompressionBombError:
            raise ImageFileError(f"{name}: image too large (above Pillow's limit; see blockkey --max-pixels)") from None
        with im:
            check_pixels(*im.size, name)
            yield im


LOSSLESS_SUFFIXES = (".png",)
_LOSSY = {".jpg", ".jpeg", ".jfif", ".webp", ".heic", ".heif", ".avif", ".gif", ".jp2"}


def check_output_suffix(path: str | os.PathLike[str]) -> None:
    """Refuse anything but PNG for a file blockkey writes (clear message for lossy formats)."""
    suffix = Path(path).suffix.lower()
    if suffix in _LOSSY:
        raise ImageFileError(f"{path}: {suffix} is lossy (or palette-quantised) and would corrupt the pixels; use .png")
    if suffix not in LOSSLESS_SUFFIXES:
        raise ImageFileError(f"{path}: unsupported output format {suffix or '(none)'!r}; use .png")


def _to_chw(arr: np.ndarray) -> Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def read_image(path: str | os.PathLike[str]) -> Tensor:
    """An 8-bit image file -> uint8 tensor ``(C, H, W)``; C is 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA)."""
    try:
        with open_image(path) as im:
            if im.format == "PNG" and _png_bit_depth(path) == 16:
                raise ImageFileError(
                    f"{path}: 16-bit PNG; blockkey encrypts 8-bit pixels (a 16-bit PNG may be a ciphertext: decrypt it)"
                )
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                raise ImageFileError(f"{path}: {im.mode} images are not supported; blockkey works on 8-bit pixels")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path}: is a directory, not an image") from None
    except ImageFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error) as e:
        raise ImageFileError(f"{path}: cannot read image ({e})") from None
    return _to_chw(arr)


def _png_bit_depth(path: str | os.PathLike[str]) -> int:
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else 8


def read_codes(path: str | os.PathLike[str]) -> Tensor:
    """A ciphertext PNG (8- or 16-bit) -> integer tensor ``(C, H, W)`` (uint8 or int16), exact."""
    try:
        with open(path, "rb") as f:
            reader = png.Reader(file=f)
            reader.preamble()
            check_pixels(reader.width, reader.height, show_path(path))
            width, height, rows, info = reader.asDirect()
            arr = np.vstack([np.asarray(r) for r in rows])
    except FileNotFoundError:
        raise ImageFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path}: is a directory, not an image") from None
    except (png.Error, OSError, ValueError, EOFError, zlib.error) as e:  # EOFError: an empty file
        raise ImageFileError(f"{path}: not a readable PNG ciphertext ({e or 'empty file'})") from None
    planes = info["planes"]
    arr = arr.reshape(height, width, planes)
    dtype = np.int16 if info["bitdepth"] > 8 else np.uint8
    if info["bitdepth"] > 8 and arr.max(initial=0) > np.iinfo(np.int16).max:
        raise ImageFileError(f"{path}: 16-bit values above 32767 cannot be blockkey codes")
    return _to_chw(arr.astype(dtype))


def write_png(path: str | os.PathLike[str], x: Tensor, *, overwrite: bool = False) -> Path:
    """Write a ``(C, H, W)`` integer tensor as PNG: 8-bit if it fits, else 16-bit. Atomic."""
    path = Path(path)
    check_output_suffix(path)
    if x.dim() != 3 or x.shape[0] not in (1, 2, 3, 4):
        raise ImageFileError(f"{path}: expected a (C, H, W) image with C in 1..4; got shape {tuple(x.shape)}")
    if x.is_floating_point():
        raise ImageFileError(f"{path}: write_png takes integer pixels or codes; got {x.dtype}")
    refuse_existing(path, overwrite)
    arr = x.detach().cpu().to(torch.int32).numpy().transpose(1, 2, 0)
    lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
    if lo < 0 or hi > 65535:
        raise ImageFileError(f"{path}: values {lo}..{hi} do not fit a PNG")
    c = arr.shape[2]
    bitdepth = 8 if (x.dtype == torch.uint8 or hi <= 255) and x.dtype != torch.int16 else 16
    writer = png.Writer(
        width=arr.shape[1], height=arr.shape[0], greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=bitdepth
    )
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            writer.write(f, arr.reshape(arr.shape[0], -1).astype(np.uint16 if bitdepth == 16 else np.uint8))
    except OSError as e:  # name the file the user asked for, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    return path


def sample_image() -> Tensor:
    """The embedded sample: 16 CIFAR-10 training images (Krizhevsky 2009) as one 128x128 RGB mosaic."""
    with resources.as_file(resources.files("blockkey") / "data" / "sample.png") as p:
        return read_image(p)
