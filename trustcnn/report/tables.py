"""The report's tables: Markdown sections of ``report.md`` and the CSV files (``results.csv``,
``paired_differences.csv``). Each function turns numbers already computed into text; none reads a file."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from trustcnn.report.collect import KEY_CONFIG, JobResult
from trustcnn.report.selection import selection_value, tested_epoch
from trustcnn.report.stats import PAIRED, GroupKey, fmt_value, model_cells, nums, pair_with_baseline
from trustcnn.report.stats import paired_differences, values

#: Table 3's cases, as ``trustcnn.metrics.CASE_NAMES`` (repeated: that package imports torch, the report does
#: not; a test keeps the two equal).
CASE_NAMES: dict[int, str] = {
    1: "correct prediction, accurate map",
    2: "wrong prediction, accurate map",
    3: "correct prediction, inaccurate map",
    4: "wrong prediction, inaccurate map",
}


def fmt_ci(mean: float | None, low: float | None, high: float | None) -> str:
    """``0.812 [0.790, 0.833]``; the value alone without bounds; ``—`` without a value (``None`` = NaN)."""
    mean, low, high = (math.nan if v is None else v for v in (mean, low, high))
    if not math.isfinite(mean):
        return "—"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _seeds(group: list[JobResult]) -> str:
    seeds = sorted({fmt_value(j.config.get("seed")) for j in group})
    return f"{len(group)}" + (f" ({', '.join(seeds)})" if len(group) > 1 else "")


def metric_table(groups: dict[GroupKey, list[JobResult]], metrics: Sequence[str],
                 cell: Callable[[list[JobResult], str], str]) -> list[str]:
    """One row per group (the ``loss=ce`` groups first), one column per metric, ``cell(group, metric)``."""
    if not groups:
        return ["No finished job.", ""]
    _, setting_cols, _ = model_cells(next(iter(groups)))
    header = ["model", *setting_cols, "jobs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in sorted(groups.items(), key=lambda kv: (dict(kv[0])["loss"] != "ce", kv[0])):
        model, _, cells = model_cells(key)
        lines.append("| " + " | ".join([model, *cells, _seeds(group), *[cell(group, m) for m in metrics]]) + " |")
    return lines + [""]


def case_table_from_metrics(job: JobResult) -> dict[str, float] | None:
    """The case table the run logged on its test set (``test/case1_fraction``, ...), if it did."""
    for prefix in ("test/", ""):
        if f"{prefix}case1_fraction" in job.metrics:
            return {k[len(prefix):]: v for k, v in job.metrics.items() if k.startswith(prefix)}
    return None


def case_table_lines(tables: dict[str, dict[str, Any]]) -> list[str]:
    """Table 3: one row per case, one column per model: fraction [Wilson 95% CI] (count)."""
    names = list(tables)
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in range(1, 5):
        cells = []
        for n in names:
            t = tables[n]
            count = t.get(f"case{c}_count")
            cells.append(fmt_ci(t[f"case{c}_fraction"], t.get(f"case{c}_ci_low"), t.get(f"case{c}_ci_high"))
                         + (f" ({int(count)})" if count is not None else ""))
        lines.append(f"| {c}: {CASE_NAMES[c]} | " + " | ".join(cells) + " |")
    return lines + [""]


# ------------------------------------------------------------------------------------ evaluation.json

def _estimate(entry: dict[str, Any], key: str) -> str:
    """An estimate of ``evaluation.json`` (``{"value", "ci_low", "ci_high", ...}`` at a dotted key) as a cell."""
    value: Any = entry
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, dict):
        return "—"
    return fmt_ci(value.get("value"), value.get("ci_low"), value.get("ci_high"))


def evaluation_lines(evaluation: dict[str, Any], where: str) -> list[str]:
    """The tables of ``evaluation.json`` (as ``trustcnn.evaluate`` writes it) as a report section; the case
    table is Table 3's, not repeated here."""
    data, settings, models = evaluation.get("data", {}), evaluation.get("settings", {}), evaluation["models"]
    base = evaluation.get("baseline")
    lines = ["## Evaluation (`trustcnn.evaluate`)", "",
             f"From `{where}`: {data.get('num_images', '?')} of {data.get('test_set_size', '?')} images of the "
             f"`{data.get('test_set', '?')}` set. Values: estimate [95% CI].", ""]
    lines += [f"> warning: {w}" for w in evaluation.get("warnings") or []]
    if evaluation.get("warnings"):
        lines.append("")
    sections = [("Classification", [("accuracy", "accuracy"), ("macro precision", "precision"),
                                    ("macro recall", "recall")]),
                ("Localization (masks)", [("pointing game", "pointing_game"),
                                          ("energy pointing game", "energy_pointing_game"), ("IoU", "iou")]),
                ("Faithfulness", [("deletion AUC ↓", "deletion_auc"), ("insertion AUC ↑", "insertion_auc")]),
                ("Model-randomization sanity check", [("Spearman ρ ↓", "randomization.spearman"),
                                                      ("SSIM ↓", "randomization.ssim")]),
                (f"SSIM vs. baseline `{base}` (eq. 11)", [("SSIM", "ssim_vs_baseline")])]
    for title, columns in sections:
        if not any(_estimate(m, key) != "—" for m in models.values() for _, key in columns):
            continue  # e.g. no masks, no faithfulness, no baseline: that table was not computed
        lines += [f"### {title}", "", "| model | " + " | ".join(c for c, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for name, m in models.items():
            label = f"{name} (baseline)" if name == base else name
            lines.append(f"| {label} | " + " | ".join(_estimate(m, key) for _, key in columns) + " |")
        lines.append("")
    if settings.get("ssim_size") and base is not None:
        lines += [f"SSIM at {settings['ssim_size']}; the randomization check re-initializes each model's target layer "
                  "and compares its maps with the trained model's.", ""]
    return lines


# ----------------------------------------------------------------------------------- paired differences

def _fmt_difference(row: dict[str, Any]) -> str:
    """``+0.072 [+0.051, +0.093] (5/5)``: mean [95% CI] (pairs with the mean's sign / pairs)."""
    ci = f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if math.isfinite(row["ci_low"]) else ""
    return f"{row['mean']:+.3f}{ci} ({row['same_sign']}/{row['n']})"


def paired_difference_lines(jobs: list[JobResult], rows: list[dict[str, Any]] | None = None) -> list[str]:
    """The section "Paired differences vs. cross-entropy", from :func:`~trustcnn.report.stats.paired_differences`."""
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
        _, setting_cols, _ = model_cells(next(iter(by_group)))
        header = ["model", *setting_cols, "pairs (seeds)", *metrics]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, cells in by_group.items():
            model, _, settings = model_cells(key)
            seeds = sorted({fmt_value(j.config.get("seed")) for j, _ in pairing.pairs[key]})
            lines.append("| " + " | ".join([model, *settings, f"{len(pairing.pairs[key])} ({', '.join(seeds)})",
                                            *[_fmt_difference(cells[m]) if m in cells else "—" for m in metrics]])
                         + " |")
        lines.append("")
    else:
        lines += ["No non-`ce` job has a `ce` partner with a value of " + ", ".join(f"`{m}`" for m in PAIRED) + ".",
                  ""]
    if pairing.unpaired:
        lines += ["Not paired: " + "; ".join(f"job {j.label} ({why})" for j, why in pairing.unpaired) + ".", ""]
    return lines


# ------------------------------------------------------------------------------------- reference levels

def _range_text(v: np.ndarray, what: str, fmt: str = ".3f") -> str:
    if v.size == 1:
        return f"{v[0]:{fmt}} (1 job)"
    return f"{v.mean():{fmt}} (range {v.min():{fmt}}–{v.max():{fmt}} over {v.size} jobs; {what})"


def reference_level_lines(jobs: list[JobResult]) -> list[str]:
    """The section "Reference levels": what a trivial map or a random guess scores on the same data.

    The number of classes ``K`` is each job's :attr:`~trustcnn.report.collect.JobResult.num_classes` (from its
    ``run.json``); chance levels are left out, with the reason, when it is unknown.
    """
    ok = [j for j in jobs if j.ok]
    available = sorted({k for j in ok for k in j.metrics})
    lines = ["## Reference levels", "", "What a trivial map or a random guess scores on the same test images: read the "
             "tables against these levels, not against 0.", ""]
    for m in [k for k in available if k.endswith("/energy_pointing_game_uniform")]:
        lines.append(f"- Energy pointing game of a uniform map (`{m}`, the mean mask-area fraction of the test "
                     f"images): {_range_text(values(ok, m), 'a property of the test set, which differs by seed')}. "
                     f"A map's `{m.removesuffix('_uniform')}` says something about localization only above it.")
    ks = sorted({j.num_classes for j in ok if j.num_classes is not None})
    unknown = [j for j in ok if j.num_classes is None]
    if ks:
        chance = ", ".join(f"1/{k} = {1 / k:.3f}" for k in ks)
        lines.append(f"- Accuracy by chance: {chance} for a uniformly random prediction (K = "
                     f"{', '.join(map(str, ks))} classes, from the jobs' run.json"
                     + (f"; unknown for job(s) {nums(unknown)}" if unknown else "") + ").")
    else:
        lines.append("- Accuracy by chance: not stated: no job's run.json records `num_classes` (runs made before "
                     "it was recorded).")
    if "test/decoy_following_rate" in available:
        conflicts = values(ok, "test/decoy_conflicts")
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


# ------------------------------------------------------------------------------------------ job lists

def _overrides_text(job: JobResult) -> str:
    return " ".join(f"{k}={v}" for k, v in job.overrides.items())


def _overrides_cell(job: JobResult) -> str:
    return f"`{_overrides_text(job)}`" if job.overrides else "—"


def all_jobs_lines(jobs: list[JobResult], metric: str, fallback: list[JobResult]) -> list[str]:
    """The section "All jobs": status, overrides, tested epoch, the value each job is ranked by, test/acc."""
    available = {k for j in jobs if j.ok for k in j.metrics}
    shown = [m for m in ("test/acc",) if m in available and m != metric]
    lines = ["## All jobs", "", f"`{metric}`: the value each job is ranked by"
             + (f" (`best_{metric}` for job(s) {nums(fallback)}, see the notes above)." if fallback else "."), "",
             "| " + " | ".join(["job", "status", "overrides", "tested epoch", metric, *shown]) + " |",
             "|---|---|---|---|---|" + "---|" * len(shown)]
    for j in jobs:
        selected = selection_value(j, metric)[0] if j.ok else math.nan
        epoch = tested_epoch(j) if j.ok else None
        cells = [f"{selected:.4f}" if math.isfinite(selected) else "—"]
        cells += [f"{j.metrics[m]:.4f}" if m in j.metrics else "—" for m in shown]
        lines.append(f"| {j.num} | {j.status} | {_overrides_cell(j)} | {epoch if epoch is not None else '—'} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def failed_jobs_lines(jobs: list[JobResult]) -> list[str]:
    """The section "Failed jobs": overrides and the first line of each error."""
    lines = ["## Failed jobs", ""]
    failed = [j for j in jobs if not j.ok]
    if not failed:
        return lines + ["None.", ""]
    lines += ["| job | overrides | error |", "|---|---|---|"]
    lines += [f"| {j.num} | {_overrides_cell(j)} | {(j.error or '').replace('|', '/')} |" for j in failed]
    return lines + ["", "Tracebacks: `error.json` in each job directory.", ""]


# --------------------------------------------------------------------------------------------- CSV files

def write_results_csv(jobs: list[JobResult], path: Path) -> Path:
    """``results.csv``: one row per job: job, num, status, overrides, key config values, test size, every
    metric, error."""
    metric_keys = sorted({k for j in jobs for k in j.metrics})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "num", "status", "overrides", *KEY_CONFIG, "test_size", *metric_keys, "error"])
        for j in jobs:
            writer.writerow([j.job, j.num, j.status, _overrides_text(j), *[j.config.get(c) for c in KEY_CONFIG],
                             j.test_size, *[j.metrics.get(k, "") for k in metric_keys], j.error or ""])
    return path


def write_paired_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """``paired_differences.csv``: one row per group and metric of
    :func:`~trustcnn.report.stats.paired_differences`."""
    setting_cols = list(dict.fromkeys(c for r in rows for c in r["settings"]))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *setting_cols, "metric", "pairs", "mean_difference", "ci_low", "ci_high",
                         "same_sign", "seeds", "jobs", "differences"])
        for r in rows:
            writer.writerow([r["model"], *[r["settings"].get(c, "") for c in setting_cols], r["metric"], r["n"],
                             r["mean"], "" if math.isnan(r["ci_low"]) else r["ci_low"],
                             "" if math.isnan(r["ci_high"]) else r["ci_high"], r["same_sign"],
                             " ".join(fmt_value(s) for s in r["seeds"]),
                             " ".join(f"{a}-{b}" for a, b in r["jobs"]),  # job-ce job
                             " ".join(f"{d:.6g}" for d in r["differences"])])
    return path
