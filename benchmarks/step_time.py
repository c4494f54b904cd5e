"""Time of one training step with the trust loss relative to plain cross-entropy.

Same model, same batch, same trainable layer; only the loss (and so the in-step saliency) differs.

    python benchmarks/step_time.py --arch mobilenet_v2 --layer features.18 --batch 8 --size 224
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision

from trustcnn.layers import get_module
from trustcnn.loss import CrossEntropyLoss, TrustLoss
from trustcnn.saliency import build_saliency


def make_step(net: torch.nn.Module, layer: str, setting: str, second_order: bool):
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    if setting == "ce":
        loss_fn = CrossEntropyLoss()

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y)["loss"].backward()
            opt.step()

        return step, None
    method = build_saliency(setting, net, layer, second_order=second_order)
    loss_fn = TrustLoss(lam=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        out = method(x, y)
        loss_fn(out.logits, y, out.maps)["loss"].backward()
        opt.step()

    return step, method


def time_step(step, x: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, y)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--layer", default="features.18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-order", action="store_true", help="saliency.second_order=false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = torchvision.models.get_model(args.arch, weights=None).to(args.device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    for p in get_module(net, args.layer).parameters():
        p.requires_grad_(True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)

    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{args.arch} target={args.layer} batch={args.batch} size={args.size} "
          f"second_order={not args.first_order} device={device_name}")
    medians = {}
    for setting in ("ce", "gradcam", "guided_gradcam"):
        step, method = make_step(net, args.layer, setting, second_order=not args.first_order)
        medians[setting] = statistics.median(time_step(step, x, y, args.repeats))
        if method is not None:
            method.remove()
    print(f"{'loss':<24}{'median step (s)':>16}{'x CE':>8}")
    for setting, label in (("ce", "cross-entropy"), ("gradcam", "trust + Grad-CAM"), ("guided_gradcam", "trust + Guided Grad-CAM")):
        print(f"{label:<24}{medians[setting]:>16.4f}{medians[setting] / medians['ce']:>8.2f}")


if __name__ == "__main__":
    main()
