"""Groups of jobs (a model = every varied setting but the seed), their means and confidence intervals, and the
paired per-seed differences of every model against cross-entropy.

Confidence intervals: with >= 2 seeds, the t-interval over seeds ``mean ± t(0.975, k-1)·sd/√k``; with one seed,
the Wilson interval of the metric as a proportion of the ``n`` test images the job was tested on
(``scipy.stats.binomtest(...).proportion_ci``; exact for accuracy, an approximation for macro precision / recall,
which are not one binomial proportion). ``n`` is ``run.json``'s ``test_images``; without it the cell shows the
value only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from trustcnn.intervals import t_interval, wilson
from trustcnn.report.collect import KEY_CONFIG, JobResult

# Override keys already described by KEY_CONFIG (config-group choices and the keys themselves).
_COVERED_OVERRIDES = {"loss", "ablation", "saliency", "seed", *KEY_CONFIG.values()}
#: Metrics compared as paired per-seed differences against the loss=ce job (each only when present).
PAIRED = ("test/acc", "test/energy_pointing_game", "test/pointing_game", "test/decoy_following_rate",
          "test_consistent/acc")
# Settings of the trust losses that mean nothing for the loss=ce baseline.
_TRUST_ONLY = ("ablation", "lam", "form", "weight")

GroupKey = tuple[tuple[str, str], ...]


def fmt_value(v: Any) -> str:
    """A setting as a table cell (``—`` for none)."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def setting(job: JobResult, column: str) -> Any:
    """The job's :data:`~trustcnn.report.collect.KEY_CONFIG` value, ``None`` for a trust-loss setting of ``loss=ce``."""
    if job.config.get("loss") == "ce" and column in _TRUST_ONLY:
        return None
    return job.config.get(column)


def varying_keys(jobs: list[JobResult]) -> tuple[list[str], list[str]]:
    """``(config columns, extra override keys)`` whose values differ between jobs (``seed`` excluded).

    A trust-loss setting (λ, form, ablation) varies only if it differs between trust-loss jobs.
    """
    config_cols = [c for c in KEY_CONFIG if c != "seed"
                   and len({fmt_value(setting(j, c)) for j in jobs if setting(j, c) is not None}) > 1]
    keys = sorted({k for j in jobs for k in j.overrides})
    extra = [k for k in keys if k.lstrip("+~") not in _COVERED_OVERRIDES
             and len({j.overrides.get(k) for j in jobs}) > 1 and not _names_a_combination(jobs, k, config_cols)]
    return config_cols, extra


def _names_a_combination(jobs: list[JobResult], key: str, config_cols: list[str]) -> bool:
    """Whether the override ``key`` only names combinations of the config columns, one value per combination
    (e.g. the shortcut study's ``+arm``, a bundle of loss, saliency method and weights). Such a key adds no
    setting of its own; kept, it would keep every job from pairing with a ``loss=ce`` job of another name."""
    if not config_cols:
        return False
    named: dict[tuple[str, ...], str | None] = {}
    for j in jobs:
        combination = tuple(fmt_value(setting(j, c)) for c in config_cols)
        if named.setdefault(combination, j.overrides.get(key)) != j.overrides.get(key):
            return False
    return True


def _group_key(job: JobResult, config_cols: list[str], extra: list[str]) -> GroupKey:
    """Setting of a job that defines its group (model): loss × saliency, ablation, and every varied key."""
    cols = ["loss", "saliency", "ablation", *[c for c in config_cols if c not in ("loss", "saliency", "ablation")]]
    items = [(c, fmt_value(setting(job, c))) for c in cols]
    items += [(k, fmt_value(job.overrides.get(k))) for k in extra]
    return tuple(items)


def group_jobs(jobs: list[JobResult]) -> dict[GroupKey, list[JobResult]]:
    """Finished jobs grouped by every varied setting except the seed."""
    config_cols, extra = varying_keys(jobs)
    groups: dict[GroupKey, list[JobResult]] = defaultdict(list)
    for job in jobs:
        if job.ok:
            groups[_group_key(job, config_cols, extra)].append(job)
    return dict(groups)


