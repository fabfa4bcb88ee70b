"""Run directories: safetensors weights plus JSON metadata, written atomically, never pickles.

A finished run directory holds ``model.safetensors`` and ``meta.json``. The metadata records the
architecture, classes, image shape, normalisation, the key's recipe and fingerprint (never its
material), the training configuration, metrics and library versions. While training, complete
per-epoch states live in ``run/state-NNNN/`` and ``run/LATEST`` names the newest one; the pointer is
replaced atomically, so a run killed at any moment resumes from a complete state.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file
from torch import nn

from .errors import BlockkeyError, CheckpointError
from .fileio import atomic_path
from .fileio import write_json as write_json_atomic
from .inner import stored_state_dict
from .jsonio import read_json
from .meta import META_FORMAT, META_VERSION, RunMeta

__all__ = [
    "META_FORMAT",
    "META_VERSION",
    "CheckpointError",
    "RunMeta",
    "copy_run_half",
    "load_model",
    "read_meta",
    "save_run",
    "write_json_atomic",
]

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}


def _utf8(path: Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if _utf8(tmp):
            save_file(tensors, str(tmp), metadata=metadata)
        else:  # safetensors opens UTF-8 names only
            tmp.write_bytes(save(tensors, metadata=metadata))


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: refusing a pickled checkpoint (it can run code); blockkey reads safetensors")


def read_meta(run_dir: str | os.PathLike[str]) -> RunMeta:
    run = Path(run_dir)
    _check_not_pickle(run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: not a run directory (expected model.safetensors and meta.json inside)")
    path = run / "meta.json"
    if not path.exists():
        hint = " (training did not finish: resume it with --resume)" if (run / "LATEST").exists() else ""
        raise CheckpointError(f"{run}: no meta.json{hint}")
    doc = read_json(path, CheckpointError, "metadata")
    return RunMeta.from_json(doc, str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    _check_not_pickle(path)
    try:
        if _utf8(path):
            return load_file(str(path))
        return load(path.read_bytes())  # safetensors opens UTF-8 names only (Linux allows any bytes)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt weights ({e})") from None


def load_model(run_dir: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[nn.Module, RunMeta]:
    """The trained network of a run directory (eval mode) and its metadata."""
    from .models import create_model

    meta = read_meta(run_dir)
    kwargs = {k: v for k, v in meta.model_kwargs.items() if k != "pretrained"}  # the weights come from the run
    try:  # RunMeta checked the arguments of registered models; tv_/timm_ builders check their own
        model = create_model(meta.model, meta.num_classes, meta.image_shape[0], **kwargs)
    except BlockkeyError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{run_dir}: cannot build model {meta.model!r} from its metadata ({first})") from None
    state = load_weights(Path(run_dir) / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{run_dir}: weights do not fit model {meta.model!r} ({first})") from None
    return model.to(device).eval(), meta


def save_run(run_dir: Path, model: nn.Module, meta: RunMeta | Mapping[str, Any]) -> None:
    """A finished run: ``model.safetensors`` then ``meta.json`` (its presence marks the run complete)."""
    meta = RunMeta.coerce(meta)
    fingerprint = meta.key.fingerprint if meta.key is not None else "none"
    state = stored_state_dict(model)  # an inner key stays folded into the weights (blockkey.inner)
    save_tensors_atomic(run_dir / "model.safetensors", state, {"key_fingerprint": fingerprint})
    write_json_atomic(run_dir / "meta.json", meta.to_json())


def copy_run_half(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a finished run with its floating-point weights stored as float16 (half the file; loading casts
    them back to float32, so predictions move by float16 rounding only). For released checkpoints."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    meta = read_meta(src)
    state = load_weights(src / "model.safetensors")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    dst.mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    overflow = [k for k, v in half.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if overflow:
        raise CheckpointError(f"{src}: {overflow[0]} does not fit float16 (values beyond 65504); keep float32")
    save_tensors_atomic(dst / "model.safetensors", half, metadata)
    write_json_atomic(dst / "meta.json", meta.to_json())


def clear_states(run_dir: Path) -> None:
    for p in run_dir.glob("state-*"):
        shutil.rmtree(p, ignore_errors=True)
    (run_dir / "LATEST").unlink(missing_ok=True)
    for p in run_dir.glob(".*.tmp*"):  # left by a process killed while writing (kill -9, power loss)
        p.unlink(missing_ok=True)
