"""Model builders, weight resolution (local file / hub cache / offline error) and freezing.

No network: every test runs with ``TORCH_HOME`` pointing at an empty temporary directory and with
``torch.hub.download_url_to_file`` (the only downloader torch.hub and trustcnn use) raising ``URLError``.
Weights are random, saved to local files once per module.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from trustcnn.layers import LayerNotFoundError
from trustcnn.models import (
    UnknownArchError,
    WeightsError,
    WeightsUnavailableError,
    freeze_except,
    mobilenet_v2_transfer,
    set_trainable_mode,
    torchvision_classifier,
    vgg16,
)
from trustcnn.models.weights import cached_weights_file
from trustcnn.normalization import IMAGENET_MEAN, IMAGENET_STD

MNV2_CACHE_NAME = "mobilenet_v2-b0353104.pth"  # file name of MobileNet_V2_Weights.IMAGENET1K_V1's url


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Empty torch hub cache and no network; returns the list of attempted downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    attempts: list[str] = []

    def no_network(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return attempts


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mnv2_file(random_weights):
    return random_weights("mobilenet_v2")


@pytest.fixture(scope="module")
def resnet18_file(random_weights):
    return random_weights("resnet18")


@pytest.fixture(scope="module")
def vgg_file(random_weights, x):
    """VGG-16 random weights (the session's shared file) plus the reference output of torchvision's model."""
    path = random_weights("vgg16")
    net = torchvision.models.vgg16(weights=None).eval()
    net.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        ref = net(x)
    del net
    return path, ref


@pytest.fixture(scope="module")
def mnv2_features(mnv2_file, x):
    """Output of the original torchvision MobileNetV2's ``features`` on ``x``."""
    ref = torchvision.models.mobilenet_v2(weights=None).eval()
    ref.load_state_dict(torch.load(mnv2_file, weights_only=True))
    with torch.no_grad():
        return ref.features(x)


def _assert_backbone_is(net: nn.Module, path: Path) -> None:
    """The transfer net's backbone holds exactly the ``features.*`` tensors saved at ``path``."""
    saved = torch.load(path, weights_only=True)
    own = net.backbone.state_dict()
    assert own.keys() == {k[len("features.") :] for k in saved if k.startswith("features.")}
    assert all(torch.equal(v, saved["features." + k]) for k, v in own.items())


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], net: nn.Module) -> set[str]:
    return {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}


def _train_step(net: nn.Module, trainable: list[str], x: torch.Tensor, num_classes: int) -> None:
    set_trainable_mode(net, trainable)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    y = torch.arange(x.shape[0]) % num_classes
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# --------------------------------------------------------------------------------------------------
# MobileNetV2 transfer


