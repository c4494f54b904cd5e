"""Saliency methods that run the model and return logits and maps from the same forward pass.

The extension point follows pytorch-grad-cam: a method subclasses :class:`SaliencyMethod` and
overrides :meth:`SaliencyMethod.compute_map`; everything else (hooks, target class, normalization)
is shared.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from trustcnn.saliency.capture import BatchCoupling, BatchStatisticsProbe, LayerCapture
from trustcnn.saliency.gradcam import gradcam
from trustcnn.saliency.guided import ChannelReduce, GuidedBackprop, guided_gradcam
from trustcnn.saliency.normalize import Normalization, normalize_maps
from trustcnn.saliency.stem import FrozenStem, StemInexactError, StemPass, stem_guided

TargetClass = Literal["predicted", "label"]


@dataclass
class SaliencyOutput:
    """One forward pass with its saliency maps.

    Attributes:
        logits: ``(N, C)``.
        targets: ``(N,)`` the class each map explains.
        raw: ``(N, h, w)`` unnormalized maps (Grad-CAM at the layer's resolution, Guided Grad-CAM at
            the input's).
        maps: ``raw`` normalized per sample (see :func:`normalize_maps`), differentiable.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    raw: torch.Tensor
    maps: torch.Tensor


def select_targets(logits: torch.Tensor, labels: torch.Tensor | None, target: TargetClass) -> torch.Tensor:
    """The class to explain per sample: the prediction (default, the map a user sees post hoc) or the label."""
    if target == "predicted":
        return logits.detach().argmax(dim=1)
    if target == "label":
        if labels is None:
            raise ValueError("saliency.target=label needs labels; pass them, or use saliency.target=predicted.")
        return labels
    raise ValueError(f"Unknown saliency target {target!r}; use predicted or label.")


class SaliencyMethod:
    """Base class: hooks ``target_layer`` of ``model`` and computes differentiable maps in one forward.

    Args:
        model: any classifier ``x (N, 3, H, W) -> logits (N, C)``.
        target_layer: dotted module name of the layer to explain (``model.named_modules()``).
        second_order: keep the saliency gradient's graph (``create_graph=True``), so a loss on the map
            gets exact gradients; ``False`` is a cheaper first-order approximation.
        normalize: per-sample normalization of the returned ``maps``.
        target: explain the predicted class or the label.
        per_sample: how each sample's gradient is separated from the batch's. The gradients are
            taken in the same batched forward that gives the logits, and one backward of the summed
            target scores gives every sample's own gradient only while samples do not interact in
            that forward. A normalization layer that uses the batch's statistics (BatchNorm in train
            mode, e.g. a trainable ResNet block, or without running statistics) makes each score
            depend on every sample, and the summed backward would then mix the other samples'
            gradients into each map. ``None`` (default) detects this per forward: each gradient is
            taken per sample only when the batch has more than one sample and such a layer ran
            between the gradient's variable and the logits (after the target layer, for Grad-CAM;
            anywhere, for the guided input gradient), so frozen, eval-mode BatchNorms keep the
            single summed backward. The per-sample backward costs about ``N`` times the summed one
            over the part of the network it spans: from the logits down to the target layer's
            input when all such layers ran inside the target layer (a trainable block in train
            mode), else down to the gradient's variable. ``True`` / ``False`` force the per-sample
            (over the whole span, trusting no detection) / summed backward (``False``: the cheaper
            approximation).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str,
        second_order: bool = True,
        normalize: Normalization = "max",
        target: TargetClass = "predicted",
        per_sample: bool | None = None,
    ) -> None:
        if target not in ("predicted", "label"):
            raise ValueError(f"Unknown saliency target {target!r}; use predicted or label.")
        normalize_maps(torch.zeros(1, 1), normalize)  # validates the name before any training starts
        self.model = model
        self.target_layer = target_layer
        self.second_order = second_order
        self.normalize = normalize
        self.target = target
        self.per_sample = per_sample
        # Passive outside __call__: plain forwards of the model cost nothing extra and keep nothing.
        self._capture = LayerCapture(model, target_layer, armed=False)
        self._probe = BatchStatisticsProbe(model, target_layer, armed=False)

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, create_graph: bool | None = None
    ) -> SaliencyOutput:
        """Run ``model(x)`` and explain it. Needs grad mode (wrap val/test in ``torch.enable_grad()``).

        ``create_graph`` overrides ``second_order`` for this call (``False`` at evaluation time, where
        no loss is differentiated through the map).
        """
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "Saliency maps need autograd, but grad mode is off (torch.no_grad or inference_mode). "
                "Wrap the call in `torch.inference_mode(False), torch.enable_grad()`."
            )
        x = self.prepare_input(x)
        with self.recording(x):
            logits = self.model(x)
        activations, self._capture.activations = self._capture.activations, None
        coupling = self._probe.coupling(logits.shape[0])
        if self.per_sample is not None:
            coupling = BatchCoupling(layer=self.per_sample, input=self.per_sample)
        targets = select_targets(logits, labels, self.target)
        scores = logits.gather(1, targets[:, None]).squeeze(1)
        create_graph = self.second_order if create_graph is None else create_graph
        raw = self.compute_map(x, activations, scores, create_graph, coupling)
        return SaliencyOutput(logits, targets, raw, normalize_maps(raw, self.normalize))

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @contextmanager
    def recording(self, x: torch.Tensor | None = None) -> Iterator[None]:
        """Arms the hooks this method needs for the duration of its own forward pass (of ``x``)."""
        self._probe.reset()
        with self._capture.armed_for(), self._probe.armed_for():
            yield

    def compute_map(
        self,
        x: torch.Tensor,
        activations: torch.Tensor,
        scores: torch.Tensor,
        create_graph: bool,
        coupling: BatchCoupling,
    ) -> torch.Tensor:
        """The raw map of each sample, from the input, the layer output and the target scores."""
        raise NotImplementedError

    def remove(self) -> None:
        """Detach every hook from the model."""
        self._capture.remove()
        self._probe.remove()


class GradCAM(SaliencyMethod):
    """Grad-CAM on the target layer; maps ``(N, h, w)`` at the layer's resolution."""

    def compute_map(
        self,
        x: torch.Tensor,
        activations: torch.Tensor,
        scores: torch.Tensor,
        create_graph: bool,
        coupling: BatchCoupling,
    ) -> torch.Tensor:
        return gradcam(activations, scores, create_graph=create_graph, per_sample=coupling.layer)


class GuidedGradCAM(SaliencyMethod):
    """Guided Grad-CAM (DESIGN §2): guided-backprop input gradient times upsampled Grad-CAM, reduced
    over colour channels; maps ``(N, H, W)`` at input resolution.

    The guided rule applies only to the saliency gradient; a loss on the map still back-propagates
    through ordinary ReLU derivatives.

    ``fast_stem`` (default): where the part of the model in front of the first trainable module (or the
    target layer) is frozen, the guided gradient through it is one custom autograd Function whose
    backward is a masked linear forward of that part, instead of a double backward
    (:mod:`trustcnn.saliency.stem`); same maps and parameter gradients. It falls back to the double
    backward, logging why, where it does not apply (a trainable stem, BatchNorm with batch statistics or
    train-mode dropout in the stem, a non-ReLU activation or unknown module in it, mixed precision, a
    skip connection around the cut); ``fast_stem_reason`` holds the last reason.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str,
        second_order: bool = True,
        normalize: Normalization = "max",
        target: TargetClass = "predicted",
        interpolate_mode: str = "bilinear",
        channel_reduce: ChannelReduce = "abs_sum",
        per_sample: bool | None = None,
        fast_stem: bool = True,
    ) -> None:
        super().__init__(model, target_layer, second_order, normalize, target, per_sample)
        self.interpolate_mode = interpolate_mode
        self.channel_reduce = channel_reduce
        if channel_reduce == "sum" and normalize != "minmax":
            raise ValueError(
                "saliency.channel_reduce=sum gives signed maps, which saliency.normalize="
                f"{normalize} does not bring into [0, 1]; use channel_reduce=abs_sum (or abs_max), "
                "or normalize=minmax."
            )
        self._guided = GuidedBackprop(model, armed=False)
        self._stem = FrozenStem(model, target_layer, self._guided._switch) if fast_stem else None
        self._guided.stem_gate = self._stem.gate if self._stem is not None else None
        self._pass: StemPass | None = None

    @property
    def fast_stem_reason(self) -> str | None:
        """Why the last call did not use the fast stem path (``None`` when it did)."""
        if self._stem is None:
            return "fast_stem=False"
        return self._stem.reason

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, create_graph: bool | None = None
    ) -> SaliencyOutput:
        try:
            return super().__call__(x, labels, create_graph)
        except _Bypass as bypass:
            # This forward could not use the fast path after all: off for good, and this call redone.
            self._stem.disable(str(bypass))
            self._stem.plan.reason = self._stem.reason
            return super().__call__(x, labels, create_graph)

    @contextmanager
    def recording(self, x: torch.Tensor | None = None) -> Iterator[None]:
        if self._stem is not None and x is not None and self._stem.plan is None:
            self._stem.plan_forward(x)  # before the capture, probe and gates are armed: they must not see it
        with super().recording(x), self._guided.armed_for():
            if self._stem is None or x is None:
                yield
                return
            with self._stem.recording(x) as stem_pass:
                self._pass = stem_pass
                try:
                    yield
                finally:
                    if stem_pass is not None and stem_pass.problem is not None:
                        self._stem.disable(stem_pass.problem)
                        self._stem.plan.reason = stem_pass.problem

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        # The guided gradient is taken w.r.t. the input, so the input must be a graph leaf.
        return x.detach().requires_grad_(True)

    def compute_map(
        self,
        x: torch.Tensor,
        activations: torch.Tensor,
        scores: torch.Tensor,
        create_graph: bool,
        coupling: BatchCoupling,
    ) -> torch.Tensor:
        stem_pass, self._pass = self._pass, None
        if stem_pass is not None and (stem_pass.problem is not None or stem_pass.z_leaf is None):
            raise _Bypass(stem_pass.problem or f"the forward did not reach the cut module {stem_pass.plan.cut!r}")
        if stem_pass is not None and stem_pass.bypass(scores):
            raise _Bypass(f"a path from the input to the logits bypasses the cut module {stem_pass.plan.cut!r}")
        cam = gradcam(activations, scores, create_graph=create_graph, per_sample=coupling.layer)
        if stem_pass is None:
            guided = self._guided.gradients(
                scores, x, create_graph=create_graph, per_sample=coupling.input, per_sample_from=coupling.input_via
            )
        else:
            # The stem holds no batch statistics (else no fast path), so samples meet only after the cut.
            via = coupling.input_via if coupling.input_via is not stem_pass.z else None
            at_cut = self._guided.gradients(
                scores, stem_pass.z_leaf, create_graph=create_graph, per_sample=coupling.input, per_sample_from=via
            )
            try:
                guided = stem_guided(at_cut, stem_pass, create_graph)
            except StemInexactError as err:
                raise _Bypass(f"the stem's replay is not exact ({err})") from err
        return guided_gradcam(cam, guided, self.interpolate_mode, self.channel_reduce)

    def remove(self) -> None:
        super().remove()
        self._guided.remove()
        if self._stem is not None:
            self._stem.remove()


class _Bypass(Exception):
    """This forward's stem output was not the only way from the input to the logits."""


SALIENCY_METHODS: dict[str, type[SaliencyMethod]] = {"gradcam": GradCAM, "guided_gradcam": GuidedGradCAM}


def build_saliency(method: str, model: nn.Module, target_layer: str, **kwargs: object) -> SaliencyMethod:
    """The saliency method called ``method`` (``gradcam`` | ``guided_gradcam``) on ``model``."""
    if method not in SALIENCY_METHODS:
        raise ValueError(f"Unknown saliency method {method!r}; use one of {', '.join(SALIENCY_METHODS)}.")
    return SALIENCY_METHODS[method](model, target_layer, **kwargs)
