"""The real `train(cfg)` on the real configs, shrunk for CPU (DESIGN §3)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trustcnn.data.decoy_digits import DecoyDigitsDataModule
from trustcnn.module import NonFiniteLossError
from trustcnn.saliency import LayerNotFoundError
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


def _wandb_logged_values(run_file: Path, key: str) -> list[float]:
    """Values logged under ``key`` in a W&B ``.wandb`` transaction log.

    Each history/summary item is a protobuf message: field 2 ``key`` then field 16 ``value_json``
    (tag bytes 0x82 0x01, a length byte, the JSON text).
    """
    data = run_file.read_bytes()
    encoded = key.encode()
    pattern = re.escape(bytes([0x12, len(encoded)]) + encoded + b"\x82\x01") + rb"(.)"
    values = []
    for match in re.finditer(pattern, data, flags=re.DOTALL):
        start = match.end()
        values.append(float(data[start:start + match.group(1)[0]]))
    return values


def test_wandb_offline_run_records_metrics(make_cfg, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg("logger=wandb")
    metrics, _ = train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline by default: no account, no network, no prompt
    run_file = next(runs[0].glob("run-*.wandb"))
    assert metrics["test/acc"] in _wandb_logged_values(run_file, "test/acc")
    for key in ("train/r1_epoch", "train/s_hat_epoch", "val/acc", "val/energy_pointing_game"):
        assert _wandb_logged_values(run_file, key), key
    assert list(runs[0].glob("files/media/images/val/saliency_*.png"))
    assert list(runs[0].glob("files/media/table/test/case_table_*.table.json"))
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
    result = _cli("-m", "loss.lam=0.1,0.5", "optim.lr=1e-3,1e-4,-1", *TINY, f"paths.cache_dir={cache_dir}",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # the sweep finished, but two of its jobs failed
    assert "2 failed" in result.stdout
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 6 and len({p.name for p in jobs}) == 6
    done = [p for p in jobs if (p / "metrics.json").exists()]
    failed = [p for p in jobs if (p / "error.json").exists()]
    assert len(done) == 4 and len(failed) == 2
    assert all("optim.lr=-1" in (p / ".hydra" / "overrides.yaml").read_text() for p in failed)
    assert "Invalid learning rate" in json.loads((failed[0] / "error.json").read_text())["error"]


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
