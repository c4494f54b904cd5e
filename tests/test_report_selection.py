"""`trustcnn.report` picks the best job by a validation metric, never by a test metric.

Synthetic sweep directories (each job: a resolved-config-shaped `config.yaml`, `.hydra/overrides.yaml`,
`metrics.json`), no training: the whole file runs in about a second. The metrics are chosen so that every
ranking differs: among the trust jobs, val/acc argmax = job 1, val/loss argmin = job 3, val/loss argmax =
job 4, test/acc argmax = job 2.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from trustcnn.report import collect_sweep, is_test_metric, pair_with_baseline, paired_differences, pick_baseline
from trustcnn.report import pick_best, selection_value, write_report
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


# ------------------------------------------------------------------- paired differences and reference levels

# (loss, saliency) -> per-seed values for seeds 0, 1, 2: (test/acc, test/energy_pointing_game,
# test/decoy_following_rate). Cross-entropy is much worse under guided_gradcam, so pairing a job with the ce
# job of the other method, or of another seed, gives other numbers.
STUDY: dict[tuple[str, str], list[tuple[float, float, float]]] = {
    ("ce", "gradcam"): [(0.80, 0.40, 0.60), (0.70, 0.45, 0.50), (0.95, 0.50, 0.70)],
    ("ce", "guided_gradcam"): [(0.60, 0.30, 0.40), (0.65, 0.20, 0.45), (0.50, 0.25, 0.35)],
    ("trust", "gradcam"): [(0.86, 0.55, 0.30), (0.78, 0.50, 0.55), (0.96, 0.58, 0.20)],
    ("trust", "guided_gradcam"): [(0.70, 0.35, 0.20), (0.60, 0.40, 0.25), (0.65, 0.28, 0.30)],
}
UNIFORM_EPG = {0: 0.30, 1: 0.32, 2: 0.34, 3: 0.40}  # a property of each seed's test set
CONFLICTS = {0: 36.0, 1: 40.0, 2: 38.0, 3: 35.0}


def write_study_job(sweep: Path, num: int, loss: str, saliency: str, seed: int, metrics: dict[str, float] | None,
                    lr: float = 0.01, num_classes: int | None = None, error: str | None = None) -> Path:
    """A job of `python -m trustcnn.train -m loss=ce,trust saliency=gradcam,guided_gradcam seed=...`
    (``num_classes``: recorded in its run.json)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    loss_cfg: dict[str, Any] = {"name": loss} if loss == "ce" else {"name": loss, "lam": 0.5, "form": "paper"}
    cfg: dict[str, Any] = {"seed": seed, "loss": loss_cfg, "optim": {"lr": lr}, "saliency": {"method": saliency},
                           "optimized_metric": "val/acc",
                           "callbacks": {"model_checkpoint": {"monitor": "val/acc", "mode": "max"}}}
    if loss != "ce":
        cfg["ablation"] = {"name": "none"}
    if num_classes is not None:
        (job / "run.json").write_text(json.dumps({"optimized_metric": "val/acc", "num_classes": num_classes}))
    (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    overrides = [f"loss={loss}", f"saliency={saliency}", f"seed={seed}", f"optim.lr={lr}"]
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"val/acc": 0.5, "tested_epoch": 9.0, **metrics}))
    if error is not None:
        (job / "error.json").write_text(json.dumps({"error": error}))
    return job


def make_study(root: Path) -> Path:
    """Jobs 0-11: {ce, trust} × {gradcam, guided_gradcam} × seeds; the ce × gradcam jobs 0, 1, 2 have seeds 2, 0, 1
    (pairing by position would be wrong). Job 12: trust × gradcam, seed 3, whose ce job 13 failed: unpaired.
    Only the gradcam jobs have test_consistent/acc; no job has test/pointing_game."""
    sweep = root / "study"
    num = 0
    for (loss, saliency), values in STUDY.items():
        seeds = [2, 0, 1] if (loss, saliency) == ("ce", "gradcam") else [0, 1, 2]
        for seed in seeds:
            acc, epg, follow = values[seed]
            m = {"test/acc": acc, "test/energy_pointing_game": epg, "test/decoy_following_rate": follow,
                 "test/energy_pointing_game_uniform": UNIFORM_EPG[seed], "test/decoy_conflicts": CONFLICTS[seed],
                 "val/acc": 0.5 + acc / 10}
            if saliency == "gradcam":
                m["test_consistent/acc"] = 0.9 + seed / 100 + (0.02 if loss == "trust" else 0.0)
            write_study_job(sweep, num, loss, saliency, seed, m, num_classes=10)
            num += 1
    write_study_job(sweep, 12, "trust", "gradcam", 3, {"test/acc": 0.99, "test/energy_pointing_game": 0.9,
                                                       "test/energy_pointing_game_uniform": UNIFORM_EPG[3],
                                                       "test/decoy_following_rate": 0.0,
                                                       "test/decoy_conflicts": CONFLICTS[3]}, num_classes=10)
    write_study_job(sweep, 13, "ce", "gradcam", 3, None, num_classes=10, error="RuntimeError: CUDA out of memory")
    return sweep


