"""Key sets: generation from OS entropy or a KDF, the JSON key file, fingerprints, key space.

A :class:`KeySet` holds the block size ``M``, the channel count ``C`` and an ordered tuple of
steps (:class:`Shuffle`, :class:`NegPos`, :class:`FFX`, or any step registered in :mod:`blockkey.steps`).
Every step acts on block vectors of length ``L = M*M*C`` flattened in (row, col, channel) order,
channel fastest.

Secret randomness lives only in this module: :meth:`KeySet.generate` draws from the operating
system (:mod:`secrets`), :meth:`KeySet.derive` from scrypt. The global RNGs of ``random``, NumPy
and torch are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import KeyFileError
from .fileio import refuse_existing, show_path, write_json
from .jsonio import check_schema, read_json
from .steps import ALIASES, FFX, STEP_TYPES, TOKENS, KeyStep, NegPos, Random, Shuffle, ffx_table, password_bits
from .steps._base import random_perm

__all__ = [
    "FFX",
    "INNER_SECRET_BYTES",
    "KEY_FORMAT",
    "KEY_FORMAT_VERSION",
    "KEY_FORMAT_VERSION_INNER",
    "SCRYPT_PARAMS",
    "STEP_NAMES",
    "InnerKey",
    "KeyFileError",
    "KeySet",
    "NegPos",
    "Shuffle",
    "ffx_table",
    "parse_recipe",
    "password_bits",
]

KEY_FORMAT = "blockkey.keyset"
KEY_FORMAT_VERSION = 1
#: Files of keys with an inner (feature-map) key are version 2; keys without one are still written as version 1.
KEY_FORMAT_VERSION_INNER = 2
#: The inner key is a 256-bit secret; every keyed point's channel permutation and signs derive from it.
INNER_SECRET_BYTES = 32
LAYOUT = "row,col,channel"
#: Largest block vector L = M*M*C a key may cover (e.g. 128x128 blocks of 4 channels); see docs/reliability.md.
MAX_BLOCK_LEN = 65536
#: scrypt cost parameters for :meth:`KeySet.derive` (about 32 MiB and 0.1 s per derivation).
SCRYPT_PARAMS = {"n": 2**15, "r": 8, "p": 1}
#: The fields of a key file and their types (JSON Schema); each step's own fields are checked by its type.
KEY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "format": {"type": "string"},
        "version": {"type": "integer"},
        "layout": {"type": "string"},
        "block_size": {"type": "integer"},
        "channels": {"type": "integer"},
        "fingerprint": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "object", "required": ["type"]}},
        "inner": {"type": "object"},
        "meta": {"type": "object"},
    },
}


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


Step = KeyStep
#: Key-file step types, in registration order (:mod:`blockkey.steps`).
STEP_NAMES = tuple(STEP_TYPES)
#: Recipe tokens: the registered step tokens (``ffx-all`` is an FFX step on every position) and ``inner``
#: (not a block step: it keys the feature maps inside a model, :mod:`blockkey.inner`).
RECIPE_TOKENS = (*TOKENS, "inner")
#: The recommended mode, what ``keygen``, ``demo`` and the README give without asking (the one place it is set):
#: the input key plus the inner key folded into the weights (docs/attacks.md says what it stops and what not).
RECOMMENDED_RECIPE = "shuffle,negpos,ffx,inner"


@dataclass(frozen=True, slots=True, repr=False)
class InnerKey:
    """A secret for the keyed points inside a network (:mod:`blockkey.inner`).

    Each keyed point with ``n`` channels gets a permutation of its channels and ``n`` sign bits, drawn
    from a SHAKE-256 stream of the secret and the point's name and size (:meth:`point`), so one key
    file serves any model; the material in the file is the secret alone.
    """

    secret: bytes
    name = "inner"

    def __repr__(self) -> str:
        return "InnerKey(...)"

    def validate(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != INNER_SECRET_BYTES:
            raise KeyFileError(f"inner: the secret must be {INNER_SECRET_BYTES} bytes")

    def key_bits(self) -> float:
        return 8.0 * INNER_SECRET_BYTES

    def point(self, name: str, channels: int, signs: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The permutation and sign bits (1 = flip) of keyed point ``name`` with ``channels`` channels."""
        label = json.dumps(["inner-point", name, channels]).encode()
        rng = _KDFStream(hashlib.sha256(self.secret + b"|" + label).digest())
        perm = random_perm(rng, channels)
        bits = int.from_bytes(rng.token((channels + 7) // 8), "big")
        flips = tuple((bits >> i) & 1 for i in range(channels)) if signs else (0,) * channels
        return perm, flips

    def to_json(self) -> dict[str, Any]:
        return {"type": "inner", "secret": self.secret.hex()}

    @classmethod
    def from_json(cls, doc: Any) -> InnerKey:
        if not isinstance(doc, dict) or doc.get("type") != "inner" or not isinstance(doc.get("secret"), str):
            raise KeyFileError("inner: expected an object with 'type': 'inner' and a hex 'secret'")
        try:
            secret = bytes.fromhex(doc["secret"])
        except ValueError:
            raise KeyFileError("inner: 'secret' is not hex") from None
        key = cls(secret)
        key.validate()
        return key


# --------------------------------------------------------------------------------------------
# Randomness: OS entropy or a deterministic KDF stream
# --------------------------------------------------------------------------------------------


class _OSRandom:
    """Operating-system entropy (``secrets``)."""

    def randbelow(self, n: int) -> int:
        return secrets.randbelow(n)

    def token(self, nbytes: int) -> bytes:
        return secrets.token_bytes(nbytes)


class _KDFStream:
    """Deterministic byte stream from a 32-byte seed: SHAKE-256(seed || label || counter)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def token(self, nbytes: int) -> bytes:
        self._counter += 1
        msg = b"blockkey/v1/" + self._seed + self._counter.to_bytes(8, "big")
        return hashlib.shake_256(msg).digest(nbytes)

    def randbelow(self, n: int) -> int:
        # Rejection sampling on 64-bit draws: uniform, no modulo bias.
        limit = (1 << 64) - (1 << 64) % n
        while True:
            r = int.from_bytes(self.token(8), "big")
            if r < limit:
                return r % n


def _random_step(name: str, rng: Random, length: int) -> Step:
    token = TOKENS.get(name)
    if token is None:
        raise KeyFileError(f"unknown transform {name!r}; expected one of {', '.join(STEP_NAMES)}")
    return token.draw(rng, length)


def _draw(names: tuple[str, ...], rng: Random, length: int) -> tuple[tuple[Step, ...], InnerKey | None]:
    """The block steps of ``names`` in order, and the inner key if ``inner`` is among them."""
    steps = tuple(_random_step(n, rng, length) for n in names if n != "inner")
    return steps, (InnerKey(rng.token(INNER_SECRET_BYTES)) if "inner" in names else None)


def parse_recipe(recipe: str | Iterable[str]) -> tuple[str, ...]:
    """``"shuffle,negpos,ffx"`` (or ``+``-separated, or a list) -> validated tuple of recipe tokens.

    ``np`` is accepted for ``negpos`` and ``shf`` for ``shuffle``; ``ffx-all`` is FFX on every position.
    """
    parts = recipe.replace("+", ",").split(",") if isinstance(recipe, str) else list(recipe)
    names = tuple(ALIASES.get(p.strip().lower(), p.strip().lower()) for p in parts if p.strip())
    if not names:
        raise KeyFileError("a key set needs at least one transform (shuffle, negpos, ffx)")
    if names.count("inner") > 1:
        raise KeyFileError("'inner' may appear once in a recipe")
    for n in names:
        if n not in RECIPE_TOKENS:
            raise KeyFileError(f"unknown transform {n!r}; expected one of {', '.join(RECIPE_TOKENS)}")
    return names


# --------------------------------------------------------------------------------------------
# KeySet
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeySet:
    """An ordered set of block-wise keyed transforms for ``C``-channel images and ``M x M`` blocks.

    Build one with :meth:`generate` (OS entropy), :meth:`derive` (passphrase + salt, scrypt),
    :meth:`load` (a key file) or directly from explicit steps. Instances are immutable and
    validated on construction. ``repr`` shows the recipe and fingerprint, never key material.

    Example:
        >>> key = KeySet.generate("shuffle,negpos,ffx", block_size=4)
        >>> key.recipe, key.block_len
        (('shuffle', 'negpos', 'ffx'), 48)
    """

    block_size: int
    channels: int
    steps: tuple[Step, ...]
    #: Non-secret provenance (e.g. the KDF salt and parameters); not part of the fingerprint.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: The key of the feature maps inside the network (recipe token ``inner``), or None.
    inner: InnerKey | None = None

    def __post_init__(self) -> None:
        _block_len(self.block_size, self.channels)
        if not self.steps and self.inner is None:
            raise KeyFileError("a key set needs at least one step")
        object.__setattr__(self, "steps", tuple(self.steps))
        if self.inner is not None:
            if not isinstance(self.inner, InnerKey):
                raise KeyFileError(f"unknown inner key {self.inner!r}")
            self.inner.validate()
        for step in self.steps:
            if not isinstance(step, KeyStep):
                raise KeyFileError(f"unknown step {step!r}")
            step.validate(self.block_len)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def generate(cls, recipe: str | Iterable[str], block_size: int, channels: int = 3) -> KeySet:
        """A fresh key set from OS entropy (``secrets``): uniform permutations, masks, 128-bit passwords."""
        names = parse_recipe(recipe)
        steps, inner = _draw(names, _OSRandom(), _block_len(block_size, channels))
        return cls(block_size, channels, steps, meta={"source": "os-entropy"}, inner=inner)

    @classmethod
    def from_seed(
        cls, seed: int | str | bytes, recipe: str | Iterable[str], block_size: int, channels: int = 3
    ) -> KeySet:
        """A reproducible key drawn from a public ``seed``: NOT secret (anyone with the seed has it).

        For attacks (reproducible random candidate keys) and experiments, never for protecting a model.
        """
        names = parse_recipe(recipe)
        raw = seed if isinstance(seed, bytes) else str(seed).encode()
        rng = _KDFStream(hashlib.sha256(b"blockkey/from_seed|" + raw).digest())
        steps, inner = _draw(names, rng, _block_len(block_size, channels))
        return cls(block_size, channels, steps, meta={"source": "public seed (not secret)"}, inner=inner)

    @classmethod
    def derive(
        cls,
        passphrase: str,
        recipe: str | Iterable[str],
        block_size: int,
        channels: int = 3,
        salt: bytes | None = None,
    ) -> KeySet:
        """A key set derived deterministically from ``passphrase`` and ``salt`` with scrypt.

        The same passphrase, salt, recipe, block size and channel count always give the same key.
        Without a salt a random 16-byte salt is drawn; it is recorded (not secret) in
        ``meta["kdf"]`` and in the key file so the key can be derived again.
        """
        names = parse_recipe(recipe)
        length = _block_len(block_size, channels)
        salt = secrets.token_bytes(16) if salt is None else salt
        seed = _scrypt_seed(passphrase, salt, json.dumps([list(names), block_size, channels]).encode())
        steps, inner = _draw(names, _KDFStream(seed), length)
        meta = {"source": "scrypt", "kdf": {"name": "scrypt", "salt": salt.hex(), **SCRYPT_PARAMS}}
        return cls(block_size, channels, steps, meta=meta, inner=inner)

    # -- properties --------------------------------------------------------------------------

    @property
    def block_len(self) -> int:
        """``L = M*M*C``, the length of one block vector."""
        return self.block_size * self.block_size * self.channels

    @property
    def recipe(self) -> tuple[str, ...]:
        """Step names in order, e.g. ``('shuffle', 'negpos', 'ffx')``: not secret."""
        return tuple(s.name for s in self.steps)

    @property
    def spec(self) -> tuple[str, ...]:
        """The recipe tokens that draw keys like this one: :attr:`recipe` with ``ffx-all`` for an FFX
        step on every position (what an attacker who knows the algorithm draws candidates from)."""
        tokens = tuple(s.token() for s in self.steps)
        return (*tokens, "inner") if self.inner is not None else tokens

    @property
    def label(self) -> str:
        """The recipe for people, e.g. ``shuffle+negpos+inner``: not secret."""
        return "+".join(self.recipe + (("inner",) if self.inner is not None else ()))

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the canonical key material: safe to log and to store."""
        return hashlib.sha256(_canonical(self)).hexdigest()[:16]

    def key_space_bits(self) -> list[tuple[str, float]]:
        """log2 of the key space per step, in order: ``[(name, bits), ...]``.

        Shuffle ``log2(L!)``, negpos ``L``, ffx ``L`` plus an upper bound on the password's entropy
        (:func:`password_bits`). The total (:meth:`key_space_total`) bounds the number of distinct
        transforms from above. A key derived from a passphrase is never stronger than the passphrase.
        """
        bits = [(s.name, s.key_bits()) for s in self.steps]
        return bits + ([("inner", self.inner.key_bits())] if self.inner is not None else [])

    def key_space_total(self) -> float:
        return sum(b for _, b in self.key_space_bits())

    def with_note(self, note: str) -> KeySet:
        """The same key with a non-secret ``meta["note"]`` (e.g. marking a demo key)."""
        return KeySet(self.block_size, self.channels, self.steps, meta={**self.meta, "note": note}, inner=self.inner)

    def __repr__(self) -> str:
        return (
            f"KeySet(recipe={self.label}, block_size={self.block_size}, "
            f"channels={self.channels}, fingerprint={self.fingerprint})"
        )

    # -- serialisation -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": KEY_FORMAT,
            "version": KEY_FORMAT_VERSION if self.inner is None else KEY_FORMAT_VERSION_INNER,
            "layout": LAYOUT,
            "block_size": self.block_size,
            "channels": self.channels,
            "fingerprint": self.fingerprint,
            "steps": [s.to_json() for s in self.steps],
        }
        if self.inner is not None:
            doc["inner"] = self.inner.to_json()
        if self.meta:
            doc["meta"] = self.meta
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> KeySet:
        """Parse and validate a key document; :class:`KeyFileError` with one clear line on any problem."""
        block_size, channels, steps, meta, inner = _parse_key_doc(doc)
        key = cls(block_size, channels, steps, meta=meta, inner=inner)
        expected = doc.get("fingerprint")
        if expected is not None and expected != key.fingerprint:
            raise KeyFileError(
                f"key file is corrupt: fingerprint {expected!r} does not match its key material ({key.fingerprint})"
            )
        return key

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the key file with mode 0600, atomically (a crash never leaves half a key).

        The file is created 0600 in the target folder, then renamed into place; without
        ``overwrite`` an existing file is never replaced (``FileExistsError``).
        """
        path = Path(path)
        refuse_existing(path, overwrite)
        return write_json(path, self.to_json(), private=True, overwrite=overwrite)  # refuses one made meanwhile

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeySet:
        """Read and validate a key file; :class:`KeyFileError` for corrupt or unusable files."""
        path = Path(path)
        doc = _read_key_json(path)
        try:
            return cls.from_json(doc)
        except KeyFileError as e:
            raise KeyFileError(f"{path}: {e}") from None


def _scrypt_seed(passphrase: str, salt: bytes, context: bytes) -> bytes:
    """32 bytes of scrypt over the passphrase (:data:`SCRYPT_PARAMS`), salted with ``salt | context``."""
    if not passphrase:
        raise KeyFileError("passphrase must not be empty")
    try:
        secret = passphrase.encode("utf-8")
    except UnicodeEncodeError:
        raise KeyFileError("the passphrase is not valid Unicode text") from None
    return hashlib.scrypt(secret, salt=salt + b"|" + context, dklen=32, maxmem=2**26, **SCRYPT_PARAMS)


def _parse_key_doc(doc: Any) -> tuple[Any, Any, tuple[Step, ...], dict[str, Any], InnerKey | None]:
    """A key document's ``(block_size, channels, steps, meta, inner)``, its header checked; the sizes
    are the JSON's (:class:`KeySet` checks them)."""
    if not isinstance(doc, dict):
        raise KeyFileError("not a blockkey key file (expected a JSON object)")
    if doc.get("format") != KEY_FORMAT:
        raise KeyFileError(f"not a blockkey key file (format {doc.get('format')!r}, expected {KEY_FORMAT!r})")
    version = doc.get("version")
    if version not in (KEY_FORMAT_VERSION, KEY_FORMAT_VERSION_INNER) or isinstance(version, bool):
        raise KeyFileError(
            f"unsupported key file version {version!r} "
            f"(this blockkey reads {KEY_FORMAT_VERSION} and {KEY_FORMAT_VERSION_INNER})"
        )
    if ("inner" in doc) != (version == KEY_FORMAT_VERSION_INNER):
        need = "needs" if "inner" not in doc else "cannot hold"
        raise KeyFileError(f"key file version {version} {need} an inner key")
    inner = InnerKey.from_json(doc["inner"]) if "inner" in doc else None
    if doc.get("layout", LAYOUT) != LAYOUT:
        raise KeyFileError(f"unsupported block layout {doc.get('layout')!r}; expected {LAYOUT!r}")
    steps_doc = doc.get("steps")
    if not isinstance(steps_doc, list):
        raise KeyFileError("key file has no 'steps' list")
    steps = tuple(_step_from_json(i, s) for i, s in enumerate(steps_doc))
    meta = doc.get("meta", {})
    meta = meta if isinstance(meta, dict) else {}
    block_size: Any = doc.get("block_size")  # JSON: the constructor checks both (KeyFileError)
    channels: Any = doc.get("channels")
    return block_size, channels, steps, meta, inner


def _read_key_json(path: Path) -> Any:
    """The JSON of a key file (:func:`blockkey.jsonio.read_json`: size, depth and integer limits), its header
    fields' types checked; :class:`KeyFileError` with one line otherwise."""
    doc = read_json(path, KeyFileError, "key file")
    if isinstance(doc, dict):  # anything else: not a key file (from_json says so)
        check_schema(doc, KEY_SCHEMA, show_path(path), KeyFileError)
    return doc


def _block_len(block_size: int, channels: int) -> int:
    for name, v in (("block_size", block_size), ("channels", channels)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise KeyFileError(f"{name} must be a positive integer; got {v!r}")
    length = block_size * block_size * channels
    if length > MAX_BLOCK_LEN:
        raise KeyFileError(
            f"a {block_size}x{block_size} block of {channels} channels holds {length} values; a key covers at most "
            f"{MAX_BLOCK_LEN} (its permutation, masks and per-position tables grow with it)"
        )
    return length


def _step_from_json(i: int, doc: Any) -> Step:
    where = f"step {i}"
    if not isinstance(doc, dict):
        raise KeyFileError(f"{where}: expected an object with a 'type'")
    kind = doc.get("type")
    cls = STEP_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise KeyFileError(f"{where}: unknown type {kind!r}; expected one of {', '.join(STEP_NAMES)}")
    return cls.from_json(where, doc)


def _canonical(key: KeySet) -> bytes:
    body = {
        "version": KEY_FORMAT_VERSION,
        "block_size": key.block_size,
        "channels": key.channels,
        "steps": [s.to_json() for s in key.steps],
    }
    if key.inner is not None:  # absent for keys without one: their fingerprints are unchanged
        body["inner"] = key.inner.to_json()
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def refuse_foreign_key(path: str | os.PathLike[str], note: str) -> None:
    """Raise unless ``path`` is absent or holds a key marked with ``note``: commands that make
    throw-away keys (tour, demo) may replace their own, never a real one."""
    path = Path(path)
    if not path.exists():
        return
    try:
        ours = KeySet.load(path).meta.get("note") == note
    except KeyFileError:
        ours = False
    if not ours:
        raise KeyFileError(f"{path} exists and is not a key made by this command; pick another folder with -o")
