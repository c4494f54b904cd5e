"""A run's results are the run's: the tested checkpoint, resume, train/eval modes, and the gradient the
real training step produces (checked against maps and losses the tests build themselves)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from trustcnn.data.decoy_digits import DecoyDigitsDataModule
from trustcnn.loss import MaskTrustLoss, TrustLoss
from trustcnn.train import build_model, train


# ---------------------------------------------------------------------------------------------------
# helpers the configs below point at (`_target_: test_run_integrity.<name>`)


class ControlledMetric(pl.Callback):
    """Logs ``val/controlled`` and ``val/controlled_loss`` = ``values[epoch]``: a validation metric whose
    best epoch the test chooses."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = torch.tensor(float(self.values[trainer.current_epoch]))
        pl_module.log("val/controlled", value)
        pl_module.log("val/controlled_loss", value)


class StepProbe(pl.Callback):
    """Records the first training batch, the network's weights before the step, and the gradients the
    step produced (just before the optimizer uses them)."""

    def __init__(self) -> None:
        self.batch: tuple[torch.Tensor, ...] | None = None
        self.before: dict[str, torch.Tensor] | None = None
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = tuple(t.detach().clone() for t in batch)
            self.before = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.net.named_parameters() if p.requires_grad}


class ModeProbe(pl.Callback):
    """Records, per forward of ``module_name``, whether the trainer was training and the module's mode."""

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name
        self.calls: list[tuple[bool, bool, bool]] = []  # (trainer training, module training, dropped any)

    def setup(self, trainer, pl_module, stage) -> None:
        module = dict(pl_module.net.named_modules())[self.module_name]

        def hook(m, inputs, output):
            dropped = bool(((output == 0) & (inputs[0] != 0)).any())
            self.calls.append((trainer.training, m.training, dropped))

        module.register_forward_hook(hook)


class MislabelledDigits(DecoyDigitsDataModule):
    """Decoy digits whose every other training label is shifted by one class, so that in a training batch
    the prediction (the class the map explains by default) differs from the label for some samples."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        labels = self.train_set.labels.clone()
        labels[::2] = (labels[::2] + 1) % self.num_classes
        self.train_set.labels = labels


def _add_callback(cfg, name: str, target: str, **kwargs) -> None:
    with open_dict(cfg):
        cfg.callbacks[name] = {"_target_": target, **kwargs}


def _epochs_logged(run_dir: Path, key: str) -> list[float]:
    """``key`` per epoch, from the run's CSV log."""
    rows = csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open())
    return [float(r[key]) for r in rows if r.get(key)]


# ---------------------------------------------------------------------------------------------------
# the tested checkpoint


@pytest.mark.parametrize(("metric", "expected_epoch"), [("val/controlled", 1), ("val/controlled_loss", 2)])
def test_best_is_the_argmax_or_the_argmin_by_the_metrics_name(make_cfg, metric: str, expected_epoch: int) -> None:
    values = [0.5, 0.9, 0.2, 0.6]  # best epoch 1 for a maximized metric, 2 for a loss; the last is 3
    cfg = make_cfg(f"optimized_metric={metric}", "test_checkpoint=best")
    cfg.trainer.max_epochs = 4
    _add_callback(cfg, "controlled", "test_run_integrity.ControlledMetric", values=values)
    metrics, _ = train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "run.json").read_text())
    assert record["tested_epoch"] == expected_epoch == metrics["tested_epoch"]
    assert record["tested_checkpoint"] == f"checkpoints/best-epoch={expected_epoch:02d}.ckpt"
    assert record["optimized_mode"] == ("min" if metric.endswith("loss") else "max")
    assert metrics[metric] == pytest.approx(values[expected_epoch])  # the tested model's own validation value
    assert metrics[f"best_{metric}"] == pytest.approx(values[expected_epoch])
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    steps_per_epoch = cfg.trainer.limit_train_batches
    assert metrics["tested_step"] == (expected_epoch + 1) * steps_per_epoch


def test_last_is_the_default_and_records_the_last_epochs_validation(make_cfg) -> None:
    cfg = make_cfg("optimized_metric=val/loss")
    cfg.trainer.max_epochs = 3
    metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 3 * cfg.trainer.limit_train_batches
    assert json.loads((out / "run.json").read_text())["tested_checkpoint"] == "checkpoints/last.ckpt"
    assert metrics["tested_epoch"] == 2
    val_losses = _epochs_logged(out, "val/loss")
    assert len(val_losses) == 3
    assert metrics["val/loss"] == pytest.approx(val_losses[-1])
    assert metrics["best_val/loss"] == pytest.approx(min(val_losses))  # the best file is the argmin ...
    best_file = objects["callbacks"]["model_checkpoint"].best_model_path
    assert f"epoch={val_losses.index(min(val_losses)):02d}" in best_file
    # ... and evaluate/report load the tested one, not the best one
    from trustcnn.runs import find_checkpoint

    assert find_checkpoint(out)[1] == out / "checkpoints" / "last.ckpt"


