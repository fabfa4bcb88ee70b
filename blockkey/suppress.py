"""Fine-tuning suppression (SOPHON, Deng et al., IEEE S&P 2024, arXiv 2404.12699) for a keyed model.

A thief who has the weights but not the key fine-tunes them on a few plain labelled images
(docs/attacks.md, `fine-tune`). Suppression is a short phase after keyed training that makes this
harder: each outer step

1. lowers the key holder's cross-entropy on keyed images (his accuracy stays),
2. keeps the model useless on plain images (``plain_weight`` x the KL divergence of its plain-image
   output from the uniform distribution, with the inner key off: what the thief runs), and
3. plays the thief: a copy of the weights (inner key off) takes ``steps`` optimiser steps of
   fine-tuning on plain labelled batches, with a learning rate, layers (all / first / last) and
   optimiser drawn per step from ``thief_lrs`` / ``thief_layers`` / ``thief_optimizers``; the copy's
   loss on a fresh plain batch is then pushed up (``alpha`` x the inverse cross-entropy
   ``-log(1 - p_y)``, bounded where plain cross-entropy is not; ``thief_loss="uniform"``: KL to uniform).
   The gradient is first order (FOMAML): the copy's gradient at its fine-tuned weights is added to the
   real weights' gradient, as if the fine-tuning steps were the identity.

The copy runs through :func:`torch.func.functional_call` with its own clone of the batch-norm buffers,
so neither the plain images nor the thief's steps touch the key holder's running statistics. The
output is a normal run directory (``meta["suppress"]`` records the settings and the measured time
factor: seconds of a suppression step over seconds of its key-holder part alone).
NTLBench (arXiv 2502.13593) found this family fragile against fine-tuning settings the inner loop
never saw; docs/attacks.md measures exactly that.

    from blockkey.suppress import SuppressConfig, harden
    harden("runs/inner", key, train, "runs/inner-hard", SuppressConfig(alpha=1.0, steps=3))
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from . import argtypes as at
from .checkpoint import CheckpointError, load_model, save_run
from .data import Data, DataError, Normalize, make_loader
from .errors import KeyMismatchError, OptionError
from .inner import set_points, with_keyed_points
from .keys import KeySet
from .runtime import pick_device, predict_accuracy
from .train import check_training_data, trainable_parameters
from .transforms import KeyedTransform

__all__ = ["SuppressConfig", "copy_accuracy", "fine_tune_copy", "harden", "inverse_cross_entropy", "uniform_kl"]


@dataclass
class SuppressConfig:
    alpha: float = 2.0  # weight of the simulated thief's loss
    steps: int = 3  # the thief's fine-tuning steps per outer step
    epochs: int = 1  # passes over the key holder's training data
    batch_size: int = 128  # the key holder's batch
    thief_batch: int = 64  # the thief's batch (plain labelled images)
    lr: float = 0.01  # the outer learning rate (SGD, Nesterov momentum, linear decay to 0)
    weight_decay: float = 5e-4
    thief_lrs: tuple[float, ...] = (0.01, 0.05)  # for sgd; adam takes lr / 50
    thief_layers: tuple[str, ...] = ("all", "first", "last")
    thief_optimizers: tuple[str, ...] = ("sgd",)
    thief_loss: str = "inverse-ce"  # inverse-ce | uniform
    plain_weight: float = 1.0  # keep plain images at chance (0: off)
    seed: int = 0

    def __post_init__(self) -> None:
        at.NON_NEGATIVE.check("alpha", self.alpha)
        at.COUNT.check("steps", self.steps)
        at.EPOCHS.check("epochs", self.epochs)
        at.BATCH_SIZE.check("batch_size", self.batch_size)
        at.BATCH_SIZE.check("thief_batch", self.thief_batch)
        at.LEARNING_RATE.check("lr", self.lr)
        at.NON_NEGATIVE.check("weight_decay", self.weight_decay)
        at.LEARNING_RATE.check_each("thief_lrs", self.thief_lrs)
        at.NON_NEGATIVE.check("plain_weight", self.plain_weight)
        at.SEED.check("seed", self.seed)
        for layers in self.thief_layers or [None]:
            at.check_train_layers(layers)
        for name, values, allowed in (
            ("thief_optimizers", self.thief_optimizers, ("sgd", "adam")),
            ("thief_loss", (self.thief_loss,), ("inverse-ce", "uniform")),
        ):
            if not values or any(v not in allowed for v in values):
                raise OptionError(f"{name} must be among {', '.join(allowed)}; got {values!r}")


def inverse_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean(-log(1 - p_y))``: zero when the true class gets no probability, large when it gets all."""
    p = logits.float().softmax(1).gather(1, y[:, None]).squeeze(1)
    return -torch.log1p(-p.clamp(max=1 - 1e-6)).mean()


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """``mean KL(uniform || softmax(logits))``: zero when the output is uniform."""
    logp = logits.float().log_softmax(1)
    return (-logp.mean(1) - math.log(logits.shape[1])).mean()


