"""Saliency maps against captum / pytorch-grad-cam oracles, plus gradcheck (DESIGN §2), and each
sample's own map when BatchNorms normalize with batch statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedGradCam, LayerGradCam
from captum.attr._core.guided_backprop_deconvnet import GuidedBackprop as CaptumGuidedBackprop
from torch import nn

from trustcnn.layers import LayerNotFoundError
from trustcnn.maps import upsample
from trustcnn.saliency import (
    BatchCoupling,
    GradCAM,
    GuidedBackprop,
    GuidedGradCAM,
    LayerCapture,
    gradcam,
    normalize_maps,
    uses_batch_statistics,
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
    assert method._probe.layer_input is None
    copy.deepcopy(net)  # fails while a hook holds a non-leaf tensor of the last batch


def test_signed_guided_maps_need_minmax() -> None:
    with pytest.raises(ValueError, match="channel_reduce=sum.*normalize=minmax"):
        GuidedGradCAM(make_net(), "target", channel_reduce="sum")
    GuidedGradCAM(make_net(), "target", channel_reduce="sum", normalize="minmax")


# --- Batch statistics couple the samples: each map must still be its sample's own -----------------


class BatchStatsNet(SmoothHeadNet):
    """SmoothHeadNet with a BatchNorm2d ``after`` the target layer, ``before`` it (in the stem), or
    ``inside`` it (the target becomes a conv-BN block). In train mode the BatchNorm normalizes with
    the batch's statistics, so every logit depends on every sample of the batch."""

    def __init__(self, where: str) -> None:
        super().__init__()
        if where == "before":
            self.stem.insert(1, nn.BatchNorm2d(6))
        if where == "inside":
            self.target = nn.Sequential(self.target, nn.BatchNorm2d(8))
        self.post = nn.BatchNorm2d(8) if where == "after" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.post(self.target(self.stem(x))))
        h = self.silu(self.smooth(h))
        return self.fc(h.mean(dim=(2, 3)))


def make_bn_net(where: str) -> BatchStatsNet:
    torch.manual_seed(0)
    return BatchStatsNet(where).double().train()


def own_maps_reference(
    where: str, x: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, BatchStatsNet]:
    """Each sample's Grad-CAM and guided gradient from one backward of its own score (a loop), on a
    fresh copy of the net: plain autograd for Grad-CAM, trustcnn's gates for the guided rule only."""
    net = make_bn_net(where)
    kept = []
    handle = net.target.register_forward_hook(lambda m, i, out: kept.append(out))
    gates = GuidedBackprop(net)
    x = x.clone().requires_grad_(True)
    scores = net(x).gather(1, targets[:, None]).squeeze(1)
    (activations,) = kept
    cams, guided = [], []
    for i in range(len(x)):
        (grad,) = torch.autograd.grad(scores[i], activations, retain_graph=True, create_graph=True)
        alpha = grad[i].mean(dim=(1, 2), keepdim=True)
        cams.append(F.relu((alpha * activations[i]).sum(dim=0)))
        with gates.active():
            (grad,) = torch.autograd.grad(scores[i], x, retain_graph=True, create_graph=True)
        guided.append(grad[i])
    handle.remove()
    return torch.stack(cams), torch.stack(guided), net


def _grads_of(loss: torch.Tensor, net: nn.Module) -> tuple[torch.Tensor, ...]:
    # The head's bias does not reach any map (its gradient is 0, materialized as such).
    return torch.autograd.grad(
        loss, list(net.parameters()), retain_graph=True, allow_unused=True, materialize_grads=True
    )


@pytest.fixture
def autograd_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, tuple[int, ...]]]:
    """Records (is_grads_batched, shape of the differentiated-against tensor) of every autograd.grad."""
    calls: list[tuple[bool, tuple[int, ...]]] = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        calls.append((bool(kwargs.get("is_grads_batched", False)), tuple(first.shape)))
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    return calls


