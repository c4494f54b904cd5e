"""Training-step time of DDP on 2 CPU processes (gloo) against one process, at the same global batch.

Runs the real command line (``python -m trustcnn.train``, default config: decoy digits, small CNN, trust
loss with the in-step Grad-CAM) three times, with a timing callback:

1. one process, 1 torch thread (the default ``num_threads: 1``), ``data.batch_size = G``;
2. one process, 2 torch threads (both cores), ``data.batch_size = G``;
3. ``trainer=ddp trainer.accelerator=cpu trainer.devices=2``, 1 thread each, ``data.batch_size = G / 2``.

A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` on rank 0 (forward, the saliency's
double backward, DDP's gradient all-reduce, the optimizer, Lightning's logging and its per-step syncs);
the first ``--warmup`` steps are left out and the median reported. After training, every rank also times
a scalar all-reduce as Lightning's ``sync_dist`` does it (barrier + all_reduce), the cost of each synced
``self.log`` call per step. ::

    python benchmarks/ddp_step_time.py                 # global batch 64, 40 timed steps
    python benchmarks/ddp_step_time.py --batch 256 --steps 20
    python benchmarks/ddp_step_time.py -- saliency=guided_gradcam   # extra overrides after --
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

HERE = Path(__file__).resolve().parent


class StepTimer(pl.Callback):
    """Writes rank 0's step times and the cost of one synced scalar to ``out`` (JSON)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        sync = []
        if trainer.world_size > 1:
            value = torch.zeros((), device=pl_module.device)
            for _ in range(5):
                trainer.strategy.reduce(value, reduce_op="mean")
            for _ in range(50):
                start = time.perf_counter()
                trainer.strategy.reduce(value, reduce_op="mean")
                sync.append(time.perf_counter() - start)
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps({"steps": self.steps, "sync": sync,
                                                  "world_size": trainer.world_size,
                                                  "threads": torch.get_num_threads()}))


def run(name: str, overrides: list[str], workdir: Path, warmup: int) -> dict[str, float]:
    out = workdir / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "trustcnn.train", *overrides, "test=false", "trainer.max_epochs=-1",
           "trainer.limit_val_batches=0", "callbacks.model_checkpoint=null", "trainer.enable_progress_bar=false",
           "logger=none", f"paths.cache_dir={workdir / 'cache'}", f"hydra.run.dir={workdir / name}",
           "+callbacks.step_timer._target_=ddp_step_time.StepTimer", f"+callbacks.step_timer.out={out}"]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    data = json.loads(out.read_text())
    steps = data["steps"][warmup:]
    return {"median_ms": 1e3 * statistics.median(steps), "mean_ms": 1e3 * statistics.fmean(steps),
            "steps": len(steps), "threads": data["threads"], "world_size": data["world_size"],
            "sync_us": 1e6 * statistics.median(data["sync"]) if data["sync"] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="global batch (even)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra trustcnn.train overrides (after --)")
    args = parser.parse_args()
    if args.batch % 2:
        parser.error("--batch must be even (it is split over 2 processes)")
    # max_steps over as many epochs as that takes (a large batch gives few steps per epoch; an epoch's last,
    # smaller batch is a short step that the median shrugs off)
    common = [f"+trainer.max_steps={args.steps + args.warmup}", "model.pretrain.epochs=1", *args.overrides]
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores); "
          f"global batch {args.batch}; {args.steps} timed steps after {args.warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = {
            "1 process, 1 thread": run("one_1t", [*common, f"data.batch_size={args.batch}", "num_threads=1"],
                                       workdir, args.warmup),
            "1 process, 2 threads": run("one_2t", [*common, f"data.batch_size={args.batch}", "num_threads=2"],
                                        workdir, args.warmup),
            "DDP 2 processes x 1 thread": run("ddp", [*common, "trainer=ddp", "trainer.accelerator=cpu",
                                                      "trainer.devices=2", f"data.batch_size={args.batch // 2}",
                                                      "num_threads=1"], workdir, args.warmup),
        }
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| setting | per-process batch | median step (ms) | mean step (ms) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        per = args.batch // r["world_size"]
        print(f"| {name} | {per} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} |")
    ddp = results["DDP 2 processes x 1 thread"]
    for base in ("1 process, 1 thread", "1 process, 2 threads"):
        print(f"DDP / {base}: {ddp['median_ms'] / results[base]['median_ms']:.2f}x (median step time)")
    if ddp["sync_us"] is not None:
        print(f"one synced scalar (barrier + all_reduce, gloo): {ddp['sync_us']:.0f} us")


if __name__ == "__main__":
    main()
