"""Aggregate a Hydra multirun of ``python -m trustcnn.train -m`` into paper-style tables and plots.

``python -m trustcnn.report <sweep dir> [--out DIR] [--metric val/acc] [--mode max|min] [--evaluate]`` writes
(into the sweep dir unless ``--out``):

* ``results.csv``: one row per job — status, overrides, key config values, every metric, the error;
* ``report.md``: Table 1 (accuracy / precision / recall per model = loss × saliency, and ablation; mean ± std
  over seeds), Table 2 (the same with 95% CIs), Table 3 (the case table of the best job and the baseline:
  from their ``metrics.json``, else — with ``--evaluate`` — computed by :mod:`trustcnn.evaluate`),
  the reference levels (a uniform map's energy pointing game, chance accuracy and decoy-following rate),
  test-time localization metrics, the paired per-seed differences of every model against cross-entropy (see
  :func:`paired_differences`), the list of every job and a **Failed jobs** section. ``--evaluate`` also
  runs the full evaluation of the best job against the baseline (``<out>/evaluation/``) and appends it;
* ``paired_differences.csv``: those paired differences, one row per model and metric;
* ``heatmap_<metric>.png``: the selection metric, and ``test/acc``, over the lr × λ grid (only when the sweep
  varies both; ``/`` in the name becomes ``_``);
* ``saliency_best_vs_baseline.png``: maps of the best job next to the baseline's (``loss=ce``) job.

The best job (and, among ``loss=ce`` jobs, the baseline) is picked by a validation metric, never a test metric
(that would select on the test set, and the test numbers of the pick would be optimistic): by default the
jobs' ``optimized_metric`` (``val/acc``), in the mode their checkpoint callback used (see
:func:`trustcnn.checkpoints.metric_mode`), else ``--metric`` / ``--mode``. A job's value is its
``metrics.json`` entry under the metric's own name — the value at the checkpoint that was tested; runs made
before that was recorded (no ``tested_epoch``) tested their best checkpoint, so their ``best_<metric>`` is
used, with a note. A test metric as ``--metric`` is an error; test metrics stay in every table.

Jobs are grouped by every varied setting except ``seed``, so seeds are the repetitions a group's mean,
std and CI are taken over. Confidence intervals (Table 2): with >= 2 seeds, the t-interval over seeds
``mean ± t(0.975, k-1)·sd/√k``; with one seed, the Wilson interval of the metric as a proportion of the
``n`` test images the job was tested on (exact for accuracy; an approximation for macro precision /
recall, which are not one binomial proportion). ``n`` is the size of the first test set of the job's data
config, reduced by ``trainer.limit_test_batches``; when it cannot be determined the cell shows the value only.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from trustcnn.checkpoints import metric_mode, read_run_record

# trustcnn.metrics (torch) is imported where it is used: --help and argument errors answer without it.

log = logging.getLogger("trustcnn.report")

#: Config values read from each job's resolved ``config.yaml`` (column name -> dotted key).
KEY_CONFIG: dict[str, str] = {
    "loss": "loss.name",
    "lam": "loss.lam",
    "form": "loss.form",
    "lr": "optim.lr",
    "ablation": "ablation.name",
    "saliency": "saliency.method",
    "seed": "seed",
}
# Override keys already described by KEY_CONFIG (config-group choices and the keys themselves).
_COVERED_OVERRIDES = {"loss", "ablation", "saliency", "seed", *KEY_CONFIG.values()}
CLASSIFICATION = ("test/acc", "test/precision", "test/recall")
# The uniform map's energy pointing game sits next to the methods' (the level a trivial map reaches).
LOCALIZATION = ("test/pointing_game", "test/energy_pointing_game", "test/energy_pointing_game_uniform", "test/s_hat",
                "test/decoy_following_rate", "test_consistent/acc")
#: Metrics compared as paired per-seed differences against the loss=ce job (each only when present).
PAIRED = ("test/acc", "test/energy_pointing_game", "test/pointing_game", "test/decoy_following_rate",
          "test_consistent/acc")
_JOB_MARKERS = ("metrics.json", "error.json", "duplicate.json", "config.yaml", ".hydra/overrides.yaml")
_SKIP_DIRS = {".hydra", "checkpoints", "csv", "wandb", "evaluation"}


@dataclass
class JobResult:
    """One job of a sweep.

    Attributes:
        job: the job directory relative to the sweep directory.
        num: Hydra's job number (``None`` if unknown).
        overrides: the job's command-line overrides, ``key -> value`` (keys keep Hydra's ``+``/``++``).
        config: :data:`KEY_CONFIG` values (``None`` where the config lacks the key, e.g. λ for ``loss=ce``).
        metrics: the job's ``metrics.json``.
        status: ``"ok"`` (has metrics.json), ``"failed"``, or ``"duplicate"`` (``duplicate.json``: another job of
            the sweep ran its configuration, which differs only in settings that do not apply to its loss;
            ``extra["duplicate_of"]`` names that job).
        error: the error of a failed job (from ``error.json``, else why it counts as failed).
        test_size: test images the metrics were computed on, when known.
        extra: anything else read from the job directory (``cfg``: its loaded config, or ``None``).
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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _find_job_dirs(sweep: Path) -> list[Path]:
    """Job directories under ``sweep``: a directory holding any of :data:`_JOB_MARKERS`.

    The search is recursive for sweeps made before job directories were named by job number alone
    (``hydra.sweep.subdir``): an override value with a ``/`` in ``override_dirname`` nested them.
    """
    found: list[Path] = []

    def walk(d: Path) -> None:
        if any((d / m).exists() for m in _JOB_MARKERS):
            found.append(d)
            return
        for child in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS):
            walk(child)

    for child in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS):
        walk(child)
    return found


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key] = value
    return out


def _overrides_from_name(rel: str) -> dict[str, str]:
    """Fallback when ``.hydra/overrides.yaml`` is missing: ``<num>_k=v,k=v`` (values with ``,`` are ambiguous)."""
    name = re.sub(r"^\d+_", "", rel)
    out: dict[str, str] = {}
    key = None
    for part in name.split(","):
        k, sep, v = part.partition("=")
        if sep:
            key = k
            out[k] = v
        elif key is not None:  # a comma inside a value
            out[key] += "," + part
    return out


def _load_config(job_dir: Path) -> DictConfig | None:
    for path in (job_dir / "config.yaml", job_dir / ".hydra" / "config.yaml"):
        if path.exists():
            try:
                return OmegaConf.load(path)
            except Exception as err:  # noqa: BLE001 - a broken file must not hide the other jobs
                log.warning("cannot read %s: %s", path, err)
    return None


def _select(cfg: DictConfig | None, key: str) -> Any:
    if cfg is None:
        return None
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig) else value


