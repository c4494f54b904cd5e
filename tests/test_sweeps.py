"""Multiruns: the summary and exit status at the end, reruns in place with skip_finished, the Optuna search."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from trustcnn import sweep
from trustcnn.config_check import CONF_DIR

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "model.pretrain.epochs=1", "trainer.enable_progress_bar=false"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "trustcnn.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _printed_commands(stdout: str, after: str) -> list[list[str]]:
    """The commands printed (indented) under the summary line that starts with ``after``, as argument lists
    (without ``python -m trustcnn.train``)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    commands = []
    for line in lines[start + 1:]:
        if not line.startswith("  python -m trustcnn.train"):
            break
        commands.append(shlex.split(line)[3:])
    return commands


# ------------------------------------------------------------------------------------- fast (no training)

@pytest.mark.parametrize(("overrides", "expected"), [
    ([], "maximize"),
    (["optimized_metric=val/loss"], "minimize"),
    (["optimized_metric=val/energy_pointing_game"], "maximize"),
    (["callbacks.model_checkpoint.mode=min"], "minimize"),       # an explicit mode wins, as for the checkpoint
    (["callbacks.model_checkpoint=null", "optimized_metric=val/ce"], "minimize"),
])
def test_optuna_direction_follows_optimized_metric(overrides: list[str], expected: str) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=optuna", *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_
    assert sweeper.direction == expected
    assert sweeper.sampler.seed is not None and sweeper.max_failure_rate == 1.0
    assert set(sweeper.params) == {"optim.lr", "loss.lam"}
    assert cfg.skip_finished is False


def _job(sweep_dir: Path, num: int, overrides: list[str], metrics: dict | None = None, error: str | None = None) -> Path:
    job = sweep_dir / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (job / "error.json").write_text(json.dumps({"error": error, "traceback": "Traceback ...\n"}))
    return job


def test_summary_reads_job_dirs_and_prints_rerun_commands(tmp_path: Path, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    _job(sweep_dir, 0, ["optim.lr=0.1", "loss.lam=0.5"], metrics={"val/acc": 0.5, "val/loss": 0.2, "test/acc": 0.9})
    _job(sweep_dir, 1, ["optim.lr=0.1", "loss.lam=1.5"], error="ValueError: loss.lam must lie in [0, 1]\nmore lines")
    _job(sweep_dir, 2, ["optim.lr=0.01", "loss.lam=0.5"], metrics={"val/acc": 0.7, "val/loss": 0.4})
    _job(sweep_dir, 10, ["optim.lr=0.01", "loss.lam=1.5", "data.name=it's"])  # killed: neither file
    summary = sweep.summarize(sweep_dir, "val/acc", task_overrides=["optim.lr=0.1,0.01", "loss.lam=0.5,1.5"],
                              hydra_overrides=["hydra.sweep.dir=old", "hydra.mode=MULTIRUN", "hydra/launcher=joblib"])
    assert [(j.num, j.status) for j in summary.jobs] == [(0, "finished"), (1, "failed"), (2, "finished"),
                                                         (10, "unfinished")]
    assert not summary.ok and summary.best.num == 2 and summary.direction == "maximize"
    assert summary.jobs[1].error == "ValueError: loss.lam must lie in [0, 1]"  # one line
    assert summary.rerun_in_place == (f"python -m trustcnn.train -m optim.lr=0.1,0.01 loss.lam=0.5,1.5 "
                                      f"hydra/launcher=joblib hydra.sweep.dir={sweep_dir.resolve()} skip_finished=true")
    assert summary.rerun_each == [
        f"python -m trustcnn.train optim.lr=0.1 loss.lam=1.5 hydra.run.dir={sweep_dir.resolve() / '1'}",
        f"python -m trustcnn.train optim.lr=0.01 loss.lam=1.5 'data.name=it'\"'\"'s' "
        f"hydra.run.dir={sweep_dir.resolve() / '10'}",
    ]
    assert sweep.summarize(sweep_dir, "val/loss").best.num == 0  # minimized

    assert sweep.main([str(sweep_dir)]) == 1  # the CLI: same summary, exit status 1
    out = capsys.readouterr().out
    assert "4 jobs: 2 finished, 1 failed, 1 did not finish" in out
    assert "ValueError: loss.lam must lie in [0, 1]" in out and "Best: job 2, val/acc = 0.7000" in out
    saved = json.loads((sweep_dir / "summary.json").read_text())
    assert saved["counts"] == {"finished": 2, "duplicate": 0, "failed": 1, "refused": 0,
                              "unfinished": 1} and saved["ok"] is False
    md = (sweep_dir / "summary.md").read_text()
    assert "| 1 | FAILED | - | optim.lr=0.1 loss.lam=1.5 | ValueError: loss.lam must lie in [0, 1] |" in md
    assert f"hydra.run.dir={sweep_dir.resolve() / '10'}" in md

    for job in (1, 10):  # everything finished: ok, exit status 0, no rerun command
        (sweep_dir / str(job) / "error.json").unlink(missing_ok=True)
        (sweep_dir / str(job) / "metrics.json").write_text(json.dumps({"val/acc": 0.1}))
    done = sweep.summarize(sweep_dir, "val/acc", task_overrides=["optim.lr=0.1,0.01"])
    assert done.ok and done.rerun_in_place is None and not done.rerun_each


def test_skip_finished_job_skips_the_same_config_and_refuses_another(make_cfg) -> None:
    cfg = make_cfg()
    out = Path(cfg.paths.output_dir)
    (out / ".hydra").mkdir(parents=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # as train() writes it
    (out / "metrics.json").write_text(json.dumps({"val/acc": 0.25}))
    (out / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["loss.lam=0.9"]))

    sweep.save_hydra_files(out)  # what the callback does before Hydra rewrites .hydra for the rerun
    (out / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["loss.lam=0.9", "skip_finished=true"]))
    cfg.skip_finished = True  # ignored in the comparison
    assert sweep.skip_finished_job(cfg, out, "0", ["loss.lam=0.9"], multirun=True) == (True, 0.25)
    assert OmegaConf.load(out / ".hydra" / "overrides.yaml") == ["loss.lam=0.9"]  # restored
    assert not (out / sweep.PREVIOUS).exists()

    sweep.save_hydra_files(out)
    (out / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["loss.lam=0.3"]))
    cfg.loss.lam = 0.3
    with pytest.raises(sweep.FinishedJobMismatchError, match=r"loss.lam: 0.9 there, 0.3 here.*overrides: loss.lam=0.9"):
        sweep.skip_finished_job(cfg, out, "0", ["loss.lam=0.3"], multirun=True)
    assert json.loads((out / "metrics.json").read_text()) == {"val/acc": 0.25}  # left as it was
    assert OmegaConf.load(out / ".hydra" / "overrides.yaml") == ["loss.lam=0.9"]
    assert "loss.lam: 0.9 there, 0.3 here" in json.loads((out / sweep.REFUSED).read_text())["error"]
    assert sweep.read_job(out, "val/acc").status == "refused"

    (out / "error.json").write_text("{}")  # a failed run is not finished: run it again
    assert sweep.skip_finished_job(cfg, out, "0", [], multirun=True) == (False, None)