def values(group: list[JobResult], metric: str, value: Callable[[JobResult], float] | None = None) -> np.ndarray:
    """The finite values of ``metric`` in ``group`` (``value`` reads a job's value; default its metrics)."""
    v = np.array([value(j) if value else j.metrics.get(metric, math.nan) for j in group], dtype=np.float64)
    return v[np.isfinite(v)]


def mean_std(group: list[JobResult], metric: str) -> str:
    """``mean ± sample std`` over the group's seeds (the value alone for one job)."""
    v = values(group, metric)
    if v.size == 0:
        return "—"
    if v.size == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def confidence_interval(group: list[JobResult], metric: str) -> tuple[float, float, float, str]:
    """``(mean, low, high, method)``: t-interval over seeds, else Wilson over the test images, else no CI."""
    v = values(group, metric)
    if v.size == 0:
        return math.nan, math.nan, math.nan, "—"
    if v.size >= 2:
        return (*t_interval(v), f"t, {v.size} seeds")
    mean, n = float(v[0]), group[0].test_size
    if n and 0.0 <= mean <= 1.0:
        return (mean, *wilson(mean * n, n), f"Wilson, n={n}")
    return mean, math.nan, math.nan, "no CI"


def model_cells(key: GroupKey) -> tuple[str, list[str], list[str]]:
    """``(model = loss × saliency, setting column names, setting values)`` of a group key."""
    d = dict(key)
    model = f"{d.pop('loss')} × {d.pop('saliency')}"
    return model, list(d), list(d.values())


# ------------------------------------------------------------------ paired differences vs. cross-entropy

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
    items = [("seed", fmt_value(job.config.get("seed"))), ("saliency", fmt_value(job.config.get("saliency")))]
    items += [(c, fmt_value(setting(job, c))) for c in cols]
    return tuple(items + [(k, fmt_value(job.overrides.get(k))) for k in extra])


def nums(jobs: list[JobResult]) -> str:
    """``"1, 2, 3"``: the jobs' numbers (directories where unknown)."""
    return ", ".join(j.label for j in jobs)


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
                unpaired.append((job, f"{len(partners)} finished loss=ce jobs ({nums(partners)}) have {where}"))
    return BaselinePairs(pairs, unpaired, ["seed", "saliency", *cols, *extra])


def paired_differences(jobs: list[JobResult], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean paired difference (job − its ``loss=ce`` job, see :func:`pair_with_baseline`) per group and metric.

    Args:
        jobs: the sweep's jobs (:func:`~trustcnn.report.collect.collect_sweep`).
        metrics: metrics to compare (default: those of :data:`PAIRED` some finished job has). A pair counts
            for a metric only when both jobs have a finite value of it.

    Returns:
        One dict per (non-``ce`` group with a pair, metric with a pair), groups in table order: ``group`` (the
        :func:`group_jobs` key), ``model`` (loss × saliency), ``settings`` (the other group settings), ``metric``,
        ``n`` (pairs), ``mean``, ``ci_low`` / ``ci_high`` (95% t-interval over the pairs, :func:`t_interval`;
        NaN with one pair), ``same_sign`` (pairs whose difference has the sign of the mean), ``differences``,
        ``seeds`` and ``jobs`` (``(job num, ce job num)`` per pair).
    """
    if metrics is None:
        available = {k for j in jobs if j.ok for k in j.metrics}
        metrics = [m for m in PAIRED if m in available]
    pairing = pair_with_baseline(jobs)
    rows: list[dict[str, Any]] = []
    for key, pairs in sorted(pairing.pairs.items(), key=lambda kv: kv[0]):
        model, cols, cells = model_cells(key)
        for m in metrics:
            used = [(j, c) for j, c in pairs
                    if math.isfinite(j.metrics.get(m, math.nan)) and math.isfinite(c.metrics.get(m, math.nan))]
            if not used:
                continue
            d = np.array([j.metrics[m] - c.metrics[m] for j, c in used], dtype=np.float64)
            mean, low, high = t_interval(d)
            rows.append({
                "group": key, "model": model, "settings": dict(zip(cols, cells)), "metric": m, "n": int(d.size),
                "mean": mean, "ci_low": low, "ci_high": high,
                "same_sign": int(np.sum(np.sign(d) == np.sign(mean))), "differences": d.tolist(),
                "seeds": [j.config.get("seed") for j, _ in used], "jobs": [(j.num, c.num) for j, c in used],
            })
    return rows
