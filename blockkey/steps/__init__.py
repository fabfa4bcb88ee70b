"""Key steps: one module per step, each registering itself (see :mod:`blockkey.steps._base`).

The built-in steps register first, in the paper's order (shuffle, negpos, ffx: the order of
:data:`STEP_TYPES` and of error messages); every other module in this package is imported after
them, so a new step is one new file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._base import ALIASES, STEP_TYPES, TOKENS, BlockFold, KeyStep, Random, StepToken, register_step

_BUILTIN = ("shuffle", "negpos", "ffx")
for _mod in (*_BUILTIN, *sorted(m.name for m in pkgutil.iter_modules(__path__))):
    if not _mod.startswith("_"):  # importing a module twice is a no-op: the built-ins register once
        importlib.import_module(f"{__name__}.{_mod}")

from .ffx import FFX, ffx_table, password_bits  # noqa: E402 (registered above, in order)
from .negpos import NegPos  # noqa: E402
from .shuffle import Shuffle  # noqa: E402

__all__ = [
    "ALIASES",
    "FFX",
    "STEP_TYPES",
    "TOKENS",
    "BlockFold",
    "KeyStep",
    "NegPos",
    "Random",
    "Shuffle",
    "StepToken",
    "ffx_table",
    "password_bits",
    "register_step",
]
