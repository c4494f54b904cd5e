"""Shared fixtures: the real Hydra config, composed and shrunk for CPU tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from trustcnn.config_check import CONF_DIR


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


def shrink(cfg: DictConfig, output_dir: Path, cache_dir: Path) -> DictConfig:
    """CPU, one short epoch, a one-epoch pretraining, outputs under tmp dirs."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_train_batches = 3
        cfg.trainer.limit_val_batches = 2
        cfg.trainer.limit_test_batches = 2
        cfg.trainer.enable_progress_bar = False
        cfg.grid_images = 4
        if cfg.model.get("pretrain"):
            cfg.model.pretrain.epochs = 1
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pretraining cache for the whole session (the CE network is made once per config)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    def factory(*overrides: str, output: str = "run") -> DictConfig:
        return shrink(compose_config(list(overrides)), tmp_path / output, cache_dir)

    return factory


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``random_weights(arch)``: a local state-dict file of torchvision ``arch`` with random weights (seed 0),
    written once per session and shared by every test file (VGG-16's is ~528 MB)."""
    folder = tmp_path_factory.mktemp("random_weights")
    made: dict[str, Path] = {}

    def file_for(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            path = folder / f"{arch}_random.pth"
            torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
            made[arch] = path
        return made[arch]

    return file_for


#: The models of the study fixture: distinctive names, so a test can check that no page shows them.
STUDY_MODELS = {"baseline_ce": ["loss=ce"], "trust_lam05": ["loss.lam=0.5"], "trust_mask_model": ["loss=trust_mask"]}


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A study of 6 questions built by the real `python -m trustcnn.study build` from three tiny decoy-digit runs
    (cross-entropy baseline, trust loss, mask loss). Tests keep their answers in their own databases (`--db`)."""
    from trustcnn.study.__main__ import main as study_main
    from trustcnn.train import train

    root = tmp_path_factory.mktemp("study")
    for name, overrides in STUDY_MODELS.items():
        cfg = shrink(compose_config(overrides), root / name, cache_dir)
        with open_dict(cfg):
            cfg.data.batch_size = 64
            cfg.trainer.limit_train_batches = 2
            cfg.trainer.limit_val_batches = 1
            cfg.trainer.limit_test_batches = 1
            cfg.grid_images = 2
        train(cfg)
    names = list(STUDY_MODELS)
    study_main(["build", "--baseline", str(root / names[0]), "--runs", *(str(root / n) for n in names[1:]),
                "--names", *names, "--questions", "6", "--seed", "3", "--image-size", "96", "--out",
                str(root / "study"), "--device", "cpu"])
    return root / "study"


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny sweep of tests/tiny_sweep.py (four finished runs, one failed job), trained once per session."""
    from tiny_sweep import make_sweep

    return make_sweep(tmp_path_factory.mktemp("evalreport"))