def test_mobilenet_transfer_structure_and_weights_path(mnv2_file, mnv2_features, x):
    built = mobilenet_v2_transfer(num_classes=2, weights_path=str(mnv2_file))
    net = built.net
    assert built.target_layer == "new_conv"
    assert built.trainable == ["new_conv", "classifier"]
    assert (built.input_size, built.mean, built.std) == (224, IMAGENET_MEAN, IMAGENET_STD)
    assert isinstance(net.new_conv.conv, nn.Conv2d)
    conv = net.new_conv.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (1280, 256, (1, 1), (1, 1))
    assert isinstance(net.new_conv.relu, nn.ReLU)
    assert net.classifier.out_features == 2
    assert not net.training
    assert built.extra["trainable_parameters"] == [
        "new_conv.conv.weight",
        "new_conv.conv.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    assert built.extra["weights_source"] == f"file:{mnv2_file}"
    with torch.no_grad():
        assert net(x).shape == (2, 2)
        torch.testing.assert_close(net.backbone(x), mnv2_features, rtol=0, atol=0)


def test_state_dict_key_wrapper_accepted(mnv2_file, tmp_path):
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": torch.load(mnv2_file, weights_only=True), "epoch": 3}, wrapped)
    _assert_backbone_is(mobilenet_v2_transfer(2, weights_path=wrapped).net, mnv2_file)


def test_mobilenet_transfer_freezing(mnv2_file, x):
    built = mobilenet_v2_transfer(2, weights_path=mnv2_file)
    net = built.net
    before = _snapshot(net)
    _train_step(net, built.trainable, x, 2)
    # BN of the frozen backbone in eval mode, new layers in train mode
    assert all(not m.training for m in net.backbone.modules() if isinstance(m, _BatchNorm))
    assert net.new_conv.training and net.classifier.training
    assert _changed(before, net) == {
        "new_conv.conv.weight",
        "new_conv.conv.bias",
        "classifier.weight",
        "classifier.bias",
    }  # no backbone parameter and no BN running statistic moved


# --------------------------------------------------------------------------------------------------
# weights: hub cache, download, offline error, file errors


def test_offline_error_names_cache_file_and_alternatives(offline):
    with pytest.raises(WeightsUnavailableError) as err:
        mobilenet_v2_transfer(num_classes=2)  # default weights IMAGENET1K_V1, nothing cached
    msg = str(err.value)
    expected = Path(torch.hub.get_dir()) / "checkpoints" / MNV2_CACHE_NAME
    assert str(expected) in msg
    assert "model.weights_path" in msg and "model.weights=null" in msg
    assert offline == [torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url]


def test_cached_file_is_used_without_network(mnv2_file, offline):
    cache = Path(torch.hub.get_dir()) / "checkpoints" / MNV2_CACHE_NAME
    assert cached_weights_file(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1) == cache
    cache.parent.mkdir(parents=True)
    cache.write_bytes(mnv2_file.read_bytes())
    built = mobilenet_v2_transfer(num_classes=2)
    assert offline == []  # no download attempted
    assert built.extra["weights_source"] == f"torchvision:{cache}"
    assert built.extra["weights"] == "MobileNet_V2_Weights.IMAGENET1K_V1"
    _assert_backbone_is(built.net, mnv2_file)


def test_first_use_downloads_into_hub_cache(mnv2_file, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(mnv2_file.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    built = mobilenet_v2_transfer(num_classes=2, weights="IMAGENET1K_V1")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / MNV2_CACHE_NAME
    assert calls == [(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url, str(cache), "b0353104")]
    assert cache.is_file()
    built2 = mobilenet_v2_transfer(num_classes=2, weights="MobileNet_V2_Weights.IMAGENET1K_V1")
    assert len(calls) == 1  # second build reads the cache
    _assert_backbone_is(built.net, mnv2_file)
    _assert_backbone_is(built2.net, mnv2_file)


def test_missing_weights_path_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(WeightsError, match="nope/weights.pth"):
        mobilenet_v2_transfer(2, weights_path=missing)


def test_strict_loading_lists_missing_and_unexpected_keys(resnet18_file, tmp_path):
    sd = torch.load(resnet18_file, weights_only=True)
    sd.pop("layer1.0.conv1.weight")
    sd["extra.head.weight"] = torch.zeros(1)
    sd["fc.bias"] = torch.zeros(7)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(WeightsError) as err:
        torchvision_classifier(3, "resnet18", "layer4", weights_path=bad)
    msg = str(err.value)
    assert "layer1.0.conv1.weight" in msg and "extra.head.weight" in msg and "fc.bias" in msg
    assert "Missing" in msg and "Unexpected" in msg and "Shape" in msg


def test_unknown_weights_name_lists_valid():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        torchvision_classifier(3, "resnet18", "layer4", weights="IMAGENET1K_V7")


def test_random_init_needs_no_weights():
    built = torchvision_classifier(3, "resnet18", "layer4", weights=None)
    assert built.extra["weights_source"] == "random" and built.extra["weights"] is None


# --------------------------------------------------------------------------------------------------
# VGG-16


def test_vgg16_weights_path_output_and_freezing(vgg_file, x):
    path, ref = vgg_file
    built = vgg16(weights_path=path)
    net = built.net
    assert built.target_layer == "features.29" and built.trainable == ["features.28"]
    assert isinstance(net.features[28], nn.Conv2d)
    assert built.extra["trainable_parameters"] == ["features.28.weight", "features.28.bias"]
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())  # frozen head: no dropout noise
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out, ref)

    w0, frozen0 = net.features[28].weight.detach().clone(), net.features[26].weight.detach().clone()
    _train_step(net, built.trainable, x, 1000)
    grads = {n for n, p in net.named_parameters() if p.grad is not None}
    assert grads == {"features.28.weight", "features.28.bias"}
    assert not torch.equal(net.features[28].weight, w0)
    assert torch.equal(net.features[26].weight, frozen0)


def test_vgg16_requires_1000_classes():
    with pytest.raises(ValueError, match="1000") as err:
        vgg16(num_classes=2, weights=None)
    assert "torchvision_classifier" in str(err.value)


# --------------------------------------------------------------------------------------------------
# any torchvision classifier


def test_resnet18_layer4_three_classes_and_frozen_bn(resnet18_file, x):
    built = torchvision_classifier(3, "resnet18", "layer4", weights="IMAGENET1K_V1", weights_path=resnet18_file)
    net = built.net
    assert built.target_layer == "layer4" and built.trainable == ["layer4", "fc"]
    assert built.extra["head"] == "fc" and built.extra["head_replaced"] and built.extra["categories"] is None
    assert net.fc.out_features == 3
    with torch.no_grad():
        assert net(x).shape == (2, 3)

    before = _snapshot(net)
    _train_step(net, built.trainable, x, 3)
    changed = _changed(before, net)
    assert changed, "nothing trained"
    assert all(k.startswith(("layer4.", "fc.")) for k in changed), sorted(changed)
    # BN inside the trainable layer4 trains (statistics move), every BN outside keeps its statistics
    assert "layer4.0.bn1.running_mean" in changed and "layer4.1.bn2.running_var" in changed
    assert {"fc.weight", "fc.bias", "layer4.0.conv1.weight"} <= changed
    for name, m in net.named_modules():
        if isinstance(m, _BatchNorm):
            assert m.training == name.startswith("layer4."), name


def test_without_frozen_bn_eval_statistics_would_move(resnet18_file, x):
    """Sanity check of the test above: plain train() updates the frozen BN statistics."""
    built = torchvision_classifier(3, "resnet18", "layer4", weights_path=resnet18_file)
    net = built.net.train()
    before = _snapshot(net)
    with torch.no_grad():
        net(x)
    assert "bn1.running_mean" in _changed(before, net)


def test_head_replacement_rules(resnet18_file):
    kept = torchvision_classifier(1000, "resnet18", "layer4", weights_path=resnet18_file)
    assert not kept.extra["head_replaced"] and kept.trainable == ["layer4"]
    assert kept.extra["categories"] and len(kept.extra["categories"]) == 1000
    fresh = torchvision_classifier(1000, "resnet18", "layer4", weights_path=resnet18_file, replace_head=True)
    assert fresh.extra["head_replaced"] and fresh.trainable == ["layer4", "fc"]
    assert not torch.equal(fresh.net.fc.weight, kept.net.fc.weight)
    with pytest.raises(ValueError, match="replace_head"):
        torchvision_classifier(3, "resnet18", "layer4", weights=None, replace_head=False)
    covered = torchvision_classifier(3, "resnet18", "layer4", trainable=["layer3", "fc"], weights=None)
    assert covered.trainable == ["layer3", "fc"]


def test_unknown_arch_lists_close_matches():
    with pytest.raises(UnknownArchError, match="resnet50") as err:
        torchvision_classifier(3, "resnet51", "layer4", weights=None)
    assert "list_models" in str(err.value)


def test_unknown_layer_names_list_close_matches():
    with pytest.raises(LayerNotFoundError, match="layer4"):
        torchvision_classifier(3, "resnet18", "layer5", weights=None)
    with pytest.raises(LayerNotFoundError, match="layer3"):
        torchvision_classifier(3, "resnet18", "layer4", trainable=["layer33"], weights=None)
    with pytest.raises(LayerNotFoundError, match="new_conv"):
        mobilenet_v2_transfer(2, weights=None, target_layer="new_cnv")


def test_hydra_instantiate_with_listconfig():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "_target_": "trustcnn.models.torchvision_classifier",
            "arch": "resnet18",
            "target_layer": "layer4",
            "trainable": ["layer4"],
            "weights": None,
            "model_kwargs": {"zero_init_residual": True},
        }
    )
    built = instantiate(cfg, num_classes=3)
    assert built.trainable == ["layer4", "fc"] and built.net.fc.out_features == 3


