"""The real `train(cfg)` on the real configs, shrunk for CPU (DESIGN §3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trustcnn.data.decoy_digits import DecoyDigitsDataModule
from trustcnn.module import NonFiniteLossError
from trustcnn.layers import LayerNotFoundError
from trustcnn.train import train

REPO = Path(__file__).resolve().parents[1]


def test_default_run_writes_config_checkpoints_metrics_and_grid(make_cfg, capsys) -> None:
    cfg = make_cfg()
    metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "config.yaml").exists()
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert list((out / "checkpoints").glob("best-*.ckpt"))
    assert (out / "saliency_grid.png").stat().st_size > 1000
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test/acc", "test/precision", "test/recall", "test/pointing_game", "test/energy_pointing_game",
                "test_consistent/acc"):
        assert key in saved and 0.0 <= saved[key] <= 1.0, key
    assert saved == pytest.approx(metrics)
    assert sum(saved[f"test/case{c}_fraction"] for c in range(1, 5)) == pytest.approx(1.0)
    assert "| test_consistent | " in capsys.readouterr().out
    logged = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for term in ("train/loss", "train/ce", "train/r1", "train/r2", "train/reg", "train/s_hat", "val/acc"):
        assert term in logged, term


def test_only_the_target_layer_changes(make_cfg, cache_dir: Path) -> None:
    cfg = make_cfg()
    _, objects = train(cfg)
    module = objects["module"]
    pretrained = objects["pretrained"]
    assert pretrained.parent == cache_dir / "pretrained"
    before = torch.load(pretrained, weights_only=True)
    after = module.net.state_dict()
    trainable = set(module.trainable_names)
    assert trainable and all(name.startswith(tuple(module.built.trainable)) for name in trainable)
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(value, after[name]), f"{name} should have trained"
        else:  # frozen parameters *and* BatchNorm running statistics
            assert torch.equal(value, after[name]), f"{name} changed although frozen"


@pytest.mark.parametrize("overrides", [["loss=ce"], ["loss=trust_mask"], ["saliency=guided_gradcam"],
                                       ["loss.form=prose", "ablation=no_r1"],
                                       ["trainer.inference_mode=true"]])  # maps despite Lightning's inference mode
def test_loss_and_saliency_variants_run(make_cfg, overrides: list[str]) -> None:
    metrics, _ = train(make_cfg(*overrides))
    assert 0.0 <= metrics["test/acc"] <= 1.0


def _wandb_records(run_dir: Path) -> list[Any]:
    """The protobuf ``Record`` messages of an offline W&B run's transaction log (``run-*.wandb``).

    The log is LevelDB's: a 7-byte file header, then 32 KiB blocks of chunks, each a 7-byte header (checksum,
    little-endian length, type: 1 whole, 2 first, 3 middle, 4 last) and its bytes; a block tail under 7 bytes
    is padding.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, chunk, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def _wandb_run(run_dir: Path) -> dict[str, Any]:
    """What an offline W&B run recorded: its ``run`` record (group, display_name, run_id), the ``history``
    values by key, its ``config`` and its exit code."""
    records = _wandb_records(run_dir)
    history: dict[str, list[Any]] = {}
    config: dict[str, Any] = {}
    for record in records:
        for item in record.history.item:
            history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        for item in record.config.update:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"run": next(r.run for r in records if r.HasField("run")), "history": history, "config": config,
            "exit_code": next((r.exit.exit_code for r in records if r.HasField("exit")), None)}


