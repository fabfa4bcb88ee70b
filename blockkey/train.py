"""The trainer: augment -> key -> normalise -> model, with checkpoints, resume and DDP.

``fit`` trains a protected model (``key`` given) or its non-protected twin (``key=None``) with
everything else shared: SGD with Nesterov momentum, a triangular one-cycle learning rate, weight
decay, optional label smoothing, bfloat16 autocast and channels_last. Every epoch ends with a
complete state on disk; ``resume=True`` continues from it and, because data order and augmentation
depend only on ``(seed, epoch)``, reaches the same final weights as an uninterrupted run. Under
``torchrun`` it runs distributed data parallel (gloo on CPU, nccl on GPU); rank 0 writes.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from . import __version__
from . import argtypes as at
from .checkpoint import (
    CheckpointError,
    clear_states,
    load_weights,
    read_meta,
    save_run,
    save_tensors_atomic,
    write_json_atomic,
)
from .data import BatchLoader, Data, DataError, Normalize, StreamLoader, check_crop_step, make_loader
from .errors import BlockkeyError, OptionError, ShapeError
from .fileio import write_text
from .inner import (
    current_inner_key,
    fold_optimizer_tensors,
    load_stored_state_dict,
    refold_inner,
    stored_state_dict,
    use_inner_key,
)
from .jsonio import read_json
from .keys import KeySet
from .meta import KeyInfo, RunMeta, key_info
from .models import block_aligned, create_model, model_kwargs_for, patch_embedding
from .passport import PassportError, Passports, passport_layers, sign_loss
from .runtime import AMP_MODES, autocast, pick_device, predict_accuracy, resolve_amp
from .transforms import KeyedTransform

__all__ = ["TrainConfig", "autocast", "fit", "pick_device", "predict_accuracy"]  # the last three: from runtime


NORM_MODES = ("channel", "position", "none")  # per channel, per block position of the key, raw values
OPTIMIZERS = ("sgd", "adam")  # SGD with (Nesterov) momentum, AdamW


#: ``train``'s default architecture (and the demo's): block-aligned, keyed points folded into its weights.
DEFAULT_MODEL = "fullnet"


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL  # block-aligned (the key costs nothing for shuffle and negpos), full resolution after
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    peak: float = 0.2  # fraction of training at which the triangular LR peaks (0.5: the paper's cyclic LR)
    seed: int = 0
    amp: str = "auto"  # auto (bf16 where the hardware has it, else off) | bf16 | fp16 | off
    channels_last: bool = True
    norm: str = "position"  # position (per block position of the key) | channel | none (raw values)
    crop_padding: int = 4
    crop_step: int = 1  # random crops move images by multiples of this (the block size: stay on the key's grid)
    flip: bool = True
    cutout: int = 0  # side of a square zeroed at random in each plain training image; 0: off
    init_from: str | None = None  # a run directory whose weights start training (fine-tuning)
    train_layers: str = "all"  # all | first (first layer with weights) | last (the head) | block:N (layer_blocks)
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adam (AdamW: decoupled weight decay)
    sign_loss: float = 1.0  # weight of the passport sign loss (passport models only)
    ema: float = 0.0  # per-step decay of an average of the weights (and BN statistics) that is saved; 0: off

    def __post_init__(self) -> None:
        """Every field in its range (:class:`~blockkey.errors.OptionError` names the first one that is not)."""
        at.EPOCHS.check("epochs", self.epochs)
        at.BATCH_SIZE.check("batch_size", self.batch_size)
        at.LEARNING_RATE.check("lr", self.lr)
        at.PROBABILITY.check("momentum", self.momentum)
        at.NON_NEGATIVE.check("weight_decay", self.weight_decay)
        at.PROBABILITY.check("label_smoothing", self.label_smoothing)
        at.PEAK.check("peak", self.peak)
        at.SEED.check("seed", self.seed)
        at.NON_NEGATIVE_INT.check("crop_padding", self.crop_padding)
        at.COUNT.check("crop_step", self.crop_step)
        at.NON_NEGATIVE_INT.check("cutout", self.cutout)
        at.NON_NEGATIVE.check("sign_loss", self.sign_loss)
        at.PROBABILITY.check("ema", self.ema)
        for name, value, allowed in (
            ("amp", self.amp, AMP_MODES),
            ("norm", self.norm, NORM_MODES),
            ("optimizer", self.optimizer, OPTIMIZERS),
        ):
            if value not in allowed:
                raise OptionError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        at.check_train_layers(self.train_layers)


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    t = step / max(1, total)
    peak = min(max(cfg.peak, 1e-6), 1 - 1e-6)
    return cfg.lr * (t / peak if t < peak else max(0.0, (1 - t) / (1 - peak)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)  # no decay on norms and biases
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _layers_with_weights(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def layer_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """The layers with weights grouped into blocks: each conv/linear/embedding (a weight of 2+ dims) starts
    one, and the norm layers after it (1-D parameters only) join it. ``block:N`` trains the N-th."""
    blocks: list[list[nn.Module]] = []
    for m in _layers_with_weights(model):
        if not blocks or any(p.dim() > 1 for p in m.parameters(recurse=False)):
            blocks.append([])
        blocks[-1].append(m)
    return blocks


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters ``which`` trains: all, the ``first`` / ``last`` layer that has weights, or ``block:N``."""
    at.check_train_layers(which)
    if which == "all":
        return list(model.parameters())
    layers = _layers_with_weights(model)
    if not layers:
        raise BlockkeyError(f"train_layers {which}: the model has no layer with weights")
    if which.startswith("block:"):
        blocks, n = layer_blocks(model), int(which.partition(":")[2])
        if n >= len(blocks):
            raise BlockkeyError(
                f"train_layers {which}: the model has {len(blocks)} blocks (block:0..{len(blocks) - 1})"
            )
        keep = blocks[n]
    else:
        keep = [layers[0] if which == "first" else layers[-1]]
    return [p for m in keep for p in m.parameters(recurse=False)]