def _batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of ``loader``'s batches, a new epoch (order, augmentation) each pass."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def fine_tune_copy(
    model: nn.Module,
    plain: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    layers: str = "all",
    optimizer: str = "sgd",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The simulated thief: ``steps`` steps of fine-tuning a copy of ``model``'s weights on ``plain``
    batches (as ``model`` computes now: call with its inner key off), ``model`` itself untouched.

    ``optimizer``: ``sgd`` (Nesterov momentum, at ``lr``) or ``adam`` (AdamW at ``lr``). Returns the
    copy's ``(parameters, buffers)`` for :func:`torch.func.functional_call`.
    """
    chosen = {id(p) for p in trainable_parameters(model, layers)}
    fast = {n: p.detach().clone().requires_grad_(id(p) in chosen) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    train = [t for t in fast.values() if t.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(train, lr=lr)
    else:
        opt = torch.optim.SGD(train, lr=lr, momentum=0.9, nesterov=True)
    was_training = model.training
    model.train()
    for _ in range(steps):
        x, y = next(plain)
        loss = F.cross_entropy(functional_call(model, (fast, buffers), (x,)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.train(was_training)
    return fast, buffers


@torch.no_grad()
def copy_accuracy(model: nn.Module, weights: tuple[dict, dict], batches: Any) -> float:
    """Accuracy of ``model`` computed with ``weights`` (a :func:`fine_tune_copy`) over ``batches`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((functional_call(model, weights, (x,)).argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return correct / max(1, total)


def _thief(
    model: nn.Module,
    cfg: SuppressConfig,
    plain: Iterator[tuple[torch.Tensor, torch.Tensor]],
    rng: random.Random,
) -> tuple[dict[str, torch.Tensor], float]:
    """One simulated thief (inner key off): fine-tune a copy, return the gradient of its suppression loss.

    Returns ``({parameter name: gradient}, the thief's accuracy on the fresh batch)``.
    """
    opt_name, layers, lr = rng.choice(cfg.thief_optimizers), rng.choice(cfg.thief_layers), rng.choice(cfg.thief_lrs)
    fast, buffers = fine_tune_copy(model, plain, cfg.steps, lr / 50 if opt_name == "adam" else lr, layers, opt_name)
    x, y = next(plain)
    for t in fast.values():
        t.requires_grad_(True)
    out = functional_call(model, (fast, buffers), (x,))
    loss = inverse_cross_entropy(out, y) if cfg.thief_loss == "inverse-ce" else uniform_kl(out)
    grads = torch.autograd.grad(cfg.alpha * loss, list(fast.values()))
    acc = float((out.argmax(1) == y).float().mean())
    return dict(zip(fast, grads, strict=True)), acc


def _step(
    model: nn.Module,
    key: KeySet,
    cfg: SuppressConfig,
    keyed: tuple[torch.Tensor, torch.Tensor],
    plain: Iterator[tuple[torch.Tensor, torch.Tensor]],
    rng: random.Random,
    label_smoothing: float,
) -> dict[str, float]:
    """One outer step's gradients (accumulated in ``.grad``); returns its losses and timings."""
    t0 = time.perf_counter()
    set_points(model, key)
    x, y = keyed
    holder = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    holder.backward()
    t_holder = time.perf_counter() - t0
    set_points(model, None)  # what the thief runs
    row = {"holder_loss": float(holder.detach()), "holder_seconds": t_holder}
    if cfg.plain_weight > 0:
        params: dict[str, Tensor] = dict(model.named_parameters())
        buffers: dict[str, Tensor] = {n: b.clone() for n, b in model.named_buffers()}
        xp, _ = next(plain)
        plain_loss = uniform_kl(functional_call(model, (params, buffers), (xp,)))
        (cfg.plain_weight * plain_loss).backward()
        row["plain_kl"] = float(plain_loss.detach())
    if cfg.alpha > 0:
        grads, row["thief_acc"] = _thief(model, cfg, plain, rng)
        for n, p in model.named_parameters():
            p.grad = grads[n] if p.grad is None else p.grad + grads[n]
    set_points(model, key)
    row["seconds"] = time.perf_counter() - t0
    return row


def harden(
    run_dir: str | os.PathLike[str],
    key: KeySet,
    train: Data,
    out_dir: str | os.PathLike[str],
    cfg: SuppressConfig | None = None,
    *,
    val: Data | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Suppress fine-tuning of the keyed model in ``run_dir`` (trained with ``key``) into ``out_dir``.

    ``train``: the key holder's labelled images (plain; keyed here for his loss, plain for the thief's).
    ``val``: if given, the key holder's and plain-image accuracy are logged after each epoch. Returns
    the new run's metadata (``meta["suppress"]``: settings, seconds, time factor, per-epoch history).
    """
    cfg = cfg or SuppressConfig()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out_dir)
    if (out / "meta.json").exists():
        raise CheckpointError(f"{out} already holds a run; pick another folder")
    check_training_data(train)
    dev = pick_device(str(device) if device is not None else None)
    stolen, meta = load_model(run_dir, dev)
    # The weights stay in their stored form and the inner key is applied by explicit keyed points (a gather),
    # so that the holder's and the thief's gradients are taken in the same coordinates.
    model = with_keyed_points(stolen)
    if meta.key is None or meta.key.fingerprint != key.fingerprint:
        raise KeyMismatchError(f"{key.fingerprint} is not the key of {run_dir}: suppression needs the model's key")
    config, normalize = meta.config, meta.normalize
    transform = KeyedTransform(key)
    aug = {
        "crop_padding": config.get("crop_padding", 4),
        "crop_step": config.get("crop_step", 1),
        "flip": config.get("flip", True),
        "cutout": config.get("cutout", 0),
        "device": dev,
    }
    keyed = make_loader(
        train, cfg.batch_size, train=True, transform=transform, normalize=normalize, seed=cfg.seed, **aug
    )
    plain = _batches(
        make_loader(train, cfg.thief_batch, train=True, transform=None, normalize=normalize, seed=cfg.seed + 1, **aug)
    )
    if len(keyed) == 0:
        raise DataError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}")
    for layers in cfg.thief_layers:
        trainable_parameters(model, layers)  # a block the model lacks is refused before any step
    groups = [
        {"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    rng = random.Random(cfg.seed)
    total, done, history = cfg.epochs * len(keyed), 0, []
    t_start = time.perf_counter()
    log(
        f"suppressing fine-tuning of {run_dir} (key {key.fingerprint}): {cfg.epochs} epochs x {len(keyed)} steps, "
        f"thief {cfg.steps} steps, alpha {cfg.alpha}, device {dev}"
    )
    model.train()
    for epoch in range(cfg.epochs):
        keyed.set_epoch(epoch)
        rows = []
        for batch in keyed:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (1 - done / total)
            opt.zero_grad(set_to_none=True)
            rows.append(_step(model, key, cfg, batch, plain, rng, config.get("label_smoothing", 0.0)))
            opt.step()
            done += 1
            if done % 20 == 0:
                last = rows[-1]
                log(f"step {done}/{total}: thief acc {last.get('thief_acc', 0.0):.3f}, {last['seconds']:.2f}s/step")
        row = {"epoch": epoch + 1, **{k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}}
        if val is not None:
            row.update(_accuracies(model, key, val, normalize, dev))
        history.append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))
    seconds = time.perf_counter() - t_start
    factor = sum(h["seconds"] for h in history) / max(1e-9, sum(h["holder_seconds"] for h in history))
    set_points(model, None)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    new = dict(meta)
    new.pop("evaluation", None)  # the source model's accuracy table: not this model's
    new["metrics"] = history[-1] if history else {}
    new["suppress"] = {
        **asdict(cfg),
        "from_run": str(run_dir),
        "seconds": round(seconds, 1),
        "time_factor": round(factor, 2),
        "history": history,
    }
    save_run(out, model.cpu(), new)
    return new


def _accuracies(model: nn.Module, key: KeySet, val: Data, normalize: Normalize | None, dev: torch.device) -> dict:
    """The key holder's and the plain-image accuracy on ``val`` (leaves the model in train mode, key on)."""
    res = {}
    for name, transform, inner in (("val_holder", KeyedTransform(key), key), ("val_plain", None, None)):
        set_points(model, inner)
        loader = make_loader(val, 500, train=False, transform=transform, normalize=normalize, device=dev)
        res[name] = round(predict_accuracy(model, loader, dev, "off", channels_last=False), 4)
    set_points(model, key)
    model.train()
    return res
