"""Training-step time and peak memory of the paper's two setups, and hours per paper run.

Models are the real builders with random weights (timing does not depend on weight values):
MobileNetV2 transfer (new 1x1 conv, target ``new_conv``, 2 classes) and VGG-16 (``features.28``
trains, target ``features.29`` = Keras block5_conv3 after ReLU, 1000 classes). Each setting — ``ce``
(cross-entropy, eq. 1), ``gradcam`` and ``guided_gradcam`` (trust loss, λ 0.9, second-order maps, the
experiments' defaults) — runs in a fresh subprocess, so its peak RSS (``resource.getrusage(RUSAGE_SELF)
.ru_maxrss``: model, batch, activations and autograd graph, plus the interpreter and libraries) is its own.
The step is the one of ``benchmarks/step_time.py``: saliency + loss + backward + SGD step on the
trainable parameters; no data loading, no validation.

``--device cuda`` times on the GPU (peak memory is then ``torch.cuda.max_memory_allocated``);
``--precision 32 bf16`` times float32 and bf16 autocast (what ``trainer.precision=bf16-mixed`` runs: the
forward, the in-step saliency and the loss under ``torch.autocast``; the losses and the map normalization
stay float32) side by side in one process, alternating step by step, so both see the same machine load.
``--models small_cnn`` is the default decoy-digits model (32 px, 10 classes).

A setting whose step would take longer than ``--max-step-s`` at the full batch (projected from one
probe step at ``--probe-batch``) is timed at a smaller batch and scaled linearly to the full batch; the
output says so. The machine's load average is printed, since other processes may share the CPU.

    python benchmarks/paper_step_time.py                       # batch 32, 224 px, both models
    python benchmarks/paper_step_time.py --models mobilenet --repeats 3
    python benchmarks/paper_step_time.py --device cuda --precision 32 bf16     # on a GPU node
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

from step_time import make_step

MODELS = {
    "mobilenet": {"title": "MobileNetV2 transfer (new_conv)", "classes": 2,
                  # ~25,000 PetImages x 0.7 train split, 50 epochs (conf/experiment/paper_mobilenet_catsdogs.yaml)
                  "train_images": 25_000 * 0.7, "epochs": 50},
    "vgg16": {"title": "VGG-16 (block5_conv3)", "classes": 1000,
              # 30,000-image subset minus the 10% validation split, 10 epochs (paper_vgg16_imagenet.yaml)
              "train_images": 30_000 * 0.9, "epochs": 10},
    "small_cnn": {"title": "decoy-digits small CNN (features.conv3)", "classes": 10, "size": 32,
                  # 1,797 digits x 0.6 train split (conf/data/decoy_digits.yaml), conf/trainer/default.yaml's 4 epochs
                  "train_images": 1_797 * 0.6, "epochs": 4},
}
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
SETTINGS = {"ce": "cross-entropy (baseline)", "gradcam": "trust + Grad-CAM", "guided_gradcam": "trust + Guided Grad-CAM"}


def build(model: str):
    from trustcnn.models.small_cnn import small_cnn
    from trustcnn.models.torchvision_models import mobilenet_v2_transfer, vgg16

    torch.manual_seed(0)
    if model == "mobilenet":
        return mobilenet_v2_transfer(num_classes=2, weights=None)
    if model == "small_cnn":
        return small_cnn(num_classes=10)
    return vgg16(weights=None, target_layer="features.29")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_precisions(step, x: torch.Tensor, y: torch.Tensor, precisions: list[str], repeats: int,
                    warmup: int = 1) -> dict[str, dict]:
    """Seconds per step of each precision, timed alternately (p1, p2, p1, p2, ...) after warm-up steps,
    and the peak GPU memory of each (``None`` on CPU)."""
    device = x.device

    def run(precision: str) -> float:
        dtype = PRECISIONS[precision]
        _sync(device)
        start = time.perf_counter()
        if dtype is None:
            step(x, y)
        else:
            with torch.autocast(device.type, dtype=dtype):
                step(x, y)
        _sync(device)
        return time.perf_counter() - start

    out = {p: {"times_s": [], "peak_mem_mib": None} for p in precisions}
    for p in precisions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            run(p)
        if device.type == "cuda":
            out[p]["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    for _ in range(repeats):
        for p in precisions:
            out[p]["times_s"].append(run(p))
    return out


def worker(args: argparse.Namespace) -> None:
    """Time one (model, setting) and print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    built = build(args.models[0])
    net, layer = built.net.to(device), built.target_layer
    step, _ = make_step(net, layer, args.settings[0], second_order=True)
    classes = MODELS[args.models[0]]["classes"]
    size = MODELS[args.models[0]].get("size", args.size)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(n, 3, size, size, generator=g).to(device),
                torch.randint(0, classes, (n,), generator=g).to(device))

    load_start = os.getloadavg()
    used = args.batch
    probe_s = None
    if args.probe_batch < args.batch:
        x, y = batch(args.probe_batch)
        probe_s = time_precisions(step, x, y, args.precision[:1], repeats=1)[args.precision[0]]["times_s"][0]
        projected = probe_s * args.batch / args.probe_batch
        if projected > args.max_step_s:
            # the largest power-of-two batch whose projected step stays under the limit
            used = args.probe_batch
            while used * 2 < args.batch and probe_s * used * 2 / args.probe_batch <= args.max_step_s:
                used *= 2
    x, y = batch(used)
    timed = time_precisions(step, x, y, args.precision, repeats=args.repeats)
    for precision, t in timed.items():
        print(json.dumps({
            "model": args.models[0], "setting": args.settings[0], "precision": precision, "device": device_name(device),
            "batch": args.batch, "measured_batch": used, "size": size, "times_s": t["times_s"],
            "step_s": statistics.median(t["times_s"]) * args.batch / used, "probe_s": probe_s,
            "probe_batch": args.probe_batch, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": t["peak_mem_mib"], "threads": torch.get_num_threads(), "load_start": load_start,
            "load_end": os.getloadavg(),
        }), flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


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
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", nargs="+", default=["32"], choices=list(PRECISIONS),
                        help="float32 and/or autocast dtypes, timed alternately in one process")
    parser.add_argument("--json", default=None, help="also write every result line to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    device = torch.device(args.device)
    where = device_name(device) if device.type == "cuda" else \
        f"CPU: {os.cpu_count()} cores, {args.threads or torch.get_num_threads()} torch threads per step"
    print(f"{where}; torch {torch.__version__}; batch {args.batch}, {args.size} px, precision {' + '.join(args.precision)}, "
          f"1 warmup + {args.repeats} timed steps; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for model in args.models:
        for setting in args.settings:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--models", model, "--settings", setting,
                   "--batch", str(args.batch), "--size", str(args.size), "--repeats", str(args.repeats),
                   "--probe-batch", str(args.probe_batch), "--max-step-s", str(args.max_step_s),
                   "--threads", str(args.threads), "--device", args.device, "--precision", *args.precision]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{model} {setting} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            wall = time.perf_counter() - start
            for line in done.stdout.strip().splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    r["wall_s"] = wall
                    results.append(r)
                    print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, args.batch, device.type == "cuda"))
    if not results or len(results) < len(args.models) * len(args.settings) * len(args.precision):
        sys.exit(1)


