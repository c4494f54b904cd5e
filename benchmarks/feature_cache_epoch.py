"""Epoch time with and without the feature cache for frozen stems, through the normal training path.

    python benchmarks/feature_cache_epoch.py                 # both setups, 3 epochs each way
    python benchmarks/feature_cache_epoch.py --setups mobilenet --epochs 4 --out benchmarks/results/feature_cache_epoch.md

Each setup runs ``trustcnn.train.train`` twice in this process, with ``feature_cache=off`` and with
``feature_cache=auto`` (same seed, same config otherwise), and times every training epoch (its validation
included) with a callback. Setups:

* ``mobilenet``: the paper's transfer experiment (``experiment=paper_mobilenet_catsdogs``: frozen MobileNetV2,
  new 1x1 conv + linear trained with the trust loss and Grad-CAM, batch 32, 224 px, no augmentation) on a
  generated tree in the cats_dogs layout (``tests/layouts.py``; smooth random JPEGs), random weights
  (no downloads here). Decoding and resizing the JPEGs is part of an uncached epoch, as in a real run.
* ``decoy``: the default run (decoy digits, small CNN, only ``features.conv3`` trains), pretraining shortened
  to 2 epochs (it does not change the timings).

The first epoch of each run is left out of the median (start-up). The one-off cost of the cache (running the
stem once over every split) is reported separately, from the entries' ``meta.json``. Checkpoints, test and
loggers are off so that only the epochs are timed. The load average is printed: on a shared machine compare
only numbers measured side by side, as here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from layouts import make_pet_images  # noqa: E402

from trustcnn.config_check import CONF_DIR  # noqa: E402
from trustcnn.train import train  # noqa: E402


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, its validation included (Lightning validates before the epoch ends)."""

    seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        EpochTimer.seconds.append(time.perf_counter() - self._start)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def setup_overrides(name: str, work: Path, images_per_class: int) -> list[str]:
    if name == "mobilenet":
        root = work / "cats_dogs"
        if not root.exists():
            make_pet_images(root, n_per_class=images_per_class, bad_files=False, size=(320, 280))
        return ["experiment=paper_mobilenet_catsdogs", "model.weights=null", f"data.root={root}",
                "data.num_workers=0", "data.pin_memory=false", f"data.cache_dir={work / 'scans'}"]
    if name == "decoy":
        return ["model.pretrain.epochs=2"]
    raise ValueError(f"unknown setup {name!r}; use mobilenet or decoy")


def run(name: str, mode: str, work: Path, epochs: int, images_per_class: int, extra: list[str]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*setup_overrides(name, work, images_per_class),
                                                       f"feature_cache={mode}", "logger=none", "test=false", *extra])
    cache = work / f"cache_{name}"
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / f"{name}_{mode}")
        cfg.paths.cache_dir = str(cache)
        cfg.trainer.max_epochs = epochs
        cfg.trainer.enable_progress_bar = False
        cfg.callbacks = {"epoch_timer": {"_target_": "__main__.EpochTimer"}}
    before = {p.name for p in (cache / "features").glob("*") if p.is_dir()} if (cache / "features").exists() else set()
    EpochTimer.seconds = []
    load_before = loadavg()
    start = time.perf_counter()
    _, objects = train(cfg)
    total = time.perf_counter() - start
    made = [p for p in (cache / "features").glob("*") if p.is_dir() and ".tmp" not in p.name and p.name not in before] \
        if (cache / "features").exists() else []
    build = sum(json.loads((p / "meta.json").read_text())["seconds"] for p in made)
    module = objects["module"]
    return {"setup": name, "mode": mode, "epochs": list(EpochTimer.seconds), "total": total,
            "median": statistics.median(EpochTimer.seconds[1:] or EpochTimer.seconds),
            "cached": sorted(module.feature_stages), "build": build, "entries": len(made),
            "train_images": len(objects["datamodule"].train_set), "batch": objects["datamodule"].batch_size,
            "threads": cfg.num_threads,
            "load": f"{load_before} -> {loadavg()}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=["mobilenet", "decoy"], choices=["mobilenet", "decoy"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not in the median)")
    parser.add_argument("--images-per-class", type=int, default=160, help="generated cats_dogs images per class")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (num_threads) of every run; on a shared 2-core machine 2 threads spin "
                             "against other processes (a torch.stack of one cached batch: 1 ms on 1 thread, 500 ms on 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="feature_cache_epoch_") as tmp:
        work = Path(tmp)
        for name in args.setups:
            for mode in ("off", "auto"):
                result = run(name, mode, work, args.epochs, args.images_per_class,
                             [f"num_threads={args.threads}", *args.overrides])
                print(json.dumps(result), flush=True)
                rows.append(result)

    lines = [
        "# Feature cache: epoch time uncached vs cached",
        "",
        f"`python benchmarks/feature_cache_epoch.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
        f"on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, CPU), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "An epoch is one training epoch with its validation, through `trustcnn.train.train`; median over epochs 2..N",
        "(the first is start-up). `build` is the one-off cost of the cache: the stem run once over every split",
        "(train, val and test), paid by the first job of a sweep and reused by every later job.",
        "",
        "| setup | feature_cache | cached splits | train images (batch) | torch threads | epochs (s) | median epoch (s) | "
        "build (s) | load average |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['mode']} | {', '.join(r['cached']) or '-'} | {r['train_images']} ({r['batch']}) | "
                     f"{r['threads']} | {', '.join(f'{s:.2f}' for s in r['epochs'])} | {r['median']:.3f} | "
                     f"{r['build']:.2f} | {r['load']} |")
    lines.append("")
    for name in args.setups:
        off = next(r for r in rows if r["setup"] == name and r["mode"] == "off")
        on = next(r for r in rows if r["setup"] == name and r["mode"] == "auto")
        lines.append(f"- **{name}**: uncached / cached epoch = {off['median']:.3f} s / {on['median']:.3f} s = "
                     f"**{off['median'] / on['median']:.1f}x**; the cache's one-off build took {on['build']:.2f} s "
                     f"({on['build'] / off['median']:.2f} uncached epochs).")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
