"""What the key costs at training and inference time: protected vs non-protected, same run.

Both pipelines start from the same uint8 batch and run the same network (`--model`, default
fastnet) with the trainer's settings (bfloat16 autocast, channels_last, SGD with Nesterov):

- non-protected: ``x.float() / 255`` -> normalise -> model;
- protected: keyed plan (shuffle+negpos+ffx, M=4 by default) -> normalise -> model.

It times a full training step (forward, loss, backward, optimiser step) and inference
(``torch.inference_mode``), interleaving the two pipelines over --rounds rounds; the ratio is
protected / non-protected (target: at most 1.03).

    python benchmarks/overhead.py [--model fastnet] [--batch 256] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from blockkey import KeyedTransform, KeySet, bench
from blockkey.checkpoint import write_json_atomic
from blockkey.data import BatchLoader, ImageTensors, Normalize
from blockkey.models import create_model
from blockkey.train import autocast, pick_device


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__)
    ap.add_argument("--model", default="fastnet")
    ap.add_argument("--recipe", default="shuffle,negpos,ffx")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per pipeline per round")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    data = ImageTensors(x, y, tuple(str(i) for i in range(10)))
    key = KeyedTransform(KeySet.generate(args.recipe, args.block_size))
    pipelines = {
        "non-protected": BatchLoader(
            data, args.batch, train=False, transform=None, normalize=Normalize.fit(data, None), device=device
        ),
        "protected": BatchLoader(
            data, args.batch, train=False, transform=key, normalize=Normalize.fit(data, key), device=device
        ),
    }
    xb, yb = x.to(device), y.to(device)
    model = create_model(args.model, 10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step(loader: BatchLoader) -> None:
        inp = loader.prepare(xb).contiguous(memory_format=torch.channels_last)
        with autocast(device, "bf16"):
            loss = loss_fn(model(inp).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(loader: BatchLoader) -> None:
        with torch.inference_mode(), autocast(device, "bf16"):
            model(loader.prepare(xb).contiguous(memory_format=torch.channels_last))

    results = {}
    for phase, fn in (("train step", train_step), ("inference", infer)):
        model.train(phase == "train step")
        timers = {
            name: Timer("fn(loader)", globals={"fn": fn, "loader": ld}, num_threads=torch.get_num_threads())
            for name, ld in pipelines.items()
        }
        for t in timers.values():
            t.timeit(5)  # warm-up (oneDNN builds its kernels on the first calls)
        samples: dict[str, list[float]] = {n: [] for n in timers}
        for _ in range(args.rounds):
            for n, t in timers.items():
                samples[n].append(t.blocked_autorange(min_run_time=args.min_time).median)
        med = {n: statistics.median(s) for n, s in samples.items()}
        results[phase] = {
            "non_protected_ms": 1e3 * med["non-protected"],
            "protected_ms": 1e3 * med["protected"],
            "ratio": med["protected"] / med["non-protected"],
        }
    plan_s = Timer("k(x)", globals={"k": key.to(device), "x": xb}).blocked_autorange(min_run_time=args.min_time).median
    machine = bench.machine(device)
    print(f"# {machine}")
    print(f"# {args.model}, batch {args.batch}, {args.size}x{args.size}, key {args.recipe} M={args.block_size}, bf16")
    print(f"{'phase':<12}{'non-protected':>16}{'protected':>14}{'ratio':>9}")
    for phase, r in results.items():
        print(f"{phase:<12}{r['non_protected_ms']:>13.1f} ms{r['protected_ms']:>11.1f} ms{r['ratio']:>9.3f}")
    print(f"{'keyed plan':<12}{'':>16}{1e3 * plan_s:>11.2f} ms   (the transform alone)")
    if args.json:
        write_json_atomic(Path(args.json), {"machine": machine, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
