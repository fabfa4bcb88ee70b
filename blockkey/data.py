"""Datasets as uint8 tensors, a seeded stratified split, and an on-device batch loader.

In-memory data (CIFAR, any ImageFolder of same-size images) is decoded once into a uint8
``(N, C, H, W)`` tensor and cached on disk; the cache is keyed by the source's file list, sizes and
modification times, so it is rebuilt when the source changes. :class:`BatchLoader` then produces
batches on the target device with no per-image Python work: index, augment on plain uint8 (random
crop with padding, horizontal flip), apply the keyed plan, normalise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import Tensor

from .errors import BlockkeyError, OptionError
from .fileio import atomic_path
from .runtime import normalise
from .transforms import KeyedTransform
from .tta import Views

__all__ = [
    "BatchLoader",
    "DataError",
    "ImageFolderStream",
    "ImageTensors",
    "Normalize",
    "StreamLoader",
    "default_cache_dir",
    "load_dataset",
    "load_demo",
    "load_image_folder",
    "make_loader",
    "open_image_folder_stream",
    "random_cutout",
    "stratified_split",
    "stratified_subset",
]


class DataError(BlockkeyError, ValueError):
    """A dataset that cannot be found, read or used as asked."""


@dataclass(frozen=True)
class ImageTensors:
    """An in-memory labelled image set: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, index: Tensor) -> ImageTensors:
        return ImageTensors(self.images[index], self.labels[index], self.classes)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """The images in order, ``batch_size`` at a time (uint8), e.g. for statistics."""
        for i in range(0, len(self), batch_size):
            yield self.images[i : i + batch_size]