# --------------------------------------------------------------------------------------------------
# freeze helpers on a small net


def _small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


def test_freeze_except_and_errors():
    net = _small()
    assert freeze_except(net, ["3"]) == ["3.weight", "3.bias"]
    assert [p.requires_grad for p in net.parameters()] == [False] * 4 + [True] * 2 + [False] * 2
    assert freeze_except(net, ["0"]) == ["0.weight", "0.bias"]  # re-freezing resets the previous choice
    with pytest.raises(ValueError, match="no trainable"):
        freeze_except(net, [])
    with pytest.raises(ValueError, match="no parameters"):
        freeze_except(net, ["2"])  # a ReLU
    with pytest.raises(LayerNotFoundError, match="Close matches"):
        freeze_except(nn.Sequential(_TinyLinearNet()), ["0.lin"])


class _TinyLinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)


def test_set_trainable_mode_trains_only_the_trainable_modules():
    net = nn.Sequential(_small(), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm2d(4), nn.Dropout(0.5))).train()
    assert set_trainable_mode(net, ["2"]) == ["2", "2.0", "2.1"]
    assert not net[0][1].training and not net[1].training  # frozen BatchNorm and frozen dropout
    assert net[2][0].training and net[2][1].training
    assert set_trainable_mode(net, ["2"], training=False) == []
