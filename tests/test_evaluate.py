"""`python -m trustcnn.evaluate` (the Hydra app, conf/eval.yaml) on real tiny runs made by the real `train(cfg)`
(the `sweep` fixture, tests/tiny_sweep.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from trustcnn.config_check import CONF_DIR
from trustcnn.evaluate import main as evaluate_main
from trustcnn.evaluation.run import evaluate
from trustcnn.runs import check_shared_test_set, load_models, load_run
from trustcnn.train import train
from tiny_sweep import job, tiny_cfg



def quoted(path: Path | str) -> str:
    """A path as a Hydra override value (the tiny runs' names hold `=` and `,`)."""
    return f'"{path}"'


def eval_cfg(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


@pytest.fixture(scope="session")
def evaluation(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = eval_cfg(f"baseline={quoted(job(sweep, 0))}", f"runs=[{quoted(job(sweep, 1))},{quoted(job(sweep, 3))}]",
                   "max_images=64", "di_steps=5", "bootstrap=200", "grid_images=4", "device=cpu")
    return evaluate(cfg, tmp_path_factory.mktemp("evaluation"))


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
    assert evaluation["models"]["0_loss=ce"]["precision"]["method"] == "bootstrap(200)"


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
        for c in range(1, 5):
            assert m["case_table"][f"case{c}_count"] == saved[f"test/case{c}_count"]


def test_evaluate_app_prints_markdown(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The Hydra app (in this process): one run (a .ckpt), a name, no baseline, no deletion/insertion."""
    ckpt = job(sweep, 2) / "checkpoints" / "last.ckpt"
    evaluate_main([f"runs=[{quoted(ckpt)}]", "names=[lam0.9]", "max_images=16", "faithfulness=false",
                   f"out={tmp_path}", "device=cpu"])
    printed = capsys.readouterr().out
    assert "| lam0.9 |" in printed and "## Faithfulness" not in printed
    assert "no baseline given" in printed
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["data"]["num_images"] == 16
    assert "deletion_auc" not in saved["models"]["lam0.9"] and "ssim_vs_baseline" not in saved["models"]["lam0.9"]
    assert (tmp_path / ".hydra" / "overrides.yaml").exists()  # out is Hydra's run directory


@pytest.mark.parametrize("argv, shown", [
    (["--baseline", "b/0", "--runs", "s/1", "s/2", "--out", "o", "--max-images", "16", "--no-deletion-insertion"],
     "python -m trustcnn.evaluate baseline=b/0 'runs=[s/1,s/2]' out=o max_images=16 faithfulness=false"),
    (["seed=1", "--saliency=guided_gradcam", "--names", "ce", "trust"],
     "python -m trustcnn.evaluate seed=1 saliency=guided_gradcam 'names=[ce,trust]'"),
    (["--runs", "s/0_loss=ce"], """python -m trustcnn.evaluate 'runs=["s/0_loss=ce"]'"""),
    (["--frobnicate"], "baseline=<run dir> 'runs=[<run dir>,...]'"),
])
def test_old_flags_end_with_the_new_form(argv: list[str], shown: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        evaluate_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert shown in err and err.count("\n") == 1 and "Traceback" not in err


def test_app_errors_name_the_problem(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run directory that does not exist, and one without checkpoints: one line, exit 2 (the Hydra app, in
    this process)."""
    for runs, message in ((f"runs=[{tmp_path / 'no-such-run'}]", "no-such-run does not exist"),
                          (f"runs=[{quoted(job(sweep, 4))}]", "No checkpoint in")):
        with pytest.raises(SystemExit) as exc:
            evaluate_main([runs, f"out={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_evaluate_errors_for_a_run_dir_without_checkpoints_and_bad_names(sweep: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        evaluate(eval_cfg(f"runs=[{quoted(job(sweep, 4))}]"), tmp_path)  # the failed job: config.yaml, error.json
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(ValueError, match="multirun sweep directory.*trustcnn.report"):
        evaluate(eval_cfg(f"runs=[{tmp_path}]"), tmp_path)
    with pytest.raises(ValueError, match="one name per model"):
        evaluate(eval_cfg(f"baseline={quoted(job(sweep, 0))}", f"runs=[{quoted(job(sweep, 1))}]",
                          "names=[only-one]"), tmp_path)
    with pytest.raises(ValueError, match="Nothing to evaluate.*baseline=<run dir>"):
        evaluate(eval_cfg(), tmp_path)
    with pytest.raises(ValueError, match="max_images must be >= 1, got 0"):
        evaluate(eval_cfg(f"runs=[{quoted(job(sweep, 1))}]", "max_images=0"), tmp_path)


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


# ---------------------------------------------------------------------------------------------- saliency override


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
