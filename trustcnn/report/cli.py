"""``python -m trustcnn.report <sweep dir>``: the report of a sweep, from the files its runs and its evaluation
wrote; nothing is trained, evaluated or loaded (no torch).

``python -m trustcnn.report <sweep dir> [--out DIR] [--metric val/acc] [--mode max|min] [--no-grid]`` writes
(into the sweep dir unless ``--out``):

* ``results.csv``: one row per job — status, overrides, key config values, every metric, the error;
* ``report.md``: Table 1 (accuracy / precision / recall per model = loss × saliency, and ablation; mean ± std
  over seeds), Table 2 (the same with 95% CIs), Table 3 (the case table the best job and the baseline logged on
  their test set, and that of ``<sweep dir>/evaluation/evaluation.json`` when it exists), the evaluation's
  tables, the reference levels, test-time localization metrics, the paired per-seed differences of every model
  against cross-entropy, the list of every job and a **Failed jobs** section. Without an evaluation it names
  the ``python -m trustcnn.evaluate`` command that makes one for the best job and its baseline;
* ``paired_differences.csv``: those paired differences, one row per model and metric;
* ``heatmap_<metric>.png``: the selection metric, and ``test/acc``, over the lr × λ grid (only when the sweep
  varies both; ``/`` in the name becomes ``_``);
* ``saliency_best_vs_baseline.png``: the best job's maps next to the baseline's (``loss=ce``) job's, from the
  pictures they drew (see :func:`~trustcnn.report.figures.write_saliency_picture`).

The best job and the baseline are picked as :mod:`trustcnn.report.selection` says (a validation metric, never a
test metric); groups and intervals as :mod:`trustcnn.report.stats` says.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from trustcnn.report.collect import JobResult, collect_sweep, evaluation_dir, read_evaluation
from trustcnn.report.figures import SALIENCY_PICTURE, write_heatmap, write_saliency_picture
from trustcnn.report.selection import pick_baseline, pick_best, selectable_metrics, selection_rule, selection_value
from trustcnn.report.selection import tested_epoch
from trustcnn.report.stats import confidence_interval, group_jobs, mean_std, nums, pair_with_baseline
from trustcnn.report.stats import paired_differences
from trustcnn.report.tables import all_jobs_lines, case_table_from_metrics, case_table_lines, evaluation_lines
from trustcnn.report.tables import failed_jobs_lines, fmt_ci, metric_table, paired_difference_lines
from trustcnn.report.tables import reference_level_lines, write_paired_csv, write_results_csv

log = logging.getLogger("trustcnn.report")

CLASSIFICATION = ("test/acc", "test/precision", "test/recall")
# The uniform map's energy pointing game sits next to the methods' (the level a trivial map reaches).
LOCALIZATION = ("test/pointing_game", "test/energy_pointing_game", "test/energy_pointing_game_uniform", "test/s_hat",
                "test/decoy_following_rate", "test_consistent/acc")
#: Flags of the report that computed (``--evaluate`` and its options): refused with the evaluate command instead.
REMOVED_FLAGS = {"--evaluate": False, "--eval-max-images": True, "--device": True}  # flag -> takes a value


def _hydra_value(path: Path) -> str:
    """``path`` as a Hydra override value: quoted when it holds characters Hydra's grammar reads (``=``, ``,``)."""
    text = str(path)
    return text if re.fullmatch(r"[\w/.~+:@-]+", text) else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def evaluate_command(sweep_dir: str | Path, best: JobResult | None, baseline: JobResult | None) -> str:
    """The ``python -m trustcnn.evaluate`` command that evaluates ``best`` against ``baseline`` into
    ``<sweep dir>/evaluation`` (without a baseline: no ``baseline=``; without either: placeholders)."""
    args = ["python", "-m", "trustcnn.evaluate"]
    if baseline is not None:
        args.append(f"baseline={_hydra_value(baseline.path)}")
    elif best is None:
        args.append("baseline=<run dir>")
    args.append(f"runs=[{_hydra_value(best.path) if best is not None else '<run dir>'}]")
    if best is not None and baseline is not None and best.config.get("saliency") != baseline.config.get("saliency"):
        args.append(f"saliency={best.config.get('saliency')}")  # both sides explained with the best job's method
    args.append(f"out={_hydra_value(evaluation_dir(sweep_dir))}")
    return " ".join(a if a == shlex.quote(a) else shlex.quote(a) for a in args)


