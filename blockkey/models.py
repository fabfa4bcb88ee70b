"""A small model registry: a new architecture is one decorated function.

- ``resnet18_cifar``: the paper's CIFAR ResNet-18 (3x3 stem, stride 1, no max-pool; 11.2M parameters).
- ``fastnet``: an airbench-style net sized for CPU budgets (about 1.5M parameters at width 1).
- ``patchnet``: block-aligned: a patch embedding with kernel = stride = the key's block size, then a
  conv trunk on the grid of blocks. A within-block shuffle or negpos is a linear map of each block
  vector, which the embedding absorbs: with per-position normalisation, training on shuffled or
  flipped blocks is distributed exactly like training on plain images.
- ``tablenet``: patchnet with a lookup-table stem: each (block position, value) pair has its own
  learnt embedding row, summed over the block. Every key step (shuffle, negpos, FFX) is a
  relabelling of those pairs, so training on keyed images, even with FFX on every position, is
  distributed exactly like plain training. Train it with ``norm="none"`` (it reads raw [0, 1] values).
- ``tablenet_shared``: tablenet with one value table shared by every block position (for ``ffx-all`` keys).
- ``convmixer``: ConvMixer (Trockman & Kolter 2022) with patch = the key's block size.
- ``vit``: a small "simple ViT" (Beyer et al. 2022: fixed 2-D sin-cos positions, mean pooling),
  patch = the key's block size, any image size divisible by the patch.
- ``tv_<name>``: any torchvision classification model by name, e.g. ``tv_resnet50``.
- ``timm_<name>``: any timm model by name, e.g. ``timm_vit_tiny_patch16_224``; for ViT-family models
  (ViT, DeiT, BEiT, EVA, CaiT) the patch size is set to the key's block size and ``img_size`` to the images'.

Block-aligned models (those with a ``patch`` argument) expose their first layer as
``model.patch_embed``: a convolution with kernel = stride = patch, the layer into which
:mod:`blockkey.rekey` folds shuffle and negpos keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import BlockkeyError, OptionError

if TYPE_CHECKING:
    from .inner import Point

__all__ = [
    "block_aligned",
    "create_model",
    "list_models",
    "model_accepts",
    "model_kwargs_for",
    "patch_embedding",
    "register_model",
    "size_kwargs",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(num_classes, in_channels, **kwargs) -> nn.Module`` under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_accepts(name: str, argument: str) -> bool:
    """True when registered model ``name`` takes ``argument`` (e.g. ``patch``, ``passport``)."""
    import inspect

    return name in _REGISTRY and argument in inspect.signature(_REGISTRY[name]).parameters


def block_aligned(name: str) -> bool:
    """True for models with a ``patch`` argument: the trainer sets it to the key's block size."""
    if name.startswith("timm_"):
        return _timm_family(name[5:]) in TIMM_PATCH_FAMILIES
    return model_accepts(name, "patch")


def size_kwargs(name: str, image_shape: tuple[int, int, int]) -> dict:
    """Model arguments that depend on the image size: ``image_size`` for timm ViT-family models."""
    if name.startswith("timm_") and _timm_family(name[5:]) in TIMM_PATCH_FAMILIES:
        h, w = image_shape[1:]
        return {"image_size": h if h == w else [h, w]}
    return {}


