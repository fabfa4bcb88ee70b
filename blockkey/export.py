"""ONNX export of the whole inference path, with or without the key.

Three inputs, one per kind of model:

- a protected model exported **without** the key takes ``keyed`` (float32 ``N x C x H x W``): the
  key transform's output in [0, 1], what the key holder's preprocessing makes (:func:`keyed_input`,
  ``blockkey encrypt --npy``). The graph is normalisation then the network; the file holds no key
  material and is as useless to a thief as the weights.
- a protected model exported **with** the key takes ``images`` (uint8 ``N x C x H x W``, plain
  pixels): the key is compiled into the graph as one Gather on the flattened pixel index and one
  Gather into the flattened value table (``256 * table(position) + value``), then normalisation and
  the network. The file holds the key: it is written with mode 0600, for a trusted device only.
- a non-protected model takes ``images`` too (``/255``, normalisation, network); a passport model
  also, with its passports inside the graph (mode 0600, like a key).

The batch dimension is dynamic. ``onnx``, ``onnxscript`` (the torch.export-based exporter) and
``onnxruntime`` (the check after export) come with ``pip install 'blockkey[export]'``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._optional import require
from .checkpoint import read_meta
from .errors import BlockkeyError, ShapeError
from .fileio import refuse_existing, write_bytes
from .functional import Plan, compile_plan
from .keys import KeySet
from .passport import Passports
from .predict import NormalizedNet, _as_uint8, check_model_key, fit_image, load_normalized_net
from .transforms import KeyedTransform

__all__ = ["ONNX_OPSET", "ExportReport", "KeyInGraph", "PlainInput", "export_onnx", "keyed_input"]

ONNX_OPSET = 20


class KeyInGraph(nn.Module):
    """uint8 plain images -> logits with the key inside: ``table[256 * cls[j] + x[index[j]]]``, then the net.

    ``index`` is the plan's gather index over the ``C*H*W`` positions; ``table`` the plan's
    deduplicated value tables flattened (``T * 256`` floats) and ``offsets[j] = 256 * class`` of
    output position ``j``: the same values as :func:`blockkey.functional.encrypt`, bit for bit.
    """

    # buffers (registered in __init__)
    index: Tensor
    offsets: Tensor
    table: Tensor

    def __init__(self, plan: Plan, net: NormalizedNet) -> None:
        super().__init__()
        self.shape = plan.shape
        self.register_buffer("index", plan.index.cpu().clone())
        self.register_buffer("offsets", plan.cls_in.cpu()[plan.index.cpu()].to(torch.int64))
        self.register_buffer("table", plan.lut.cpu().reshape(-1).clone())
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        moved = torch.index_select(flat, 1, self.index)  # Gather 1: the pixel index
        y = torch.index_select(self.table, 0, (moved.to(torch.int64) + self.offsets).reshape(-1))  # Gather 2
        return self.net(y.reshape(x.shape[0], *self.shape))


class PlainInput(nn.Module):
    """uint8 plain images -> ``x / 255`` -> the net (non-protected and passport models)."""

    def __init__(self, net: NormalizedNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(torch.float32) / 255.0)


def keyed_input(images: Any, key: KeySet | str | os.PathLike[str], size: Sequence[int] | None = None) -> np.ndarray:
    """The input of an ONNX file exported without the key: float32 ``N x C x H x W`` in [0, 1].

    ``images``: a uint8 ``(N, C, H, W)`` tensor or array, or a list of paths / PIL images / uint8
    ``(C, H, W)`` tensors. ``size = (H, W)`` resizes and centre-crops each image to the model's input
    size, as :class:`~blockkey.predict.Predictor` does (without it, all images must have one size).
    Needs only blockkey's core (no model code, no ONNX packages).
    """
    key = KeySet.load(key) if isinstance(key, (str, os.PathLike)) else key
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = torch.from_numpy(images)
    if isinstance(images, Tensor) and images.dim() == 4:
        items = list(images)
    else:
        items = [_as_uint8(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
    if not items:
        raise ShapeError("no images given")
    if size is not None:
        items = [fit_image(x, (key.channels, int(size[0]), int(size[1]))) for x in items]
    shapes = {tuple(x.shape) for x in items}
    if len(shapes) > 1:
        raise ShapeError(f"images differ in size ({sorted(shapes)}); give a size to resize them to the model's")
    batch = torch.stack(items)
    if batch.dtype != torch.uint8:
        raise ShapeError(f"expected uint8 images; got {batch.dtype}")
    return _transform(key)(batch).numpy()


@functools.lru_cache(maxsize=4)
def _transform(key: KeySet) -> KeyedTransform:
    """One compiled transform per key (a client calls :func:`keyed_input` once per batch)."""
    return KeyedTransform(key)


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: str
    mode: str  # keyed-input | key-in-graph | plain | passports-in-graph
    input_name: str
    input_dtype: str
    input_shape: list[Any]
    holds_secret: bool
    fingerprint: str | None
    opset: int
    seconds: float
    max_abs_logit_diff: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _conversion_message(e: BaseException) -> str:
    text = f"{e}\n{e.__cause__ or ''}"
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if op:
        return f"ONNX has no operator for {op.group(1)}"
    lines = [line.strip() for line in str(e.__cause__ or e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _export(module: nn.Module, example: Tensor, input_name: str, opset: int, what: str) -> Any:
    from torch.export import Dim

    # The exporter imports torch.utils.cpp_extension, which logs a CUDA_HOME warning on CUDA builds
    # without a CUDA runtime: noise on a CPU machine, not the user's concern.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        prog = torch.onnx.export(
            module.eval(),
            (example,),
            None,
            input_names=[input_name],
            output_names=["logits"],
            dynamic_shapes=({0: Dim("batch", min=1, max=65536)},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
            optimize=True,
        )
    except (torch.onnx.OnnxExporterError, RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        raise BlockkeyError(f"cannot export {what} to ONNX: {_conversion_message(e)}") from None
    if prog is None:  # only when writing to a file, which this call does not
        raise BlockkeyError(f"cannot export {what} to ONNX: the exporter returned no program")
    return prog.model_proto


def _write(proto: Any, path: Path, secret: bool, force: bool) -> None:
    import onnx

    refuse_existing(path, force)
    write_bytes(path, onnx.ModelProto.SerializeToString(proto), private=secret)


def _check(path: Path, module: nn.Module, example: Tensor) -> float:
    """Max |onnxruntime - PyTorch| over the logits of ``example`` (the file as written)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        want = module(example).numpy()
    return float(np.abs(got - want).max())


