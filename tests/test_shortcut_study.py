"""The shortcut study's building blocks through the real training path: trainable depth of the decoy CNN,
and the peer losses (``rrr``, ``cam_outside``) training with the gradient their definitions give."""

from __future__ import annotations

import pytest
import torch

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
