"""The feature cache for frozen stems (trustcnn.feature_cache): exact, keyed, shared, refused where inexact."""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import queue
import re
import time
from pathlib import Path
from typing import Callable

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from conftest import compose_config, shrink
from layouts import make_pet_images
from trustcnn import feature_cache
from trustcnn.feature_cache import FeatureCacheRefused, check_mode, prepare_feature_cache, split_frozen_stem
from trustcnn.models.freeze import freeze_except
from trustcnn.models.small_cnn import small_cnn
from trustcnn.train import build_loss, build_model, build_module, instantiate_plain, train

LOGGER = "trustcnn.feature_cache"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the runs' num_threads: more only compete for the test machine's cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mobilenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random MobileNetV2 weights whose BatchNorm statistics are those of random images (one forward in
    training mode): unlike freshly initialized statistics (mean 0, variance 1), which shrink the features to
    ~1e-9, these give image-dependent features of order 1, so a wrong feature changes the results."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # the running statistics become those of the batch
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 64, 64))
    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet_v2_calibrated.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def pets_cfg(tmp_path: Path, cache_dir: Path, mobilenet_weights: Path) -> Callable[..., DictConfig]:
    """``pets_cfg(*overrides, output, n, cache)``: the paper's MobileNetV2 transfer setup on a tiny generated
    cats_dogs tree (``n`` images per class), with :func:`mobilenet_weights`, at 64 px."""

    def factory(*overrides: str, output: str = "run", n: int = 6, cache: Path | None = None) -> DictConfig:
        root = tmp_path / f"pets{n}"
        if not root.exists():
            make_pet_images(root, n_per_class=n, bad_files=False, size=(72, 64))
        cache = cache or cache_dir
        cfg = shrink(compose_config([
            "experiment=paper_mobilenet_catsdogs", "model.weights=null", f"model.weights_path={mobilenet_weights}",
            f"data.root={root}", "data.image_size=64", "data.num_workers=0", "data.pin_memory=false",
            "data.batch_size=4", "num_threads=1", *overrides]), tmp_path / output, cache)
        with open_dict(cfg):
            cfg.data.cache_dir = str(cache / "scans")
        return cfg

    return factory


def _prepare(cfg: DictConfig, state: dict[str, torch.Tensor] | None = None):
    """What `train` does up to the fit: datamodule, model (``state`` loaded), module, trainer, then the cache."""
    datamodule = instantiate_plain(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, datamodule.num_classes)
    if state is not None:
        model.net.load_state_dict(state)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    module = build_module(cfg, model, build_loss(cfg.loss, cfg.get("ablation")), datamodule)
    return prepare_feature_cache(cfg, module, datamodule, trainer), module, datamodule


def _stem_outputs(net: torch.nn.Module, boundary: str, images: torch.Tensor) -> torch.Tensor:
    """The output of module ``boundary`` in an ordinary forward of the whole network (a hook, no fx)."""
    seen = []
    handle = net.get_submodule(boundary).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        net(images)
    handle.remove()
    return seen[0]


def _train_losses(output_dir: Path) -> list[float]:
    with open(output_dir / "csv" / "version_0" / "metrics.csv") as fh:
        return [float(r["train/loss_step"]) for r in csv.DictReader(fh) if r.get("train/loss_step")]


# --------------------------------------------------------------------------------------------------
# Equality of cached and uncached training