def _job_num(job_dir: Path, rel: str) -> int | None:
    match = re.match(r"(\d+)_", rel) or re.fullmatch(r"(\d+)", rel.split("/")[0])
    if match:
        return int(match.group(1))
    hydra_file = job_dir / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        num = _select(OmegaConf.load(hydra_file), "hydra.job.num")
        return int(num) if num is not None else None
    return None


def collect_sweep(sweep_dir: str | Path) -> list[JobResult]:
    """Every job of a sweep directory, finished or not, ordered by job number.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist or holds no job directory.
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep} is not a directory; pass the sweep directory of `python -m trustcnn.train -m` "
                                "(e.g. outputs/train/multiruns/<time>, or the hydra.sweep.dir you set).")
    jobs: list[JobResult] = []
    for job_dir in _find_job_dirs(sweep):
        rel = job_dir.relative_to(sweep).as_posix()
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if overrides_file.exists():
            overrides = _parse_overrides(OmegaConf.to_container(OmegaConf.load(overrides_file)) or [])
        else:
            overrides = _overrides_from_name(rel)
        cfg = _load_config(job_dir)
        config = {col: _select(cfg, key) for col, key in KEY_CONFIG.items()}
        metrics: dict[str, float] = {}
        error = None
        metrics_file, error_file = job_dir / "metrics.json", job_dir / "error.json"
        if error_file.exists():
            try:
                error = json.loads(error_file.read_text()).get("error") or "unknown error (error.json has no 'error')"
            except json.JSONDecodeError as err:
                error = f"unreadable error.json: {err}"
        if metrics_file.exists():
            try:
                metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()}
            except (json.JSONDecodeError, TypeError, ValueError) as err:
                error = error or f"unreadable metrics.json: {err}"
        elif error is None:
            error = "no metrics.json and no error.json: the job did not finish (still running, or killed)"
        status = "ok" if metrics and error is None else "failed"
        extra: dict[str, Any] = {"cfg": cfg}
        duplicate_file = job_dir / "duplicate.json"
        if duplicate_file.exists() and not error_file.exists() and not metrics_file.exists():
            try:
                extra["duplicate_of"] = str((json.loads(duplicate_file.read_text()).get("duplicate_of") or {})
                                            .get("job"))
                status, error = "duplicate", None
            except json.JSONDecodeError as err:
                error = f"unreadable duplicate.json: {err}"
        jobs.append(JobResult(rel, job_dir, _job_num(job_dir, rel), overrides, config, metrics, status, error,
                              extra=extra))
    if not jobs:
        raise FileNotFoundError(f"No job directory under {sweep} (none holds metrics.json, error.json, config.yaml or "
                                ".hydra/overrides.yaml); pass the sweep directory of `python -m trustcnn.train -m`.")
    jobs.sort(key=lambda j: (j.num is None, j.num if j.num is not None else 0, j.job))
    return jobs


def tested_image_count(cfg: DictConfig | None) -> int | None:
    """Images a run was tested on: its data's first test set, cut by ``trainer.limit_test_batches``.

    Instantiates the datamodule of the run's resolved config (cheap for decoy digits; scans files for the
    image folders). ``None`` when that fails (e.g. the data is not on this machine).
    """
    if cfg is None or "data" not in cfg:
        return None
    from hydra.utils import instantiate

    try:
        datamodule = instantiate(cfg.data)
        loader = datamodule.main_test_dataloader()
        n, batch = len(loader.dataset), int(loader.batch_size or 1)
    except Exception as err:  # noqa: BLE001 - the report goes on without CIs from the test size
        log.warning("cannot determine the test-set size (%s: %s)", type(err).__name__, err)
        return None
    limit = _select(cfg, "trainer.limit_test_batches")
    batches = math.ceil(n / batch)
    if isinstance(limit, bool) or limit is None:
        return n
    if isinstance(limit, int):
        return min(n, limit * batch)
    return min(n, int(batches * float(limit)) * batch)


def data_num_classes(cfg: DictConfig | None) -> int | None:
    """Classes of a run's data: the ``num_classes`` its datamodule sets when built from ``cfg.data``.

    The data configs do not spell it out (each datamodule fixes it in ``__init__``, which reads no data).
    ``None`` when the config has no ``data`` section or the datamodule cannot be built here.
    """
    if cfg is None or "data" not in cfg:
        return None
    from hydra.utils import instantiate

    try:
        num = getattr(instantiate(cfg.data), "num_classes", None)
    except Exception as err:  # noqa: BLE001 - the report goes on without chance levels
        log.warning("cannot determine the number of classes (%s: %s)", type(err).__name__, err)
        return None
    return int(num) if num is not None else None


def _attach_test_sizes(jobs: list[JobResult]) -> None:
    """``job.test_size`` and ``job.extra["num_classes"]`` of the finished jobs (each data config looked up once)."""
    cache: dict[str, int | None] = {}
    classes: dict[str, int | None] = {}
    for job in jobs:
        cfg = job.extra.get("cfg")
        if not job.ok or cfg is None:
            continue
        key = OmegaConf.to_yaml({"data": cfg.get("data"), "limit": _select(cfg, "trainer.limit_test_batches")})
        if key not in cache:
            cache[key] = tested_image_count(cfg)
        job.test_size = cache[key]
        data_key = OmegaConf.to_yaml({"data": cfg.get("data")})
        if data_key not in classes:
            classes[data_key] = data_num_classes(cfg)
        job.extra["num_classes"] = classes[data_key]


def _fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# Settings of the trust losses that mean nothing for the loss=ce baseline.
_TRUST_ONLY = ("ablation", "lam", "form")


def _setting(job: JobResult, column: str) -> Any:
    if job.config.get("loss") == "ce" and column in _TRUST_ONLY:
        return None
    return job.config.get(column)


def varying_keys(jobs: list[JobResult]) -> tuple[list[str], list[str]]:
    """``(config columns, extra override keys)`` whose values differ between jobs (``seed`` excluded).

    A trust-loss setting (λ, form, ablation) varies only if it differs between trust-loss jobs.
    """
    config_cols = [c for c in KEY_CONFIG if c != "seed"
                   and len({_fmt_value(_setting(j, c)) for j in jobs if _setting(j, c) is not None}) > 1]
    keys = sorted({k for j in jobs for k in j.overrides})
    extra = [k for k in keys if k.lstrip("+~") not in _COVERED_OVERRIDES
             and len({j.overrides.get(k) for j in jobs}) > 1]
    return config_cols, extra


def _group_key(job: JobResult, config_cols: list[str], extra: list[str]) -> tuple[tuple[str, str], ...]:
    """Setting of a job that defines its group (model): loss × saliency, ablation, and every varied key."""
    cols = ["loss", "saliency", "ablation", *[c for c in config_cols if c not in ("loss", "saliency", "ablation")]]
    items = [(c, _fmt_value(_setting(job, c))) for c in cols]
    items += [(k, _fmt_value(job.overrides.get(k))) for k in extra]
    return tuple(items)


def group_jobs(jobs: list[JobResult]) -> dict[tuple[tuple[str, str], ...], list[JobResult]]:
    """Finished jobs grouped by every varied setting except the seed."""
    ok = [j for j in jobs if j.ok]
    config_cols, extra = varying_keys(jobs)
    groups: dict[tuple[tuple[str, str], ...], list[JobResult]] = defaultdict(list)
    for job in ok:
        groups[_group_key(job, config_cols, extra)].append(job)
    return dict(groups)


def _values(group: list[JobResult], metric: str, value: Callable[[JobResult], float] | None = None) -> np.ndarray:
    v = np.array([value(j) if value else j.metrics.get(metric, math.nan) for j in group], dtype=np.float64)
    return v[np.isfinite(v)]


def mean_std(group: list[JobResult], metric: str) -> str:
    v = _values(group, metric)
    if v.size == 0:
        return "—"
    if v.size == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def confidence_interval(group: list[JobResult], metric: str) -> tuple[float, float, float, str]:
    """``(mean, low, high, method)``: t-interval over seeds, else Wilson over the test images, else no CI."""
    from trustcnn.metrics import wilson_interval
    from trustcnn.metrics.stats import mean_estimate

    v = _values(group, metric)
    if v.size == 0:
        return math.nan, math.nan, math.nan, "—"
    mean = float(v.mean())
    if v.size >= 2:
        est = mean_estimate(v)
        return est.value, est.ci_low, est.ci_high, f"t, {v.size} seeds"
    n = group[0].test_size
    if n and 0.0 <= mean <= 1.0:
        low, high = wilson_interval(mean * n, n)
        return mean, low, high, f"Wilson, n={n}"
    return mean, math.nan, math.nan, "no CI"


def _fmt_ci(mean: float, low: float, high: float) -> str:
    if not math.isfinite(mean):
        return "—"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _model_cells(key: tuple[tuple[str, str], ...]) -> tuple[str, list[str], list[str]]:
    """``(model = loss × saliency, setting column names, setting values)`` of a group key."""
    d = dict(key)
    model = f"{d.pop('loss')} × {d.pop('saliency')}"
    return model, list(d), list(d.values())


def _seeds(group: list[JobResult]) -> str:
    seeds = sorted({_fmt_value(j.config.get("seed")) for j in group})
    return f"{len(group)}" + (f" ({', '.join(seeds)})" if len(group) > 1 else "")


def _metric_table(groups: dict, metrics: Sequence[str], cell) -> list[str]:
    if not groups:
        return ["No finished job.", ""]
    first = next(iter(groups))
    _, setting_cols, _ = _model_cells(first)
    header = ["model", *setting_cols, "jobs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in sorted(groups.items(), key=lambda kv: (dict(kv[0])["loss"] != "ce", kv[0])):
        model, _, values = _model_cells(key)
        lines.append("| " + " | ".join([model, *values, _seeds(group), *[cell(group, m) for m in metrics]]) + " |")
    return lines + [""]


def is_test_metric(metric: str) -> bool:
    """Whether ``metric`` is measured on a test set: its prefix before ``/`` starts with ``test``
    (``test/acc``, ``test_consistent/acc``; also behind ``best_``). ``tested_epoch`` / ``tested_step`` are not."""
    head = metric.removeprefix("best_").split("/", 1)[0]
    return head.startswith("test") and not head.startswith("tested")


def _refuse_test_metric(metric: str) -> None:
    if is_test_metric(metric):
        raise ValueError(f"{metric!r} is a test metric: picking the best job by it selects on the test set; choose "
                         "a validation metric such as val/acc (the runs' optimized_metric), e.g. --metric val/acc. "
                         "Test metrics are still reported in every table, results.csv and the test/acc heatmap.")


def _optimized_metric(job: JobResult) -> str | None:
    """The job's ``optimized_metric``: its resolved config, else its ``run.json``."""
    value = _select(job.extra.get("cfg"), "optimized_metric")
    if value is None:
        value = (read_run_record(job.path) or {}).get("optimized_metric")
    return str(value) if value is not None else None


