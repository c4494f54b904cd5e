"""Which job of a sweep is the best, and which ``loss=ce`` job is its baseline: by a validation metric, never a
test metric (that would select on the test set, and the test numbers of the pick would be optimistic).

By default the jobs' ``optimized_metric`` (``val/acc``), in the mode their checkpoint callback used (see
:func:`trustcnn.checkpoints.metric_mode`). A job's value is its ``metrics.json`` entry under the metric's own
name — the value at the checkpoint that was tested; runs made before that was recorded (no ``tested_epoch``)
tested their best checkpoint, so their ``best_<metric>`` is used.
"""

from __future__ import annotations

import math

from trustcnn.checkpoints import metric_mode
from trustcnn.report.collect import JobResult, select


def is_test_metric(metric: str) -> bool:
    """Whether ``metric`` is measured on a test set: its prefix before ``/`` starts with ``test``
    (``test/acc``, ``test_consistent/acc``; also behind ``best_``). ``tested_epoch`` / ``tested_step`` are not."""
    head = metric.removeprefix("best_").split("/", 1)[0]
    return head.startswith("test") and not head.startswith("tested")


def refuse_test_metric(metric: str) -> None:
    """Raise ``ValueError`` for a test metric (see :func:`is_test_metric`)."""
    if is_test_metric(metric):
        raise ValueError(f"{metric!r} is a test metric: picking the best job by it selects on the test set; choose "
                         "a validation metric such as val/acc (the runs' optimized_metric), e.g. --metric val/acc. "
                         "Test metrics are still reported in every table, results.csv and the test/acc heatmap.")


def _optimized_metric(job: JobResult) -> str | None:
    """The job's ``optimized_metric``: its resolved config, else its ``run.json``."""
    value = select(job.cfg, "optimized_metric")
    if value is None:
        value = job.run.get("optimized_metric")
    return str(value) if value is not None else None


def _explicit_mode(job: JobResult, metric: str) -> str | None:
    """The mode the job's checkpoint callback was told for ``metric`` (``None``: not given, or ``metric`` is not
    the job's optimized_metric): ``callbacks.model_checkpoint.mode`` of its config, else ``run.json``'s
    ``optimized_mode`` (the mode training actually used)."""
    if _optimized_metric(job) != metric:
        return None
    mode = select(job.cfg, "callbacks.model_checkpoint.mode")
    if mode is None and job.run.get("optimized_metric") == metric:
        mode = job.run.get("optimized_mode")
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
    refuse_test_metric(metric)
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
    refuse_test_metric(metric)
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
    refuse_test_metric(metric)
    mode = metric_mode(metric, mode)
    ce = [j for j in jobs if j.ok and j.config.get("loss") == "ce"]
    if not ce:
        return None
    if best is not None:
        for key in ("saliency", "seed"):
            ce = [j for j in ce if j.config.get(key) == best.config.get(key)] or ce
    return _ranked(ce, metric, mode)[0]


def selectable_metrics(jobs: list[JobResult]) -> list[str]:
    """Metric names finished jobs can be ranked by (no test metric, no checkpoint record)."""
    names = {k for j in jobs if j.ok for k in j.metrics if not is_test_metric(k) and not k.startswith("tested")}
    names |= {k.removeprefix("best_") for j in jobs if j.ok for k in j.metrics
              if k.startswith("best_") and selection_value(j, k.removeprefix("best_"))[1] == k}
    return sorted(names)


def tested_epoch(job: JobResult) -> int | None:
    """The epoch of the checkpoint the job tested (``metrics.json``, else ``run.json``), when known."""
    value = job.metrics.get("tested_epoch", job.run.get("tested_epoch"))
    try:
        return int(value) if value is not None and math.isfinite(float(value)) else None
    except (TypeError, ValueError):
        return None