def test_logger_group_builds_its_targets(make_cfg) -> None:
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from trustcnn.train import build_callbacks, build_loggers

    assert build_loggers(make_cfg("logger=none")) == []
    assert "lr_monitor" not in build_callbacks(make_cfg("logger=none"), with_logger=False)
    csv_only = build_loggers(make_cfg())
    assert [type(lg) for lg in csv_only] == [CSVLogger]
    assert Path(csv_only[0].log_dir) == Path(make_cfg().paths.output_dir) / "csv" / "version_0"
    cfg = make_cfg("logger=wandb")
    assert [type(lg) for lg in build_loggers(cfg)] == [CSVLogger, WandbLogger]  # W&B on top of CSV
    assert "wandb_panels" in build_callbacks(cfg, with_logger=True)  # logger=wandb adds the W&B panels
    assert "wandb_panels" not in build_callbacks(make_cfg(), with_logger=True)
    assert [type(lg) for lg in build_loggers(make_cfg("logger=wandb", "logger.csv=null"))] == [WandbLogger]


def test_wandb_group_and_name_of_a_multirun_job(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from trustcnn.config_check import CONF_DIR

    sweep_dir = tmp_path / "multiruns" / "2026-01-01_00-00-00-000000"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=wandb", "loss.lam=0.5"], return_hydra_config=True)
    with open_dict(cfg):  # what Hydra sets for job 0 of `-m loss.lam=0.5,...` (compose leaves it unset)
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.runtime.output_dir = str(sweep_dir / "0")
        cfg.hydra.job.override_dirname = "loss.lam=0.5"

    def group_and_name(mode: RunMode) -> tuple[str, str]:
        with read_write(cfg.hydra):  # set_config made it read-only
            cfg.hydra.mode = mode
        HydraConfig.instance().set_config(cfg)
        try:
            return cfg.logger.wandb.group, cfg.logger.wandb.name
        finally:
            HydraConfig.instance().cfg = None

    assert group_and_name(RunMode.MULTIRUN) == (sweep_dir.name, "loss.lam=0.5")  # shared by the sweep's jobs
    assert group_and_name(RunMode.RUN) == ("0", "0")  # a single run is a group of its own


def test_wandb_offline_run_records_metrics_panels_and_case_table(make_cfg, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg("logger=wandb", "tags=[a,b]")
    metrics, _ = train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline by default: no account, no network, no prompt
    recorded = _wandb_run(runs[0])
    assert recorded["run"].run_group == recorded["run"].display_name == "run"  # a single run: its directory
    assert recorded["run"].project == "trustcnn" and list(recorded["run"].tags) == ["a", "b"]
    assert recorded["exit_code"] == 0
    history = recorded["history"]
    assert metrics["test/acc"] in history["test/acc"]
    for key in ("train/r1_epoch", "train/s_hat_epoch", "val/acc", "val/energy_pointing_game"):
        assert history.get(key), key
    assert recorded["config"]["loss"]["lam"] == cfg.loss.lam  # the whole run config, not only the module's
    # One saliency panel per validation epoch (not the sanity check), from callbacks.wandb_panels.
    panels = [runs[0] / "files" / f for files in history["val/saliency/filenames"] for f in files]
    assert len(panels) == cfg.trainer.max_epochs and all(p.stat().st_size > 1000 for p in panels)
    for stage in ("test", "test_consistent"):
        table = json.loads(next(runs[0].glob(f"files/media/table/{stage}/case_table_*.table.json")).read_text())
        assert table["columns"] == ["case", "description", "count", "fraction", "ci_low", "ci_high"]
        assert [row[0] for row in table["data"]] == [1, 2, 3, 4]
        for c, row in enumerate(table["data"], start=1):
            assert row[2] == metrics[f"{stage}/case{c}_count"]
            assert row[3:] == pytest.approx([metrics[f"{stage}/case{c}_{p}"] for p in ("fraction", "ci_low", "ci_high")])
    import wandb

    assert wandb.run is None  # finished


def test_lambda_outside_unit_interval_fails_before_training(make_cfg) -> None:
    cfg = make_cfg("loss.lam=1.5")
    with pytest.raises(ValueError, match=r"loss.lam must lie in \[0, 1\].*1.5"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_unknown_target_layer_fails_before_training(make_cfg) -> None:
    cfg = make_cfg("model=torchvision", "model.arch=resnet18", "model.weights=null", "model.target_layer=layer5")
    with pytest.raises(LayerNotFoundError, match="'layer5'.*layer4"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


class PoisonedDigits(DecoyDigitsDataModule):
    """Decoy digits whose training images turn NaN from the second epoch on (a diverging input)."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.current_epoch == 0:
            return loader
        poisoned = [(torch.full_like(x, float("nan")), y, m) for x, y, m in loader]
        return torch.utils.data.DataLoader(poisoned, batch_size=None)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(make_cfg) -> None:
    cfg = make_cfg("+trainer.reload_dataloaders_every_n_epochs=1", "data._target_=test_train.PoisonedDigits")
    cfg.trainer.max_epochs = 2
    with pytest.raises(NonFiniteLossError, match=r"train step 3.*NaN"):
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "trustcnn.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_cli_unknown_key_and_group_option_list_valid_ones(tmp_path: Path) -> None:
    bad_key = _cli("optim.lrr=0.1", cwd=tmp_path)
    assert bad_key.returncode == 2
    assert "Did you mean optim.lr?" in bad_key.stderr and "momentum" in bad_key.stderr
    bad_group = _cli("loss=focal", cwd=tmp_path)
    assert bad_group.returncode == 2
    assert "Options of loss: " in bad_group.stderr and "trust_mask" in bad_group.stderr


TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "model.pretrain.epochs=1", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_cli_multirun_lr_by_lambda_with_a_failing_job(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    # lr=-1 passes the command-line checks and fails when the optimizer is built (a failure at run time; a bad
    # loss.lam would be refused before any job, with exit status 2)
    args = ["-m", "loss.lam=0.1,0.5", "optim.lr=1e-3,1e-4,-1", *TINY, f"paths.cache_dir={cache_dir}", "logger=wandb",
            f"hydra.sweep.dir={sweep}"]
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # the sweep finished, but two of its jobs failed
    assert "2 failed" in result.stdout
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 6 and len({p.name for p in jobs}) == 6
    done = [p for p in jobs if (p / "metrics.json").exists()]
    failed = [p for p in jobs if (p / "error.json").exists()]
    assert len(done) == 4 and len(failed) == 2
    assert all("optim.lr=-1" in (p / ".hydra" / "overrides.yaml").read_text() for p in failed)
    assert "Invalid learning rate" in json.loads((failed[0] / "error.json").read_text())["error"]
    # Each job is a W&B run of its own (failed ones too, marked so), all in the sweep's group, named by overrides.
    assert "Tracking run with wandb" not in result.stderr + result.stdout  # W&B's console lines are silenced
    runs = {job: _wandb_run(next((job / "wandb").glob("offline-run-*"))) for job in jobs}
    assert len({r["run"].run_id for r in runs.values()}) == 6
    for job, recorded in runs.items():
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert recorded["run"].run_group == sweep.name
        assert recorded["run"].display_name == ",".join(sorted(overrides))  # Hydra's override_dirname
        assert recorded["exit_code"] == (1 if job in failed else 0)
    # Rerun in place: the finished jobs are skipped, although their W&B name (the overrides) now holds
    # skip_finished=true (the logger config is no part of what a result depends on).
    finished_at = {job: (job / "metrics.json").stat().st_mtime_ns for job in done}
    again = _cli(*args, "skip_finished=true", cwd=tmp_path)
    assert again.returncode == 1 and "2 failed" in again.stdout, again.stderr[-3000:]
    assert not list(sweep.glob("*/refused.json"))
    assert finished_at == {job: (job / "metrics.json").stat().st_mtime_ns for job in done}


def test_preprocessing_mismatch_is_reported(make_cfg, caplog) -> None:
    from hydra.utils import instantiate

    from trustcnn.train import build_model, warn_preprocessing_mismatch

    cfg = make_cfg()
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    assert not warn_preprocessing_mismatch(model, datamodule)
    model.input_size = 224
    assert warn_preprocessing_mismatch(model, datamodule)
    assert "expect 224 px" in caplog.text and "data.image_size" in caplog.text
