"""Toy attack (shows a one-file attack): feed the stolen model plain images, optionally a stratified sample."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .. import argtypes as at
from ..data import stratified_subset
from . import AttackReport, Target, accuracy, make_report
from .registry import AttackData, AttackSpec, option, register_attack

__all__ = ["PlainImagesSettings"]


@dataclass(frozen=True)
class PlainImagesSettings:
    limit: int | None = option(None, "a stratified sample of N evaluation images", type=at.COUNT)


def _run(target: Target, data: AttackData, s: PlainImagesSettings) -> AttackReport:
    started = time.perf_counter()
    val = target.val if s.limit is None else stratified_subset(target.val, s.limit, 0)
    row = {"setting": f"{len(val)} plain images", "images": len(val), "attacker_accuracy": accuracy(target, None, val)}
    return make_report(target, "plain-images", [row], started)


register_attack(
    AttackSpec("plain-images", "the stolen model on plain images (no key at all)", PlainImagesSettings, _run)
)
