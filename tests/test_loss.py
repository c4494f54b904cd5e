"""The composite losses against hand-computed values (DESIGN §1), gradcheck, and bad input."""

from __future__ import annotations

import pytest
import torch

from trustcnn.loss import CrossEntropyLoss, MaskTrustLoss, TrustLoss

# Two samples, two classes: CE = log(1+e^-2) = 0.126928 (right, confident) and log(1+e) = 1.313262 (wrong).
LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0])
# Map means (Ŝ) 0.5 and 0.25 -> s = Ŝ/|C| = 0.25 and 0.125.
MAPS = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.25, 0.25], [0.25, 0.25]]], dtype=torch.float64)


def test_cross_entropy_baseline() -> None:
    out = CrossEntropyLoss()(LOGITS, LABELS)
    assert out["loss"].item() == pytest.approx(0.7200948492805977)
    assert set(out) == {"loss", "ce"}


@pytest.mark.parametrize(
    ("form", "loss", "r1", "r2"),
    [
        # sample 0: 0.9*.063464 + .1*.25 + .063464*.75 + .25*.936536 = 0.363850
        # sample 1: 0.9*.656631 + .1*.125 + .656631*.875 + .125*.343369 = 1.220941
        ("paper", 0.7923952499663072, 0.3110749962151686, 0.13852757157486975),
        ("prose", 0.8931901143862305, 0.04897242842513025, 0.5014250037848313),
    ],
)
def test_trust_loss_forms_hand_computed(form: str, loss: float, r1: float, r2: float) -> None:
    out = TrustLoss(lam=0.9, form=form)(LOGITS, LABELS, MAPS)
    assert out["loss"].item() == pytest.approx(loss)
    assert out["r1"].item() == pytest.approx(r1)
    assert out["r2"].item() == pytest.approx(r2)
    assert out["ce"].item() == pytest.approx(0.7200948492805977)
    assert out["c"].item() == pytest.approx(0.36004742464029886)
    assert out["s_hat"].item() == pytest.approx(0.375)
    assert out["reg"].item() == pytest.approx(0.1 * 0.1875)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (dict(w1=0.0), 0.4813202537511387),  # ablation=no_r1
        (dict(w2=0.0), 0.6538676783914374),  # ablation=no_r2
        (dict(w_s=0.0), 0.7736452499663073),  # ablation=no_reg
    ],
)
def test_ablations_hand_computed(weights: dict, expected: float) -> None:
    out = TrustLoss(lam=0.9, **weights)(LOGITS, LABELS, MAPS)
    assert out["loss"].item() == pytest.approx(expected)


def test_unscaled_loss_clamps_ce_inside_regularizers() -> None:
    # c = CE (1.313 > 1 is clamped to 1 inside R1/R2 only), s = Ŝ.
    out = TrustLoss(lam=0.9, scale_by_classes=False)(LOGITS, LABELS, MAPS)
    assert out["loss"].item() == pytest.approx(1.3105853643525378)


def test_paper_form_derivative_in_s_is_one_minus_two_c() -> None:
    """The documented inconsistency: for form=paper, d(R1+R2)/ds = 1 - 2c; prose gives 2c - 1."""
    c = torch.tensor(0.2, dtype=torch.float64)
    for form, sign in (("paper", 1.0), ("prose", -1.0)):
        s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        loss = TrustLoss(lam=0.5, form=form, w_s=0.0)._combine(c[None], c[None], s[None], s[None])
        (ds,) = torch.autograd.grad(loss["r1"] + loss["r2"], s)
        assert ds.item() == pytest.approx(sign * (1 - 2 * 0.2))


def test_mask_loss_hand_computed() -> None:
    maps = torch.tensor([[[0.9, 0.1], [0.8, 0.2]], [[0.5, 0.5], [0.5, 0.5]]], dtype=torch.float64)
    masks = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    out = MaskTrustLoss(lam=0.5)(LOGITS, LABELS, maps, masks)
    # P = mean BCE: (2(-log .9) + 2(-log .8))/4 = 0.164252 and log 2 = 0.693147.
    assert out["pwce"].item() == pytest.approx(0.42869960702298165)
    assert out["loss"].item() == pytest.approx(0.7175546375145228)


def test_mask_is_resized_to_map_resolution() -> None:
    maps = torch.full((2, 2, 2), 0.5, dtype=torch.float64)
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    masks[:, :, :4, :4] = 1.0  # exactly the top-left map cell
    out = MaskTrustLoss()(LOGITS, LABELS, maps, masks)
    assert out["pwce"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


@pytest.mark.parametrize("loss_cls", [TrustLoss, MaskTrustLoss])
@pytest.mark.parametrize("form", ["paper", "prose"])
def test_gradcheck_losses(loss_cls: type, form: str) -> None:
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    maps = (torch.rand(3, 5, 5, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    labels = torch.tensor([0, 2, 3])
    masks = (torch.rand(3, 1, 5, 5) > 0.5).double()
    loss = loss_cls(lam=0.7, form=form)
    assert torch.autograd.gradcheck(lambda z, m: loss(z, labels, m, masks)["loss"], (logits, maps))


def test_all_zero_maps_and_batch_of_one() -> None:
    out = TrustLoss()(LOGITS[:1], LABELS[:1], torch.zeros(1, 3, 3, dtype=torch.float64))
    c = 0.126928 / 2
    assert out["loss"].item() == pytest.approx(0.9 * c + c, rel=1e-5)  # s = 0 -> R1 = c, R2 = 0


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_lambda_outside_unit_interval(lam: float) -> None:
    with pytest.raises(ValueError, match=r"loss.lam must lie in \[0, 1\]"):
        TrustLoss(lam=lam)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="Unknown loss.form 'eq5'"):
        TrustLoss(form="eq5")
    with pytest.raises(ValueError, match=r"shape \(N, h, w\) with N=2"):
        TrustLoss()(LOGITS, LABELS, MAPS[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\].*saliency.normalize"):
        TrustLoss()(LOGITS, LABELS, MAPS * 3)
    with pytest.raises(FloatingPointError, match="NaN"):
        TrustLoss()(LOGITS, LABELS, torch.full_like(MAPS, float("nan")))
    with pytest.raises(ValueError, match="needs ground-truth masks"):
        MaskTrustLoss()(LOGITS, LABELS, MAPS, torch.zeros(2, 0))
