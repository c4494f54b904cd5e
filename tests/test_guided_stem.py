"""The fast Guided Grad-CAM step (trustcnn.saliency.stem): the guided backward through a frozen stem
as one autograd Function whose backward is the stem's masked linear forward. Its maps and parameter
gradients must equal the double backward's (and captum's maps); where it does not apply it must fall
back, saying why."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from captum.attr._core.guided_backprop_deconvnet import GuidedBackprop as CaptumGuidedBackprop
from torch import nn

from trustcnn.loss import TrustLoss
from trustcnn.models.freeze import freeze_except
from trustcnn.models.small_cnn import small_cnn
from trustcnn.models.torchvision_models import MobileNetV2Transfer
from trustcnn.saliency import GuidedGradCAM
from trustcnn.saliency import stem as stem_module


def _randomize_batch_norms(net: nn.Module, size: int = 48, seed: int = 0) -> nn.Module:
    """BatchNorm affine parameters away from (1, 0) and running statistics measured on random images
    (as trained ones would be, so the signal survives a deep stem): every shift and scale matters, and a
    replay that kept a shift or dropped a scale would show."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.momentum = None  # a cumulative average: the statistics of the calibration batch
        m.reset_running_stats()
    mode = net.training
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, size, size, generator=g).to(next(net.parameters()).dtype))
    net.train(mode)
    return net


def mobilenet(width_mult: float = 0.25) -> tuple[nn.Module, str]:
    """The paper's MobileNetV2 transfer model (frozen features, new 1x1 conv + ReLU, linear head) at a
    quarter of the width by default: float64 grouped convolutions run group by group on the CPU."""
    torch.manual_seed(0)
    base = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult)
    net = MobileNetV2Transfer(base.features, base.last_channel, 3, 16)
    freeze_except(net, ["new_conv", "classifier"])
    return _randomize_batch_norms(net).double().eval(), "new_conv"


def mobilenet_blocks() -> tuple[nn.Module, str]:
    """MobileNetV2's own building blocks (Conv-BN-ReLU6, inverted residuals with depthwise convolutions,
    a residual sum) in a few channels, under the transfer head: MobileNetV2 at the cost of a unit test."""
    from torchvision.ops.misc import Conv2dNormActivation
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    features = nn.Sequential(
        Conv2dNormActivation(3, 8, stride=2, activation_layer=nn.ReLU6),
        InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 3), InvertedResidual(12, 12, 1, 3),
        Conv2dNormActivation(12, 24, kernel_size=1, activation_layer=nn.ReLU6),
    )
    net = MobileNetV2Transfer(features, 24, 3, 16)
    freeze_except(net, ["new_conv", "classifier"])
    return _randomize_batch_norms(net, 16).double().eval(), "new_conv"


