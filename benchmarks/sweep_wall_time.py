"""Wall time of the default 4-job sweep, sequential (Hydra's basic launcher) vs joblib on this machine.

    python benchmarks/sweep_wall_time.py                       # 1 pair, each sweep with a cold cache
    python benchmarks/sweep_wall_time.py --repeats 2 --cache warm --n-jobs 2 --out benchmarks/results/sweep_wall_time.md
    python benchmarks/sweep_wall_time.py --cache warm trainer.max_epochs=16   # longer jobs: extra overrides for every job

Each measurement is the whole command ``python -m trustcnn.train -m optim.lr=1e-3,1e-4 loss.lam=0.1,0.5``
(the full default config, nothing shrunk), with its own sweep directory. ``--cache cold``: each sweep has
an empty pretraining cache, so it includes the one cross-entropy pretraining that its 4 jobs share (a
first sweep); ``warm``: all sweeps use one cache filled beforehand. The two modes alternate in order
(sequential first in even repeats, joblib first in odd ones) so a drift in machine load does not favour
one. The load average is printed before and after each sweep: on a shared machine, compare only pairs
measured under similar load. Prints a Markdown table and the ratio sequential / joblib (> 1: joblib faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

SWEEP = ["optim.lr=1e-3,1e-4", "loss.lam=0.1,0.5"]


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_sweep(mode: str, root: Path, tag: str, cache: Path, n_jobs: int, extra: list[str]) -> dict:
    sweep_dir = root / f"{mode}_{tag}"
    launcher = [] if mode == "sequential" else ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"]
    cmd = [sys.executable, "-m", "trustcnn.train", "-m", *SWEEP, *extra, *launcher,
           f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    load_before = loadavg()
    start = time.perf_counter()
    with open(root / f"{mode}_{tag}.log", "w") as log:
        code = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    finished = sum((p / "metrics.json").exists() for p in jobs)
    # Logged by trustcnn.launch.job_threads when the job has a CPU share; otherwise num_threads as configured.
    threads = sorted({m for p in jobs for m in re.findall(r"torch threads: (\d+)", (p / "train.log").read_text())}) or \
        sorted({f"{m} (num_threads)" for p in jobs for m in re.findall(r"^num_threads: (.+)$", (p / "config.yaml").read_text(), re.M)})
    return {"mode": mode, "tag": tag, "seconds": seconds, "returncode": code, "finished": f"{finished}/{len(jobs)}",
            "load_before": load_before, "load_after": loadavg(), "threads": ",".join(threads)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="pairs (sequential + joblib) to measure")
    parser.add_argument("--n-jobs", type=int, default=2, help="joblib's hydra.launcher.n_jobs")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold")
    parser.add_argument("--workdir", type=Path, default=None, help="where the sweeps go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("extra", nargs="*", help="overrides added to every job (e.g. trainer.max_epochs=16)")
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="sweep_wall_time_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shared = root / "cache_shared"
    if args.cache == "warm":  # fill the cache once: one job of the sweep
        subprocess.run([sys.executable, "-m", "trustcnn.train", "optim.lr=1e-3", "loss.lam=0.1", *args.extra,
                        f"hydra.run.dir={root / 'warmup'}", f"paths.cache_dir={shared}"], cwd=root,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    results = []
    for i in range(args.repeats):
        order = ("sequential", "joblib") if i % 2 == 0 else ("joblib", "sequential")
        for mode in order:
            cache = shared if args.cache == "warm" else root / f"cache_{mode}_{i}"
            results.append(run_sweep(mode, root, str(i), cache, args.n_jobs, args.extra))
            print(f"{mode:10s} repeat {i}: {results[-1]['seconds']:.1f} s (load {results[-1]['load_before']} -> "
                  f"{results[-1]['load_after']})", file=sys.stderr)

    seq = [r["seconds"] for r in results if r["mode"] == "sequential"]
    par = [r["seconds"] for r in results if r["mode"] == "joblib"]
    lines = [
        f"# Sweep wall time: `python -m trustcnn.train -m {' '.join([*SWEEP, *args.extra])}`",
        "",
        f"{datetime.now():%Y-%m-%d %H:%M}, {platform.node() or 'this machine'}: {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), {platform.processor() or platform.machine()}; cache {args.cache}; "
        f"joblib n_jobs={args.n_jobs}. Command: `python benchmarks/sweep_wall_time.py --repeats {args.repeats} "
        f"--cache {args.cache} --n-jobs {args.n_jobs}{''.join(' ' + e for e in args.extra)}`",
        "",
        "| repeat | launcher | wall s | jobs finished | torch threads per job | load avg before (1/5/15 min) | after |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['tag']} | {r['mode']} | {r['seconds']:.1f} | {r['finished']} | {r['threads']} | {r['load_before']} | "
          f"{r['load_after']} |" for r in results],
        "",
        f"Sequential / joblib wall time: **{statistics.median(seq) / statistics.median(par):.2f}x** "
        f"(medians {statistics.median(seq):.1f} s / {statistics.median(par):.1f} s; per pair: "
        + ", ".join(f"{s / p:.2f}" for s, p in zip(seq, par)) + ").",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
