"""What protection costs: non-protected vs key-based (SHF+NP+FFX, M=4) vs passport (Fan et al. 2019 V1).

One run measures, for the same architecture (the CIFAR ResNet-18 of the paper; passports in every
convolution of its last stage): trainable parameters and secret size, one training step (batch 128,
uint8 images in: key transform or /255, normalisation, forward, loss (+ sign loss), backward, SGD),
inference at batch 1 and 128 (uint8 in, logits out), peak memory of a training step (a fresh process
per model: peak RSS on CPU, max allocated on CUDA), and accuracy at one training budget, with
ratios against the non-protected model. Timings interleave the three models round by round and
report medians.

    python benchmarks/protection_overhead.py                      # timings + accuracy (CPU: ~25 min)
    python benchmarks/protection_overhead.py --skip-accuracy
    python benchmarks/protection_overhead.py --accuracy-width 1 --train-images 45000 --epochs 30   # a GPU

On a CPU the full-width ResNet-18 trains at a few images per second, so the accuracy part uses a
narrower ResNet-18 (--accuracy-width) on a sample; the timings always use the full width.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from blockkey import KeyedTransform, KeySet, bench
from blockkey.data import Normalize, load_dataset, stratified_split, stratified_subset
from blockkey.evaluate import evaluate_run
from blockkey.models import create_model
from blockkey.passport import Passports, sign_loss
from blockkey.train import TrainConfig, fit

KINDS = ("none", "key", "passport")
RECIPE = "shuffle,negpos,ffx"
# Per-channel CIFAR-10 statistics: the same normalisation cost for every model (values do not matter for timing).
NORM = Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


class Pipeline(nn.Module):
    """uint8 images -> (key transform | /255) -> normalisation -> model: what each protection runs."""

    def __init__(self, kind: str, width: float = 1.0) -> None:
        super().__init__()
        self.kind = kind
        self.model = create_model("resnet18_cifar", 10, width=width, passport=kind == "passport")
        self.transform = KeyedTransform(KeySet.from_seed(0, RECIPE, 4)) if kind == "key" else None
        if kind == "passport":
            Passports.generate(self.model, seed=0).attach(self.model)
        mean, std = NORM.tensors((3, 32, 32), "cpu")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.transform(x) if self.transform is not None else x.float() / 255
        return self.model((y - self.mean) / self.std)


def make(kind: str, device: torch.device, width: float = 1.0) -> Pipeline:
    torch.manual_seed(0)
    p = Pipeline(kind, width).to(device)
    if p.transform is not None:
        p.transform = p.transform.to(device)
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(p: Pipeline, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool) -> None:
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        loss = nn.functional.cross_entropy(p(x).float(), y)
        if p.kind == "passport":
            loss = loss + sign_loss(p.model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timings(device: torch.device, rounds: int, amp: bool) -> dict[str, dict[str, float]]:
    pipes = {k: make(k, device) for k in KINDS}
    opts = {k: torch.optim.SGD(p.parameters(), 0.01, momentum=0.9) for k, p in pipes.items()}
    g = torch.Generator().manual_seed(0)
    xb = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    yb = torch.randint(0, 10, (128,), generator=g).to(device)
    x1 = xb[:1]
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer128": [], "infer1": []} for k in KINDS}

    def timed(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    for r in range(rounds + 1):  # round 0 warms up
        for k, p in pipes.items():
            p.train()
            t_train = timed(lambda p=p, k=k: train_step(p, opts[k], xb, yb, amp))
            p.eval()
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                t128 = timed(lambda p=p: p(xb))
                t1 = statistics.median(timed(lambda p=p: p(x1)) for _ in range(10))
            if r:
                times[k]["train"].append(t_train)
                times[k]["infer128"].append(t128)
                times[k]["infer1"].append(t1)
        print(f"timing round {r}/{rounds}", file=sys.stderr, flush=True)
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}


def memory_child(kind: str, device: str, amp: bool) -> None:
    """Run in a fresh process: two training steps; print the peak memory in MB."""
    dev = torch.device(device)
    p = make(kind, dev)
    opt = torch.optim.SGD(p.parameters(), 0.01, momentum=0.9)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8).to(dev)
    y = torch.randint(0, 10, (128,)).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        train_step(p, opt, x, y, amp)
    sync(dev)
    if dev.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def memory(kind: str, device: torch.device, amp: bool) -> float:
    cmd = [sys.executable, __file__, "--memory-child", kind, "--device", str(device)] + (["--amp"] if amp else [])
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def accuracy(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    data = load_dataset(args.data)
    train, val = stratified_split(data, 0.1, 0)
    train = stratified_subset(train, min(args.train_images, len(train)), 0)
    val = stratified_subset(val, min(args.val_images, len(val)), 0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            kwargs = {"width": args.accuracy_width} | ({"passport": True} if kind == "passport" else {})
            cfg = TrainConfig(
                model="resnet18_cifar",
                model_kwargs=kwargs,
                epochs=args.epochs,
                batch_size=128,
                lr=args.lr,
                label_smoothing=0.1,
                norm="channel",  # as measured (train's default then; resnet18_cifar is not block-aligned)
                amp="bf16" if args.amp else "off",
            )
            key = KeySet.generate(RECIPE, 4) if kind == "key" else None
            passports = Passports.generate(create_model("resnet18_cifar", 10, **kwargs)) if kind == "passport" else None
            t0 = time.perf_counter()
            run = Path(tmp) / kind
            fit(train, None, key, cfg, run, device=device, progress=True, passports=passports)
            seconds = time.perf_counter() - t0
            rep = evaluate_run(run, val, key, wrong_keys=args.wrong, passports=passports, progress=False, device=device)
            out[kind] = {"train_seconds": seconds, "rows": rep.rows}
            print(f"{kind}: trained in {seconds:.0f} s\n{rep.to_markdown()}", file=sys.stderr, flush=True)
    return out


def table(res: dict) -> str:
    t, mem, params, acc = res["timings"], res.get("memory", {}), res["params"], res.get("accuracy")
    lines = [
        "| | non-protected | key-based (SHF+NP+FFX, M=4) | passport (V1, last stage) |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, values: dict, fmt) -> None:
        base = values["none"]
        cells = [fmt(values["none"])] + [f"{fmt(values[k])} ({values[k] / base:.3f}x)" for k in ("key", "passport")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("trainable parameters", {k: params[k]["trainable"] for k in KINDS}, lambda v: f"{v:,}")
    lines.append("| layers with weights | " + " | ".join(str(params[k]["layers"]) for k in KINDS) + " |")
    lines.append("| secret (elements) | - | " + f"{params['key']['secret']} | {params['passport']['secret']:,} |")
    row("train step, batch 128 (ms)", {k: 1000 * t[k]["train"] for k in KINDS}, lambda v: f"{v:,.1f}")
    row("inference, batch 128 (ms)", {k: 1000 * t[k]["infer128"] for k in KINDS}, lambda v: f"{v:,.1f}")
    row("inference, batch 1 (ms)", {k: 1000 * t[k]["infer1"] for k in KINDS}, lambda v: f"{v:,.2f}")
    if mem:
        row("peak memory, train step (MB)", mem, lambda v: f"{v:,.0f}")
    if acc:
        first = {k: acc[k]["rows"][0]["accuracy"] for k in KINDS}
        lines.append("| accuracy, same budget: owner | " + " | ".join(f"{100 * first[k]:.1f}%" for k in KINDS) + " |")
        lines.append(
            "| accuracy without the secret (wrong keys / forged passports, mean) | - | "
            + " | ".join(f"{100 * acc[k]['rows'][-1]['accuracy']:.1f}%" for k in ("key", "passport"))
            + " |"
        )
    return "\n".join(lines)


def parameters() -> dict[str, dict[str, int]]:
    params = {}
    for k in KINDS:
        p = make(k, torch.device("cpu"))
        secret = 0
        if k == "key":
            secret = 48 * 3  # permutation + two masks of L = 48 entries (plus a 128-bit FFX password)
        if k == "passport":
            secret = sum(t.numel() for t in Passports.generate(p.model, seed=0).tensors.values())
        params[k] = {
            "trainable": sum(q.numel() for q in p.model.parameters() if q.requires_grad),
            "layers": sum(1 for m in p.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))),
            "secret": secret,
        }
    return params


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__, out="runs/protection-overhead", table=False)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (off by default: slower on most CPUs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default="../shared/datasets/cifar10/train")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--accuracy-width", type=float, default=0.25)
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--wrong", type=int, default=10, help="wrong keys / forged passports")
    ap.add_argument("--memory-child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.device, args.amp)
        return
    device = torch.device(args.device)
    # Each part is one entry of OUT/results.json: an interrupted run resumes at the first unfinished part.
    store = bench.Results(Path(args.out) / "results.json", fresh=args.fresh, device=args.device)
    parts = {
        "device": lambda: torch.cuda.get_device_name(device) if device.type == "cuda" else bench.cpu_name(),
        "threads": torch.get_num_threads,
        "amp": lambda: args.amp,
        "args": lambda: vars(args),
        "params": parameters,
        "timings": lambda: timings(device, args.rounds, args.amp),
        "memory": lambda: {k: memory(k, device, args.amp) for k in KINDS},
    }
    if not args.skip_accuracy:
        parts["accuracy"] = lambda: accuracy(args, device)
    for name, make_part in parts.items():
        if name not in store or name in ("device", "threads", "amp", "args"):
            store.put(name, make_part())
    res = store.entries
    print(f"device: {res['device']}, {res['threads']} threads, amp {'bf16' if args.amp else 'off'}")
    print(table(res))
    store.write_json(args.json)


if __name__ == "__main__":
    main()
