"""What the key costs at training and inference time: protected vs non-protected, same run.

Both pipelines start from the same uint8 batch and run the same network (`--model`, default
fastnet) with the trainer's settings (bfloat16 autocast, channels_last, SGD with Nesterov):

- non-protected: ``x.float() / 255`` -> normalise -> model;
- protected: keyed plan (shuffle+negpos+ffx, M=4 by default) -> normalise -> model.

It times a full training step (forward, loss, backward, optimiser step) and inference
(``torch.inference_mode``), interleaving the two pipelines over --rounds rounds; the ratio is
protected / non-protected (target: at most 1.03).

Then, for each of ``--inner-models`` (default fullnet and resnet18_cifar), the inner key: the same keyed
batch through the plain network, through the network as ``fit`` trains it with an inner key (the key folded
into the weights, :func:`blockkey.inner.use_inner_key`; target: ratio at most 1.02 for a step, 1.01 for
inference), and through version 0.1's keyed points (a gather at every point, :func:`with_keyed_points`);
a second plain network of the same seed, timed in the same rounds, gives the noise floor (A/A ratio).

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
from blockkey.inner import set_points, use_inner_key, with_keyed_points
from blockkey.models import create_model, model_kwargs_for
from blockkey.runtime import resolve_amp
from blockkey.train import autocast, pick_device


def interleaved(fns: dict, rounds: int, min_time: float) -> dict[str, float]:
    """Median seconds of each ``fn()``, the functions interleaved over ``rounds`` rounds."""
    timers = {n: Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for n, fn in fns.items()}
    for t in timers.values():
        t.timeit(3)  # warm-up (oneDNN builds its kernels on the first calls)
    samples: dict[str, list[float]] = {n: [] for n in timers}
    for _ in range(rounds):
        for n, t in timers.items():
            samples[n].append(t.blocked_autorange(min_run_time=min_time).median)
    return {n: statistics.median(v) for n, v in samples.items()}


def step_fns(model: torch.nn.Module, inp: torch.Tensor, yb: torch.Tensor, device, amp: str):
    """A training step and an inference pass of ``model`` on the prepared batch ``inp``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step() -> None:
        model.train()
        with autocast(device, amp):
            loss = loss_fn(model(inp).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, amp):
            model(inp)

    return train_step, infer


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
    ap.add_argument("--inner-models", default="fullnet,resnet18_cifar", help="comma-separated; '' skips the part")
    ap.add_argument("--inner-batch", type=int, default=64)
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
    amp = resolve_amp("auto", device)  # what fit runs here: bf16 only where the hardware has it
    model = create_model(args.model, 10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step(loader: BatchLoader) -> None:
        inp = loader.prepare(xb).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            loss = loss_fn(model(inp).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(loader: BatchLoader) -> None:
        with torch.inference_mode(), autocast(device, amp):
            model(loader.prepare(xb).contiguous(memory_format=torch.channels_last))

    results: dict = {}
    for phase, fn in (("train step", train_step), ("inference", infer)):
        model.train(phase == "train step")
        med = interleaved({n: (lambda f=fn, ld=ld: f(ld)) for n, ld in pipelines.items()}, args.rounds, args.min_time)
        results[phase] = {
            "non_protected_ms": 1e3 * med["non-protected"],
            "protected_ms": 1e3 * med["protected"],
            "ratio": med["protected"] / med["non-protected"],
        }
    inner = inner_overhead(args, device, amp)
    plan_s = Timer("k(x)", globals={"k": key.to(device), "x": xb}).blocked_autorange(min_run_time=args.min_time).median
    machine = bench.machine(device)
    print(f"# {machine}")
    print(
        f"# {args.model}, batch {args.batch}, {args.size}x{args.size}, key {args.recipe} M={args.block_size}, amp {amp}"
    )
    print(f"{'phase':<12}{'non-protected':>16}{'protected':>14}{'ratio':>9}")
    for phase, r in results.items():
        print(f"{phase:<12}{r['non_protected_ms']:>13.1f} ms{r['protected_ms']:>11.1f} ms{r['ratio']:>9.3f}")
    print(f"{'keyed plan':<12}{'':>16}{1e3 * plan_s:>11.2f} ms   (the transform alone)")
    if inner:
        print(
            f"\n# inner key ({args.recipe},inner), batch {args.inner_batch}, amp {amp}: "
            "plain network vs folded vs 0.1's gathers"
        )
        print(f"{'model':<16}{'phase':<12}{'plain':>11}{'A/A':>7}{'folded':>11}{'ratio':>8}{'gathers':>11}{'ratio':>8}")
        for name, phases in inner.items():
            for phase, r in phases.items():
                print(
                    f"{name:<16}{phase:<12}{r['plain_ms']:>8.1f} ms{r['plain_again_ratio']:>7.3f}"
                    f"{r['folded_ms']:>8.1f} ms{r['folded_ratio']:>8.3f}"
                    f"{r['gathers_ms']:>8.1f} ms{r['gathers_ratio']:>8.3f}"
                )
    if args.json:
        doc = {"machine": machine, "args": vars(args), "amp": amp, "results": results, "inner": inner}
        write_json_atomic(Path(args.json), doc)


def inner_overhead(args, device, amp: str) -> dict:
    """For each inner model: step and inference times of the plain network, the folded one, the gathers."""
    key = KeySet.generate(f"{args.recipe},inner", args.block_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (args.inner_batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    data = ImageTensors(x, torch.randint(0, 10, (args.inner_batch,), generator=g), tuple(map(str, range(10))))
    transform = KeyedTransform(key)
    loader = BatchLoader(
        data,
        args.inner_batch,
        train=False,
        transform=transform,
        normalize=Normalize.fit(data, transform),
        device=device,
    )
    inp = loader.prepare(x.to(device)).contiguous(memory_format=torch.channels_last)
    yb = data.labels.to(device)
    out = {}
    for name in filter(None, args.inner_models.split(",")):
        kwargs = model_kwargs_for(name, key, (3, args.size, args.size))
        nets = {}
        for which in ("plain", "plain again", "folded", "gathers"):  # "plain again": the noise floor (A/A)
            torch.manual_seed(0)
            net = create_model(name, 10, **kwargs)
            if which == "folded":
                use_inner_key(net, key)  # what fit trains: the key in the weights
            elif which == "gathers":
                net = set_points(with_keyed_points(net), key)  # version 0.1: a gather at every point
            nets[which] = step_fns(net.to(device).to(memory_format=torch.channels_last), inp, yb, device, amp)
        out[name] = {}
        for i, phase in enumerate(("train step", "inference")):
            med = interleaved({w: fns[i] for w, fns in nets.items()}, args.rounds, args.min_time)
            out[name][phase] = {
                "plain_ms": 1e3 * med["plain"],
                "plain_again_ratio": med["plain again"] / med["plain"],
                "folded_ms": 1e3 * med["folded"],
                "gathers_ms": 1e3 * med["gathers"],
                "folded_ratio": med["folded"] / med["plain"],
                "gathers_ratio": med["gathers"] / med["plain"],
            }
    return out


if __name__ == "__main__":
    main()
