"""CPU time of each trustcnn.metrics metric (update + compute), reported per 1,000 images.

    .venv/bin/python benchmarks/metrics_speed.py [--n 1000] [--batch 100] [--di-n 8] [--threads 2]

Inputs are synthetic: 224x224 elliptical object masks, saliency maps at 7x7 (Grad-CAM of a stride-32
backbone) and at 224x224 (Guided Grad-CAM / input resolution). Mask metrics run on ``--n`` images in
batches of ``--batch``. Deletion/insertion needs 2*(steps+1) forward passes per image, so it is timed on
``--di-n`` images and scaled to 1,000; the model is torchvision ResNet-18 with random weights at 224x224
(eval mode, float32) and, for reference, a 3-conv CNN stand-in.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn

from trustcnn.metrics import (
    CaseTable,
    DeletionInsertion,
    EnergyPointingGame,
    MapRankCorrelation,
    MapSSIM,
    PointingGame,
    SaliencyIoU,
)


def ellipse_masks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = torch.randint(40, size - 40, (2, n, 1, 1), generator=g)
    ry, rx = torch.randint(20, 90, (2, n, 1, 1), generator=g)
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)[:, None]  # (N, 1, H, W) bool


def time_metric(make: Callable[[], object], batches: list[tuple], n: int) -> float:
    """Seconds per 1,000 images for update over all batches + one compute (after one warm-up batch)."""
    warm = make()
    warm.update(*batches[0])
    warm.compute()
    metric = make()
    t0 = time.perf_counter()
    for b in batches:
        metric.update(*b)
    metric.compute()
    return (time.perf_counter() - t0) / n * 1000


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="images for the mask/similarity metrics")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--di-n", type=int, default=8, help="images for deletion/insertion (scaled to 1,000)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, bs, size = args.n, args.batch, 224

    masks = ellipse_masks(n, size, g)
    maps7 = torch.rand(n, 7, 7, generator=g)
    maps224 = torch.rand(n, size, size, generator=g)
    maps7_b = torch.rand(n, 7, 7, generator=g)
    maps224_b = torch.rand(n, size, size, generator=g)
    preds = torch.randint(0, 2, (n,), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)

    def batched(*tensors: torch.Tensor) -> list[tuple]:
        return [tuple(t[i : i + bs] for t in tensors) for i in range(0, n, bs)]

    rows: list[tuple[str, str, str, float]] = []
    for res, maps, maps_b in (("7x7", maps7, maps7_b), ("224x224", maps224, maps224_b)):
        for name, make, data in [
            ("PointingGame(tolerance=15)", lambda: PointingGame(15), batched(maps, masks)),
            ("PointingGame(tolerance=0)", lambda: PointingGame(0), batched(maps, masks)),
            ("EnergyPointingGame", EnergyPointingGame, batched(maps, masks)),
            ("SaliencyIoU(0.5)", SaliencyIoU, batched(maps, masks)),
            ("CaseTable (EPG >= 0.5)", CaseTable, batched(preds, labels, maps, masks)),
        ]:
            rows.append((name, res, "224x224", time_metric(make, data, n)))
        ssim_default = "64x64" if res == "7x7" else "224x224"
        rows.append((f"MapSSIM (compared at {ssim_default})", res, "-", time_metric(MapSSIM, batched(maps, maps_b), n)))
        if res == "7x7":
            rows.append(
                ("MapSSIM(size=224)", res, "-", time_metric(lambda: MapSSIM(size=224), batched(maps, maps_b), n))
            )
        rows.append(("MapRankCorrelation", res, "-", time_metric(MapRankCorrelation, batched(maps, maps_b), n)))

    # deletion / insertion
    import torchvision

    dn = args.di_n
    images = torch.randn(dn, 3, size, size, generator=g)
    targets = torch.randint(0, 2, (dn,), generator=g)
    resnet = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    tiny = TinyCNN().eval()
    for model_name, model in (("ResNet-18 (random init)", resnet), ("3-conv CNN", tiny)):
        for baseline in ("blur", "zeros"):
            make = lambda m=model, b=baseline: DeletionInsertion(m, steps=args.steps, baseline=b, batch_size=64)  # noqa: E731
            data = [(images[i : i + 4], maps7[i : i + 4], targets[i : i + 4]) for i in range(0, dn, 4)]
            sec = time_metric(make, data, dn)
            rows.append((f"DeletionInsertion[{model_name}, {baseline}, {args.steps} steps]", "7x7", "img 224", sec))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; N={n} (deletion/insertion: {dn}), "
          f"batch {bs}")
    print(f"{'metric':<58}{'map':>9}{'mask':>9}{'s / 1000 img':>14}")
    for name, res, mres, sec in rows:
        print(f"{name:<58}{res:>9}{mres:>9}{sec:>14.3f}")


if __name__ == "__main__":
    main()
