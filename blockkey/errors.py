"""Exception types. Every user error is a :class:`BlockkeyError`; the CLI prints it as one line."""

from __future__ import annotations

__all__ = [
    "BlockkeyError",
    "CheckpointError",
    "ImageFileError",
    "KeyFileError",
    "KeyMismatchError",
    "OptionError",
    "OutputExistsError",
    "ShapeError",
]


class BlockkeyError(Exception):
    """Base class of the errors a user can cause (bad input, not a bug)."""


class KeyFileError(BlockkeyError, ValueError):
    """A key file or key material that cannot be used (corrupt, inconsistent, wrong version)."""


class ShapeError(BlockkeyError, ValueError):
    """A tensor or image whose shape does not fit the key (channels, block size, rank)."""


class KeyMismatchError(BlockkeyError, ValueError):
    """Data that was not made with this key (e.g. ciphertext codes the key cannot produce)."""


class ImageFileError(BlockkeyError, ValueError):
    """An image file that cannot be read or written as asked (unreadable, lossy format, bit depth)."""


class CheckpointError(BlockkeyError, ValueError):
    """A run directory or checkpoint that cannot be used (missing, corrupt, pickled)."""


class OptionError(BlockkeyError, ValueError):
    """An option or argument outside its allowed range (a count below 1, a probability above 1, NaN)."""


class OutputExistsError(BlockkeyError, FileExistsError):
    """An output file that exists, or a non-empty folder blockkey did not make, and no ``--force``."""
