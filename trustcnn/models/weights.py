"""Pretrained-weight resolution shared by every torchvision builder.

Two ways to get weights into a torchvision classifier:

1. **A torchvision weight enum name** (``"IMAGENET1K_V1"``, ``"DEFAULT"``, or the full
   ``"VGG16_Weights.IMAGENET1K_V1"``). The file is looked up *first* in torch's hub cache,
   ``torch.hub.get_dir()/checkpoints/<file name from the enum's url>`` (``$TORCH_HOME/hub/checkpoints``),
   so a machine with the file cached never touches the network. Otherwise it is downloaded there once
   (hash-checked, written atomically by ``torch.hub.download_url_to_file``). With no network the
   download failure becomes a :class:`WeightsUnavailableError` that names the expected cache file and
   both ways to provide it.
2. **A local state-dict file** (``weights_path``), loaded with
   ``torch.load(path, map_location="cpu", weights_only=True)``: either a bare state dict or a dict with a
   ``"state_dict"`` key, for torchvision's *default* architecture of that model
   (``torchvision.models.get_model(arch, weights=None)``), e.g. the very file torchvision downloads.
   Loading is strict: missing / unexpected keys and shape mismatches are listed in the error.

``weights=None`` (``model.weights=null``) and no ``weights_path`` gives torchvision's random init.
"""

from __future__ import annotations

import difflib
import http.client
import logging
import os
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from trustcnn.normalization import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

#: Errors a failed download raises (``URLError`` and socket timeouts are ``OSError``s; a hash
#: mismatch is a ``RuntimeError``).
DOWNLOAD_ERRORS: tuple[type[BaseException], ...] = (
    urllib.error.URLError,
    OSError,
    RuntimeError,
    http.client.HTTPException,
)


class WeightsError(RuntimeError):
    """Weights that cannot be resolved, found or loaded."""


class WeightsUnavailableError(WeightsError):
    """Pretrained weights that are neither cached nor downloadable (e.g. offline)."""


class UnknownArchError(ValueError):
    """A model name that is not a torchvision classification model."""


def classification_models() -> list[str]:
    """Names accepted as ``arch``: ``torchvision.models.list_models(module=torchvision.models)``."""
    return list(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> str:
    """Return ``arch`` if it is a torchvision classification model, else raise with close matches."""
    names = classification_models()
    if arch in names:
        return arch
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise UnknownArchError(
        f"Unknown torchvision classification model {arch!r}.{hint} Valid names are listed by "
        "`torchvision.models.list_models(module=torchvision.models)` (set `model.arch=<name>`)."
    )


def resolve_weights(arch: str, weights: str | WeightsEnum | None) -> WeightsEnum | None:
    """The weight enum of ``arch`` called ``weights`` (``"IMAGENET1K_V1"``, ``"DEFAULT"``,
    ``"VGG16_Weights.IMAGENET1K_V1"`` or an enum member); ``None`` stays ``None`` (random init)."""
    if weights is None:
        return None
    enum_cls = torchvision.models.get_model_weights(arch)
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum_cls):
            raise WeightsError(f"{weights!r} are not weights of {arch!r} (expected {enum_cls.__name__}).")
        return weights
    name = str(weights)
    if name.startswith(enum_cls.__name__ + "."):
        name = name[len(enum_cls.__name__) + 1 :]
    try:
        return enum_cls[name]
    except KeyError:
        valid = [*enum_cls.__members__]
        raise WeightsError(
            f"Unknown weights {weights!r} for {arch!r}. Valid: {', '.join(valid)} "
            f"(members of torchvision's {enum_cls.__name__}), or `model.weights=null` for random init."
        ) from None


