"""SLURM preemption: the requeue signal mid-epoch writes a checkpoint, and the requeued job goes on from it
exactly where an uninterrupted run would be.

The run sees a SLURM job (the variables SLURM sets), so Lightning's own ``SLURMEnvironment`` handler listens
for ``SIGUSR1``: on it, Lightning saves ``hpc_ckpt_1.ckpt`` in the run directory and calls
``scontrol requeue <job id>``. ``scontrol`` is SLURM's binary, which this machine lacks: a stand-in on
``PATH`` records its arguments. SLURM would then kill the job; here the callback that sent the signal stops
the run with an exception, and the run is started again as SLURM starts a requeued job
(``SLURM_RESTART_COUNT=1``, same directory).
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from trustcnn.callbacks import batches_done
from trustcnn.launch import latest_checkpoint
from trustcnn.train import train

EPOCHS, BATCHES, SIGNAL_AT = 2, 4, (1, 1)  # the signal after batch 1 (0-based) of epoch 1


class Preempted(Exception):
    """What SLURM's kill of the job after the requeue would be."""


class PreemptAt(pl.Callback):
    """Sends the process SLURM's requeue signal after batch ``batch`` of epoch ``epoch``, then stops."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before os.kill returns
            raise Preempted


@pytest.fixture
def slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment of a one-task SLURM job with ``scontrol`` on PATH; returns scontrol's call log."""
    calls = tmp_path / "scontrol_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "trustcnn", "SLURM_NTASKS": "1",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    yield calls
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def _cfg(make_cfg, output: str, *extra: str):
    cfg = make_cfg("logger=csv", *extra, output=output)
    with open_dict(cfg):
        cfg.trainer.max_epochs = EPOCHS
        cfg.trainer.limit_train_batches = BATCHES
    return cfg


def test_requeue_signal_mid_epoch_checkpoints_and_the_requeued_job_continues_exactly(
        make_cfg, slurm_job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight_cfg = _cfg(make_cfg, "straight")
    with monkeypatch.context() as m:  # the reference: the same run, never preempted, not under SLURM
        for key in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
            m.delenv(key)
        straight, _ = train(straight_cfg)

    cfg = _cfg(make_cfg, "preempted")
    with open_dict(cfg):
        cfg.callbacks.preempt = {"_target_": "test_preemption.PreemptAt", "epoch": SIGNAL_AT[0], "batch": SIGNAL_AT[1]}
    with pytest.raises(Preempted):
        train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file(), sorted(p.name for p in run_dir.iterdir())
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    saved = torch.load(hpc, weights_only=False)
    # epoch 0's 4 steps + batches 0 and 1 of epoch 1, and Lightning counts batch 1 as done on resume
    assert saved["epoch"] == 1 and saved["global_step"] == BATCHES + SIGNAL_AT[1] + 1
    assert batches_done(saved) == SIGNAL_AT[1] + 1
    assert latest_checkpoint(run_dir) == hpc  # newer than last.ckpt (the end of epoch 0)

    # SLURM starts the requeued job again, in its directory, without the preempting callback
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with open_dict(cfg):
        del cfg.callbacks.preempt
    resumed, _ = train(cfg)
    assert cfg.ckpt_path == str(hpc)
    a = torch.load(Path(straight_cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == EPOCHS * BATCHES  # no batch run twice or skipped
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name  # the same batches, in the same order
    assert resumed["test/acc"] == straight["test/acc"]
    assert resumed["tested_epoch"] == straight["tested_epoch"] == EPOCHS - 1


def test_batches_done_counts_what_lightning_counts() -> None:
    def ckpt(ready, started, processed, completed, epoch_processed=1, epoch_completed=1):
        batch = {"ready": ready, "started": started, "processed": processed, "completed": completed}
        return {"loops": {"fit_loop": {
            "epoch_loop.batch_progress": {"total": dict(batch), "current": dict(batch)},
            "epoch_progress": {"current": {"processed": epoch_processed, "completed": epoch_completed}}}}}

    assert batches_done(ckpt(3, 3, 3, 2)) == 3  # written in on_train_batch_end of batch 2
    assert batches_done(ckpt(3, 3, 2, 2)) == 2  # written inside batch 2's step: it runs again
    assert batches_done(ckpt(4, 4, 4, 4, epoch_processed=2)) == 0  # the epoch's end: the next starts afresh
    assert batches_done({}) == 0
