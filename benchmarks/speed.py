"""One benchmark of trustcnn's speed targets (issue 10), measured side by side in one process.

    python benchmarks/speed.py            # batch 32, 224 px; the double-backward Guided step too ("before")
    python benchmarks/speed.py --quick    # < 5 min on 2 CPU cores: batch 8, fewer repeats, small epoch data

With the product's ``cpu_allocator=reuse`` (``--cpu-allocator system`` for glibc's default; see
``benchmarks/allocator.py``, which compares the two in fresh processes).

Prints, and writes to ``benchmarks/RESULTS.md`` with the machine it ran on (``--out``):

1. **Training step** of the paper's two setups (MobileNetV2 transfer, 2 classes; VGG-16 with
   ``features.28`` trainable, 1000 classes; random weights), through ``TrustModule.training_step`` +
   backward + SGD step: cross-entropy (the module's CE step: a plain forward, no input gradient),
   trust + Grad-CAM, trust + Guided Grad-CAM (the fast stem path), a plain-autograd reference of the fast
   stem's work (forward with graph + input gradient + one more forward), and, without ``--quick``, the
   Guided step through the double backward (``saliency.fast_stem=false``, the path before issue 10).
   Ratios to the CE step; the settings take turns step by step, so a change of the machine's load hits
   all of them alike. Targets: Grad-CAM <= 1.3x, Guided <= 3x (batch 32). Uncached steps: the feature
   cache would speed up CE and Grad-CAM but cannot apply to Guided (it needs the input pixels).
2. **Epoch, uncached vs cached** (``feature_cache=off`` vs ``auto``) through ``trustcnn.train.train`` on
   the MobileNetV2 transfer setup (``benchmarks/feature_cache_epoch.py``). Target >= 10x.
3. **Post-hoc Grad-CAM**: ``trustcnn.saliency.posthoc_gradcam`` vs pytorch-grad-cam's ``GradCAM`` on
   ResNet-18 ``layer4``, batch 16, 224 px, maps upsampled to the input; the same batch, equal maps
   (max abs difference printed). Target >= 3x.

Peak memory of each: on CPU the process's peak RSS during that step, after handing the heap's free memory
back (``malloc_trim``; ``cpu_allocator=reuse`` keeps it) and resetting the kernel's high-water mark
(``/proc/self/clear_refs``), and its rise over the RSS just before; on CUDA
``torch.cuda.max_memory_allocated``. The load average is printed: other processes share a small machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"

SETTINGS = {
    "ce": "cross-entropy",
    "gradcam": "trust + Grad-CAM",
    "guided": "trust + Guided Grad-CAM",
    "guided_before": "trust + Guided Grad-CAM, double backward (before)",
    "floor": "plain-autograd reference: forward with graph + input gradient + one more forward",
}


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# --- memory ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory of one block: CUDA allocator peak, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = self.rise_mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            from trustcnn.allocator import release_free_memory

            release_free_memory()  # else cpu_allocator=reuse keeps earlier steps' memory resident: no rise shows
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self._before = _status_kib("VmRSS") * 1024
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self._before is not None:
            peak = _status_kib("VmHWM") * 1024
        else:
            return
        self.peak_mib, self.rise_mib = peak / 2**20, (peak - self._before) / 2**20


# --- 1. training steps -------------------------------------------------------------------------------------


def build_setup(name: str):
    from trustcnn.models.torchvision_models import mobilenet_v2_transfer, vgg16

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        return mobilenet_v2_transfer(num_classes=2, weights=None), 2
    return vgg16(weights=None, target_layer="features.29"), 1000


def make_step(built, classes: int, setting: str, device: torch.device) -> tuple[Callable[[tuple], None], object]:
    """One training step of ``TrustModule`` (as Lightning runs it: training_step, backward, optimizer step)."""
    from trustcnn.loss import CrossEntropyLoss, TrustLoss
    from trustcnn.module import TrustModule

    saliency = {"gradcam": {"method": "gradcam"}, "guided": {"method": "guided_gradcam"},
                "guided_before": {"method": "guided_gradcam", "fast_stem": False}}.get(setting, {"method": "gradcam"})
    loss = CrossEntropyLoss() if setting == "ce" else TrustLoss(lam=0.9)
    module = TrustModule(built, loss, lambda params: torch.optim.SGD(params, lr=1e-3), num_classes=classes,
                         saliency=saliency).to(device)
    module.train()
    opt = module.configure_optimizers()

    def step(batch: tuple) -> None:
        module.train()  # another setting's module shares the net and may have changed its modes
        opt.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        opt.step()

    def floor(batch: tuple) -> None:
        # The fast-stem design's work done by plain autograd: a forward that keeps the graph, the gradient
        # w.r.t. the input (a first-order backward through the whole net) and the replay that carries it back
        # to the parameters (one more forward of the same layers), no saliency or loss on top. The fast stem
        # now does less (BatchNorms folded into the convs of the backward and the replay), so this is a
        # reference, no longer a floor.
        module.train()
        x = batch[0].detach().requires_grad_(True)
        logits = built.net(x)
        torch.autograd.grad(logits.max(dim=1).values.sum(), x)
        with torch.no_grad():
            built.net(x)

    return (floor if setting == "floor" else step), module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(setup: str, settings: list[str], batch: int, size: int, repeats: int, device: torch.device) -> dict:
    built, classes = build_setup(setup)
    built.net.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    data = (x, y, torch.zeros(0, device=device))
    steps = {s: make_step(built, classes, s, device) for s in settings}
    times: dict[str, list[float]] = {s: [] for s in settings}
    memory: dict[str, PeakMemory] = {}
    # Warm-up: the fast stem path plans itself with one extra forward on its first call
    # and checks its replay once on that call too; the first timed round also measures each step's memory.
    for s, (step, _) in steps.items():
        for _ in range(2 if s == "guided" else 1):
            step(data)
    timed = {s: 1 if s == "guided_before" else repeats for s in settings}
    for r in range(repeats):
        for s, (step, _) in steps.items():
            if r >= timed[s]:
                continue
            with PeakMemory(device) if r == 0 else contextlib.nullcontext() as peak:
                sync(device)
                start = time.perf_counter()
                step(data)
                sync(device)
                times[s].append(time.perf_counter() - start)
            if r == 0:
                memory[s] = peak
    reasons = {s: getattr(module.saliency, "fast_stem_reason", None) for s, (_, module) in steps.items()
               if s.startswith("guided")}
    for _, module in steps.values():
        module.saliency.remove()
    return {"setup": setup, "batch": batch, "size": size, "times": times,
            "median": {s: statistics.median(t) for s, t in times.items()}, "memory": memory, "reasons": reasons}


# --- 2. epochs, uncached vs cached ---------------------------------------------------------------------------


def epoch_ratio(quick: bool, threads: int) -> dict | str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from feature_cache_epoch import EpochTimer, run
    except ImportError as err:
        return f"feature cache not available ({err})"
    globals()["EpochTimer"] = EpochTimer  # its runs name their callback __main__.EpochTimer
    epochs, per_class = (2, 48) if quick else (3, 160)
    with tempfile.TemporaryDirectory(prefix="speed_epoch_") as tmp:
        work = Path(tmp)
        rows = {mode: run("mobilenet", mode, work, epochs, per_class, [f"num_threads={threads}"])
                for mode in ("off", "auto")}
    return rows


# --- 3. post-hoc Grad-CAM -------------------------------------------------------------------------------------


def posthoc(batch: int, size: int, repeats: int, device: torch.device) -> dict:
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from trustcnn.saliency.posthoc import posthoc_gradcam

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).to(device).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        classes = net(x).argmax(1)
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    cam = GradCAM(model=net, target_layers=[net.layer4])
    results: dict[str, object] = {}

    def ours() -> None:
        results["ours"] = posthoc_gradcam(net, "layer4", x, classes)[2]

    def theirs() -> None:
        results["theirs"] = cam(input_tensor=x, targets=targets)

    runs = {"trustcnn": ours, "pytorch-grad-cam": theirs}
    times: dict[str, list[float]] = {k: [] for k in runs}
    memory: dict[str, PeakMemory] = {}
    for k, f in runs.items():
        with PeakMemory(device) as memory[k]:
            f()
    for _ in range(repeats):
        for k, f in runs.items():
            sync(device)
            start = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - start)
    cam.activations_and_grads.release()
    diff = float((results["ours"].cpu() - torch.from_numpy(results["theirs"])).abs().max())
    return {"batch": batch, "size": size, "times": times, "median": {k: statistics.median(t) for k, t in times.items()},
            "memory": memory, "max_abs_diff": diff}


# --- report ---------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = f"{platform.node() or 'this machine'}: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, " \
            f"{torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {where}"
    return where


def _mem(m: PeakMemory) -> str:
    return "—" if m.peak_mib != m.peak_mib else f"{m.peak_mib:,.0f} (+{m.rise_mib:,.0f})"


def report(args: argparse.Namespace, device: torch.device, steps: list[dict], epochs: dict | str, post: dict,
           load_start: str, started: datetime) -> str:
    cmd = "python benchmarks/speed.py" + (" --quick" if args.quick else "") + (
        f" --device {args.device}" if args.device != "auto" else "") + (
        f" --cpu-allocator {args.cpu_allocator}" if args.cpu_allocator != "reuse" else "")
    mem_unit = "CUDA peak allocated MiB (rise)" if device.type == "cuda" else "peak RSS MiB (rise over the step's start)"
    lines = [
        "# Speed (issue 10)",
        "",
        f"`{cmd}` on **{machine(device)}**, {started:%Y-%m-%d %H:%M} UTC; load average {load_start} at the start, "
        f"{loadavg()} at the end.",
        "All ratios are measured side by side in this one process (the settings take turns step by step), "
        f"with the product's `cpu_allocator={args.cpu_allocator}` (trustcnn/allocator.py).",
        "",
        "## Training step (TrustModule.training_step + backward + SGD step; random weights)",
        "",
        f"| setup | batch | setting | median step (s) | × CE | {mem_unit} | steps timed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        ce = r["median"]["ce"]
        for s, med in r["median"].items():
            lines.append(f"| {r['setup']} | {r['batch']} | {SETTINGS[s]} | {med:.3f} | {med / ce:.2f} | "
                         f"{_mem(r['memory'][s])} | {len(r['times'][s])} |")
    lines.append("")
    for r in steps:
        ce = r["median"]["ce"]
        gc_ratio, guided = r["median"]["gradcam"] / ce, r["median"]["guided"] / ce
        line = (f"- **{r['setup']}**, batch {r['batch']}: Grad-CAM ÷ CE = **{gc_ratio:.2f}×** (target ≤ 1.3: "
                f"{'met' if gc_ratio <= 1.3 else 'missed'}); Guided ÷ CE = **{guided:.2f}×** (target ≤ 3: "
                f"{'met' if guided <= 3 else 'missed'})")
        if "floor" in r["median"]:
            line += (f"; the plain-autograd reference (forward with graph + input gradient + one more forward, "
                     f"the least the fast stem did before it folded BatchNorms) takes {r['median']['floor'] / ce:.2f}× CE")
        if "guided_before" in r["median"]:
            before = r["median"]["guided_before"]
            line += (f"; the double backward (before) {before / ce:.2f}×, so the fast path is "
                     f"{before / r['median']['guided']:.1f}× faster")
        reason = r["reasons"].get("guided")
        line += "." if reason is None else f" (fast path OFF: {reason})."
        lines.append(line)
    lines += ["", "## Epoch: uncached vs cached (feature_cache=off vs auto, MobileNetV2 transfer, 224 px)", ""]
    if isinstance(epochs, str):
        lines.append(f"- {epochs}")
    else:
        off, on = epochs["off"], epochs["auto"]
        ratio = off["median"] / on["median"]
        lines.append(f"- uncached ÷ cached epoch = {off['median']:.3f} s ÷ {on['median']:.3f} s = **{ratio:.1f}×** "
                     f"(target ≥ 10: {'met' if ratio >= 10 else 'missed'}); {off['train_images']} training images, "
                     f"batch {off['batch']}, {off['threads']} torch thread(s); epochs off {off['epochs']}, "
                     f"auto {on['epochs']}; one-off cache build {on['build']:.2f} s.")
    ours, theirs = post["median"]["trustcnn"], post["median"]["pytorch-grad-cam"]
    lines += [
        "", f"## Post-hoc Grad-CAM (ResNet-18 layer4, batch {post['batch']}, {post['size']} px, maps at the input's size)",
        "",
        f"| implementation | median (s) | {mem_unit} |", "|---|---|---|",
        f"| trustcnn `posthoc_gradcam` | {ours:.3f} | {_mem(post['memory']['trustcnn'])} |",
        f"| pytorch-grad-cam `GradCAM` | {theirs:.3f} | {_mem(post['memory']['pytorch-grad-cam'])} |",
        "",
        f"- pytorch-grad-cam ÷ trustcnn = **{theirs / ours:.1f}×** (target ≥ 3: {'met' if theirs / ours >= 3 else 'missed'});"
        f" maps equal to {post['max_abs_diff']:.1e} (max abs difference; required ≤ 1e-5).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 timed steps, small epoch data (< 5 min, 2 cores)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--setups", nargs="+", default=["mobilenet_v2", "vgg16"], choices=["mobilenet_v2", "vgg16"])
    parser.add_argument("--batch", type=int, default=None, help="training-step batch (default 32; --quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per setting (default 5; --quick 2)")
    parser.add_argument("--no-before", action="store_true", help="skip the double-backward Guided step")
    parser.add_argument("--no-epochs", action="store_true", help="skip the uncached/cached epoch comparison")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the Markdown goes (default benchmarks/RESULTS.md)")
    parser.add_argument("--cpu-allocator", default="reuse", choices=["reuse", "system"],
                        help="as the product's cpu_allocator (default reuse, as trustcnn.train; see benchmarks/allocator.py)")
    args = parser.parse_args(argv)
    from trustcnn.allocator import use_cpu_allocator

    use_cpu_allocator(args.cpu_allocator)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    batch = args.batch or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 5)
    settings = ["ce", "gradcam", "guided", "floor"] + ([] if args.quick or args.no_before else ["guided_before"])
    warnings.filterwarnings("ignore", message=".*self.log.*")
    started, load_start = datetime.now(timezone.utc), loadavg()
    print(f"{machine(device)}; load average {load_start}", flush=True)

    steps = []
    for setup in args.setups:
        r = time_steps(setup, settings, batch, 224, repeats, device)
        print(setup, {s: f"{m:.3f}s ({m / r['median']['ce']:.2f}x CE)" for s, m in r["median"].items()},
              r["reasons"], flush=True)
        steps.append(r)
    epochs = "skipped (--no-epochs)" if args.no_epochs else epoch_ratio(args.quick, torch.get_num_threads())
    print("epochs", epochs if isinstance(epochs, str) else {k: v["median"] for k, v in epochs.items()}, flush=True)
    post = posthoc(16, 224, 3 if args.quick else 5, device)
    print("post-hoc", post["median"], "max abs diff", post["max_abs_diff"], flush=True)

    text = report(args, device, steps, epochs, post, load_start, started)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