def t_interval(d: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval, computed here independently of trustcnn.metrics.stats."""
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_paired_differences_pair_by_seed_and_saliency_method(tmp_path: Path) -> None:
    jobs = collect_sweep(make_study(tmp_path))
    rows = {(r["model"], r["metric"]): r for r in paired_differences(jobs)}
    assert {m for _, m in rows} == {"test/acc", "test/energy_pointing_game", "test/decoy_following_rate",
                                    "test_consistent/acc"}  # no test/pointing_game in any job
    assert {model for model, _ in rows} == {"trust × gradcam", "trust × guided_gradcam"}  # ce is the reference
    cases = {  # per seed 0, 1, 2: trust − ce of the same seed and method
        ("trust × gradcam", "test/acc"): ([0.06, 0.08, 0.01], 3),
        ("trust × gradcam", "test/decoy_following_rate"): ([-0.30, 0.05, -0.50], 2),
        ("trust × guided_gradcam", "test/acc"): ([0.10, -0.05, 0.15], 2),
        ("trust × guided_gradcam", "test/energy_pointing_game"): ([0.05, 0.20, 0.03], 3),
    }
    for key, (d, same_sign) in cases.items():
        r = rows[key]
        mean, low, high = t_interval(d)
        assert r["differences"] == pytest.approx(d), key
        assert (r["mean"], r["ci_low"], r["ci_high"]) == pytest.approx((mean, low, high)), key
        assert (r["n"], r["same_sign"], r["seeds"]) == (3, same_sign, [0, 1, 2]), key
    assert rows[("trust × gradcam", "test/acc")]["jobs"] == [(6, 1), (7, 2), (8, 0)]  # ce seeds are 2, 0, 1
    assert rows[("trust × gradcam", "test/acc")]["mean"] == pytest.approx(0.05)
    # Paired across methods (trust × gradcam − ce × guided_gradcam) it would be +0.283; by position, +0.067.
    assert rows[("trust × guided_gradcam", "test/acc")]["mean"] == pytest.approx(0.2 / 3)
    assert ("trust × guided_gradcam", "test_consistent/acc") not in rows  # only when both jobs have it
    (unpaired,) = pair_with_baseline(jobs).unpaired
    assert unpaired[0].num == 12 and unpaired[1] == "no finished loss=ce job with seed=3, saliency=gradcam"


def test_report_has_the_paired_table_csv_reference_levels_and_prints_them(tmp_path: Path, capsys) -> None:
    sweep = make_study(tmp_path)
    report_main([str(sweep), "--no-grid"])
    out = capsys.readouterr().out
    md = (sweep / "report.md").read_text()
    paired = md.split("## Paired differences vs. cross-entropy (same seed, same saliency method)")[1].split("\n## ")[0]
    assert "| model | ablation | pairs (seeds) | test/acc | test/energy_pointing_game | test/decoy_following_rate " \
           "| test_consistent/acc |" in paired
    mean, low, high = t_interval([0.06, 0.08, 0.01])
    assert f"| trust × gradcam | none | 3 (0, 1, 2) | {mean:+.3f} [{low:+.3f}, {high:+.3f}] (3/3) |" in paired
    mean, low, high = t_interval([0.10, -0.05, 0.15])
    assert f"| trust × guided_gradcam | none | 3 (0, 1, 2) | {mean:+.3f} [{low:+.3f}, {high:+.3f}] (2/3) |" in paired
    assert paired.count("| — |") == 1  # guided_gradcam jobs have no test_consistent/acc
    assert "Not paired: job 12 (no finished loss=ce job with seed=3, saliency=gradcam)." in paired
    # stdout ends with the report's path and the same table.
    tail = out.rsplit("\nReport: ", 1)[1]
    assert tail.startswith(str(sweep / "report.md")) and paired.strip() in tail

    rows = list(csv.DictReader((sweep / "paired_differences.csv").open()))
    row = next(r for r in rows if r["model"] == "trust × gradcam" and r["metric"] == "test/acc")
    assert (row["pairs"], row["same_sign"], row["seeds"], row["jobs"]) == ("3", "3", "0 1 2", "6-1 7-2 8-0")
    assert float(row["mean_difference"]) == pytest.approx(0.05)
    assert float(row["ci_low"]) == pytest.approx(t_interval([0.06, 0.08, 0.01])[1])
    assert len(rows) == 7  # 4 metrics for gradcam, 3 for guided_gradcam

    ref = md.split("## Reference levels")[1].split("\n## ")[0]
    uniform = [UNIFORM_EPG[s] for s in (0, 1, 2) for _ in range(4)] + [UNIFORM_EPG[3]]  # 13 finished jobs
    assert (f"Energy pointing game of a uniform map (`test/energy_pointing_game_uniform`, the mean mask-area fraction "
            f"of the test images): {sum(uniform) / 13:.3f} (range 0.300–0.400 over 13 jobs;") in ref
    assert "Accuracy by chance: 1/10 = 0.100 for a uniformly random prediction (K = 10 classes" in ref
    assert "picks the decoy's class with probability 1/10 = 0.100" in ref
    conflicts = [CONFLICTS[s] for s in (0, 1, 2) for _ in range(4)] + [CONFLICTS[3]]
    mean_conflicts = sum(conflicts) / 13
    assert f"(`test/decoy_conflicts`: {mean_conflicts:.1f} (range 35.0–40.0 over 13 jobs; differs by seed))" in ref
    local = md.split("## Test-time localization and decoy reliance")[1].split("\n## ")[0]
    assert "| test/energy_pointing_game | test/energy_pointing_game_uniform | test/decoy_following_rate |" in local


def test_pairing_matches_the_settings_the_ce_jobs_vary(tmp_path: Path) -> None:
    """ce jobs at two lrs: a trust job pairs with the ce job of its lr; one at an lr no ce job has is unpaired.
    ce jobs at one lr while the trust jobs sweep lr: every trust job pairs with the ce job of its seed."""
    sweep = tmp_path / "lr"
    specs = [("ce", 0.01, 0, 0.50), ("ce", 0.1, 0, 0.90), ("ce", 0.01, 1, 0.55), ("ce", 0.1, 1, 0.80),
             ("trust", 0.01, 0, 0.60), ("trust", 0.1, 0, 0.70), ("trust", 0.01, 1, 0.65), ("trust", 0.1, 1, 0.85),
             ("trust", 0.001, 0, 0.99)]  # (loss, lr, seed, test/acc)
    for num, (loss, lr, seed, acc) in enumerate(specs):
        write_study_job(sweep, num, loss, "gradcam", seed, {"test/acc": acc}, lr=lr)
    pairing = pair_with_baseline(collect_sweep(sweep))
    assert pairing.matched_on == ["seed", "saliency", "lr"]
    assert sorted((j.num, c.num) for pairs in pairing.pairs.values() for j, c in pairs) == [(4, 0), (5, 1), (6, 2),
                                                                                           (7, 3)]
    assert [(j.num, why) for j, why in pairing.unpaired] == [(8, "no finished loss=ce job with seed=0, "
                                                                 "saliency=gradcam, lr=0.001")]
    rows = {r["settings"]["lr"]: r for r in paired_differences(collect_sweep(sweep), ["test/acc"])}
    assert rows["0.01"]["differences"] == pytest.approx([0.10, 0.10]) and rows["0.1"]["mean"] == pytest.approx(-0.075)

    one = tmp_path / "one_ce_lr"
    for num, (loss, lr, seed, acc) in enumerate([("ce", 0.01, 0, 0.50), ("ce", 0.01, 1, 0.55), ("trust", 0.01, 0, 0.60),
                                                 ("trust", 0.1, 0, 0.70), ("trust", 0.1, 1, 0.75)]):
        write_study_job(one, num, loss, "gradcam", seed, {"test/acc": acc}, lr=lr)
    pairing = pair_with_baseline(collect_sweep(one))
    assert pairing.matched_on == ["seed", "saliency"] and not pairing.unpaired
    assert sorted((j.num, c.num) for pairs in pairing.pairs.values() for j, c in pairs) == [(2, 0), (3, 0), (4, 1)]
    (single,) = [r for r in paired_differences(collect_sweep(one)) if r["n"] == 1]
    assert single["settings"]["lr"] == "0.01" and math.isnan(single["ci_low"])  # one pair: no interval


def test_without_a_ce_job_nothing_is_paired_and_chance_is_not_guessed(tmp_path: Path) -> None:
    result = report(make_sweep(tmp_path))  # no run.json: the number of classes is not recorded
    ref = result["markdown"].split("## Reference levels")[1].split("\n## ")[0]
    assert "Accuracy by chance: not stated: no job's run.json records `num_classes`" in ref
    sweep = tmp_path / "trust_only"
    write_study_job(sweep, 0, "trust", "gradcam", 0, {"test/acc": 0.7})
    md = report(sweep)["markdown"]
    assert "No finished `loss=ce` job: nothing to pair with." in md
