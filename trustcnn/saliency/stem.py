"""The guided gradient through a frozen stem as one custom autograd Function (no double backward).

The part of a model in front of its first trainable module (or the target layer, if that comes
first) is frozen and fixed by the forward pass: its guided backward is a linear map ``B`` of the
gradient ``g`` arriving at the stem's output ``z``, once its masks are fixed (each ReLU's forward
mask, times the sign pattern ``g > 0`` seen at its output in this guided backward). So

* forward  = the guided backward through the stem, ``g_x = B g`` (one first-order backward, which
  also records the masks), and
* backward = ``B^T u``: one forward pass of the stem on ``u`` with biases and BatchNorm shifts
  dropped, each ReLU/ReLU6 replaced by multiplication with its recorded mask and each max-pool by a
  gather at its recorded argmax.

That replaces the double backward through the stem, whose grouped (depthwise) convolutions autograd
runs group by group, by a forward of the same layers; it also frees the stem's graph right after the
guided backward. A convolution whose output only a BatchNorm reads runs, in both directions, as one
convolution with the BatchNorm's scale folded into its weight (:class:`_DataflowProbe`); the recorded
forward itself keeps the modules' own values. The loss gradient never enters the stem: the stem's
output is detached where it enters the first trainable module (nothing in front of it trains).

The replay re-runs the model's own ``forward`` with the stem's leaf modules swapped for their linear
parts and stops where the stem's output enters the cut module, so any Python forward works. Leaf
modules must be of a known kind (:data:`LINEAR_PASS`, :data:`REPLAYED`); every backward also checks
the adjoint identity ``<u, B g> = <B^T u, g>``, which fails for any affine offset or nonlinearity
written as a function call in a ``forward`` (e.g. ``F.relu``, ``x + 1``) that module checks cannot see.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _MaxPoolNd

from trustcnn.saliency.capture import uses_batch_statistics

log = logging.getLogger(__name__)

ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
# Leaf modules whose own forward is already linear without offset: replayed as they are.
LINEAR_PASS: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
# Leaf modules replayed by their linear part (see :meth:`StemPass._linear_forward`).
REPLAYED: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear, _BatchNorm, *ACTIVATIONS, _MaxPoolNd)


class StemInexactError(RuntimeError):
    """The replayed stem is not the transpose of its guided backward (adjoint check failed)."""


class _ReachedCut(Exception):
    """Stops a replay where the stem's output enters the cut module."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


@dataclass
class StemPlan:
    """Where a model's frozen stem ends, found from the call order of one forward.

    Attributes:
        cut: name of the module whose (single tensor) input is the stem's output.
        stem: the leaf modules called before it, in call order (name, module).
        reason: why the fast path does not apply to this model, or ``None``.
        folded: stem convolutions whose output only a BatchNorm reads -> that BatchNorm (see
            :class:`_DataflowProbe`); the guided backward and the replay run each pair as one
            convolution with the BatchNorm's scale folded into its weight.
    """

    cut: str | None
    stem: list[tuple[str, nn.Module]] = field(default_factory=list)
    reason: str | None = None
    folded: dict[nn.Module, nn.Module] = field(default_factory=dict)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def plan_stem(model: nn.Module, calls: list[str], target_layer: str) -> StemPlan:
    """The cut and stem of ``model`` from ``calls`` (module names in the order their forward began).

    The cut is the first module called that holds trainable parameters of its own or is the target
    layer; the stem is every leaf module called before it.
    """
    modules = dict(model.named_modules())
    cut = next((n for n in calls if n == target_layer
                or any(p.requires_grad for p in modules[n].parameters(recurse=False))), None)
    if cut is None:
        return StemPlan(None, reason="no trainable module or target layer was called in the forward")
    if calls.count(cut) > 1:
        return StemPlan(None, reason=f"the cut module {cut!r} is called more than once per forward")
    stem = [(n, modules[n]) for n in calls[: calls.index(cut)] if _is_leaf(modules[n])]
    if not stem:
        return StemPlan(None, reason=f"nothing frozen runs before {cut!r} (the first trainable module or target)")
    for name, m in stem:
        if any(p.requires_grad for p in m.parameters()):
            return StemPlan(None, reason=f"{name!r} in front of {cut!r} has trainable parameters")
        if isinstance(m, _ConvNd) and m.transposed:
            return StemPlan(None, reason=f"{name!r} is a transposed convolution (no linear replay)")
        if isinstance(m, _MaxPoolNd) and m.return_indices:
            return StemPlan(None, reason=f"{name!r} returns indices (no linear replay)")
        if not isinstance(m, LINEAR_PASS + REPLAYED):
            kind = "a non-ReLU activation" if "activation" in type(m).__module__ else "a module"
            return StemPlan(None, reason=f"{name!r} ({type(m).__name__}) in the frozen stem is {kind} without a "
                                         "known linear replay (known: ReLU, ReLU6, conv, linear, BatchNorm, "
                                         "pooling, dropout, identity)")
    return StemPlan(cut, stem)