@pytest.mark.parametrize("where", ["after", "before", "inside"])
def test_each_map_is_its_own_samples_under_batch_statistics(where: str, autograd_calls: list) -> None:
    x = batch(n=4, size=8)
    net = make_bn_net(where)
    cam = GradCAM(net, "target", normalize="none")(x)
    guided = GuidedGradCAM(net, "target", normalize="none", channel_reduce="none")(x)
    ref_cam, ref_guided, ref_net = own_maps_reference(where, x, cam.targets)
    assert torch.equal(guided.targets, cam.targets)
    ref_guided_map = ref_guided * upsample(ref_cam, (8, 8)).unsqueeze(1)

    # (a) each sample's map is the one of its own score, for Grad-CAM and Guided Grad-CAM ...
    # (absolute tolerances far below the maps' scale: guided maps here are ~1e-5)
    exact = dict(rtol=1e-7, atol=1e-13)
    torch.testing.assert_close(cam.raw, ref_cam, **exact)
    torch.testing.assert_close(guided.raw, ref_guided_map, **exact)
    # ... and (c) so are the exact second-order parameter gradients of a loss on the maps.
    for ours, theirs in zip(_grads_of(cam.raw.pow(2).sum(), net), _grads_of(ref_cam.pow(2).sum(), ref_net)):
        torch.testing.assert_close(ours, theirs, **exact)
    loss, ref_loss = guided.raw.abs().sum(), ref_guided_map.abs().sum()
    for ours, theirs in zip(_grads_of(loss, net), _grads_of(ref_loss, ref_net)):
        torch.testing.assert_close(ours, theirs, **exact)

    # (b) one backward of the summed scores gives other answers wherever the samples are coupled:
    # the guided input gradient always, Grad-CAM only with the BatchNorm after the target layer.
    summed_guided = GuidedGradCAM(net, "target", normalize="none", channel_reduce="none", per_sample=False)(x)
    assert not torch.allclose(summed_guided.raw, ref_guided_map, rtol=0.01, atol=0)
    summed_cam = GradCAM(net, "target", normalize="none", per_sample=False)(x)
    assert torch.allclose(summed_cam.raw, ref_cam, rtol=0.01, atol=0) == (where != "after")

    # Per sample only where needed: Grad-CAM's gradient when the BatchNorm follows the target; the
    # input gradient down to the block's input only, when the BatchNorm sits inside the target.
    # (Only the two methods above batch their backward; the shapes are those differentiated against.)
    batched = [shape for is_batched, shape in autograd_calls if is_batched]
    cams = [(4, 8, 4, 4)] * 2 if where == "after" else []  # GradCAM's, then GuidedGradCAM's
    assert batched == cams + [(4, 6, 4, 4) if where == "inside" else (4, 3, 8, 8)]


def test_frozen_statistics_keep_the_single_summed_backward(autograd_calls: list) -> None:
    x = batch(n=4, size=8)
    for where in ("after", "before", "inside"):
        net = make_bn_net(where).eval()
        fast = GuidedGradCAM(net, "target", normalize="none")(x)
        assert not any(is_batched for is_batched, _ in autograd_calls)
        forced = GuidedGradCAM(net, "target", normalize="none", per_sample=True)(x)
        torch.testing.assert_close(fast.raw, forced.raw, rtol=1e-7, atol=1e-13)  # summed is exact here
        assert any(is_batched for is_batched, _ in autograd_calls)
        autograd_calls.clear()
    # A batch of one is its own batch, train mode or not.
    GuidedGradCAM(make_bn_net("after"), "target")(x[:1])
    assert not any(is_batched for is_batched, _ in autograd_calls)


def test_which_normalization_layers_use_batch_statistics() -> None:
    assert uses_batch_statistics(nn.BatchNorm2d(3).train())
    assert not uses_batch_statistics(nn.BatchNorm2d(3).eval())
    assert uses_batch_statistics(nn.BatchNorm1d(3, track_running_stats=False).eval())
    assert uses_batch_statistics(nn.SyncBatchNorm(3).train())
    assert not uses_batch_statistics(nn.InstanceNorm2d(3, affine=True, track_running_stats=True).train())
    assert not uses_batch_statistics(nn.InstanceNorm2d(3).eval())  # no running stats, still per sample
    assert not uses_batch_statistics(nn.GroupNorm(1, 3).train())
    assert not uses_batch_statistics(nn.LayerNorm(3).train())

    # What the method makes of it: the coupled gradients and, for a BatchNorm inside the target, the
    # target's input as the place below which samples are independent.
    method = GradCAM(make_bn_net("inside"), "target")
    with method.recording():
        method.model(batch(n=4, size=8))
    coupling = method._probe.coupling(4)
    assert (coupling.layer, coupling.input) == (False, True) and coupling.input_via.shape == (4, 6, 4, 4)
    assert method._probe.layer_input is None  # handed over, not kept
    assert method._probe.coupling(1) == BatchCoupling(layer=False, input=False)  # one sample: nothing to mix