def _explicit_mode(job: JobResult, metric: str) -> str | None:
    """The mode the job's checkpoint callback was told for ``metric`` (``None``: not given, or ``metric`` is not
    the job's optimized_metric): ``callbacks.model_checkpoint.mode`` of its config, else ``run.json``'s
    ``optimized_mode`` (the mode training actually used)."""
    if _optimized_metric(job) != metric:
        return None
    mode = _select(job.extra.get("cfg"), "callbacks.model_checkpoint.mode")
    if mode is None:
        record = read_run_record(job.path) or {}
        if record.get("optimized_metric") == metric:
            mode = record.get("optimized_mode")
    return str(mode) if mode is not None else None


def selection_rule(jobs: list[JobResult], metric: str | None = None, mode: str | None = None) -> tuple[str, str]:
    """``(metric, mode)`` that rank the jobs of a sweep.

    ``metric`` defaults to the finished jobs' ``optimized_metric`` (all jobs' when none finished); ``mode`` to
    :func:`trustcnn.checkpoints.metric_mode` of the metric and, when it is the optimized metric, the jobs'
    ``callbacks.model_checkpoint.mode`` — the rule their checkpoints were picked by.

    Raises:
        ValueError: the jobs disagree on ``optimized_metric`` or on its mode (pass ``metric`` / ``mode``), none
            declares one, or the metric is a test metric (selecting on it would select on the test set).
    """
    ok = [j for j in jobs if j.ok]
    if metric is None:
        declared = sorted({m for j in (ok or jobs) if (m := _optimized_metric(j)) is not None})
        if len(declared) > 1:
            raise ValueError(f"The jobs disagree on optimized_metric ({', '.join(declared)}), so the metric that picks "
                             "the best job is ambiguous; pass --metric (e.g. --metric val/acc).")
        if not declared:
            if ok:
                raise ValueError("No finished job's config.yaml (or run.json) names an optimized_metric to pick the "
                                 "best job by; pass --metric (e.g. --metric val/acc).")
            declared = ["val/acc"]  # nothing to rank: any validation metric does for the failed-jobs report
        metric = declared[0]
    _refuse_test_metric(metric)
    if mode is None:
        explicit = sorted({m for j in (ok or jobs) if (m := _explicit_mode(j, metric)) is not None})
        if len(explicit) > 1:
            raise ValueError(f"The jobs' checkpoint modes for {metric!r} disagree ({', '.join(explicit)}); "
                             "pass --mode max or --mode min.")
        mode = metric_mode(metric, explicit[0] if explicit else None)
    return metric, metric_mode(metric, mode)  # validates an explicit mode