class VGGLike(nn.Module):
    """VGG-16's layout in small: conv-ReLU(in place) pairs, max-pools, a trainable last conv whose ReLU
    output is the target (``features.9``, like ``features.29``), a max-pool and a frozen MLP head with
    dropout."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), relu(), nn.Conv2d(8, 8, 3, padding=1), relu(), nn.MaxPool2d(2, 2),
            nn.Conv2d(8, 12, 3, padding=1), relu(), nn.MaxPool2d(2, 2),
            nn.Conv2d(12, 16, 3, padding=1), relu(), nn.MaxPool2d(2, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(64, 32), relu(), nn.Dropout(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg_like() -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    net = VGGLike().double().eval()
    freeze_except(net, ["features.8"])
    return net, "features.9"


def decoy_cnn(batch_norm: bool) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    built = small_cnn(num_classes=3, batch_norm=batch_norm)
    net = built.net.double().eval()
    freeze_except(net, built.trainable)
    if batch_norm:
        _randomize_batch_norms(net, 32)
    return net, built.target_layer


MODELS = [
    pytest.param(mobilenet_blocks, 16, id="mobilenet_v2_blocks"),
    pytest.param(mobilenet, 48, id="mobilenet_v2", marks=pytest.mark.slow),
    pytest.param(vgg_like, 32, id="vgg_like"),
    pytest.param(lambda: decoy_cnn(False), 32, id="decoy_cnn"),
    pytest.param(lambda: decoy_cnn(True), 32, id="decoy_cnn_bn"),
]


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the stem replays (the Function's backward, or the one-time check)."""
    calls: list[int] = []
    transpose = stem_module.StemPass.transpose

    def counted(self, u):
        calls.append(1)
        return transpose(self, u)

    monkeypatch.setattr(stem_module.StemPass, "transpose", counted)
    return calls


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _step(method: GuidedGradCAM, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training step's quantities: the normalized maps and the trust loss's parameter gradients
    (plus those of a loss on the raw map, whose scale does not hide small gradient terms)."""
    out = method(x, labels)
    params = [p for p in method.model.parameters() if p.requires_grad]
    trust = TrustLoss(lam=0.5)(out.logits, labels, out.maps)["loss"]
    grads = torch.autograd.grad(trust, params, retain_graph=True, allow_unused=True, materialize_grads=True)
    raw = out.raw.pow(2).sum() / out.raw.detach().pow(2).sum()
    grads += torch.autograd.grad(raw, params, allow_unused=True, materialize_grads=True)
    return out.maps.detach(), list(grads)


@pytest.mark.parametrize(("build", "size"), MODELS)
def test_fast_stem_equals_the_double_backward(build, size: int, replays: list[int]) -> None:
    net, layer = build()
    reference_net = copy.deepcopy(net)
    x, labels = _images(2, size), torch.tensor([0, 2])
    fast = GuidedGradCAM(net, layer)
    slow = GuidedGradCAM(reference_net, layer, fast_stem=False)
    maps, grads = _step(fast, x, labels)  # the first call plans the stem (one extra forward) and takes the fast path
    assert fast.fast_stem_reason is None
    assert len(replays) == 3  # the one-time adjoint check, then the Function's backward of each loss
    ref_maps, ref_grads = _step(slow, x, labels)
    assert len(replays) == 3
    maps_again, _ = _step(fast, x, labels)
    assert len(replays) == 5 and torch.equal(maps_again, maps)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-10, atol=1e-12)
    assert (maps.flatten(1).amax(1) > 0).any()  # a map to differentiate (an all-negative CAM is 0)
    assert all(g.abs().sum() > 0 for g in ref_grads[: len(ref_grads) // 2 - 1])  # the head's bias may be 0
    for ours, theirs in zip(grads, ref_grads):
        scale = float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12 * max(scale, 1e-30))


@pytest.mark.slow
def test_fast_stem_maps_equal_captum_on_frozen_mobilenet(replays: list[int]) -> None:
    torch.manual_seed(0)
    net = _randomize_batch_norms(torchvision.models.mobilenet_v2(weights=None, width_mult=0.25), 32).double().eval()
    freeze_except(net, ["features.18"])
    x = _images(2, 32)
    method = GuidedGradCAM(net, "features.18", normalize="none", channel_reduce="none")
    method(x)
    out = method(x)
    assert method.fast_stem_reason is None
    reference = copy.deepcopy(net)
    for m in reference.modules():
        if hasattr(m, "inplace"):
            m.inplace = False

    class CaptumWithReLU6(CaptumGuidedBackprop):
        def _register_hooks(self, module: nn.Module) -> None:
            if isinstance(module, (nn.ReLU, nn.ReLU6)):
                from captum.attr._core.guided_backprop_deconvnet import _register_backward_hook

                self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))

    layer = reference.features[18]
    cam = LayerGradCam(reference, layer).attribute(x, target=out.targets, relu_attributions=True)
    gb = CaptumWithReLU6(reference).attribute(x, target=out.targets)
    expected = gb * F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.raw.detach(), expected.detach())


def test_evaluation_maps_without_graph_equal_the_double_backward() -> None:
    net, layer = decoy_cnn(True)
    x = _images(3, 32)
    fast, slow = GuidedGradCAM(net, layer), GuidedGradCAM(copy.deepcopy(net), layer, fast_stem=False)
    fast(x, create_graph=False)
    out = fast(x, create_graph=False)
    assert fast.fast_stem_reason is None
    torch.testing.assert_close(out.maps, slow(x, create_graph=False).maps, rtol=1e-10, atol=1e-12)


# --- where the fast path does not apply: the same result, and the reason ---------------------------


class SkipAround(nn.Module):
    """The stem's output reaches the logits around the trainable conv too (a residual connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.fc(self.relu(self.conv(h) + h).mean(dim=(2, 3)))


class FunctionalReLU(SkipAround):
    """A stem nonlinearity no module shows: the replay cannot know it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem[0](x) - 0.1) + 0.2
        return self.fc(self.relu(self.conv(h)).mean(dim=(2, 3)))


def _with_silu() -> nn.Module:
    net, _ = decoy_cnn(False)
    net.features.relu1 = nn.SiLU()
    return net


def _trainable_stem() -> nn.Module:
    torch.manual_seed(0)
    return small_cnn(num_classes=3).net.double().eval()  # every parameter requires grad


def _stem_batch_statistics() -> nn.Module:
    net, _ = decoy_cnn(True)
    net.features.bn1.train()
    return net


def _frozen(net: nn.Module, trainable: list[str]) -> nn.Module:
    torch.manual_seed(0)
    net = net.double().eval()
    freeze_except(net, trainable)
    return net


FALLBACKS = {
    "trainable stem": (_trainable_stem, "features.conv3", "nothing frozen runs before 'features.conv1'"),
    "batch statistics": (_stem_batch_statistics, "features.conv3", "'features.bn1' in the stem normalizes with batch"),
    "non-ReLU activation": (_with_silu, "features.conv3", "'features.relu1' (SiLU) in the frozen stem is a non-ReLU"),
    "skip connection": (lambda: _frozen(SkipAround(), ["conv"]), "conv", "bypasses the cut module 'conv'"),
    "functional op": (lambda: _frozen(FunctionalReLU(), ["conv"]), "conv", "replay is not exact"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback_gives_the_same_result_and_says_why(case: str, caplog: pytest.LogCaptureFixture) -> None:
    build, layer, reason = FALLBACKS[case]
    net = build()
    reference_net = copy.deepcopy(net)
    x, labels = _images(3, 16), torch.tensor([0, 1, 2])
    method = GuidedGradCAM(net, layer, target="label")
    with caplog.at_level(logging.WARNING, logger="trustcnn.saliency.stem"):
        for _ in range(3):
            maps, grads = _step(method, x, labels)
    assert reason in method.fast_stem_reason
    assert sum(reason in r.getMessage() for r in caplog.records) == 1  # said once, not at every step
    ref_maps, ref_grads = _step(GuidedGradCAM(reference_net, layer, target="label", fast_stem=False), x, labels)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12 * max(float(theirs.abs().max()), 1e-30))


def test_backward_check_refuses_an_inexact_replay() -> None:
    """Past the one-time check, a replay that stopped being the transpose (here: a BatchNorm's scale
    changed between the forward and the backward) raises instead of training on wrong gradients."""
    net, layer = decoy_cnn(True)
    x, labels = _images(3, 32), torch.tensor([0, 1, 2])
    method = GuidedGradCAM(net, layer, target="label")
    _step(method, x, labels)
    _step(method, x, labels)
    out = method(x, labels)
    with torch.no_grad():
        net.features.bn1.running_var.mul_(4.0)
    with pytest.raises(stem_module.StemInexactError, match="fast_stem=false"):
        TrustLoss(lam=0.5)(out.logits, labels, out.maps)["loss"].backward()


# --- the real training step ------------------------------------------------------------------------


def _trust_module(fast_stem: bool) -> "object":
    from trustcnn.loss import TrustLoss as Loss
    from trustcnn.module import TrustModule

    torch.manual_seed(0)
    built = small_cnn(num_classes=3, batch_norm=True)
    _randomize_batch_norms(built.net, 32)
    built.net.double()
    return TrustModule(built, Loss(lam=0.5), lambda params: torch.optim.SGD(params, lr=0.1), num_classes=3,
                       saliency={"method": "guided_gradcam", "fast_stem": fast_stem})


def test_training_step_uses_the_fast_stem(replays: list[int]) -> None:
    fast, slow = _trust_module(True), _trust_module(False)
    batch = (_images(4, 32), torch.tensor([0, 1, 2, 0]), torch.zeros(0))
    grads = []
    for module in (fast, slow):
        module.train()
        for _ in range(2):
            module.zero_grad()
            module.training_step(batch, 0).backward()
        grads.append({n: p.grad.clone() for n, p in module.net.named_parameters() if p.requires_grad})
    assert fast.saliency.fast_stem_reason is None and replays  # the training step ran the Function
    assert slow.saliency.fast_stem_reason == "fast_stem=False"
    assert set(grads[0]) == {"features.conv3.weight", "features.conv3.bias"}
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-9, atol=1e-15, msg=name)


class ConvReadTwice(nn.Module):
    """A conv whose output a BatchNorm reads *and* a residual sum reads: folding the BatchNorm into the conv
    would hand the sum the normalized values, so this pair must not be folded; the plain conv -> BN -> ReLU
    in front of it may."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.new_conv = nn.Conv2d(6, 8, 1)
        self.new_relu = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.stem(x))
        y = self.relu(self.bn(y) + y)
        return self.head(self.new_relu(self.new_conv(y)).mean(dim=(2, 3)))