def stem_state_reason(plan: StemPlan) -> str | None:
    """Why this forward, with the modules' current modes, cannot use the fast path (else ``None``)."""
    for name, m in plan.stem:
        if uses_batch_statistics(m):
            return f"BatchNorm {name!r} in the stem normalizes with batch statistics (train mode)"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return f"dropout {name!r} in the stem is in train mode"
    return None


@dataclass
class _Entry:
    """What the guided backward recorded for one activation or max-pool call of the stem."""

    module: nn.Module
    # activation: the guided gradient it passed, ``g_in >= 0``, positive exactly where the forward mask
    # and ``g > 0`` both hold; max-pool: the argmax indices
    mask: torch.Tensor | None = None


class _GuidedActivation(torch.autograd.Function):
    """A stem ReLU/ReLU6 during the recorded forward: the activation itself (in place where the module
    is), whose backward, while the guided switch is on, is the guided rule ``relu'(x) * clamp(g, min=0)``
    and records where it passed a gradient. Same forward values as the module; two elementwise passes
    in backward plus the mask, instead of a gate's clone, clamp and mask ops beside the activation's own
    backward.

    It records ``g_in`` itself, which is ``>= 0`` and positive exactly where the forward mask and ``g > 0``
    both hold, so the replay applies the mask as ``threshold_backward(u, g_in, 0)``: one fused pass, where a
    bool mask cost a comparison here and a ``where`` there (~10x slower on CPU). Autograd's double backward passes
    ``clamp``'s derivative at ``g == 0`` too; those positions differ only in the transposed gradient
    ``B^T u`` there, which reaches the parameters only through guided gradients that are themselves
    exactly zero there with zero derivative (a gradient killed by a gate or a max-pool), so the
    parameter gradients are the same (the tests compare them with the double backward).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, switch, entry: _Entry, upper: float | None,  # type: ignore[override]
                inplace: bool) -> torch.Tensor:
        ctx.switch, ctx.entry, ctx.upper = switch, entry, upper
        if inplace:
            y = x.relu_() if upper is None else x.clamp_(0.0, upper)
            ctx.mark_dirty(x)
        else:
            y = x.relu() if upper is None else x.clamp(0.0, upper)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        if ctx.upper is None:
            g_in = torch.ops.aten.threshold_backward(grad, y, 0)
        else:
            g_in = torch.ops.aten.hardtanh_backward(grad, y, 0.0, ctx.upper)
        if ctx.switch.on:
            # relu'(x) * clamp(g, min=0), the clamp in place on this Function's own new tensor (``grad``
            # may be shared, e.g. by both branches of a residual sum).
            g_in.clamp_(min=0)
            ctx.entry.mask = g_in
        return g_in, None, None, None, None


class _DataflowProbe:
    """Watches the planning forward: which convolution's output only a BatchNorm reads.

    Conv -> BatchNorm (eval mode: a per-channel affine map) is one linear layer for the guided backward
    and the replay, ``conv(x; W * s)`` with ``s = gamma / sqrt(var + eps)``, which saves an elementwise
    pass over the largest tensors in each direction. Whether the pair may be folded is dataflow, not call
    order: the BatchNorm's input must be the convolution's output node, and nothing else in the graph may
    read that node (counted from the logits), else folding would change what the other reader sees.
    """

    def __init__(self, model: nn.Module) -> None:
        self.conv_outputs: dict[nn.Module, list] = {}
        self.norm_inputs: dict[nn.Module, list] = {}
        self.roots: list = []
        self._handles = [model.register_forward_hook(self._root)]
        for m in model.modules():
            if isinstance(m, _ConvNd):
                self._handles.append(m.register_forward_hook(self._conv))
            elif isinstance(m, _BatchNorm):
                self._handles.append(m.register_forward_hook(self._norm))

    def _conv(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.conv_outputs.setdefault(module, []).append(getattr(output, "grad_fn", None))

    def _norm(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        node = getattr(inputs[0], "grad_fn", None) if inputs else None
        self.norm_inputs.setdefault(module, []).append(node)

    def _root(self, module: nn.Module, inputs: tuple, output: object) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        self.roots = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def foldable(self, plan: StemPlan) -> dict[nn.Module, nn.Module]:
        """The stem's conv -> BatchNorm pairs that may run as one convolution."""
        in_stem = [m for _, m in plan.stem]
        readers: dict = {}
        seen, todo = set(), list(self.roots)
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for child, _ in node.next_functions:
                if child is not None:
                    readers[child] = readers.get(child, 0) + 1
                    todo.append(child)
        by_node = {outs[0]: conv for conv, outs in self.conv_outputs.items()
                   if len(outs) == 1 and outs[0] is not None}
        pairs: dict[nn.Module, nn.Module] = {}
        for norm, inputs in self.norm_inputs.items():
            conv = by_node.get(inputs[0]) if len(inputs) == 1 and inputs[0] is not None else None
            if (conv is None or in_stem.count(conv) != 1 or in_stem.count(norm) != 1
                    or readers.get(inputs[0]) != 1 or conv.transposed or conv.padding_mode != "zeros"
                    or isinstance(conv.padding, str) or norm.running_var is None
                    or norm.num_features != conv.out_channels):
                continue
            pairs[conv] = norm
        return pairs


