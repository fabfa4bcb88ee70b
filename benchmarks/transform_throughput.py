"""Throughput of the keyed plan vs the authors' implementation style and the plain conversion.

For each configuration (M=4 on 32x32 batch 256; M=16 on 224x224 batch 32), each device (CPU, and
CUDA when present) and each recipe (shuffle, negpos, ffx, shuffle+negpos+ffx), it times in the
same run, from a uint8 batch to float32 in [0, 1]:

- blockkey: ``KeyedTransform(key)(x)``: one table lookup and one gather for the whole key set;
- authors' style: ``x.float() / 255`` then, per step, segment -> index -> integrate (their
  keydefense.py, re-expressed in tests/authors_style.py), chained for the combination;
- floor: the plain ``x.float() / 255`` conversion a pipeline does anyway without a key.

Timing: torch.utils.benchmark.Timer (synchronises CUDA), the three methods interleaved over
--rounds rounds, median of the rounds.

    python benchmarks/transform_throughput.py [--min-time 2.0] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from blockkey import KeyedTransform, KeySet, bench
from blockkey.authors_style import authors_chain
from blockkey.checkpoint import write_json_atomic

CONFIGS = [(4, 32, 256), (16, 224, 32)]  # (M, image size, batch)
RECIPES = ["shuffle", "negpos", "ffx", "shuffle,negpos,ffx"]


def interleaved_medians(fns: list, min_time: float, rounds: int) -> list[float]:
    """Median seconds per call of each fn, measured in interleaved rounds (this VM's speed drifts)."""
    timers = [Timer(stmt="fn()", globals={"fn": f}, num_threads=torch.get_num_threads()) for f in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for t, s in zip(timers, samples, strict=True):
            s.append(t.blocked_autorange(min_run_time=min_time / rounds).median)
    return [statistics.median(s) for s in samples]


def run(min_time: float, rounds: int, devices: list[str]) -> list[dict]:
    rows = []
    for device in devices:
        for m, size, batch in CONFIGS:
            x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

            def floor_fn(x=x):
                return x.float().div_(255)

            for recipe in RECIPES:
                key = KeySet.generate(recipe, m)
                ours_t = KeyedTransform(key).to(device)
                steps = [s.to_json() for s in key.steps]
                chain = authors_chain(steps, m, size, size)
                for t in chain:  # their lookup tables live on the batch's device
                    for name in ("key", "lookup", "relookup"):
                        if hasattr(t, name):
                            setattr(t, name, getattr(t, name).to(device))

                def authors(x=x, chain=chain):
                    y = x.float() / 255
                    for t in chain:
                        y = t(y)
                    return y

                ours_out, theirs_out = ours_t(x), authors()
                if "ffx" not in recipe:  # same outputs (FFX scales differ by design: 999 vs max(table))
                    assert torch.allclose(ours_out, theirs_out, atol=1e-6)
                ours, theirs, floor = interleaved_medians(
                    [lambda x=x, t=ours_t: t(x), authors, floor_fn], min_time, rounds
                )
                rows.append(
                    {
                        "device": device,
                        "M": m,
                        "size": size,
                        "batch": batch,
                        "recipe": recipe.replace(",", "+"),
                        "blockkey_img_s": batch / ours,
                        "authors_img_s": batch / theirs,
                        "floor_img_s": batch / floor,
                        "speedup_vs_authors": theirs / ours,
                        "time_vs_floor": ours / floor,
                    }
                )
                r = rows[-1]
                print(
                    f"{device:<5} M={m:<2} {size}x{size} b={batch:<4} {r['recipe']:<20}"
                    f"{r['blockkey_img_s']:>12,.0f}{r['authors_img_s']:>12,.0f}{r['floor_img_s']:>12,.0f}"
                    f"{r['speedup_vs_authors']:>9.1f}x{r['time_vs_floor']:>9.1f}x",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = bench.parser(__doc__)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement (default 2.0)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (default 5)")
    ap.add_argument("--cpu-only", action="store_true")
    args = ap.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    machine = bench.machine(devices[-1])
    print(f"# {machine}")
    print(
        f"{'dev':<5} {'config':<20}{'recipe':<20}{'blockkey':>12}{'authors':>12}{'floor':>12}"
        f"{'speedup':>10}{'vs floor':>10}"
    )
    print(f"{'':<46}{'(images/s)':>12}{'(images/s)':>12}{'(images/s)':>12}{'':>10}{'(time)':>10}")
    rows = run(args.min_time, args.rounds, devices)
    if args.json:
        write_json_atomic(Path(args.json), {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
