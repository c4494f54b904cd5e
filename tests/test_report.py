"""`trustcnn.report` on real tiny runs made by the real `train(cfg)` (the `sweep` fixture, tests/tiny_sweep.py).

The report only reads what the runs wrote (and `<sweep>/evaluation/evaluation.json`); the last test runs the real
command-line multirun and report as subprocesses (~17 s on 2 idle cores, so not marked slow).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from hydra.core.override_parser.overrides_parser import OverridesParser

from trustcnn.metrics import CASE_NAMES, wilson_interval
from trustcnn.report import collect_sweep, confidence_interval, group_jobs, mean_std, selection_value, write_report
from trustcnn.report import main as report_main
from trustcnn.report.tables import CASE_NAMES as REPORT_CASE_NAMES
from tiny_sweep import job

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def report(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("report")
    return write_report(sweep, out)  # picks by optimized_metric


def run_record(job_dir: Path) -> dict:
    return json.loads((job_dir / "run.json").read_text())


def evaluate_overrides(command: str) -> dict:
    """The overrides of a printed `python -m trustcnn.evaluate ...` command, as the shell and Hydra read them."""
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "trustcnn.evaluate"]
    parsed = OverridesParser.create().parse_overrides(args[3:])
    return {o.key_or_group: o.value() for o in parsed}


def test_collect_sweep_reads_overrides_config_metrics_and_errors(sweep: Path) -> None:
    jobs = collect_sweep(sweep)
    assert [j.num for j in jobs] == [0, 1, 2, 3, 4]
    assert [j.status for j in jobs] == ["ok"] * 4 + ["failed"]
    assert jobs[0].overrides == {}  # no .hydra/overrides.yaml; its settings come from config.yaml
    assert jobs[3].overrides == {"loss": "trust_mask", "optim.lr": "0.001", "loss.lam": "0.5"}
    assert jobs[3].config | {"seed": 0} == {"loss": "trust_mask", "lam": 0.5, "weight": None, "form": "paper",
                                            "lr": 0.001, "ablation": "none", "saliency": "gradcam", "seed": 0}
    assert jobs[0].config["lam"] is None and jobs[0].config["loss"] == "ce"
    assert "test/acc" in jobs[1].metrics and not jobs[4].metrics
    assert jobs[4].error.startswith("ValueError: loss.lam must lie in [0, 1]")
    assert jobs[4].config["lam"] == 1.5  # config.yaml is written before the failure
    for j in jobs[:4]:  # what run.json records, nothing looked up elsewhere
        assert (j.test_size, j.num_classes) == (run_record(j.path).get("test_images"), run_record(j.path).get("num_classes"))


def test_seeds_are_averaged_with_a_t_interval(sweep: Path) -> None:
    """Two seeds of one setting form one group: mean ± sample std, and the t-interval over seeds."""
    jobs = collect_sweep(sweep)
    a = replace(jobs[1], config={**jobs[1].config, "seed": 0}, metrics={"test/acc": 0.625}, test_size=64)
    b = replace(jobs[1], config={**jobs[1].config, "seed": 1}, metrics={"test/acc": 0.725}, test_size=64,
                overrides={**jobs[1].overrides, "seed": "1"})
    groups = group_jobs([a, b])
    assert len(groups) == 1
    (group,) = groups.values()
    assert mean_std(group, "test/acc") == "0.675 ± 0.071"
    mean, low, high, method = confidence_interval(group, "test/acc")
    half = stats.t.ppf(0.975, 1) * np.std([0.625, 0.725], ddof=1) / math.sqrt(2)
    assert (mean, low, high) == pytest.approx((0.675, 0.675 - half, 0.675 + half)) and method == "t, 2 seeds"
    _, low1, high1, method1 = confidence_interval([a], "test/acc")  # 40 of 64 images right
    # trustcnn.metrics rounds z to 1.96; scipy uses the exact quantile 1.95996...
    assert (low1, high1) == pytest.approx(wilson_interval(40, 64), abs=1e-5) and method1 == "Wilson, n=64"
    _, low0, _, method0 = confidence_interval([replace(a, test_size=None)], "test/acc")
    assert math.isnan(low0) and method0 == "no CI"  # run.json without test_images: no interval is guessed


def test_report_writes_results_csv(report: dict) -> None:
    rows = list(csv.DictReader(report["files"]["results.csv"].open()))
    assert len(rows) == 5
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"]
    assert [r["num"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[1]["overrides"] == "optim.lr=0.01 loss.lam=0.5" and rows[1]["lr"] == "0.01"
    metrics = json.loads((report["jobs"][1].path / "metrics.json").read_text())
    assert float(rows[1]["test/acc"]) == pytest.approx(metrics["test/acc"])
    assert rows[1]["test_size"] == str(run_record(report["jobs"][1].path).get("test_images") or "")
    assert "loss.lam must lie in [0, 1]" in rows[4]["error"] and rows[4]["test/acc"] == ""


def test_report_markdown_tables_and_failed_jobs(report: dict, sweep: Path) -> None:
    md = report["files"]["report.md"].read_text()
    for heading in ("## Table 1", "## Table 2", "## Table 3", "## Failed jobs", "## All jobs"):
        assert heading in md, heading
    table1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "| ce × gradcam | — |" in table1  # ablation and λ are meaningless for the baseline
    assert "| trust × gradcam | none | 0.9 | 0.01 | 1 |" in table1
    assert "trust_mask × gradcam" in table1
    n = run_record(report["jobs"][1].path).get("test_images")
    table2 = md.split("## Table 2")[1].split("## Table 3")[0]
    assert (f"(Wilson, n={n})" in table2) == (n is not None)
    table3 = md.split("## Table 3")[1].split("##")[0]
    assert "From the jobs' `metrics.json`" in table3  # train.py logs the case table of the test set
    assert "correct prediction, accurate map" in table3 and "baseline: job 0" in table3
    best = report["best"]
    assert f"| 1: correct prediction, accurate map | {report['baseline'].metrics['test/case1_fraction']:.3f}" in table3
    assert f"best: job {best.num}" in table3
    # No evaluation.json: the report names the command that makes one, with the real job directories.
    evaluation = md.split("## Evaluation (`trustcnn.evaluate`)")[1].split("\n## ")[0]
    assert "Not run yet" in evaluation and report["evaluate_command"] in evaluation
    assert evaluate_overrides(report["evaluate_command"]) == {
        "baseline": str(job(sweep, 0)), "runs": [str(job(sweep, best.num))], "out": str(sweep / "evaluation")}
    ref = md.split("## Reference levels")[1].split("\n## ")[0]
    k = run_record(best.path).get("num_classes")
    assert ("1/10 = 0.100" in ref) == (k == 10) and "`test/energy_pointing_game_uniform`" in ref
    paired = md.split("## Paired differences vs. cross-entropy")[1].split("\n## ")[0]
    assert "| trust × gradcam | none | 0.9 | 0.01 | 1 (0) | " in paired and "(1/1)" in paired  # one seed: vs. job 0
    failed = md.split("## Failed jobs")[1]
    assert "| 4 | `optim.lr=0.001 loss.lam=1.5` | ValueError: loss.lam must lie in [0, 1]" in failed
    assert "| 0 | ok | — |" in md.split("## All jobs")[1]  # job 0 has no overrides.yaml


def test_the_report_has_table_3s_case_names() -> None:
    assert REPORT_CASE_NAMES == CASE_NAMES


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
    picture = report["files"]["saliency_best_vs_baseline.png"]  # the two runs' own saliency_grid.png, side by side
    assert picture.stat().st_size > (best.path / "saliency_grid.png").stat().st_size
    assert "each run's own `saliency_grid.png`" in report["markdown"]


def test_report_without_lam_variation_skips_the_heatmap_with_a_note(sweep: Path, tmp_path: Path) -> None:
    small = tmp_path / "sweep"
    small.mkdir()
    for num in (0, 1):  # the baseline and one trust job: nothing to draw over lr × λ
        (small / job(sweep, num).name).symlink_to(job(sweep, num), target_is_directory=True)
    result = write_report(small, metric="val/acc", grid=False)
    assert not list(small.glob("heatmap_*.png"))
    assert any(n.startswith("No heatmap: the sweep does not vary both") for n in result["notes"])
    assert "No saliency picture: disabled (--no-grid)." in (small / "report.md").read_text()


def _case_table(counts: list[int]) -> dict[str, float]:
    """A case table as evaluation.json holds it (trustcnn.metrics.CaseTable's keys), its CIs from scipy."""
    total = sum(counts)
    table: dict[str, float] = {"total": float(total), "skipped": 0.0}
    for c, k in enumerate(counts, start=1):
        ci = stats.binomtest(k, total).proportion_ci(0.95, method="wilson")
        table.update({f"case{c}_count": float(k), f"case{c}_fraction": k / total, f"case{c}_ci_low": ci.low,
                      f"case{c}_ci_high": ci.high})
    return table


def _estimate(value: float, low: float, high: float, n: int = 16) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high, "n": n, "method": "t"}


