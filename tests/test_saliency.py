"""Saliency maps against captum / pytorch-grad-cam oracles, plus gradcheck (DESIGN §2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedGradCam, LayerGradCam
from captum.attr._core.guided_backprop_deconvnet import GuidedBackprop as CaptumGuidedBackprop
from torch import nn

from trustcnn.saliency import (
    GradCAM,
    GuidedBackprop,
    GuidedGradCAM,
    LayerCapture,
    LayerNotFoundError,
    gradcam,
    normalize_maps,
    upsample,
)


class SmoothHeadNet(nn.Module):
    """conv-ReLU-conv(target)-ReLU, then a *trainable smooth* 1x1 conv + SiLU before the pooled head.

    With a smooth trainable layer after the target, d(alpha)/d(params) is non-zero, so a detached alpha
    gives different parameter gradients: the second-order test below can fail.
    """

    def __init__(self, classes: int = 4, inplace: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2))
        self.target = nn.Conv2d(6, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.smooth = nn.Conv2d(8, 8, 1)
        self.silu = nn.SiLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.target(self.stem(x)))
        h = self.silu(self.smooth(h))
        return self.fc(h.mean(dim=(2, 3)))


def make_net(seed: int = 0, **kwargs) -> SmoothHeadNet:
    torch.manual_seed(seed)
    return SmoothHeadNet(**kwargs).double().eval()


def batch(n: int = 5, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def captum_cam(net: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor, **kw) -> torch.Tensor:
    return LayerGradCam(net, layer).attribute(x, target=targets, relu_attributions=True, **kw).squeeze(1)


def test_raw_gradcam_equals_captum() -> None:
    net, x = make_net(), batch()
    out = GradCAM(net, "target", normalize="none")(x)
    expected = captum_cam(net, net.target, x, out.targets)
    torch.testing.assert_close(out.raw, expected.detach())
    assert out.raw.shape == (5, 6, 6)


def test_parameter_gradients_equal_captum_second_order() -> None:
    net, x = make_net(), batch()
    params = [net.target.weight, net.smooth.weight]
    out = GradCAM(net, "target", normalize="none")(x)
    ours = torch.autograd.grad(out.raw.pow(2).sum(), params)

    ref_map = captum_cam(net, net.target, x, out.targets, grad_kwargs={"create_graph": True})
    theirs = torch.autograd.grad(ref_map.pow(2).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)

    # A detached alpha (the first-order approximation) must give different gradients on this model.
    approx = GradCAM(net, "target", normalize="none", second_order=False)(x)
    first_order = torch.autograd.grad(approx.raw.pow(2).sum(), params, allow_unused=True)
    torch.testing.assert_close(approx.raw, out.raw)
    assert first_order[1] is None  # the smooth layer after the target only reaches the map through alpha
    assert not torch.allclose(first_order[0], theirs[0])


def test_gradcheck_gradcam_wrt_activations_and_weights() -> None:
    net = make_net()
    x = batch(n=2, size=6)
    feats = net.stem(x).detach()

    def cam_of(weight: torch.Tensor, smooth_weight: torch.Tensor) -> torch.Tensor:
        a = F.conv2d(feats, weight, net.target.bias, padding=1)
        h = F.silu(F.conv2d(F.relu(a), smooth_weight, net.smooth.bias))
        scores = net.fc(h.mean(dim=(2, 3)))[:, 1]
        return gradcam(a, scores, create_graph=True)

    w = net.target.weight.detach().clone().requires_grad_(True)
    sw = net.smooth.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(cam_of, (w, sw), eps=1e-6, atol=1e-5)


def test_guided_gradcam_equals_captum() -> None:
    net, x = make_net(), batch()
    out = GuidedGradCAM(net, "target", normalize="none", channel_reduce="none")(x)
    ref = GuidedGradCam(net, net.target).attribute(x, target=out.targets, interpolate_mode="bilinear")
    torch.testing.assert_close(out.raw, ref)
    assert out.raw.shape == (5, 3, 12, 12)


def test_guided_backprop_leaves_loss_gradient_alone_and_works_with_inplace_relu() -> None:
    x = batch()
    plain, gated = make_net(inplace=True), make_net(inplace=True)
    hooks = GuidedBackprop(gated)
    grads = []
    for net in (plain, gated):
        loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3, 0]))
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)

    # ...while the saliency gradient through the same kind of forward is the guided one (captum's).
    xg = x.clone().requires_grad_(True)
    scores = gated(xg)[:, 2]
    ours = hooks.gradients(scores, xg)
    reference = CaptumGuidedBackprop(make_net(inplace=False)).attribute(x, target=2)
    torch.testing.assert_close(ours, reference)
    hooks.remove()


def test_guided_map_is_differentiable_and_trains_target_layer() -> None:
    net = make_net()
    x = batch(n=2, size=6)
    method = GuidedGradCAM(net, "target", normalize="none", channel_reduce="abs_sum")

    def guided_map_of(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            net.target.weight.copy_(weight)
        w = net.target.weight
        out = method(x)
        # d map / d weight, obtained through autograd of the (double-backward) guided map.
        return out.raw, w

    raw, w = guided_map_of(net.target.weight.detach().clone())
    (g,) = torch.autograd.grad(raw.sum(), w)
    assert g.abs().sum() > 0

    # Finite differences on the target weight agree with autograd (the guided map is piecewise smooth).
    idx = (0, 0, 1, 1)
    base = net.target.weight.detach().clone()
    eps = 1e-6
    plus, minus = base.clone(), base.clone()
    plus[idx] += eps
    minus[idx] -= eps
    f_plus = guided_map_of(plus)[0].sum().item()
    f_minus = guided_map_of(minus)[0].sum().item()
    assert (f_plus - f_minus) / (2 * eps) == pytest.approx(g[idx].item(), rel=1e-4, abs=1e-7)
    method.remove()


def test_normalized_upsampled_map_equals_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, x = make_net(), batch(size=16)
    out = GradCAM(net, "target", normalize="minmax")(x)
    ours = normalize_maps(upsample(out.maps, (16, 16)), "minmax").detach()
    reference_net = copy.deepcopy(net)
    with PGCGradCAM(model=reference_net, target_layers=[reference_net.target]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in out.targets])
    torch.testing.assert_close(ours.float(), torch.from_numpy(theirs), atol=1e-5, rtol=1e-4)


def _torchvision(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).double().eval()


def _no_inplace(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net)
    for m in net.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return net


class _CaptumGuidedWithReLU6(CaptumGuidedBackprop):
    """captum hooks only nn.ReLU; MobileNetV2 uses ReLU6, whose guided rule is the same."""

    def _register_hooks(self, module: nn.Module) -> None:
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            from captum.attr._core.guided_backprop_deconvnet import _register_backward_hook

            self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))


@pytest.mark.parametrize(("arch", "layer", "size"), [("vgg16", "features.28", 64), ("mobilenet_v2", "features.18", 64)])
def test_torchvision_models_match_oracles(arch: str, layer: str, size: int) -> None:
    net = _torchvision(arch)  # inplace=True activations, as shipped
    x = batch(n=2, size=size)
    out = GradCAM(net, layer, normalize="none")(x)
    reference = _no_inplace(net)
    layer_ref = dict(reference.named_modules())[layer]
    torch.testing.assert_close(out.raw, captum_cam(reference, layer_ref, x, out.targets).detach())

    guided = GuidedGradCAM(net, layer, normalize="none", channel_reduce="none")(x)
    cam = LayerGradCam(reference, layer_ref).attribute(x, target=guided.targets, relu_attributions=True)
    gb = _CaptumGuidedWithReLU6(reference).attribute(x, target=guided.targets)
    expected = gb * F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(guided.raw, expected.detach())


def test_mixed_batch_targets_and_batch_of_one() -> None:
    net, x = make_net(), batch(n=6)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    by_label = GradCAM(net, "target", target="label", normalize="none")(x, labels)
    assert torch.equal(by_label.targets, labels)
    one = GradCAM(net, "target", target="label", normalize="none")(x[3:4], labels[3:4])
    torch.testing.assert_close(one.raw[0], by_label.raw[3])
    predicted = GradCAM(net, "target")(x)
    assert torch.equal(predicted.targets, predicted.logits.argmax(1))
    assert predicted.maps.amax(dim=(1, 2)).le(1 + 1e-9).all()


def test_all_negative_cam_gives_zero_map_and_finite_normalization() -> None:
    activations = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    scores = -(activations.sum(dim=(1, 2, 3)))  # alpha < 0 everywhere -> ReLU kills the whole map
    cam = gradcam(activations, scores)
    assert torch.equal(cam, torch.zeros_like(cam))
    for how in ("max", "minmax"):
        normalized = normalize_maps(cam, how)
        assert torch.isfinite(normalized).all() and normalized.abs().sum() == 0


def test_normalizations() -> None:
    maps = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]], dtype=torch.float64)
    torch.testing.assert_close(normalize_maps(maps, "max"), maps / 4, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize_maps(maps, "minmax"), (maps - 1) / 3, atol=1e-6, rtol=0)
    assert normalize_maps(maps, "none") is maps
    with pytest.raises(ValueError, match="minmax"):
        normalize_maps(maps, "softmax")


def test_capture_clone_survives_inplace_ops_downstream() -> None:
    net = make_net(inplace=True)
    with LayerCapture(net, "target") as cap:
        net(batch())
        captured = cap.activations
    assert (captured < 0).any()  # the in-place ReLU after the layer did not touch the captured output


def test_unknown_layer_lists_close_matches() -> None:
    with pytest.raises(LayerNotFoundError, match=r"'targt'.*Close matches: target"):
        GradCAM(make_net(), "targt")


def test_bad_saliency_options() -> None:
    with pytest.raises(ValueError, match="predicted or label"):
        GradCAM(make_net(), "target", target="truth")
    with pytest.raises(ValueError, match="max, minmax, none"):
        GradCAM(make_net(), "target", normalize="l2")
    with pytest.raises(RuntimeError, match="enable_grad"), torch.no_grad():
        GradCAM(make_net(), "target")(batch())
    with pytest.raises(ValueError, match="label"):
        GradCAM(make_net(), "target", target="label")(batch())


def test_plain_forwards_keep_no_state_and_the_model_stays_copyable() -> None:
    net = make_net(inplace=True)
    method = GuidedGradCAM(net, "target")
    plain = net(batch())  # e.g. a cross-entropy step: no capture, no guided gates
    assert method._capture.activations is None and plain.grad_fn is not None
    method(batch())
    assert method._capture.activations is None  # handed over to the map, not kept
    copy.deepcopy(net)  # fails while a hook holds a non-leaf tensor of the last batch


def test_signed_guided_maps_need_minmax() -> None:
    with pytest.raises(ValueError, match="channel_reduce=sum.*normalize=minmax"):
        GuidedGradCAM(make_net(), "target", channel_reduce="sum")
    GuidedGradCAM(make_net(), "target", channel_reduce="sum", normalize="minmax")
