"""A run's metadata (``RUN_DIR/meta.json``) as one typed, frozen record: :class:`RunMeta`.

The file format is unchanged (``format: blockkey.model``, ``version: 1``, the same keys); runs written
before a key was added still load, with the defaults defined here and nowhere else. Readers use the
typed fields and the resolved properties (``amp``, ``normalize``, ``key.steps``, ...), never string keys
with their own defaults. For scripts that index ``meta["key"]`` a :class:`RunMeta` is also a read-only
mapping over its JSON form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .data import Normalize
from .errors import BlockkeyError, CheckpointError
from .jsonio import check_schema
from .runtime import resolve_amp

if TYPE_CHECKING:
    from .keys import KeySet

__all__ = ["META_FORMAT", "META_SCHEMA", "META_VERSION", "KeyInfo", "RunMeta", "check_model_args", "key_info"]

META_FORMAT = "blockkey.model"
META_VERSION = 1


@dataclass(frozen=True)
class KeyInfo:
    """What a run stores about its key: the recipe and fingerprint, never key material."""

    fingerprint: str
    recipe: tuple[str, ...]
    block_size: int
    channels: int
    spec: tuple[str, ...] | None = None  # absent in runs made before key specs (then: the recipe)

    @classmethod
    def from_key(cls, key: KeySet | None) -> KeyInfo | None:
        if key is None:
            return None
        return cls(key.fingerprint, tuple(key.recipe), key.block_size, key.channels, tuple(key.spec))

    @property
    def steps(self) -> tuple[str, ...]:
        """The recipe tokens that draw keys like this one (``ffx-all``, ``inner`` included)."""
        return self.spec if self.spec is not None else self.recipe

    @property
    def has_inner(self) -> bool:
        return "inner" in self.steps

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"fingerprint": self.fingerprint, "recipe": list(self.recipe)}
        if self.spec is not None:
            doc["spec"] = list(self.spec)
        return doc | {"block_size": self.block_size, "channels": self.channels}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> KeyInfo:
        spec = doc.get("spec")
        return cls(
            str(doc["fingerprint"]),
            tuple(doc["recipe"]),
            int(doc["block_size"]),
            int(doc["channels"]),
            tuple(spec) if spec is not None else None,
        )


def key_info(key: KeySet | None) -> dict[str, Any] | None:
    """What a run stores about ``key`` (its :class:`KeyInfo` as JSON), ``None`` without a key."""
    info = KeyInfo.from_key(key)
    return info.to_json() if info is not None else None


_INT = {"type": "integer"}
_POS = {"type": "integer", "minimum": 1}
_NAT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_NAME = {"type": "string", "minLength": 1}
_OBJ = {"type": "object"}
_NULL = {"type": "null"}


def _opt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _NULL]}


#: What ``meta.json`` may hold, field by field (JSON Schema, draft 2020-12); unknown fields are kept as they are.
META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "version", "model", "classes", "image_shape"],
    "properties": {
        "model": _NAME,
        "model_kwargs": _opt(_OBJ),
        "classes": {"type": "array", "items": _STR, "minItems": 1, "maxItems": 1_000_000},
        "image_shape": {"type": "array", "items": {**_POS, "maximum": 65536}, "minItems": 3, "maxItems": 3},
        "key": _opt(
            {
                "type": "object",
                "required": ["fingerprint", "recipe", "block_size", "channels"],
                "properties": {
                    "fingerprint": _NAME,
                    "recipe": {"type": "array", "items": _NAME},
                    "spec": _opt({"type": "array", "items": _NAME}),
                    "block_size": {**_POS, "maximum": 65536},
                    "channels": {**_POS, "maximum": 65536},
                },
            }
        ),
        "passport": _opt(
            {
                "type": "object",
                "required": ["fingerprint"],
                "properties": {
                    "fingerprint": _NAME,
                    "layers": {"type": "array", "items": _STR},
                    "signature_bits": _NAT,
                },
            }
        ),
        "normalize": _opt(
            {
                "type": "object",
                "required": ["mean", "std", "mode"],
                "properties": {
                    "mean": {"type": "array", "items": _NUM, "minItems": 1},
                    "std": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 1},
                    "mode": _NAME,
                    "block_size": _opt(_POS),
                },
            }
        ),
        "config": _opt(
            {
                "type": "object",
                "properties": {
                    "amp": _STR,
                    "channels_last": {"type": "boolean"},
                    "norm": _STR,
                    "label_smoothing": {"type": "number", "minimum": 0, "maximum": 1},
                },
            }
        ),
        "data": _opt(
            {
                "type": "object",
                "properties": {
                    "source": _opt(_STR),
                    "val_fraction": _opt({"type": "number", "minimum": 0, "maximum": 1}),
                    "split_seed": _opt({**_NAT, "maximum": 2**63 - 1}),
                    "limit": _opt(_POS),
                    "stream_image_size": _opt({**_POS, "maximum": 4096}),
                },
            }
        ),
        "world_size": _opt(_POS),
        "versions": _opt({"type": "object", "additionalProperties": _STR}),
        "epochs_done": _opt(_NAT),
        "history": _opt({"type": "array", "items": _OBJ}),
        "metrics": _opt(_OBJ),
        "conversions": _opt({"type": "array", "items": _OBJ}),
        "evaluation": _opt(_OBJ),
    },
}

# model arguments: their ranges where the name says what they are; other numbers are sizes up to _MAX_SIZE
_MAX_SIZE = 4096


def check_model_args(model: str, kwargs: Mapping[str, Any], source: str = "metadata") -> None:
    """Check ``kwargs`` against the signature of registered model ``model`` before it is built: every name one
    the model takes, every value of the type of its default and in range. :class:`CheckpointError` otherwise.
    (``tv_``/``timm_`` models take their library's arguments: only their names and plain values are checked.)"""
    import inspect

    from . import argtypes as at
    from .models import _REGISTRY  # the factories themselves: their signatures are the models' arguments

    for name, value in kwargs.items():
        if not isinstance(value, (bool, int, float, str, list, type(None))):
            raise CheckpointError(f"{source}: model argument {name} must be a number, text or list; got {value!r}")
    factory = _REGISTRY.get(model)
    if factory is None:
        return
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # a factory that takes any argument (a wrapper): its callee checks them
    for name, value in kwargs.items():
        where = f"{source}: model_kwargs/{name}"
        if name in ("num_classes", "in_channels") or name not in params:
            takes = ", ".join(p for p in params if p not in ("num_classes", "in_channels"))
            raise CheckpointError(f"{where}: {model} takes no argument {name!r} (it takes {takes})")
        default = params[name].default
        try:
            if name == "width":
                at.WIDTH.check(name, value)
            elif name in ("patch", "image_size"):
                (at.BLOCK_SIZE if name == "patch" else at.IMAGE_SIZE).check(name, value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise BlockkeyError(f"must be true or false; got {value!r}")
            elif isinstance(default, int) or (default is None and value is not None):
                at.Int(1, _MAX_SIZE).check(name, value)
            elif isinstance(default, float):
                at.Float(0, _MAX_SIZE, lo_open=True).check(name, value)
            elif isinstance(default, (tuple, list)):
                if not isinstance(value, list) or not 1 <= len(value) <= 16:
                    raise BlockkeyError(f"must be a list of 1 to 16 sizes; got {value!r}")
                at.Int(1, _MAX_SIZE).check_each(name, value)
        except BlockkeyError as e:
            raise CheckpointError(f"{where}: {str(e)[:200]}") from None


# JSON key -> field name where they differ; the order is the order of meta.json.
_ORDER = (
    "model",
    "model_kwargs",
    "classes",
    "image_shape",
    "key",
    "passport",
    "normalize",
    "config",
    "data",
    "world_size",
    "versions",
    "epochs_done",
    "history",
    "metrics",
)
_OPTIONAL = ("conversions", "evaluation")  # written only when present


@dataclass(frozen=True)
class RunMeta(Mapping[str, Any]):
    """The metadata of a finished run (see the module docstring); :meth:`from_json` / :meth:`to_json`."""

    model: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    key: KeyInfo | None = None
    passport: dict[str, Any] | None = None  # Passports.info(): fingerprint, layers, signature_bits
    normalize: Normalize | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the TrainConfig as trained (older runs: fewer fields)
    data: dict[str, Any] = field(default_factory=dict)  # source, val_fraction, split_seed, limit, stream_image_size
    world_size: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    conversions: list[dict[str, Any]] = field(default_factory=list)  # convert / rekey steps, oldest first
    evaluation: dict[str, Any] | None = None  # the model card's evaluation
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    # -- resolved settings (the defaults for runs that predate a field live here only) --------------

    @property
    def amp(self) -> str:
        """The autocast mode to run the model with here, resolved (``auto``: bf16 where this CPU has it natively)."""
        return resolve_amp(str(self.config.get("amp", "auto")))

    @property
    def channels_last(self) -> bool:
        return bool(self.config.get("channels_last", True))

    @property
    def norm_mode(self) -> str:
        """The ``--norm`` setting it trained with (``channel``, ``position`` or ``none``)."""
        return str(self.config.get("norm", "channel"))

    @property
    def label_smoothing(self) -> float:
        return float(self.config.get("label_smoothing", 0.0))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str | None:
        """The key's fingerprint, the passports' for a passport model, or ``None`` for a plain model."""
        if self.key is not None:
            return self.key.fingerprint
        return str(self.passport["fingerprint"]) if self.passport else None

    @property
    def data_source(self) -> str | None:
        return self.data.get("source") or None

    @property
    def stream_image_size(self) -> int | None:
        return self.data.get("stream_image_size") or None

    # -- JSON -------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ``meta.json`` document (same keys and order as always)."""
        doc: dict[str, Any] = {"format": META_FORMAT, "version": META_VERSION}
        for name in _ORDER:
            value = getattr(self, name)
            if name in ("classes", "image_shape"):
                value = list(value)
            elif name in ("key", "normalize"):
                value = value.to_json() if value is not None else None
            doc[name] = value
        for name in _OPTIONAL:
            if getattr(self, name):
                doc[name] = getattr(self, name)
        return doc | self.extra

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = "metadata") -> RunMeta:
        """Read a ``meta.json`` document; :class:`CheckpointError` names what is wrong with it."""
        if not isinstance(doc, Mapping) or doc.get("format") != META_FORMAT:
            raise CheckpointError(f"{source}: not blockkey model metadata")
        if doc.get("version") != META_VERSION or isinstance(doc.get("version"), bool):
            raise CheckpointError(f"{source}: unsupported metadata version {doc.get('version')!r}")
        check_schema(doc, META_SCHEMA, source, CheckpointError)
        check_model_args(doc["model"], doc.get("model_kwargs") or {}, source)
        try:
            known = {f.name for f in fields(cls)} - {"extra"}
            values: dict[str, Any] = {k: v for k, v in doc.items() if k in known and v is not None}
            values["classes"] = tuple(doc["classes"])
            c, h, w = (int(v) for v in doc["image_shape"])
            values["image_shape"] = (c, h, w)
            if not isinstance(doc["model"], str) or not doc["model"]:
                raise ValueError(f"model must be a name, not {doc['model']!r}")
            values["model"] = doc["model"]
            if values.get("key") is not None:
                values["key"] = KeyInfo.from_json(values["key"])
            if values.get("normalize") is not None:
                values["normalize"] = Normalize.from_json(values["normalize"])
            extra = {k: v for k, v in doc.items() if k not in known and k not in ("format", "version")}
            return cls(**values, extra=extra)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: incomplete or corrupt metadata ({type(e).__name__}: {e})") from None

    @classmethod
    def coerce(cls, meta: RunMeta | Mapping[str, Any]) -> RunMeta:
        """``meta`` itself, or a ``meta.json``-shaped mapping read into a :class:`RunMeta`."""
        return meta if isinstance(meta, RunMeta) else cls.from_json(meta)

    # -- read-only mapping over the JSON form (for scripts written against meta.json) --------------

    def __getitem__(self, name: str) -> Any:
        return self.to_json()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())