def _norm_scale(norm: _BatchNorm) -> torch.Tensor:
    """An eval-mode BatchNorm's linear part, per channel: ``gamma / sqrt(var + eps)``."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    return scale if norm.weight is None else scale * norm.weight


def _folded_weight(conv: _ConvNd, norm: _BatchNorm) -> torch.Tensor:
    """The weight of ``norm(conv(.))`` without offsets: ``W * gamma / sqrt(var + eps)`` per output channel."""
    return conv.weight * _norm_scale(norm).view(-1, *[1] * (conv.weight.dim() - 1))


class _FoldedConvBN(torch.autograd.Function):
    """A stem conv -> BatchNorm pair during the recorded forward: the two modules' own forwards (same
    values), one graph node whose backward is the convolution's input gradient with the folded weight
    (no BatchNorm backward pass, no saved BatchNorm input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: _ConvNd, norm: _BatchNorm) -> torch.Tensor:  # type: ignore[override]
        ctx.conv, ctx.norm = conv, norm
        ctx.save_for_backward(x)
        return type(norm).forward(norm, type(conv).forward(conv, x))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        conv = ctx.conv
        weight = _folded_weight(conv, ctx.norm)
        full = [k - 1 - p for k, p in zip(conv.kernel_size, conv.padding)]
        if (conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels and weight.dim() == 4
                and set(conv.stride) == {1} and set(conv.dilation) == {1} and min(full) >= 0):
            # A depthwise stride-1 input gradient is the correlation with the flipped kernel: a forward
            # convolution, ~20% faster than convolution_backward on the CPU (oneDNN).
            return F.conv2d(grad, weight.flip(-1, -2), None, 1, full, 1, conv.groups), None, None
        (gx, _, _) = torch.ops.aten.convolution_backward(
            grad, x, weight, None, conv.stride, conv.padding, conv.dilation, False,
            [0] * len(conv.stride), conv.groups, [True, False, False])
        return gx, None, None


