"""The published shortcut study (experiments/shortcut_study/): what its README says is what the runs recorded.

The study's run records (each job's metrics.json, run.json, config and overrides; no checkpoints) are committed
under ``experiments/shortcut_study/runs/``. The README's tables must be exactly what ``python -m trustcnn.report``
prints for them, and the report's paired differences must be the per-seed differences of the jobs' own metrics.
No training: the report reads files only (about a second).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from trustcnn.report import write_report
from trustcnn.shortcut_study import (
    ARMS,
    DEPTHS,
    SEEDS,
    count_jobs,
    final_command,
    final_jobs,
    maps_commands,
    write_arm_configs,
    write_scatter,
)

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "experiments" / "shortcut_study"
FINAL = STUDY / "runs" / "final"
TABLE = re.compile(r"<!-- report:begin -->\n(.*?)<!-- report:end -->", re.S)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_report(FINAL, tmp_path_factory.mktemp("shortcut_report"), grid=False)


def _metric(job: str, key: str) -> float:
    return json.loads((FINAL / job / "metrics.json").read_text())[key]


def test_every_final_job_of_the_protocol_is_recorded(report: dict) -> None:
    """105 jobs = 7 arms × 3 depths × 5 seeds, as the study's command expands them; the failures are recorded."""
    assert len(ARMS) * len(DEPTHS) * len(SEEDS) == 105 == len(report["jobs"])
    statuses = [j.status for j in report["jobs"]]
    assert statuses.count("ok") == 97 and statuses.count("failed") == 8


def test_the_final_command_composes_to_the_recorded_job_count(tmp_path: Path) -> None:
    chosen = json.loads((STUDY / "runs" / "selected.json").read_text())
    conf = write_arm_configs(tmp_path, chosen)
    assert count_jobs(final_command(tmp_path, conf, [], ARMS, SEEDS, DEPTHS)) == 105


def test_paired_differences_are_the_per_seed_differences_of_the_jobs_metrics(report: dict) -> None:
    """trust_mask at the paper's depth minus cross-entropy, energy pointing game: jobs 60-64 minus jobs 0-4
    (arm-major job numbering: +arm × model.trainable × seed), mean and t-interval computed here with scipy."""
    diffs = np.array([_metric(str(60 + s), "test/energy_pointing_game") - _metric(str(s), "test/energy_pointing_game")
                      for s in SEEDS])
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    row = next(r for r in report["paired"] if r["model"] == "trust_mask × gradcam"
               and r["settings"]["model.trainable"] == "last_conv" and r["metric"] == "test/energy_pointing_game")
    assert row["n"] == 5
    assert row["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), abs=1e-12)


def test_the_readme_tables_are_what_the_report_prints(report: dict) -> None:
    readme = (STUDY / "README.md").read_text()
    tables = TABLE.findall(readme)
    assert len(tables) >= 3, "the README marks its report tables with <!-- report:begin --> / <!-- report:end -->"
    printed = report["markdown"]
    for table in tables:
        assert table.strip() in printed, f"not in the report's output:\n{table[:400]}"


def test_the_maps_compare_each_arms_seed_0_job_with_the_ce_job_of_its_depth() -> None:
    commands = {c[c.index("trustcnn.evaluate") + 1:][3].split("/")[-1]: c for c in maps_commands(STUDY / "runs")}
    assert set(commands) == set(DEPTHS)
    last_conv = commands["last_conv"]
    assert f"baseline='{FINAL / '0'}'" in last_conv  # ce, last_conv, seed 0
    assert f"runs=[{','.join(repr(str(FINAL / str(n))) for n in (15, 30, 45, 60, 75, 90))}]" in last_conv
    assert "names=[ce,ce_guided,trust,trust_guided,trust_mask,rrr,cam_outside]" in last_conv
    # With all layers trainable, RRR and cam_outside's seed 0 diverged: they are left out, not shown as blanks.
    assert "names=[ce,ce_guided,trust,trust_guided,trust_mask]" in commands["all"]


def test_the_scatter_has_one_point_per_finished_job(tmp_path: Path) -> None:
    path = write_scatter(STUDY / "runs", path=tmp_path / "scatter.png")
    assert path.stat().st_size > 20_000
    jobs = final_jobs(STUDY / "runs")
    assert len(jobs) == 97 and {j["arm"] for j in jobs} == {a.name for a in ARMS}
    assert sum(j["depth"] == "all" and j["arm"] in ("rrr", "cam_outside") for j in jobs) == 2
