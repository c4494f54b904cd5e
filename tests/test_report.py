"""`trustcnn.report` on real tiny runs made by the real `train(cfg)` (the `sweep` fixture, tests/tiny_sweep.py).

The last test runs the real command-line multirun and report as subprocesses (~17 s on 2 idle cores, so not
marked slow).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from trustcnn.metrics import wilson_interval
from trustcnn.report import collect_sweep, confidence_interval, group_jobs, mean_std, selection_value, write_report
from trustcnn.report import main as report_main
from tiny_sweep import job

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def report(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("report")
    return write_report(sweep, out, evaluate=True, eval_max_images=32, device="cpu")  # picks by optimized_metric


def test_collect_sweep_reads_overrides_config_metrics_and_errors(sweep: Path) -> None:
    jobs = collect_sweep(sweep)
    assert [j.num for j in jobs] == [0, 1, 2, 3, 4]
    assert [j.status for j in jobs] == ["ok"] * 4 + ["failed"]
    assert jobs[0].overrides == {"loss": "ce"}  # from the dir name (no .hydra/overrides.yaml)
    assert jobs[3].overrides == {"loss": "trust_mask", "optim.lr": "0.001", "loss.lam": "0.5"}
    assert jobs[3].config | {"seed": 0} == {"loss": "trust_mask", "lam": 0.5, "form": "paper", "lr": 0.001,
                                            "ablation": "none", "saliency": "gradcam", "seed": 0}
    assert jobs[0].config["lam"] is None and jobs[0].config["loss"] == "ce"
    assert "test/acc" in jobs[1].metrics and not jobs[4].metrics
    assert jobs[4].error.startswith("ValueError: loss.lam must lie in [0, 1]")
    assert jobs[4].config["lam"] == 1.5  # config.yaml is written before the failure


def test_seeds_are_averaged_with_a_t_interval(sweep: Path) -> None:
    """Two seeds of one setting form one group: mean ± sample std, and the t-interval over seeds."""
    jobs = collect_sweep(sweep)
    a = replace(jobs[1], config={**jobs[1].config, "seed": 0}, metrics={"test/acc": 0.60}, test_size=64)
    b = replace(jobs[1], config={**jobs[1].config, "seed": 1}, metrics={"test/acc": 0.70}, test_size=64,
                overrides={**jobs[1].overrides, "seed": "1"})
    groups = group_jobs([a, b])
    assert len(groups) == 1
    (group,) = groups.values()
    assert mean_std(group, "test/acc") == "0.650 ± 0.071"
    mean, low, high, method = confidence_interval(group, "test/acc")
    half = stats.t.ppf(0.975, 1) * np.std([0.6, 0.7], ddof=1) / math.sqrt(2)
    assert (mean, low, high) == pytest.approx((0.65, 0.65 - half, 0.65 + half)) and method == "t, 2 seeds"
    _, low1, high1, method1 = confidence_interval([a], "test/acc")
    assert (low1, high1) == pytest.approx(wilson_interval(0.6 * 64, 64)) and method1 == "Wilson, n=64"


def test_report_writes_results_csv(report: dict) -> None:
    rows = list(csv.DictReader(report["files"]["results.csv"].open()))
    assert len(rows) == 5
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"]
    assert rows[1]["overrides"] == "optim.lr=0.01 loss.lam=0.5" and rows[1]["lr"] == "0.01"
    assert float(rows[1]["test/acc"]) == pytest.approx(report["jobs"][1].metrics["test/acc"])
    assert rows[1]["test_size"] == "64"  # limit_test_batches=1 × batch_size 64
    assert "loss.lam must lie in [0, 1]" in rows[4]["error"] and rows[4]["test/acc"] == ""


def test_report_markdown_tables_and_failed_jobs(report: dict) -> None:
    md = report["files"]["report.md"].read_text()
    for heading in ("## Table 1", "## Table 2", "## Table 3", "## Failed jobs", "## All jobs"):
        assert heading in md, heading
    table1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "| ce × gradcam | — |" in table1  # ablation and λ are meaningless for the baseline
    assert "| trust × gradcam | none | 0.9 | 0.01 | 1 |" in table1
    assert "trust_mask × gradcam" in table1
    table2 = md.split("## Table 2")[1].split("## Table 3")[0]
    assert "(Wilson, n=64)" in table2
    table3 = md.split("## Table 3")[1].split("##")[0]
    assert "From the jobs' `metrics.json`" in table3  # train.py logs the case table of the test set
    assert "correct prediction, accurate map" in table3 and "baseline: job 0" in table3
    best = report["best"]
    assert f"| 1: correct prediction, accurate map | {report['baseline'].metrics['test/case1_fraction']:.3f}" in table3
    assert f"best: job {best.num}" in table3
    evaluation = md.split("## Evaluation of the best job against the baseline")[1]
    assert "### SSIM vs. baseline" in evaluation and "### Model-randomization sanity check" in evaluation
    ref = md.split("## Reference levels")[1].split("\n## ")[0]
    assert "1/10 = 0.100" in ref and "`test/energy_pointing_game_uniform`" in ref  # K from the real data module
    paired = md.split("## Paired differences vs. cross-entropy")[1].split("\n## ")[0]
    assert "| trust × gradcam | none | 0.9 | 0.01 | 1 (0) | " in paired and "(1/1)" in paired  # one seed: vs. job 0
    failed = md.split("## Failed jobs")[1]
    assert "| 4 | `optim.lr=0.001 loss.lam=1.5` | ValueError: loss.lam must lie in [0, 1]" in failed
    assert (report["files"]["evaluation"] / "evaluation.json").exists()


def test_report_best_job_heatmap_and_grid(report: dict) -> None:
    best, jobs = report["best"], report["jobs"]
    assert (report["metric"], report["mode"]) == ("val/acc", "max")  # the runs' optimized_metric, not a test metric
    trained = [j for j in jobs if j.ok and j.config["loss"] != "ce"]
    # val/acc at the tested checkpoint (best_val/acc for runs made before that was recorded); ties: first job.
    values = [selection_value(j, "val/acc")[0] for j in trained]
    assert best is trained[values.index(max(values))]
    assert report["baseline"].num == 0
    assert report["files"]["heatmap_val_acc.png"].stat().st_size > 5000
    assert report["files"]["heatmap_test_acc.png"].stat().st_size > 5000  # test/acc is reported, not selected on
    assert report["files"]["saliency_best_vs_baseline.png"].stat().st_size > 5000


def test_report_without_lam_variation_skips_the_heatmap_with_a_note(sweep: Path, tmp_path: Path) -> None:
    small = tmp_path / "sweep"
    small.mkdir()
    for num in (0, 1):  # the baseline and one trust job: nothing to draw over lr × λ
        (small / job(sweep, num).name).symlink_to(job(sweep, num), target_is_directory=True)
    result = write_report(small, metric="val/acc", grid=False)
    assert not list(small.glob("heatmap_*.png"))
    assert any(n.startswith("No heatmap: the sweep does not vary both") for n in result["notes"])
    assert "Evaluation of the best job" not in (small / "report.md").read_text()  # no --evaluate


def test_report_evaluate_fills_table_3_for_runs_without_a_logged_case_table(sweep: Path, tmp_path: Path) -> None:
    """Runs made before train.py logged the case table: `--evaluate` computes it with trustcnn.evaluate."""
    old = tmp_path / "sweep"
    for num in (0, 1):
        shutil.copytree(job(sweep, num), old / job(sweep, num).name)
        metrics_file = old / job(sweep, num).name / "metrics.json"
        metrics = {k: v for k, v in json.loads(metrics_file.read_text()).items() if "/case" not in k}
        metrics_file.write_text(json.dumps(metrics))
    without = write_report(old, tmp_path / "plain", grid=False)["markdown"]
    assert "run the report with `--evaluate`" in without
    md = write_report(old, tmp_path / "evaluated", evaluate=True, eval_max_images=16, grid=False, device="cpu")["markdown"]
    table3 = md.split("## Table 3")[1].split("##")[0]
    assert "Computed by `trustcnn.evaluate` on 16 test images" in table3
    assert "| 4: wrong prediction, inaccurate map |" in table3 and "baseline: job 0" in table3


def test_report_lists_an_unfinished_job_as_failed(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    unfinished = copy / "5_loss.lam=0.7"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "overrides.yaml").write_text("- loss.lam=0.7\n")
    jobs = collect_sweep(copy)
    assert jobs[-1].num == 5 and jobs[-1].status == "failed" and "did not finish" in jobs[-1].error


def test_report_cli_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        report_main([str(tmp_path / "missing")])
    assert exc.value.code == 2 and "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_main([str(tmp_path)])
    assert "No job directory" in capsys.readouterr().err


def test_report_cli_rejects_an_unknown_metric(sweep: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        report_main([str(sweep), "--out", str(tmp_path), "--metric", "val/accuracy", "--no-grid"])
    err = capsys.readouterr().err
    assert "'val/accuracy'" in err and "val/acc" in err


def test_report_cli_refuses_to_select_on_a_test_metric(sweep: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        report_main([str(sweep), "--out", str(tmp_path), "--metric", "test/acc", "--no-grid"])
    assert exc.value.code == 2 and "'test/acc' is a test metric" in capsys.readouterr().err


def test_real_command_line_multirun_then_report(tmp_path: Path) -> None:
    """`python -m trustcnn.train -m` over lr × λ with failing lr = -1 jobs (the optimizer refuses it at run time; a
    bad λ would be refused on the command line), then `python -m trustcnn.report`."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train_cmd = [
        sys.executable, "-m", "trustcnn.train", "-m", "optim.lr=1e-2,-1", "loss.lam=0.5,0.9",
        "trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1", "++trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
        "model.pretrain.epochs=1", "data.batch_size=64", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}",
    ]
    done = subprocess.run(train_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]  # the lr = -1 jobs failed; the others finished
    report_cmd = [sys.executable, "-m", "trustcnn.report", str(sweep_dir), "--no-grid"]  # by optimized_metric
    done = subprocess.run(report_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Table 1" in done.stdout
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 4
    assert sorted(r["status"] for r in rows) == ["failed", "failed", "ok", "ok"]
    for r in rows:
        assert (r["status"] == "failed") == (r["lr"] == "-1")
        assert f"optim.lr={r['lr']}" in r["overrides"] and f"loss.lam={r['lam']}" in r["overrides"]
    md = (sweep_dir / "report.md").read_text()
    assert md.count("Invalid learning rate") == 2
    assert "Best by `val/acc` (max; " in md
    assert (sweep_dir / "heatmap_val_acc.png").stat().st_size > 5000
    assert (sweep_dir / "heatmap_test_acc.png").stat().st_size > 5000
    assert all(math.isfinite(float(r["test/acc"])) for r in rows if r["status"] == "ok")