def test_only_convs_read_by_their_batch_norm_alone_are_folded(replays: list[int]) -> None:
    torch.manual_seed(0)
    net = _randomize_batch_norms(ConvReadTwice(), 16).double().eval()
    freeze_except(net, ["new_conv", "head"])
    reference_net = copy.deepcopy(net)
    x, labels = _images(2, 16), torch.tensor([0, 2])
    fast = GuidedGradCAM(net, "new_relu")
    for _ in range(2):
        maps, grads = _step(fast, x, labels)
    assert fast.fast_stem_reason is None
    assert fast._stem.plan.folded == {net.stem[0]: net.stem[1]}
    ref_maps, ref_grads = _step(GuidedGradCAM(reference_net, "new_relu", fast_stem=False), x, labels)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12 * max(float(theirs.abs().max()), 1e-30))


def test_mobilenet_blocks_fold_every_batch_norm_of_the_stem() -> None:
    net, layer = mobilenet_blocks()
    method = GuidedGradCAM(net, layer)
    x = _images(2, 16)
    for _ in range(2):
        method(x)
    plan = method._stem.plan
    norms = [m for _, m in plan.stem if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 11 and sorted(map(id, plan.folded.values())) == sorted(map(id, norms))
    # the recorded forward keeps the modules' own values: logits equal to a plain forward's, bit for bit
    with torch.no_grad():
        plain = net(x)
    assert torch.equal(method(x).logits.detach(), plain)


class HeadWithSideEffects(nn.Module):
    """A frozen stem, then a train-mode BatchNorm and dropout after the cut: the planning forward's updates of
    the running statistics and its draws of the random generator must not reach the run."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.new_conv = nn.Conv2d(6, 8, 3, padding=1)
        self.new_relu = nn.ReLU()
        self.head_norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.head_norm(self.new_relu(self.new_conv(self.stem(x))).mean(dim=(2, 3)))))


def test_planning_forward_leaves_statistics_and_random_draws_as_they_were(replays: list[int]) -> None:
    torch.manual_seed(0)
    net = _randomize_batch_norms(HeadWithSideEffects(), 16).double()
    freeze_except(net, ["new_conv", "head_norm", "head"])
    net.eval()
    net.head_norm.train()
    net.drop.train()
    reference_net = copy.deepcopy(net)
    x, labels = _images(4, 16), torch.tensor([0, 2, 1, 0])
    fast, slow = GuidedGradCAM(net, "new_relu"), GuidedGradCAM(reference_net, "new_relu", fast_stem=False)
    torch.manual_seed(5)
    maps, grads = _step(fast, x, labels)
    torch.manual_seed(5)
    ref_maps, ref_grads = _step(slow, x, labels)
    assert fast.fast_stem_reason is None and replays
    # one update each by the calibration forward and by the step: none by the planning forward
    assert int(net.head_norm.num_batches_tracked) == 2 == int(reference_net.head_norm.num_batches_tracked)
    torch.testing.assert_close(net.head_norm.running_mean, reference_net.head_norm.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-10, atol=1e-12)  # the same dropout mask
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12 * max(float(theirs.abs().max()), 1e-30))
