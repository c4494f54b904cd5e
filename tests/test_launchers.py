"""Sweeps at scale: the launcher configs, each job's CPU share, resume after a requeue, the pretraining
cache under concurrent jobs, and real parallel multiruns (joblib, Ray)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from trustcnn import launch
from trustcnn.config_check import CONF_DIR
from trustcnn.train import train

LAUNCHER_DIR = CONF_DIR / "hydra" / "launcher"

# The tiny default run of tests/test_train.py, for CLI multiruns.
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "model.pretrain.epochs=1", "trainer.enable_progress_bar=false"]


def compose_hydra(*overrides: str) -> DictConfig:
    """The train config with its ``hydra`` node, as a job of a multirun sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["hydra.mode=MULTIRUN", *overrides], return_hydra_config=True)


@pytest.fixture
def as_job(monkeypatch):
    """``as_job(*overrides)``: make the composed config this process's Hydra config (as in a launched job)."""
    def set_config(*overrides: str) -> DictConfig:
        cfg = compose_hydra(*overrides)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield set_config
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------ the configs


def _plugin_schema(option: str) -> type:
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
    from hydra_plugins.hydra_ray_launcher._config import RayLauncherConf
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    return {"joblib": JobLibLauncherConf, "submitit_local": LocalQueueConf, "submitit_slurm": SlurmQueueConf,
            "ray": RayLauncherConf}[option]


@pytest.mark.parametrize("option", launch.LAUNCHER_OPTIONS)
def test_launcher_file_is_complete_and_composes_without_the_schema_warning(option: str) -> None:
    # Complete: the same config whether or not Hydra keeps merging it onto the plugin's schema.
    keys = set(yaml.safe_load((LAUNCHER_DIR / f"{option}.yaml").read_text()))
    assert {f.name for f in dataclasses.fields(_plugin_schema(option))} <= keys
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # pytest drops filters set while importing test modules: set ours again
        launch.quiet_schema_warning()
        warnings.simplefilter("always", append=True)  # anything not silenced on purpose is recorded
        cfg = compose_hydra(f"hydra/launcher={option}")
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")  # Hydra instantiates launchers from there only
    assert not [w for w in caught if "validated against ConfigStore schema" in str(w.message)]


