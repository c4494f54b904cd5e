"""CPU time of ``trustcnn.evaluate`` per 1,000 test images, on decoy digits with trained tiny runs.

    .venv/bin/python benchmarks/evaluate_speed.py [--threads 2] [--repeat 2] [--runs-dir DIR]

Trains (once, into ``--runs-dir``, reused when it already holds them) a ``loss=ce`` baseline and a
``loss=trust`` run of ``small_cnn`` (CE pretraining 2 epochs, 1 fine-tuning epoch), then times
:func:`trustcnn.evaluation.run.evaluate` (the work of ``python -m trustcnn.evaluate``: one Lightning test pass per
model) with the baseline + the trust run (2 models) on the whole
decoy-digits test set (357 images at 32 px), with every metric on and then without deletion/insertion.

The fixed cost (loading checkpoints, building the data, writing JSON/Markdown/PNG) is measured by the
same call on ``--grid`` images; the per-1,000-image figure is the marginal cost
``(t_full - t_fixed) / (n_full - n_fixed) * 1000``, reported per model (divided by the 2 models), as wall
time and as process CPU time (all threads; the better figure on a shared machine).
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
from trustcnn.evaluation.run import evaluate
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


def eval_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=["device=cpu", *overrides])


def timed(repeat: int, *overrides: str) -> tuple[float, float, int]:
    """Best wall time and best process CPU time (all threads) of ``repeat`` calls, and the images evaluated.

    CPU time is reported too because on a shared machine the wall time mostly measures the other load.
    """
    wall, cpu, n = float("inf"), float("inf"), 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.perf_counter(), time.process_time()
            result = evaluate(eval_cfg(*overrides), out)
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        n = result["data"]["num_images"]
    return wall, cpu, n


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
    common = (f"runs=[{trust}]", f"baseline={baseline}", f"grid_images={args.grid}")

    print(f"decoy digits, small_cnn (Grad-CAM on features.conv3), 2 models (baseline + trust), CPU, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}")
    print(f"{'setting':<30}{'images':>7}{'wall (s)':>10}{'fixed (s)':>10}{'wall s/1k/model':>17}"
          f"{'CPU s/1k/model':>16}")
    for label, faithfulness in (("all metrics", True), ("without deletion/insertion", False)):
        w_full, c_full, n_full = timed(args.repeat, f"faithfulness={faithfulness}", *common)
        w_fixed, c_fixed, n_fixed = timed(args.repeat, f"faithfulness={faithfulness}", f"max_images={args.grid}",
                                          *common)
        scale = 1000 / (n_full - n_fixed) / 2
        print(f"{label:<30}{n_full:>7}{w_full:>10.2f}{w_fixed:>10.2f}{(w_full - w_fixed) * scale:>17.2f}"
              f"{(c_full - c_fixed) * scale:>16.2f}")


if __name__ == "__main__":
    main()
