"""Feature cache for frozen stems: the output of the frozen network in front of the trained layers is
computed once per (stem, weights, data, transform, split, precision) and reused by every epoch and by every
job of a sweep.

``feature_cache: auto`` (the default) turns the cache on where it is exact and off, with the reason logged,
where it is not:

* the stem is the longest frozen prefix of the network (a ``torch.fx`` trace) that every path from the
  input to the logits passes through, and that ends before the target layer and every trainable module;
  it must be deterministic: eval mode, no normalization with batch statistics, no random ops;
* a split is cached only when its samples are a fixed function of its files or tensors (no random
  augmentation; see :meth:`~trustcnn.data.images.ImageListDataset.cache_fingerprint`);
* Guided Grad-CAM, and a loss that needs the input gradient (``loss=rrr``), take their gradient down to the
  input pixels, through the stem: never cached;
* DDP, and precisions other than ``32-true`` and the ``*-mixed`` ones, are not supported (refused).

Where the cache is on, the stage loaders yield ``(features, label, mask)`` in the same order as the images
would come (the :class:`~trustcnn.data.samplers.EpochShuffleSampler` still draws the training order) and
:class:`~trustcnn.module.TrustModule` runs only the part after the stem (:attr:`StemSplit.head`, which calls
the very same modules, so the saliency hooks, the trained parameters and the checkpoints are unchanged).
The saliency grid and ``evaluate`` keep reading images.

On disk, ``<paths.cache_dir>/features/<key>/`` holds ``features.npy`` (+ ``labels.npy``, ``masks.npy``,
``meta.json``); the key hashes everything the features depend on, so any change makes a new entry. A file
lock per key and an atomic rename make parallel sweep jobs compute each entry once (as the pretraining
cache does, :mod:`trustcnn.models.pretrain`). Entries up to :data:`IN_MEMORY_BYTES` are read into memory,
larger ones are memory-mapped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trustcnn.data.base import NO_MASK
from trustcnn.data.fingerprints import UncacheableDataError
from trustcnn.layers import get_module
from trustcnn.models.freeze import _inside
from trustcnn.saliency.capture import uses_batch_statistics

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from trustcnn.data.base import BaseDataModule
    from trustcnn.module import TrustModule

log = logging.getLogger("trustcnn.feature_cache")

FEATURE_CACHE_MODES = ("auto", "off")
# Bump when the layout or the meaning of an entry changes: old entries are then never read.
CACHE_VERSION = 1
# Entries up to this size are read into memory; larger ones are memory-mapped (the OS pages them in).
IN_MEMORY_BYTES = 2 * 2**30
SUPPORTED_PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed")
# Ops of a traced stem that draw random numbers (their names contain one of these).
_RANDOM_OPS = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "poisson")


class FeatureCacheRefused(Exception):
    """The cache would not be exact here; the message is the reason ``auto`` logs."""


def check_mode(mode: Any) -> str:
    """``feature_cache`` validated: ``auto`` or ``off``."""
    if mode in FEATURE_CACHE_MODES:
        return str(mode)
    hint = (" `auto` already uses the cache wherever it is exact and logs why where it is not; forcing it where "
            "it would change the results is not offered." if mode in ("on", True, "true") else "")
    raise ValueError(f"feature_cache={mode!r} is not a mode; use feature_cache=auto or feature_cache=off.{hint}")


# --------------------------------------------------------------------------------------------------
# Splitting the network


@dataclass
class StemSplit:
    """A network cut into ``stem`` (input -> features) and ``head`` (features -> logits).

    Both are ``torch.fx.GraphModule`` s over the network's own module objects (nothing is copied): the head's
    target layer is the network's, hooks registered on it fire in either, and a trained parameter is trained
    in both. ``head(stem(x))`` runs exactly the operations of ``net(x)``.
    """

    stem: fx.GraphModule
    head: fx.GraphModule
    boundary: str
    stem_modules: list[str] = field(default_factory=list)


class _Tracer(fx.Tracer):
    """Keeps the target layer and the trainable modules as single calls (their hooks and names survive)."""

    def __init__(self, leaves: list[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def split_frozen_stem(net: nn.Module, target_layer: str, trainable: list[str]) -> StemSplit:
    """Cut ``net`` after its longest frozen, deterministic prefix in front of ``target_layer`` and ``trainable``.

    The cut is a node of the traced graph that every path from the input to the output passes through (so
    the head needs nothing else from the stem), the last such node before the first call of the target
    layer or of a trainable module (or of a module holding one).

    Raises:
        FeatureCacheRefused: the network does not trace, has no such cut, or its stem is not deterministic.
    """
    roots = [target_layer, *trainable]
    get_module(net, target_layer)
    try:
        graph = _Tracer(roots).trace(net)
    except Exception as err:  # noqa: BLE001 - any trace failure means "cannot split this network"
        raise FeatureCacheRefused(f"{type(net).__name__} cannot be traced by torch.fx ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]})") from None
    nodes = list(graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise FeatureCacheRefused(f"{type(net).__name__}.forward takes more than the image")
    if any(n.op == "get_attr" for n in nodes):
        raise FeatureCacheRefused(f"{type(net).__name__} uses parameters or buffers outside its submodules")

    def touches_roots(name: str) -> bool:
        return any(_inside(name, [r]) or _inside(r, [name]) for r in roots)

    index = {n: i for i, n in enumerate(nodes)}
    first = next((i for i, n in enumerate(nodes) if n.op == "call_module" and (
        touches_roots(n.target) or any(p.requires_grad for p in net.get_submodule(n.target).parameters()))), None)
    if first is None:
        raise FeatureCacheRefused(f"the target layer {target_layer!r} is not called as a module of "
                                  f"{type(net).__name__}.forward")
    # Node i is a cut when no value made before it is used after it.
    cut, reach = 0, 0
    for i, node in enumerate(nodes[:first]):
        if reach <= i:
            cut = i
        reach = max([reach, *(index[u] for u in node.users)])
    if nodes[cut].op == "placeholder":
        raise FeatureCacheRefused(f"nothing frozen lies in front of the target layer {target_layer!r} and the "
                                  f"trainable modules {trainable} (the first layer already trains)")
    stem_nodes, head_nodes = nodes[: cut + 1], nodes[cut + 1:]
    stem_modules = [n.target for n in stem_nodes if n.op == "call_module"]
    for name in stem_modules:
        for sub_name, m in net.get_submodule(name).named_modules(prefix=name):
            if m.training:
                raise FeatureCacheRefused(f"the frozen module {sub_name!r} in front of the target layer is in "
                                          "training mode (its output would change between epochs)")
            if uses_batch_statistics(m):
                raise FeatureCacheRefused(f"the frozen module {sub_name!r} normalizes with batch statistics (each "
                                          "image's features would depend on its batch)")
    for n in stem_nodes:
        op_name = getattr(n.target, "__name__", str(n.target)).lower()
        if n.op in ("call_function", "call_method") and any(r in op_name for r in _RANDOM_OPS):
            raise FeatureCacheRefused(f"the frozen part in front of the target layer draws random numbers ({op_name})")

    stem_graph, env = fx.Graph(), {}
    for n in stem_nodes:
        env[n] = stem_graph.node_copy(n, lambda a: env[a])
    stem_graph.output(env[nodes[cut]])
    head_graph = fx.Graph()
    env = {nodes[cut]: head_graph.placeholder("features")}
    for n in head_nodes:
        env[n] = head_graph.node_copy(n, lambda a: env[a])
    boundary = nodes[cut].target if nodes[cut].op == "call_module" else nodes[cut].name
    return StemSplit(fx.GraphModule(net, stem_graph), fx.GraphModule(net, head_graph), str(boundary), stem_modules)


def stem_fingerprint(net: nn.Module, split: StemSplit) -> dict[str, str]:
    """The stem's computation (its code and each called module's settings) and a hash of its weights
    (parameters and buffers, BatchNorm statistics included)."""
    digest = hashlib.sha1()
    modules = {name: net.get_submodule(name) for name in split.stem_modules}
    for name, module in modules.items():
        for tensor_name, t in [*module.named_parameters(prefix=name), *module.named_buffers(prefix=name)]:
            t = t.detach().cpu().contiguous()
            digest.update(f"{tensor_name}{t.dtype}{tuple(t.shape)}".encode())
            digest.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return {"net": type(net).__qualname__, "code": split.stem.code,
            "modules": hashlib.sha1("\n".join(f"{k}: {m!r}" for k, m in modules.items()).encode()).hexdigest(),
            "weights": digest.hexdigest()}


# --------------------------------------------------------------------------------------------------
# Entries on disk


class FeatureSet(Dataset):
    """``(features, label, mask)`` items of one cached split, in the split's own order.

    Args:
        features: ``(N, ...)`` the stem's outputs.
        labels: ``(N,)`` int64.
        masks: ``(N, 1, H, W)`` uint8 object masks, or ``None`` for data without masks.
        mapped: whether ``features`` is memory-mapped from disk (else held in memory).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None,
                 mapped: bool = False) -> None:
        self.features, self.labels, self.masks, self.mapped = features, labels, masks, mapped

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.masks[i].to(torch.float32) if self.masks is not None else NO_MASK()
        return self.features[i], self.labels[i], mask


