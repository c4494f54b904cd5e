"""cpu_allocator=reuse vs system (trustcnn/allocator.py): the same training steps in fresh processes.

    python benchmarks/allocator.py                 # MobileNetV2 transfer, batch 32, 224 px; CE and Guided steps
    python benchmarks/allocator.py --setup vgg16 --batch 8

The allocator setting is process-wide and one-way, so the two settings cannot take turns in one process:
each (allocator, step) pair runs in its own fresh process, as a training run of that step would (glibc raises
its own mmap threshold after big frees, so a process that ran Guided steps runs CE steps faster than a CE run
does), and the processes alternate (reuse, system, reuse, system, ...) so a change of the machine's load hits
both alike. Each process times ``TrustModule`` steps as ``benchmarks/speed.py`` does (training_step +
backward + SGD step) after a warm-up step (two for Guided, whose first plans its fast path), and reports its
peak RSS. Writes ``benchmarks/results/allocator.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "allocator.md"


def child(mode: str, setup: str, batch: int, steps: int, settings: list[str]) -> dict:
    import torch

    from trustcnn.allocator import use_cpu_allocator

    use_cpu_allocator(mode)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from speed import build_setup, make_step

    torch.set_num_threads(2)
    built, classes = build_setup(setup)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, classes, (batch,), generator=g),
            torch.zeros(0))
    made = {s: make_step(built, classes, s, torch.device("cpu"))[0] for s in settings}
    times: dict[str, list[float]] = {s: [] for s in settings}
    for s, step in made.items():  # the Guided step plans its fast path on its first call
        for _ in range(2 if s == "guided" else 1):
            step(data)
    for _ in range(steps):
        for s, step in made.items():
            start = time.perf_counter()
            step(data)
            times[s].append(time.perf_counter() - start)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"median": {s: statistics.median(t) for s, t in times.items()}, "peak_rss_mib": hwm / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", default="mobilenet_v2", choices=["mobilenet_v2", "vgg16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting in each process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting (alternating)")
    parser.add_argument("--settings", nargs="+", default=["ce", "guided"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.setup, args.batch, args.steps, args.settings)))
        return 0
    import os
    import warnings

    warnings.filterwarnings("ignore")
    started, load = datetime.now(timezone.utc), "/".join(f"{x:.2f}" for x in os.getloadavg())
    runs: dict[tuple[str, str], list[dict]] = {(m, s): [] for s in args.settings for m in ("reuse", "system")}
    for r in range(args.rounds):
        for mode, setting in runs:
            cmd = [sys.executable, __file__, "--child", mode, "--setup", args.setup, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--settings", setting]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            runs[mode, setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(mode, setting, runs[mode, setting][-1], flush=True)
    med = {m: {s: statistics.median(r["median"][s] for r in runs[m, s]) for s in args.settings}
           for m in ("reuse", "system")}
    peak = {m: {s: max(r["peak_rss_mib"] for r in runs[m, s]) for s in args.settings} for m in ("reuse", "system")}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "cpu")
    lines = [
        "# cpu_allocator: reuse vs system", "",
        f"`python benchmarks/allocator.py --setup {args.setup} --batch {args.batch}` on {cpu}, {os.cpu_count()} cores, "
        f"2 torch threads, {started:%Y-%m-%d %H:%M} UTC, load average {load} at the start. {args.rounds} fresh "
        f"processes per (allocator, step), alternating; each: the median of {args.steps} timed `TrustModule` steps "
        "(after a warm-up step); the table: the median over the processes.", "",
        "| step | reuse (s) | system (s) | system ÷ reuse | peak RSS MiB, reuse | peak RSS MiB, system |",
        "|---|---|---|---|---|---|",
    ]
    for s in args.settings:
        reuse, system = med["reuse"][s], med["system"][s]
        lines.append(f"| {s} | {reuse:.3f} | {system:.3f} | {system / reuse:.2f} | {peak['reuse'][s]:,.0f} | "
                     f"{peak['system'][s]:,.0f} |")
    lines += ["", "Guided ÷ CE: " + ", ".join(f"{m} {med[m]['guided'] / med[m]['ce']:.2f}" for m in med
                                          if "guided" in med[m] and "ce" in med[m]) + ".", ""]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