def test_evaluation_json_fills_table_3_for_runs_without_a_logged_case_table(sweep: Path, tmp_path: Path) -> None:
    """Runs made before train.py logged the case table: the report names the evaluate command; once
    `<sweep>/evaluation/evaluation.json` exists, Table 3, the evaluation's tables and its picture come from it."""
    old = tmp_path / "sweep"
    for num in (0, 1):
        shutil.copytree(job(sweep, num), old / job(sweep, num).name)
        metrics_file = old / job(sweep, num).name / "metrics.json"
        metrics = {k: v for k, v in json.loads(metrics_file.read_text()).items() if "/case" not in k}
        metrics_file.write_text(json.dumps(metrics))
    without = write_report(old, tmp_path / "plain")
    table3 = without["markdown"].split("## Table 3")[1].split("\n## ")[0]
    assert "The jobs' metrics hold no case table" in table3 and without["evaluate_command"] in table3
    assert evaluate_overrides(without["evaluate_command"]) == {
        "baseline": str(old / job(sweep, 0).name), "runs": [str(old / job(sweep, 1).name)],
        "out": str(old / "evaluation")}

    evaluation = old / "evaluation"
    (evaluation / ".hydra").mkdir(parents=True)  # as the evaluate app's Hydra output directory has
    (evaluation / ".hydra" / "overrides.yaml").write_text(f"- baseline={old / job(sweep, 0).name}\n")
    shutil.copyfile(job(sweep, 1) / "saliency_grid.png", evaluation / "saliency_comparison.png")
    models = {
        "0_loss=ce": {"run_dir": str(old / job(sweep, 0).name), "loss": "ce", "saliency": "gradcam",
                      "accuracy": _estimate(0.5, 0.28, 0.72, 16), "case_table": _case_table([3, 1, 5, 7])},
        "1_loss.lam=0.5,optim.lr=0.01": {
            "run_dir": str(old / job(sweep, 1).name), "loss": "trust", "saliency": "gradcam",
            "accuracy": _estimate(0.5625, 0.33, 0.77), "case_table": _case_table([4, 2, 5, 5]),
            "ssim_vs_baseline": _estimate(0.612, 0.501, 0.723),
            "randomization": {"spearman": _estimate(0.25, 0.1, 0.4), "ssim": _estimate(0.3, 0.2, None),
                              "spearman_undefined": 0}},
    }
    (evaluation / "evaluation.json").write_text(json.dumps({
        "data": {"datamodule": "DecoyDigitsDataModule", "test_set": "test", "test_set_size": 400, "num_images": 16,
                 "num_classes": 10, "has_masks": True},
        "settings": {"accurate_threshold": 0.5, "ssim_size": [32, 32]}, "baseline": "0_loss=ce", "warnings": [],
        "models": models}))
    result = write_report(old, tmp_path / "evaluated")
    md = result["markdown"]
    assert [j.num for j in result["jobs"]] == [0, 1]  # the evaluation directory is not a job
    assert result["evaluate_command"] is None and "Not run yet" not in md
    table3 = md.split("## Table 3")[1].split("\n## ")[0]
    assert "16 test images; accurate map = energy pointing game >= 0.5" in table3
    low, high = wilson_interval(4, 16)
    assert f"| 1: correct prediction, accurate map | 0.188 [" in table3
    assert f"| 0.250 [{low:.3f}, {high:.3f}] (4) |" in table3
    assert "| 4: wrong prediction, inaccurate map | 0.438 [" in table3 and "(7) | 0.312 [" in table3
    section = md.split("## Evaluation (`trustcnn.evaluate`)")[1].split("\n## ")[0]
    assert "16 of 400 images of the `test` set" in section
    assert "| 0_loss=ce (baseline) | 0.500 [0.280, 0.720] | — | — |" in section
    assert "### SSIM vs. baseline `0_loss=ce` (eq. 11)" in section
    assert "| 1_loss.lam=0.5,optim.lr=0.01 | 0.612 [0.501, 0.723] |" in section
    assert "| 1_loss.lam=0.5,optim.lr=0.01 | 0.250 [0.100, 0.400] | 0.300 |" in section  # no upper bound: value only
    assert "### Faithfulness" not in section  # not in this evaluation.json
    picture = result["files"]["saliency_best_vs_baseline.png"]
    assert picture.read_bytes() == (evaluation / "saliency_comparison.png").read_bytes()

    (evaluation / "evaluation.json").write_text("{")
    with pytest.raises(ValueError, match="evaluation.json is not valid JSON"):
        write_report(old, tmp_path / "broken")


