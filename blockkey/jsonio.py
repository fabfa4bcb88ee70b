"""The one reading path for every JSON document blockkey loads (key files, run metadata, saved states, results).

A document is refused with one line (the caller's error type: :class:`~blockkey.errors.KeyFileError` for
keys, :class:`~blockkey.errors.CheckpointError` for runs) when it is larger than :data:`MAX_JSON_BYTES`,
nested deeper than :data:`MAX_JSON_DEPTH`, holds an integer of more than :data:`MAX_INT_DIGITS` digits
(Python's own int-string limit would raise ``ValueError`` from deep inside the parser), is not UTF-8 or
not JSON. :func:`check_schema` then checks the types and ranges of its fields against a JSON Schema
(``jsonschema``, draft 2020-12) and reports the first problem with its place in the document.
docs/reliability.md lists the limits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BlockkeyError
from .fileio import show_path

__all__ = ["MAX_INT_DIGITS", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "check_schema", "loads", "read_json"]

#: Largest JSON file read (16 MiB: a key of several steps over 65536-value blocks is a few MiB).
MAX_JSON_BYTES = 16 * 2**20
#: Deepest nesting of arrays and objects (blockkey's own files nest at most 5 levels).
MAX_JSON_DEPTH = 32
#: Longest integer literal, in digits (seeds are at most 19 digits; Python refuses more than 4300).
MAX_INT_DIGITS = 100

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _depth(raw: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in a JSON text (brackets inside strings do not count)."""
    code = np.frombuffer(_STRINGS.sub(b'""', raw), dtype=np.uint8)
    step = np.isin(code, (ord("["), ord("{"))).astype(np.int64) - np.isin(code, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _TooLong(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


class _TooLong(ValueError):
    pass


def loads(raw: bytes | str, source: str, error: type[BlockkeyError]) -> Any:
    """Parse ``raw`` (a whole JSON document) within the limits; ``error`` with one line naming ``source``."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{source}: {len(raw)} bytes is larger than a blockkey JSON file may be ({MAX_JSON_BYTES})")
    depth = _depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{source}: JSON nested too deeply ({depth} levels; at most {MAX_JSON_DEPTH})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_int=_int)
    except _TooLong as e:
        raise error(f"{source}: not usable JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # defensive: the checks above should have caught these
        raise error(f"{source}: not usable JSON ({type(e).__name__})") from None


def read_json(path: str | os.PathLike[str], error: type[BlockkeyError], what: str = "file") -> Any:
    """Read and parse the JSON file ``path`` (see :func:`loads`); missing or unreadable: ``error``."""
    path = Path(path)
    name = show_path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{what} {name} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {name} is a directory, not a file") from None
    except OSError as e:
        raise error(f"cannot read {what} {name}: {e.strerror or e}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{name}: larger than a blockkey JSON file may be ({MAX_JSON_BYTES} bytes)")
    return loads(raw, name, error)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_schema(doc: Any, schema: Mapping[str, Any], source: str, error: type[BlockkeyError]) -> None:
    """Check ``doc`` against the JSON Schema ``schema``; ``error`` with one line naming the first bad field."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    problem = best_match(Draft202012Validator(schema).iter_errors(doc))
    if problem is None:
        return
    where = "/".join(str(p) for p in problem.absolute_path) or "the document"
    kind, bound = str(problem.validator), problem.validator_value
    if kind == "required":
        value = problem.instance
        missing = [k for k in bound if isinstance(value, dict) and k not in value]
        raise error(f"{source}: {where} lacks {', '.join(map(repr, missing))}")
    reasons = {
        "type": lambda: f"must be {_types(bound)}",
        "minimum": lambda: f"must be >= {bound}",
        "maximum": lambda: f"must be <= {bound}",
        "exclusiveMinimum": lambda: f"must be > {bound}",
        "minItems": lambda: f"must hold at least {bound} items",
        "maxItems": lambda: f"must hold at most {bound} items",
        "minLength": lambda: "must not be empty",
        "enum": lambda: f"must be one of {', '.join(map(repr, bound))}",
    }
    if kind not in reasons:
        raise error(f"{source}: {where}: {problem.message[:200]}")
    raise error(f"{source}: {where} {reasons[kind]()}; got {_short(problem.instance)}")


def _types(t: Any) -> str:
    names = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false"}
    names |= {"object": "an object", "array": "a list", "null": "null"}
    return " or ".join(names.get(x, str(x)) for x in ([t] if isinstance(t, str) else t))
