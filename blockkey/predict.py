"""The key holder's side: classify images with a trained run directory.

:class:`Predictor` loads a run once (weights, classes, normalisation), checks the key's fingerprint
against the one the model was trained with, and classifies PIL images, uint8 tensors or image files.

Preprocessing (the same for every input): the image is brought to the model's channels (grey is
repeated to RGB, an alpha channel is dropped, RGB becomes grey with ITU-R 601 luma for 1-channel
models), then, unless it already has the trained size, resized (antialiased) so that it covers the
trained size and centre-cropped to it. Runs trained with ``--stream SIZE`` used the ImageNet
evaluation view (shorter side to ``SIZE * 8/7``, centre crop) and get that view here too. Then the
key's transform, the run's normalisation and the network, in float32.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import RunMeta, load_model, read_meta
from .data import Normalize
from .errors import BlockkeyError, ImageFileError, KeyMismatchError, ShapeError
from .imageio import read_image
from .keys import KeySet
from .passport import PassportError, Passports
from .runtime import normalise, pick_device, predict_views
from .transforms import KeyedTransform
from .tta import tta_views

__all__ = [
    "NormalizedNet",
    "Prediction",
    "Predictor",
    "check_model_key",
    "fit_image",
    "list_images",
    "load_normalized_net",
    "to_channels",
]

ImageLike = Any  # a path, a PIL image, a uint8 (C, H, W) tensor or a uint8 (H, W[, C]) array
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as Pillow's "L" conversion


@dataclass(frozen=True)
class Prediction:
    """The ``top_k`` classes of one image, most probable first (softmax probabilities)."""

    classes: tuple[str, ...]
    probs: tuple[float, ...]
    source: str | None = None

    @property
    def label(self) -> str:
        return self.classes[0]

    def to_json(self) -> dict[str, Any]:
        top = [{"class": c, "prob": round(p, 6)} for c, p in zip(self.classes, self.probs, strict=True)]
        return {"path": self.source, "top": top}


class NormalizedNet(nn.Module):
    """``network((y - mean) / std)``: the part of the inference path after the key's transform.

    Its input is the key transform's float output in [0, 1] (plain ``x / 255`` for a model without
    a key): the input of an ONNX export without the key.
    """

    # buffers (registered in __init__)
    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, normalize: Normalize | None, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        mean, std = normalize.tensors(shape, "cpu") if normalize is not None else (torch.zeros(1), torch.ones(1))
        self.register_buffer("mean", mean.contiguous())
        self.register_buffer("std", std.contiguous())

    def forward(self, y: Tensor) -> Tensor:
        return self.model(normalise(y, (self.mean, self.std)))


def check_model_key(
    meta: RunMeta, key: KeySet | None, run_dir: str | os.PathLike[str], passports: Passports | None = None
) -> None:
    """Refuse a key (or passports) that is not the one the model was trained with, or a missing one."""
    model_key, model_passport = meta.key, meta.passport
    if model_passport:
        if key is not None:
            raise PassportError(f"{run_dir} is protected by passports, not a key: give --passport, not --key")
        if passports is None:
            raise PassportError(f"{run_dir} is a passport model: give its passports (--passport FILE)")
        if passports.fingerprint != model_passport["fingerprint"]:
            raise PassportError(
                f"passports {passports.fingerprint} are not those of {run_dir} ({model_passport['fingerprint']})"
            )
        return
    if passports is not None:
        raise PassportError(f"{run_dir} is not a passport model; passports do not apply")
    if model_key is None:
        if key is not None:
            raise KeyMismatchError(f"{run_dir} is not protected: it takes plain images, run it without --key")
        return
    if key is None:
        raise KeyMismatchError(f"{run_dir} is protected (key {model_key.fingerprint}): give its key (--key)")
    if key.fingerprint != model_key.fingerprint:
        raise KeyMismatchError(f"key {key.fingerprint} is not the key of {run_dir} ({model_key.fingerprint})")


def load_normalized_net(
    run_dir: str | os.PathLike[str], passports: Passports | None = None, key: KeySet | None = None
) -> tuple[NormalizedNet, RunMeta]:
    """The run's network with its normalisation in front (float32, eval mode, CPU); passports attached,
    the key's inner part (:mod:`blockkey.inner`) set at the model's keyed points."""
    from .inner import use_inner_key

    model, meta = load_model(run_dir)
    if passports is not None:
        passports.attach(model)
    use_inner_key(model, key)
    net = NormalizedNet(model.float(), meta.normalize, meta.image_shape)
    return net.eval(), meta


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def to_channels(x: Tensor, channels: int) -> Tensor:
    """A uint8 ``(C, H, W)`` image with 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) channels -> ``channels``."""
    c = x.shape[0]
    if c == channels:
        return x
    if channels == 3 and c in (1, 2):
        return x[:1].expand(3, -1, -1).contiguous()
    if channels == 3 and c == 4:
        return x[:3].contiguous()
    if channels == 1 and c == 2:
        return x[:1].contiguous()
    if channels == 1 and c in (3, 4):
        w = torch.tensor(LUMA, dtype=torch.float32).view(3, 1, 1)
        return (x[:3].float() * w).sum(0, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ShapeError(f"the model takes {channels}-channel images; cannot convert a {c}-channel image")


def fit_image(x: Tensor, shape: Sequence[int], stream_view: bool = False) -> Tensor:
    """Bring a uint8 ``(C, H, W)`` image to ``shape`` = ``(C', H', W')`` (see the module docstring)."""
    from torchvision.transforms.v2 import functional as TF

    c, h, w = (int(s) for s in shape)
    if x.dim() != 3 or 0 in x.shape:
        raise ShapeError(f"expected a non-empty (C, H, W) image; got shape {tuple(x.shape)}")
    x = to_channels(x, c)
    if tuple(x.shape[1:]) == (h, w):
        return x
    ih, iw = x.shape[1:]
    scale = max(h / ih, w / iw) * (8 / 7 if stream_view else 1.0)
    # A square stream view is torchvision's Resize(int) on the shorter side, exactly as the stream loader.
    square_stream = stream_view and h == w
    size = [round(h * 8 / 7)] if square_stream else [max(h, round(ih * scale)), max(w, round(iw * scale))]
    x = TF.resize(x, size, antialias=True)
    return TF.center_crop(x, [h, w])


def _as_uint8(image: ImageLike) -> Tensor:
    """A path, PIL image, ``(C, H, W)`` uint8 tensor or ``(H, W[, C])`` uint8 array -> ``(C, H, W)`` uint8."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ShapeError(f"expected a uint8 (H, W) or (H, W, C) array; got {image.dtype} {image.shape}")
        arr = image[:, :, None] if image.ndim == 2 else image
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3:
            raise ShapeError(f"expected a uint8 (C, H, W) tensor; got {image.dtype} {tuple(image.shape)}")
        return image.cpu()
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        mode = image.mode if image.mode in ("L", "LA", "RGB", "RGBA") else "RGB"
        return _as_uint8(np.asarray(image.convert(mode)))
    raise TypeError(f"cannot classify a {type(image).__name__}: give a path, a PIL image or a uint8 tensor")


def list_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders expanded to their image files (torchvision's suffixes, recursive, sorted)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS))
        else:
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------


class Predictor:
    """A run directory loaded once for classification with its key.

    Example (``run/`` trained with ``key.json``)::

        predictor = Predictor("run/", KeySet.load("key.json"))
        predictor("photo.jpg").label             # the most probable class
        predictor([img1, img2], top_k=3)         # PIL images, uint8 (C, H, W) tensors or paths
        predictor.logits(batch)                  # uint8 (N, C, H, W) at the trained size -> float32 logits

    ``tta="flip"`` (or ``"shift"``) averages test-time views of each image (:mod:`blockkey.tta`): a point or
    more of accuracy for 2 (10) forward passes. A passport model takes ``passports=`` instead of a key. A
    key (or passports) that is not the model's raises :class:`~blockkey.errors.KeyMismatchError`
    (:class:`~blockkey.passport.PassportError`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        key: KeySet | str | os.PathLike[str] | None = None,
        *,
        passports: Passports | str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        tta: str | bool = "off",
    ) -> None:
        self.views = tta_views(tta)
        if batch_size < 1:
            raise BlockkeyError(f"batch size must be positive; got {batch_size}")
        key = KeySet.load(key) if isinstance(key, (str, os.PathLike)) else key
        passports = Passports.load(passports) if isinstance(passports, (str, os.PathLike)) else passports
        check_model_key(read_meta(run_dir), key, run_dir, passports)
        self.net, self.meta = load_normalized_net(run_dir, passports, key)
        self.device = pick_device(device)
        self.net.to(self.device)
        self.transform = KeyedTransform(key).to(self.device) if key is not None else None
        self.classes: tuple[str, ...] = self.meta.classes
        self.image_shape: tuple[int, int, int] = self.meta.image_shape
        self.stream_view = self.meta.stream_image_size is not None
        self.batch_size = batch_size

    def preprocess(self, image: ImageLike) -> Tensor:
        """One image -> uint8 ``(C, H, W)`` at the trained size (channels, resize, centre crop)."""
        return fit_image(_as_uint8(image), self.image_shape, self.stream_view)

    @torch.no_grad()
    def logits(self, batch: Tensor) -> Tensor:
        """uint8 ``(N, C, H, W)`` images at the trained size -> float32 logits ``(N, classes)`` on the CPU
        (with ``tta``: the log of the views' averaged probabilities, whose softmax is that average)."""
        if batch.dtype != torch.uint8 or batch.dim() != 4 or tuple(batch.shape[1:]) != self.image_shape:
            raise ShapeError(
                f"expected uint8 (N, {', '.join(map(str, self.image_shape))}); got {batch.dtype} "
                f"{tuple(batch.shape)} (use preprocess() or call the predictor on images)"
            )
        x = batch.to(self.device)
        if self.views is None:
            return self.net(self._keyed(x)).float().cpu()
        return predict_views(self.net, self.views.stack(x, self._keyed), self.views.weights).float().cpu()

    def _keyed(self, x: Tensor) -> Tensor:
        return self.transform(x) if self.transform is not None else x.float().div_(255)

    def _top(self, logits: Tensor, top_k: int, sources: Sequence[str | None]) -> list[Prediction]:
        probs = logits.softmax(1)
        p, i = probs.topk(min(top_k, len(self.classes)), dim=1)
        return [
            Prediction(tuple(self.classes[j] for j in row_i), tuple(row_p), src)
            for row_p, row_i, src in zip(p.tolist(), i.tolist(), sources, strict=True)
        ]

    def __call__(self, images: ImageLike | Sequence[ImageLike], top_k: int = 5) -> Prediction | list[Prediction]:
        """Classify one image (returns a :class:`Prediction`) or a list / ``(N, C, H, W)`` batch (a list)."""
        if top_k < 1:
            raise BlockkeyError(f"top_k must be positive; got {top_k}")
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, Tensor) and images.dim() == 4)
        items = [images] if single else list(images)
        out: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch = torch.stack([self.preprocess(im) for im in chunk])
            sources = [str(im) if isinstance(im, (str, os.PathLike)) else None for im in chunk]
            out.extend(self._top(self.logits(batch), top_k, sources))
        return out[0] if single else out

    def predict_files(
        self, paths: Sequence[str | os.PathLike[str]], top_k: int = 5, progress: bool | None = None
    ) -> Iterator[tuple[str, Prediction | BlockkeyError]]:
        """``(path, prediction)`` for each file, in order; ``(path, error)`` for one that cannot be read."""
        from tqdm import tqdm

        show = progress if progress is not None else len(paths) > self.batch_size and sys.stderr.isatty()
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not show) as bar:
            for start in range(0, len(paths), self.batch_size):
                chunk = [str(p) for p in paths[start : start + self.batch_size]]
                good: list[str] = []
                images: list[Tensor] = []
                results: dict[str, Prediction | BlockkeyError] = {}
                for p in chunk:
                    try:
                        images.append(self.preprocess(p))
                        good.append(p)
                    except (ImageFileError, ShapeError) as e:
                        results[p] = e if str(e).startswith(p) else type(e)(f"{p}: {e}")
                if images:
                    for p, pred in zip(good, self._top(self.logits(torch.stack(images)), top_k, good), strict=True):
                        results[p] = pred
                for p in chunk:
                    yield p, results[p]
                bar.update(len(chunk))