def _header(sweep_dir: str | Path, jobs: list[JobResult], ok: list[JobResult], metric: str, mode: str,
            best: JobResult | None, baseline: JobResult | None) -> list[str]:
    if metric.startswith("best_"):
        what = "best validation value during training, not necessarily at the tested checkpoint"
    else:
        what = ("validation " if metric.split("/", 1)[0].startswith("val") else "") + \
            "value at each job's tested checkpoint"
    picked = "none"
    if best is not None:
        epoch = tested_epoch(best)
        picked = (f"job {best.num} ({selection_value(best, metric)[0]:.4f}"
                  + (f", tested epoch {epoch}" if epoch is not None else "") + ")")
    return [f"# Sweep report: `{Path(sweep_dir)}`", "",
            f"{len(jobs)} jobs: {len(ok)} finished, {len(jobs) - len(ok)} failed. Best by `{metric}` ({mode}; {what}): "
            + picked + "; baseline (loss=ce): " + (f"job {baseline.num}" if baseline else "none") + ". "
            "Jobs are never picked by a test metric.", ""]


def _table3(sweep_dir: str | Path, best: JobResult | None, baseline: JobResult | None,
            evaluation: dict[str, Any] | None) -> list[str]:
    """Table 3: the case tables the best job and the baseline logged, and the evaluation's."""
    md = ["## Table 3: case table (paper's Table 3)", ""]
    logged = {f"{label}: job {job.num}": t for label, job in (("baseline", baseline), ("best", best))
              if job is not None and (t := case_table_from_metrics(job))}
    if logged:
        md += ["From the jobs' `metrics.json` (their test set; accurate map = energy pointing game >= 0.5). "
               "Fraction [Wilson 95% CI] (count).", ""] + case_table_lines(logged)
    evaluated = {name: m["case_table"] for name, m in (evaluation or {}).get("models", {}).items()
                 if isinstance(m.get("case_table"), dict)}
    if evaluated:
        data, settings = evaluation.get("data", {}), evaluation.get("settings", {})  # type: ignore[union-attr]
        md += [f"From `{evaluation_dir(sweep_dir) / 'evaluation.json'}`: {data.get('num_images', '?')} test images; "
               f"accurate map = energy pointing game >= {settings.get('accurate_threshold', '?')}. Fraction [Wilson "
               "95% CI] (count).", ""] + case_table_lines(evaluated)
    elif evaluation is not None and not logged:
        md += ["The evaluated data has no masks: no case table.", ""]
    if not logged and evaluation is None:
        if best is None:
            md += ["No finished job: no case table.", ""]
        else:
            md += ["The jobs' metrics hold no case table. Compute it for the best job and the baseline with", "",
                   "```bash", evaluate_command(sweep_dir, best, baseline), "```", "",
                   "and run this report again.", ""]
    return md


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    mode: str | None = None,
    grid: bool = True,
) -> dict[str, Any]:
    """Collect a sweep and write ``results.csv``, ``report.md``, the heatmaps and the best-vs-baseline picture.

    Args:
        sweep_dir: the multirun directory.
        out_dir: where to write (default: ``sweep_dir``).
        metric: the validation metric that picks the best job (and the baseline), read per job by
            :func:`~trustcnn.report.selection.selection_value`; default: the jobs' ``optimized_metric``. A test
            metric is refused. Heatmaps are drawn for it and for ``test/acc``.
        mode: ``"max"`` or ``"min"``: whether a higher or lower ``metric`` is better; default: the jobs'
            ``callbacks.model_checkpoint.mode`` for their optimized metric, else inferred from the name
            (:func:`trustcnn.checkpoints.metric_mode`: losses are minimized).
        grid: put the best job's saliency maps next to the baseline's.

    Returns:
        ``{"jobs": [...], "best": JobResult | None, "baseline": ..., "metric": str, "mode": str,
        "files": {name: path}, "notes": [...], "markdown": str, "paired": paired_differences(jobs),
        "paired_markdown": str, "evaluation": evaluation.json's content | None, "evaluate_command": str | None}``.

    Raises:
        ValueError: a test metric, a metric no finished job has, an ambiguous default (see
            :func:`~trustcnn.report.selection.selection_rule`) or an unreadable ``evaluation.json``; raised
            before anything is written.
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
                         f"recorded have); choose one of: {', '.join(selectable_metrics(jobs)) or 'none'}.")
    evaluation = read_evaluation(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"results.csv": write_results_csv(jobs, out / "results.csv")}
    notes: list[str] = []
    if duplicates:
        notes.append(f"Job(s) {nums(duplicates)} repeat the configuration of job(s) "
                     f"{', '.join(sorted({str(j.duplicate_of) for j in duplicates}, key=str))}: they differ "
                     "only in settings that do not apply to their loss (e.g. λ or the ablation of loss=ce), so the "
                     "sweep ran that configuration once; counted once here.")
    fallback = [j for j in ok if ranked[j.job][1] not in (None, metric)]
    if fallback:
        notes.append(f"Job(s) {nums(fallback)} have no `{metric}` in metrics.json (made before runs recorded the "
                     f"validation metrics of the tested checkpoint; they tested their best checkpoint): ranked by "
                     f"their `best_{metric}`, the value at that checkpoint.")
    unranked = [j for j in ok if ranked[j.job][1] is None]
    if unranked:
        notes.append(f"Job(s) {nums(unranked)} have neither `{metric}` nor (as runs made before `tested_epoch` was "
                     f"recorded) `best_{metric}` in metrics.json: not ranked for the best job.")
    groups = group_jobs(jobs)
    best = pick_best(jobs, metric, mode)
    baseline = pick_baseline(jobs, best, metric, mode)
    command = evaluate_command(sweep_dir, best, baseline) if best is not None and evaluation is None else None

    md = _header(sweep_dir, jobs, ok, metric, mode, best, baseline)
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    present = [m for m in CLASSIFICATION if m in available] or [metric]
    md += ["## Table 1: classification (mean ± std over seeds)", "",
           "Rows: model (loss × saliency method) and ablation, plus every other setting the sweep varies; "
           "`jobs` counts the seeds averaged.", ""]
    md += metric_table(groups, present, mean_std)
    md += ["## Table 2: classification with 95% confidence intervals", "",
           "With >= 2 seeds: t-interval over seeds. With one seed: Wilson interval over the n test images of the "
           "job's run.json (exact for accuracy, approximate for macro precision/recall). No interval where n is "
           "not recorded.", ""]

    def ci_cell(group: list[JobResult], m: str) -> str:
        mean, low, high, method = confidence_interval(group, m)
        return fmt_ci(mean, low, high) + (f" ({method})" if math.isfinite(low) else "")

    md += metric_table(groups, present, ci_cell)
    md += _table3(sweep_dir, best, baseline, evaluation)
    if evaluation is not None:
        md += evaluation_lines(evaluation, str(evaluation_dir(sweep_dir) / "evaluation.json"))
    elif command is not None:
        md += ["## Evaluation (`trustcnn.evaluate`)", "",
               "Not run yet. SSIM against the baseline, deletion/insertion, the model-randomization check and "
               "the case table of the best job against the baseline, on the same test images:", "",
               "```bash", command, "```", "", "then run this report again: it reads "
               f"`{evaluation_dir(sweep_dir) / 'evaluation.json'}`.", ""]

    if ok:
        md += reference_level_lines(jobs)
    other = [m for m in LOCALIZATION if m in available]
    if other:
        md += ["## Test-time localization and decoy reliance (mean ± std over seeds)", ""]
        md += metric_table(groups, other, mean_std)
    paired = paired_differences(jobs)
    paired_md = paired_difference_lines(jobs, paired)
    md += paired_md
    files["paired_differences.csv"] = write_paired_csv(paired, out / "paired_differences.csv")
    unpaired = pair_with_baseline(jobs).unpaired
    if unpaired and any(j.ok and j.config.get("loss") == "ce" for j in jobs):
        notes.append(f"Job(s) {nums([j for j, _ in unpaired])} have no loss=ce job to pair with (see the paired "
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
    picture, caption = None, ("disabled (--no-grid)" if not grid else "no finished loss=ce job to compare with"
                              if baseline is None else "no finished trust-loss job")
    if grid and best is not None and baseline is not None and best is not baseline:
        picture, caption = write_saliency_picture(best, baseline, Path(sweep_dir), evaluation, out / SALIENCY_PICTURE)
    if picture is not None:
        files[picture.name] = picture
        md += [f"![saliency maps]({picture.name})", "", caption, ""]
    else:
        notes.append(f"No saliency picture: {caption}.")
        md += [f"No saliency picture: {caption}.", ""]

    md += all_jobs_lines(jobs, metric, fallback)
    md += failed_jobs_lines(jobs)
    (out / "report.md").write_text("\n".join(md))
    files["report.md"] = out / "report.md"
    return {"jobs": jobs, "best": best, "baseline": baseline, "metric": metric, "mode": mode, "files": files,
            "notes": notes, "markdown": "\n".join(md), "paired": paired, "paired_markdown": "\n".join(paired_md),
            "evaluation": evaluation, "evaluate_command": command}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trustcnn.report",
                                description="Aggregate a `python -m trustcnn.train -m` sweep (and its evaluation, "
                                            "<sweep dir>/evaluation/evaluation.json) into results.csv, report.md "
                                            "(paper-style tables), lr × λ heatmaps and saliency pictures, from the "
                                            "files the runs wrote; nothing is computed on a model. The best job is "
                                            "picked by a validation metric (the runs' optimized_metric unless "
                                            "--metric), never by a test metric.")
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
    p.add_argument("--no-grid", action="store_true", help="skip the best-vs-baseline saliency picture")
    return p


def _split_removed(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(argv without the flags of REMOVED_FLAGS and their values, the removed flags given)``."""
    kept: list[str] = []
    removed: list[str] = []
    args = iter(argv)
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in REMOVED_FLAGS:
            removed.append(flag)
            if REMOVED_FLAGS[flag] and "=" not in arg:
                next(args, None)
        else:
            kept.append(arg)
    return kept, removed


