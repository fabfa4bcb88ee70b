"""What the attacks on an inner key share: the stolen model's keyed-point view, the input key given, scoring."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import KeyMismatchError
from ..inner import inner_points, with_keyed_points
from ..keys import KeySet
from ..transforms import KeyedTransform
from . import Target, accuracy

__all__ = ["channel_fraction", "inner_view", "input_key", "recovered_accuracy"]

Found = dict[str, tuple[torch.Tensor, torch.Tensor]]


def input_key(target: Target, attack: str) -> KeySet | None:
    """The true key's input part (given to the attack: it isolates the inner key); refuses a key without an
    inner part."""
    key = target.key
    if not isinstance(key, KeySet) or key.inner is None:
        raise KeyMismatchError(f"{attack} attacks a key with an inner part (recipe token 'inner')")
    return KeySet(key.block_size, key.channels, key.steps) if key.steps else None


def inner_view(target: Target) -> Target:
    """``target`` with the stolen weights as stored and an explicit keyed point in front of each consumer
    (:func:`blockkey.inner.with_keyed_points`) for the attack to set."""
    return replace(target, model=with_keyed_points(target.model))


def channel_fraction(view: Target, found: Found) -> float:
    """The share of channels, over every point, whose source and sign the attack got right."""
    true = inner_points(view.model, view.keyset.inner)  # type: ignore[arg-type]  # input_key checked it
    right = sum(int(((found[p][0] == tp) & (found[p][1] == ts)).sum()) for p, (tp, ts) in true.items())
    return right / sum(len(tp) for tp, _ in true.values())


def recovered_accuracy(view: Target, outer: KeySet | None) -> float:
    """The stolen model's accuracy with the input key and the view's points as the attack set them."""
    return accuracy(view, KeyedTransform(outer) if outer is not None else None, keep_inner=True)