def model_kwargs_for(
    name: str,
    key: Any | None,
    image_shape: tuple[int, int, int],
    *,
    patch: int = 4,
    width: float | None = None,
    pretrained: bool = False,
) -> dict[str, Any]:
    """The model arguments a run of ``name`` needs (the one place for that policy): ``patch`` = the key's block
    size for block-aligned models (``patch`` for the twin without a key), ``width``, the image size of timm
    ViTs, ``pretrained`` (timm). An inner key needs no argument: every model has its points
    (:mod:`blockkey.inner`)."""
    kwargs: dict[str, Any] = {}
    if block_aligned(name):  # patch embedding aligned with the key's blocks
        kwargs["patch"] = key.block_size if key is not None else patch
    if width is not None:
        if not model_accepts(name, "width"):
            raise OptionError(f"--width: model {name} has no width multiplier")
        kwargs["width"] = width
    kwargs |= size_kwargs(name, image_shape)
    if pretrained:
        if not name.startswith("timm_"):
            raise BlockkeyError(f"--pretrained takes a timm_<name> model; got {name}")
        kwargs["pretrained"] = True
    return kwargs


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model, or ``tv_<name>`` from torchvision.models (random init)."""
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name.startswith("tv_"):
        import torchvision

        tv = name[3:]
        if tv not in torchvision.models.list_models(module=torchvision.models):
            raise BlockkeyError(f"unknown torchvision model {tv!r}")
        model = torchvision.models.get_model(tv, weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            raise BlockkeyError(f"torchvision models take 3 channels; got {in_channels}")
        return model
    if name.startswith("timm_"):
        return _timm_model(name[5:], num_classes, in_channels, **kwargs)
    raise BlockkeyError(
        f"unknown model {name!r}; choose from {', '.join(list_models())}, tv_<torchvision name> or timm_<timm name>"
    )


# --------------------------------------------------------------------------------------------
# timm (the model zoo): timm_<name>
# --------------------------------------------------------------------------------------------

#: timm families whose first layer is a patch embedding (``patch_embed.proj``) that takes ``patch_size``
#: and ``img_size``. timm's ConvMixer entry points fix patch_size: use blockkey's ``convmixer`` (the same net).
TIMM_PATCH_FAMILIES = frozenset({"vision_transformer", "deit", "beit", "eva", "cait"})


def _timm() -> Any:
    from ._optional import require

    require("timm")
    import timm

    return timm


def _timm_family(name: str) -> str:
    timm = _timm()
    if not timm.is_model(name):
        raise BlockkeyError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _timm_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    patch: int | None = None,
    image_size: int | list[int] | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name)`` with ``patch_size = patch`` (the key's block size) for patch-embedding
    families, ``img_size = image_size`` for ViTs; ``pretrained`` downloads weights (on users' machines)."""
    timm = _timm()
    family = _timm_family(name)
    if patch is not None and family not in TIMM_PATCH_FAMILIES:
        raise BlockkeyError(f"timm model {name!r} ({family}) has no patch embedding to align with the key's blocks")
    args: dict[str, Any] = dict(kwargs)
    if patch is not None:
        args["patch_size"] = patch
    if image_size is not None:
        args["img_size"] = tuple(image_size) if isinstance(image_size, list) else image_size
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **args)
    except TypeError as e:
        raise BlockkeyError(f"timm model {name!r}: {e}") from None
    return model