def table(results: list[dict], batch: int, gpu: bool) -> str:
    """Markdown: seconds per step, × the CE step of the same model and precision, × the float32 step of the
    same model and setting, peak memory, and the hours a paper run would take at that speed."""
    memory = "peak GPU memory (MiB)" if gpu else "peak RSS (MiB)"
    lines = [f"\n| model | loss | precision | s / step (batch {batch}) | × CE | × float32 | {memory} | steps / run | "
             "hours / run | load avg (start → end) |", "|---|---|---|---|---|---|---|---|---|---|"]
    ce = {(r["model"], r["precision"]): r["step_s"] for r in results if r["setting"] == "ce"}
    fp32 = {(r["model"], r["setting"]): r["step_s"] for r in results if r["precision"] == "32"}
    for r in results:
        m = MODELS[r["model"]]
        steps = m["train_images"] / batch * m["epochs"]
        scaled = r["measured_batch"] != r["batch"]
        note = f" (timed at batch {r['measured_batch']}, ×{r['batch'] // r['measured_batch']})" if scaled else ""
        base = ce.get((r["model"], r["precision"]))
        ratio = f"{r['step_s'] / base:.2f}" if base else "—"
        full = fp32.get((r["model"], r["setting"]))
        vs32 = f"{r['step_s'] / full:.2f}" if full else "—"
        mem = r["peak_gpu_mib"] if gpu else r["peak_rss_mib"]
        lines.append(f"| {m['title']} | {SETTINGS[r['setting']]} | {r['precision']} | {r['step_s']:.3g}{note} | {ratio} | "
                     f"{vs32} | {mem:.0f}{' (at batch %d)' % r['measured_batch'] if scaled else ''} | {steps:,.0f} | "
                     f"{steps * r['step_s'] / 3600:,.2f} | {r['load_start'][0]:.2f} → {r['load_end'][0]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
