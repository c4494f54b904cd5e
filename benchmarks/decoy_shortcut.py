"""Does a plain cross-entropy CNN learn the decoy-digits shortcut?

Trains ``small_cnn`` end to end (every parameter, plain cross-entropy, Adam with a cosine lr decay) on the decoy-digits
training split and prints train accuracy, test accuracy with label-consistent decoys
(``test_consistent``), test accuracy with random decoys (``test``, the real test) and the wall time.
A model that leans on the decoy has ``test_consistent`` far above ``test``.

    python benchmarks/decoy_shortcut.py                 # the datamodule / model defaults
    python benchmarks/decoy_shortcut.py --seeds 0 1 2   # several seeds
    python benchmarks/decoy_shortcut.py --patch-size 3 --epochs 4 --width 8

Defaults of every flag are the tuned defaults of ``DecoyDigitsDataModule`` / ``small_cnn``.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from torch import nn

from trustcnn.data.decoy_digits import DecoyDigitsDataModule
from trustcnn.models.pretrain import train_end_to_end
from trustcnn.models.small_cnn import small_cnn

DM_DEFAULTS = {
    k: v.default for k, v in inspect.signature(DecoyDigitsDataModule.__init__).parameters.items()
    if v.default is not inspect.Parameter.empty
}
# training recipe of the baseline (what the decoy-digits experiment's CE baseline uses)
EPOCHS, LR, BATCH, WIDTH = 25, 3e-3, 32, 16


@torch.no_grad()
def accuracy(net: nn.Module, loader) -> float:
    net.eval()
    correct = total = 0
    for x, y, _ in loader:
        correct += (net(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


# time_s is wall time (data build + training + evaluation); cpu_s is the process CPU time summed
# over its threads, which stays meaningful when other jobs share the machine.
def run(args: argparse.Namespace, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    dm = DecoyDigitsDataModule(
        batch_size=args.batch_size, seed=seed, image_size=args.image_size,
        patch_size=args.patch_size, shade_min=args.shade_min, shade_max=args.shade_max,
        digit_intensity=args.digit_intensity,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    dm.setup("fit")
    built = small_cnn(
        dm.num_classes, width=args.width, input_size=args.image_size, batch_norm=args.batch_norm,
        trainable="all",
    )
    net = built.net
    train_end_to_end(net, dm, args.epochs, args.lr, seed, cosine=args.cosine)
    test, test_consistent = dm.test_dataloader()
    res = {
        "train": accuracy(net, dm.train_dataloader()),
        "val": accuracy(net, dm.val_dataloader()),
        "test_consistent": accuracy(net, test_consistent),
        "test": accuracy(net, test),
    }
    res["time_s"] = time.perf_counter() - t0
    res["cpu_s"] = time.process_time() - c0
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--image-size", type=int, default=DM_DEFAULTS["image_size"])
    p.add_argument("--patch-size", type=int, default=DM_DEFAULTS["patch_size"])
    p.add_argument("--shade-min", type=float, default=DM_DEFAULTS["shade_min"])
    p.add_argument("--shade-max", type=float, default=DM_DEFAULTS["shade_max"])
    p.add_argument("--digit-intensity", type=float, default=DM_DEFAULTS["digit_intensity"])
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--batch-norm", action="store_true", help="BatchNorm in small_cnn")
    p.add_argument("--no-cosine", dest="cosine", action="store_false", help="constant lr")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"image_size={args.image_size} patch_size={args.patch_size} shades=[{args.shade_min}, "
        f"{args.shade_max}] digit_intensity={args.digit_intensity} width={args.width} "
        f"batch_norm={args.batch_norm} epochs={args.epochs} lr={args.lr} cosine={args.cosine} "
        f"batch={args.batch_size} threads={args.threads}"
    )
    print(f"{'seed':>4} {'train':>6} {'val':>6} {'test_consistent':>15} {'test(random)':>12} {'time_s':>7} {'cpu_s':>6}")
    for seed in args.seeds:
        r = run(args, seed)
        print(
            f"{seed:>4} {r['train']:6.3f} {r['val']:6.3f} {r['test_consistent']:15.3f} "
            f"{r['test']:12.3f} {r['time_s']:7.1f} {r['cpu_s']:6.1f}"
        )


if __name__ == "__main__":
    main()