def cached_weights_file(weights: WeightsEnum) -> Path:
    """Where torchvision caches ``weights``: ``torch.hub.get_dir()/checkpoints/<url file name>``."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def ensure_weights_cached(weights: WeightsEnum) -> Path:
    """Return the cached file of ``weights``, downloading it first if it is not cached.

    The cache is checked before any network access. The download is hash-checked (the hash prefix in
    torchvision's file names) and atomic.

    Raises:
        WeightsUnavailableError: the file is not cached and cannot be downloaded.
    """
    cached = cached_weights_file(weights)
    if cached.is_file():
        log.info("Using cached weights %r from %s", weights, cached)
        return cached
    match = torch.hub.HASH_REGEX.search(cached.name)
    hash_prefix = match.group(1) if match else None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        log.info("Downloading weights %r from %s to %s", weights, weights.url, cached)
        torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix, progress=True)
    except DOWNLOAD_ERRORS as err:
        raise WeightsUnavailableError(
            f"Could not download the pretrained weights {weights!r} ({type(err).__name__}: {err}).\n"
            f"  Expected cached file: {cached}\n"
            "  Provide them in one of two ways:\n"
            f"    1. put the file there (download {weights.url} on a machine with network access and copy it "
            f"to {cached}; the cache directory is $TORCH_HOME/hub/checkpoints), or\n"
            "    2. point the config at a local state-dict file: `model.weights_path=/path/to/file.pth`.\n"
            "  Or train from random initialization with `model.weights=null`."
        ) from err
    return cached


def load_local_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict saved at ``path`` (bare, or under a ``"state_dict"`` key), on the CPU,
    with ``weights_only=True`` (no arbitrary pickles)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(
            f"weights_path {str(path)!r} does not exist (resolved to {p.resolve()}). Set "
            "`model.weights_path` to an existing state-dict file, or `model.weights_path=null` to use "
            "`model.weights` (torchvision's cache / download)."
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise WeightsError(f"Could not load weights_path {str(p)!r}: {type(err).__name__}: {err}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"weights_path {str(p)!r} holds a {type(obj).__name__}, not a state dict (a mapping of parameter "
            "names to tensors, bare or under a 'state_dict' key)."
        )
    return dict(obj)


def _preview(keys: list[str], n: int = 10) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_strict(net: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``net.load_state_dict(state_dict)`` with an error listing missing / unexpected / mis-shaped keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"The state dict from {source} does not fit {type(net).__name__}."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {_preview(missing)}.")
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {_preview(unexpected)}.")
        if mismatched:
            parts.append(f"Shape mismatches ({len(mismatched)}): {_preview(mismatched, 5)}.")
        parts.append(
            "The file must be a state dict of torchvision's default architecture of this model "
            "(`torchvision.models.get_model(arch, weights=None).state_dict()`)."
        )
        raise WeightsError(" ".join(parts))
    net.load_state_dict(state_dict, strict=True)


@dataclass
class TorchvisionNet:
    """A torchvision classifier with its weights in place, plus what they imply."""

    net: nn.Module
    arch: str
    weights: WeightsEnum | None
    source: str
    input_size: int
    resize_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: list[str] | None

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "weights": None if self.weights is None else repr(self.weights),
            "weights_source": self.source,
            "resize_size": self.resize_size,
        }


def build_torchvision_net(
    arch: str,
    weights: str | WeightsEnum | None,
    weights_path: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> TorchvisionNet:
    """Build torchvision's ``arch`` with weights from (in order): ``weights_path``, the hub cache,
    a download; or random init when both ``weights`` and ``weights_path`` are ``None``.

    With ``weights_path`` the model is built with ``weights=None`` and the file loaded strictly;
    ``weights`` (if given) then only names the preprocessing (input size, mean, std) and categories.
    ``model_kwargs`` go to ``torchvision.models.get_model`` (e.g. ``aux_logits=False``).
    """
    check_arch(arch)
    enum = resolve_weights(arch, weights)
    if weights_path is not None:
        state_dict = load_local_state_dict(weights_path)
        net = torchvision.models.get_model(arch, weights=None, **model_kwargs)
        load_state_dict_strict(net, state_dict, f"weights_path {str(weights_path)!r}")
        source = f"file:{Path(weights_path).expanduser()}"
    elif enum is not None:
        cached = ensure_weights_cached(enum)
        # torchvision's builder applies the enum's architecture settings (num_classes, transform_input, ...)
        # and loads the state dict through torch.hub, which finds the cached file and never downloads.
        net = torchvision.models.get_model(arch, weights=enum, **model_kwargs)
        source = f"torchvision:{cached}"
    else:
        net = torchvision.models.get_model(arch, weights=None, **model_kwargs)
        source = "random"

    input_size, resize_size = 224, None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    categories = None
    if enum is not None:
        categories = list(enum.meta.get("categories") or []) or None
        try:
            preset = enum.transforms()
            input_size = int(preset.crop_size[0])
            resize_size = int(preset.resize_size[0])
            mean, std = tuple(float(m) for m in preset.mean), tuple(float(s) for s in preset.std)
        except (AttributeError, TypeError, IndexError):  # a preset without these attributes
            log.warning("Weights %r have no standard preset; assuming 224 px and ImageNet normalization", enum)
    return TorchvisionNet(net, arch, enum, source, input_size, resize_size, mean, std, categories)
