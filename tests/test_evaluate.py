"""`trustcnn.evaluate` on real tiny runs made by the real `train(cfg)` (the `sweep` fixture, tests/tiny_sweep.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassPrecision, MulticlassRecall

from trustcnn.evaluate import (
    check_shared_test_set,
    classification_estimates,
    evaluate_runs,
    load_models,
    macro_precision_recall,
)
from trustcnn.evaluate import main as evaluate_main
from trustcnn.runs import load_run
from trustcnn.train import train
from tiny_sweep import job, tiny_cfg

REPO = Path(__file__).resolve().parents[1]


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

