"""The paper's experiment configs (issue 4): composed settings, sweeps, and end-to-end runs on CPU.

Each run uses a tiny on-the-fly copy of the real data layout (``tests/layouts.py``) and random
torchvision weights saved to a local file (``model.weights=null model.weights_path=<file>``), so no
download is ever attempted. Images are 64 px to keep the real MobileNetV2 / VGG-16 cheap.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from captum.attr._core.guided_backprop_deconvnet import GuidedBackprop as CaptumGuidedBackprop
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict
from torch import nn

from conftest import compose_config, shrink
from layouts import make_imagenet, make_oxford_pet, make_pet_images
from trustcnn.config_check import CONF_DIR
from trustcnn.data.imagenet_subset import load_wnids
from trustcnn.models.torchvision_models import mobilenet_v2_transfer, vgg16
from trustcnn.saliency import GradCAM, GuidedGradCAM
from trustcnn.train import train

SIZE = 64
WNIDS = load_wnids()[:3]


# --------------------------------------------------------------------------------------------------
# fixtures: tiny layouts and random weights, once per session


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread. MobileNetV2's (guided) double backward is thousands of small ops, and with two
    threads each one waits for both cores: on a shared 2-core machine these tests then ran 100x slower
    (a 1.3 s test took 144 s at load 3.5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mobilenet_file(random_weights) -> Path:
    return random_weights("mobilenet_v2")


@pytest.fixture(scope="session")
def vgg16_file(random_weights) -> Path:
    return random_weights("vgg16")


@pytest.fixture(scope="session")
def pet_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cats_dogs")
    return root, make_pet_images(root, n_per_class=6, bad_files=True)


@pytest.fixture(scope="session")
def oxford_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("oxford_pet")
    make_oxford_pet(root)
    return root


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet(root, WNIDS, n_train=4, n_val=2)
    return root


def tiny_overrides(root: Path, weights_path: Path) -> list[str]:
    """Small images and batches, no worker processes, local random weights (no download)."""
    return [f"data.root={root}", f"data.image_size={SIZE}", "data.batch_size=4", "data.num_workers=0",
            "data.pin_memory=false", "model.weights=null", f"model.weights_path={weights_path}"]


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def sweep_jobs(arguments: list[str]) -> list[list[str]]:
    """The per-job override lists of ``python -m trustcnn.train -m <arguments>``, as Hydra's basic
    sweeper builds them: the config's ``hydra.sweeper.params`` first, then the command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(arguments) if not o.is_sweep_override()]
    params = compose_with_hydra(fixed).hydra.sweeper.params or {}
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + arguments)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [job for batch in batches for job in batch]


# --------------------------------------------------------------------------------------------------
# composed configs = the paper's settings


@pytest.mark.parametrize("name", ["cats_dogs", "oxford_pet", "imagenet_subset"])
def test_data_config_exposes_every_constructor_argument(name: str) -> None:
    from hydra.utils import get_class

    cfg = compose_config([f"data={name}"]).data
    params = inspect.signature(get_class(cfg._target_).__init__).parameters
    assert set(cfg) - {"_target_"} == set(params) - {"self"}
    assert cfg.root.endswith(f"/{'imagenet' if name == 'imagenet_subset' else name}")
    assert cfg.batch_size == 32 and cfg.image_size == 224 and cfg.seed == 0


def test_mobilenet_catsdogs_config_is_the_papers_section_4_1() -> None:
    cfg = compose_config(["experiment=paper_mobilenet_catsdogs"])
    assert cfg.data._target_ == "trustcnn.data.cats_dogs.CatsDogsDataModule"
    assert cfg.data.batch_size == 32 and cfg.data.image_size == 224
    assert cfg.model._target_ == "trustcnn.models.mobilenet_v2_transfer"
    assert cfg.model.weights == "IMAGENET1K_V1" and cfg.model.new_conv_channels == 256
    assert cfg.model.target_layer == "new_conv"
    assert cfg.optim._target_ == "torch.optim.SGD" and cfg.optim.lr == 0.01 and cfg.optim.momentum == 0.0
    assert cfg.trainer.max_epochs == 50 and cfg.trainer.accelerator == "auto"
    assert (cfg.loss.name, cfg.loss.lam, cfg.loss.form) == ("trust", 0.9, "paper")
    assert cfg.saliency.method == "gradcam" and cfg.ablation.name == "none"
    assert cfg.optimized_metric == "val/acc"