def test_removed_flags_name_the_evaluate_command(sweep: Path, tmp_path: Path, capsys) -> None:
    for argv in (["--evaluate"], ["--eval-max-images", "16", "--device", "cpu"], ["--device=cpu"]):
        with pytest.raises(SystemExit) as exc:
            report_main([*argv, str(sweep), "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "removed; the report only aggregates" in err and argv[0].split("=")[0] in err
        command = err.split("Evaluate with `")[1].split("`")[0]
        assert evaluate_overrides(command)["baseline"] == str(job(sweep, 0))
    assert not list(tmp_path.iterdir())  # refused before writing


def test_the_report_imports_no_torch(sweep: Path, tmp_path: Path) -> None:
    """The whole report, heatmaps and picture included, in a process that never imports torch."""
    code = ("import sys; from trustcnn.report import main; main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(sweep), "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"report.md", "results.csv", "heatmap_val_acc.png", "saliency_best_vs_baseline.png"} <= \
        {p.name for p in tmp_path.iterdir()}


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


def test_run_json_records_the_tested_images_and_classes_the_report_uses(sweep: Path) -> None:
    """train writes the main test set's size (limit_test_batches=1 × batch 64) and the class count into run.json;
    the report reads them (its Wilson intervals and the accuracy a guess scores) without building any data."""
    run = json.loads((job(sweep, 1) / "run.json").read_text())
    assert run["test_images"] == 64 and run["num_classes"] == 10
    jobs = {j.num: j for j in collect_sweep(sweep)}
    assert jobs[1].test_size == 64 and jobs[1].num_classes == 10
