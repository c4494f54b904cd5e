"""`trustcnn.evaluate` and `trustcnn.report` on real tiny runs made by the real `train(cfg)`.

A session fixture trains four tiny decoy-digit runs into a Hydra-multirun-shaped sweep directory
(`<sweep>/<num>_<overrides>/` with `.hydra/overrides.yaml`) and records one genuinely failing job
(λ = 1.5 raises before training) with `trustcnn.train._record_failure`. The last test runs the real
command-line multirun and report as subprocesses (~17 s on 2 idle cores, so not marked slow).
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
import torch
from omegaconf import OmegaConf, open_dict
from conftest import compose_config, shrink
from scipy import stats
from torchmetrics.classification import MulticlassPrecision, MulticlassRecall

from trustcnn.evaluate import (
    check_shared_test_set,
    classification_estimates,
    evaluate_runs,
    load_models,
    macro_precision_recall,
)
from trustcnn.evaluate import main as evaluate_main
from trustcnn.metrics import wilson_interval
from trustcnn.report import collect_sweep, confidence_interval, group_jobs, mean_std, selection_value, write_report
from trustcnn.report import main as report_main
from trustcnn.runs import load_run
from trustcnn.train import _record_failure, train

REPO = Path(__file__).resolve().parents[1]

# (job dir, overrides); job 0 gets no .hydra/overrides.yaml so the report falls back to the dir name.
JOBS = [
    ("0_loss=ce", ["loss=ce"]),
    ("1_loss.lam=0.5,optim.lr=0.01", ["optim.lr=0.01", "loss.lam=0.5"]),
    ("2_loss.lam=0.9,optim.lr=0.01", ["optim.lr=0.01", "loss.lam=0.9"]),
    ("3_loss=trust_mask,loss.lam=0.5,optim.lr=0.001", ["loss=trust_mask", "optim.lr=0.001", "loss.lam=0.5"]),
]
FAILED = ("4_loss.lam=1.5,optim.lr=0.001", ["optim.lr=0.001", "loss.lam=1.5"])


def tiny_cfg(overrides: list[str], output_dir: Path, cache_dir: Path):
    cfg = shrink(compose_config(overrides), output_dir, cache_dir)
    with open_dict(cfg):
        cfg.data.batch_size = 64
        cfg.trainer.limit_train_batches = 2
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1  # the test metrics cover the first 64 test images
        cfg.grid_images = 2
    return cfg


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evalreport")
    sweep_dir, cache = root / "sweep", root / "cache"
    for name, overrides in JOBS:
        job = sweep_dir / name
        train(tiny_cfg(overrides, job, cache))
        if not name.startswith("0_"):
            (job / ".hydra").mkdir()
            (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    name, overrides = FAILED
    cfg = tiny_cfg(overrides, sweep_dir / name, cache)
    try:
        train(cfg)
    except ValueError as err:
        _record_failure(cfg, err)
    else:
        pytest.fail("loss.lam=1.5 should fail before training")
    (sweep_dir / name / ".hydra").mkdir()
    (sweep_dir / name / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    return sweep_dir


def job(sweep: Path, num: int) -> Path:
    return sweep / (JOBS + [FAILED])[num][0]


@pytest.fixture(scope="session")
def evaluation(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("evaluation")
    return evaluate_runs([job(sweep, 1), job(sweep, 3)], baseline=job(sweep, 0), out_dir=out, max_images=64,
                         di_steps=5, bootstrap=200, grid_images=4, device="cpu")


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_writes_json_markdown_and_grid(evaluation: dict) -> None:
    out = Path(evaluation["out_dir"])
    saved = json.loads((out / "evaluation.json").read_text())
    assert list(saved["models"]) == ["0_loss=ce", "1_loss.lam=0.5,optim.lr=0.01",
                                     "3_loss=trust_mask,loss.lam=0.5,optim.lr=0.001"]
    assert saved["baseline"] == "0_loss=ce"
    assert saved["data"]["num_images"] == 64 and saved["data"]["has_masks"]
    assert (out / "saliency_comparison.png").stat().st_size > 5000
    md = (out / "evaluation.md").read_text()
    for heading in ("## Classification", "## Localization (masks)", "## Case table", "## Faithfulness",
                    "## Model-randomization sanity check", "## SSIM vs. baseline"):
        assert heading in md, heading
    assert md.count("| 0_loss=ce (baseline) |") >= 5


def test_evaluate_metric_keys_and_ranges(evaluation: dict) -> None:
    unit = ["accuracy", "precision", "recall", "pointing_game", "energy_pointing_game", "iou",
            "deletion_auc", "insertion_auc"]
    for name, m in evaluation["models"].items():
        for key in unit:
            est = m[key]
            assert 0.0 <= est["ci_low"] <= est["value"] <= est["ci_high"] <= 1.0 + 1e-9, (name, key, est)
        for key in ("spearman", "ssim"):
            est = m["randomization"][key]
            assert -1.0 <= est["ci_low"] <= est["value"] <= est["ci_high"] <= 1.0, (name, key, est)
        assert -1.0 <= m["ssim_vs_baseline"]["value"] <= 1.0
        cases = m["case_table"]
        assert sum(cases[f"case{c}_count"] for c in range(1, 5)) + cases["skipped"] == 64
        assert sum(cases[f"case{c}_fraction"] for c in range(1, 5)) == pytest.approx(1.0)
    assert evaluation["models"]["0_loss=ce"]["accuracy"]["method"] == "wilson"
    assert evaluation["models"]["0_loss=ce"]["precision"]["method"].startswith("bootstrap")


def test_ssim_of_the_baseline_against_itself_is_one(evaluation: dict) -> None:
    base = evaluation["models"]["0_loss=ce"]["ssim_vs_baseline"]
    assert base["value"] == pytest.approx(1.0, abs=1e-6)
    assert base["ci_low"] == pytest.approx(1.0, abs=1e-6)
    others = [m["ssim_vs_baseline"]["value"] for n, m in evaluation["models"].items() if n != "0_loss=ce"]
    assert all(v < 1.0 for v in others)  # trained runs moved away from the baseline's maps


def test_evaluate_agrees_with_the_runs_own_test_metrics(evaluation: dict, sweep: Path) -> None:
    """The runs were tested on the first 64 test images (one batch): evaluate's numbers must match."""
    for num, name in ((0, "0_loss=ce"), (1, "1_loss.lam=0.5,optim.lr=0.01")):
        saved = json.loads((job(sweep, num) / "metrics.json").read_text())
        m = evaluation["models"][name]
        assert m["accuracy"]["value"] == pytest.approx(saved["test/acc"], abs=1e-6)
        assert m["precision"]["value"] == pytest.approx(saved["test/precision"], abs=1e-6)
        assert m["recall"]["value"] == pytest.approx(saved["test/recall"], abs=1e-6)
        assert m["pointing_game"]["value"] == pytest.approx(saved["test/pointing_game"], abs=1e-6)
        assert m["energy_pointing_game"]["value"] == pytest.approx(saved["test/energy_pointing_game"], abs=1e-5)