def export_onnx(
    run_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    key: KeySet | str | os.PathLike[str] | None = None,
    *,
    passports: Passports | str | os.PathLike[str] | None = None,
    force: bool = False,
    opset: int = ONNX_OPSET,
) -> ExportReport:
    """Export the inference path of ``run_dir`` as ONNX to ``output`` (see the module docstring).

    The written file is run once with onnxruntime on random images and compared with PyTorch
    (``max_abs_logit_diff``). Refuses to overwrite ``output`` unless ``force``.
    """
    require("onnx", "onnxscript", "onnxruntime")
    import onnx

    t0 = time.perf_counter()
    path = Path(output)
    if path.suffix.lower() != ".onnx":
        raise BlockkeyError(f"name the output *.onnx (got {path})")
    refuse_existing(path, force)
    key = KeySet.load(key) if isinstance(key, (str, os.PathLike)) else key
    passports = Passports.load(passports) if isinstance(passports, (str, os.PathLike)) else passports
    meta = read_meta(run_dir)
    model_key = meta.key
    if model_key is not None and key is None:
        if model_key.has_inner:
            raise BlockkeyError(
                "this model's key has an inner part, which lives inside the network: an export without the key "
                "cannot run it; export with --key (the file then holds the key)"
            )
        if passports is not None:
            check_model_key(meta, None, run_dir, passports)  # refuses passports for a keyed model
        mode, secret = "keyed-input", False
    else:
        check_model_key(meta, key, run_dir, passports)
        mode = "key-in-graph" if key is not None else ("passports-in-graph" if passports is not None else "plain")
        secret = mode != "plain"
    net, meta = load_normalized_net(run_dir, passports, key)
    shape = meta.image_shape
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, *shape), dtype=torch.uint8, generator=g)
    module: nn.Module
    if mode == "keyed-input":
        module, example, name = net, torch.rand(4, *shape, generator=g), "keyed"
    elif mode == "key-in-graph":
        module, example, name = KeyInGraph(compile_plan(key, shape[1:]), net), pixels, "images"  # type: ignore[arg-type]
    else:
        module, example, name = PlainInput(net), pixels, "images"
    proto = _export(module, example, name, opset, meta.model)
    doc = {
        "blockkey.model": meta.model,
        "blockkey.classes": json.dumps(list(meta.classes)),
        "blockkey.input": mode,
        "blockkey.key_fingerprint": model_key.fingerprint if model_key is not None else "",
        "blockkey.passport_fingerprint": (meta.passport or {}).get("fingerprint", ""),
    }
    onnx.helper.set_model_props(proto, doc)
    onnx.checker.check_model(proto)
    _write(proto, path, secret, force)
    diff = _check(path, module, example)
    return ExportReport(
        path=str(path),
        mode=mode,
        input_name=name,
        input_dtype="uint8" if name == "images" else "float32",
        input_shape=["N", *shape],
        holds_secret=secret,
        fingerprint=meta.fingerprint,
        opset=opset,
        seconds=round(time.perf_counter() - t0, 2),
        max_abs_logit_diff=diff,
    )
