"""The command line a newcomer meets: help, shell completion, errors without tracebacks, mixed sweeps with one
baseline, the pretraining's progress, and the chance levels under the final table."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import ndimage

from trustcnn.config_check import CONF_DIR

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "model.pretrain.epochs=1", "trainer.enable_progress_bar=false",
        "grid_images=2"]


def _run(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PROJECT_ROOT": str(cwd), "WANDB_MODE": "offline", **(env or {})})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _in_process(argv: list[str]) -> str:
    """A script that runs ``trustcnn.cli.train_main(argv)`` and prints whether torch got imported."""
    return ("import sys\nfrom trustcnn.cli import train_main\ncode = 0\ntry:\n"
            f"    train_main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH', 'torch' in sys.modules, 'pytorch_lightning' in sys.modules, 'CODE', code)")


def _group_options() -> dict[str, list[str]]:
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF_DIR.iterdir() if p.is_dir()
              and p.name != "hydra"}
    groups["hydra/launcher"] = sorted(f.stem for f in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
    return groups


# ------------------------------------------------------------------------------------------------- help

def test_help_names_every_group_option_and_the_five_commands_without_torch(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = _run("trustcnn.train", "--help", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Trustworthy CNNs" in text and "Traceback" not in text + result.stderr
    day = text.split("== A day with trustcnn ==")[1].split("==")[0]
    commands = [line.split("#")[0].split() for line in day.strip().splitlines()]
    assert len(commands) == 5
    assert {c[2] for c in commands} == {"trustcnn.train", "trustcnn.report", "trustcnn.evaluate"}
    assert any("-m" in c[3:] for c in commands)  # a sweep
    groups_block = text.split("== Configuration groups")[1].split("== Top-level keys")[0]
    defaults = {"data": ["decoy_digits*"], "model": ["small_cnn*"], "saliency": ["gradcam*"], "loss": ["trust*"],
                "ablation": ["none*"], "optim": ["sgd*"], "trainer": ["default*"], "callbacks": ["default*"],
                "logger": ["csv*"], "paths": ["default*"]}  # conf/train.yaml's defaults list
    lines = {line.split()[0]: line for line in groups_block.strip().splitlines()[1:]}
    for group, options in _group_options().items():  # every group, one line, every option, and what it is for
        assert group in lines, group
        listed = [o.strip() for o in lines[group].split(None, 1)[1].split(":")[0].split("|")]
        assert sorted(o.rstrip("*") for o in listed) == options, group
        assert [o for o in listed if o.endswith("*")] == defaults.get(group, []), group
        assert len(lines[group].split(":", 1)[1].strip()) > 5
    assert "--multirun,-m" in text  # Hydra's flags
    # The answer never waits for torch (the measured time is in README.md; here only a loose bound under load).
    probe = subprocess.run([sys.executable, "-c", _in_process(["--help"])], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    assert "TORCH False False CODE 0" in probe.stdout, probe.stdout + probe.stderr
    assert elapsed < 30


# ------------------------------------------------------------------------------------------- completion

def test_shell_completion_installs_and_completes_the_loss_options(tmp_path: Path) -> None:
    install = _run("trustcnn.train", "-sc", "install=bash", cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    assert "complete -o nospace -o default -F hydra_bash_completion trustcnn-train" in install.stdout
    query = _run("trustcnn.train", "-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "trustcnn-train loss="})
    assert query.returncode == 0, query.stderr
    assert set(query.stdout.split()) == {f"loss={o}" for o in _group_options()["loss"]}
    keys = _run("trustcnn.train", "-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "trustcnn-train loss.l"})
    assert keys.stdout.split() == ["loss.lam="]


# ------------------------------------------------------------------------------------------ user errors

@pytest.mark.parametrize(("args", "code", "expected"), [
    (["loss.lam=2"], 2, "loss.lam must lie in [0, 1]"),
    (["-m", "loss=ce,trust", "loss.lam=0.5,1.5"], 2, "got 1.5"),            # every value of a sweep
    (["optim.lrr=1"], 2, "Did you mean optim.lr?"),
    (["install=bash"], 2, "Unknown config key 'install'"),                  # a key, when not after -sc
    (["loss=foo"], 2, "Options of loss: {loss options}"),
    (["loss.form=papr"], 2, "loss.form must be one of paper, prose"),
    (["cpu_allocator=fast"], 2, "cpu_allocator must be one of reuse, system"),
    (["loss=ce,trust"], 2, "add -m to run one job per value"),
    (["hydra.run.dir=/proc/trustcnn/run"], 1, "Cannot write the run directory /proc/trustcnn/run"),
    (["-m", "hydra.sweep.dir=/proc/trustcnn/sweep"], 1, "set hydra.sweep.dir=<a writable directory>"),
    (["paths.cache_dir=/proc/trustcnn/cache"], 1, "Cannot write the shared cache"),
])
def test_command_line_errors_exit_cleanly_before_torch(tmp_path: Path, args: list[str], code: int,
                                                       expected: str) -> None:
    result = _run("trustcnn.train", *args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert expected.replace("{loss options}", ", ".join(_group_options()["loss"])) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1  # one message
    probe = subprocess.run([sys.executable, "-c", _in_process(args)], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PROJECT_ROOT": str(tmp_path)}, timeout=120)
    assert f"TORCH False False CODE {code}" in probe.stdout, probe.stdout + probe.stderr


def test_full_error_shows_the_traceback(tmp_path: Path) -> None:
    result = _run("trustcnn.train", "loss.lam=2", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "loss.lam must lie" in result.stderr


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["data=cats_dogs", "data.root={tmp}/no_such_data"], {}, ["does not exist", "data.root="]),
    # offline: every download fails at once (a proxy that refuses connections)
    (["model=mobilenet_v2_transfer"], {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
                                       "TORCH_HOME": "{tmp}/torch"},
     ["Could not download the pretrained weights", "model.weights_path=", "{tmp}/torch/hub/checkpoints"]),
])
def test_run_time_errors_exit_1_with_the_traceback_in_the_log(tmp_path: Path, args: list[str], env: dict,
                                                              expected: list[str]) -> None:
    fill = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("model.pretrain")]  # mobilenet has no pretraining stage
    result = _run("trustcnn.train", *map(fill, args), *tiny, f"hydra.run.dir={run_dir}",
                  f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, env={k: fill(v) for k, v in env.items()})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for text in map(fill, expected):
        assert text in result.stderr
    assert f"The traceback is in {run_dir / 'train.log'}" in result.stderr
    assert "Traceback" in (run_dir / "train.log").read_text()
    assert "Traceback" in json.loads((run_dir / "error.json").read_text())["traceback"]


def test_report_and_evaluate_errors(tmp_path: Path) -> None:
    missing = _run("trustcnn.report", str(tmp_path / "no_sweep"), cwd=tmp_path)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    runs = _run("trustcnn.evaluate", "--runs", str(tmp_path / "no_run"), cwd=tmp_path)
    assert runs.returncode == 2 and "no_run" in runs.stderr and "Traceback" not in runs.stderr
    # a failure at run time: the output directory cannot be made (a file is in the way)
    sweep = tmp_path / "sweep" / "0"
    (sweep / ".hydra").mkdir(parents=True)
    (sweep / "error.json").write_text(json.dumps({"error": "RuntimeError: boom"}))
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    out = _run("trustcnn.report", str(tmp_path / "sweep"), "--out", str(blocked / "report"), "--no-grid",
               cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "--out" in out.stderr and str(blocked) in out.stderr


# ----------------------------------------------------------------------------------------- mixed sweeps

def test_not_applicable_settings_follow_the_loss_class() -> None:
    from conftest import compose_config
    from trustcnn.train import loss_options

    ce = compose_config(["loss=ce", "loss.lam=0.5", "ablation=no_r1"])
    assert loss_options(ce.loss, ce.ablation) == ("ce", {}, {"loss.lam": 0.5, "ablation": "no_r1"})
    trust = compose_config(["loss=trust", "loss.eps=0.001", "ablation=no_r1"])
    name, used, not_applicable = loss_options(trust.loss, trust.ablation)
    assert name == "trust" and not_applicable == {"loss.eps": 0.001} and used["w1"] == 0.0 and used["lam"] == 0.9
    mask = compose_config(["loss=trust_mask", "loss.eps=0.001"])
    assert loss_options(mask.loss, mask.ablation)[1]["eps"] == 0.001 and not loss_options(mask.loss, mask.ablation)[2]


def _claim(args: tuple) -> dict:
    """One job of a parallel sweep calling :func:`trustcnn.sweep.run_once` (in its own process)."""
    sweep_dir, num, barrier = args
    from trustcnn import sweep

    cfg = OmegaConf.create({"loss": {"name": "ce", "lam": 0.5 + num / 100}, "optimized_metric": "val/acc", "seed": 0})
    job_dir = Path(sweep_dir) / str(num)
    job_dir.mkdir(parents=True, exist_ok=True)
    barrier.wait(timeout=60)
    with sweep.run_once(cfg, job_dir, Path(sweep_dir), num, {"loss.lam": 0.5 + num / 100}) as original:
        if original is None:
            time.sleep(1.0)  # the others arrive while this job "trains"
            (job_dir / "metrics.json").write_text(json.dumps({"val/acc": 0.25 + num}))
            return {"num": num, "ran": True}
        return {"num": num, "ran": False, "of": original.job, "value": original.value}


def test_run_once_runs_a_configuration_once_across_parallel_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            results = pool.map(_claim, [(str(tmp_path), n, barrier) for n in range(4)])
    ran = [r for r in results if r["ran"]]
    assert len(ran) == 1  # break the claim (e.g. drop the lock) and two jobs run
    owner = ran[0]["num"]
    for r in results:
        if not r["ran"]:
            assert r["of"] == str(owner) and r["value"] == 0.25 + owner
            record = json.loads((tmp_path / str(r["num"]) / "duplicate.json").read_text())
            assert record["duplicate_of"]["job"] == str(owner)
    # a rerun in place: the owner's own claim does not make it a duplicate of itself
    from trustcnn import sweep

    cfg = OmegaConf.create({"loss": {"name": "ce", "lam": 0.9}, "optimized_metric": "val/acc", "seed": 0})
    with sweep.run_once(cfg, tmp_path / str(owner), tmp_path, owner, {"loss.lam": 0.9}) as original:
        assert original is None


def test_run_once_takes_over_when_the_claiming_job_left_no_result(tmp_path: Path) -> None:
    from trustcnn import sweep

    cfg = OmegaConf.create({"loss": {"name": "ce"}, "optimized_metric": "val/acc", "seed": 0})
    with sweep.run_once(cfg, tmp_path / "0", tmp_path, 0, {}) as first:
        assert first is None  # job 0 claims, then fails without metrics.json
    with sweep.run_once(cfg, tmp_path / "1", tmp_path, 1, {}) as second:
        assert second is None  # job 1 runs it instead of pointing at a job with no result


@pytest.mark.slow  # 12 jobs (9 trained) on 2 cores: about 1-1.5 min
def test_mixed_sweep_runs_each_baseline_once_and_reports_one_baseline_row(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = _run("trustcnn.train", "-m", "loss=ce,trust,trust_mask", "loss.lam=0.5,0.9", "ablation=none,no_r1",
                  *TINY, f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "12 jobs: 9 finished, 3 duplicate" in result.stdout
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"]["duplicate"] == 3 and summary["ok"]
    # Hydra numbers the jobs loss-major: 0-3 are the ce jobs; job 0 ran, 1-3 repeat it.
    for num in (1, 2, 3):
        record = json.loads((sweep_dir / str(num) / "duplicate.json").read_text())
        assert record["duplicate_of"]["job"] == "0"
        assert not (sweep_dir / str(num) / "metrics.json").exists()
    assert json.loads((sweep_dir / "0" / "run.json").read_text())["not_applicable"] == \
        {"loss.lam": 0.5, "ablation": "none"}
    assert json.loads((sweep_dir / "4" / "run.json").read_text())["not_applicable"] == {}
    assert len(list((sweep_dir / ".claims").glob("*.json"))) == 9
    report = _run("trustcnn.report", str(sweep_dir), "--no-grid", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    table1 = report.stdout.split("## Table 1")[1].split("## Table 2")[0]
    rows = [line for line in table1.splitlines() if line.startswith("| ce ")]
    assert len(rows) == 1
    assert rows[0].split("|")[4].strip() == "1"  # jobs: one, never the duplicates counted as seeds
    assert "Job(s) 1, 2, 3 repeat the configuration of job(s) 0" in report.stdout


# ------------------------------------------------------------------------------ progress, quiet, chance

def test_pretraining_shows_epochs_and_loss(capsys) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from trustcnn.models.pretrain import train_end_to_end

    class Data:
        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(16, 4, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long(), torch.zeros(16)), batch_size=8)

    train_end_to_end(torch.nn.Linear(4, 2), Data(), epochs=3, lr=0.1, seed=0, progress=True)
    out = capsys.readouterr().out
    assert "Pretraining (cross-entropy) epoch 3/3" in out and "loss=" in out and "acc=" in out
    train_end_to_end(torch.nn.Linear(4, 2), Data(), epochs=1, lr=0.1, seed=0)
    assert capsys.readouterr().out == ""  # progress=False (trainer.enable_progress_bar=false): silent


def test_expected_third_party_notices_are_silenced(tmp_path: Path, caplog) -> None:
    import logging

    import pytorch_lightning as pl

    from trustcnn.cli import _NoLitloggerTip, quiet_third_party

    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    kept = list(logger.filters)
    try:
        with caplog.at_level(logging.INFO):
            for f in list(logger.filters):
                if isinstance(f, _NoLitloggerTip):
                    logger.removeFilter(f)
            pl.Trainer(logger=pl.loggers.CSVLogger(str(tmp_path)), default_root_dir=str(tmp_path),
                       enable_progress_bar=False)
            assert "litlogger" in caplog.text  # the negative control: Lightning prints its tip
            caplog.clear()
            quiet_third_party()
            pl.Trainer(logger=pl.loggers.CSVLogger(str(tmp_path)), default_root_dir=str(tmp_path),
                       enable_progress_bar=False)
            assert "litlogger" not in caplog.text and "GPU available" in caplog.text  # the rest still shows
    finally:
        logger.filters[:] = kept


def test_chance_levels_from_the_test_masks() -> None:
    from conftest import compose_config
    from trustcnn.train import chance_levels, instantiate_plain, reading_guide

    cfg = compose_config([])
    datamodule = instantiate_plain(cfg.data)
    datamodule.setup("test")
    for tolerance, limit in ((1, None), (3, 2)):
        levels = chance_levels(datamodule, tolerance, limit)
        for name, dataset in zip(datamodule.test_set_names, datamodule.test_sets):
            n = len(dataset) if limit is None else limit * datamodule.batch_size
            masks = np.stack([np.asarray(dataset[i][2]).reshape(dataset[i][2].shape[-2:]) > 0.5 for i in range(n)])
            masks = masks[masks.reshape(n, -1).any(1)]
            disk = np.add.outer(np.arange(-tolerance, tolerance + 1) ** 2, np.arange(-tolerance, tolerance + 1) ** 2) \
                <= tolerance ** 2
            widened = np.stack([ndimage.binary_dilation(m, structure=disk) for m in masks])
            assert levels[f"{name}/energy_pointing_game_chance"] == pytest.approx(masks.mean(), rel=1e-6)
            assert levels[f"{name}/pointing_game_chance"] == pytest.approx(widened.mean(), rel=1e-6)
    text = reading_guide({"test/acc": 0.3, "test_consistent/acc": 0.9, **levels}, datamodule, 3)
    assert text.count("\n") == 2  # two sets described, one line each, then the chance line
    assert text.startswith("test: random decoys") and "\ntest_consistent: " in text
    assert f"pointing_game {levels['test/pointing_game_chance']:.4f}" in text and "accuracy 0.1000" in text