def test_sweeper_value_is_none_for_a_missing_or_nan_metric() -> None:
    # Optuna 2.10 + hydra-optuna-sweeper 1.3 crash the whole study on a NaN; None marks the trial failed.
    assert sweep.sweeper_value({"val/acc": 0.5}, "val/acc") == 0.5
    assert sweep.sweeper_value({"val/acc": float("nan")}, "val/acc") is None
    assert sweep.sweeper_value({"val/loss": 1.0}, "val/acc") is None


# --------------------------------------------------------------------------------- real CLI multiruns

@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """A real 2-job multirun of the tiny default config in which job 1 (momentum -1) fails when its optimizer is
    built (a bad loss.lam would be refused on the command line, before any job)."""
    root = tmp_path_factory.mktemp("failed_sweep")
    sweep_dir = root / "sweep"
    result = _cli("-m", "optim.momentum=0.9,-1", *TINY, f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}",
                  cwd=root)
    return sweep_dir, result


def test_multirun_with_a_failed_job_prints_summary_and_exits_1(failed_sweep) -> None:
    sweep_dir, result = failed_sweep
    assert result.returncode == 1, result.stderr[-3000:]
    out = result.stdout
    assert "2 jobs: 1 finished, 1 failed, 0 did not finish" in out
    summary = out[out.index("Sweep summary:"):]
    assert "1    FAILED" in summary and "Invalid momentum value" in summary
    [in_place] = _printed_commands(summary, "Rerun the 1 job(s)")
    assert in_place[0] == "-m" and "optim.momentum=0.9,-1" in in_place and in_place[-1] == "skip_finished=true"
    [alone] = _printed_commands(summary, "Or each of them alone")
    assert "optim.momentum=-1" in alone and f"hydra.run.dir={sweep_dir.resolve() / '1'}" in alone
    saved = json.loads((sweep_dir / "summary.json").read_text())
    assert saved["counts"]["failed"] == 1 and saved["jobs"][1]["num"] == 1
    assert "Invalid momentum value" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "0" / "metrics.json").exists() and (sweep_dir / "1" / "error.json").exists()


