"""Reference matching: the inner key read off the stolen weights by comparing them with a reference model.

An inner key relabels the input columns of every keyed point's layer (:mod:`blockkey.inner`); the layer's
rows, and every other layer, stay in the network's own order. A model fine-tuned from public weights (a
torchvision / timm checkpoint) keeps those weights' columns almost as they were, so each stolen column is
nearest to the public column it came from: correlate the stolen consumer's columns with the reference's
(over all rows and kernel taps), and the Hungarian method on ``|correlation|`` gives the permutation, the
correlation's sign the sign flip (GroupCover, ICML 2024; ArrowMatch, USENIX Security 2025, recover
permuted models from their public parent the same way). Against a model trained from its own random
init, a reference trained by the thief shares no basis with it and the match is chance.

The input key is given (the attack isolates the inner key); ``--reference`` is a run directory or a
safetensors state dict of the same architecture (the public checkpoint).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import argtypes as at
from ..checkpoint import load_weights, read_meta
from ..errors import BlockkeyError
from ..inner import model_points, stored_state_dict, view_points
from . import AttackReport, Target, make_report
from ._inner import Found, channel_fraction, inner_view, input_key, recovered_accuracy
from .registry import AttackData, AttackSpec, option, register_attack

__all__ = ["ReferenceMatchSettings", "load_reference_state", "match_reference", "reference_match_attack"]


def load_reference_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A reference's weights: a run directory's (plain inner-wise: a reference with an inner key is refused)
    or a ``.safetensors`` state dict."""
    p = Path(path)
    if p.is_dir():
        meta = read_meta(p)
        if meta.key is not None and meta.key.has_inner:
            raise BlockkeyError(f"--reference {path} has an inner key; the reference must be a model without one")
        return load_weights(p / "model.safetensors")
    if p.suffix != ".safetensors":
        raise BlockkeyError(f"--reference {path}: give a run directory or a .safetensors file")
    return load_weights(p)


def _hungarian(score: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-score)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def _columns(w: Tensor) -> Tensor:
    """A layer's input columns as unit vectors ``(in, out * taps)``."""
    c = w.detach().double().transpose(0, 1).reshape(w.shape[1], -1)
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match_reference(target: Target, reference: dict[str, Tensor]) -> Found:
    """``{point: (perm, sign)}`` that matches each stolen consumer's columns to the reference's: column ``j``
    reads channel ``perm[j]`` times ``sign[j]``."""
    state = stored_state_dict(target.model)  # what was stolen, whatever form the model is in now
    found = {}
    for p in model_points(target.model):
        name = f"{p.consumer}.weight"
        if name not in reference or reference[name].shape != state[name].shape:
            raise BlockkeyError(
                f"the reference has no {name} of shape {tuple(state[name].shape)}: it must be the same architecture"
            )
        corr = _columns(state[name]) @ _columns(reference[name]).T  # (stolen column j, reference column i)
        perm = _hungarian((corr.abs() if p.signs else corr).numpy())
        sign = torch.ones(p.channels)
        if p.signs:
            sign = torch.where(corr[torch.arange(p.channels), torch.from_numpy(perm)] < 0, -1.0, 1.0).float()
        found[p.name] = (torch.from_numpy(perm), sign)
    return found


def reference_match_attack(target: Target, reference: dict[str, Tensor], name: str = "reference") -> AttackReport:
    """Match the stolen weights against ``reference``; one row: the share of channels recovered and the
    stolen model's accuracy with the recovered inner key (the input key given)."""
    outer = input_key(target, "reference-match")
    started = time.perf_counter()
    view = inner_view(target)
    found = match_reference(target, reference)
    for p, point in view_points(view.model):
        point.set(*found[p.name])
    row = {
        "setting": f"reference: {name}, input key given",
        "channel_fraction": channel_fraction(view, found),
        "attacker_accuracy": recovered_accuracy(view, outer),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return make_report(target, "reference-match", [row], started)


@dataclass(frozen=True)
class ReferenceMatchSettings:
    reference: str | None = option(
        None,
        "the reference model: a run directory or a .safetensors state dict of the same architecture",
        type=at.path_name,
        metavar="RUN_OR_SAFETENSORS",
        required=True,
    )


def _run(target: Target, data: AttackData, s: ReferenceMatchSettings) -> AttackReport:
    if s.reference is None:
        raise BlockkeyError("reference-match needs --reference RUN_OR_SAFETENSORS")
    return reference_match_attack(target, load_reference_state(s.reference), s.reference)


register_attack(
    AttackSpec(
        "reference-match", "the inner key by matching the weights to a reference model", ReferenceMatchSettings, _run
    )
)