class StemPass:
    """One forward's record of the stem: its input ``x``, output ``z`` (before the detach), the leaf
    ``z_leaf`` the rest of the model saw, and the entries its guided backward fills in."""

    def __init__(self, owner: "FrozenStem", model: nn.Module, plan: StemPlan, switch) -> None:
        self.owner = owner
        self.model = model
        self.plan = plan
        self.switch = switch
        self.entries: list[_Entry] = []
        self.x: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.z_leaf: torch.Tensor | None = None
        self.cut_calls = 0
        self.in_stem = True
        self.problem: str | None = None
        self._gx: torch.Tensor | None = None
        self._folded_out: dict[nn.Module, torch.Tensor] = {}

    # -- recording (hooks call these during the forward) --------------------------------------------
    def activation(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        entry = _Entry(module)
        self.entries.append(entry)
        upper = 6.0 if isinstance(module, nn.ReLU6) else None
        return _GuidedActivation.apply(x, self.switch, entry, upper, module.inplace)

    def max_pool(self, module: _MaxPoolNd, x: torch.Tensor) -> torch.Tensor:
        """The max-pool itself, keeping the argmax indices it computes anyway (no second pooling pass)."""
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.dim() - 2]
        y, idx = pool(x, module.kernel_size, module.stride, module.padding, module.dilation,
                      ceil_mode=module.ceil_mode, return_indices=True)
        self.entries.append(_Entry(module, idx))
        return y

    def folded_conv(self, module: _ConvNd, x: torch.Tensor) -> torch.Tensor:
        """A conv of a folded pair: conv and BatchNorm at once (:class:`_FoldedConvBN`)."""
        norm = self.plan.folded[module]
        y = _FoldedConvBN.apply(x, module, norm)
        self._folded_out[norm] = y
        return y

    def folded_norm(self, module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        """A BatchNorm of a folded pair: its conv applied it already, so it passes its input on."""
        if self._folded_out.pop(module, None) is not x:
            self.problem = f"BatchNorm {module!r} did not read the output of the convolution folded into it"
            return type(module).forward(module, x)
        return x

    def enter_cut(self, inputs: tuple) -> tuple | None:
        self.cut_calls += 1
        if self.cut_calls > 1 or len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            self.problem = f"the cut module {self.plan.cut!r} was not called once with one tensor"
            return None
        self.in_stem = False
        self.z = inputs[0]
        self.z_leaf = inputs[0].detach().requires_grad_(True)
        return (self.z_leaf,)

    def bypass(self, logits: torch.Tensor) -> bool:
        """Whether the logits depend on the input other than through the stem's output (a skip
        connection around the cut): the detached stem would then lose that path."""
        target = torch.autograd.graph.get_gradient_edge(self.x).node
        seen, todo = set(), [logits.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            if node is target:
                return True
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
        return False

    # -- the two directions ----------------------------------------------------------------------
    def guided_backward(self, g: torch.Tensor) -> torch.Tensor:
        """``B g``: the guided backward from the stem's output to its input; frees the stem's graph."""
        if self._gx is not None:
            gx, self._gx = self._gx, None
            return gx
        self.switch.on = True
        try:
            (gx,) = torch.autograd.grad(self.z, self.x, g)
        finally:
            self.switch.on = False
        self.z = None
        return gx

    def verify(self, g: torch.Tensor) -> None:
        """Checks once per model, on a random direction, that the replay is the transpose of the guided
        backward (:func:`_check_adjoint`); keeps ``B g`` for the forward that follows.

        Raises:
            StemInexactError: it is not (then nothing of this pass may be used).
        """
        self.switch.on = True
        try:
            (gx,) = torch.autograd.grad(self.z, self.x, g.detach())
        finally:
            self.switch.on = False
        self.z = None
        generator = torch.Generator(device=gx.device).manual_seed(0)
        u = torch.randn(gx.shape, generator=generator, device=gx.device, dtype=gx.dtype)
        _check_adjoint(u, gx, self.transpose(u.clone()), g.detach())
        self._gx = gx

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        """``B^T u``: the stem's masked linear forward (biases and shifts dropped)."""
        entries = iter(self.entries)
        replaced = list(dict.fromkeys(m for _, m in self.plan.stem if isinstance(m, REPLAYED)))
        folded_norms = set(self.plan.folded.values())
        for m in replaced:
            if m in folded_norms:
                m.forward = _identity
            elif m in self.plan.folded:
                m.forward = self._folded_forward(m, self.plan.folded[m])
            else:
                m.forward = self._linear_forward(m, entries)
        self.owner.replaying = self
        try:
            with torch.no_grad():
                self.model(u)
        except _ReachedCut as reached:
            return reached.value
        finally:
            self.owner.replaying = None
            for m in replaced:
                del m.forward
        raise StemInexactError(f"the replay of the stem never reached the cut module {self.plan.cut!r}")

    @staticmethod
    def _folded_forward(conv: _ConvNd, norm: _BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        weight = _folded_weight(conv, norm)
        return lambda u: conv._conv_forward(u, weight, None)

    @staticmethod
    def _linear_forward(m: nn.Module, entries: Iterator[_Entry]) -> Callable[[torch.Tensor], torch.Tensor]:
        def recorded() -> torch.Tensor:
            entry = next(entries, None)
            if entry is None or entry.module is not m:
                raise StemInexactError("the stem's replay called its modules in another order than its forward")
            return entry.mask

        if isinstance(m, _ConvNd):
            return lambda u: m._conv_forward(u, m.weight, None)
        if isinstance(m, nn.Linear):
            return lambda u: F.linear(u, m.weight)
        if isinstance(m, _BatchNorm):
            def batch_norm(u: torch.Tensor) -> torch.Tensor:
                return u * _norm_scale(m).view(-1, *[1] * (u.dim() - 2))
            return batch_norm
        if isinstance(m, ACTIVATIONS):
            def activation(u: torch.Tensor) -> torch.Tensor:
                passed = recorded()
                if passed is None:  # its output never reached the stem's output
                    return torch.zeros_like(u)
                return torch.ops.aten.threshold_backward(u, passed, 0)  # u where passed > 0, else 0
            return activation

        def max_pool(u: torch.Tensor) -> torch.Tensor:
            idx = recorded()
            return u.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
        return max_pool


def _identity(u: torch.Tensor) -> torch.Tensor:
    return u


class _StemGuided(torch.autograd.Function):
    """``g_x = B g`` forward, ``B^T u`` backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, stem: StemPass) -> torch.Tensor:  # type: ignore[override]
        gx = stem.guided_backward(g)
        ctx.stem = stem
        ctx.save_for_backward(g, gx)
        return gx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u: torch.Tensor):  # type: ignore[override]
        g, gx = ctx.saved_tensors
        v = ctx.stem.transpose(u)
        _check_adjoint(u, gx, v, g)
        return v, None


def _check_adjoint(u: torch.Tensor, gx: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    """``<u, B g> = <B^T u, g>`` to rounding: the replay is the transpose of the guided backward."""
    lhs, rhs = (u * gx).sum(dtype=torch.float64), (v * g).sum(dtype=torch.float64)
    scale = (u * gx).abs().sum(dtype=torch.float64) + (v * g).abs().sum(dtype=torch.float64)
    rtol = 1e-9 if u.dtype == torch.float64 else 1e-3
    if float((lhs - rhs).abs()) > rtol * float(scale) + 1e-30:
        raise StemInexactError(
            f"The fast guided backward through the frozen stem is not exact on this model (adjoint check: "
            f"{float(lhs):.6g} vs {float(rhs):.6g}): its forward holds an operation the replay cannot see "
            "(e.g. a functional F.relu or an added constant). Set saliency.fast_stem=false."
        )


def stem_guided(g: torch.Tensor, stem: StemPass, create_graph: bool) -> torch.Tensor:
    """The guided input gradient from the gradient ``g`` at the stem's output; differentiable w.r.t.
    ``g`` (by the replay) when ``create_graph``.

    Raises:
        StemInexactError: on the first differentiable call for a model whose replay is not exact.
    """
    if create_graph and g.requires_grad:
        if not stem.owner.verified:
            stem.verify(g)
            stem.owner.verified = True
        return _StemGuided.apply(g, stem)
    return stem.guided_backward(g)


class FrozenStem:
    """Finds a model's frozen stem and runs the guided backward through it with :class:`StemPass`.

    Before the first recorded forward, :meth:`plan_forward` runs one forward of its own to find the
    stem (:func:`plan_stem`); every recorded forward, inside :meth:`recording`, detaches the stem's
    output at the cut and runs the stem's activations as :class:`_GuidedActivation`, which records
    their guided masks. ``reason`` says why the fast path is
    off (logged once per reason).
    """

    def __init__(self, model: nn.Module, target_layer: str, switch) -> None:
        self.model = model
        self.target_layer = target_layer
        self.switch = switch
        self.plan: StemPlan | None = None
        self.current: StemPass | None = None
        self.replaying: StemPass | None = None
        self.verified = False
        self.reason: str | None = None
        self._calls: list[str] | None = None
        self._logged: set[str] = set()
        self._order_handles = [m.register_forward_pre_hook(self._make_order_hook(n))
                               for n, m in model.named_modules()]
        self._handles: list = []
        self._activations: set[nn.Module] = set()
        self._pools: set[nn.Module] = set()

    def _make_order_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if self._calls is not None:
                self._calls.append(name)
        return hook

    def _install(self, plan: StemPlan) -> None:
        self._activations = {m for _, m in plan.stem if isinstance(m, ACTIVATIONS)}
        # A pool that returns its own indices is left as it is: the replay then finds no entry for it and
        # refuses the fast path (StemInexactError, then the double backward).
        self._pools = {m for _, m in plan.stem if isinstance(m, _MaxPoolNd) and not m.return_indices}
        modules = dict(self.model.named_modules())
        self._handles.append(modules[plan.cut].register_forward_pre_hook(self._cut_hook, prepend=True))

    def _cut_hook(self, module: nn.Module, inputs: tuple) -> tuple | None:
        if self.replaying is not None:
            raise _ReachedCut(inputs[0])
        return None if self.current is None else self.current.enter_cut(inputs)

    def disable(self, reason: str) -> None:
        self.reason = reason
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("Guided Grad-CAM: fast guided backward through the frozen stem is off: %s; using the "
                        "double backward (slower, same result).", reason)

    def gate(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        """For :class:`GuidedBackprop`'s hook: a stem activation of the forward being recorded is its own
        guided gate already (:class:`_GuidedActivation`), so its output is kept as it is; ``None`` for
        every other activation (which gets the ordinary gate)."""
        current = self.current
        if current is None or not current.in_stem or module not in self._activations:
            return None
        return output

    def _recorded_forward(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``module``'s forward while a pass records: a stem activation or max-pool runs through the
        :class:`StemPass`, which keeps what the replay needs; outside the stem it is the module's own."""
        original = type(module).forward
        if module in self._activations:
            record = StemPass.activation
        elif module in self.plan.folded:
            record = StemPass.folded_conv
        elif isinstance(module, _BatchNorm):
            record = StemPass.folded_norm
        else:
            record = StemPass.max_pool

        def forward(x: torch.Tensor) -> torch.Tensor:
            current = self.current
            if current is None or not current.in_stem or not torch.is_grad_enabled():
                return original(module, x)
            return record(current, module, x)
        return forward

    def plan_forward(self, x: torch.Tensor) -> None:
        """Finds the stem from one forward of ``x`` run for that alone: the order in which its modules
        are called (:func:`plan_stem`) and which conv -> BatchNorm pairs fold (:class:`_DataflowProbe`).

        Its output and graph are dropped, and the model's buffers (BatchNorm statistics) and the random
        generators are restored afterwards, so the forward that follows is the one a run without this
        extra forward would have made. That forward can then already take the fast path: the first step
        no longer runs the double backward, whose memory would otherwise be the run's peak (MobileNetV2
        at batch 32: ~6.5 GiB against ~1.8 GiB for a fast step).
        """
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        self._calls = []
        probe = _DataflowProbe(self.model)
        try:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                self.model(x)
        finally:
            calls, self._calls = self._calls, None
            probe.remove()
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    if name in buffers and not torch.equal(b, buffers[name]):
                        # Through .data, as BatchNorm's own update does: the buffer's version stays, so a graph
                        # of an earlier forward that saved it can still run its backward.
                        b.data.copy_(buffers[name])
            for h in self._order_handles:
                h.remove()
            self._order_handles = []
        if not calls:
            return
        self.plan = plan_stem(self.model, calls, self.target_layer)
        if self.plan.reason is not None:
            self.disable(self.plan.reason)
        else:
            self.plan.folded = probe.foldable(self.plan)
            self._install(self.plan)

    @contextmanager
    def recording(self, x: torch.Tensor) -> Iterator[StemPass | None]:
        """Arms the stem for one forward of ``x``; yields the :class:`StemPass` when the fast path is on.

        Plans the stem first if it has not been (:meth:`plan_forward`; call that before arming other
        hooks of the same model, so they do not see the planning forward)."""
        if self.plan is None:
            self.plan_forward(x)
        if self.plan is None:
            self.disable("the forward called no module")
            yield None
            return
        reason = self.plan.reason or stem_state_reason(self.plan)
        if reason is None and torch.is_autocast_enabled(x.device.type):
            reason = "mixed precision (autocast) is on"
        if reason is None and not x.requires_grad:
            reason = "the input does not require grad"
        if reason is not None:
            self.disable(reason)
            yield None
            return
        self.reason = None
        self.current = StemPass(self, self.model, self.plan, self.switch)
        self.current.x = x
        recorded = self._activations | self._pools | set(self.plan.folded) | set(self.plan.folded.values())
        for m in recorded:
            m.forward = self._recorded_forward(m)
        try:
            yield self.current
        finally:
            self.current = None
            for m in recorded:
                del m.forward

    def remove(self) -> None:
        for h in self._order_handles + self._handles:
            h.remove()
        self._order_handles, self._handles = [], []
