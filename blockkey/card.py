"""Model cards: ``RUN_DIR/README.md`` in the form users know from model hubs.

The card is written from the run's metadata alone: architecture, data, training recipe, the key's
recipe and fingerprint (never its material), the accuracy table (correct key, plain images, random
wrong keys) and how to predict and export. ``blockkey train`` measures the table on the held-out
validation split (:func:`evaluate_for_card`); ``convert`` and ``rekey`` carry the key holder's
accuracy over (the conversion is exact) and say that the other rows are to be measured again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, RunMeta, load_weights, read_meta, write_json_atomic
from .fileio import write_text

__all__ = ["carried_evaluation", "evaluate_for_card", "model_card", "write_model_card"]

CARD_WRONG_KEYS = 10
CARD_SAMPLE = 1000


def evaluate_for_card(
    run_dir: str | os.PathLike[str],
    val: Any,
    key: Any = None,
    passports: Any = None,
    *,
    wrong_keys: int = CARD_WRONG_KEYS,
    sample: int = CARD_SAMPLE,
    device: str | None = None,
) -> RunMeta:
    """Evaluate the run on (a stratified sample of) its validation split; store it in ``meta.json``."""
    from .checkpoint import read_meta
    from .data import stratified_subset
    from .evaluate import evaluate_run

    data = stratified_subset(val, sample, seed=12345)
    report = evaluate_run(run_dir, data, key, wrong_keys=wrong_keys, progress=False, passports=passports, device=device)
    meta = replace(read_meta(run_dir), evaluation={"split": "held-out validation split", **report.to_json()})
    write_json_atomic(Path(run_dir) / "meta.json", meta.to_json())
    return meta


def carried_evaluation(meta: RunMeta, source: str) -> dict[str, Any] | None:
    """The key holder's row of a source run's evaluation, for an exact conversion of that run."""
    ev = meta.evaluation
    if not ev:
        return None
    keep = [r for r in ev["rows"] if r["setting"] in ("correct key", "non-protected model")]
    if not keep:
        return None
    row = {**keep[0], "setting": "correct key"}
    note = f"carried over from {source} (the conversion is exact); plain images and wrong keys not measured"
    return {**ev, "rows": [row], "note": note}


def _params(run: Path) -> str:
    try:
        return f"{sum(t.numel() for t in load_weights(run / 'model.safetensors').values()):,}"
    except CheckpointError:  # the card never fails a finished run
        return "?"


def _accuracy(meta: RunMeta) -> list[str]:
    from .evaluate import EvalReport

    ev = meta.evaluation
    if not ev:
        return ["Not measured for this run: `blockkey evaluate --model RUN_DIR --key KEY --data DATA`."]
    rep = EvalReport(
        ev["model"],
        ev.get("model_key"),
        ev.get("given_key_fingerprint"),
        ev.get("key_matches_model"),
        ev["images"],
        meta.num_classes,
        ev["rows"],
    )
    lines = [
        f"Top-1 accuracy on {ev['images']} images of the {ev.get('split', 'evaluation data')} "
        f"(stratified sample; chance {ev['chance']:.1%}):",
        "",
        rep.to_markdown(),
    ]
    if ev.get("note"):
        lines += ["", f"Note: {ev['note']}."]
    return lines


def _protection(meta: RunMeta) -> tuple[str, list[str], str]:
    """(one-line summary, table rows, the predict arguments)."""
    key, passport = meta.key, meta.passport
    if key:
        rows = [
            f"| key fingerprint | `{key.fingerprint}` |",
            f"| key recipe | {' -> '.join(key.steps)} |",
            f"| blocks | {key.block_size}x{key.block_size}, {key.channels} channels |",
        ]
        summary = (
            "Protected with a secret key: every image is transformed block-wise with the key before it reaches "
            "the network, so the weights are useless without it. The key is not in this folder (runs never hold "
            "key material); use the key file with this fingerprint (`blockkey info KEY` prints it)."
        )
        if key.has_inner:
            summary += (
                "\n\nThe key's inner part (recommended mode) is folded into the stored weights: every layer after the "
                "first reads its input channels in a secret signed order, at no cost in time or accuracy. It does "
                "not protect a model whose weights descend from public weights (`blockkey attack reference-match` "
                "reads the order off by comparing the two), and a thief with labelled data still gains from the "
                "intact first layer: see docs/attacks.md."
            )
        else:
            summary += (
                "\n\nThis key has no inner part: the weights alone give the input key of block-aligned models away "
                "(docs/attacks.md). The recommended mode adds one (`blockkey keygen` without --transforms)."
            )
        return summary, rows, "--key KEY.json"
    if passport:
        rows = [
            f"| passport fingerprint | `{passport['fingerprint']}` |",
            f"| passport layers | {len(passport.get('layers', []))} ({passport.get('signature_bits', '?')} signature "
            "bits) |",
        ]
        summary = (
            "Protected with passports (Fan et al. 2019, scheme V1): the passport layers need the secret passports, "
            "which are not in this folder."
        )
        return summary, rows, "--passport PASSPORTS"
    return "Not protected: the model takes plain images.", [], ""


def _recipe(meta: RunMeta) -> list[str]:
    cfg, hist = meta.config, meta.history
    if not cfg:
        return ["Not recorded."]
    keys = (
        *("epochs", "batch_size", "lr", "peak", "weight_decay", "label_smoothing"),
        *("crop_padding", "crop_step", "flip", "cutout", "ema", "amp", "norm", "seed"),
    )
    rows = [f"| {k} | {cfg[k]} |" for k in keys if k in cfg]
    if hist:
        last = hist[-1]
        rows.append(f"| training time | {sum(h.get('seconds', 0) for h in hist):.0f} s |")
        rows += [
            f"| final {k.replace('_', ' ')} | {last[k]} |" for k in ("train_loss", "train_acc", "val_acc") if k in last
        ]
    return [
        "SGD with Nesterov momentum, one-cycle (triangular) learning rate; augmentation (crop, flip, cutout as "
        "set below) on plain images before the key.",
        "",
        "| setting | value |",
        "|---|---|",
        *rows,
    ]


def model_card(meta: RunMeta | Mapping[str, Any], run_name: str = "RUN_DIR", params: str = "?") -> str:
    """The card's Markdown for a run's metadata."""
    meta = RunMeta.coerce(meta)
    summary, prot_rows, secret = _protection(meta)
    c, h, w = meta.image_shape
    classes = meta.classes
    kwargs = ", ".join(f"{k}={v}" for k, v in meta.model_kwargs.items())
    norm = meta.normalize
    data = meta.data
    data_rows = [f"| {k.replace('_', ' ')} | {v} |" for k, v in data.items() if v not in (None, "")]
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    lines = [
        "---",
        "library_name: blockkey",
        "pipeline_tag: image-classification",
        "tags:",
        "- blockkey",
        "- image-classification",
        "- model-protection" if (meta.key or meta.passport) else "- non-protected",
        "---",
        "",
        f"# {run_name}",
        "",
        f"An image classifier (`{meta.model}`, {len(classes)} classes) made with blockkey "
        f"{meta.versions.get('blockkey', '')}. {summary}",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{meta.model}`" + (f" ({kwargs})" if kwargs else "") + " |",
        f"| parameters | {params} |",
        f"| input | {c} x {h} x {w} uint8 images |",
        f"| classes | {len(classes)}: {shown} |",
        f"| normalisation | {norm.mode if norm is not None else 'none'} |",
        "| files | `model.safetensors` (weights), `meta.json` (metadata), this card |",
        *prot_rows,
        "",
        "## Data",
        "",
        *(["| | |", "|---|---|", *data_rows] if data_rows else ["Not recorded (trained from the library)."]),
        "",
        "## Training",
        "",
        *_recipe(meta),
        "",
        "## Accuracy",
        "",
        *_accuracy(meta),
    ]
    if meta.conversions:
        lines += ["", "## Conversions (no training)", ""]
        for conv in meta.conversions:
            lines.append(
                f"- {conv['action']} from `{conv['from_run']}` (key {conv['from_key'] or 'none'} -> "
                f"{conv['to_key'] or 'none'}), max relative logit error {conv['max_rel_logit_error_float64']:.1e}"
            )
    lines += _usage(run_name, secret, h if h == w else f"{h}x{w}")
    versions = meta.versions
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def _usage(run: str, secret: str, size: int | str) -> list[str]:
    s = f" {secret}" if secret else ""
    key_arg = ", 'KEY.json'" if secret.startswith("--key") else ""
    if secret.startswith("--passport"):
        key_arg = ", passports='PASSPORTS'"
    lines = [
        "",
        "## How to use",
        "",
        "Images of any size are resized and centre-cropped to the trained size.",
        "",
        "```bash",
        f"blockkey predict --model {run}{s} photo.jpg photos/ --top-k 3   # --json, --csv FILE",
        f"blockkey evaluate --model {run}{s} --data path/to/test",
    ]
    if secret.startswith("--key"):
        lines += [
            f"blockkey export --model {run} -o model.onnx                 # input: the key's output, no key inside",
            f"blockkey encrypt --key KEY.json --npy photo.jpg --size {size} -o x.npy   # how clients make that input",
            f"blockkey export --model {run} --key KEY.json -o keyed.onnx  # key inside (0600): trusted devices only",
        ]
    else:
        lines.append(f"blockkey export --model {run}{s} -o model.onnx   # input: uint8 images")
    lines += [
        "```",
        "",
        "```python",
        "from blockkey import Predictor",
        "",
        f"predictor = Predictor('{run}'{key_arg})",
        "print(predictor('photo.jpg', top_k=3))",
        "```",
    ]
    return lines


def write_model_card(run_dir: str | os.PathLike[str], meta: RunMeta | None = None) -> Path:
    """Write ``RUN_DIR/README.md`` from the run's metadata (replacing an older card)."""
    run = Path(run_dir)
    meta = meta if meta is not None else read_meta(run)
    path = run / "README.md"
    write_text(path, model_card(meta, run.name or str(run), _params(run)))
    return path
