"""``blockkey demo``: a protected model and its non-protected twin, trained and compared.

Trains on the embedded CIFAR-10 subset (no download) with everything shared but the key, then
shows who gets accuracy: the key holder, a thief with plain images, a thief with random wrong keys.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import load_demo, stratified_subset
from .errors import BlockkeyError
from .evaluate import evaluate_run
from .keys import RECOMMENDED_RECIPE, KeySet, refuse_foreign_key
from .models import model_kwargs_for
from .train import TrainConfig, fit

__all__ = ["DEMO_MODEL", "DEMO_NOTE", "run_demo"]

DEMO_NOTE = "blockkey demo key (made by `blockkey demo`; not for real use)"
#: The demo's architecture: block-aligned like ``train``'s default (fullnet) at a quarter of its resolution,
#: so that the pair trains in minutes on two CPU cores (fullnet takes about 20x longer an image).
DEMO_MODEL = "patchnet"


def _own_folder(out: Path) -> None:
    """Refuse to reuse a folder that holds anything but an earlier demo (never destroy a real key)."""
    key = out / "key.json"
    if key.exists():
        refuse_foreign_key(key, DEMO_NOTE)
    elif out.exists() and any(out.iterdir()):
        raise BlockkeyError(f"{out} is not empty and holds no earlier demo; pick another folder with -o")


def run_demo(
    out_dir: str | Path = "blockkey-demo",
    *,
    transforms: str = RECOMMENDED_RECIPE,
    block_size: int = 4,
    model: str = DEMO_MODEL,
    epochs: int = 6,
    wrong_keys: int = 20,
    limit: int | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the pair into ``out_dir/protected`` and ``out_dir/twin``; return the comparison."""
    start = time.perf_counter()
    out = Path(out_dir)
    _own_folder(out)
    for sub in ("protected", "twin"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_demo()
    if limit:
        train, test = stratified_subset(train, limit, 0), stratified_subset(test, max(100, limit // 8), 0)
    key = KeySet.generate(transforms, block_size).with_note(DEMO_NOTE)
    key.save(out / "key.json", overwrite=True)
    log(f"key {key.fingerprint}: {' -> '.join(key.spec)}, {block_size}x{block_size} blocks ({out / 'key.json'})")
    log(f"data: {len(train)} CIFAR-10 training images, {len(test)} held out (embedded, no download)")

    results: dict[str, Any] = {"key_fingerprint": key.fingerprint, "recipe": list(key.spec), "block_size": block_size}
    runs = (("protected", key), ("twin", None))
    for name, k in runs:
        kwargs = model_kwargs_for(model, k, train.image_shape, patch=block_size)
        cfg = TrainConfig(model=model, model_kwargs=kwargs, epochs=epochs)
        log(f"training the {'protected model' if k else 'non-protected twin'} ({model}, {epochs} epochs)")
        fit(train, None, k, cfg, out / name, device=device, log=lambda s: None, progress=progress)

    twin = evaluate_run(out / "twin", test, None, wrong_keys=0, device=device, progress=False)
    prot = evaluate_run(out / "protected", test, key, wrong_keys=wrong_keys, device=device, progress=progress)
    rows = [("non-protected twin", "plain images", twin.rows[0])]
    labels = {"correct key": "the correct key", "plain images": "plain images"}
    for r in prot.rows:
        rows.append(("protected", labels.get(r["setting"], r["setting"]), r))
    results["rows"] = [{"model": m, "input": i, **r} for m, i, r in rows]
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["test_images"] = len(test)

    lines = [
        "",
        f"| model | images given to it | accuracy on {len(test)} held-out images |",
        "|---|---|---:|",
    ]
    for m, i, r in rows:
        spread = f" (std {r['std']:.1%}, max {r['max']:.1%})" if r["n"] > 1 else ""
        lines.append(f"| {m} | {i} | {r['accuracy']:.1%}{spread} |")
    gap = rows[0][2]["accuracy"] - rows[1][2]["accuracy"]
    lines += [
        "",
        f"chance is {1 / len(train.classes):.0%}. The key holder is {abs(gap):.1%} "
        f"{'below' if gap >= 0 else 'above'} the non-protected twin; without the key the same weights are "
        "near chance.",
        f"done in {results['seconds']:.0f} s; models in {out}/protected and {out}/twin (weights + metadata, no key)",
    ]
    log("\n".join(lines))
    return results