def test_launcher_configs_ask_one_gpu_per_job() -> None:
    # submitit's local executor shows every job the same GPUs 0..gpus_per_node-1 (submitit/local/local.py):
    # one GPU each, but not a different one; Ray and SLURM give each job its own.
    local = compose_hydra("hydra/launcher=submitit_local").hydra.launcher
    assert local.gpus_per_node == 1 and local.tasks_per_node == 1 and local.nodes == 1
    assert local.timeout_min >= 24 * 60  # the plugin's 60 minutes would kill a paper run
    slurm = compose_hydra("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1 and slurm.nodes == 1
    assert slurm.partition == "gpu" and slurm.cpus_per_task and slurm.timeout_min
    assert slurm.max_num_timeout >= 1 and slurm.signal_delay_s > 0  # requeued at the time limit
    ray = compose_hydra("hydra/launcher=ray").hydra.launcher
    assert ray.ray.remote.num_gpus == 1 and ray.ray.init.address is None  # a local instance by default
    cluster = compose_hydra("hydra/launcher=ray", "hydra.launcher.ray.init.address=auto").hydra.launcher
    assert cluster.ray.init.address == "auto" and cluster.ray.remote.num_cpus == 1
    joblib = compose_hydra("hydra/launcher=joblib").hydra.launcher
    assert joblib.backend == "loky" and joblib.n_jobs == -1


def test_ray_cpus_per_job_default(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch, "available_cpus", lambda: 16)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    assert compose_hydra("hydra/launcher=ray").hydra.launcher.ray.remote.num_cpus == 4  # 16 cores / 4 GPUs
    assert compose_hydra("hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=2").hydra.launcher.ray.remote.num_cpus == 8
    assert compose_hydra("hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=0").hydra.launcher.ray.remote.num_cpus == 1
    assert compose_hydra("hydra/launcher=ray", "hydra.launcher.ray.remote.num_cpus=3").hydra.launcher.ray.remote.num_cpus == 3
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    with pytest.raises(Exception, match="num_gpus=1 per job, but this machine has 0 visible GPU"):
        compose_hydra("hydra/launcher=ray").hydra.launcher.ray.remote.num_cpus  # noqa: B018 - Ray would wait forever


# ------------------------------------------------------------------------------------------ the CPU share


def test_job_cpu_share_per_launcher(as_job, monkeypatch) -> None:
    monkeypatch.setattr(launch, "available_cpus", lambda: 8)
    as_job("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert launch.job_cpu_share() == 4
    as_job("hydra/launcher=joblib")  # -1: one job per core
    assert launch.job_cpu_share() == 1
    as_job("hydra/launcher=joblib", "hydra.launcher.n_jobs=-3")
    assert launch.job_cpu_share() == 1  # 6 jobs on 8 cores
    as_job("hydra/launcher=submitit_slurm")
    assert launch.job_cpu_share() == 8
    as_job("hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=3")
    assert launch.job_cpu_share() == 3
    as_job("hydra/launcher=submitit_local")
    assert launch.job_cpu_share() is None  # nothing says how many run beside it
    as_job("hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=0", "hydra.launcher.ray.remote.num_cpus=2")
    assert launch.job_cpu_share() == 2
    as_job()  # the basic launcher runs one job at a time
    assert launch.job_cpu_share() is None
    as_job("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.mode=RUN")  # a single run
    assert launch.job_cpu_share() is None


def test_job_threads_caps_threads_and_data_workers(as_job, monkeypatch) -> None:
    monkeypatch.setattr(launch, "available_cpus", lambda: 8)
    cfg = as_job("hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "num_threads=null", "data.num_workers=8")
    assert launch.job_threads(cfg) == 2 and cfg.data.num_workers == 2  # null = all the job's cores
    cfg = as_job("hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "num_threads=1", "data.num_workers=1")
    assert launch.job_threads(cfg) == 1 and cfg.data.num_workers == 1
    cfg = as_job("num_threads=null", "data.num_workers=8")  # alone: as configured
    assert launch.job_threads(cfg) is None and cfg.data.num_workers == 8
    cfg = as_job("num_threads=3")
    assert launch.job_threads(cfg) == 3


# ------------------------------------------------------------------------------------- resume after requeue


class StopAtEpoch(pl.Callback):
    """Kills the run at the start of ``epoch`` (after the previous epoch's last.ckpt): a preemption."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("preempted")


def test_slurm_requeued_job_resumes_from_its_last_checkpoint(make_cfg, monkeypatch) -> None:
    def two_epochs(output: str, stop: bool = False) -> DictConfig:
        cfg = make_cfg(output=output)
        with open_dict(cfg):
            cfg.trainer.max_epochs = 2
            if stop:
                cfg.callbacks.preempt = {"_target_": "test_launchers.StopAtEpoch", "epoch": 1}
        return cfg

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    uninterrupted, _ = train(two_epochs("whole"))
    with pytest.raises(RuntimeError, match="preempted"):
        train(two_epochs("job", stop=True))
    job = two_epochs("job")
    last = Path(job.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert launch.resume_after_requeue(job) is None and job.ckpt_path is None  # no SLURM restart: left alone
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in a job it requeued
    resumed, _ = train(job)
    assert job.ckpt_path == str(last)
    assert "ckpt_path: " + str(last) in (Path(job.paths.output_dir) / "config.yaml").read_text()
    assert resumed["tested_epoch"] == 1.0
    assert resumed == pytest.approx(uninterrupted)  # exactly where the uninterrupted run got


def test_requeue_without_a_checkpoint_of_this_job_starts_over(tmp_path: Path, monkeypatch) -> None:
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "ckpt_path": None})
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert launch.resume_after_requeue(cfg) is None and cfg.ckpt_path is None  # no epoch finished
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"an earlier run's")
    os.utime(last, (time.time() - 60, time.time() - 60))
    (tmp_path / "config.yaml").write_text("seed: 0\n")  # this job's first attempt started after it
    assert launch.resume_after_requeue(cfg) is None and cfg.ckpt_path is None
    os.utime(last)  # written by this job
    assert launch.resume_after_requeue(cfg) == last and cfg.ckpt_path == str(last)
    # Requeued again before another epoch ended: last.ckpt is older than the config.yaml of the attempt
    # that resumed from it, and still this job's.
    (tmp_path / "config.yaml").write_text(f"seed: 0\nckpt_path: {last}\n")
    os.utime(last, (time.time() - 60, time.time() - 60))
    cfg.ckpt_path = None
    assert launch.resume_after_requeue(cfg) == last and cfg.ckpt_path == str(last)


# ----------------------------------------------------------------------------- the pretraining cache, shared

class _Data:
    """A datamodule stand-in: three fixed batches of 5 features, 2 classes."""

    def setup(self, stage: str) -> None:
        pass

    def train_dataloader(self) -> list:
        import torch

        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 5, generator=g), torch.arange(8) % 2, None) for _ in range(3)]


def _pretrain_job(cache: Path, out: Path, barrier, break_lock: bool) -> None:
    """One sweep job reaching the pretraining cache (a spawned process)."""
    import torch

    import trustcnn.models.pretrain as pretrain

    if break_lock:  # the negative control: no lock
        pretrain.fcntl.flock = lambda *args: None
    real_train, trained = pretrain.train_end_to_end, []

    def slow_train(*args, **kwargs):  # long enough for the other job to arrive meanwhile
        trained.append(True)
        stats = real_train(*args, **kwargs)
        time.sleep(2)
        return stats

    pretrain.train_end_to_end = slow_train
    model = type("Model", (), {"net": torch.nn.Linear(5, 2)})()
    barrier.wait(timeout=240)  # both jobs reach the cache together (after importing torch)
    path = pretrain.ensure_pretrained(model, _Data(), {"net": "linear"}, cache, epochs=2, lr=0.1, seed=0)
    out.write_text(json.dumps({"trained": bool(trained), "path": str(path),
                               "weights": [float(v.sum()) for v in model.net.state_dict().values()]}))


def _pretrain_concurrently(tmp_path: Path, break_lock: bool) -> list[dict]:
    import multiprocessing

    # spawn, not fork: a child forked from a pytest process whose torch/OpenMP thread pools already ran
    # (any earlier test) can deadlock in its first parallel op.
    ctx = multiprocessing.get_context("spawn")
    barrier, outs = ctx.Barrier(2), [tmp_path / f"job{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_pretrain_job, args=(tmp_path / "cache", out, barrier, break_lock)) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads(out.read_text()) for out in outs]


@pytest.mark.parametrize("break_lock", [False, True], ids=["locked", "negative-control-unlocked"])
def test_two_jobs_pretrain_the_same_network_once(tmp_path: Path, break_lock: bool) -> None:
    import torch

    jobs = _pretrain_concurrently(tmp_path, break_lock)
    trainers = sum(job["trained"] for job in jobs)
    if break_lock:  # without the lock both train it: the race the lock closes is real in this test
        assert trainers == 2
        return
    assert trainers == 1
    assert jobs[0]["path"] == jobs[1]["path"] and jobs[0]["weights"] == jobs[1]["weights"]
    cached = torch.load(jobs[0]["path"], weights_only=True)
    assert [float(v.sum()) for v in cached.values()] == pytest.approx(jobs[0]["weights"])
    assert not list(Path(jobs[0]["path"]).parent.glob("*.tmp*"))  # written to a temporary name, then renamed


# ------------------------------------------------------------------------------------------- real multiruns


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, "-m", "trustcnn.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _job_span(job: Path) -> tuple[float, float]:
    """From the job's first log line to its metrics.json."""
    first = re.search(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", (job / "train.log").read_text(), flags=re.M)
    return datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), (job / "metrics.json").stat().st_mtime


def _check_sweep(result: subprocess.CompletedProcess, sweep: Path, threads: int) -> list[Path]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "metrics.json").exists(), job
        logged = re.findall(r"torch threads: (\d+) \(num_threads=None; this job's CPU share: (\d+) of",
                            (job / "train.log").read_text())
        assert logged == [(str(threads), str(threads))], (job, logged)
    return jobs


def test_joblib_multirun_runs_two_jobs_at_once_with_one_thread_each(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    result = _cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=1e-3,1e-4", "num_threads=null",
                  "data.num_workers=2", *TINY, f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    share = max(1, launch.available_cpus() // 2)
    jobs = _check_sweep(result, sweep, threads=share)
    (a0, a1), (b0, b1) = (_job_span(job) for job in jobs)
    assert a0 < b1 and b0 < a1  # the two jobs ran at the same time
    workers = "data workers: 1 (data.num_workers=2)" if share < 2 else "data workers: 2"
    assert all(workers in (job / "train.log").read_text() for job in jobs)  # capped, and they started in loky


def test_ray_multirun_on_a_local_instance(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("ray")
    sweep = tmp_path / "sweep"
    result = _cli("-m", "hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=0",
                  "hydra.launcher.ray.remote.num_cpus=1", "+hydra.launcher.ray.init.num_cpus=2",
                  "+hydra.launcher.ray.init.include_dashboard=false", "optim.lr=1e-3,1e-4", "num_threads=null", *TINY,
                  f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    _check_sweep(result, sweep, threads=1)
