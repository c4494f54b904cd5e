"""Map-to-map similarity: SSIM (paper eq. 11), Spearman rank correlation, and the model-randomization check.

SSIM compares two models' maps of the same images (the paper reports SSIM between the baseline's and the
gradient-penalized model's Grad-CAM / Guided Grad-CAM maps). Spearman + SSIM between the maps of a trained
model and of a copy whose target layer was re-initialized (:func:`randomize_layer`) is the
model-randomization sanity check of Adebayo et al. (2018): a faithful explanation method should produce
*dissimilar* maps (low similarity) once the weights it explains are destroyed.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from trustcnn.metrics._utils import PerSampleMean, as_maps, minmax_normalize, resize_maps
from trustcnn.layers import get_module

__all__ = [
    "map_ssim",
    "spearman_per_sample",
    "MapSSIM",
    "MapRankCorrelation",
    "randomization_similarity",
    "randomize_layer",
]


def _common_size(a: Tensor, b: Tensor, size: int | tuple[int, int] | None, min_size: int) -> tuple[int, int]:
    if size is not None:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h = max(a.shape[-2], b.shape[-2])
    w = max(a.shape[-1], b.shape[-1])
    short = min(h, w)
    if short < min_size:
        scale = min_size / short
        h, w = math.ceil(h * scale - 1e-9), math.ceil(w * scale - 1e-9)
    return h, w


def _gaussian_window(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = int(3.5 * sigma + 0.5)  # skimage's truncate=3.5: 11 taps for sigma 1.5
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _valid_filter_matrix(n: int, g: Tensor) -> Tensor:
    """``(n, n - k + 1)`` banded matrix ``M`` with ``(x @ M)[j] = sum_t g[t] x[j + t]`` (valid 1-D filtering)."""
    k = g.numel()
    m = torch.zeros(n, n - k + 1, dtype=g.dtype, device=g.device)
    cols = torch.arange(n - k + 1, device=g.device)
    m[cols[:, None] + torch.arange(k, device=g.device)[None, :], cols[:, None]] = g
    return m


def _ssim_valid(a: Tensor, b: Tensor, sigma: float, k1: float, k2: float, data_range: float = 1.0) -> Tensor:
    """Wang et al. SSIM of ``(N, H, W)`` pairs, averaged over the window positions that fit inside the map.

    The separable Gaussian filter is applied as two banded matrix products (``Mh^T X Mw``): exact, and on
    CPU in float64 ~50x faster than ``conv2d`` (which has no fast float64 path).
    """
    n, h, w = a.shape
    g = _gaussian_window(sigma, a.dtype, a.device)
    mh, mw = _valid_filter_matrix(h, g), _valid_filter_matrix(w, g)
    x = torch.cat([a, b, a * a, b * b, a * b])  # (5N, H, W)
    x = mh.T @ (x @ mw)  # (5N, H - 2r, W - 2r)
    mu_a, mu_b, e_aa, e_bb, e_ab = x.split(n)
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


def map_ssim(
    maps_a: Tensor,
    maps_b: Tensor,
    size: int | tuple[int, int] | None = None,
    min_size: int = 64,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Per-sample SSIM between two sets of maps of the same images (paper eq. 11).

    Standard Wang et al. (2004) SSIM: Gaussian window (σ = ``sigma``, radius ``int(3.5σ + 0.5)``, i.e.
    11×11 for σ = 1.5), ``C1 = (k1·L)²``, ``C2 = (k2·L)²`` with data range ``L = 1``, population (not
    sample) covariances, averaged over the window positions that fit entirely inside the map (a
    5-pixel border is excluded) — the definition of ``skimage.metrics.structural_similarity(
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``. Computed in float64
    (identical maps give exactly 1).
    (torchmetrics 1.9's functional SSIM is not used: it averages over the full reflect-padded image,
    which differs from this definition by ~1e-3–1e-2.)

    Resolution: both maps are first bilinearly resized (``align_corners=False``) to a common size —
    ``size`` if given, else the larger of the two resolutions, scaled up (aspect kept) so that the short
    side is at least ``min_size`` (a 7×7 Grad-CAM map is smaller than the 11×11 window, and SSIM of
    tiny maps would be dominated by the border crop). SSIM depends on this choice; to compare with the
    paper (which shows maps at image resolution) pass ``size`` = the input image size.
    Each map is then min-max normalized per sample to ``[0, 1]`` (a flat map becomes all zeros).

    Args:
        maps_a, maps_b: ``(N, h, w)`` or ``(N, 1, h, w)``; resolutions may differ.

    Returns:
        ``(N,)`` SSIM values in ``[-1, 1]`` (exactly 1 for identical maps), dtype of ``maps_a``.
    """
    a, b = as_maps(maps_a, "maps_a"), as_maps(maps_b, "maps_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"maps_a and maps_b disagree on N: {a.shape[0]} vs {b.shape[0]}")
    hw = _common_size(a, b, size, min_size)
    radius = int(3.5 * sigma + 0.5)
    if min(hw) < 2 * radius + 1:
        raise ValueError(f"SSIM needs maps of at least {2 * radius + 1} pixels per side, got {hw}")
    out_dtype = a.dtype
    a = minmax_normalize(resize_maps(a.double(), hw))
    b = minmax_normalize(resize_maps(b.to(a.device, torch.float64), hw))
    if a.shape[0] == 0:
        return a.new_zeros(0, dtype=out_dtype)
    return _ssim_valid(a, b, sigma, k1, k2).to(out_dtype)


def _average_ranks(x: Tensor) -> Tensor:
    """Row-wise ranks of ``(N, P)`` with ties given their average rank (as scipy's ``rankdata``)."""
    n, p = x.shape
    srt, order = x.sort(dim=1, stable=True)
    new_group = torch.ones_like(srt, dtype=torch.bool)
    new_group[:, 1:] = srt[:, 1:] != srt[:, :-1]
    gid = new_group.long().cumsum(dim=1) - 1 + torch.arange(n, device=x.device)[:, None] * p
    pos = torch.arange(p, device=x.device, dtype=torch.float64).expand(n, p).reshape(-1)
    sums = torch.zeros(n * p, dtype=torch.float64, device=x.device).scatter_add_(0, gid.reshape(-1), pos)
    cnts = torch.zeros(n * p, dtype=torch.float64, device=x.device).scatter_add_(
        0, gid.reshape(-1), torch.ones_like(pos)
    )
    avg = (sums / cnts.clamp_min(1))[gid]  # (N, P) average 0-based rank in sorted order
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman_per_sample(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Per-sample Spearman rank correlation between two sets of maps (ties get average ranks).

    If resolutions differ, the lower-resolution maps are bilinearly upsampled to the higher one.

    Args:
        maps_a, maps_b: ``(N, h, w)`` or ``(N, 1, h, w)``.

    Returns:
        ``(N,)`` in ``[-1, 1]``; ``NaN`` where either map is constant (rank correlation undefined).
    """
    a, b = as_maps(maps_a, "maps_a"), as_maps(maps_b, "maps_b").to(maps_a.device)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"maps_a and maps_b disagree on N: {a.shape[0]} vs {b.shape[0]}")
    hw = _common_size(a, b, None, 0)
    ra = _average_ranks(resize_maps(a, hw).flatten(1))
    rb = _average_ranks(resize_maps(b, hw).flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    num = (ra * rb).sum(dim=1)
    den = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    rho = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
    return rho.clamp(-1, 1).to(a.dtype)


class _PairedMean(PerSampleMean):
    """Mean of a per-sample score of two sets of maps; samples without one counted in ``undefined``."""

    missing = "undefined"

    undefined: Tensor


class MapSSIM(_PairedMean):
    """Mean SSIM between two models' maps of the same images (paper eq. 11); see :func:`map_ssim`.

    Args:
        size: common resolution both maps are resized to; ``None`` = the larger of the two, with the
            short side at least ``min_size``. Pass the image size to reproduce the paper's setting.
        min_size: smallest short side when ``size`` is ``None`` (default 64: a 7×7 Grad-CAM map is
            compared at 64×64).
        sigma, k1, k2: SSIM constants (defaults: Wang et al.).

    ``update(maps_a, maps_b)``: both ``(N, h, w)``/``(N, 1, h, w)``.
    ``compute() -> Tensor`` scalar mean SSIM.
    """

    higher_is_better = True

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        min_size: int = 64,
        sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.size, self.min_size, self.sigma, self.k1, self.k2 = size, int(min_size), sigma, k1, k2

    def update(self, maps_a: Tensor, maps_b: Tensor) -> None:
        self._accumulate(map_ssim(maps_a, maps_b, self.size, self.min_size, self.sigma, self.k1, self.k2))


class MapRankCorrelation(_PairedMean):
    """Mean per-sample Spearman rank correlation between two sets of maps (see :func:`spearman_per_sample`).

    Used for the model-randomization sanity check: maps of the trained model vs maps of the model with
    the target layer re-initialized (:func:`randomize_layer`); high correlation = the method is
    insensitive to the weights it claims to explain. Samples where either map is constant (e.g. a
    randomized Grad-CAM that is all zeros after the ReLU) have no rank correlation: they are skipped and
    counted in the ``undefined`` state.

    ``update(maps_a, maps_b)``: both ``(N, h, w)``/``(N, 1, h, w)``.
    ``compute() -> Tensor`` scalar mean Spearman ρ over defined samples.
    """

    higher_is_better = None

    def update(self, maps_a: Tensor, maps_b: Tensor) -> None:
        self._accumulate(spearman_per_sample(maps_a, maps_b))


def randomization_similarity(
    maps_original: Tensor,
    maps_randomized: Tensor,
    ssim_size: int | tuple[int, int] | None = None,
    ssim_min_size: int = 64,
) -> dict[str, float]:
    """Similarity between maps of a trained model and of its layer-randomized copy (Adebayo et al. 2018).

    Args:
        maps_original: ``(N, h, w)``/``(N, 1, h, w)`` maps of the trained model.
        maps_randomized: maps of the same images from ``randomize_layer(model, layer, seed)``.
        ssim_size, ssim_min_size: resolution policy of :func:`map_ssim`.

    Returns:
        ``{"spearman": mean ρ over defined samples, "ssim": mean SSIM, "n": N,
        "spearman_undefined": samples with a constant map}``. Lower = the explanation depends more on
        the randomized weights (what a faithful method should show).
    """
    rho = spearman_per_sample(maps_original, maps_randomized)
    ssim = map_ssim(maps_original, maps_randomized, size=ssim_size, min_size=ssim_min_size)
    defined = ~torch.isnan(rho)
    return {
        "spearman": float(rho[defined].mean()) if defined.any() else float("nan"),
        "ssim": float(ssim.mean()) if ssim.numel() else float("nan"),
        "n": int(rho.numel()),
        "spearman_undefined": int((~defined).sum()),
    }


def randomize_layer(net: nn.Module, layer_name: str | Sequence[str], seed: int = 0) -> nn.Module:
    """Deep copy of ``net`` with the named layer(s)' parameters re-initialized.

    Every sub-module of the named module(s) that defines ``reset_parameters()`` (Conv, Linear,
    BatchNorm — whose running statistics are reset too —, …) is reset under ``torch.manual_seed(seed)``
    inside a forked RNG, so the result is reproducible and the caller's global RNG state is untouched.
    Several names (a sequence, e.g. top-down for Adebayo's cascading randomization) are reset in the
    given order. ``net`` itself is not modified; the copy keeps ``net``'s train/eval mode and device.

    Args:
        net: the trained model.
        layer_name: dotted module name(s) as in ``net.named_modules()`` (looked up with
            :func:`trustcnn.layers.get_module`, which suggests close matches on a typo).
        seed: seed of the re-initialization.

    Raises:
        LayerNotFoundError: a name is not a module of ``net``.
        ValueError: the named module has nothing with ``reset_parameters()`` to re-initialize.
    """
    names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
    for name in names:  # fail before the (possibly large) deep copy
        get_module(net, name)
    clone = copy.deepcopy(net)
    cuda_devices = sorted({p.device.index or 0 for p in clone.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for name in names:
            module = get_module(clone, name)
            resettable = [m for m in module.modules() if callable(getattr(m, "reset_parameters", None))]
            if not resettable:
                raise ValueError(
                    f"Layer {name!r} ({type(module).__name__}) has no sub-module with reset_parameters(); "
                    "nothing to randomize."
                )
            with torch.no_grad():
                for m in resettable:
                    m.reset_parameters()
    return clone