# --------------------------------------------------------------------------------------------
# CIFAR ResNet-18 (He et al. 2016, CIFAR variant as in the authors' code)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, passport_size: int = 0) -> None:
        super().__init__()
        if passport_size:  # conv -> BN -> passport scale/bias (blockkey.passport): bn1/bn2 are inside
            from .passport import PassportConv

            self.conv1: nn.Module = PassportConv(cin, cout, 3, stride, 1, passport_size)
            self.bn1: nn.Module = nn.Identity()
            self.conv2: nn.Module = PassportConv(cout, cout, 3, 1, 1, passport_size // stride)
            self.bn2: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(
        self,
        blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        passport_stages: tuple[int, ...] = (),
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin, size = [], width, image_size
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                layers.append(BasicBlock(cin, cout, stride, size if i in passport_stages else 0))
                cin, size = cout, size // stride
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model
def resnet18_cifar(
    num_classes: int, in_channels: int = 3, width: float = 1.0, passport: bool = False, image_size: int = 32
) -> nn.Module:
    """``passport=True``: passport layers (:mod:`blockkey.passport`, Fan et al. 2019 scheme V1) in every
    convolution of the last stage, as the passport paper's ResNet-18; passports sized for ``image_size``."""
    return ResNetCIFAR(
        (2, 2, 2, 2), num_classes, in_channels, max(8, round(64 * width)), (3,) if passport else (), image_size
    )


# --------------------------------------------------------------------------------------------
# fastnet: airbench-style (Jordan 2024), for CPU budgets
# --------------------------------------------------------------------------------------------


def _keyed_point(channels: int, inner: bool, signs: bool = True) -> nn.Module:
    """A keyed point (:class:`blockkey.inner.ChannelKey`) where ``inner``, else an identity (no state either way)."""
    if not inner:
        return nn.Identity()
    from .inner import ChannelKey

    return ChannelKey(channels, signs)


class ConvGroup(nn.Module):
    """conv -> pool -> BN -> act -> conv -> BN -> act; with ``inner``, a keyed point after each act
    (``last_signs=False``: the second keeps its signs, for a max pool after it)."""

    def __init__(self, cin: int, cout: int, inner: bool = False, last_signs: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.GELU()
        self.key1 = _keyed_point(cout, inner)
        self.key2 = _keyed_point(cout, inner, last_signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.key1(self.act(self.bn1(self.pool(self.conv1(x)))))
        return self.key2(self.act(self.bn2(self.conv2(x))))


def _act(channels: int, inner: bool) -> nn.Module:
    """GELU, then with inner keys a keyed point (the state-dict names are the same either way)."""
    return nn.Sequential(nn.GELU(), _keyed_point(channels, True)) if inner else nn.GELU()


def _stem(first: nn.Module, channels: int, inner: bool) -> nn.Sequential:
    """``first`` (the block embedding, or what follows it) -> BN -> act -> 3x3 conv -> BN -> act."""
    return nn.Sequential(
        first,
        nn.BatchNorm2d(channels),
        _act(channels, inner),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        _act(channels, inner),
    )


def _conv_groups(cin: int, widths: Sequence[int], inner: bool) -> nn.Sequential:
    """One :class:`ConvGroup` per width (each halves the resolution); the last keeps its signs for the max
    pool of :func:`_pool_head`."""
    groups = []
    for i, w in enumerate(widths):
        groups.append(ConvGroup(cin, w, inner, last_signs=i < len(widths) - 1))
        cin = w
    return nn.Sequential(*groups)


def _stem_and_group_points(stem: str, model: nn.Module) -> list[Point]:
    """The keyed points of a stem (:func:`_stem`) and conv groups (:func:`_conv_groups`) under their 0.1 names:
    after each activation, read by the next convolution or the head (the last keeps its signs)."""
    from .inner import Point

    groups: nn.Sequential = model.groups  # type: ignore[assignment]
    readers = [f"{stem}.3", "groups.0.conv1"]
    names = [f"{stem}.2.1", f"{stem}.5.1"]
    for i in range(len(groups)):
        names += [f"groups.{i}.key1", f"groups.{i}.key2"]
        readers += [f"groups.{i}.conv2", f"groups.{i + 1}.conv1" if i + 1 < len(groups) else "head"]
    return [
        Point(n, r, int(model.get_parameter(f"{r}.weight").shape[1]), signs=n != names[-1])
        for n, r in zip(names, readers, strict=True)
    ]


def _pool_head(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global max pool, then the linear classifier."""
    return head(torch.flatten(nn.functional.adaptive_max_pool2d(x, 1), 1))


class FastNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.GELU())
        groups, cin = [], 32
        for w in widths:
            groups.append(ConvGroup(cin, w))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(cin, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool_head(self.head, self.groups(self.stem(x)))


@register_model
def fastnet(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    widths = tuple(max(8, round(w * width)) for w in (64, 128, 256))
    return FastNet(num_classes, in_channels, widths)


class PatchNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        patch: int = 4,
        widths: tuple[int, ...] = (128, 256, 256),
        inner: bool = False,
    ) -> None:
        super().__init__()
        w0 = widths[0]
        self.embed = _stem(nn.Conv2d(in_channels, w0, patch, patch, bias=False), w0, inner)
        self.groups = _conv_groups(w0, widths[1:], inner)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    @property
    def patch_embed(self) -> nn.Module:  # a convolution here; TablePatchNet's is not (see patch_embedding)
        return self.embed[0]

    def inner_points(self) -> list[Point]:
        """Keyed points (:mod:`blockkey.inner`): after every activation, under their version 0.1 names."""
        return _stem_and_group_points("embed", self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool_head(self.head, self.groups(self.embed(x)))


@register_model
def patchnet(
    num_classes: int, in_channels: int = 3, patch: int = 4, width: float = 1.0, inner: bool = False
) -> nn.Module:
    """Block-aligned net: set ``patch`` to the key's block size (the trainer does). ``inner=True``: version
    0.1's explicit keyed-point modules (a gather after every activation), kept so that its runs load and as
    the reference the fold is tested against; an inner key needs no argument now (:mod:`blockkey.inner`)."""
    widths = tuple(max(8, round(w * width)) for w in (128, 256, 256))
    return PatchNet(num_classes, in_channels, patch, widths, inner)


class UpNet(nn.Module):
    """Block embedding, then depth-to-space back up to a finer grid, then conventional conv groups.

    The first layer is a ``patch x patch`` convolution with stride ``patch`` (one linear map per key block,
    which absorbs shuffle and negpos exactly, as in :class:`PatchNet`) with ``widths[0] * up**2`` outputs;
    ``PixelShuffle(up)`` turns each block's vector into an ``up x up`` patch of ``widths[0]`` channels, so the
    network runs at ``H * up / patch`` instead of ``H / patch`` (16x16 for CIFAR-10 with M=4, up=2).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        patch: int = 4,
        up: int = 2,
        widths: tuple[int, ...] = (64, 128, 256, 256),
        inner: bool = False,
    ) -> None:
        super().__init__()
        if up < 1 or patch % up:
            raise BlockkeyError(f"upnet: up must divide the patch (block) size {patch}; got {up}")
        w0 = widths[0]
        self.patch_embed = nn.Conv2d(in_channels, w0 * up * up, patch, patch, bias=False)
        self.stem = _stem(nn.PixelShuffle(up), w0, inner)
        self.groups = _conv_groups(w0, widths[1:], inner)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def inner_points(self) -> list[Point]:
        """Keyed points (:mod:`blockkey.inner`): after every activation, under their version 0.1 names."""
        return _stem_and_group_points("stem", self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool_head(self.head, self.groups(self.stem(self.patch_embed(x))))


@register_model
def upnet(
    num_classes: int,
    in_channels: int = 3,
    patch: int = 4,
    width: float = 1.0,
    up: int | None = None,
    inner: bool = False,
    widths: Sequence[int] = (64, 128, 256, 256),
) -> nn.Module:
    """Block-aligned net at twice patchnet's resolution (:class:`UpNet`); set ``patch`` to the key's block
    size (``blockkey train`` does). ``up``: depth-to-space factor (default 2, or 1 for an odd block size).
    ``widths``: the stem's channels, then each conv group's (each halves the resolution), all times
    ``width``. ``inner=True``: version 0.1's explicit keyed-point modules (see :func:`patchnet`)."""
    if len(widths) < 2:
        raise BlockkeyError(f"upnet: widths needs the stem and at least one group; got {list(widths)}")
    chans = tuple(max(8, round(w * width)) for w in widths)
    return UpNet(num_classes, in_channels, patch, (2 if patch % 2 == 0 else 1) if up is None else up, chans, inner)


@register_model
def fullnet(
    num_classes: int,
    in_channels: int = 3,
    patch: int = 4,
    width: float = 1.0,
    inner: bool = False,
    widths: Sequence[int] = (24, 64, 128, 256),
) -> nn.Module:
    """:class:`UpNet` back at the image's own resolution: the block embedding gives each block
    ``widths[0] * patch**2`` channels and depth-to-space by the whole block size turns them into a ``patch x
    patch`` patch, so the conv groups run on the full grid (32x32 for CIFAR-10), as a conventional network's
    would. The key is absorbed by the first layer exactly as in :func:`upnet`."""
    return upnet(num_classes, in_channels, patch, width, up=patch, inner=inner, widths=widths)


class TableEmbed(nn.Module):
    """Lookup-table patch embedding: each block position ``k`` maps each value to ``d`` learnt numbers
    (``table[k, bin(x_k)]``), then one linear layer mixes the ``L*d`` numbers into ``dim`` channels.

    Input: raw values in [0, 1] (no normalisation): ``v / 255`` for clear pixels, ``c / 999`` for FFX
    codes. ``bin = round(x * 999)`` is injective on both (``round(999 v / 255)`` and ``c``), so a pixel
    value and an FFX code each get their own row. Rows a position never sees keep their (decayed) init.

    ``shared=True``: one 1000-row table for every position (``table[bin(x_k)]``; the mix still has a
    column block per position). With one FFX password every position uses the same code table, so each
    row then sees ``L`` times the data (issue 11, defence C). ``gain``: rows are ``gain * weight`` with
    ``weight`` drawn ``N(0, 1 / gain^2)``: the same init, ``gain^2`` times the table's effective learning rate.
    """

    BINS = 1000

    # buffers (registered in __init__)
    offsets: Tensor

    def __init__(
        self, in_channels: int, patch: int, dim: int, value_dim: int = 1, shared: bool = False, gain: float = 1.0
    ) -> None:
        super().__init__()
        self.patch, self.length, self.value_dim = patch, patch * patch * in_channels, value_dim
        self.shared, self.gain = shared, gain
        self.table = nn.Embedding(self.BINS if shared else self.length * self.BINS, value_dim)
        nn.init.normal_(self.table.weight, std=1.0 / gain)  # rows = gain * weight: N(0, 1) either way
        self.mix = nn.Linear(self.length * value_dim, dim, bias=False)
        offsets = torch.zeros(self.length, dtype=torch.long) if shared else torch.arange(self.length) * self.BINS
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .functional import to_blocks

        bins = (x.float() * (self.BINS - 1)).round_().long().clamp_(0, self.BINS - 1)
        blocks = to_blocks(bins, self.patch)  # (B, H/M, W/M, L)
        b, gh, gw, length = blocks.shape
        values = self.table(blocks + self.offsets).reshape(b, gh, gw, length * self.value_dim)
        if self.gain != 1.0:
            values = values * self.gain
        return self.mix(values).permute(0, 3, 1, 2)


class TableNet(PatchNet):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        patch: int = 4,
        widths: tuple[int, ...] = (128, 256, 256),
        value_dim: int = 1,
        shared: bool = False,
        gain: float = 1.0,
    ) -> None:
        super().__init__(num_classes, in_channels, patch, widths)
        self.embed[0] = TableEmbed(in_channels, patch, widths[0], value_dim, shared, gain)

    @property
    def patch_embed(self) -> nn.Module:  # not a convolution: rekey refuses it
        return self.embed[0]


@register_model
def tablenet(
    num_classes: int,
    in_channels: int = 3,
    patch: int = 4,
    width: float = 1.0,
    value_dim: int = 1,
    shared: bool = False,
    gain: float = 1.0,
) -> nn.Module:
    """Patchnet with a lookup-table stem (train with ``norm="none"``); patch = the key's block size.
    ``shared``: one value table for every block position; ``gain``: the table's learning-rate scale
    (:class:`TableEmbed`)."""
    widths = tuple(max(8, round(w * width)) for w in (128, 256, 256))
    return TableNet(num_classes, in_channels, patch, widths, value_dim, shared, gain)


@register_model
def tablenet_shared(
    num_classes: int, in_channels: int = 3, patch: int = 4, width: float = 1.0, value_dim: int = 8, gain: float = 3.0
) -> nn.Module:
    """``tablenet(shared=True, value_dim=8, gain=3)``: one value table for every block position, for keys with
    FFX on every position (``ffx-all``: one code table for all positions). docs/attacks.md measures what its
    weights reveal (``blockkey attack table-order``)."""
    widths = tuple(max(8, round(w * width)) for w in (128, 256, 256))
    return TableNet(num_classes, in_channels, patch, widths, value_dim, True, gain)


# --------------------------------------------------------------------------------------------
# ConvMixer (Trockman & Kolter, "Patches Are All You Need?", TMLR 2022)
# --------------------------------------------------------------------------------------------


class MixerBlock(nn.Module):
    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2)
        self.bn1 = nn.BatchNorm2d(dim)
        self.pointwise = nn.Conv2d(dim, dim, 1)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bn1(nn.functional.gelu(self.depthwise(x)))
        return self.bn2(nn.functional.gelu(self.pointwise(x)))


class ConvMixer(nn.Module):
    def __init__(
        self, num_classes: int, in_channels: int = 3, patch: int = 4, dim: int = 256, depth: int = 8, kernel: int = 5
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.bn = nn.BatchNorm2d(dim)
        self.blocks = nn.Sequential(*(MixerBlock(dim, kernel) for _ in range(depth)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn(nn.functional.gelu(self.patch_embed(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model
def convmixer(
    num_classes: int, in_channels: int = 3, patch: int = 4, dim: int = 256, depth: int = 8, kernel: int = 5
) -> nn.Module:
    """ConvMixer-``dim``/``depth``; set ``patch`` to the key's block size (the trainer does)."""
    return ConvMixer(num_classes, in_channels, patch, dim, depth, kernel)


# --------------------------------------------------------------------------------------------
# Simple ViT (Beyer, Zhai & Kolesnikov, "Better plain ViT baselines for ImageNet-1k", 2022)
# --------------------------------------------------------------------------------------------


def sincos_2d(rows: int, cols: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``(rows * cols, dim)``; ``dim`` divisible by 4."""
    y, x = torch.meshgrid(
        torch.arange(rows, device=device, dtype=torch.float64),
        torch.arange(cols, device=device, dtype=torch.float64),
        indexing="ij",
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim // 4 - 1 or 1))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).to(dtype)


class SimpleViT(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        patch: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if dim % 4 or dim % heads:
            raise BlockkeyError(f"vit: dim must be divisible by 4 and by heads; got dim={dim}, heads={heads}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * mlp_ratio, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = x + sincos_2d(rows, cols, x.shape[-1], x.device, x.dtype)
        return self.head(self.norm(self.encoder(x)).mean(1))


@register_model
def vit(
    num_classes: int, in_channels: int = 3, patch: int = 4, dim: int = 192, depth: int = 6, heads: int = 3
) -> nn.Module:
    """A small ViT; set ``patch`` to the key's block size (the trainer does)."""
    return SimpleViT(num_classes, in_channels, patch, dim, depth, heads)


def patch_embedding(model: nn.Module) -> nn.Conv2d | None:
    """The first layer of a block-aligned model: ``model.patch_embed``, torchvision ViT's ``conv_proj``,
    or the stem convolution of torchvision ConvNeXt / Swin (``features[0][0]``); None otherwise."""
    for get in (
        lambda m: m.patch_embed,
        lambda m: m.conv_proj,
        lambda m: m.features[0][0],
        lambda m: m.get_submodule(m.pretrained_cfg["first_conv"]),  # timm: patch_embed.proj, stem.0, ...
    ):
        try:
            conv = get(model)
        except (AttributeError, IndexError, TypeError):
            continue
        if isinstance(conv, nn.Conv2d):
            return conv
    return None