def test_macro_precision_recall_follow_torchmetrics() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (300,), generator=gen)  # classes 6..9 never occur
    preds = torch.where(torch.rand(300, generator=gen) < 0.6, labels, torch.randint(0, 8, (300,), generator=gen))
    confusion = np.bincount((labels * 10 + preds).numpy(), minlength=100).reshape(10, 10)
    precision, recall = macro_precision_recall(confusion)
    assert precision == pytest.approx(MulticlassPrecision(10, average="macro")(preds, labels).item(), abs=1e-6)
    assert recall == pytest.approx(MulticlassRecall(10, average="macro")(preds, labels).item(), abs=1e-6)
    est = classification_estimates(preds.numpy(), labels.numpy(), 10, bootstrap=300, seed=0)
    for key in ("accuracy", "precision", "recall"):
        assert est[key].ci_low < est[key].value < est[key].ci_high
    again = classification_estimates(preds.numpy(), labels.numpy(), 10, bootstrap=300, seed=0)
    assert again["precision"] == est["precision"]  # seeded bootstrap: reproducible


def test_evaluate_cli_prints_markdown(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evaluate_main(["--runs", str(job(sweep, 2) / "checkpoints" / "last.ckpt"), "--names", "lam0.9",
                   "--max-images", "16", "--no-deletion-insertion", "--out", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "| lam0.9 |" in printed and "## Faithfulness" not in printed
    assert "no baseline given" in printed
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert "deletion_auc" not in saved["models"]["lam0.9"] and "ssim_vs_baseline" not in saved["models"]["lam0.9"]


@pytest.mark.parametrize("argv, message", [
    (["--runs", "/no/such/run"], "/no/such/run does not exist"),
    ([], "pass at least one run"),
])
def test_evaluate_cli_errors_name_the_problem(argv, message, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        evaluate_main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluate_errors_for_a_run_dir_without_checkpoints_and_bad_names(sweep: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        evaluate_runs([job(sweep, 4)])  # the failed job: config.yaml and error.json, no checkpoint
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(ValueError, match="multirun sweep directory.*trustcnn.report"):
        evaluate_runs([tmp_path])
    with pytest.raises(ValueError, match="one name per model"):
        evaluate_runs([job(sweep, 1)], baseline=job(sweep, 0), names=["only-one"])


def test_runs_on_different_test_sets_are_refused_and_other_data_settings_warned(sweep: Path) -> None:
    base = load_run(job(sweep, 0))
    other = load_run(job(sweep, 1), data_overrides={"test_fraction": 0.3})
    with pytest.raises(ValueError, match="do not share a test set.*test set of"):
        check_shared_test_set({"base": base, "other": other}, "base")
    reseeded = load_run(job(sweep, 1), data_overrides={"seed": 7})
    warnings = check_shared_test_set({"base": base, "reseeded": reseeded}, "base")
    assert len(warnings) == 1 and "seed: 7 vs 0" in warnings[0]


def test_duplicate_runs_are_loaded_once(sweep: Path) -> None:
    loaded, baseline = load_models([job(sweep, 0), job(sweep, 1)], baseline=job(sweep, 0))
    assert baseline == "0_loss=ce" and len(loaded) == 2


# ---------------------------------------------------------------------------------------------- report


def test_saliency_override_explains_a_gradcam_run_with_guided_gradcam(sweep: Path) -> None:
    own = load_run(job(sweep, 0))
    guided = load_run(job(sweep, 0), saliency="guided_gradcam")
    assert own.cfg.saliency.method == "gradcam" and guided.cfg.saliency.method == "guided_gradcam"
    x, y, _ = next(iter(guided.datamodule.main_test_dataloader()))
    maps = guided.module.explain(x[:2], y[:2], create_graph=False).maps
    assert maps.shape[-2:] == x.shape[-2:]  # Guided Grad-CAM is at input resolution, Grad-CAM is not
    assert own.module.explain(x[:2], y[:2], create_graph=False).maps.shape[-2:] != x.shape[-2:]
    torch.testing.assert_close(guided.module.net(x[:2]), own.module.net(x[:2]))  # same weights
    back = load_run(job(sweep, 0), saliency="gradcam")  # same method: config untouched
    assert back.cfg.saliency == own.cfg.saliency


def test_saliency_override_from_guided_drops_guided_only_options(tmp_path: Path) -> None:
    cfg = tiny_cfg(["saliency=guided_gradcam"], tmp_path / "guided", tmp_path / "cache")
    train(cfg)
    run = load_run(tmp_path / "guided", saliency="gradcam")
    assert run.cfg.saliency.method == "gradcam" and "channel_reduce" not in run.cfg.saliency
    with pytest.raises(ValueError, match="Unknown saliency method 'gradcamm'"):
        load_run(tmp_path / "guided", saliency="gradcamm")


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