def freeze_except(model: nn.Module, which: str) -> None:
    """Train ``all`` parameters, only those of the ``first`` / ``last`` layer that has weights, or ``block:N``."""
    keep = {id(p) for p in trainable_parameters(model, which)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum, or AdamW, over the trainable parameters (no decay on norms, biases)."""
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _probe(model: nn.Module, image_shape: tuple[int, int, int], name: str) -> None:
    """One forward pass of two blank images: a model that cannot take this image size says so up front."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *image_shape))
    except (RuntimeError, ValueError, AssertionError) as e:  # torchvision/timm check sizes with asserts
        c, h, w = image_shape
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShapeError(
            f"{name} cannot take {c}x{h}x{w} images ({first}); use larger images or another model"
        ) from None
    finally:
        model.train()


def _init_from(model: nn.Module, src: str, cfg: TrainConfig, classes: tuple[str, ...], key: KeySet | None) -> None:
    """Start from ``src``'s weights. A source without an inner key holds plain weights: they are stored for
    ``key`` (so the network that trains is the source's own); one with an inner key holds them folded, and
    they are unfolded with ``key``'s inner part like any stored weights (the wrong network without its key)."""
    meta = read_meta(src)
    if meta.model != cfg.model or meta.model_kwargs != cfg.model_kwargs:
        raise CheckpointError(f"--init-from {src}: a {meta.model} {meta.model_kwargs}, not {cfg.model}")
    if list(meta.classes) != list(classes):
        raise CheckpointError(f"--init-from {src}: its classes differ from the data's")
    model.load_state_dict(load_weights(Path(src) / "model.safetensors"))
    if meta.key is None or not meta.key.has_inner:
        refold_inner(model, None, key)


def _versions() -> dict[str, str]:
    import torchvision

    return {
        "blockkey": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{i}.{name}"] = value
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> tuple[_Dist, torch.device, bool]:
    """Rank, world size and device under torchrun; True if this call started the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist(), device, False
    import torch.distributed as dist

    d = _Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return d, device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device, True


def check_training_data(train: Data) -> None:
    """Refuse training data that cannot train a classifier: no images, or classes without any image."""
    if len(train) == 0:
        raise DataError("no training images left (too few images for the validation share, --limit or fraction)")
    present = set(torch.unique(train.labels).tolist())
    missing = [c for i, c in enumerate(train.classes) if i not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(train)} training images leave {len(missing)} of {len(train.classes)} classes without any "
            f"({shown}); give more images (each class needs at least one after the validation split)"
        )


def fit(
    train: Data,
    val: Data | None,
    key: KeySet | None,
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    data_info: dict[str, Any] | None = None,
    passports: Passports | None = None,
    compile_model: bool = False,
) -> RunMeta:
    """Train ``cfg.model`` on ``train`` (keyed with ``key``, or plain for ``key=None``) into ``run_dir``.

    ``data_info`` (the data's source and split) is stored in the metadata as given. ``passports``
    protect a passport model (``model_kwargs={"passport": True}``) instead of a key; the sign loss
    (weight ``cfg.sign_loss``) embeds their signature. ``compile_model``: train through
    ``torch.compile`` (the compile time counts in the first epoch; weights and results are those of the
    plain module). Returns the run's metadata (also written to ``run_dir/meta.json``).
    """
    device = pick_device(str(device) if device is not None else None)
    dist, device, owns_group = _init_distributed(device)
    try:
        return _fit(
            train,
            val,
            key,
            cfg,
            Path(run_dir),
            resume,
            device,
            dist,
            log,
            progress,
            data_info,
            passports,
            compile_model,
        )
    finally:
        if owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _fit(
    train: Data,
    val: Data | None,
    key: KeySet | None,
    cfg: TrainConfig,
    run: Path,
    resume: bool,
    device: torch.device,
    dist: _Dist,
    log: Callable[[str], None] | None,
    progress: bool,
    data_info: dict[str, Any] | None,
    passports: Passports | None,
    compile_model: bool = False,
) -> RunMeta:
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    say = log if dist.main else (lambda s: None)
    if key is not None:  # what the key needs of the model (patch = its block size), where not given
        cfg = replace(cfg, model_kwargs=model_kwargs_for(cfg.model, key, train.image_shape) | cfg.model_kwargs)
    _check_data(train, key, cfg.cutout)
    check_crop_step(train, cfg.crop_step)
    state_dir = _open_run(run, resume, dist)
    transform = KeyedTransform(key) if key is not None else None
    # A twin without a key uses the model's patch as its blocks (so both share everything), else channels.
    twin_blocks = cfg.model_kwargs.get("patch")
    mode = cfg.norm if (key is not None or twin_blocks or cfg.norm == "none") else "channel"
    normalize = Normalize.fit(train, transform, mode, block_size=twin_blocks)
    model = _build_model(train, key, cfg, passports, device)
    loop = _make_loop(train, val, transform, normalize, model, cfg, device, dist, passports, progress)
    identity = _identity(cfg, key, passports)
    start_epoch, history = _read_state(state_dir, identity, loop, device) if state_dir else (0, [])
    if state_dir:
        say(f"resuming {run} after epoch {start_epoch}/{cfg.epochs}")
    loop.net = _wrap(model, dist, device, compile_model)
    protected = f"key {key.fingerprint} ({key.label}, M={key.block_size})" if key else "no key"
    if passports is not None:
        protected = f"passports {passports.fingerprint}, {len(passport_layers(model))} layers"
    say(
        f"training {cfg.model} on {len(train)} images ({protected}), {cfg.epochs} epochs x {loop.steps_per_epoch} "
        f"steps, device {device}, amp {loop.amp}, world size {dist.world_size}"
    )
    for epoch in range(start_epoch, cfg.epochs):
        row = _train_epoch(loop, epoch, dist.main)
        history.append(row)
        say(
            f"epoch {row['epoch']}/{cfg.epochs}  loss {row['train_loss']:.3f}  train {row['train_acc']:.1%}"
            + (f"  val {row['val_acc']:.1%}" if "val_acc" in row else "")
            + f"  {row['seconds']:.0f}s"
        )
        if dist.main and epoch + 1 < cfg.epochs:
            _save_state(run, loop, {**identity, "epoch": epoch + 1, "history": history})
    meta = _run_meta(cfg, train, key, passports, normalize, data_info, dist, history)
    _finish(run, loop.result, meta, dist)
    return meta


def _run_meta(
    cfg: TrainConfig,
    train: Data,
    key: KeySet | None,
    passports: Passports | None,
    normalize: Normalize | None,
    data_info: dict[str, Any] | None,
    dist: _Dist,
    history: list[dict[str, Any]],
) -> RunMeta:
    """The finished run's metadata (``meta.json``)."""
    return RunMeta(
        model=cfg.model,
        model_kwargs=cfg.model_kwargs,
        classes=tuple(train.classes),
        image_shape=train.image_shape,
        key=KeyInfo.from_key(key),
        passport=passports.info() if passports else None,
        normalize=normalize,
        config=asdict(cfg),
        data=data_info or {},
        world_size=dist.world_size,
        versions=_versions(),
        epochs_done=cfg.epochs,
        history=history,
        metrics=history[-1] if history else {},
    )


def _check_data(train: Data, key: KeySet | None, cutout: int = 0) -> None:
    """Training data that can train a classifier, in images the key fits (and cutout does not blank)."""
    check_training_data(train)
    c, h, w = train.image_shape
    if cutout >= min(h, w):
        raise OptionError(f"cutout {cutout} would blank whole {h}x{w} images; give a side below {min(h, w)}")
    if key is not None and c != key.channels:
        raise ShapeError(f"the key is for {key.channels}-channel images; the data has {c}")
    if key is not None and (h % key.block_size or w % key.block_size):
        raise ShapeError(f"image size {h}x{w} is not divisible by the block size {key.block_size}")


def _open_run(run: Path, resume: bool, dist: _Dist) -> Path | None:
    """Create the run folder (or check it can be resumed); the state folder to resume from, if any."""
    latest = run / "LATEST"
    if run.exists() and not resume and ((run / "meta.json").exists() or latest.exists()):
        raise CheckpointError(f"{run} already holds a run; use --resume to continue it or pick another folder")
    if resume and not latest.exists():
        if (run / "meta.json").exists():
            raise CheckpointError(f"{run}: this run has finished; nothing to resume")
        raise CheckpointError(f"{run}: nothing to resume (no LATEST state)")
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
    return run / latest.read_text().strip() if resume else None


def _build_model(
    train: Data, key: KeySet | None, cfg: TrainConfig, passports: Passports | None, device: torch.device
) -> nn.Module:
    """The network to train: seeded init (or ``init_from``), protection attached, probed, layers frozen."""
    with torch.random.fork_rng(devices=[]):  # the init seed does not leak into the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, len(train.classes), train.image_shape[0], **cfg.model_kwargs)
    if cfg.init_from is not None:
        _init_from(model, cfg.init_from, cfg, train.classes, key)
    has_passport_layers = bool(passport_layers(model))
    if passports is not None:
        if key is not None:
            raise BlockkeyError("protect a model with a key or with passports, not both")
        passports.attach(model)
    elif has_passport_layers:
        raise PassportError(f"{cfg.model} {cfg.model_kwargs} has passport layers: give it passports")
    # The weights (seeded init, or init_from's stored ones) are taken as stored: unfolded with the key's inner
    # part they are the plain network that trains, at full speed; every file written folds them back.
    use_inner_key(model, key)
    embed = patch_embedding(model) if key is not None and block_aligned(cfg.model) else None
    if key is not None and embed is not None and tuple(embed.stride) != (key.block_size, key.block_size):
        raise ShapeError(
            f"{cfg.model}'s patch embedding has stride {tuple(embed.stride)}, the key's blocks are "
            f"{key.block_size}x{key.block_size}: set model_kwargs patch={key.block_size}"
        )
    _probe(model, train.image_shape, cfg.model)
    freeze_except(model, cfg.train_layers)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class _Loop:
    """What one training epoch needs (built once by :func:`_make_loop`)."""

    model: nn.Module  # the module being trained (its weights are saved unless ``ema`` averages them)
    net: nn.Module  # what the batches go through (DDP / compiled wrapper of ``model``, or ``model``)
    opt: torch.optim.Optimizer
    loader: BatchLoader | StreamLoader
    val_loader: BatchLoader | StreamLoader | None
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    device: torch.device
    amp: str
    sign_loss: bool
    progress: bool
    steps_per_epoch: int
    ema: AveragedModel | None = None  # the weight average of ``model`` when cfg.ema > 0

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def result(self) -> nn.Module:
        """The module whose weights are the run's result: the weight average when there is one."""
        if self.ema is None:
            return self.model
        module: nn.Module = self.ema.module
        return module


def _make_loop(
    train: Data,
    val: Data | None,
    transform: KeyedTransform | None,
    normalize: Normalize | None,
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    dist: _Dist,
    passports: Passports | None,
    progress: bool,
) -> _Loop:
    """Optimizer, loaders, loss and scaler around ``model`` (:func:`_wrap` adds DDP / compile later)."""
    opt = make_optimizer(model, cfg)
    loader = make_loader(
        train,
        cfg.batch_size // dist.world_size,
        train=True,
        transform=transform,
        normalize=normalize,
        device=device,
        seed=cfg.seed,
        crop_padding=cfg.crop_padding,
        crop_step=cfg.crop_step,
        flip=cfg.flip,
        cutout=cfg.cutout,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    val_loader = None
    if val is not None and len(val):
        val_loader = make_loader(val, 512, train=False, transform=transform, normalize=normalize, device=device)
    if len(loader) == 0:
        raise DataError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}")
    amp = resolve_amp(cfg.amp, device)
    return _Loop(
        model=model,
        net=model,
        opt=opt,
        loader=loader,
        val_loader=val_loader,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),  # fp16 needs loss scaling; bf16 does not
        cfg=cfg,
        device=device,
        amp=amp,
        sign_loss=passports is not None and cfg.sign_loss > 0,
        progress=progress,
        steps_per_epoch=len(loader),
        ema=_weight_average(model, cfg.ema),
    )


def _weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (torch's AveragedModel), or None."""
    if decay <= 0:
        return None
    return AveragedModel(model, avg_fn=_ema_step(decay), use_buffers=True)


def _ema_step(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
    """``e <- decay e + (1 - decay) w`` for floating tensors; integer buffers (BN's step count, a keyed point's
    permutation, a table's offsets) take the model's value: averaging them would truncate them to garbage."""

    def step(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor | int) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current.detach().clone()
        return averaged + (current.detach() - averaged) * (1 - decay)

    return step


def _wrap(model: nn.Module, dist: _Dist, device: torch.device, compile_model: bool) -> nn.Module:
    """What the training batches go through: ``model``, under DDP for several processes, compiled if asked."""
    net: nn.Module = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        net = torch.compile(net)  # type: ignore[assignment]  # a callable wrapper that behaves as the module
    return net


def _train_epoch(loop: _Loop, epoch: int, main: bool) -> dict[str, Any]:
    """One epoch over the training loader; its history row (validation accuracy on the main process)."""
    from tqdm import tqdm

    cfg, device = loop.cfg, loop.device
    t0 = time.perf_counter()
    loop.net.train()
    loop.loader.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loop.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not (loop.progress and main))
    for i, (x, y) in enumerate(bar):
        step = epoch * loop.steps_per_epoch + i
        for g in loop.opt.param_groups:
            g["lr"] = _lr_at(step, loop.total_steps, cfg)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, loop.amp):
            out = loop.net(x)
            loss = loop.criterion(out.float(), y)
            if loop.sign_loss:
                loss = loss + sign_loss(loop.model, cfg.sign_loss)
        loop.opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        if loop.ema is not None:
            loop.ema.update_parameters(loop.model)
        loss_sum += loss.detach() * y.numel()
        correct += (out.argmax(1) == y).sum()
        seen += y.numel()
    if not math.isfinite(float(loss_sum)):
        raise BlockkeyError(f"training diverged at epoch {epoch + 1} (loss is {float(loss_sum)}); lower --lr")
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": round(float(loss_sum) / seen, 4),
        "train_acc": round(float(correct) / seen, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if loop.val_loader is not None and main:
        row["val_acc"] = round(predict_accuracy(loop.result, loop.val_loader, device, loop.amp, cfg.channels_last), 4)
    return row


def _finish(run: Path, model: nn.Module, meta: RunMeta, dist: _Dist) -> None:
    """Write the finished run (main process), remove the resumable states, wait for every rank."""
    if dist.main:
        save_run(run, model, meta)
        clear_states(run)
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()


# --------------------------------------------------------------------------------------------
# Resumable state: ``run/state-NNNN/`` (model, optimizer, state.json) and the ``run/LATEST`` pointer.
# state.json = the run's identity (what a resume must match) + ``epoch`` + ``history``.
# --------------------------------------------------------------------------------------------

_IDENTITY_ERRORS = {
    "config": "a different training configuration",
    "key": "a different key (or --no-key mismatch)",
    "passport": "different passports",
}


def _identity(cfg: TrainConfig, key: KeySet | None, passports: Passports | None) -> dict[str, Any]:
    """What a resumed run must share with the saved state (the ``_IDENTITY_ERRORS`` fields of state.json)."""
    return {"config": asdict(cfg), "key": key_info(key), "passport": passports.info() if passports else None}


def _save_state(run: Path, loop: _Loop, state: dict[str, Any]) -> None:
    """A complete resumable state in ``state-NNNN/``, then the LATEST pointer, then old states go."""
    name = f"state-{state['epoch']:04d}"
    d = run / name
    d.mkdir(exist_ok=True)
    # the key's inner part is folded into every weight and optimizer buffer written (blockkey.inner)
    save_tensors_atomic(d / "model.safetensors", stored_state_dict(loop.model))
    save_tensors_atomic(
        d / "optimizer.safetensors", fold_optimizer_tensors(loop.model, loop.opt, _optimizer_tensors(loop.opt))
    )
    if loop.ema is not None:
        save_tensors_atomic(d / "ema.safetensors", stored_state_dict(loop.ema))
    write_json_atomic(d / "state.json", state)
    write_text(run / "LATEST", name)
    for old in run.glob("state-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _differences(saved: Any, now: Any) -> str:
    """`` (field: saved X, now Y; ...)`` for the fields of two configurations that differ (else empty)."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return ""
    diff = [
        f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(saved.keys() | now.keys())
        if saved.get(k) != now.get(k)
    ]
    return f" ({'; '.join(diff)}; repeat the saved run's options)" if diff else ""


def _read_state(
    state_dir: Path, identity: dict[str, Any], loop: _Loop, device: torch.device
) -> tuple[int, list[dict[str, Any]]]:
    """Load a state written by :func:`_save_state` into the loop's model, optimizer and weight average:
    (epochs done, history)."""
    state = read_json(state_dir / "state.json", CheckpointError, "saved state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_dir}: the saved state is not a JSON object")
    if isinstance(state.get("config"), dict):  # fields added since the state was written take their defaults
        state["config"] = asdict(TrainConfig()) | state["config"]
    for name, what in _IDENTITY_ERRORS.items():
        if state.get(name) != identity[name]:
            raise CheckpointError(
                f"{state_dir.parent}: --resume with {what}"
                + (_differences(state.get(name), identity[name]) if name == "config" else "")
            )
    inner = current_inner_key(loop.model)  # the states hold folded weights: unfold them with it
    load_stored_state_dict(loop.model, load_weights(state_dir / "model.safetensors"), inner)
    opt_state = {k: v.to(device) for k, v in load_weights(state_dir / "optimizer.safetensors").items()}
    _load_optimizer(loop.opt, fold_optimizer_tensors(loop.model, loop.opt, opt_state, unfold=True))
    if loop.ema is not None:
        ema = {k: v.to(device) for k, v in load_weights(state_dir / "ema.safetensors").items()}
        load_stored_state_dict(loop.ema, ema, inner)
    return state["epoch"], state["history"]
