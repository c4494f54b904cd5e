"""Resolve a layer of any ``nn.Module`` by its dotted name, the way configs name layers
(``model.target_layer``, ``model.trainable``): one lookup, one error message for a typo."""

from __future__ import annotations

import difflib

from torch import nn


class LayerNotFoundError(ValueError):
    """A target layer name that is not a module of the model."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s sub-module called ``name`` (dotted, as in ``named_modules()``).

    Raises:
        LayerNotFoundError: naming the bad value, the closest valid names and how to list them all.
    """
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise LayerNotFoundError(
        f"Layer {name!r} is not a module of {type(model).__name__}.{hint} "
        f"Set the target layer to one of the names printed by "
        f"`[n for n, _ in model.named_modules()]` (e.g. `model.target_layer=<name>`)."
    )
