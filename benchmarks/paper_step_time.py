"""Training-step time and peak memory of the paper's two setups, and hours per paper run.

Models are the real builders with random weights (timing does not depend on weight values):
MobileNetV2 transfer (new 1x1 conv, target ``new_conv``, 2 classes) and VGG-16 (``features.28``
trains, target ``features.29`` = Keras block5_conv3 after ReLU, 1000 classes). Each setting — ``ce``
(cross-entropy, eq. 1), ``gradcam`` and ``guided_gradcam`` (trust loss, λ 0.9, second-order maps, the
experiments' defaults) — runs in a fresh subprocess, so its peak RSS (``resource.getrusage(RUSAGE_SELF)
.ru_maxrss``: model, batch, activations and autograd graph, plus the interpreter and libraries) is its own.
The step is the one of ``benchmarks/step_time.py``: saliency + loss + backward + SGD step on the
trainable parameters; no data loading, no validation.

A setting whose step would take longer than ``--max-step-s`` at the full batch (projected from one
probe step at ``--probe-batch``) is timed at a smaller batch and scaled linearly to the full batch; the
output says so. The machine's load average is printed, since other processes may share the CPU.

    python benchmarks/paper_step_time.py                       # batch 32, 224 px, both models
    python benchmarks/paper_step_time.py --models mobilenet --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from step_time import make_step, time_step

MODELS = {
    "mobilenet": {"title": "MobileNetV2 transfer (new_conv)", "classes": 2,
                  # ~25,000 PetImages x 0.7 train split, 50 epochs (conf/experiment/paper_mobilenet_catsdogs.yaml)
                  "train_images": 25_000 * 0.7, "epochs": 50},
    "vgg16": {"title": "VGG-16 (block5_conv3)", "classes": 1000,
              # 30,000-image subset minus the 10% validation split, 10 epochs (paper_vgg16_imagenet.yaml)
              "train_images": 30_000 * 0.9, "epochs": 10},
}
SETTINGS = {"ce": "cross-entropy (baseline)", "gradcam": "trust + Grad-CAM", "guided_gradcam": "trust + Guided Grad-CAM"}


def build(model: str):
    from trustcnn.models.torchvision_models import mobilenet_v2_transfer, vgg16

    torch.manual_seed(0)
    if model == "mobilenet":
        return mobilenet_v2_transfer(num_classes=2, weights=None)
    return vgg16(weights=None, target_layer="features.29")


def worker(args: argparse.Namespace) -> None:
    """Time one (model, setting) and print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    built = build(args.models[0])
    net, layer = built.net, built.target_layer
    step, _ = make_step(net, layer, args.settings[0], second_order=True)
    classes = MODELS[args.models[0]]["classes"]

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, args.size, args.size, generator=g), torch.randint(0, classes, (n,), generator=g)

    load_start = os.getloadavg()
    used = args.batch
    probe_s = None
    if args.probe_batch < args.batch:
        x, y = batch(args.probe_batch)
        probe_s = time_step(step, x, y, repeats=1, warmup=1)[0]
        projected = probe_s * args.batch / args.probe_batch
        if projected > args.max_step_s:
            # the largest power-of-two batch whose projected step stays under the limit
            used = args.probe_batch
            while used * 2 < args.batch and probe_s * used * 2 / args.probe_batch <= args.max_step_s:
                used *= 2
    x, y = batch(used)
    times = time_step(step, x, y, repeats=args.repeats, warmup=1)
    print(json.dumps({
        "model": args.models[0], "setting": args.settings[0], "batch": args.batch, "measured_batch": used,
        "times_s": times, "step_s": statistics.median(times) * args.batch / used, "probe_s": probe_s,
        "probe_batch": args.probe_batch, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(), "load_start": load_start, "load_end": os.getloadavg(),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warmup step")
    parser.add_argument("--probe-batch", type=int, default=4, help="batch of the probe step that decides scaling")
    parser.add_argument("--max-step-s", type=float, default=300.0,
                        help="measure at a smaller batch (scaled linearly) when a full-batch step would take longer")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {args.batch}, {args.size} px, 1 warmup + {args.repeats} timed steps; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for model in args.models:
        for setting in args.settings:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--models", model, "--settings", setting,
                   "--batch", str(args.batch), "--size", str(args.size), "--repeats", str(args.repeats),
                   "--probe-batch", str(args.probe_batch), "--max-step-s", str(args.max_step_s),
                   "--threads", str(args.threads)]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{model} {setting} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - start
            results.append(r)
            print(json.dumps(r), flush=True)

    print("\n| model | loss | s / step (batch %d) | × CE | peak RSS (MiB) | steps / run | CPU hours / run | load avg (start → end) |"
          % args.batch)
    print("|---|---|---|---|---|---|---|---|")
    ce = {r["model"]: r["step_s"] for r in results if r["setting"] == "ce"}
    for r in results:
        m = MODELS[r["model"]]
        steps = m["train_images"] / args.batch * m["epochs"]
        note = "" if r["measured_batch"] == r["batch"] else f" (timed at batch {r['measured_batch']}, ×{r['batch'] // r['measured_batch']})"
        ratio = f"{r['step_s'] / ce[r['model']]:.2f}" if r["model"] in ce else "—"
        print(f"| {m['title']} | {SETTINGS[r['setting']]} | {r['step_s']:.1f}{note} | {ratio} | {r['peak_rss_mib']:.0f}"
              f"{'' if r['measured_batch'] == r['batch'] else ' (at batch %d)' % r['measured_batch']} | "
              f"{steps:,.0f} | {steps * r['step_s'] / 3600:,.0f} | {r['load_start'][0]:.2f} → {r['load_end'][0]:.2f} |")


if __name__ == "__main__":
    main()
