"""Mixed precision: the losses and the map normalization compute in float32 whatever the maps' dtype,
and a bf16-mixed run on CPU trains with every loss and both saliency methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trustcnn.loss import CrossEntropyLoss, MaskTrustLoss, TrustLoss
from trustcnn.saliency import normalize_maps
from trustcnn.train import train

HALVES = [torch.bfloat16, torch.float16]


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g).to(dtype)
    labels = torch.arange(6) % 10
    maps = torch.rand(6, 8, 8, generator=g)
    maps[:, 0, 0], maps[:, 1, 1] = 1.0, 0.0  # exact 0 and 1: log(1 - p) and log(p) need the eps clamp
    masks = (torch.rand(6, 32, 32, generator=g) > 0.5).float()
    masks[:, :4, :4] = 0.0  # ... under the map's 1.0 (a mask 0 there: -log(1 - p) must stay finite)
    masks[:, 4:8, 4:8] = 1.0  # ... and under its 0.0
    return logits, labels, maps.to(dtype), masks


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("loss", [TrustLoss(form="paper"), TrustLoss(form="prose"), MaskTrustLoss(), CrossEntropyLoss()],
                         ids=["trust_paper", "trust_prose", "trust_mask", "ce"])
def test_every_loss_computes_in_float32_from_half_inputs_under_autocast(dtype, loss) -> None:
    logits, labels, maps, masks = _inputs(dtype)
    with torch.autocast("cpu", dtype=dtype):
        terms = loss(logits, labels, maps, masks)
    reference = loss(logits.float(), labels, maps.float(), masks)  # the same values, in float32
    for name, value in terms.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_the_mask_terms_would_not_survive_half_precision(dtype) -> None:
    """The check above can fail: the same BCE computed in the half dtype is wrong (eps rounds away)."""
    _, _, maps, masks = _inputs(dtype)
    target = F.interpolate(masks[:, None], size=(8, 8), mode="area")[:, 0].to(dtype)
    half = F.binary_cross_entropy(maps.clamp(1e-6, 1 - 1e-6).float(), target.float(), reduction="none")
    exact = F.binary_cross_entropy(maps.float().clamp(1e-6, 1 - 1e-6), target.float(), reduction="none")
    assert not torch.allclose(half, exact, rtol=1e-3)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("how", ["max", "minmax"])
def test_normalization_runs_in_float32(dtype, how: str) -> None:
    raw = (torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    out = normalize_maps(raw, how)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, normalize_maps(raw.float(), how))
    assert float(out.amax()) <= 1.0


@pytest.mark.parametrize(("saliency", "loss"), [("gradcam", "trust"), ("guided_gradcam", "trust"),
                                                ("gradcam", "trust_mask"), ("guided_gradcam", "trust_mask")])
def test_bf16_mixed_run_on_cpu(make_cfg, saliency: str, loss: str) -> None:
    metrics, objects = train(make_cfg(f"saliency={saliency}", f"loss={loss}", "trainer.precision=bf16-mixed", "logger=none"))
    assert objects["trainer"].precision == "bf16-mixed"
    for key in ("test/acc", "test/energy_pointing_game", "val/loss"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


@pytest.mark.parametrize("saliency", ["gradcam", "guided_gradcam"])
def test_bf16_maps_agree_with_float32_maps(make_cfg, saliency: str) -> None:
    """The stated tolerance: under bf16 autocast the normalized maps of the same model and batch differ
    from float32 maps by at most 0.05 on average (the maps lie in [0, 1])."""
    _, objects = train(make_cfg(f"saliency={saliency}", "logger=none", "test=false"))
    module, datamodule = objects["module"].eval(), objects["datamodule"]
    x, y, _ = next(iter(datamodule.val_dataloader()))
    full = module.explain(x, y, create_graph=False).maps.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.explain(x, y, create_graph=False).maps.detach()
    assert mixed.dtype == torch.float32
    assert (mixed - full).abs().mean() < 0.05
