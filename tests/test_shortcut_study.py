"""The shortcut study's building blocks through the real training path: trainable depth of the decoy CNN,
and the peer losses (``rrr``, ``cam_outside``) training with the gradient their definitions give."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config

from trustcnn import shortcut_study

from trustcnn.loss import CamOutsideLoss, RightForRightReasonsLoss
from trustcnn.models.small_cnn import small_cnn
from trustcnn.saliency import build_saliency
from trustcnn.train import train

DEPTH_MODULES = {"last_conv": {"features.conv3"}, "last_block": {"features.conv3", "head.fc"},
                 "all": {"features.conv1", "features.conv2", "features.conv3", "head.fc"}}


@pytest.mark.parametrize("depth", list(DEPTH_MODULES))
def test_trainable_depth_trains_exactly_its_layers(make_cfg, depth: str) -> None:
    _, objects = train(make_cfg(f"model.trainable={depth}", "logger=none", "test=false"))
    before = torch.load(objects["pretrained"], weights_only=True)
    after = objects["module"].net.state_dict()
    changed = {name.rsplit(".", 1)[0] for name, value in before.items() if not torch.equal(value, after[name])}
    assert changed == DEPTH_MODULES[depth]


def test_an_unknown_trainable_module_is_named_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"no module 'features.conv9'.*last_conv, last_block, all"):
        small_cnn(num_classes=10, trainable=["features.conv9"])


@pytest.mark.parametrize("loss", ["rrr", "cam_outside"])
def test_a_peer_loss_trains_with_its_own_gradient(make_cfg, loss: str) -> None:
    """One training step moves the trainable conv by -lr x the gradient of the loss computed here from the
    same batch by the loss class and plain autograd (SGD without momentum; both in float64). ``cam_outside``
    takes its maps from trustcnn's Grad-CAM (second order), which the oracle tests prove against captum."""
    cfg = make_cfg(f"loss={loss}", "loss.weight=5", "optim.momentum=0", "optim.weight_decay=0", "logger=none",
                   "test=false", "feature_cache=off", "trainer.precision=64-true")
    cfg.trainer.limit_train_batches = 1
    cfg.trainer.limit_val_batches = 1
    _, objects = train(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    before = torch.load(objects["pretrained"], weights_only=True)

    reference = small_cnn(num_classes=10).net.double().eval()
    reference.load_state_dict(before)
    x, y, masks = next(iter(datamodule.train_dataloader()))
    x, masks = x.double(), masks.double()
    if loss == "rrr":
        x.requires_grad_()
        terms = RightForRightReasonsLoss(weight=5)(reference(x), y, None, masks, inputs=x)
        penalty = terms["rrr"]
    else:
        out = build_saliency("gradcam", reference, "features.conv3", second_order=True, normalize="max")(x, y)
        terms = CamOutsideLoss(weight=5)(out.logits, y, out.maps, masks)
        penalty = terms["outside"]
    (grad,) = torch.autograd.grad(terms["loss"], reference.features.conv3.weight)
    step = module.net.features.conv3.weight.detach().double() - before["features.conv3.weight"].double()
    expected = -cfg.optim.lr * grad
    torch.testing.assert_close(step, expected, rtol=1e-7, atol=1e-12)
    assert float(penalty) > 0  # the penalty is active on this batch


# ----------------------------------------------------------------------------------------- the protocol


def test_the_study_composes_to_its_stated_job_counts(tmp_path) -> None:
    """48 tuning jobs (ce: 3 lr; five arms: 3 lr x 3 weights) and 105 final jobs (7 arms x 3 depths x 5 seeds),
    counted by Hydra's own expansion of the commands the driver runs."""
    tune = shortcut_study.tune_commands(tmp_path, [])
    assert {name: shortcut_study.count_jobs(c) for name, c in tune.items()} == {
        "ce": 3, "trust": 9, "trust_guided": 9, "trust_mask": 9, "rrr": 9, "cam_outside": 9}
    chosen = {arm.name: {"overrides": list(arm.overrides), "tune_job": "x"} for arm in shortcut_study.ARMS}
    final = shortcut_study.final_command(tmp_path, shortcut_study.write_arm_configs(tmp_path, chosen), [])
    assert shortcut_study.count_jobs(final) == 105


def _fake_tune_job(sweep, num: int, overrides: list[str], val_acc: float) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "metrics.json").write_text(json.dumps({"val/acc": val_acc, "test/acc": 1.0 - val_acc}))


