"""Checked option values: one range check shared by the CLI's argparse types and the library.

An :class:`Int` or :class:`Float` is both a check for library code (``EPOCHS.check("epochs", v)``
raises :class:`~blockkey.errors.OptionError`) and an argparse ``type=`` (parses the text, then
the same check; argparse turns the failure into ``blockkey CMD: error: argument --X: ...``, exit 2).
Its ``range`` text is appended to the option's ``--help``. Path types refuse empty names and NUL
bytes, missing inputs and outputs that cannot be written, before any command runs.

Example:
    >>> EPOCHS.check("epochs", 3)
    3
    >>> PROBABILITY("0.25")
    0.25
    >>> PROBABILITY.range
    'a number in [0, 1)'
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from pathlib import Path
from typing import Any

from .errors import OptionError
from .fileio import printable

__all__ = [
    "BATCH_SIZE",
    "BLOCK_SIZE",
    "CHANNELS",
    "COUNT",
    "EPOCHS",
    "FRACTION",
    "IMAGE_SIZE",
    "LEARNING_RATE",
    "MAX_SEED",
    "NON_NEGATIVE",
    "NON_NEGATIVE_INT",
    "OPSET",
    "PEAK",
    "PREDICT_BATCH",
    "PROBABILITY",
    "SECONDS",
    "SEED",
    "WORKERS",
    "Float",
    "Int",
    "Parser",
    "RangeHelpFormatter",
    "check_train_layers",
    "data_source",
    "device",
    "existing_file",
    "output_path",
    "path_name",
    "train_layers",
]

MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed


def _named(name: str, text: str) -> str:
    return f"{name} {text}" if name else text


class Int:
    """Integers in ``lo..hi`` (``hi=None``: no upper bound); ``why`` explains the bound in messages."""

    def __init__(self, lo: int, hi: int | None = None, why: str = "", hi_text: str = "") -> None:
        self.lo, self.hi, self.why = lo, hi, why
        self.range = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi_text or hi}"
        self.__name__ = "integer"  # argparse names the type in some messages

    def check(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise OptionError(_named(name, f"must be {self.range}; got {value!r}"))
        number = int(value)
        if number < self.lo or (self.hi is not None and number > self.hi):
            why = f" ({self.why})" if self.why else ""
            raise OptionError(_named(name, f"must be {self.range}; got {value}{why}"))
        return number

    def check_each(self, name: str, values: Any) -> list[int]:
        """A non-empty list of values, each in range."""
        if not values:
            raise OptionError(f"{name} needs at least one value")
        return [self.check(name, v) for v in values]

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.range}; got {text!r}") from None
        try:
            return self.check("", value)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


class Float:
    """Finite numbers between ``lo`` and ``hi`` (``None``: unbounded), each end open or closed."""

    def __init__(
        self, lo: float | None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
    ) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        if lo is not None and hi is not None:
            self.range = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            self.range = f"a number {'>' if lo_open else '>='} {lo:g}"
        else:
            self.range = "a finite number"
        self.__name__ = "number"

    def _inside(self, v: float) -> bool:
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok

    def check(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise OptionError(_named(name, f"must be {self.range}; got {value!r}"))
        v = float(value)
        if not math.isfinite(v) or not self._inside(v):
            raise OptionError(_named(name, f"must be {self.range}; got {v}"))
        return v

    def check_each(self, name: str, values: Any) -> list[float]:
        """A non-empty list of values, each in range."""
        if not values:
            raise OptionError(f"{name} needs at least one value")
        return [self.check(name, v) for v in values]

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.range}; got {text!r}") from None
        try:
            return self.check("", value)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


COUNT = Int(1)
NON_NEGATIVE_INT = Int(0)
EPOCHS = Int(1)
BATCH_SIZE = Int(2, why="batch norm needs at least 2 images per training batch")
SEED = Int(0, MAX_SEED, hi_text="2^63-1")
BLOCK_SIZE = Int(1, 256, "a block holds at most 65536 values; see docs/reliability.md")
CHANNELS = Int(1, 16)
IMAGE_SIZE = Int(1, 4096, "images are decoded at SIZE x SIZE in memory")
WORKERS = Int(0, 64)
LEARNING_RATE = Float(0, lo_open=True)
WIDTH = Float(0, 16, lo_open=True)  # a model's channel multiplier
NON_NEGATIVE = Float(0)
PROBABILITY = Float(0, 1, hi_open=True)
PEAK = Float(0, 1)
FRACTION = Float(0, 1, lo_open=True)
SECONDS = Float(0, 86400, lo_open=True)
PREDICT_BATCH = Int(1, 65536)
MAX_PIXELS = Int(1, 2**40, hi_text="2^40")  # blockkey --max-pixels (imageio's limit)
OPSET = Int(18, 20, "the exporter (torch.onnx, dynamo) writes opsets 18 and newer")


def path_name(text: str) -> str:
    """A non-empty path without NUL bytes (the file may or may not exist)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path; got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"a path cannot contain a NUL byte; got {text!r}")
    return text


def existing_file(text: str) -> str:
    """An input file that exists and is not a directory."""
    p = Path(path_name(text))
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{p} is a directory, not a file")
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file: {p}")
    return text


def data_source(text: str) -> str:
    """``cifar10``, ``cifar100``, an existing ImageFolder directory or an ``.npz`` image pack."""
    if path_name(text).lower() in ("cifar10", "cifar100"):
        return text
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(
            f"dataset {p} does not exist (give cifar10, cifar100, a folder or an .npz image pack)"
        )
    if not p.is_dir() and p.suffix.lower() != ".npz":
        raise argparse.ArgumentTypeError(
            f"{p} is a file; a dataset is cifar10, cifar100, an ImageFolder folder or an .npz image pack"
        )
    return text


def output_path(text: str) -> str:
    """A file or folder that can be created: its nearest existing ancestor is a writable directory."""
    p = Path(path_name(text)).absolute()
    parent = p if p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no write permission in {parent}")
    return text


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, refused if this machine does not have it."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps; got {text!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s) (cuda:0..{count - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine (use cpu or auto)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps; got {text!r}")
    return text


class RangeHelpFormatter(argparse.HelpFormatter):
    """Appends the allowed range of checked options to their help (``[an integer >= 1]``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        rng = getattr(action.type, "range", None)
        return f"{text} [{rng}]".strip() if rng else action.help


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``PROG: error: ...``) and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", RangeHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # argparse's contract: does not return
        self.exit(2, printable(f"{self.prog}: error: {message}; see {self.prog} --help\n"))


def check_train_layers(which: Any) -> str:
    """What fine-tuning trains: ``all``, ``first``, ``last`` or ``block:N`` (N >= 0; the model's count is
    checked on use)."""
    head, _, n = str(which).partition(":")
    if which in ("all", "first", "last") or (head == "block" and n.isascii() and n.isdigit()):
        return str(which)
    raise OptionError(f"train_layers must be all, first, last or block:N (N = 0, 1, ...); got {which!r}")


def train_layers(text: str) -> str:
    """argparse type of :func:`check_train_layers`."""
    try:
        return check_train_layers(text)
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
