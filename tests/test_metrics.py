"""Tests for trustcnn.metrics: hand-built cases with known answers + independent oracles (Quantus, skimage, scipy)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from trustcnn.metrics import (
    CaseTable,
    ClassificationEstimates,
    DeletionInsertion,
    EnergyPointingGame,
    MapRankCorrelation,
    MapSSIM,
    PointingGame,
    SaliencyIoU,
    deletion_insertion,
    energy_pointing_game,
    format_case_table,
    make_baseline,
    map_ssim,
    pointing_game,
    randomization_similarity,
    randomize_layer,
    saliency_iou,
    spearman_per_sample,
    wilson_interval,
    classification_estimates,
    macro_precision_recall,
)
from trustcnn.layers import LayerNotFoundError


def _point_map(h: int, w: int, y: int, x: int) -> torch.Tensor:
    m = torch.rand(h, w) * 0.1
    m[y, x] = 1.0
    return m


def _random_batch(seed: int, n: int = 12, h: int = 20, w: int = 24, map_hw: tuple[int, int] | None = None):
    g = torch.Generator().manual_seed(seed)
    mh, mw = map_hw or (h, w)
    maps = torch.rand(n, mh, mw, generator=g, dtype=torch.float64)
    masks = torch.rand(n, 1, h, w, generator=g) > 0.6
    return maps, masks


# ------------------------------------------------------------------------------------------------------
# input conventions


def test_mask_values_outside_unit_interval_are_rejected():
    with pytest.raises(ValueError, match="0/255"):
        energy_pointing_game(torch.rand(1, 4, 4), torch.full((1, 4, 4), 255.0))


def test_soft_masks_are_thresholded_at_half_and_shapes_accepted():
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 3.0
    maps[0, 0, 1, 1] = 1.0
    soft = torch.tensor([[[0.7, 0.2], [0.1, 0.49]]])  # only (0, 0) is object
    assert energy_pointing_game(maps, soft).item() == pytest.approx(0.75)
    assert energy_pointing_game(maps[:, 0], soft[:, None]).item() == pytest.approx(0.75)


def test_multichannel_map_is_rejected():
    with pytest.raises(ValueError, match="one channel"):
        pointing_game(torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4))


# ------------------------------------------------------------------------------------------------------
# pointing game


def test_pointing_game_inside_outside_and_tolerance():
    mask = torch.zeros(1, 32, 32)
    mask[0, 10:20, 10:20] = 1
    inside = _point_map(32, 32, 15, 15)[None]
    far = _point_map(32, 32, 2, 30)[None]
    right3 = _point_map(32, 32, 15, 22)[None]  # 3 px right of the mask's last column (19)
    diag = _point_map(32, 32, 22, 22)[None]  # (3, 3) from corner (19, 19): Euclidean 4.24, Chebyshev 3
    assert pointing_game(inside, mask, tolerance=0).item() == 1
    # far: (2, 30) is (8, 11) from the corner (10, 19): distance 13.6
    assert pointing_game(far, mask, tolerance=13).item() == 0
    assert pointing_game(far, mask, tolerance=14).item() == 1
    assert pointing_game(right3, mask, tolerance=0).item() == 0
    assert pointing_game(right3, mask, tolerance=2).item() == 0
    assert pointing_game(right3, mask, tolerance=3).item() == 1
    # the dilation is a disk, not a square
    assert pointing_game(diag, mask, tolerance=4).item() == 0
    assert pointing_game(diag, mask, tolerance=5).item() == 1


def test_pointing_game_metric_counts_hits_flat_and_empty():
    mask = torch.zeros(4, 16, 16)
    mask[:, 4:8, 4:8] = 1
    mask[3] = 0  # empty mask: skipped
    maps = torch.stack(
        [_point_map(16, 16, 5, 5), _point_map(16, 16, 14, 14), torch.ones(16, 16), _point_map(16, 16, 5, 5)]
    )
    pg = PointingGame(tolerance=0)
    pg.update(maps, mask)
    assert int(pg.hits) == 1 and int(pg.total) == 3 and int(pg.skipped) == 1 and int(pg.flat) == 1
    assert pg.compute().item() == pytest.approx(1 / 3)
    lo, hi = pg.interval()
    assert (lo, hi) == pytest.approx(wilson_interval(1, 3))
    assert torch.isnan(pointing_game(maps, mask, 0)[3])


def test_pointing_game_low_res_map_is_upsampled_to_mask():
    small = torch.tensor([[[0.0, 0.1], [0.2, 1.0]]])  # max in the bottom-right cell
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:, 32:] = 1
    assert pointing_game(small, mask, tolerance=0).item() == 1
    assert pointing_game(small, 1 - mask, tolerance=0).item() == 0


def test_pointing_game_tolerance_equals_disk_dilation_scipy():
    from scipy.ndimage import binary_dilation

    maps, masks = _random_batch(0, n=40, h=30, w=30)
    masks = torch.rand(40, 1, 30, 30, generator=torch.Generator().manual_seed(1)) > 0.985  # sparse masks
    masks[:, 0, 0, 0] |= ~masks.flatten(1).any(1)
    for t in (0, 1, 3, 6):
        r = np.arange(-t, t + 1)
        disk = (r[:, None] ** 2 + r[None, :] ** 2) <= t * t
        idx = maps.flatten(1).argmax(1)
        expected = []
        for i in range(40):
            dil = binary_dilation(masks[i, 0].numpy(), structure=disk) if t > 0 else masks[i, 0].numpy()
            expected.append(float(dil.reshape(-1)[idx[i]]))
        assert pointing_game(maps, masks, tolerance=t).tolist() == expected


def _quantus_scores(metric_cls, maps: torch.Tensor, masks: torch.Tensor) -> list:
    """Per-sample scores of a Quantus localisation metric on ``maps (N, h, w)`` and ``masks``.

    Quantus needs a model and inputs, but its localisation metrics only read the attributions and the
    masks, so a tiny linear model on random images stands in.
    """
    n, h, w = maps.shape
    x = np.random.default_rng(0).random((n, 3, h, w)).astype(np.float32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric_cls(normalise=False, abs=False, disable_warnings=True)(
            model=model, x_batch=x, y_batch=np.zeros(n, dtype=int),
            a_batch=maps[:, None].numpy(), s_batch=masks.float().numpy(), device="cpu",
        )


def test_pointing_game_matches_quantus():
    quantus = pytest.importorskip("quantus")
    maps, masks = _random_batch(2, n=16, h=12, w=12)
    q = _quantus_scores(quantus.PointingGame, maps, masks)
    ours = pointing_game(maps, masks, tolerance=0)
    assert ours.tolist() == [float(v) for v in q]
    assert 0 < ours.mean() < 1  # the comparison saw both hits and misses


# ------------------------------------------------------------------------------------------------------
# energy pointing game


def test_energy_pointing_game_exact_values():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[-5.0, 1.0], [1.0, 2.0]]])
    masks = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [0, 0]], [[1, 1], [0, 0]]])
    # 5/10; zero map -> 0; negative clamped: 1/4
    assert energy_pointing_game(maps, masks).tolist() == pytest.approx([0.5, 0.0, 0.25])
    m = EnergyPointingGame()
    m.update(maps, masks)
    assert m.compute().item() == pytest.approx(0.25)
    assert int(m.zero_maps) == 1 and int(m.total) == 3


def test_energy_pointing_game_constant_low_res_map_gives_mask_area():
    mask = torch.zeros(1, 40, 40)
    mask[0, :10, :] = 1  # 25% of the image
    assert energy_pointing_game(torch.full((1, 7, 7), 0.3), mask).item() == pytest.approx(0.25)


def test_energy_pointing_game_skips_empty_masks():
    maps = torch.rand(3, 8, 8)
    masks = torch.zeros(3, 8, 8)
    masks[0, :4] = 1
    m = EnergyPointingGame()
    m.update(maps, masks)
    assert int(m.total) == 1 and int(m.skipped) == 2
    assert m.compute().item() == pytest.approx(energy_pointing_game(maps[:1], masks[:1]).item())


def test_energy_pointing_game_matches_quantus_relevance_mass():
    quantus = pytest.importorskip("quantus")
    maps, masks = _random_batch(3, n=10, h=16, w=16)
    q = _quantus_scores(quantus.RelevanceMassAccuracy, maps, masks)
    np.testing.assert_allclose(energy_pointing_game(maps, masks).numpy(), np.asarray(q, dtype=np.float64), rtol=1e-10)


# ------------------------------------------------------------------------------------------------------
# IoU


def test_saliency_iou_exact():
    maps = (torch.arange(16.0).view(1, 4, 4) + 3) * 2  # minmax -> k/15, >= 0.5 means k >= 8: rows 2, 3
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3] = 1  # rows 1, 2
    assert saliency_iou(maps, mask, 0.5).item() == pytest.approx(4 / 12)
    assert saliency_iou(maps, mask, 0.0).item() == pytest.approx(8 / 16)
    flat = torch.ones(1, 4, 4)  # normalizes to zeros: empty prediction
    assert saliency_iou(flat, mask, 0.5).item() == 0
    m = SaliencyIoU(threshold=0.5)
    m.update(torch.cat([maps, flat]), torch.cat([mask, mask]))
    assert m.compute().item() == pytest.approx(1 / 6)


# ------------------------------------------------------------------------------------------------------
# accumulation and distributed reduction


_MASK_METRICS = [
    (lambda: PointingGame(tolerance=2), "single"),
    (lambda: EnergyPointingGame(), "single"),
    (lambda: SaliencyIoU(0.4), "single"),
]


@pytest.mark.parametrize("factory", [f for f, _ in _MASK_METRICS])
def test_two_batches_equal_one_big_batch_and_merge_state(factory):
    maps, masks = _random_batch(5, n=20, map_hw=(7, 7))
    masks[3] = False  # one skipped sample
    big, split, merged = factory(), factory(), factory()
    big.update(maps, masks)
    split.update(maps[:13], masks[:13])
    split.update(maps[13:], masks[13:])
    other = factory()
    merged.update(maps[:8], masks[:8])
    other.update(maps[8:], masks[8:])
    merged.merge_state(other)  # the same reduction (sum) DDP sync applies
    for m in (split, merged):
        assert m.compute().item() == pytest.approx(big.compute().item(), abs=1e-6)
        assert int(m.total) == int(big.total) == 19 and int(m.skipped) == 1


def test_paired_metrics_accumulate():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(10, 7, 7, generator=g), torch.rand(10, 7, 7, generator=g)
    for factory in (MapSSIM, MapRankCorrelation):
        big, split = factory(), factory()
        big.update(a, b)
        split.update(a[:4], b[:4])
        split.update(a[4:], b[4:])
        assert split.compute().item() == pytest.approx(big.compute().item(), abs=1e-6)


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """mean ± t(0.975, n-1)·sd/√n, written out (the interval every PerSampleMean.estimate() must give)."""
    from scipy.stats import t

    half = t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return values.mean(), values.mean() - half, values.mean() + half


@pytest.mark.parametrize("factory, functional, paired", [
    (lambda: EnergyPointingGame(keep_scores=True), energy_pointing_game, False),
    (lambda: SaliencyIoU(keep_scores=True), saliency_iou, False),
    (lambda: MapSSIM(keep_scores=True), map_ssim, True),
    (lambda: MapRankCorrelation(keep_scores=True), spearman_per_sample, True),
])
def test_estimate_is_the_t_interval_of_the_kept_scores_over_batches_and_processes(factory, functional, paired):
    maps, masks = _random_batch(7, n=20, map_hw=(12, 12))
    masks[3] = False  # a skipped sample: no score, not in the interval
    second = torch.rand(20, 12, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64) if paired \
        else masks
    per_sample = functional(maps, second)
    expected = per_sample[~torch.isnan(per_sample)].numpy()
    split, part = factory(), factory()
    split.update(maps[:9], second[:9])
    part.update(maps[9:], second[9:])
    split.merge_state(part)  # the reduction DDP applies ("cat" for the kept scores)
    est = split.estimate()
    assert (est.value, est.ci_low, est.ci_high) == pytest.approx(_t_interval(expected), abs=1e-9)
    assert est.n == expected.size and est.method == "t"
    assert est.value == pytest.approx(split.compute().item(), abs=1e-6)  # the same mean as without intervals
    with pytest.raises(RuntimeError, match="keep_scores=True"):
        EnergyPointingGame().estimate()


def test_pointing_game_and_deletion_insertion_estimates():
    maps, masks = _random_batch(9, n=30)
    pg = PointingGame(tolerance=2)
    pg.update(maps, masks)
    hits = pointing_game(maps, masks, tolerance=2)
    est = pg.estimate()  # a proportion: Wilson, no kept scores needed
    assert (est.ci_low, est.ci_high) == pytest.approx(wilson_interval(int(hits.nansum()), 30))
    assert est.method == "wilson" and est.value == pytest.approx(hits.nanmean().item())
    g = torch.Generator().manual_seed(1)
    images, small = torch.rand(6, 3, 16, 16, generator=g), torch.rand(6, 4, 4, generator=g)
    targets = torch.tensor([0, 1, 0, 1, 1, 0])
    net = _small_net().eval()
    di = DeletionInsertion(net, steps=4, keep_scores=True)
    di.update(images[:2], small[:2], targets[:2])
    di.update(images[2:], small[2:], targets[2:])
    per_sample = deletion_insertion(net, images, small, targets, steps=4)
    for key, est in di.estimates().items():
        assert (est.value, est.ci_low, est.ci_high) == pytest.approx(_t_interval(per_sample[key].double().numpy()),
                                                                     abs=1e-6)


# ------------------------------------------------------------------------------------------------------
# classification with intervals


def _predictions(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (n,), generator=gen)  # classes 6..9 never occur
    preds = torch.where(torch.rand(n, generator=gen) < 0.6, labels, torch.randint(0, 8, (n,), generator=gen))
    return preds, labels


def test_macro_precision_recall_follow_torchmetrics() -> None:
    from torchmetrics.classification import MulticlassPrecision, MulticlassRecall

    preds, labels = _predictions()
    confusion = np.bincount((labels * 10 + preds).numpy(), minlength=100).reshape(10, 10)
    precision, recall = macro_precision_recall(confusion)
    assert precision == pytest.approx(MulticlassPrecision(10, average="macro")(preds, labels).item(), abs=1e-6)
    assert recall == pytest.approx(MulticlassRecall(10, average="macro")(preds, labels).item(), abs=1e-6)


def test_classification_intervals_are_the_percentile_bootstrap_of_the_images() -> None:
    """scipy's bootstrap resamples the images with the generator the seed makes: the same intervals as drawing
    the resamples here and taking the 2.5 / 97.5 percentiles of their macro precision and recall."""
    preds, labels = _predictions()
    est = classification_estimates(preds.numpy(), labels.numpy(), 10, bootstrap=300, seed=4)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 300, size=(300, 300))
    scores = np.array([macro_precision_recall(np.bincount((labels[i] * 10 + preds[i]).numpy(), minlength=100)
                                              .reshape(10, 10)) for i in idx])  # (resamples, 2)
    for j, key in enumerate(("precision", "recall")):
        low, high = np.percentile(scores[:, j], [2.5, 97.5])
        assert (est[key].ci_low, est[key].ci_high) == pytest.approx((low, high), abs=1e-12)
        assert est[key].method == "bootstrap(300)" and est[key].ci_low < est[key].value < est[key].ci_high
    correct = int((preds == labels).sum())
    assert (est["accuracy"].value, est["accuracy"].ci_low, est["accuracy"].ci_high) == \
        pytest.approx((correct / 300, *wilson_interval(correct, 300)))
    metric = ClassificationEstimates(10, bootstrap=300, seed=4)
    metric.update(preds[:100], labels[:100])
    metric.update(torch.nn.functional.one_hot(preds[100:], 10).float(), labels[100:])  # logits are arg-maxed
    assert metric.estimates() == est
    assert metric.compute()["precision_ci_high"].item() == pytest.approx(est["precision"].ci_high)
    one = classification_estimates(np.array([1]), np.array([1]), 10)
    assert one["precision"].value == 1.0 and math.isnan(one["precision"].ci_low)  # no bootstrap of one image


# ------------------------------------------------------------------------------------------------------
# case table + Wilson


def test_wilson_interval_hand_value_and_defining_equation():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.49016, 0.94331), abs=1e-5)  # 8/10, z = 1.96 (textbook value)
    # Wilson bounds are the p solving |k/n - p| = z * sqrt(p (1 - p) / n)
    for k, n in [(8, 10), (3, 50), (120, 130)]:
        for p in wilson_interval(k, n):
            assert abs(k / n - p) == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=1e-9)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    tl, th = wilson_interval(torch.tensor([8, 3, 0]), torch.tensor([10, 50, 0]))
    assert tl[:2].tolist() == pytest.approx([wilson_interval(8, 10)[0], wilson_interval(3, 50)[0]])
    assert th[1].item() == pytest.approx(wilson_interval(3, 50)[1]) and torch.isnan(tl[2])


def test_case_table_counts_from_constructed_batch():
    h = w = 8
    mask = torch.zeros(h, w)
    mask[:4] = 1
    on = mask.clone()  # all mass on the object: EPG 1
    off = 1 - mask  # all mass off: EPG 0
    # (pred, label, map): 3 x case 1, 2 x case 2, 1 x case 3, 4 x case 4, 1 empty mask
    rows = [(1, 1, on)] * 3 + [(0, 1, on)] * 2 + [(2, 2, off)] + [(1, 0, off)] * 4 + [(1, 1, on)]
    preds = torch.tensor([r[0] for r in rows])
    labels = torch.tensor([r[1] for r in rows])
    maps = torch.stack([r[2] for r in rows])
    masks = mask.expand(len(rows), h, w).clone()
    masks[-1] = 0
    ct = CaseTable(accurate_threshold=0.5)
    ct.update(preds[:6], labels[:6], maps[:6], masks[:6])
    ct.update(preds[6:], labels[6:], maps[6:], masks[6:])
    r = ct.compute()
    assert [int(r[f"case{c}_count"]) for c in range(1, 5)] == [3, 2, 1, 4]
    assert int(r["total"]) == 10 and int(r["skipped"]) == 1
    assert r["case4_fraction"].item() == pytest.approx(0.4)
    assert (r["case1_ci_low"].item(), r["case1_ci_high"].item()) == pytest.approx(wilson_interval(3, 10), abs=1e-6)
    assert "wrong prediction, inaccurate map" in format_case_table(r)
    # logits are arg-maxed; a pluggable score (pointing game) gives the same split here
    logits = torch.nn.functional.one_hot(preds, 3).float()
    ct2 = CaseTable(score_fn=lambda m, k: pointing_game(m + 1e-3 * torch.rand_like(m), k, tolerance=0))
    ct2.update(logits, labels, maps, masks)
    assert [int(ct2.compute()[f"case{c}_count"]) for c in range(1, 5)] == [3, 2, 1, 4]


# ------------------------------------------------------------------------------------------------------
# SSIM


def test_map_ssim_identical_is_one_and_matches_skimage():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 40, 36, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(4, 40, 36, generator=g, dtype=torch.float64)) * 5  # scale is normalized away
    assert map_ssim(a, a, min_size=0).tolist() == pytest.approx([1.0] * 4)
    ours = map_ssim(a, b, min_size=0)
    for i in range(4):
        an = ((a[i] - a[i].min()) / (a[i].max() - a[i].min())).numpy()
        bn = ((b[i] - b[i].min()) / (b[i].max() - b[i].min())).numpy()
        ref = structural_similarity(
            an, bn, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
    assert 0.2 < ours.mean() < 0.99


def test_map_ssim_small_maps_are_upsampled_to_common_size():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 7, 7, generator=g), torch.rand(3, 14, 14, generator=g)
    up = lambda m: torch.nn.functional.interpolate(m[:, None], size=(64, 64), mode="bilinear")[:, 0]  # noqa: E731
    assert torch.allclose(map_ssim(a, b), map_ssim(up(a), up(b), min_size=0), atol=1e-6)
    assert torch.allclose(map_ssim(a, b, size=32), map_ssim(a, b, size=(32, 32)))
    with pytest.raises(ValueError, match="at least 11"):
        map_ssim(a, a, min_size=0)
    m = MapSSIM(size=224)
    m.update(a, a)
    assert m.compute().item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------
# rank correlation + randomization check


def test_spearman_matches_scipy_with_ties_and_flags_constant_maps():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 9, 9), generator=g).double()  # heavy ties
    b = torch.relu(a + torch.randn(6, 9, 9, generator=g, dtype=torch.float64) * 2 - 1)
    ours = spearman_per_sample(a, b)
    for i in range(6):
        assert ours[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-10)
    const = torch.zeros(2, 9, 9)
    assert torch.isnan(spearman_per_sample(a[:2], const)).all()
    m = MapRankCorrelation()
    m.update(torch.cat([a[:3], a[:2]]), torch.cat([b[:3], const]))
    assert int(m.total) == 3 and int(m.undefined) == 2
    assert m.compute().item() == pytest.approx(ours[:3].mean().item(), abs=1e-6)
    r = randomization_similarity(a, a)
    assert r["spearman"] == pytest.approx(1.0) and r["ssim"] == pytest.approx(1.0) and r["n"] == 6


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def test_randomize_layer_changes_only_named_layer_and_leaves_original():
    net = _small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    rnd = randomize_layer(net, "3.0", seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"original changed at {k}"
    after = rnd.state_dict()
    for k in before:
        if k.startswith("3.0."):
            assert not torch.equal(after[k], before[k]), k
        else:
            assert torch.equal(after[k], before[k]), k
    again = randomize_layer(net, "3.0", seed=7)
    assert all(torch.equal(again.state_dict()[k], after[k]) for k in after)  # reproducible
    two = randomize_layer(net, ["6", "3"], seed=0)  # cascading, nested module
    changed = {k for k in before if not torch.equal(two.state_dict()[k], before[k])}
    assert changed == {"6.weight", "6.bias", "3.0.weight", "3.0.bias"}
    with pytest.raises(LayerNotFoundError):
        randomize_layer(net, "3.9", seed=0)
    with pytest.raises(ValueError, match="nothing to randomize"):
        randomize_layer(net, "2", seed=0)  # ReLU


# ------------------------------------------------------------------------------------------------------
# deletion / insertion


class _RegionModel(nn.Module):
    """2-class model whose evidence is the mean |x| of channel 0 inside rows/cols [r0, r1)."""

    def __init__(self, r0: int, r1: int, scale: float = 20.0, offset: float = 0.25) -> None:
        super().__init__()
        self.r0, self.r1, self.scale, self.offset = r0, r1, scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = x[:, 0, self.r0 : self.r1, self.r0 : self.r1].abs().mean(dim=(1, 2))
        z = self.scale * (e - self.offset)
        return torch.stack([z, -z], dim=1)


def test_deletion_insertion_hand_computed_auc():
    class Probs(nn.Module):  # returns probabilities directly: p(class 0) = mean of the 2x2 top-left block
        def forward(self, x):
            p = x[:, 0, :2, :2].mean(dim=(1, 2))
            return torch.stack([p, 1 - p], dim=1)

    img = torch.ones(1, 3, 4, 4)
    good = torch.zeros(1, 4, 4)
    good[0, :2, :2] = 1
    r = deletion_insertion(Probs(), img, good, torch.tensor([0]), steps=4, baseline="zeros", apply_softmax=False)
    # 4 pixels per step; deletion curve 1,0,0,0,0 -> 0.125; insertion 0,1,1,1,1 -> 0.875
    assert r["deletion_curve"][0].tolist() == pytest.approx([1, 0, 0, 0, 0])
    assert r["deletion_auc"].item() == pytest.approx(0.125)
    assert r["insertion_auc"].item() == pytest.approx(0.875)


@pytest.mark.parametrize("baseline", ["blur", "zeros", "mean"])
def test_deletion_insertion_prefers_the_map_on_the_evidence(baseline):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1  # noise: mean |x| = 0.5, ~0 after blur / mean
    model = _RegionModel(4, 12).eval()
    good = torch.zeros(3, 8, 8)
    good[:, 1:3, 1:3] = 1  # a low-res map on the evidence region (rows 4..12 at 32 px)
    good += 0.01 * torch.rand(3, 8, 8, generator=g)
    bad = torch.flip(good, dims=(1, 2))
    targets = torch.zeros(3, dtype=torch.long)
    metric_good = DeletionInsertion(model, steps=10, baseline=baseline, batch_size=16)
    metric_bad = DeletionInsertion(model, steps=10, baseline=baseline, batch_size=1000)
    metric_good.update(images, good, targets)
    metric_bad.update(images, bad, targets)
    rg, rb = metric_good.compute(), metric_bad.compute()
    assert rg["deletion_auc"] < rb["deletion_auc"] - 0.3
    assert rg["insertion_auc"] > rb["insertion_auc"] + 0.3
    assert rg["deletion_curve"].shape == (11,)
    assert rg["deletion_curve"][0].item() == pytest.approx(rb["deletion_curve"][0].item())  # k=0: original image
    # chunking does not change results; the model is not a registered sub-module
    full = deletion_insertion(model, images, good, targets, steps=10, baseline=baseline, batch_size=7)
    assert full["deletion_auc"].mean().item() == pytest.approx(rg["deletion_auc"].item(), abs=1e-6)
    assert list(metric_good.children()) == [] and not any("weight" in k for k in metric_good.state_dict())


def test_deletion_insertion_accumulates_and_blur_baseline():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 16, 16, generator=g)
    maps = torch.rand(5, 4, 4, generator=g)
    targets = torch.tensor([0, 1, 0, 1, 1])
    net = _small_net().eval()
    big, split = DeletionInsertion(net, steps=5), DeletionInsertion(net, steps=5)
    big.update(images, maps, targets)
    split.update(images[:2], maps[:2], targets[:2])
    split.update(images[2:], maps[2:], targets[2:])
    for k, v in big.compute().items():
        assert torch.allclose(split.compute()[k], v, atol=1e-6), k
    from torchvision.transforms.functional import gaussian_blur

    assert torch.allclose(make_baseline(images, "blur"), gaussian_blur(images, [11, 11], [5.0, 5.0]))
    with pytest.raises(ValueError, match="baseline"):
        DeletionInsertion(net, baseline="noise")
    net.train()
    with pytest.warns(UserWarning, match="training mode"):
        DeletionInsertion(net, steps=2).update(images[:1], maps[:1], targets[:1])


# ------------------------------------------------------------------------------------------------------
# real two-process sync (gloo)


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        maps, masks = _random_batch(11, n=10, map_hw=(7, 7))
        preds = torch.arange(10) % 3
        labels = torch.arange(10) % 2
        part = slice(0, 6) if rank == 0 else slice(6, 10)  # unequal shards
        pg, ct = PointingGame(tolerance=3), CaseTable()
        pg.update(maps[part], masks[part])
        ct.update(preds[part], labels[part], maps[part], masks[part])
        res = (pg.compute().item(), [int(ct.compute()[f"case{c}_count"]) for c in range(1, 5)])
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~17 s of process start-up on 2 cores; merge_state above covers the same reductions fast
def test_states_sync_across_two_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    pg_val, counts = queue.get(timeout=30)
    maps, masks = _random_batch(11, n=10, map_hw=(7, 7))
    ref_pg, ref_ct = PointingGame(tolerance=3), CaseTable()
    ref_pg.update(maps, masks)
    ref_ct.update(torch.arange(10) % 3, torch.arange(10) % 2, maps, masks)
    assert pg_val == pytest.approx(ref_pg.compute().item())
    assert counts == [int(ref_ct.compute()[f"case{c}_count"]) for c in range(1, 5)]
