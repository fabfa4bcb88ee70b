"""Inference latency on CPU: onnxruntime (both export modes) beside PyTorch eager, in one run.

For each model (randomly initialised: latency does not depend on the weights' values) a run
directory is made with ``fit`` (one epoch on 64 random images), then timed at batch 1 and 64 on 32x32
uint8 images with a shuffle+negpos+ffx key (M=4), float32, the same thread count for both runtimes:

- PyTorch eager: ``Predictor.logits`` (key transform, normalisation, network; ``torch.inference_mode``);
- onnxruntime, key in the graph: ``blockkey export --key`` (uint8 images in, two Gathers for the key);
- onnxruntime, keyed input: ``blockkey export`` without the key (the graph only; the client's
  ``keyed_input`` on the same batch is timed on its own).

Median of ``--reps`` timed calls after warm-up. The onnxruntime outputs are checked against PyTorch.

    python benchmarks/onnx_latency.py [--models patchnet,resnet18_cifar,vit] [--threads 1] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blockkey import KeySet, bench
from blockkey.checkpoint import write_json_atomic
from blockkey.data import ImageTensors
from blockkey.export import export_onnx, keyed_input
from blockkey.models import model_kwargs_for
from blockkey.predict import Predictor
from blockkey.train import TrainConfig, fit


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def make_run(name: str, key: KeySet, out: Path) -> Path:
    """A run directory trained one epoch on 64 random images (``fit`` takes at least one)."""
    g = torch.Generator().manual_seed(0)
    data = ImageTensors(
        torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(64) % 10,
        tuple(f"c{i}" for i in range(10)),
    )
    kwargs = model_kwargs_for(name, key, data.image_shape)
    cfg = TrainConfig(model=name, model_kwargs=kwargs, epochs=1, batch_size=32, amp="off")
    fit(data, None, key, cfg, out / name, device="cpu", progress=False, log=lambda s: None)
    return out / name


def session(path: Path, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_model(name: str, key: KeySet, tmp: Path, args: argparse.Namespace) -> list[dict]:
    run = make_run(name, key, tmp)
    predictor = Predictor(run, key, device="cpu")
    export_onnx(run, tmp / f"{name}-keyed.onnx")
    export_onnx(run, tmp / f"{name}-key.onnx", key)
    keyed, in_graph = session(tmp / f"{name}-keyed.onnx", args.threads), session(tmp / f"{name}-key.onnx", args.threads)
    rows = []
    for batch in (1, 64):
        g = torch.Generator().manual_seed(batch)
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
        xn, codes = x.numpy(), keyed_input(x, key)
        want = predictor.logits(x).numpy()
        diff = max(
            float(np.abs(in_graph.run(None, {"images": xn})[0] - want).max()),
            float(np.abs(keyed.run(None, {"keyed": codes})[0] - want).max()),
        )
        reps = args.reps if batch == 1 else max(5, args.reps // 3)
        with torch.inference_mode():
            eager = median_ms(lambda x=x: predictor.logits(x), reps)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "pytorch_eager_ms": eager,
                "ort_key_in_graph_ms": median_ms(lambda xn=xn: in_graph.run(None, {"images": xn}), reps),
                "ort_keyed_input_ms": median_ms(lambda c=codes: keyed.run(None, {"keyed": c}), reps),
                "keyed_input_ms": median_ms(lambda x=x: keyed_input(x, key), reps),
                "max_abs_logit_diff": diff,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__)
    ap.add_argument("--models", default="patchnet,resnet18_cifar,vit")
    ap.add_argument(
        "--threads", type=int, default=1, help="threads for both runtimes (default 1: robust on a shared VM)"
    )
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    key = KeySet.generate("shuffle,negpos,ffx", 4)
    with tempfile.TemporaryDirectory() as d:
        rows = [r for name in args.models.split(",") for r in bench_model(name, key, Path(d), args)]
    import onnxruntime

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    print(
        f"CPU: {bench.cpu_name()}, {args.threads} threads (load average {load}); torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )
    print("32x32 uint8 images, key shuffle+negpos+ffx (M=4), float32; median latency per call (ms)\n")
    print(
        "| model | batch | PyTorch eager | onnxruntime, key in graph | onnxruntime, keyed input "
        "(+ client's keyed_input) | max abs logit diff |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['pytorch_eager_ms']:.2f} | {r['ort_key_in_graph_ms']:.2f} | "
            f"{r['ort_keyed_input_ms']:.2f} (+ {r['keyed_input_ms']:.2f}) | {r['max_abs_logit_diff']:.1e} |"
        )
    if args.json:
        write_json_atomic(Path(args.json), {"machine": bench.machine("cpu"), "rows": rows})


if __name__ == "__main__":
    main()