@dataclass(frozen=True)
class ImageFolderStream:
    """An ImageFolder too large for memory: images are decoded per batch by DataLoader workers.

    Every image is brought to ``image_size`` x ``image_size``: random-resized crop and flip for
    training, resize to ``image_size * 8/7`` and centre crop for evaluation (the ImageNet recipe).
    Statistics (:meth:`Normalize.fit`) come from the first ``stats_images`` images of the
    evaluation view.
    """

    samples: tuple[tuple[str, int], ...]
    classes: tuple[str, ...]
    image_size: int
    workers: int = 2
    stats_images: int = 2000

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size

    def subset(self, index: Tensor) -> ImageFolderStream:
        picked = tuple(self.samples[i] for i in index.tolist())
        return ImageFolderStream(picked, self.classes, self.image_size, self.workers, self.stats_images)

    def dataset(self, train: bool) -> torch.utils.data.Dataset:
        return _FolderDataset(self.samples, self.image_size, train)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        n = min(len(self), self.stats_images)
        sub = self.subset(torch.linspace(0, len(self) - 1, n).round().long().unique())
        loader = torch.utils.data.DataLoader(sub.dataset(train=False), batch_size, num_workers=self.workers)
        for x, _ in loader:
            yield x


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Sequence[tuple[str, int]], size: int, train: bool) -> None:
        from torchvision.transforms import v2

        self.samples = samples
        ops = (
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(round(size * 8 / 7), antialias=True), v2.CenterCrop(size)]
        )
        self.tf = v2.Compose([v2.PILToTensor(), *ops])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from .imageio import open_image

        path, label = self.samples[i]
        try:
            with open_image(path) as im:
                return self.tf(im.convert("RGB")), label
        except OSError as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and ``(path, label)`` samples of ``root/<class>/<image>`` (torchvision's listing)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{root}: not an ImageFolder tree (root/<class>/<image>): {e}") from None
    if not samples:
        raise DataError(f"{root}: no images found")
    return classes, samples


def open_image_folder_stream(root: str | os.PathLike[str], image_size: int, workers: int = 2) -> ImageFolderStream:
    """List an ImageFolder tree for the streaming path (nothing is decoded yet)."""
    classes, samples = _list_image_folder(Path(root))
    return ImageFolderStream(tuple(samples), tuple(classes), image_size, workers)


def default_cache_dir() -> Path:
    """``$BLOCKKEY_CACHE``, else ``$XDG_CACHE_HOME/blockkey``, else ``~/.cache/blockkey``."""
    if os.environ.get("BLOCKKEY_CACHE"):
        return Path(os.environ["BLOCKKEY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blockkey"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _decode(paths: Sequence[str]) -> np.ndarray:
    from .imageio import open_image

    out = []
    for p in paths:
        with open_image(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def load_image_folder(
    root: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None, workers: int | None = None
) -> ImageTensors:
    """An ImageFolder tree (``root/<class>/<image>``) of same-size RGB images -> :class:`ImageTensors`.

    Decoded once with ``workers`` processes and cached as ``.npz`` under ``cache_dir``
    (:func:`default_cache_dir` by default; ``cache_dir=False``-like empty string disables caching).
    """
    from tqdm import tqdm

    root = Path(root)
    classes, samples = _list_image_folder(root)

    h = hashlib.sha256(str(root.resolve()).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    digest = h.hexdigest()[:20]
    cache = None if cache_dir == "" else Path(cache_dir or default_cache_dir()) / f"imagefolder-{digest}.npz"
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                return ImageTensors(
                    torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), tuple(json.loads(str(z["classes"])))
                )
        except (OSError, ValueError, KeyError):
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt

    paths = [p for p, _ in samples]
    chunks = [paths[i : i + 1000] for i in range(0, len(paths), 1000)]
    workers = workers or min(len(chunks), os.cpu_count() or 1)
    arrays = []
    try:
        with tqdm(total=len(paths), desc=f"decode {root.name}", unit="img", disable=len(paths) < 2000) as bar:
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    for arr in pool.map(_decode, chunks):
                        arrays.append(arr)
                        bar.update(len(arr))
            else:
                for chunk in chunks:
                    arrays.append(_decode(chunk))
                    bar.update(len(chunk))
    except ValueError as e:  # np.stack of different sizes
        raise DataError(f"{root}: images differ in size; the in-memory path needs one size ({e})") from None
    except OSError as e:
        raise DataError(f"{root}: cannot decode an image: {e}") from None
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{root}: images differ in size ({sorted(shapes)}); the in-memory path needs one size")
    images = np.concatenate(arrays).transpose(0, 3, 1, 2).copy()
    labels = np.array([label for _, label in samples], dtype=np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            np.savez(tmp, images=images, labels=labels, classes=json.dumps(classes))
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels), tuple(classes))


def load_demo() -> tuple[ImageTensors, ImageTensors]:
    """The embedded demo set: 9,000 CIFAR-10 training images (Krizhevsky 2009), 900 per class,
    split 8,000 train / 1,000 test, stored as their original JPEG bytes (8.4 MB). No download.
    """
    from importlib import resources

    from .imagepack import decode_images

    with resources.as_file(resources.files("blockkey") / "data" / "cifar10_demo.npz") as p, np.load(p) as z:
        blob, offsets, labels, test = z["jpeg"].tobytes(), z["offsets"], z["labels"], z["test"]
        classes = tuple(str(c) for c in z["classes"])
    images = decode_images([blob[offsets[i] : offsets[i + 1]] for i in range(len(labels))], workers=1)
    data = ImageTensors(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels), classes)
    test_t = torch.from_numpy(test)
    return data.subset(torch.nonzero(~test_t).flatten()), data.subset(torch.nonzero(test_t).flatten())


def load_dataset(
    spec: str, *, train: bool = True, root: str | os.PathLike[str] | None = None, download: bool = True
) -> ImageTensors:
    """``cifar10`` / ``cifar100`` through torchvision (downloaded into ``root``), an image pack
    (``.npz``, :mod:`blockkey.imagepack`) or an ImageFolder path."""
    name = spec.lower()
    if name in ("cifar10", "cifar100"):
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        root = Path(root or default_cache_dir() / "torchvision")
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DataError(f"{name}: {e} (looked in {root})") from None
        except OSError as e:  # no network
            raise DataError(f"{name}: cannot download into {root}: {e}") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return ImageTensors(images, torch.as_tensor(ds.targets, dtype=torch.int64), tuple(ds.classes))
    if name.endswith(".npz"):
        from .imagepack import load_image_pack

        return load_image_pack(spec)
    return load_image_folder(spec)


@overload
def stratified_split(data: ImageTensors, val_fraction: float, seed: int) -> tuple[ImageTensors, ImageTensors]: ...
@overload
def stratified_split(
    data: ImageFolderStream, val_fraction: float, seed: int
) -> tuple[ImageFolderStream, ImageFolderStream]: ...
@overload
def stratified_split(data: Data, val_fraction: float, seed: int) -> tuple[Data, Data]: ...
def stratified_split(data: Data, val_fraction: float, seed: int) -> tuple[Data, Data]:
    """A seeded split keeping each class's share: ``round(n_c * val_fraction)`` per class to validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1); got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    val_idx, train_idx = [], []
    for c in range(len(data.classes)):
        idx = torch.nonzero(data.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * val_fraction)
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return data.subset(tr), data.subset(va)


@overload
def stratified_subset(data: ImageTensors, n: int, seed: int) -> ImageTensors: ...
@overload
def stratified_subset(data: ImageFolderStream, n: int, seed: int) -> ImageFolderStream: ...
@overload
def stratified_subset(data: Data, n: int, seed: int) -> Data: ...
def stratified_subset(data: Data, n: int, seed: int) -> Data:
    """A seeded sample of about ``n`` images with every class in its share (never the first n of a sorted folder)."""
    if n >= len(data):
        return data
    return stratified_split(data, n / len(data), seed)[1]


# --------------------------------------------------------------------------------------------
# Normalisation and the on-device loader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalize:
    """``(x - mean) / std`` with statistics per channel (``(C,)``) or per block position (``(L,)``).

    Mode ``none`` is the identity (mean 0, std 1 per channel), for models that read raw values.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "channel"  # or "position", or "none"
    block_size: int = 1

    def tensors(
        self, shape: tuple[int, int, int], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        c, h, w = shape
        mean, std = torch.tensor(self.mean, dtype=dtype), torch.tensor(self.std, dtype=dtype)
        if self.mode in ("channel", "none"):
            return mean.view(c, 1, 1).to(device), std.view(c, 1, 1).to(device)
        from .functional import from_blocks

        m = self.block_size
        grid = (h // m, w // m, m * m * c)
        return (
            from_blocks(mean.expand(grid), m, c).contiguous().to(device),
            from_blocks(std.expand(grid), m, c).contiguous().to(device),
        )

    def per_position(self, block_size: int, channels: int) -> tuple[Tensor, Tensor]:
        """float64 ``(mean, std)`` of each of the ``M*M*C`` positions of a block, (row, col, channel) order."""
        mean, std = torch.tensor(self.mean, dtype=torch.float64), torch.tensor(self.std, dtype=torch.float64)
        if self.mode in ("channel", "none"):
            reps = block_size * block_size
            return mean.repeat(reps), std.repeat(reps)  # channel varies fastest
        if self.block_size != block_size:
            raise DataError(
                f"normalisation is per position of {self.block_size}x{self.block_size} blocks, not {block_size}"
            )
        return mean, std

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "mode": self.mode, "block_size": self.block_size}

    @classmethod
    def from_json(cls, doc: dict) -> Normalize:
        return cls(tuple(doc["mean"]), tuple(doc["std"]), doc["mode"], doc["block_size"])

    @classmethod
    def fit(
        cls,
        data: ImageTensors | ImageFolderStream,
        transform: KeyedTransform | None,
        mode: str = "channel",
        batch_size: int = 1000,
        block_size: int | None = None,
    ) -> Normalize:
        """Statistics of the (transformed) images: per channel, or per position of ``M x M`` blocks.

        ``M`` is the key's block size, or ``block_size`` for plain images (a non-protected twin).
        """
        from .functional import to_blocks

        if mode not in ("channel", "position", "none"):
            raise DataError(f"normalisation mode must be 'channel', 'position' or 'none'; got {mode!r}")
        if mode == "none":
            c = data.image_shape[0]
            return cls((0.0,) * c, (1.0,) * c, "none", 1)
        m = transform.block_size if transform is not None else (block_size or 1)
        if mode == "position" and m == 1 and transform is None:
            raise DataError("per-position normalisation of plain images needs a block size")
        total: Tensor | None = None
        total_sq: Tensor | None = None
        count = 0
        dev = transform.src.device if transform is not None else torch.device("cpu")
        for x in data.batches(batch_size):
            x = x.to(dev)
            y = (transform(x) if transform is not None else x.float() / 255).double().cpu()
            if mode == "position":  # rows: blocks, columns: block positions
                v = to_blocks(y, m).reshape(-1, y.shape[1] * m * m)
            else:  # rows: pixels, columns: channels
                v = y.transpose(0, 1).reshape(y.shape[1], -1).T
            s, s2 = v.sum(0), (v * v).sum(0)
            total = s if total is None else total + s
            total_sq = s2 if total_sq is None else total_sq + s2
            count += v.shape[0]
        if total is None or total_sq is None:
            raise DataError("no images to compute normalisation statistics from")
        mean = total / count
        std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
        return cls(tuple(mean.tolist()), tuple(std.tolist()), mode, m)


def random_cutout(x: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Zero a ``size x size`` square (clipped to the image) at a random place inside each image of a uint8
    batch ``(B, C, H, W)`` (DeVries & Taylor's cutout; airbench's square lies wholly inside the image)."""
    b, _, h, w = x.shape
    sh, sw = min(size, h), min(size, w)
    top = torch.randint(0, h - sh + 1, (b, 1), generator=g).to(x.device)
    left = torch.randint(0, w - sw + 1, (b, 1), generator=g).to(x.device)
    rows, cols = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
    in_rows = (rows >= top) & (rows < top + sh)  # (B, H)
    in_cols = (cols >= left) & (cols < left + sw)  # (B, W)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


class _KeyedBatches:
    """What every loader does on the device: key transform (or /255), then normalisation.

    ``views`` (evaluation): each batch holds every test-time view of each image (:mod:`blockkey.tta`: mirror,
    shifts), each keyed after it is taken, as ``(B, V, C, H, W)``; :func:`blockkey.runtime.predict_views`
    averages the V predictions.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        transform: KeyedTransform | None,
        normalize: Normalize | None,
        device: torch.device | str,
        *,
        train: bool,
        seed: int,
        views: Views | None,
        cutout: int,
    ) -> None:
        self.device = torch.device(device)
        self.transform = transform.to(self.device) if transform is not None else None
        self.norm = normalize.tensors(shape, self.device) if normalize is not None else None
        self.epoch = 0
        self.train, self.seed = train, seed
        self.views = None if train else views  # test-time views: evaluation only
        self.cutout = cutout if train else 0  # training only

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_seed(self, stream: int = 0) -> int:
        """A seed from ``(seed, epoch)`` alone (a resumed run draws the same); ``stream`` keeps the draws of
        order (0), augmentation and the stream loader's fetches apart."""
        return self.seed * 100_003 + self.epoch + stream

    def _augment_generator(self) -> torch.Generator:
        """This epoch's augmentation draws."""
        return torch.Generator().manual_seed(self._epoch_seed(1_000_000_007))

    def _cut(self, x: Tensor, g: torch.Generator) -> Tensor:
        return random_cutout(x, self.cutout, g) if self.cutout else x

    def prepare(self, x: Tensor) -> Tensor:
        """uint8 batch -> key transform (or /255) -> normalisation: what the network sees (with
        ``views``, each view taken from the plain image first, then keyed: ``(B, V, C, H, W)``)."""
        if self.views is not None:
            return self.views.stack(x, self._keyed)
        return self._keyed(x)

    def _keyed(self, x: Tensor) -> Tensor:
        y = self.transform(x) if self.transform is not None else x.float().div_(255)
        return normalise(y, self.norm)


class StreamLoader(_KeyedBatches):
    """Batches of an :class:`ImageFolderStream`: workers decode and augment uint8 images, the device
    applies the key and normalises. Order, crops, flips and cutout come from ``(seed, epoch)`` alone: each
    worker's RNG is seeded from the loader's generator, and with ``workers=0`` each batch is fetched under
    an RNG state of the loader's own (torch's global RNG is left as it was), so a resumed run sees the same
    batches as an uninterrupted one either way.
    """

    def __init__(
        self,
        data: ImageFolderStream,
        batch_size: int,
        *,
        train: bool,
        transform: KeyedTransform | None,
        normalize: Normalize | None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        views: Views | None = None,
        cutout: int = 0,
    ) -> None:
        super().__init__(
            data.image_shape, transform, normalize, device, train=train, seed=seed, views=views, cutout=cutout
        )
        self.data, self.batch_size = data, batch_size
        self.dataset = data.dataset(train)
        self.sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
        )

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.sampler.set_epoch(self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            self.batch_size,
            sampler=self.sampler,
            num_workers=self.data.workers,
            drop_last=self.train,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self._epoch_seed()),
            persistent_workers=False,
        )
        g = self._augment_generator()
        for x, y in _seeded_fetch(loader, self._epoch_seed(2_000_000_011)):
            x = self._cut(x.to(self.device, non_blocking=True), g)
            yield self.prepare(x), y.to(self.device, non_blocking=True)


def _seeded_fetch(loader: Iterable[tuple[Tensor, Tensor]], seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``loader``'s items, each fetched under a private state of torch's global RNG that starts at ``seed``
    and carries on from item to item (the caller's global RNG is restored around each fetch, so neither
    disturbs the other). torchvision's random transforms draw from that RNG when a DataLoader has no
    workers."""
    state = torch.Generator().manual_seed(seed).get_state()
    it = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(state)
            item = next(it, None)
            state = torch.random.get_rng_state()
        if item is None:
            return
        yield item


class BatchLoader(_KeyedBatches):
    """Batches of an in-memory :class:`ImageTensors` on ``device``: augment -> key -> normalise.

    Each epoch's order and augmentation come from ``(seed, epoch)`` alone, so a resumed run sees the
    same batches as an uninterrupted one. With ``world_size > 1`` each rank takes every
    ``world_size``-th sample of the epoch's permutation.
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        *,
        train: bool,
        transform: KeyedTransform | None,
        normalize: Normalize | None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        crop_padding: int = 4,
        flip: bool = True,
        drop_last: bool | None = None,
        crop_step: int = 1,
        rank: int = 0,
        world_size: int = 1,
        views: Views | None = None,
        cutout: int = 0,
    ) -> None:
        super().__init__(
            data.image_shape, transform, normalize, device, train=train, seed=seed, views=views, cutout=cutout
        )
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size = batch_size
        self.crop_padding = crop_padding if train else 0
        if crop_step < 1:
            raise OptionError(f"crop step must be an integer >= 1; got {crop_step}")
        self.crop_step = crop_step
        self.flip = flip and train
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size

    def _order(self) -> Tensor:
        n = self.images.shape[0]
        if not self.train:
            order = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(self._epoch_seed())
            order = torch.randperm(n, generator=g)
            order = order[: n - n % self.world_size]  # every rank gets as many batches (or DDP deadlocks)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Random crop with zero padding, horizontal flip and cutout (if set), batched, on plain uint8. The
        crop moves each image by a multiple of ``crop_step`` pixels, at most ``crop_padding`` each way."""
        b, c, h, w = x.shape
        p, s = self.crop_padding, self.crop_step
        if p // s:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = (p + s * torch.randint(-(p // s), p // s + 1, (b,), generator=g)).to(x.device)
            dx = (p + s * torch.randint(-(p // s), p // s + 1, (b,), generator=g)).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.flip:
            f = (torch.rand(b, generator=g) < 0.5).to(x.device)
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        return self._cut(x, g)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()
        g = self._augment_generator()
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size].to(self.device)
            x = self.images[idx]
            if self.train:
                x = self.augment(x, g)
            yield self.prepare(x), self.labels[idx]


Data = ImageTensors | ImageFolderStream


def check_crop_step(data: Data, crop_step: int) -> None:
    """A crop step other than 1 needs in-memory data (streamed images get random-resized crops instead)."""
    if crop_step != 1 and isinstance(data, ImageFolderStream):
        raise OptionError(f"--crop-step {crop_step}: streamed images get random-resized crops; it needs in-memory data")


def make_loader(
    data: Data,
    batch_size: int,
    *,
    train: bool,
    transform: KeyedTransform | None,
    normalize: Normalize | None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    crop_padding: int = 4,
    flip: bool = True,
    rank: int = 0,
    world_size: int = 1,
    views: Views | None = None,
    cutout: int = 0,
    crop_step: int = 1,
) -> BatchLoader | StreamLoader:
    """The on-device loader for in-memory data, the DataLoader path for an :class:`ImageFolderStream`.
    ``views`` (evaluation only): batches of test-time views ``(B, V, C, H, W)`` (:mod:`blockkey.tta`,
    averaged by :func:`blockkey.runtime.predict_views`). ``cutout`` (training only): zero a random square of
    that side in each plain image (:func:`random_cutout`). ``crop_step`` (in-memory data): random crops move
    images by multiples of it (the key's block size keeps every image on the key's block grid)."""
    if isinstance(data, ImageFolderStream):
        if train:
            check_crop_step(data, crop_step)
        return StreamLoader(
            data,
            batch_size,
            train=train,
            transform=transform,
            normalize=normalize,
            device=device,
            seed=seed,
            rank=rank,
            world_size=world_size,
            views=views,
            cutout=cutout,
        )
    return BatchLoader(
        data,
        batch_size,
        train=train,
        transform=transform,
        normalize=normalize,
        device=device,
        seed=seed,
        crop_padding=crop_padding,
        crop_step=crop_step,
        flip=flip,
        rank=rank,
        world_size=world_size,
        views=views,
        cutout=cutout,
    )