def test_selection_takes_the_best_random_decoy_validation_accuracy_and_the_arm_config_applies_it(tmp_path) -> None:
    """Ranks differ between val/acc and test/acc here: the choice follows validation, never test."""
    values = {(0.01, 0.5): 0.61, (0.03, 0.9): 0.74, (0.1, 0.99): 0.70}
    for i, ((lr, lam), acc) in enumerate(values.items()):
        _fake_tune_job(tmp_path / "tune" / "trust", i, ["experiment=shortcut_study", "loss=trust", f"optim.lr={lr}",
                                                       f"loss.lam={lam}", "seed=0"], acc)
    for i, (lr, acc) in enumerate([(0.01, 0.52), (0.1, 0.55)]):
        _fake_tune_job(tmp_path / "tune" / "ce", i, ["loss=ce", f"optim.lr={lr}"], acc)
    _fake_tune_job(tmp_path / "tune" / "ce", 2, ["loss=ce", "optim.lr=0.03"], float("nan"))  # diverged: never chosen
    arms = shortcut_study.select_arms(["ce_guided", "trust"])
    chosen = shortcut_study.select(tmp_path, arms)
    assert chosen["trust"]["overrides"] == ["loss=trust", "optim.lr=0.03", "loss.lam=0.9"]
    assert chosen["ce"]["overrides"] == ["loss=ce", "optim.lr=0.1"]
    assert chosen["ce_guided"]["overrides"] == ["loss=ce", "saliency=guided_gradcam", "optim.lr=0.1"]
    assert "✓" in (tmp_path / "selected.md").read_text()

    conf = shortcut_study.write_arm_configs(tmp_path, chosen)
    for name, (loss, method, lr, lam) in {"trust": ("trust", "gradcam", 0.03, 0.9),
                                          "ce_guided": ("ce", "guided_gradcam", 0.1, None)}.items():
        cfg = compose_config(["experiment=shortcut_study", f"+arm={name}", f"hydra.searchpath=[file://{conf}]"])
        assert (cfg.loss.name, cfg.saliency.method, cfg.optim.lr, cfg.loss.lam) == (loss, method, lr, lam)
        assert cfg.data.val_decoys == "random" and cfg.test_checkpoint == "last" and cfg.trainer.max_epochs == 10


def test_random_validation_decoys_are_drawn_apart_from_the_label_and_from_test() -> None:
    from trustcnn.data.decoy_digits import DecoyDigitsDataModule

    consistent, random = DecoyDigitsDataModule(seed=3).build(), DecoyDigitsDataModule(seed=3, val_decoys="random").build()
    assert torch.equal(consistent["val"]["decoy_classes"], consistent["val"]["labels"])
    agree = (random["val"]["decoy_classes"] == random["val"]["labels"]).float().mean().item()
    assert 0.03 < agree < 0.2  # about 1 in 10 by chance
    assert torch.equal(random["test"]["images"], consistent["test"]["images"])  # test untouched
    assert set(random["val"]["index"].tolist()).isdisjoint(random["test"]["index"].tolist())


@pytest.mark.slow
def test_the_study_runs_end_to_end_on_a_small_grid(tmp_path) -> None:
    """The real command, shrunk: two arms, two seeds, one depth, tiny trainer limits (~5 min on 2 cores)."""
    import subprocess
    import sys

    out = tmp_path / "study"
    done = subprocess.run([sys.executable, "-m", "trustcnn.shortcut_study", "run", "--out", str(out), "--launcher",
                           "basic", "--arms", "ce,rrr", "--seeds", "0,1", "--depths", "last_conv", "--extra",
                           "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                           "trainer.limit_test_batches=1", "model.pretrain.epochs=1",
                           f"paths.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = json.loads((out / "selected.json").read_text())
    for arm in ("ce", "rrr"):  # the argmax of val/acc over the arm's tuning jobs, read independently
        jobs = sorted((out / "tune" / arm).glob("[0-9]*"), key=lambda p: int(p.name))
        accs = [json.loads((j / "metrics.json").read_text())["val/acc"] for j in jobs]
        assert chosen[arm]["tune_job"] == f"{arm}/{jobs[accs.index(max(accs))].name}"
    rows = (out / "final" / "paired_differences.csv").read_text().splitlines()
    acc = [r for r in rows if r.startswith("rrr") and ",test/acc," in r]
    assert len(acc) == 1 and ",2,0 1," in acc[0]  # two pairs, seeds 0 and 1, each rrr job with its seed's ce job
