"""`trustcnn.report` picks the best job by a validation metric, never by a test metric.

Synthetic sweep directories (each job: a resolved-config-shaped `config.yaml`, `.hydra/overrides.yaml`,
`metrics.json`), no training: the whole file runs in about a second. The metrics are chosen so that every
ranking differs: among the trust jobs, val/acc argmax = job 1, val/loss argmin = job 3, val/loss argmax =
job 4, test/acc argmax = job 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from trustcnn.report import collect_sweep, is_test_metric, pick_baseline, pick_best, selection_value, write_report
from trustcnn.report import main as report_main

# num -> (loss, lr, λ, metrics). Job 0 is the loss=ce baseline.
METRICS: dict[int, tuple[str, float, float | None, dict[str, float]]] = {
    0: ("ce", 0.01, None, {"val/acc": 0.70, "val/loss": 0.80, "test/acc": 0.72}),
    1: ("trust", 0.01, 0.5, {"val/acc": 0.90, "val/loss": 0.40, "test/acc": 0.60}),
    2: ("trust", 0.01, 0.9, {"val/acc": 0.80, "val/loss": 0.30, "test/acc": 0.95}),
    3: ("trust", 0.001, 0.6, {"val/acc": 0.85, "val/loss": 0.20, "test/acc": 0.70}),
    4: ("trust", 0.001, 0.8, {"val/acc": 0.75, "val/loss": 0.60, "test/acc": 0.80}),
}


def write_job(sweep: Path, num: int, loss: str, lr: float, lam: float | None, metrics: dict[str, float] | None,
              optimized_metric: str | None = "val/acc", checkpoint_mode: str | None = None, seed: int = 0,
              error: str | None = None) -> Path:
    """One job directory shaped like `python -m trustcnn.train -m` writes it (no data: no test-size lookup)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    loss_cfg: dict[str, Any] = {"name": loss} if loss == "ce" else {"name": loss, "lam": lam, "form": "paper"}
    cfg: dict[str, Any] = {"seed": seed, "loss": loss_cfg, "optim": {"lr": lr}, "saliency": {"method": "gradcam"},
                           "callbacks": {"model_checkpoint": {"monitor": optimized_metric, "mode": checkpoint_mode}}}
    if loss != "ce":
        cfg["ablation"] = {"name": "none"}
    if optimized_metric is not None:
        cfg["optimized_metric"] = optimized_metric
    (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    overrides = [f"optim.lr={lr}"] + (["loss=ce"] if loss == "ce" else [f"loss.lam={lam}"])
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (job / "error.json").write_text(json.dumps({"error": error}))
    return job


def make_sweep(root: Path, optimized_metric: str | None = "val/acc", checkpoint_mode: str | None = None,
               new_format: bool = True, lr_grid: bool = False) -> Path:
    """The five jobs of :data:`METRICS`. ``new_format=False``: metrics.json as before runs recorded the
    validation metrics of the tested checkpoint (only ``best_<optimized_metric>``, no ``tested_epoch``).
    ``lr_grid=False``: one lr for all jobs, so no heatmap is drawn (matplotlib would take most of the time)."""
    sweep = root / "sweep"
    for num, (loss, lr, lam, metrics) in METRICS.items():
        lr = lr if lr_grid else 0.01
        if new_format:
            m = {**metrics, "tested_epoch": 9.0, "tested_step": 90.0, "best_val/acc": metrics["val/acc"] + 0.01}
        else:
            m = {"best_val/acc": metrics["val/acc"], "test/acc": metrics["test/acc"]}
        write_job(sweep, num, loss, lr, lam, m, optimized_metric, checkpoint_mode)
    return sweep


def report(sweep: Path, **kwargs) -> dict:
    return write_report(sweep, sweep.parent / "out", grid=False, **kwargs)


def test_default_picks_the_validation_argmax_not_the_test_argmax(tmp_path: Path) -> None:
    result = report(make_sweep(tmp_path))
    assert (result["metric"], result["mode"]) == ("val/acc", "max")
    assert result["best"].num == 1  # test/acc would pick job 2
    assert result["baseline"].num == 0
    assert not any("best_val/acc" in n for n in result["notes"])  # new runs: no fallback
    md = result["markdown"]
    assert ("Best by `val/acc` (max; validation value at each job's tested checkpoint): job 1 (0.9000, tested "
            "epoch 9); baseline (loss=ce): job 0.") in md


def test_optimized_metric_val_loss_picks_the_argmin(tmp_path: Path) -> None:
    result = report(make_sweep(tmp_path, optimized_metric="val/loss"))
    assert (result["metric"], result["mode"]) == ("val/loss", "min")
    assert result["best"].num == 3 and result["best"].num != 4  # 4 is the val/loss argmax
    assert "Best by `val/loss` (min; " in result["markdown"]


def test_mode_comes_from_the_checkpoint_callback_and_the_cli_overrides_it(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, checkpoint_mode="min")  # an explicit mode beats the name's direction
    assert report(sweep)["best"].num == 4  # val/acc argmin among the trust jobs
    assert report(sweep, mode="max")["best"].num == 1
    assert report(sweep, metric="val/loss")["mode"] == "min"  # not the optimized metric: from its name


def test_a_test_metric_is_refused_by_the_cli_with_exit_code_2(tmp_path: Path, capsys) -> None:
    sweep = make_sweep(tmp_path)
    for metric in ("test/acc", "test_consistent/acc"):
        with pytest.raises(SystemExit) as exc:
            report_main([str(sweep), "--metric", metric, "--no-grid"])
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert f"'{metric}' is a test metric: picking the best job by it selects on the test set" in err
        assert "val/acc" in err
    assert not (sweep / "report.md").exists() and not (sweep / "results.csv").exists()  # refused before writing
    with pytest.raises(ValueError, match="is a test metric"):
        write_report(sweep, metric="test/acc", grid=False)
    jobs = collect_sweep(sweep)
    for pick in (lambda: pick_best(jobs, "test/acc"), lambda: pick_baseline(jobs, None, "test/acc")):
        with pytest.raises(ValueError, match="is a test metric"):
            pick()
    assert is_test_metric("test_consistent/acc") and not is_test_metric("tested_epoch")
    assert not is_test_metric("val/acc") and not is_test_metric("best_val/acc")


def test_the_cli_default_and_mode_flag(tmp_path: Path, capsys) -> None:
    sweep = make_sweep(tmp_path)
    report_main([str(sweep), "--no-grid"])
    assert "Best by `val/acc` (max; validation value at each job's tested checkpoint): job 1" in capsys.readouterr().out
    report_main([str(sweep), "--no-grid", "--mode", "min"])
    assert "Best by `val/acc` (min; validation value at each job's tested checkpoint): job 4" in capsys.readouterr().out


def test_jobs_disagreeing_on_the_optimized_metric_need_metric(tmp_path: Path, capsys) -> None:
    sweep = make_sweep(tmp_path)
    config = sweep / "3" / "config.yaml"
    config.write_text(config.read_text().replace("optimized_metric: val/acc", "optimized_metric: val/loss"))
    with pytest.raises(ValueError, match=r"disagree on optimized_metric \(val/acc, val/loss\).*--metric"):
        report(sweep)
    with pytest.raises(SystemExit) as exc:
        report_main([str(sweep), "--no-grid"])
    assert exc.value.code == 2 and "--metric" in capsys.readouterr().err
    assert report(sweep, metric="val/loss")["best"].num == 3


def test_old_runs_are_ranked_by_best_val_with_a_note(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, new_format=False)
    result = report(sweep)
    assert result["best"].num == 1  # best_val/acc argmax; test/acc would pick job 2
    assert selection_value(result["best"], "val/acc") == (0.90, "best_val/acc")
    assert any("Job(s) 0, 1, 2, 3, 4 have no `val/acc`" in n and "`best_val/acc`" in n for n in result["notes"])
    assert "Job(s) 0, 1, 2, 3, 4 have no `val/acc`" in result["markdown"]
    assert "job 1 (0.9000)" in result["markdown"]  # no tested epoch known


def test_jobs_without_a_selection_value_are_not_ranked(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    # New format lacking val/acc: its best_val/acc is not the tested checkpoint's value, so it is not used.
    (sweep / "1" / "metrics.json").write_text(json.dumps({"best_val/acc": 0.99, "tested_epoch": 9.0, "test/acc": 0.6}))
    (sweep / "3" / "metrics.json").write_text(json.dumps({"test/acc": 0.99}))
    result = report(sweep)
    assert result["best"].num == 2  # the val/acc argmax of jobs 2 and 4
    assert any(n.startswith("Job(s) 1, 3 have neither `val/acc` nor") and "`best_val/acc`" in n for n in result["notes"])
    with pytest.raises(ValueError, match="No finished job has a value of the metric 'val/accuracy'.*val/acc"):
        report(sweep, metric="val/accuracy")


def test_baseline_follows_the_selection_metric_and_its_mode(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "ce", 0.01, None, {"test/acc": 0.99})  # no validation value: must not win under min
    write_job(sweep, 1, "ce", 0.1, None, {"val/loss": 0.5, "val/acc": 0.9, "test/acc": 0.5})
    write_job(sweep, 2, "ce", 0.3, None, {"val/loss": 0.3, "val/acc": 0.6, "test/acc": 0.6})
    write_job(sweep, 3, "trust", 0.01, 0.9, {"val/loss": 0.4, "val/acc": 0.8, "test/acc": 0.7})
    jobs = collect_sweep(sweep)
    best = pick_best(jobs, "val/loss", "min")
    assert best.num == 3
    assert pick_baseline(jobs, best, "val/loss", "min").num == 2
    assert pick_baseline(jobs, best, "val/loss", "max").num == 1
    assert pick_baseline(jobs, best, "val/acc").num == 1
    assert pick_baseline(jobs, None, "val/loss").num == 2  # mode from the name: a loss is minimized


def test_ties_go_to_the_lower_job_number_in_either_mode(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for num in (0, 1, 2):
        write_job(sweep, num, "trust", 0.01, 0.5 + num / 10, {"val/acc": 0.8 if num else 0.7})
    jobs = collect_sweep(sweep)
    assert pick_best(jobs, "val/acc", "max").num == 1
    assert pick_best(list(reversed(jobs)), "val/acc", "max").num == 2  # the order given breaks ties
    assert pick_best(jobs, "val/acc", "min").num == 0


def test_heatmaps_of_the_selection_metric_and_of_test_acc(tmp_path: Path) -> None:
    result = report(make_sweep(tmp_path, lr_grid=True))
    assert {"heatmap_val_acc.png", "heatmap_test_acc.png"} <= set(result["files"])
    assert "## `val/acc` over lr × λ" in result["markdown"] and "## `test/acc` over lr × λ" in result["markdown"]
    all_jobs = result["markdown"].split("## All jobs")[1]
    assert "| job | status | overrides | tested epoch | val/acc | test/acc |" in all_jobs
    assert "| 2 | ok | `optim.lr=0.01 loss.lam=0.9` | 9 | 0.8000 | 0.9500 |" in all_jobs
    csv_text = result["files"]["results.csv"].read_text()
    assert "test/acc" in csv_text.splitlines()[0]  # test metrics are still reported


def test_a_sweep_of_failed_jobs_still_gets_a_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "trust", 0.01, 1.5, None, error="ValueError: loss.lam must lie in [0, 1]")
    result = report(sweep)
    assert result["best"] is None and result["metric"] == "val/acc"
    assert "ValueError: loss.lam must lie in [0, 1]" in result["markdown"]
