"""The report's pictures: the selection metric over the lr × λ grid, and the saliency maps of the best job next
to the baseline's, from the pictures the runs (or ``trustcnn.evaluate``) already drew. No model is loaded.

Matplotlib is used through ``Figure`` only (no pyplot), so a caller's backend (e.g. a notebook) is left alone.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from trustcnn.report.collect import JobResult, evaluation_dir
from trustcnn.report.stats import fmt_value, values, varying_keys

#: The picture ``train`` draws of each run's first test images (image, mask, map).
RUN_GRID = "saliency_grid.png"
#: The picture ``trustcnn.evaluate`` draws of every model it evaluated, on the same images.
EVALUATION_GRID = "saliency_comparison.png"
SALIENCY_PICTURE = "saliency_best_vs_baseline.png"


def write_heatmap(jobs: list[JobResult], metric: str, path: Path,
                  value: Callable[[JobResult], float] | None = None) -> Path | str:
    """``metric`` over lr × λ (mean over seeds), one panel per setting of the other varied keys.

    ``value`` reads a job's value (default: ``metrics[metric]``; the report passes the selection value for the
    selection metric so old runs show the ``best_`` value it ranked them by).
    Returns the PNG path, or the reason no heatmap was drawn. Cells of failed jobs read "failed".
    """
    from matplotlib.figure import Figure

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
        panels[tuple((c, fmt_value(j.config.get(c))) for c in panel_cols)
               + tuple((k, fmt_value(j.overrides.get(k))) for k in extra
                       if k.lstrip("+~") not in ("optim.lr", "loss.lam"))].append(j)
    finite = values([j for j in trust if j.ok], metric, value)
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = Figure(figsize=(1.6 + 1.3 * len(lams) * len(panels), 1.2 + 0.9 * len(lrs)))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (panel, members) in zip(axes[0], sorted(panels.items())):
        grid = np.full((len(lrs), len(lams)), np.nan)
        labels = [["" for _ in lams] for _ in lrs]
        for r, lr in enumerate(lrs):
            for c, lam in enumerate(lams):
                cell = [j for j in members if float(j.config["lr"]) == lr and float(j.config["lam"]) == lam]
                v = values([j for j in cell if j.ok], metric, value)
                if v.size:
                    grid[r, c] = v.mean()
                    labels[r][c] = f"{v.mean():.3f}" + (f"\n±{v.std(ddof=1):.3f}" if v.size > 1 else "")
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


def _describe(job: JobResult) -> str:
    return f"job {job.label}, {job.config.get('loss')} × {job.config.get('saliency')}"


def _evaluated(evaluation: dict[str, Any], job: JobResult) -> bool:
    return any(Path(str(m.get("run_dir", ""))).resolve() == job.path.resolve()
               for m in evaluation["models"].values())


def write_saliency_picture(best: JobResult, baseline: JobResult, sweep_dir: Path, evaluation: dict[str, Any] | None,
                           path: Path) -> tuple[Path | None, str]:
    """The best job's maps next to the baseline's, as ``path``; returns ``(path or None, caption or reason)``.

    The evaluation's ``saliency_comparison.png`` when ``evaluation.json`` covers both jobs (the same images,
    every model explained by one method); else the two runs' own ``saliency_grid.png`` side by side.
    """
    drawn = evaluation_dir(sweep_dir) / EVALUATION_GRID
    if evaluation is not None and drawn.exists() and _evaluated(evaluation, best) and _evaluated(evaluation, baseline):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(drawn, path)
        return path, (f"From `{drawn}`: every model `trustcnn.evaluate` evaluated (the baseline, {_describe(baseline)}, "
                      f"and the best, {_describe(best)}) on the same test images.")
    grids = [j.path / RUN_GRID for j in (baseline, best)]
    missing = [str(g) for g in grids if not g.exists()]
    if missing:
        return None, f"no {RUN_GRID} in {', '.join(missing)} (runs with grid_images=0 draw none)"
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    images = [imread(g) for g in grids]
    height = max(i.shape[0] for i in images)
    width = sum(i.shape[1] for i in images)
    fig = Figure(figsize=(width / 100, height / 100 + 0.4), dpi=100)
    for ax, image, title in zip(fig.subplots(1, 2), images, (f"baseline: {_describe(baseline)}",
                                                             f"best: {_describe(best)}")):
        ax.imshow(image)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    same = best.cfg is not None and baseline.cfg is not None and best.cfg.get("data") == baseline.cfg.get("data")
    caption = (f"Left: the baseline ({_describe(baseline)}); right: the best job ({_describe(best)}); each run's own "
               f"`{RUN_GRID}` (image, mask, map of the first test images; each run explains with its own method). ")
    caption += ("Both runs have the same data config, so these are the same images." if same else
                "The two runs' data configs differ: the images may differ too.")
    return path, caption