def _removed_message(flags: list[str], args: argparse.Namespace) -> str:
    try:  # the real command when the sweep can be read; its placeholders otherwise
        jobs = [j for j in collect_sweep(args.sweep_dir) if j.status != "duplicate"]
        metric, mode = selection_rule(jobs, args.metric, args.mode)
        best = pick_best(jobs, metric, mode)
        command = evaluate_command(args.sweep_dir, best, pick_baseline(jobs, best, metric, mode))
    except (FileNotFoundError, ValueError):
        command = evaluate_command(args.sweep_dir, None, None)
    return (f"{', '.join(dict.fromkeys(flags))}: removed; the report only aggregates what runs and evaluations wrote. "
            f"Evaluate with `{command}`, then run `python -m trustcnn.report {shlex.quote(args.sweep_dir)}` again "
            "(it reads that evaluation.json).")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trustcnn.report``: write the report, print report.md, then its path and the paired differences."""
    from trustcnn.cli import full_error, report_failure

    parser = build_parser()
    kept, removed = _split_removed(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(kept)
    if removed:
        parser.exit(2, f"{parser.prog}: error: {_removed_message(removed, args)}\n")
    try:
        result = write_report(args.sweep_dir, args.out, args.metric, args.mode, not args.no_grid)
    except (FileNotFoundError, ValueError) as err:  # a run, directory or option that does not fit: exit 2
        if full_error():
            raise
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except Exception as err:  # a failure at run time: one message, exit 1, no traceback (trustcnn.cli)
        report_failure(parser.prog, err, fix="give --out a writable directory" if isinstance(err, OSError) else None)
    print(result["markdown"])
    # The headline comparison last, where a terminal leaves it in view.
    print(f"\nReport: {result['files']['report.md']}\n\n{result['paired_markdown']}")
    if result["evaluate_command"]:
        print(f"\nNo evaluation yet; make one with:\n  {result['evaluate_command']}")
    print("\nWritten: " + ", ".join(str(p) for p in result["files"].values()), file=sys.stderr)