def test_vgg16_imagenet_config_is_the_papers_section_4_2() -> None:
    cfg = compose_with_hydra(["experiment=paper_vgg16_imagenet"])
    assert cfg.data._target_ == "trustcnn.data.imagenet_subset.ImageNetSubsetDataModule"
    assert cfg.data.subset_size == 30000 and cfg.data.batch_size == 32 and cfg.data.image_size == 224
    assert cfg.model._target_ == "trustcnn.models.vgg16" and cfg.model.weights == "IMAGENET1K_V1"
    assert cfg.model.target_layer == "features.29" and list(cfg.model.trainable) == ["features.28"]
    assert cfg.optim._target_ == "torch.optim.SGD"
    # Without -m: the paper's best grid point.
    assert cfg.optim.lr == 0.01 and (cfg.loss.name, cfg.loss.lam) == ("trust", 0.9)
    assert cfg.saliency.method == "gradcam" and cfg.trainer.accelerator == "auto"
    assert dict(cfg.hydra.sweeper.params) == {"optim.lr": "0.01,0.1,0.3", "loss.lam": "0.9,0.7,0.5"}


def test_oxford_pet_mask_config() -> None:
    cfg = compose_config(["experiment=oxford_pet_mask"])
    assert cfg.data._target_ == "trustcnn.data.oxford_pet.OxfordPetDataModule"
    assert cfg.model._target_ == "trustcnn.models.mobilenet_v2_transfer"
    assert cfg.loss.name == "trust_mask" and cfg.loss.lam == 0.9 and cfg.optim.lr == 0.01


@pytest.mark.parametrize(("experiment", "tolerance"), [("paper_mobilenet_catsdogs", 15), ("paper_vgg16_imagenet", 15),
                                                       ("oxford_pet_mask", 15)])
def test_experiment_top_level_keys_win(experiment: str, tolerance: int) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.task_name == experiment
    assert cfg.pointing_tolerance == tolerance
    assert cfg.num_threads is None  # photo models use every core
    assert "paper" in cfg.tags or experiment == "oxford_pet_mask"


@pytest.mark.parametrize("experiment", ["paper_mobilenet_catsdogs", "paper_vgg16_imagenet", "oxford_pet_mask"])
@pytest.mark.parametrize("choice", ["loss=ce", "saliency=guided_gradcam", "ablation=no_r1", "ablation=no_r2"])
def test_command_line_group_choices_override_the_experiment(experiment: str, choice: str) -> None:
    group, option = choice.split("=")
    expected = {"loss": "name", "saliency": "method", "ablation": "name"}[group]
    for overrides in ([f"experiment={experiment}", choice], [choice, f"experiment={experiment}"]):
        cfg = compose_config(overrides)
        assert cfg[group][expected] == option, overrides
    if choice == "loss=ce":
        # The experiment sets no trust-only value: ce's trust settings stay null ("does not apply").
        assert all(cfg.loss[k] is None for k in cfg.loss if k != "name"), cfg.loss


def test_mobilenet_ablation_multirun_jobs() -> None:
    jobs = sweep_jobs(["experiment=paper_mobilenet_catsdogs", "ablation=none,no_r1,no_r2"])
    assert len(jobs) == 3
    weights = []
    for job in jobs:
        cfg = compose_config(job)
        assert cfg.optim.lr == 0.01 and cfg.trainer.max_epochs == 50
        weights.append((cfg.ablation.w1, cfg.ablation.w2))
    assert weights == [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]


def test_vgg16_multirun_is_the_nine_job_grid() -> None:
    jobs = sweep_jobs(["experiment=paper_vgg16_imagenet"])
    assert len(jobs) == 9
    grid = set()
    for job in jobs:
        cfg = compose_config(job)
        assert cfg.loss.name == "trust" and cfg.model._target_ == "trustcnn.models.vgg16"
        grid.add((cfg.optim.lr, cfg.loss.lam))
    assert grid == set(itertools.product([0.01, 0.1, 0.3], [0.9, 0.7, 0.5]))

    guided = sweep_jobs(["experiment=paper_vgg16_imagenet", "saliency=guided_gradcam"])
    assert len(guided) == 9 and all(compose_config(j).saliency.method == "guided_gradcam" for j in guided)
    # A command-line value of a grid key replaces that axis.
    assert len(sweep_jobs(["experiment=paper_vgg16_imagenet", "optim.lr=0.01"])) == 3


