"""The key-step contract and its registry: one class per step, declared once.

A key step acts on block vectors of length ``L = M*M*C`` (row, col, channel order, channel fastest).
Its class declares, in one place: the ``name`` written in key files, whether it is ``linear`` (a
signed permutation of the [0, 1] pixels that a block-aligned first layer can absorb: :mod:`blockkey.rekey`
folds only such steps), the recipe tokens that draw it (:meth:`KeyStep.tokens`), the key-material schema
(:meth:`KeyStep.from_json` / :meth:`KeyStep.to_json` / :meth:`KeyStep.validate`), its key space
(:meth:`KeyStep.key_bits`) and how it compiles into the block plan (:meth:`KeyStep.fold`).

A new step is one module in :mod:`blockkey.steps` whose class is decorated with :func:`register_step`;
the package imports every module in it, so nothing else needs to change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from torch import Tensor

from ..errors import KeyFileError

__all__ = [
    "STEP_TYPES",
    "TOKENS",
    "BlockFold",
    "KeyStep",
    "Random",
    "StepToken",
    "check_mask",
    "int_list",
    "random_mask",
    "random_perm",
    "register_step",
]

#: Largest pixel code (the pixel domain's maximum); FFX codes go up to 999.
PIXEL_MAX = 255


class Random(Protocol):
    """A source of secret randomness: OS entropy or a KDF stream (:mod:`blockkey.keys`), never a global RNG."""

    def randbelow(self, n: int) -> int: ...
    def token(self, nbytes: int) -> bytes: ...


@dataclass(frozen=True)
class BlockFold:
    """A partly compiled block: ``out[k] = codes[k, in[src[k]]]`` with position ``k`` in 0..``domain[k]``.

    ``src``: ``(L,)`` int64; ``codes``: ``(L, 256)`` int64; ``domain``: ``(L,)`` int64 (255 for pixels).
    """

    src: Tensor
    codes: Tensor
    domain: Tensor


S = TypeVar("S", bound="KeyStep")


class KeyStep(ABC):
    """One keyed block transform: the contract every registered step fulfils.

    Subclasses are frozen dataclasses holding the key material; ``repr`` never shows it.
    """

    __slots__ = ()
    #: The ``type`` written in key files and shown in recipes.
    name: ClassVar[str]
    #: True for steps that are a signed permutation of the [0, 1] pixels (``x -> x`` or ``1 - x`` per
    #: position, positions moved): these fold into a linear first layer; rekey refuses the others.
    linear: ClassVar[bool]
    #: For steps that are not linear: why (rekey's refusal quotes it).
    nonlinear_reason: ClassVar[str] = "it is not a signed permutation of the pixel values"
    #: Other spellings accepted in recipes (``np`` for ``negpos``).
    aliases: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def tokens(cls) -> dict[str, Callable[[Random, int], KeyStep]]:
        """Recipe tokens that draw this step from secret randomness: ``{token: draw(rng, L)}``."""
        return {cls.name: cls.draw}

    def token(self) -> str:
        """The recipe token that draws steps like this one (what an attacker who knows the algorithm draws)."""
        return self.name

    @classmethod
    @abstractmethod
    def draw(cls: type[S], rng: Random, length: int) -> S:
        """A fresh step for blocks of ``length`` values from ``rng``."""

    @classmethod
    @abstractmethod
    def from_json(cls: type[S], where: str, doc: dict[str, Any]) -> S:
        """The step of key-file object ``doc`` (its ``type`` checked); :class:`KeyFileError` naming ``where``."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The key-file object: ``{"type": name, ...material}`` (its bytes are part of the fingerprint)."""

    @abstractmethod
    def validate(self, length: int) -> None:
        """Raise :class:`KeyFileError` (never echoing key material) unless the step fits blocks of ``length``."""

    @abstractmethod
    def key_bits(self) -> float:
        """log2 of this step's key space."""

    @abstractmethod
    def fold(self, block: BlockFold) -> BlockFold:
        """Compose this step after ``block`` (exact integer arithmetic; see :mod:`blockkey.functional`)."""

    def fold_authors(self, values: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        """The authors' float32 arithmetic (``compat="authors"``): ``(L, 256)`` values and ``(L,)`` scale."""
        raise ValueError(f"compat='authors' reproduces the authors' steps only; {self.name!r} is not one of them")

    def __repr__(self) -> str:  # never the material: reprs end up in logs
        return f"{type(self).__name__}(...)"


#: Step classes by key-file ``type``, in registration order.
STEP_TYPES: dict[str, type[KeyStep]] = {}


@dataclass(frozen=True)
class StepToken:
    """A recipe token: the step type it draws and how."""

    step: type[KeyStep]
    draw: Callable[[Random, int], KeyStep]


#: Recipe tokens (and aliases) -> how to draw them.
TOKENS: dict[str, StepToken] = {}
ALIASES: dict[str, str] = {}


def register_step(cls: type[S]) -> type[S]:
    """Class decorator: register a :class:`KeyStep` by its ``name``, tokens and aliases (each once)."""
    if not (isinstance(cls, type) and issubclass(cls, KeyStep)):
        raise TypeError(f"{cls!r} is not a KeyStep")
    tokens = cls.tokens()
    taken = [t for t in (cls.name, *tokens, *cls.aliases) if t in TOKENS or t in ALIASES or t in STEP_TYPES]
    if taken:
        raise ValueError(f"key step {cls.__name__}: name(s) {', '.join(taken)} already registered")
    STEP_TYPES[cls.name] = cls
    for token, draw in tokens.items():
        TOKENS[token] = StepToken(cls, draw)
    for alias in cls.aliases:
        ALIASES[alias] = cls.name
    return cls


# -- helpers shared by the step modules ------------------------------------------------------------


def random_perm(rng: Random, length: int) -> tuple[int, ...]:
    """A uniform permutation of 0..length-1 (Fisher-Yates on ``rng``)."""
    perm = list(range(length))
    for i in range(length - 1, 0, -1):
        j = rng.randbelow(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return tuple(perm)


def random_mask(rng: Random, length: int) -> tuple[int, ...]:
    """Independent uniform bits, redrawn if all zero (a step that does nothing is no key)."""
    while True:
        bits = int.from_bytes(rng.token((length + 7) // 8), "big")
        mask = tuple((bits >> i) & 1 for i in range(length))
        if any(mask):
            return mask


def check_mask(name: str, mask: Sequence[int], length: int) -> None:
    """:class:`KeyFileError` unless ``mask`` is ``length`` values, each 0 or 1 (never echoing the values)."""
    if len(mask) != length or any(b not in (0, 1) or isinstance(b, bool) for b in mask):
        bad = sum(1 for b in mask if b not in (0, 1) or isinstance(b, bool))
        raise KeyFileError(f"{name}: mask must be {length} values, each 0 or 1; got {len(mask)} values, {bad} invalid")


def int_list(where: str, name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a tuple of ints, or :class:`KeyFileError` (key-file field ``name`` of ``where``)."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise KeyFileError(f"{where}: '{name}' must be a list of integers")
    return tuple(value)
