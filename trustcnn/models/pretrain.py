"""The first stage of the paper's workflow on embedded data: train the whole network with plain
cross-entropy (it learns whatever shortcut the data offers: the paper's "systematic error", §3.2),
then trustcnn freezes all but the target layer and fine-tunes it with the configured loss.

The pretrained weights are made once per distinct pretraining config and reused by every job of a
sweep; a file lock makes that safe when jobs run in parallel.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from trustcnn.models.base import BuiltModel

log = logging.getLogger("trustcnn.pretrain")


def pretrain_key(spec: dict[str, Any]) -> str:
    """A short stable hash of everything that determines the pretrained weights."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_end_to_end(net: torch.nn.Module, datamodule: pl.LightningDataModule, epochs: int, lr: float, seed: int,
                     cosine: bool = True, progress: bool = False) -> dict[str, float]:
    """Train every parameter of ``net`` with cross-entropy (Adam, cosine-decayed lr); leaves it in eval mode.

    ``progress``: a bar per epoch with the epoch's running loss and accuracy, in the style of Lightning's
    training bar.

    Returns the training accuracy of the last epoch (measured on the fly).
    """
    # A fresh loader per epoch replays the same seeded order each epoch: the recipe the decoy tuning and
    # the recorded studies used (experiments/decoy_digits/TUNING.md); changing it changes every result.
    steps_per_epoch = len(datamodule.train_dataloader())
    with torch.random.fork_rng():  # the caller's RNG stream is the same whether the cache hit or not
        torch.manual_seed(seed)
        for p in net.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1)) if cosine else None
        correct = total = 0
        bar = _progress_bar(steps_per_epoch) if progress else None
        net.train()
        for epoch in range(epochs):
            correct = total = 0
            loss_sum = 0.0
            if bar is not None:
                bar.reset(total=steps_per_epoch)
                bar.set_postfix_str("", refresh=False)
                bar.set_description(f"Pretraining (cross-entropy) epoch {epoch + 1}/{epochs}")
            for x, y, _ in datamodule.train_dataloader():
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
                loss_sum += float(loss.detach()) * len(y)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{loss_sum / total:.4f}", "acc": f"{correct / total:.3f}"}, refresh=False)
        if bar is not None:
            bar.close()
        net.eval()
    return {"train_acc_last_epoch": correct / max(total, 1)}


def _progress_bar(total: int) -> Any:
    """A tqdm bar on stdout, as Lightning's ``TQDMProgressBar`` draws its training bar."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Pretraining (cross-entropy)", file=sys.stdout, dynamic_ncols=True, smoothing=0,
                leave=True)


def ensure_pretrained(
    model: BuiltModel,
    datamodule: pl.LightningDataModule,
    spec: dict[str, Any],
    cache_dir: str | Path,
    epochs: int,
    lr: float,
    seed: int,
    progress: bool = False,
) -> Path:
    """Load the cross-entropy-pretrained weights for ``spec`` into ``model.net``, training them first
    if no job has yet.

    Args:
        spec: everything that determines the weights (model and data config, epochs, lr, seed);
            its hash names the cache file.
        cache_dir: where ``<hash>.pt`` (a state dict) and ``<hash>.json`` (its spec and train accuracy) live.
        progress: show the pretraining's progress (epochs, loss, accuracy) when it runs.

    Returns:
        The path of the weights file.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = pretrain_key(spec)
    path = cache_dir / f"{key}.pt"
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sweep jobs wait here for the first one
        try:
            if not path.exists():
                datamodule.setup("fit")
                log.info("Pretraining %s end to end with cross-entropy for %d epochs (once; later runs of this "
                         "data, model and seed reuse it from %s)", type(model.net).__name__, epochs, cache_dir)
                start = time.perf_counter()
                stats = train_end_to_end(model.net, datamodule, epochs, lr, seed, progress=progress)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(model.net.state_dict(), tmp)
                os.replace(tmp, path)  # atomic: a reader never sees half a file
                meta = {"spec": spec, **stats, "seconds": round(time.perf_counter() - start, 2)}
                (cache_dir / f"{key}.json").write_text(json.dumps(meta, indent=2, default=str))
                log.info("Pretrained %s end to end with cross-entropy in %.1f s (train accuracy %.3f) -> %s",
                         type(model.net).__name__, meta["seconds"], stats["train_acc_last_epoch"], path)
            else:
                log.info("Reusing cross-entropy-pretrained weights %s", path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    model.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return path