def selection_value(job: JobResult, metric: str) -> tuple[float, str | None]:
    """``(value, key read)`` of ``metric`` for ranking ``job``: its ``metrics.json`` value under the metric's own
    name (new runs record the validation metrics at the tested checkpoint), else — for runs made before that,
    which have no ``tested_epoch`` and tested their best checkpoint — ``best_<metric>``. ``(nan, None)`` when the
    job has neither (or a non-finite value): it cannot be ranked."""
    value = job.metrics.get(metric, math.nan)
    if math.isfinite(value):
        return value, metric
    best = job.metrics.get(f"best_{metric}", math.nan)
    if not metric.startswith("best_") and "tested_epoch" not in job.metrics and math.isfinite(best):
        return best, f"best_{metric}"
    return math.nan, None


def _ranked(jobs: list[JobResult], metric: str, mode: str) -> list[JobResult]:
    """``jobs`` best first by :func:`selection_value`; unrankable jobs last, ties in the given (job) order."""
    def key(indexed: tuple[int, JobResult]) -> tuple[bool, float, int]:
        value = selection_value(indexed[1], metric)[0]
        if not math.isfinite(value):
            return True, 0.0, indexed[0]
        return False, -value if mode == "max" else value, indexed[0]

    return [j for _, j in sorted(enumerate(jobs), key=key)]


def pick_best(jobs: list[JobResult], metric: str, mode: str | None = None) -> JobResult | None:
    """The finished job with the best :func:`selection_value` of ``metric`` (``mode``: ``"max"``/``"min"``,
    default from the metric's name); a non-baseline job when there is one; ties go to the lower job number.

    Raises:
        ValueError: ``metric`` is a test metric.
    """
    _refuse_test_metric(metric)
    mode = metric_mode(metric, mode)
    scored = [j for j in jobs if j.ok and math.isfinite(selection_value(j, metric)[0])]
    trained = [j for j in scored if j.config.get("loss") != "ce"] or scored
    return _ranked(trained, metric, mode)[0] if trained else None


def pick_baseline(jobs: list[JobResult], best: JobResult | None, metric: str,
                  mode: str | None = None) -> JobResult | None:
    """A finished ``loss=ce`` job, preferring the best job's saliency method (maps are only comparable
    with the same method), then its seed, then the best :func:`selection_value` of ``metric`` under ``mode``
    (a job without one still serves as the baseline, after those with one).

    Raises:
        ValueError: ``metric`` is a test metric.
    """
    _refuse_test_metric(metric)
    mode = metric_mode(metric, mode)
    ce = [j for j in jobs if j.ok and j.config.get("loss") == "ce"]
    if not ce:
        return None
    if best is not None:
        for key in ("saliency", "seed"):
            ce = [j for j in ce if j.config.get(key) == best.config.get(key)] or ce
    return _ranked(ce, metric, mode)[0]


def _nums(jobs: list[JobResult]) -> str:
    return ", ".join(str(j.num) if j.num is not None else j.job for j in jobs)


def _tested_epoch(job: JobResult) -> int | None:
    value = job.metrics.get("tested_epoch")
    if value is None:
        value = (read_run_record(job.path) or {}).get("tested_epoch")
    try:
        return int(value) if value is not None and math.isfinite(float(value)) else None
    except (TypeError, ValueError):
        return None


def _selectable_metrics(jobs: list[JobResult]) -> list[str]:
    """Metric names finished jobs can be ranked by (no test metric, no checkpoint record)."""
    names = {k for j in jobs if j.ok for k in j.metrics if not is_test_metric(k) and not k.startswith("tested")}
    names |= {k.removeprefix("best_") for j in jobs if j.ok for k in j.metrics
              if k.startswith("best_") and selection_value(j, k.removeprefix("best_"))[1] == k}
    return sorted(names)


def _case_table_from_metrics(job: JobResult) -> dict[str, float] | None:
    for prefix in ("test/", ""):
        if f"{prefix}case1_fraction" in job.metrics:
            return {k[len(prefix):]: v for k, v in job.metrics.items() if k.startswith(prefix)}
    return None


def _case_table_lines(tables: dict[str, dict[str, float]]) -> list[str]:
    from trustcnn.metrics import CASE_NAMES

    names = list(tables)
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in range(1, 5):
        cells = []
        for n in names:
            t = tables[n]
            cells.append(_fmt_ci(t[f"case{c}_fraction"], t.get(f"case{c}_ci_low", math.nan),
                                 t.get(f"case{c}_ci_high", math.nan))
                         + (f" ({int(t[f'case{c}_count'])})" if f"case{c}_count" in t else ""))
        lines.append(f"| {c}: {CASE_NAMES[c]} | " + " | ".join(cells) + " |")
    return lines + [""]


# ------------------------------------------------------------------ paired differences vs. cross-entropy

GroupKey = tuple[tuple[str, str], ...]


@dataclass
class BaselinePairs:
    """Each non-``ce`` job matched with its ``loss=ce`` job (see :func:`pair_with_baseline`).

    Attributes:
        pairs: group key (as :func:`group_jobs`) -> ``[(job, ce job), ...]``; groups with no pair are absent.
        unpaired: ``(job, why)`` for every finished non-``ce`` job without a ``ce`` partner.
        matched_on: the settings a pair shares: ``seed``, ``saliency``, and whatever the ``ce`` jobs vary.
    """

    pairs: dict[GroupKey, list[tuple[JobResult, JobResult]]]
    unpaired: list[tuple[JobResult, str]]
    matched_on: list[str]


def _pairing_key(job: JobResult, cols: list[str], extra: list[str]) -> GroupKey:
    items = [("seed", _fmt_value(job.config.get("seed"))), ("saliency", _fmt_value(job.config.get("saliency")))]
    items += [(c, _fmt_value(_setting(job, c))) for c in cols]
    return tuple(items + [(k, _fmt_value(job.overrides.get(k))) for k in extra])


def pair_with_baseline(jobs: list[JobResult]) -> BaselinePairs:
    """Pair every finished non-``ce`` job with the finished ``loss=ce`` job of the same seed and saliency method.

    Same seed: the same data split, decoys and initialization, so the difference is the loss's effect without
    the seed-to-seed variation of the test set. Same method: maps of different methods are not comparable.
    A setting the finished ``ce`` jobs vary (e.g. ``optim.lr``) must match too; one they do not vary (λ, form,
    ablation, or an lr only the trust jobs sweep) is not matched, so every such job pairs with the one ``ce``
    job of its seed and method. A job with no ``ce`` partner, or several (duplicate runs), stays unpaired.
    """
    ce = [j for j in jobs if j.ok and j.config.get("loss") == "ce"]
    cols, extra = varying_keys(ce)  # trust-only settings are None for ce jobs, so never among them
    cols = [c for c in cols if c not in ("loss", "saliency")]
    by_key: dict[GroupKey, list[JobResult]] = defaultdict(list)
    for j in ce:
        by_key[_pairing_key(j, cols, extra)].append(j)
    pairs: dict[GroupKey, list[tuple[JobResult, JobResult]]] = {}
    unpaired: list[tuple[JobResult, str]] = []
    groups = group_jobs(jobs)
    for key in sorted(groups):
        if dict(key)["loss"] == "ce":
            continue
        for job in groups[key]:
            match = _pairing_key(job, cols, extra)
            where = ", ".join(f"{k}={v}" for k, v in match)
            partners = by_key.get(match, [])
            if job.config.get("seed") is None:
                unpaired.append((job, "its seed is unknown (no config.yaml)"))
            elif len(partners) == 1:
                pairs.setdefault(key, []).append((job, partners[0]))
            elif not partners:
                unpaired.append((job, f"no finished loss=ce job with {where}"))
            else:
                unpaired.append((job, f"{len(partners)} finished loss=ce jobs ({_nums(partners)}) have {where}"))
    return BaselinePairs(pairs, unpaired, ["seed", "saliency", *cols, *extra])


