"""Reading a sweep directory: every job (through :func:`trustcnn.sweep.read_job`, the one reader of a job
directory) with the settings of its resolved config and its ``run.json``, and the sweep's evaluation.

Nothing here builds a datamodule or loads a model: the report aggregates the files the runs and
``trustcnn.evaluate`` wrote.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from trustcnn.checkpoints import read_run_record
from trustcnn.sweep import EVALUATION_DIR, job_dirs, read_job

log = logging.getLogger("trustcnn.report")

#: Config values read from each job's resolved ``config.yaml`` (column name -> dotted key).
KEY_CONFIG: dict[str, str] = {
    "loss": "loss.name",
    "lam": "loss.lam",
    "weight": "loss.weight",
    "form": "loss.form",
    "lr": "optim.lr",
    "ablation": "ablation.name",
    "saliency": "saliency.method",
    "seed": "seed",
}
EVALUATION_JSON = "evaluation.json"


@dataclass
class JobResult:
    """One job of a sweep.

    Attributes:
        job: the job directory relative to the sweep directory.
        path: the job directory.
        num: Hydra's job number (``None`` if unknown).
        overrides: the job's command-line overrides (``.hydra/overrides.yaml``), ``key -> value`` (keys keep
            Hydra's ``+``/``++``).
        config: :data:`KEY_CONFIG` values (``None`` where the config lacks the key, e.g. λ for ``loss=ce``).
        metrics: the job's ``metrics.json``.
        status: ``"ok"`` (finished), ``"failed"`` (an error, an unreadable file, or not finished), or
            ``"duplicate"`` (``duplicate.json``: another job of the sweep ran its configuration, which differs only
            in settings that do not apply to its loss; :attr:`duplicate_of` names that job).
        error: the error of a failed job (one line of ``error.json``, else why it counts as failed).
        test_size: test images the metrics were computed on (``run.json``'s ``test_images``), when recorded.
        num_classes: classes of the job's data (``run.json``'s ``num_classes``), when recorded.
        cfg: the job's resolved config, or ``None``.
        run: the job's ``run.json`` (tested checkpoint, its epoch, ``optimized_metric`` and mode), or ``{}``.
        duplicate_of: for a duplicate, the job that ran its configuration.
    """

    job: str
    path: Path
    num: int | None
    overrides: dict[str, str]
    config: dict[str, Any]
    metrics: dict[str, float]
    status: str
    error: str | None = None
    test_size: int | None = None
    num_classes: int | None = None
    cfg: DictConfig | None = field(default=None, repr=False)
    run: dict[str, Any] = field(default_factory=dict, repr=False)
    duplicate_of: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def label(self) -> str:
        """The job number, else its directory."""
        return str(self.num) if self.num is not None else self.job


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key] = value
    return out


def _load_config(job_dir: Path) -> DictConfig | None:
    for path in (job_dir / "config.yaml", job_dir / ".hydra" / "config.yaml"):
        if path.exists():
            try:
                return OmegaConf.load(path)  # type: ignore[return-value]
            except Exception as err:  # noqa: BLE001 - a broken file must not hide the other jobs
                log.warning("cannot read %s: %s", path, err)
    return None


def select(cfg: DictConfig | None, key: str) -> Any:
    """``cfg``'s value at the dotted ``key`` (``None`` when absent or unresolvable; sections as plain dicts)."""
    if cfg is None:
        return None
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig) else value


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_job_result(job_dir: Path, sweep: Path) -> JobResult:
    """One job directory as the report sees it (see :class:`JobResult`)."""
    job = read_job(job_dir)
    # A refused job keeps a finished run consistent with its restored config.yaml: a result like any other.
    finished = job.status == "finished" or (job.status == "refused" and bool(job.metrics))
    status = "ok" if finished else "duplicate" if job.status == "duplicate" else "failed"
    cfg = _load_config(job_dir)
    run = read_run_record(job_dir) or {}
    return JobResult(
        job=job_dir.relative_to(sweep).as_posix(), path=job_dir, num=job.num,
        overrides=_parse_overrides(job.overrides), config={col: select(cfg, key) for col, key in KEY_CONFIG.items()},
        metrics=job.metrics if finished else {}, status=status, error=None if finished else job.error,
        test_size=_count(run.get("test_images")), num_classes=_count(run.get("num_classes")), cfg=cfg, run=run,
        duplicate_of=job.duplicate_of,
    )


def collect_sweep(sweep_dir: str | Path) -> list[JobResult]:
    """Every job of a sweep directory, finished or not, ordered by job number.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist or holds no job directory.
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep} is not a directory; pass the sweep directory of `python -m trustcnn.train -m` "
                                "(e.g. outputs/train/multiruns/<time>, or the hydra.sweep.dir you set).")
    jobs = [read_job_result(d, sweep) for d in job_dirs(sweep)]
    if not jobs:
        raise FileNotFoundError(f"No job directory under {sweep} (none holds metrics.json, error.json, config.yaml or "
                                ".hydra/overrides.yaml); pass the sweep directory of `python -m trustcnn.train -m`.")
    return jobs


def evaluation_dir(sweep_dir: str | Path) -> Path:
    """``<sweep dir>/evaluation``: where the report tells ``python -m trustcnn.evaluate`` to write."""
    return Path(sweep_dir) / EVALUATION_DIR


def read_evaluation(sweep_dir: str | Path) -> dict[str, Any] | None:
    """``<sweep dir>/evaluation/evaluation.json`` (``None`` when absent).

    Raises:
        ValueError: the file exists but is not a JSON object with ``models`` (a broken or foreign file).
    """
    path = evaluation_dir(sweep_dir) / EVALUATION_JSON
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun the evaluate command the report names, or "
                         "remove the file.") from err
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ValueError(f"{path} has no 'models' section: not written by `python -m trustcnn.evaluate`; rerun it, "
                         "or remove the file.")
    return data