class RecordBatchShapes(pl.Callback):
    """The shape of every batch's first tensor, by stage, as the trainer's loops receive them."""

    shapes: dict[str, set[tuple[int, ...]]] = {}

    def _record(self, stage: str, batch) -> None:
        RecordBatchShapes.shapes.setdefault(stage, set()).add(tuple(batch[0].shape[1:]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record("val", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record("test", batch)


def _run_pair(make) -> dict[str, tuple[dict[str, float], dict]]:
    runs = {}
    for mode in ("off", "auto"):
        cfg = make(f"feature_cache={mode}", output=mode)
        with open_dict(cfg):
            cfg.trainer.max_epochs = 2
            cfg.trainer.log_every_n_steps = 1
            cfg.callbacks.batch_shapes = {"_target_": "test_feature_cache.RecordBatchShapes"}
        RecordBatchShapes.shapes = {}
        runs[mode] = (cfg, *train(cfg), RecordBatchShapes.shapes)
    return runs


def _assert_equal_runs(runs, cached_stages: set[str], image: tuple[int, ...], features: tuple[int, ...]) -> None:
    (cfg_off, m_off, o_off, seen_off), (cfg_on, m_on, o_on, seen_on) = runs["off"], runs["auto"]
    assert o_off["module"].feature_stages == set()
    assert o_on["module"].feature_stages == cached_stages
    # What the training, validation and test loops were fed: images without the cache, features with it.
    assert seen_off == {"train": {image}, "val": {image}, "test": {image}}
    assert seen_on == {"train": {features}, "val": {features}, "test": {features}}
    assert set(m_off) == set(m_on)
    for key, value in m_off.items():
        assert m_on[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    losses_off, losses_on = _train_losses(Path(cfg_off.paths.output_dir)), _train_losses(Path(cfg_on.paths.output_dir))
    assert len(losses_off) == 6 and losses_on == pytest.approx(losses_off, rel=1e-5, abs=1e-7)
    net_off, net_on = o_off["module"].net.state_dict(), o_on["module"].net.state_dict()
    assert net_off.keys() == net_on.keys()  # the checkpoint holds the same network either way
    for name in o_off["module"].trainable_names:
        torch.testing.assert_close(net_on[name], net_off[name], rtol=1e-5, atol=1e-6)
    # The cached run's checkpoint is an ordinary one: the uncached module loads it.
    ckpt = torch.load(Path(cfg_on.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    o_off["module"].load_state_dict(ckpt["state_dict"])


def test_cached_training_equals_uncached_decoy_digits(make_cfg) -> None:
    def make(*overrides: str, output: str) -> DictConfig:
        cfg = make_cfg(*overrides, output=output)
        with open_dict(cfg):
            cfg.model.pretrain.epochs = 3  # a network that has learned something, so maps are not trivial
        return cfg

    runs = _run_pair(make)
    _assert_equal_runs(runs, {"train", "val", "test", "test_consistent"}, (3, 32, 32), (32, 8, 8))
    # Not a degenerate run: the maps are neither empty nor uniform, and the trained layer moved.
    _, metrics, objects, _ = runs["auto"]
    assert 0.05 < metrics["test/s_hat"] < 0.95
    pretrained = torch.load(objects["pretrained"], weights_only=True)
    trained = objects["module"].net.state_dict()
    assert all(not torch.equal(pretrained[n], trained[n]) for n in objects["module"].trainable_names)


def test_cached_training_equals_uncached_mobilenet_transfer(pets_cfg) -> None:
    runs = _run_pair(lambda *o, output: pets_cfg("loss.lam=0.5", *o, output=output, n=10))
    _assert_equal_runs(runs, {"train", "val", "test"}, (3, 64, 64), (1280, 2, 2))
    assert runs["auto"][2]["module"]._features is not None


# --------------------------------------------------------------------------------------------------
# What is cached, and when a change makes a new entry


def test_cached_features_are_the_stem_outputs_and_reused(pets_cfg, monkeypatch) -> None:
    cfg = pets_cfg()
    plan, module, datamodule = _prepare(cfg)
    assert plan.split.boundary == "backbone.18.2"  # the whole MobileNetV2 feature extractor
    assert set(plan.entries) == {"train", "val", "test"} and all(plan.computed.values())
    for stage, dataset in datamodule.stage_sets().items():
        images, labels, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
        cached = datamodule.cached_sets[stage]
        expected = _stem_outputs(module.net, "backbone", images)
        torch.testing.assert_close(cached.features, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(cached.labels, labels)
    # Outside a running trainer (the saliency grid, evaluate, code after a run) the loaders give images.
    assert next(iter(datamodule.train_dataloader()))[0].shape[1:] == (3, 64, 64)
    assert next(iter(datamodule.main_test_dataloader()))[0].shape[1:] == (3, 64, 64)

    again, _, _ = _prepare(cfg)
    assert again.entries == plan.entries and not any(again.computed.values())
    # Larger than the memory limit: the same entries, memory-mapped.
    monkeypatch.setattr(feature_cache, "IN_MEMORY_BYTES", 0)
    mapped, _, dm = _prepare(cfg)
    assert not any(mapped.computed.values())
    for stage in plan.entries:
        assert dm.cached_sets[stage].mapped
        assert torch.equal(dm.cached_sets[stage].features, datamodule.cached_sets[stage].features)


def test_a_change_of_weights_transform_split_or_files_makes_new_entries(pets_cfg, tmp_path: Path) -> None:
    cache = tmp_path / "own_cache"
    cfg = pets_cfg(cache=cache)
    base, module, _ = _prepare(cfg)
    state = {k: v.clone() for k, v in module.net.state_dict().items()}
    assert len(set(base.entries.values())) == 3  # one entry per split

    # A trainable layer's weights do not change the stem: same entries.
    head_changed = dict(state, **{"new_conv.conv.weight": state["new_conv.conv.weight"] + 1})
    same, _, _ = _prepare(cfg, head_changed)
    assert same.entries == base.entries and not any(same.computed.values())

    def new_entries(plan) -> None:
        assert all(plan.computed.values())
        assert not set(plan.entries.values()) & set(base.entries.values())

    stem_weight = "backbone.0.0.weight"
    new_entries(_prepare(cfg, dict(state, **{stem_weight: state[stem_weight] * 1.01}))[0])
    bn_stats = "backbone.0.1.running_mean"  # buffers count: frozen BatchNorm statistics are part of the stem
    new_entries(_prepare(cfg, dict(state, **{bn_stats: state[bn_stats] + 0.1}))[0])
    new_entries(_prepare(pets_cfg("data.image_size=72", cache=cache), state)[0])  # the transform
    # Another split: new entries for the splits whose images changed; a split of the same images is reused.
    resplit, _, dm_resplit = _prepare(pets_cfg("data.seed=1", "data.test_fraction=0.3", cache=cache), state)
    _, _, dm_base = _prepare(cfg, state)
    for stage in ("train", "val", "test"):
        same_images = dm_resplit.stage_sets()[stage].paths == dm_base.stage_sets()[stage].paths
        assert resplit.computed[stage] != same_images, stage
        assert (resplit.entries[stage] == base.entries[stage]) == same_images, stage
    assert resplit.computed["train"]
    # A rewritten image file changes only the split that holds it.
    some_test_file = Path(dm_base.test_sets[0].paths[0])
    stat = some_test_file.stat()
    os.utime(some_test_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched, _, _ = _prepare(cfg, state)
    assert touched.computed == {"train": False, "val": False, "test": True}
    assert touched.entries["test"] != base.entries["test"]


# --------------------------------------------------------------------------------------------------
# Parallel jobs


def _job(cfg_yaml: str, barrier, results) -> None:
    """One sweep job (a spawned process) reaching the feature cache."""
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    barrier.wait()  # both jobs ask for the same entries at the same moment
    plan, _, datamodule = _prepare(OmegaConf.create(cfg_yaml))
    results.put({stage: (str(path), plan.computed[stage], datamodule.cached_sets[stage].features.sum().item())
                 for stage, path in plan.entries.items()})


def test_two_parallel_jobs_share_one_cache(pets_cfg, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    cfg = pets_cfg(cache=tmp_path / "shared_cache")
    # spawn, not fork: a child forked from a pytest process whose torch thread pools already ran can deadlock.
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    jobs = [ctx.Process(target=_job, args=(OmegaConf.to_yaml(cfg, resolve=True), barrier, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    outcomes, deadline = [], time.monotonic() + 300
    while len(outcomes) < len(jobs):  # fail as soon as a job dies (e.g. both wrote one entry)
        try:
            outcomes.append(results.get(timeout=1))
        except queue.Empty:
            assert not any(job.exitcode for job in jobs), [job.exitcode for job in jobs]
            assert time.monotonic() < deadline, "the jobs did not finish in 300 s"
    for job in jobs:
        job.join(timeout=60)
        assert job.exitcode == 0
    assert outcomes[0].keys() == outcomes[1].keys() == {"train", "val", "test"}
    for stage in outcomes[0]:
        (path_a, made_a, sum_a), (path_b, made_b, sum_b) = outcomes[0][stage], outcomes[1][stage]
        assert path_a == path_b and sum_a == sum_b
        assert made_a != made_b, f"{stage}: each entry is computed by exactly one job"
    leftovers = [p.name for p in (tmp_path / "shared_cache" / "features").iterdir() if ".tmp" in p.name]
    assert not leftovers


# --------------------------------------------------------------------------------------------------
# auto refuses where the cache would be inexact, and says why


def _off_reasons(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER and "off" in r.getMessage())


@pytest.mark.parametrize("overrides, reason", [
    (["saliency=guided_gradcam"], r"saliency.method=guided_gradcam takes its gradient down to the input pixels"),
    (["loss=rrr"], r"loss=rrr differentiates through the input pixels"),
    (["++model.trainable=all"], r"nothing frozen lies in front of the target layer"),
    (["trainer=ddp", "trainer.accelerator=cpu"], r"DDP \(2 processes\) is not supported"),
    (["trainer.precision=64-true"], r"trainer.precision=64-true"),
    (["feature_cache=off"], r"feature_cache=off"),
])
def test_auto_refuses_with_a_logged_reason(make_cfg, caplog, overrides: list[str], reason: str) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    plan, module, datamodule = _prepare(make_cfg(*overrides))
    assert plan is None and module.feature_stages == set() and datamodule.cached_sets == {}
    assert re.search(reason, _off_reasons(caplog)), _off_reasons(caplog)


def test_random_augmentation_keeps_the_images_of_that_split_only(pets_cfg, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    plan, module, datamodule = _prepare(pets_cfg("data.augment=true"))
    assert "RandomResizedCrop is random" in plan.refused["train"]
    assert "Feature cache off for the train split" in _off_reasons(caplog)
    assert set(plan.entries) == {"val", "test"} and module.feature_stages == {"val", "test"}
    assert next(iter(datamodule.train_dataloader()))[0].shape[1:] == (3, 64, 64)


def test_a_stem_that_is_not_deterministic_is_refused() -> None:
    built = small_cnn(10, batch_norm=True)
    net = built.net
    freeze_except(net, built.trainable)
    net.eval()
    split = split_frozen_stem(net, built.target_layer, built.trainable)
    assert split.boundary == "features.pool2"
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(split.head(split.stem(x)), net(x), rtol=0, atol=0)
    net.features.bn2.train()  # a frozen BatchNorm left in training mode would change between epochs
    with pytest.raises(FeatureCacheRefused, match=r"'features.bn2' in front of the target layer is in training mode"):
        split_frozen_stem(net, built.target_layer, built.trainable)
    net.eval()
    net.features.bn1.track_running_stats, net.features.bn1.running_mean, net.features.bn1.running_var = False, None, None
    with pytest.raises(FeatureCacheRefused, match=r"'features.bn1' normalizes with batch statistics"):
        split_frozen_stem(net, built.target_layer, built.trainable)
    with pytest.raises(FeatureCacheRefused, match=r"first layer already trains"):
        split_frozen_stem(net, "features.conv3", ["features.conv1"])


def test_feature_cache_on_is_refused_with_the_modes(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"feature_cache='on' is not a mode; use feature_cache=auto or feature_cache=off"):
        check_mode("on")
    cfg = make_cfg("feature_cache=sometimes")
    with pytest.raises(ValueError, match=r"feature_cache='sometimes'"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