def test_rerun_in_place_skips_the_finished_job(failed_sweep, tmp_path: Path) -> None:
    sweep_dir, first = failed_sweep
    [in_place] = _printed_commands(first.stdout[first.stdout.index("Sweep summary:"):], "Rerun the 1 job(s)")
    finished = sweep_dir / "0" / "metrics.json"
    before = finished.stat().st_mtime_ns, (sweep_dir / "1" / "error.json").stat().st_mtime_ns
    result = _cli(*in_place, cwd=tmp_path)  # fixing nothing: job 1 fails again
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Job 0: skipped" in result.stdout
    assert finished.stat().st_mtime_ns == before[0]  # not re-run
    assert (sweep_dir / "1" / "error.json").stat().st_mtime_ns != before[1]  # re-run
    assert "skip_finished" not in (sweep_dir / "0" / ".hydra" / "overrides.yaml").read_text()  # its own record
    assert "2 jobs: 1 finished, 1 failed" in result.stdout


def test_rerun_with_other_job_numbers_is_refused(failed_sweep, tmp_path: Path) -> None:
    sweep_dir, first = failed_sweep
    finished = sweep_dir / "0" / "metrics.json"
    before = finished.stat().st_mtime_ns
    result = _cli("-m", "optim.momentum=0.8,-1", *TINY, *[a for a in first.args if a.startswith("paths.cache_dir=")],
                  f"hydra.sweep.dir={sweep_dir}", "skip_finished=true", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Job 0 refused" in result.stdout and "optim.momentum: 0.9 there, 0.8 here" in result.stdout
    assert "1 refused by skip_finished" in result.stdout
    assert finished.stat().st_mtime_ns == before
    assert "optim.momentum=0.9" in (sweep_dir / "0" / ".hydra" / "overrides.yaml").read_text()  # left as it was
    [made_by] = _printed_commands(result.stdout, "The command line that made this sweep directory")
    assert "optim.momentum=0.9,-1" in made_by and "skip_finished=true" in made_by


def test_single_run_failure_still_raises(failed_sweep, tmp_path: Path) -> None:
    """The summary's single-run command for the failed job: a single run keeps raising (exit status 1)."""
    sweep_dir, first = failed_sweep
    [alone] = _printed_commands(first.stdout[first.stdout.index("Sweep summary:"):], "Or each of them alone")
    result = _cli(*alone, cwd=tmp_path)
    assert result.returncode == 1
    assert "Invalid momentum value" in result.stderr and "Sweep summary" not in result.stdout
    assert "Invalid momentum value" in json.loads((sweep_dir / "1" / "error.json").read_text())["error"]


def test_optuna_search_goes_on_after_a_failed_trial(tmp_path: Path, cache_dir: Path) -> None:
    """4 TPE trials (seed 0) over the config's log-uniform optim.lr and, from the command line, momentum ∈
    {0.5, 0.9, -1}: a trial with momentum -1 fails, the study goes on, and the best value is the largest val/acc
    (maximize)."""
    sweep_dir = tmp_path / "optuna"
    result = _cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=4", "optim.momentum=choice(0.5,0.9,-1)", *TINY,
                  f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"], result.stderr[-3000:]
    momenta = [OmegaConf.load(p / "config.yaml").optim.momentum for p in jobs]
    failed = [p for p, m in zip(jobs, momenta) if m == -1]
    finished = [p for p, m in zip(jobs, momenta) if m != -1]
    assert failed and len(finished) >= 2, momenta  # seed 0 draws both kinds
    assert all((p / "error.json").exists() for p in failed) and all((p / "metrics.json").exists() for p in finished)
    assert result.returncode == 1  # a trial failed
    lrs = [OmegaConf.load(p / "config.yaml").optim.lr for p in jobs]
    assert len(set(lrs)) == 4 and all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert "Directions: ['maximize']" in result.stdout + result.stderr
    values = [json.loads((p / "metrics.json").read_text())["val/acc"] for p in finished]
    assert max(values) > min(values), values  # else the best value could not tell maximize from minimize
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(values))
    assert set(results.best_params) == {"optim.lr", "loss.lam", "optim.momentum"}
    saved = json.loads((sweep_dir / "summary.json").read_text())
    assert saved["direction"] == "maximize" and saved["counts"]["failed"] == len(failed)
    assert saved["counts"]["finished"] == len(finished)