def test_vgg16_cross_entropy_baseline_multirun_drops_the_lambda_axis() -> None:
    jobs = sweep_jobs(["experiment=paper_vgg16_imagenet", "loss=ce", "hydra.sweeper.params=null",
                       "optim.lr=0.01,0.1,0.3"])
    assert len(jobs) == 3
    assert [compose_config(j).optim.lr for j in jobs] == [0.01, 0.1, 0.3]
    assert all(compose_config(j).loss.name == "ce" for j in jobs)


# --------------------------------------------------------------------------------------------------
# end to end on CPU (tiny layouts, 64 px, random weights from a local file)


def run_experiment(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> tuple[dict, DictConfig, dict]:
    cfg = shrink(compose_config(overrides), tmp_path / "run", cache_dir)
    metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "config.yaml").exists()
    assert (out / "saliency_grid.png").stat().st_size > 1000
    for key in ("test/acc", "test/precision", "test/recall"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert "best_val/acc" in saved
    return saved, cfg, objects


@pytest.mark.parametrize("variant", [[], ["saliency=guided_gradcam", "ablation=no_r1"], ["loss=ce"]],
                         ids=["gradcam", "guided_no_r1", "ce"])
def test_mobilenet_catsdogs_runs_end_to_end(tmp_path: Path, cache_dir: Path, pet_root, mobilenet_file: Path,
                                            variant: list[str]) -> None:
    root, written = pet_root
    saved, cfg, objects = run_experiment(
        tmp_path, cache_dir, ["experiment=paper_mobilenet_catsdogs", *variant, *tiny_overrides(root, mobilenet_file)])
    dm = objects["datamodule"]
    assert dm.num_skipped == len(written["bad"]) == 8  # corrupt, truncated, empty files and Thumbs.db
    assert sorted(p for p, _ in dm.skipped_files) == written["bad"]
    assert objects["module"].built.extra["weights_source"].startswith("file:")
    assert objects["trainer"].global_step == 3
    logged = (Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    if "loss=ce" not in variant:
        for term in ("train/r1", "train/r2", "train/s_hat"):
            assert term in logged, term


def test_oxford_pet_mask_runs_end_to_end(tmp_path: Path, cache_dir: Path, oxford_root: Path,
                                         mobilenet_file: Path) -> None:
    saved, _, objects = run_experiment(
        tmp_path, cache_dir, ["experiment=oxford_pet_mask", *tiny_overrides(oxford_root, mobilenet_file)])
    assert objects["datamodule"].has_masks
    for key in ("test/pointing_game", "test/energy_pointing_game", "test/case1_fraction"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert sum(saved[f"test/case{c}_fraction"] for c in range(1, 5)) == pytest.approx(1.0)


def test_vgg16_imagenet_runs_end_to_end(tmp_path: Path, cache_dir: Path, imagenet_root: Path,
                                        vgg16_file: Path) -> None:
    # One short epoch of one batch: the point is the wiring (1000-way labels, features.28 trains).
    overrides = ["experiment=paper_vgg16_imagenet", *tiny_overrides(imagenet_root, vgg16_file),
                 "data.val_fraction=0.25", "data.batch_size=6"]
    cfg = shrink(compose_config(overrides), tmp_path / "run", cache_dir)
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = 1
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1
        cfg.grid_images = 2
    before = torch.load(vgg16_file, weights_only=True)
    metrics, objects = train(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert saved == pytest.approx(metrics) and 0.0 <= saved["test/acc"] <= 1.0
    dm, module = objects["datamodule"], objects["module"]
    assert dm.num_classes == 1000 and module.built.extra["head_replaced"] is False
    assert set(module.trainable_names) == {"features.28.weight", "features.28.bias"}
    after = module.net.state_dict()
    assert not torch.equal(after["features.28.weight"], before["features.28.weight"])
    assert torch.equal(after["features.26.weight"], before["features.26.weight"])
    assert torch.equal(after["classifier.6.weight"], before["classifier.6.weight"])


# --------------------------------------------------------------------------------------------------
# saliency on the real builders' architectures against captum


class _CaptumGuidedWithReLU6(CaptumGuidedBackprop):
    """captum hooks only nn.ReLU; MobileNetV2 uses ReLU6, whose guided rule is the same."""

    def _register_hooks(self, module: nn.Module) -> None:
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            from captum.attr._core.guided_backprop_deconvnet import _register_backward_hook

            self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))


def _no_inplace(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net)
    for m in net.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return net


def _check_against_captum(net: nn.Module, layer: str, x: torch.Tensor) -> None:
    """Raw Grad-CAM and Guided Grad-CAM of ``net`` (in-place activations, as built) equal captum's on
    a copy with out-of-place activations."""
    reference = _no_inplace(net)
    layer_ref = dict(reference.named_modules())[layer]
    method = GradCAM(net, layer, normalize="none")
    out = method(x)
    method.remove()
    expected = LayerGradCam(reference, layer_ref).attribute(x, target=out.targets, relu_attributions=True)
    assert expected.abs().sum() > 0  # a non-trivial map, so the comparison means something
    torch.testing.assert_close(out.raw, expected.squeeze(1).detach())

    method = GuidedGradCAM(net, layer, normalize="none", channel_reduce="none")
    guided = method(x)
    method.remove()
    cam = LayerGradCam(reference, layer_ref).attribute(x, target=guided.targets, relu_attributions=True)
    gb = _CaptumGuidedWithReLU6(reference).attribute(x, target=guided.targets)
    size = tuple(x.shape[-2:])
    torch.testing.assert_close(guided.raw, (gb * F.interpolate(cam, size=size, mode="bilinear",
                                                               align_corners=False)).detach())


def _batch(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_mobilenet_transfer_saliency_matches_captum() -> None:
    torch.manual_seed(0)
    built = mobilenet_v2_transfer(num_classes=2, weights=None)
    net = built.net.double().eval()
    x = _batch(SIZE)
    reference = _no_inplace(net)  # before our hooks hold graph tensors, which deepcopy refuses
    _check_against_captum(net, built.target_layer, x)

    # Second order: the gradients of a loss on the map reach the trainable new conv as captum's do.
    params = [net.new_conv.conv.weight, net.classifier.weight]
    out = GradCAM(net, built.target_layer, normalize="none")(x)
    ours = torch.autograd.grad(out.raw.pow(2).sum(), params)
    ref_map = LayerGradCam(reference, reference.new_conv).attribute(
        x, target=out.targets, relu_attributions=True, grad_kwargs={"create_graph": True})
    theirs = torch.autograd.grad(ref_map.pow(2).sum(), [reference.new_conv.conv.weight, reference.classifier.weight])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_vgg16_block5_conv3_saliency_matches_captum() -> None:
    torch.manual_seed(0)
    built = vgg16(weights=None, target_layer="features.29")  # the experiment's target (post-ReLU)
    _check_against_captum(built.net.double().eval(), built.target_layer, _batch(32))


# --------------------------------------------------------------------------------------------------
# the real command lines (slow)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trustcnn.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


CLI_TINY = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
            "grid_images=2"]


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow
def test_cli_mobilenet_ablation_multirun(tmp_path: Path, pet_root, mobilenet_file: Path) -> None:
    root, _ = pet_root
    sweep = tmp_path / "sweep"
    result = _cli("-m", "experiment=paper_mobilenet_catsdogs", "ablation=none,no_r1,no_r2",
                  *tiny_overrides(root, mobilenet_file), *CLI_TINY, f"paths.cache_dir={tmp_path / 'cache'}",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 3 and all((j / "metrics.json").exists() for j in jobs)
    import yaml

    names = [yaml.safe_load((j / "config.yaml").read_text())["ablation"]["name"] for j in jobs]
    assert names == ["none", "no_r1", "no_r2"]


@pytest.mark.slow
def test_cli_vgg16_grid_runs_nine_jobs(tmp_path: Path, imagenet_root: Path, mobilenet_file: Path) -> None:
    """`-m experiment=paper_vgg16_imagenet` alone runs the 9-job grid. A MobileNetV2 with its 1000-way
    head stands in for VGG-16 (the sweep is what is tested; VGG-16 runs end to end above)."""
    sweep = tmp_path / "sweep"
    result = _cli("-m", "experiment=paper_vgg16_imagenet", *tiny_overrides(imagenet_root, mobilenet_file),
                  "model=torchvision", "model.arch=mobilenet_v2", "model.target_layer=features.18",
                  "data.val_fraction=0.25", *CLI_TINY, f"paths.cache_dir={tmp_path / 'cache'}",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 9 and all((j / "metrics.json").exists() for j in jobs)
    import yaml

    grid = {(c["optim"]["lr"], c["loss"]["lam"]) for c in (yaml.safe_load((j / "config.yaml").read_text()) for j in jobs)}
    assert grid == set(itertools.product([0.01, 0.1, 0.3], [0.9, 0.7, 0.5]))
