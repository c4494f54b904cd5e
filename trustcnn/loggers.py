"""The W&B group and run name of a job, as config resolvers (``conf/logger/wandb.yaml``).

Registered when ``trustcnn`` is imported (before any config is resolved), so this module imports no Lightning.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


def _multirun_job() -> DictConfig | None:
    """The Hydra config of this job when it is a job of a multirun, else ``None``."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def wandb_group(output_dir: str) -> str:
    """``${trustcnn.wandb_group:<output dir>}``: the W&B group of a job. All jobs of a multirun share the
    name of its sweep directory; a single run is a group of its own (its directory's name)."""
    hc = _multirun_job()
    return Path(hc.sweep.dir).name if hc is not None else Path(output_dir).name


def wandb_name(output_dir: str) -> str:
    """``${trustcnn.wandb_name:<output dir>}``: the W&B run name of a job: its overrides in a multirun (the
    job directory is only a number), else its directory's name."""
    hc = _multirun_job()
    return (hc is not None and hc.job.override_dirname) or Path(output_dir).name


def register_resolvers() -> None:
    """Register ``${trustcnn.wandb_group:...}`` and ``${trustcnn.wandb_name:...}`` (idempotent)."""
    for name, resolver in (("trustcnn.wandb_group", wandb_group), ("trustcnn.wandb_name", wandb_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
