"""CPU time of ``trustcnn.evaluate`` per 1,000 test images, on decoy digits with trained tiny runs.

    .venv/bin/python benchmarks/evaluate_speed.py [--threads 2] [--repeat 2] [--runs-dir DIR]

Trains (once, into ``--runs-dir``, reused when it already holds them) a ``loss=ce`` baseline and a
``loss=trust`` run of ``small_cnn`` (CE pretraining 2 epochs, 1 fine-tuning epoch), then times
:func:`trustcnn.evaluate.evaluate_runs` with the baseline + the trust run (2 models) on the whole
decoy-digits test set (357 images at 32 px), with every metric on and then without deletion/insertion.

The fixed cost (loading checkpoints, building the data, writing JSON/Markdown/PNG) is measured by the
same call on ``--grid`` images; the per-1,000-image figure is the marginal cost
``(t_full - t_fixed) / (n_full - n_fixed) * 1000``, reported per model (divided by the 2 models).
Deletion/insertion uses the defaults: 20 steps, blur substrate, i.e. 42 extra forward passes per image.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import trustcnn
from trustcnn.evaluate import evaluate_runs
from trustcnn.train import train

CONF_DIR = Path(trustcnn.__file__).resolve().parent / "conf"


def ensure_run(loss: str, runs_dir: Path) -> Path:
    out = runs_dir / loss
    if (out / "metrics.json").exists():
        return out
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"loss={loss}", "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.cache_dir = str(runs_dir / "cache")
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.max_epochs = 1
        cfg.trainer.enable_progress_bar = False
        cfg.model.pretrain.epochs = 2
    train(cfg)
    return out


def timed(repeat: int, **kwargs) -> tuple[float, int]:
    """Best wall time of ``repeat`` calls and the number of images evaluated."""
    best, n = float("inf"), 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = evaluate_runs(out_dir=out, device="cpu", **kwargs)
            best = min(best, time.perf_counter() - t0)
        n = result["data"]["num_images"]
    return best, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="timed calls per setting (best is kept)")
    parser.add_argument("--grid", type=int, default=8, help="images of the fixed-cost call (and of the PNG grid)")
    parser.add_argument("--runs-dir", type=Path, help="where the two tiny runs live (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="evaluate_speed_"))
    baseline, trust = ensure_run("ce", runs_dir), ensure_run("trust", runs_dir)
    common = dict(runs=[trust], baseline=baseline, grid_images=args.grid)

    print(f"decoy digits, small_cnn (Grad-CAM on features.conv3), 2 models (baseline + trust), CPU, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}")
    print(f"{'setting':<34}{'images':>7}{'total (s)':>11}{'fixed (s)':>11}{'s / 1k img / model':>20}")
    for label, faithfulness in (("all metrics", True), ("without deletion/insertion", False)):
        t_full, n_full = timed(args.repeat, faithfulness=faithfulness, **common)
        t_fixed, n_fixed = timed(args.repeat, faithfulness=faithfulness, max_images=args.grid, **common)
        per_k = (t_full - t_fixed) / (n_full - n_fixed) * 1000 / 2
        print(f"{label:<34}{n_full:>7}{t_full:>11.2f}{t_fixed:>11.2f}{per_k:>20.2f}")


if __name__ == "__main__":
    main()
