"""Optional dependencies: imported lazily, with one clear line naming the extra that installs them."""

from __future__ import annotations

import importlib.util

from .errors import BlockkeyError

__all__ = ["EXTRAS", "require"]

#: module -> the blockkey extra that installs it
EXTRAS = {"onnx": "export", "onnxscript": "export", "onnxruntime": "export", "timm": "timm"}


def require(*modules: str) -> None:
    """Raise :class:`BlockkeyError` (``pip install 'blockkey[extra]'``) for the first missing module."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise BlockkeyError(f"this needs the package {m!r}: pip install 'blockkey[{EXTRAS.get(m, 'export')}]'")
