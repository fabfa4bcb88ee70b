"""blockkey: protect image classifiers with a secret key (block-wise keyed transforms).

Implements MaungMaung & Kiya, "A Protection Method of Trained CNN Model with Secret Key from
Unauthorized Access" (APSIPA Trans. 2021, arXiv 2105.14756) on current PyTorch.
"""

from __future__ import annotations

from typing import Any

from .errors import BlockkeyError, ImageFileError, KeyFileError, KeyMismatchError, OptionError, ShapeError
from .functional import Plan, compile_plan, decrypt, decrypt_codes, encrypt, encrypt_codes
from .keys import FFX, KeySet, NegPos, Shuffle
from .transforms import KeyedTransform

__version__ = "0.1.0"

_LAZY = {"Predictor": "predict", "export_onnx": "export", "keyed_input": "export"}


def __getattr__(name: str) -> Any:
    """The deployment side loads on first use: ``blockkey.Predictor``, ``blockkey.export_onnx``, ..."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FFX",
    "BlockkeyError",
    "ImageFileError",
    "KeyFileError",
    "KeyMismatchError",
    "KeySet",
    "KeyedTransform",
    "NegPos",
    "OptionError",
    "Plan",
    "Predictor",
    "ShapeError",
    "Shuffle",
    "__version__",
    "compile_plan",
    "decrypt",
    "decrypt_codes",
    "encrypt",
    "encrypt_codes",
]
