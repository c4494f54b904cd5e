"""Post-hoc Grad-CAM (trustcnn.saliency.posthoc): pytorch-grad-cam's maps, batched in torch, without a graph
in front of the target layer. Its speed against pytorch-grad-cam is measured by benchmarks/speed.py."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM as PGCGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from trustcnn.saliency.posthoc import posthoc_gradcam


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5).eval()


def _images(n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("given_targets", [False, True])
def test_maps_equal_pytorch_grad_cam(given_targets: bool) -> None:
    net, x = _resnet18(), _images()
    targets = torch.tensor([0, 3, 1, 4]) if given_targets else None
    logits, explained, maps = posthoc_gradcam(net, "layer4", x, targets)
    assert maps.shape == (4, 64, 64) and not maps.requires_grad
    if given_targets:
        assert torch.equal(explained, targets)
    else:
        assert torch.equal(explained, net(x).argmax(1))
    with PGCGradCAM(model=net, target_layers=[net.layer4]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in explained])
    torch.testing.assert_close(maps, torch.from_numpy(theirs), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, net(x).detach())


def test_no_graph_before_the_target_layer_and_no_parameter_gradients() -> None:
    net, x = _resnet18(), _images(2)
    seen = []
    handle = net.layer3.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    with torch.inference_mode():  # as in Lightning's test loop
        _, _, maps = posthoc_gradcam(net, "layer4", x, size=(7, 7))
    handle.remove()
    assert seen == [False] and maps.shape == (2, 7, 7)
    assert all(p.grad is None for p in net.parameters())
    assert torch.is_grad_enabled()  # the grad mode it switched on inside the forward does not leak


def test_a_layer_that_does_not_run_is_reported() -> None:
    net = _resnet18()
    net.unused = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(RuntimeError, match="did not run"):
        posthoc_gradcam(net, "unused", _images(1))
