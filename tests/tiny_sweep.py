"""A tiny decoy-digits sweep made by the real `train(cfg)`, shared by the evaluate and report tests.

Four tiny runs in a Hydra-multirun-shaped sweep directory (`<sweep>/<num>_<overrides>/` with
`.hydra/overrides.yaml`) and one genuinely failing job (λ = 1.5 raises before training), recorded with
`trustcnn.train._record_failure`. The `sweep` fixture in conftest.py makes it once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import compose_config, shrink
from trustcnn.train import _record_failure, train

# (job dir, overrides); job 0 gets no .hydra/overrides.yaml: the report then takes its settings from config.yaml alone.
JOBS = [
    ("0_loss=ce", ["loss=ce"]),
    ("1_loss.lam=0.5,optim.lr=0.01", ["optim.lr=0.01", "loss.lam=0.5"]),
    ("2_loss.lam=0.9,optim.lr=0.01", ["optim.lr=0.01", "loss.lam=0.9"]),
    ("3_loss=trust_mask,loss.lam=0.5,optim.lr=0.001", ["loss=trust_mask", "optim.lr=0.001", "loss.lam=0.5"]),
]
FAILED = ("4_loss.lam=1.5,optim.lr=0.001", ["optim.lr=0.001", "loss.lam=1.5"])


def tiny_cfg(overrides: list[str], output_dir: Path, cache_dir: Path):
    cfg = shrink(compose_config(overrides), output_dir, cache_dir)
    with open_dict(cfg):
        cfg.data.batch_size = 64
        cfg.trainer.limit_train_batches = 2
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1  # the test metrics cover the first 64 test images
        cfg.grid_images = 2
    return cfg


def make_sweep(root: Path) -> Path:
    """Train the sweep into ``root / "sweep"`` and return that directory."""
    sweep_dir, cache = root / "sweep", root / "cache"
    for name, overrides in JOBS:
        job = sweep_dir / name
        train(tiny_cfg(overrides, job, cache))
        if not name.startswith("0_"):
            (job / ".hydra").mkdir()
            (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    name, overrides = FAILED
    cfg = tiny_cfg(overrides, sweep_dir / name, cache)
    try:
        train(cfg)
    except ValueError as err:
        _record_failure(cfg, err)
    else:
        pytest.fail("loss.lam=1.5 should fail before training")
    (sweep_dir / name / ".hydra").mkdir()
    (sweep_dir / name / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    return sweep_dir


def job(sweep: Path, num: int) -> Path:
    return sweep / (JOBS + [FAILED])[num][0]

