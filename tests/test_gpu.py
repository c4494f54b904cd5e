"""On a CUDA device: the in-step saliency and its training gradient equal the CPU float64 reference, and
full runs under ``16-mixed`` / ``bf16-mixed`` train with every loss and both saliency methods.

Marked ``gpu`` and skipped without CUDA; ``benchmarks/device_check.sh`` runs them on GPU nodes
(``pytest -m gpu``). CPU autocast neither raises CUDA's "binary_cross_entropy is unsafe to autocast" error
nor runs ``16-mixed``, so these are the tests that see what a GPU user sees.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig, open_dict

from trustcnn.loss import MaskTrustLoss, TrustLoss
from trustcnn.models.small_cnn import small_cnn
from trustcnn.models.torchvision_models import mobilenet_v2_transfer
from trustcnn.saliency import build_saliency
from trustcnn.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on_gpu(cfg: DictConfig) -> DictConfig:
    """``make_cfg`` shrinks for CPU tests (``trainer.accelerator=cpu``): put the run back on the GPU."""
    with open_dict(cfg):
        cfg.trainer.accelerator = "gpu"
        cfg.trainer.devices = 1
    return cfg


@pytest.fixture
def exact_cuda():
    """Full float32 on the GPU (no TF32 in convolutions or matmuls) for comparisons with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _maps_and_gradients(built, method: str, device: str, dtype: torch.dtype, x, y, masks):
    net = built.net.to(device=device, dtype=dtype).eval()
    saliency = build_saliency(method, net, built.target_layer, second_order=True)
    out = saliency(x.to(device, dtype), y.to(device))
    loss_fn = MaskTrustLoss() if masks is not None else TrustLoss(lam=0.9)
    args = (out.logits, y.to(device), out.maps) + ((masks.to(device, dtype),) if masks is not None else ())
    loss = loss_fn(*args)["loss"]
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return out.maps.detach().double().cpu(), [g.double().cpu() for g in grads], float(loss.detach())


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
@pytest.mark.parametrize("arch", ["small_cnn", "mobilenet_v2"])
@pytest.mark.parametrize("mask_loss", [False, True], ids=["trust", "trust_mask"])
def test_cuda_maps_and_step_gradients_equal_the_cpu_float64_reference(exact_cuda, arch: str, method: str,
                                                                       mask_loss: bool) -> None:
    torch.manual_seed(0)
    built = small_cnn(num_classes=10) if arch == "small_cnn" else mobilenet_v2_transfer(num_classes=2, weights=None)
    size = 32 if arch == "small_cnn" else 96
    classes = 10 if arch == "small_cnn" else 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, size, size, generator=g)
    y = torch.randint(0, classes, (6,), generator=g)
    masks = (torch.rand(6, size, size, generator=g) > 0.6).float() if mask_loss else None
    state = {k: v.clone() for k, v in built.net.state_dict().items()}
    ref_maps, ref_grads, ref_loss = _maps_and_gradients(built, method, "cpu", torch.float64, x, y, masks)
    built.net.load_state_dict(state)
    maps, grads, loss = _maps_and_gradients(built, method, "cuda", torch.float32, x, y, masks)
    assert abs(loss - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    torch.testing.assert_close(maps, ref_maps, rtol=1e-3, atol=1e-4)
    # All trainable parameters' gradient as one vector: tensors whose entries are ~1e-9 (a bias far from
    # the loss) would make an element-wise relative check measure float32 rounding, not the step.
    grad, ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
    assert float((grad - ref).norm() / ref.norm()) < 1e-3


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize(("saliency", "loss"), [("gradcam", "trust"), ("guided_gradcam", "trust"),
                                                ("gradcam", "trust_mask"), ("guided_gradcam", "trust_mask"),
                                                ("gradcam", "ce")])
def test_mixed_precision_runs_on_cuda(make_cfg, precision: str, saliency: str, loss: str) -> None:
    metrics, objects = train(on_gpu(make_cfg(f"saliency={saliency}", f"loss={loss}",
                                             f"trainer.precision={precision}", "logger=none")))
    assert objects["trainer"].precision == precision
    assert objects["module"].device.type == "cuda"
    for key in ("test/acc", "test/energy_pointing_game", "val/loss"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("saliency", ["gradcam", "guided_gradcam"])
def test_half_precision_maps_agree_with_float32_maps_on_cuda(make_cfg, exact_cuda, saliency: str,
                                                             dtype: torch.dtype) -> None:
    """The tolerance stated for CPU bf16 (tests/test_precision.py) holds on the GPU, for both half types."""
    _, objects = train(on_gpu(make_cfg(f"saliency={saliency}", "logger=none", "test=false")))
    module, datamodule = objects["module"].eval(), objects["datamodule"]
    x, y, _ = next(iter(datamodule.val_dataloader()))
    x, y = x.to(module.device), y.to(module.device)
    full = module.explain(x, y, create_graph=False).maps.detach()
    with torch.autocast("cuda", dtype=dtype):
        mixed = module.explain(x, y, create_graph=False).maps.detach()
    assert mixed.dtype == torch.float32
    assert (mixed - full).abs().mean() < 0.05