@contextmanager
def key_lock(directory: Path, key: str) -> Iterator[None]:
    """An exclusive lock on ``directory/<key>.lock``: jobs that need the same entry wait for the first."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def entry_key(spec: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


# numpy has no bfloat16: such features are stored as their int16 bit patterns.
def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "torch.bfloat16" else t


def compute_entry(path: Path, stem: nn.Module, dataset: Dataset, batch_size: int, num_workers: int,
                  device: torch.device, forward_context: Callable[[], Any]) -> dict[str, Any]:
    """Run ``stem`` over ``dataset`` in order and write the entry into the new directory ``path``
    (features are written batch by batch into a memory-mapped file, so a large split never sits in memory)."""
    path.mkdir(parents=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    n = len(dataset)
    features = labels = masks = None
    has_masks = None
    start, done = time.perf_counter(), 0
    with torch.inference_mode(), forward_context():
        for x, y, m in loader:
            f = stem(x.to(device)).detach().cpu()
            if features is None:
                features = np.lib.format.open_memmap(path / "features.npy", mode="w+", dtype=_to_numpy(f[:0]).dtype,
                                                     shape=(n, *f.shape[1:]))
                dtype = str(f.dtype)
                labels = np.empty(n, dtype=np.int64)
                has_masks = m.numel() > 0
                if has_masks:
                    masks = np.lib.format.open_memmap(path / "masks.npy", mode="w+", dtype=np.uint8,
                                                      shape=(n, *m.shape[1:]))
            b = len(y)
            features[done:done + b] = _to_numpy(f)
            labels[done:done + b] = y.numpy()
            if has_masks:
                if not bool(((m == 0) | (m == 1)).all()):
                    raise FeatureCacheRefused("the masks are not binary (stored as uint8, they would change)")
                masks[done:done + b] = m.to(torch.uint8).numpy()
            done += b
    if features is None or done != n:
        raise FeatureCacheRefused(f"the split gave {done} of {n} samples")
    features.flush()
    if masks is not None:
        masks.flush()
    np.save(path / "labels.npy", labels)
    return {"n": n, "shape": list(features.shape[1:]), "dtype": dtype, "masks": bool(has_masks),
            "seconds": round(time.perf_counter() - start, 3)}


def load_entry(path: Path) -> FeatureSet:
    """The dataset of a finished entry: in memory up to :data:`IN_MEMORY_BYTES`, else memory-mapped."""
    meta = json.loads((path / "meta.json").read_text())
    mapped = (path / "features.npy").stat().st_size > IN_MEMORY_BYTES
    # "c" (copy-on-write) maps the file read-only on disk but gives torch a writable array (no warning).
    features = _from_numpy(np.load(path / "features.npy", mmap_mode="c" if mapped else None), meta["dtype"])
    masks = torch.from_numpy(np.load(path / "masks.npy", mmap_mode="c" if mapped else None)) if meta["masks"] else None
    return FeatureSet(features, torch.from_numpy(np.load(path / "labels.npy")), masks, mapped)


def ensure_entry(cache_dir: Path, spec: dict[str, Any], compute: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """The directory of the entry for ``spec``, computed by ``compute(tmp_dir)`` if no job has yet; returns
    ``(path, whether this call computed it)``. Safe when several jobs ask at once."""
    key = entry_key(spec)
    path = cache_dir / key
    with key_lock(cache_dir, key):
        if (path / "meta.json").exists():
            return path, False
        for stale in cache_dir.glob(f"{key}.tmp*"):  # left by a job that died mid-write (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        tmp = cache_dir / f"{key}.tmp{os.getpid()}"
        try:
            meta = compute(tmp)
            (tmp / "meta.json").write_text(json.dumps({**meta, "spec": spec}, indent=2, default=str))
            os.replace(tmp, path)  # atomic: a reader sees a whole entry or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path, True


# --------------------------------------------------------------------------------------------------
# Wiring into a run


@dataclass
class FeatureCachePlan:
    """What :func:`prepare_feature_cache` set up: the split, the cached stages and their entries."""

    split: StemSplit
    entries: dict[str, Path]
    computed: dict[str, bool]
    refused: dict[str, str]


def _refusal(cfg: Any, module: "TrustModule", datamodule: Any, trainer: "pl.Trainer") -> str | None:
    """Why the cache cannot be exact for this run as a whole, or ``None``."""
    method = (cfg.get("saliency") or {}).get("method", "gradcam")
    if method != "gradcam":
        return (f"saliency.method={method} takes its gradient down to the input pixels, through the frozen "
                "part (only Grad-CAM needs nothing but the target layer)")
    if getattr(module.loss_fn, "needs_inputs", False):
        return (f"loss={(cfg.get('loss') or {}).get('name', type(module.loss_fn).__name__)} differentiates through "
                "the input pixels")
    if trainer.world_size > 1:
        return f"DDP ({trainer.world_size} processes) is not supported by the feature cache"
    if str(trainer.precision) not in SUPPORTED_PRECISIONS:
        return (f"trainer.precision={trainer.precision} converts the network's weights when training starts; the "
                f"cache supports {', '.join(p for p in SUPPORTED_PRECISIONS if p != '32')}")
    if not hasattr(datamodule, "use_cached_sets"):
        return f"{type(datamodule).__name__} is not a trustcnn BaseDataModule"
    return None


def prepare_feature_cache(cfg: Any, module: "TrustModule", datamodule: "BaseDataModule",
                          trainer: "pl.Trainer") -> FeatureCachePlan | None:
    """Apply ``cfg.feature_cache`` to a run about to train: compute or find the cached features of every split
    where they are exact, hand them to the datamodule's stage loaders and the head to ``module``.

    Returns the plan, or ``None`` where the cache is off (by the config, or by ``auto`` with a logged reason).
    """
    mode = check_mode(cfg.get("feature_cache", "auto"))
    if mode == "off":
        log.info("Feature cache off (feature_cache=off): every epoch runs the whole network.")
        return None
    reason = _refusal(cfg, module, datamodule, trainer)
    built = module.built
    split = None
    if reason is None:
        try:
            split = split_frozen_stem(module.net, built.target_layer, list(built.trainable))
        except FeatureCacheRefused as err:
            reason = str(err)
    if reason is not None:
        log.info("Feature cache off (feature_cache=auto): %s.", reason)
        return None

    from trustcnn.data.base import BaseDataModule

    datamodule.setup("fit")
    datamodule.setup("test")
    stem_spec = stem_fingerprint(module.net, split)
    device = trainer.strategy.root_device
    overridden = {name for name in ("train", "val", "test")
                  if getattr(type(datamodule), f"{name}_dataloader") is not getattr(BaseDataModule, f"{name}_dataloader")}
    cache_dir = Path(os.path.expanduser(str(cfg.paths.cache_dir))) / "features"
    entries, computed, refused, sets = {}, {}, {}, {}
    param = next(module.net.parameters())
    home = param.device
    try:
        split.stem.to(device)
        for stage, dataset in datamodule.stage_sets().items():
            loader_kind = stage if stage in ("train", "val") else "test"
            try:
                if loader_kind in overridden:
                    raise FeatureCacheRefused(f"{type(datamodule).__name__} overrides {loader_kind}_dataloader")
                if not hasattr(dataset, "cache_fingerprint"):
                    raise FeatureCacheRefused(f"{type(dataset).__name__} does not describe its samples "
                                              "(no cache_fingerprint)")
                spec = {"version": CACHE_VERSION, "stem": stem_spec, "data": dataset.cache_fingerprint(),
                        "split": stage, "precision": str(trainer.precision), "device": device.type,
                        "torch": torch.__version__}
                path, made = ensure_entry(cache_dir, spec, lambda tmp, ds=dataset: compute_entry(
                    tmp, split.stem, ds, datamodule.batch_size, datamodule.num_workers, device,
                    trainer.precision_plugin.forward_context))
            except (FeatureCacheRefused, UncacheableDataError) as err:
                refused[stage] = str(err)
                log.info("Feature cache off for the %s split (feature_cache=auto): %s.", stage, err)
                continue
            entries[stage], computed[stage] = path, made
            sets[stage] = load_entry(path)
    finally:
        split.stem.to(home)
    if not sets:
        return None
    datamodule.use_cached_sets(sets)
    module.use_feature_cache(split.head, set(sets))
    for stage, path in entries.items():
        s = sets[stage]
        log.info("Feature cache on for the %s split: %d x %s features after %r (%s, %s) in %s", stage, len(s),
                 tuple(s.features.shape[1:]), split.boundary, "computed now" if computed[stage] else "reused",
                 "memory-mapped" if s.mapped else "in memory", path)
    return FeatureCachePlan(split, entries, computed, refused)