def paired_differences(jobs: list[JobResult], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean paired difference (job − its ``loss=ce`` job, see :func:`pair_with_baseline`) per group and metric.

    Args:
        jobs: the sweep's jobs (:func:`collect_sweep`).
        metrics: metrics to compare (default: those of :data:`PAIRED` some finished job has). A pair counts
            for a metric only when both jobs have a finite value of it.

    Returns:
        One dict per (non-``ce`` group with a pair, metric with a pair), groups in table order: ``group`` (the
        :func:`group_jobs` key), ``model`` (loss × saliency), ``settings`` (the other group settings), ``metric``,
        ``n`` (pairs), ``mean``, ``ci_low`` / ``ci_high`` (95% t-interval over the pairs,
        ``mean ± t(0.975, n−1)·sd/√n`` by :func:`~trustcnn.metrics.stats.mean_estimate`; NaN with one pair),
        ``same_sign`` (pairs whose difference has the sign of the mean), ``differences``, ``seeds`` and
        ``jobs`` (``(job num, ce job num)`` per pair).
    """
    from trustcnn.metrics.stats import mean_estimate

    if metrics is None:
        available = {k for j in jobs if j.ok for k in j.metrics}
        metrics = [m for m in PAIRED if m in available]
    pairing = pair_with_baseline(jobs)
    rows: list[dict[str, Any]] = []
    for key, pairs in sorted(pairing.pairs.items(), key=lambda kv: kv[0]):
        model, cols, values = _model_cells(key)
        for m in metrics:
            used = [(j, c) for j, c in pairs
                    if math.isfinite(j.metrics.get(m, math.nan)) and math.isfinite(c.metrics.get(m, math.nan))]
            if not used:
                continue
            d = np.array([j.metrics[m] - c.metrics[m] for j, c in used], dtype=np.float64)
            est = mean_estimate(d)
            rows.append({
                "group": key, "model": model, "settings": dict(zip(cols, values)), "metric": m, "n": est.n,
                "mean": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high,
                "same_sign": int(np.sum(np.sign(d) == np.sign(est.value))), "differences": d.tolist(),
                "seeds": [j.config.get("seed") for j, _ in used], "jobs": [(j.num, c.num) for j, c in used],
            })
    return rows


def _fmt_difference(row: dict[str, Any]) -> str:
    """``+0.072 [+0.051, +0.093] (5/5)``: mean [95% CI] (pairs with the mean's sign / pairs)."""
    ci = f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if math.isfinite(row["ci_low"]) else ""
    return f"{row['mean']:+.3f}{ci} ({row['same_sign']}/{row['n']})"


def paired_difference_lines(jobs: list[JobResult], rows: list[dict[str, Any]] | None = None) -> list[str]:
    """The report section "Paired differences vs. cross-entropy" (markdown lines), from :func:`paired_differences`."""
    rows = paired_differences(jobs) if rows is None else rows
    pairing = pair_with_baseline(jobs)
    lines = ["## Paired differences vs. cross-entropy (same seed, same saliency method)", ""]
    if not any(j.ok and j.config.get("loss") == "ce" for j in jobs):
        return lines + ["No finished `loss=ce` job: nothing to pair with.", ""]
    lines += [f"Each job minus the finished `loss=ce` job it shares {', '.join(f'`{k}`' for k in pairing.matched_on)} "
              "with (same data split and initialization, so the seed-to-seed variation of the test set cancels). "
              "Cell: mean difference [95% t-interval over the pairs, t(0.975, n−1)·sd/√n; none with one pair] "
              "(pairs whose difference has the sign of the mean / pairs). A positive `test/decoy_following_rate` "
              "difference means more shortcut use than cross-entropy.", ""]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    if rows:
        by_group: dict[GroupKey, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in rows:
            by_group[r["group"]][r["metric"]] = r
        _, setting_cols, _ = _model_cells(next(iter(by_group)))
        header = ["model", *setting_cols, "pairs (seeds)", *metrics]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, cells in by_group.items():
            model, _, values = _model_cells(key)
            seeds = sorted({_fmt_value(j.config.get("seed")) for j, _ in pairing.pairs[key]})
            lines.append("| " + " | ".join([model, *values, f"{len(pairing.pairs[key])} ({', '.join(seeds)})",
                                            *[_fmt_difference(cells[m]) if m in cells else "—" for m in metrics]])
                         + " |")
        lines.append("")
    else:
        lines += ["No non-`ce` job has a `ce` partner with a value of " + ", ".join(f"`{m}`" for m in PAIRED) + ".",
                  ""]
    if pairing.unpaired:
        lines += ["Not paired: " + "; ".join(f"job {j.num if j.num is not None else j.job} ({why})"
                                             for j, why in pairing.unpaired) + ".", ""]
    return lines


def write_paired_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """``paired_differences.csv``: one row per group and metric of :func:`paired_differences`."""
    setting_cols = list(dict.fromkeys(c for r in rows for c in r["settings"]))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *setting_cols, "metric", "pairs", "mean_difference", "ci_low", "ci_high",
                         "same_sign", "seeds", "jobs", "differences"])
        for r in rows:
            writer.writerow([r["model"], *[r["settings"].get(c, "") for c in setting_cols], r["metric"], r["n"],
                             r["mean"], "" if math.isnan(r["ci_low"]) else r["ci_low"],
                             "" if math.isnan(r["ci_high"]) else r["ci_high"], r["same_sign"],
                             " ".join(_fmt_value(s) for s in r["seeds"]),
                             " ".join(f"{a}-{b}" for a, b in r["jobs"]),  # job-ce job
                             " ".join(f"{d:.6g}" for d in r["differences"])])
    return path


def _range_text(values: np.ndarray, what: str, fmt: str = ".3f") -> str:
    if values.size == 1:
        return f"{values[0]:{fmt}} (1 job)"
    return (f"{values.mean():{fmt}} (range {values.min():{fmt}}–{values.max():{fmt}} over {values.size} jobs; "
            f"{what})")


def reference_level_lines(jobs: list[JobResult]) -> list[str]:
    """The report section "Reference levels": what a trivial map or a random guess scores on the same data.

    The number of classes ``K`` comes from ``job.extra["num_classes"]`` (set by the report from each job's data
    config, see :func:`data_num_classes`); chance levels are left out, with the reason, when it is unknown.
    """
    ok = [j for j in jobs if j.ok]
    available = sorted({k for j in ok for k in j.metrics})
    lines = ["## Reference levels", "", "What a trivial map or a random guess scores on the same test images: read the "
             "tables against these levels, not against 0.", ""]
    for m in [k for k in available if k.endswith("/energy_pointing_game_uniform")]:
        v = _values(ok, m)
        lines.append(f"- Energy pointing game of a uniform map (`{m}`, the mean mask-area fraction of the test "
                     f"images): {_range_text(v, 'a property of the test set, which differs by seed')}. A map's "
                     f"`{m.removesuffix('_uniform')}` says something about localization only above it.")
    ks = sorted({k for j in ok if (k := j.extra.get("num_classes")) is not None})
    unknown = [j for j in ok if j.extra.get("num_classes") is None]
    if ks:
        chance = ", ".join(f"1/{k} = {1 / k:.3f}" for k in ks)
        lines.append(f"- Accuracy by chance: {chance} for a uniformly random prediction (K = "
                     f"{', '.join(map(str, ks))} classes, from the jobs' data module"
                     + (f"; unknown for job(s) {_nums(unknown)}" if unknown else "") + ").")
    else:
        lines.append("- Accuracy by chance: not stated: the number of classes could not be read from the jobs' "
                     "data config (`data._target_` in config.yaml).")
    if "test/decoy_following_rate" in available:
        conflicts = _values(ok, "test/decoy_conflicts")
        over = (f" (`test/decoy_conflicts`: {_range_text(conflicts, 'differs by seed', '.1f')})" if conflicts.size
                else "")
        chance = (", ".join(f"1/{k} = {1 / k:.3f}" for k in ks) if ks else "1/K (K unknown here)")
        lines.append("- Decoy-following rate (`test/decoy_following_rate`): among the test images whose decoy names "
                     f"another class than the label{over}, the share predicted as the decoy's class. A uniformly "
                     f"random prediction over all K classes picks the decoy's class with probability {chance}; a "
                     "model that always predicts the label scores 0, one that reads only the decoy 1, and one that "
                     "ignores the decoy but errs evenly over the other classes (1 − its accuracy on those images) / "
                     "(K − 1).")
    return lines + [""]


def write_heatmap(jobs: list[JobResult], metric: str, path: Path,
                  value: Callable[[JobResult], float] | None = None) -> Path | str:
    """``metric`` over lr × λ (mean over seeds), one panel per setting of the other varied keys.

    ``value`` reads a job's value (default: ``metrics[metric]``; the report passes :func:`selection_value` for
    the selection metric so old runs show the ``best_`` value it ranked them by).
    Returns the PNG path, or the reason no heatmap was drawn. Cells of failed jobs read "failed".
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook) alone

    trust = [j for j in jobs if j.config.get("loss") != "ce" and j.config.get("lr") is not None
             and j.config.get("lam") is not None]
    lrs = sorted({float(j.config["lr"]) for j in trust})
    lams = sorted({float(j.config["lam"]) for j in trust})
    if len(lrs) < 2 or len(lams) < 2:
        return (f"the sweep does not vary both optim.lr ({len(lrs)} value(s)) and loss.lam ({len(lams)} value(s)) "
                "over trust-loss jobs")
    config_cols, extra = varying_keys(trust)
    panel_cols = [c for c in config_cols if c not in ("lr", "lam")]
    panels: dict[tuple, list[JobResult]] = defaultdict(list)
    for j in trust:
        panels[tuple((c, _fmt_value(j.config.get(c))) for c in panel_cols)
               + tuple((k, _fmt_value(j.overrides.get(k))) for k in extra
                       if k.lstrip("+~") not in ("optim.lr", "loss.lam"))].append(j)
    finite = _values([j for j in trust if j.ok], metric, value)
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = Figure(figsize=(1.6 + 1.3 * len(lams) * len(panels), 1.2 + 0.9 * len(lrs)))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (panel, members) in zip(axes[0], sorted(panels.items())):
        grid = np.full((len(lrs), len(lams)), np.nan)
        labels = [["" for _ in lams] for _ in lrs]
        for r, lr in enumerate(lrs):
            for c, lam in enumerate(lams):
                cell = [j for j in members if float(j.config["lr"]) == lr and float(j.config["lam"]) == lam]
                values = _values([j for j in cell if j.ok], metric, value)
                if values.size:
                    grid[r, c] = values.mean()
                    labels[r][c] = f"{values.mean():.3f}" + (f"\n±{values.std(ddof=1):.3f}" if values.size > 1 else "")
                    if any(not j.ok for j in cell):
                        labels[r][c] += f"\n({sum(not j.ok for j in cell)} failed)"
                elif cell:
                    labels[r][c] = "failed" if any(not j.ok for j in cell) else "n/a"
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
        for r in range(len(lrs)):
            for c in range(len(lams)):
                if labels[r][c]:
                    dark = np.isfinite(grid[r, c]) and grid[r, c] < (vmin + vmax) / 2
                    ax.text(c, r, labels[r][c], ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
        ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs])
        ax.set_xlabel("λ (loss.lam)")
        ax.set_ylabel("lr (optim.lr)")
        ax.set_title(", ".join(f"{k}={v}" for k, v in panel), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{metric} (mean over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_results_csv(jobs: list[JobResult], path: Path) -> Path:
    """One row per job: job, num, status, overrides, key config values, test size, every metric, error."""
    metric_keys = sorted({k for j in jobs for k in j.metrics})
    header = ["job", "num", "status", "overrides", *KEY_CONFIG, "test_size", *metric_keys, "error"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for j in jobs:
            writer.writerow([
                j.job, j.num, j.status, " ".join(f"{k}={v}" for k, v in j.overrides.items()),
                *[j.config.get(c) for c in KEY_CONFIG], j.test_size,
                *[j.metrics.get(k, "") for k in metric_keys], j.error or "",
            ])
    return path


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    mode: str | None = None,
    evaluate: bool = False,
    eval_max_images: int | None = None,
    grid: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Collect a sweep and write ``results.csv``, ``report.md``, the heatmap and the best-vs-baseline grid.

    Args:
        sweep_dir: the multirun directory.
        out_dir: where to write (default: ``sweep_dir``).
        metric: the validation metric that picks the best job (and the baseline), read per job by
            :func:`selection_value`; default: the jobs' ``optimized_metric``. A test metric is refused.
            Heatmaps are drawn for it and for ``test/acc``.
        mode: ``"max"`` or ``"min"``: whether a higher or lower ``metric`` is better; default: the jobs'
            ``callbacks.model_checkpoint.mode`` for their optimized metric, else inferred from the name
            (:func:`trustcnn.checkpoints.metric_mode`: losses are minimized).
        evaluate: run :func:`trustcnn.evaluate.evaluate_runs` on the best job and the baseline (writes
            ``<out>/evaluation/`` and adds its tables to the report); its case table fills Table 3 when the
            jobs' metrics hold none.
        eval_max_images: limit the images of that evaluation.
        grid: draw the saliency grid of the best job against the baseline (needs a ``loss=ce`` job).

    Returns:
        ``{"jobs": [...], "best": JobResult | None, "baseline": ..., "metric": str, "mode": str,
        "files": {name: path}, "notes": [...], "markdown": str, "paired": paired_differences(jobs),
        "paired_markdown": str}``.

    Raises:
        ValueError: a test metric, a metric no finished job has, or an ambiguous default (see
            :func:`selection_rule`); raised before anything is written.
    """
    jobs = collect_sweep(sweep_dir)
    # A duplicate repeats another job's configuration (settings that do not apply to its loss): counted once,
    # never as an extra seed.
    duplicates = [j for j in jobs if j.status == "duplicate"]
    jobs = [j for j in jobs if j.status != "duplicate"]
    metric, mode = selection_rule(jobs, metric, mode)
    ok = [j for j in jobs if j.ok]
    available = sorted({k for j in ok for k in j.metrics})
    ranked = {j.job: selection_value(j, metric) for j in ok}
    if ok and not any(key for _, key in ranked.values()):
        raise ValueError(f"No finished job has a value of the metric {metric!r} in its metrics.json (nor "
                         f"best_{metric}, which runs made before the tested checkpoint's validation metrics were "
                         f"recorded have); choose one of: {', '.join(_selectable_metrics(jobs)) or 'none'}.")
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    _attach_test_sizes(jobs)
    files: dict[str, Path] = {"results.csv": write_results_csv(jobs, out / "results.csv")}
    notes: list[str] = []
    if duplicates:
        notes.append(f"Job(s) {_nums(duplicates)} repeat the configuration of job(s) "
                     f"{', '.join(sorted({str(j.extra['duplicate_of']) for j in duplicates}, key=str))}: they differ "
                     "only in settings that do not apply to their loss (e.g. λ or the ablation of loss=ce), so the "
                     "sweep ran that configuration once; counted once here.")
    fallback = [j for j in ok if ranked[j.job][1] not in (None, metric)]
    if fallback:
        notes.append(f"Job(s) {_nums(fallback)} have no `{metric}` in metrics.json (made before runs recorded the "
                     f"validation metrics of the tested checkpoint; they tested their best checkpoint): ranked by "
                     f"their `best_{metric}`, the value at that checkpoint.")
    unranked = [j for j in ok if ranked[j.job][1] is None]
    if unranked:
        notes.append(f"Job(s) {_nums(unranked)} have neither `{metric}` nor (as runs made before `tested_epoch` was "
                     f"recorded) `best_{metric}` in metrics.json: not ranked for the best job.")
    groups = group_jobs(jobs)
    best = pick_best(jobs, metric, mode)
    baseline = pick_baseline(jobs, best, metric, mode)

    if metric.startswith("best_"):
        what = "best validation value during training, not necessarily at the tested checkpoint"
    else:
        what = ("validation " if metric.split("/", 1)[0].startswith("val") else "") + \
            "value at each job's tested checkpoint"
    if best is not None:
        epoch = _tested_epoch(best)
        picked = f"job {best.num} ({ranked[best.job][0]:.4f}" + (f", tested epoch {epoch}" if epoch is not None
                                                                   else "") + ")"
    else:
        picked = "none"
    md = [f"# Sweep report: `{Path(sweep_dir)}`", "",
          f"{len(jobs)} jobs: {len(ok)} finished, {len(jobs) - len(ok)} failed. Best by `{metric}` ({mode}; {what}): "
          + picked + "; baseline (loss=ce): " + (f"job {baseline.num}" if baseline else "none") + ". "
          "Jobs are never picked by a test metric.", ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])

    present = [m for m in CLASSIFICATION if m in available]
    md += ["## Table 1: classification (mean ± std over seeds)", "",
           "Rows: model (loss × saliency method) and ablation, plus every other setting the sweep varies; "
           "`jobs` counts the seeds averaged.", ""]
    md += _metric_table(groups, present or [metric], mean_std)
    md += ["## Table 2: classification with 95% confidence intervals", "",
           "With >= 2 seeds: t-interval over seeds. With one seed: Wilson interval over the n test images "
           "(exact for accuracy, approximate for macro precision/recall). `—` where n is unknown.", ""]

    def ci_cell(group: list[JobResult], m: str) -> str:
        mean, low, high, method = confidence_interval(group, m)
        return _fmt_ci(mean, low, high) + (f" ({method})" if math.isfinite(low) else "")

    md += _metric_table(groups, present or [metric], ci_cell)

    evaluation = None
    if evaluate and best is not None:
        from trustcnn.evaluate import evaluate_runs

        evaluation = evaluate_runs(
            [best.path], baseline=baseline.path if baseline is not None else None,
            names=([f"baseline: job {baseline.num}"] if baseline is not None else []) + [f"best: job {best.num}"],
            out_dir=out / "evaluation", max_images=eval_max_images, device=device,
            saliency=best.config.get("saliency"),  # both sides explained with the best job's method
        )
        files["evaluation"] = out / "evaluation"

    md += ["## Table 3: case table (paper's Table 3)", ""]
    tables: dict[str, dict[str, float]] = {}
    for label, job in (("baseline", baseline), ("best", best)):
        t = _case_table_from_metrics(job) if job is not None else None
        if t:
            tables[f"{label}: job {job.num}"] = t
    if tables:
        md += ["From the jobs' `metrics.json` (the test set; accurate map = energy pointing game >= 0.5). "
               "Fraction [Wilson 95% CI].", ""]
    elif evaluation is not None:
        tables = {n: m["case_table"] for n, m in evaluation["models"].items() if "case_table" in m}
        if tables:
            md += [f"Computed by `trustcnn.evaluate` on {evaluation['data']['num_images']} test images. Accurate "
                   f"map: energy pointing game >= {evaluation['settings']['accurate_threshold']}; fraction "
                   "[Wilson 95% CI] (count).", ""]
        else:
            md += ["The data has no masks: no case table.", ""]
    else:
        md += ["The jobs' metrics hold no case table; run the report with `--evaluate` to compute it on the best "
               "job and the baseline.", ""]
    if tables:
        md += _case_table_lines(tables)
    if evaluation is not None:
        from trustcnn.evaluate import format_markdown

        body = format_markdown(evaluation).split("\n", 1)[1]  # drop its top-level title
        md += ["## Evaluation of the best job against the baseline (`--evaluate`)", "",
               f"Also in `{out / 'evaluation'}` (evaluation.json, evaluation.md, saliency_comparison.png).", "",
               body.replace("\n## ", "\n### "), ""]

    if ok:
        md += reference_level_lines(jobs)
    other = [m for m in LOCALIZATION if m in available]
    if other:
        md += ["## Test-time localization and decoy reliance (mean ± std over seeds)", ""]
        md += _metric_table(groups, other, mean_std)
    paired = paired_differences(jobs)
    paired_md = paired_difference_lines(jobs, paired)
    md += paired_md
    files["paired_differences.csv"] = write_paired_csv(paired, out / "paired_differences.csv")
    unpaired = pair_with_baseline(jobs).unpaired
    if unpaired and any(j.ok and j.config.get("loss") == "ce" for j in jobs):
        notes.append(f"Job(s) {_nums([j for j, _ in unpaired])} have no loss=ce job to pair with (see the paired "
                     "differences).")

    # The selection metric, and test/acc: reporting a test metric is fine, selecting on it is not.
    for heat_metric in dict.fromkeys([metric, *(["test/acc"] if "test/acc" in available else [])]):
        safe_metric = re.sub(r"[^A-Za-z0-9_.-]+", "_", heat_metric)
        value = (lambda j: selection_value(j, metric)[0]) if heat_metric == metric else None
        heat = write_heatmap(jobs, heat_metric, out / f"heatmap_{safe_metric}.png", value)
        md += [f"## `{heat_metric}` over lr × λ", ""]
        if isinstance(heat, Path):
            files[heat.name] = heat
            md += [f"![heatmap]({heat.name})", ""]
        else:
            if f"No heatmap: {heat}." not in notes:  # the reason does not depend on the metric
                notes.append(f"No heatmap: {heat}.")
            md += [f"No heatmap: {heat}.", ""]

    md += ["## Saliency maps: best job vs. baseline", ""]
    if grid and best is not None and baseline is not None and best is not baseline:
        from trustcnn.evaluate import load_models, save_comparison_grid

        loaded, _ = load_models([best.path], baseline=baseline.path,
                                names=[f"baseline (job {baseline.num})", f"best (job {best.num})"],
                                saliency=best.config.get("saliency"))
        path = save_comparison_grid(out / "saliency_best_vs_baseline.png", loaded, device=device or "cpu")
        files[path.name] = path
        md += [f"![saliency maps]({path.name})", ""]
    else:
        reason = ("disabled (--no-grid)" if not grid else "no finished loss=ce job to compare with"
                  if baseline is None else "no finished trust-loss job")
        notes.append(f"No saliency grid: {reason}.")
        md += [f"No saliency grid: {reason}.", ""]

    shown = [m for m in ("test/acc",) if m in available and m != metric]
    md += ["## All jobs", "", f"`{metric}`: the value each job is ranked by"
           + (f" (`best_{metric}` for job(s) {_nums(fallback)}, see the notes above)." if fallback else "."), "",
           "| " + " | ".join(["job", "status", "overrides", "tested epoch", metric, *shown]) + " |",
           "|---|---|---|---|---|" + "---|" * len(shown)]
    for j in jobs:
        selected = selection_value(j, metric)[0] if j.ok else math.nan
        epoch = _tested_epoch(j) if j.ok else None
        cells = [f"{selected:.4f}" if math.isfinite(selected) else "—"]
        cells += [f"{j.metrics[m]:.4f}" if m in j.metrics else "—" for m in shown]
        md.append(f"| {j.num} | {j.status} | `{' '.join(f'{k}={v}' for k, v in j.overrides.items())}` | "
                  f"{epoch if epoch is not None else '—'} | " + " | ".join(cells) + " |")
    md += ["", "## Failed jobs", ""]
    failed = [j for j in jobs if not j.ok]
    if failed:
        md += ["| job | overrides | error |", "|---|---|---|"]
        md += [f"| {j.num} | `{' '.join(f'{k}={v}' for k, v in j.overrides.items())}` | "
               f"{(j.error or '').replace('|', '/').splitlines()[0] if j.error else ''} |" for j in failed]
        md += ["", "Tracebacks: `error.json` in each job directory.", ""]
    else:
        md += ["None.", ""]
    (out / "report.md").write_text("\n".join(md))
    files["report.md"] = out / "report.md"
    return {"jobs": jobs, "best": best, "baseline": baseline, "metric": metric, "mode": mode, "files": files,
            "notes": notes, "markdown": "\n".join(md), "paired": paired, "paired_markdown": "\n".join(paired_md)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trustcnn.report",
                                description="Aggregate a `python -m trustcnn.train -m` sweep into results.csv, "
                                            "report.md (paper-style tables), lr × λ heatmaps and a saliency grid. "
                                            "The best job is picked by a validation metric (the runs' "
                                            "optimized_metric unless --metric), never by a test metric.")
    p.add_argument("sweep_dir", help="the multirun directory (holds multirun.yaml and one directory per job)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: the sweep directory)")
    p.add_argument("--metric", default=None,
                   help="validation metric that picks the best job and the baseline (default: the jobs' "
                        "optimized_metric, e.g. val/acc), read from each job's metrics.json at its tested checkpoint "
                        "(best_<metric> for runs made before that was recorded); a test metric (test/..., "
                        "test_consistent/...) is refused: that would select on the test set. Heatmaps: this metric "
                        "and test/acc")
    p.add_argument("--mode", choices=["max", "min"], default=None,
                   help="whether a higher or lower --metric is better (default: the jobs' "
                        "callbacks.model_checkpoint.mode for their optimized_metric, else from the name: losses min, "
                        "others max)")
    p.add_argument("--evaluate", action="store_true",
                   help="also run trustcnn.evaluate on the best job and the baseline (SSIM vs baseline, "
                        "faithfulness, randomization check; the case table when the jobs' metrics lack it); slower")
    p.add_argument("--eval-max-images", type=int, metavar="N", help="test images for --evaluate (default all)")
    p.add_argument("--no-grid", action="store_true", help="skip the best-vs-baseline saliency grid")
    p.add_argument("--device", help="device for --evaluate and the grid (default: cuda when available)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trustcnn.report``: write the report, print report.md, then its path and the paired differences."""
    from trustcnn.cli import full_error, report_failure

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = write_report(args.sweep_dir, args.out, args.metric, args.mode, args.evaluate,
                              args.eval_max_images, not args.no_grid, args.device)
    except (FileNotFoundError, ValueError) as err:  # a run, directory or option that does not fit: exit 2
        if full_error():
            raise
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except Exception as err:  # a failure at run time: one message, exit 1, no traceback (trustcnn.cli)
        report_failure(parser.prog, err, fix="give --out a writable directory" if isinstance(err, OSError) else None)
    print(result["markdown"])
    # The headline comparison last, where a terminal leaves it in view.
    print(f"\nReport: {result['files']['report.md']}\n\n{result['paired_markdown']}")
    print("\nWritten: " + ", ".join(str(p) for p in result["files"].values()), file=sys.stderr)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
    main()