def test_test_checkpoint_must_be_last_or_best(make_cfg) -> None:
    cfg = make_cfg("test_checkpoint=middle")
    with pytest.raises(ValueError, match="test_checkpoint must be 'last'.*'best'.*middle"):
        train(cfg)


DROPOUT_HEAD = ("model=torchvision", "model.arch=mobilenet_v2", "model.weights=null", "model.target_layer=features.18",
                "model.trainable=[features.18,classifier]", "logger=none")


@pytest.mark.parametrize("model", [(), DROPOUT_HEAD], ids=["small_cnn", "mobilenet_v2_dropout_head"])
def test_resume_from_last_ckpt_continues_exactly(make_cfg, model: tuple[str, ...]) -> None:
    """2 epochs, then resumed to 3 from last.ckpt in a new directory = 3 epochs uninterrupted.

    The best validation epoch (0) lies before the interruption, so the resumed run must carry the best
    checkpoint over; the order of the training data, the dropout masks of a trainable head and the
    weights must continue exactly."""
    values = [0.9, 0.5, 0.7]

    def cfg_for(output: str, epochs: int, *extra: str):
        cfg = make_cfg("test_checkpoint=best", "optimized_metric=val/controlled", *model, *extra, output=output)
        cfg.trainer.max_epochs = epochs
        _add_callback(cfg, "controlled", "test_run_integrity.ControlledMetric", values=values)
        return cfg

    straight_cfg = cfg_for("straight", 3)
    straight, _ = train(straight_cfg)
    first = cfg_for("first", 2)
    train(first)
    resumed_cfg = cfg_for("resumed", 3, f"ckpt_path={Path(first.paths.output_dir) / 'checkpoints' / 'last.ckpt'}")
    resumed, _ = train(resumed_cfg)
    assert resumed["tested_epoch"] == 0
    assert resumed == straight  # every test, validation and bookkeeping number, exactly
    a = torch.load(Path(straight_cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(Path(resumed_cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


# ---------------------------------------------------------------------------------------------------
# train/eval modes


def test_trainable_modules_train_in_train_mode_and_frozen_ones_stay_frozen(make_cfg) -> None:
    """MobileNetV2 with its last two blocks and the classifier (dropout + linear) trainable."""
    cfg = make_cfg(*DROPOUT_HEAD, "model.trainable=[features.17,features.18,classifier]", "data.batch_size=16")
    cfg.trainer.max_epochs = 2
    _add_callback(cfg, "dropout_probe", "test_run_integrity.ModeProbe", module_name="classifier.0")
    _, objects = train(cfg)
    net, probe = objects["module"].net, objects["callbacks"]["dropout_probe"]
    fresh = build_model(cfg, 10).net.state_dict()  # the same seeded random init
    after = net.state_dict()
    # a trainable BatchNorm (inside features.17) normalizes with batch statistics and updates them ...
    assert not torch.equal(fresh["features.17.conv.0.1.running_mean"], after["features.17.conv.0.1.running_mean"])
    # ... the frozen ones keep theirs
    for name in ("features.1.conv.0.1.running_mean", "features.16.conv.3.running_var", "features.0.1.running_mean"):
        assert torch.equal(fresh[name], after[name]), name
    training_calls = [c for c in probe.calls if c[0]]
    other_calls = [c for c in probe.calls if not c[0]]
    assert training_calls and other_calls
    assert all(mode for _, mode, _ in training_calls)  # the head's dropout is active in every training step
    assert any(dropped for *_, dropped in training_calls)
    assert not any(mode or dropped for _, mode, dropped in other_calls)  # and off for validation and test


# ---------------------------------------------------------------------------------------------------
# the gradient of the real training step


class _GuidedGate(torch.autograd.Function):
    """The test's own guided-backprop rule on a ReLU output: pass a gradient only where both it and the
    ReLU's output are positive. Built from differentiable ops, so a loss on the guided map differentiates
    through it."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(out)
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


def _normalize_max(maps: torch.Tensor) -> torch.Tensor:
    return maps / (maps.flatten(1).amax(1).clamp(min=0) + 1e-7).view(-1, 1, 1)


def _reference_maps(net: torch.nn.Module, target_layer: str, x: torch.Tensor, labels: torch.Tensor,
                    method: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and normalized maps from plain autograd (create_graph=True), not trustcnn.saliency."""
    layer = dict(net.named_modules())[target_layer]
    kept: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.__setitem__("A", o))
    logits = net(x)
    handle.remove()
    classes = logits.argmax(1) if target == "predicted" else labels
    scores = logits.gather(1, classes[:, None]).sum()
    (grad_a,) = torch.autograd.grad(scores, kept["A"], create_graph=True)
    cam = F.relu((grad_a.mean((2, 3), keepdim=True) * kept["A"]).sum(1))
    if method == "gradcam":
        return logits, _normalize_max(cam)
    # Guided Grad-CAM: a second forward with the guided gate after every ReLU, the input a leaf
    gated = [m.register_forward_hook(lambda m, i, o: _GuidedGate.apply(o))
             for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    x_leaf = x.detach().requires_grad_(True)
    guided_scores = net(x_leaf).gather(1, classes[:, None]).sum()
    for h in gated:
        h.remove()
    (guided,) = torch.autograd.grad(guided_scores, x_leaf, create_graph=True)
    up = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits, _normalize_max((guided * up).abs().sum(1))


ABLATION_WEIGHTS = {"none": (1.0, 1.0, 1.0), "no_r1": (0.0, 1.0, 1.0), "no_r2": (1.0, 0.0, 1.0),
                    "no_reg": (1.0, 1.0, 0.0)}

STEP_CASES = [("gradcam", "trust", a) for a in ABLATION_WEIGHTS] + [
    ("guided_gradcam", "trust", "none"), ("guided_gradcam", "trust", "no_r2"),
    ("gradcam", "trust_mask", "none"), ("guided_gradcam", "trust_mask", "no_r1"),
    ("gradcam", "trust_prose", "none"),
]


@pytest.mark.parametrize(("method", "loss", "ablation"), STEP_CASES)
def test_real_training_step_gradient_equals_the_reference(make_cfg, method: str, loss: str, ablation: str) -> None:
    lam = 0.5
    cfg = make_cfg(f"saliency={method}", f"loss={loss}", f"ablation={ablation}", f"loss.lam={lam}",
                   "data._target_=test_run_integrity.MislabelledDigits", "test=false", "logger=none",
                   "trainer.precision=64-true", "optim.momentum=0.0")
    cfg.trainer.limit_train_batches = 1
    cfg.trainer.limit_val_batches = 0
    with open_dict(cfg):
        cfg.callbacks.model_checkpoint = None  # no validation here to rank by
    _add_callback(cfg, "probe", "test_run_integrity.StepProbe")
    _, objects = train(cfg)
    probe = objects["callbacks"]["probe"]
    x, labels, masks = probe.batch
    x, masks = x.double(), masks.double()

    net = build_model(cfg, 10).net.double()
    net.load_state_dict(probe.before)
    params = {n: p for n, p in net.named_parameters() if n in probe.grads}
    assert set(params) == set(probe.grads) and params

    form = "prose" if loss == "trust_prose" else "paper"
    w1, w2, w_s = ABLATION_WEIGHTS[ablation]
    ref_loss = (MaskTrustLoss if loss == "trust_mask" else TrustLoss)(lam=lam, form=form, w1=w1, w2=w2, w_s=w_s)

    def reference_grads(detach_maps: bool = False, target: str = "predicted") -> dict[str, torch.Tensor]:
        logits, maps = _reference_maps(net, "features.conv3", x, labels, method, target)
        if detach_maps:
            maps = maps.detach()
        total = ref_loss(logits, labels, maps, masks)["loss"]
        return dict(zip(params, torch.autograd.grad(total, list(params.values()))))

    with torch.no_grad():
        predictions = net(x).argmax(1)
    assert (predictions != labels).any()  # so explaining the label instead would show

    expected = reference_grads()
    for name, grad in probe.grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    # The checks can fail: the map's own gradient, and the explained class, move the result far beyond
    # the tolerance.
    scale = max(g.abs().max() for g in expected.values())
    for wrong in (reference_grads(detach_maps=True), reference_grads(target="label")):
        assert max((wrong[n] - expected[n]).abs().max() for n in expected) > 1e-6 * scale


# ---------------------------------------------------------------------------------------------------
# reference levels the published numbers are read against


def test_decoy_following_rate_and_uniform_map_reference(make_cfg) -> None:
    cfg = make_cfg()
    metrics, objects = train(cfg)
    datamodule, module = objects["datamodule"], objects["module"]
    test = datamodule.splits["test"]
    n = cfg.trainer.limit_test_batches * cfg.data.batch_size
    # the decoy's class, read back from its shade (class y has shade number y)
    shades = torch.from_numpy(datamodule.shades)
    decoy = torch.tensor([int(torch.argmin((shades - s).abs())) for s in test["shades"][:n]])
    labels = test["labels"][:n]
    x = datamodule.test_sets[0].images[:n]
    with torch.no_grad():
        predictions = module.eval()(x).argmax(1)  # the module holds the tested (last) checkpoint's weights
    conflict = decoy != labels
    assert 0 < conflict.sum() < n
    assert metrics["test/decoy_following_rate"] == pytest.approx(float((predictions[conflict] == decoy[conflict]).double().mean()))
    assert metrics["test/decoy_conflicts"] == conflict.sum()
    assert "test_consistent/decoy_following_rate" not in metrics  # the decoy never disagrees with the label there
    masks = test["masks"][:n].flatten(1).double()
    assert metrics["test/energy_pointing_game_uniform"] == pytest.approx(float(masks.mean(1).mean()), rel=1e-5)
