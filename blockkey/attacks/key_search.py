"""Key search: random keys, and the authors' key estimation (random search, then a swap hill-climb).

The attacker scores a candidate key by the stolen model's accuracy on a small labelled batch of
plain training images (its only labelled data) and keeps the best. ``random-keys`` draws keys of
the recipe; ``key-search`` then climbs from the best one: swap two entries of a permutation or flip
one bit of a mask, keep the change if the batch accuracy does not drop. FFX passwords are not
searched (2^129 of them): the attacker keeps a random password. The reported accuracy is on the
held-out evaluation images, never on the batch used to search. Candidate keys and moves come from
``seed`` (:meth:`KeySet.from_seed`): an attack is reproducible, and its keys are not secrets.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

import torch

from .. import argtypes as at
from ..data import Data, ImageTensors, stratified_subset
from ..functional import compile_block_plan
from ..keys import FFX, KeySet, NegPos, Shuffle
from ..runtime import autocast, normalise
from ..steps import KeyStep
from ..transforms import KeyedTransform
from . import AttackReport, Target, accuracy, check_counts, make_report
from .known_plaintext import key_agreement
from .registry import AttackData, AttackSpec, option, register_attack, seed_option

__all__ = ["KeySearchSettings", "RandomKeysSettings", "hill_climb", "key_search_attack", "random_keys_attack"]


class _Scorer:
    """Accuracy of the stolen model on one fixed labelled batch (the attacker's), for many keys."""

    def __init__(self, target: Target, batch: ImageTensors) -> None:
        self.target = target
        self.x = batch.images.to(target.device)
        self.y = batch.labels.to(target.device)
        norm = target.normalize
        self.norm = norm.tensors(batch.image_shape, target.device) if norm is not None else None

    @torch.no_grad()
    def __call__(self, key: KeySet) -> float:
        x = KeyedTransform(key).to(self.target.device)(self.x)
        x = normalise(x, self.norm)
        with autocast(self.target.device, self.target.amp):
            pred = self.target.model.eval()(x).argmax(1)
        return float((pred == self.y).double().mean())


def _batch(train: Data, size: int, seed: int) -> ImageTensors:
    check_counts("--batch", size, len(train), "attack-pool images")
    sub = stratified_subset(train, size, seed)
    assert isinstance(sub, ImageTensors)
    return sub


def _random_search(target: Target, score: _Scorer, n: int, seed: int, progress: bool) -> tuple[KeySet, list[float]]:
    from tqdm import tqdm

    k = target.keyset
    best, best_score, scores = None, -1.0, []
    for i in tqdm(range(n), desc="random keys", disable=not progress, leave=False):
        cand = KeySet.from_seed(f"attack/{seed}/{i}", k.spec, k.block_size, k.channels)
        s = score(cand)
        scores.append(s)
        if s > best_score:
            best, best_score = cand, s
    assert best is not None
    return best, scores


def _check_counts(seed: int, **counts: int) -> None:
    for name, value in counts.items():
        at.COUNT.check(name, value)
    at.SEED.check("seed", seed)


def random_keys_attack(
    target: Target, train: Data, keys: int = 100, batch: int = 256, seed: int = 0, progress: bool = True
) -> AttackReport:
    """``keys`` random keys of the recipe scored on ``batch`` labelled training images; the best one's
    accuracy on the evaluation images."""
    _check_counts(seed, keys=keys, batch=batch)
    t0 = time.perf_counter()
    score = _Scorer(target, _batch(train, batch, seed))
    best, scores = _random_search(target, score, keys, seed, progress)
    row = {
        "setting": f"best of {keys} random keys",
        "keys": keys,
        "batch_images": len(score.y),
        "batch_accuracy_mean": sum(scores) / len(scores),
        "batch_accuracy_max": max(scores),
        "attacker_accuracy": accuracy(target, KeyedTransform(best)),
        **key_agreement(compile_block_plan(best), compile_block_plan(target.keyset)),
    }
    return make_report(target, "random-keys", [row], t0)


def _neighbour(key: KeySet, rng: random.Random) -> KeySet:
    """One random move: swap two permutation entries or flip one mask bit (other steps: no move)."""
    i = rng.randrange(len(key.steps))
    step = key.steps[i]
    length = key.block_len
    if isinstance(step, Shuffle):
        a, b = rng.randrange(length), rng.randrange(length)
        perm = list(step.perm)
        perm[a], perm[b] = perm[b], perm[a]
        new: KeyStep = Shuffle(tuple(perm))
    elif isinstance(step, (NegPos, FFX)):
        mask = list(step.mask)
        j = rng.randrange(length)
        mask[j] ^= 1
        if not any(mask):  # masks are never all-zero
            return key
        new = NegPos(tuple(mask)) if isinstance(step, NegPos) else FFX(tuple(mask), step.password)
    else:  # a step this search has no moves for stays as drawn
        return key
    steps = list(key.steps)
    steps[i] = new
    return replace(key, steps=tuple(steps))


def hill_climb(
    target: Target,
    score: _Scorer,
    key: KeySet,
    iterations: int,
    *,
    seed: int = 0,
    report_at: set[int] | None = None,
    progress: bool = True,
) -> tuple[KeySet, list[dict]]:
    """The authors' swap hill-climb from ``key``: keep a move when the batch accuracy does not drop.

    Returns the final key and a row (batch and held-out accuracy, key agreement) at each iteration
    in ``report_at`` (default: the start and the end).
    """
    from tqdm import tqdm

    rng = random.Random(seed)
    true_plan = compile_block_plan(target.keyset)
    report_at = {0, iterations} if report_at is None else report_at | {0}
    cur = score(key)
    rows = []

    def row(it: int) -> dict:
        return {
            "setting": f"after {it} swaps/flips",
            "iterations": it,
            "batch_accuracy": cur,
            "attacker_accuracy": accuracy(target, KeyedTransform(key)),
            **key_agreement(compile_block_plan(key), true_plan),
        }

    rows.append(row(0))
    for it in tqdm(range(1, iterations + 1), desc="hill-climb", disable=not progress, leave=False):
        cand = _neighbour(key, rng)
        s = score(cand)
        if s >= cur:
            key, cur = cand, s
        if it in report_at:
            rows.append(row(it))
    return key, rows


def key_search_attack(
    target: Target,
    train: Data,
    *,
    random_keys: int = 100,
    iterations: int = 2000,
    batch: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> AttackReport:
    """The authors' key estimation: the best of ``random_keys``, then ``iterations`` hill-climbing moves."""
    _check_counts(seed, random_keys=random_keys, iterations=iterations, batch=batch)
    t0 = time.perf_counter()
    score = _Scorer(target, _batch(train, batch, seed))
    start, _ = _random_search(target, score, random_keys, seed, progress)
    marks = {iterations * f // 4 for f in (1, 2, 3, 4)}
    _, rows = hill_climb(target, score, start, iterations, seed=seed, report_at=marks, progress=progress)
    for r in rows:
        r["setting"] = f"best of {random_keys} random keys, {r['setting']}"
    return make_report(target, "key-search", rows, t0)


@dataclass(frozen=True)
class RandomKeysSettings:
    keys: int = option(100, "random keys to draw", type=at.COUNT)
    batch: int = option(256, "labelled images to score on", type=at.COUNT)
    seed: int = seed_option()


@dataclass(frozen=True)
class KeySearchSettings:
    keys: int = option(100, "random keys to draw before the hill climb", type=at.COUNT)
    iterations: int = option(2000, "hill-climbing moves", type=at.COUNT)
    batch: int = option(256, "labelled images to score on", type=at.COUNT)
    seed: int = seed_option()


def _run_random(target: Target, data: AttackData, s: RandomKeysSettings) -> AttackReport:
    return random_keys_attack(target, data.train, s.keys, s.batch, seed=s.seed, progress=data.progress)


def _run_search(target: Target, data: AttackData, s: KeySearchSettings) -> AttackReport:
    return key_search_attack(
        target,
        data.train,
        random_keys=s.keys,
        iterations=s.iterations,
        batch=s.batch,
        seed=s.seed,
        progress=data.progress,
    )


register_attack(
    AttackSpec("random-keys", "the best of random keys drawn like the true one", RandomKeysSettings, _run_random)
)
register_attack(
    AttackSpec(
        "key-search",
        "random keys, then hill climbing on labelled accuracy",
        KeySearchSettings,
        _run_search,
        "iterations",
    )
)
