"""Command-line overrides checked before Hydra runs, so an unknown key lists the valid ones.

Hydra already lists the options of a config group (``loss=foo``); for a plain key (``optim.lrr=1``)
it only says the key is not in the struct. This check names the valid keys and the close matches.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"


class UnknownConfigKeyError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def config_groups(conf_dir: Path = CONF_DIR) -> set[str]:
    return {p.name for p in conf_dir.iterdir() if p.is_dir()}


def _first_value(override: Override) -> str:
    if override.is_sweep_override():
        return str(next(iter(override.sweep_string_iterator())))
    return override.get_value_element_as_str()


def check_overrides(args: list[str], conf_dir: Path = CONF_DIR, config_name: str = "train") -> None:
    """Raise :class:`UnknownConfigKeyError` for an override of a key the composed config lacks.

    Group choices (``loss=trust_mask``), additions (``+key=``), deletions (``~key``) and Hydra's own
    keys (``hydra.*``) are left to Hydra.
    """
    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    if not candidates:
        return
    overrides = OverridesParser.create().parse_overrides(candidates)
    groups = config_groups(conf_dir)
    choices, keys = [], []
    for o in overrides:
        if o.is_add() or o.is_delete() or o.is_force_add() or o.key_or_group.startswith("hydra"):
            continue
        if o.key_or_group in groups or o.key_or_group.split("/")[0] in groups and "." not in o.key_or_group:
            choices.append(f"{o.key_or_group}={_first_value(o)}")
        else:
            keys.append(o.key_or_group)
    if not keys:
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=choices)
    except Exception:
        return  # a bad group choice: Hydra reports it (with the available options) when it runs
    finally:
        GlobalHydra.instance().clear()
    for key in keys:
        _check_key(cfg, key)


def _check_key(cfg: DictConfig, key: str) -> None:
    node, path = cfg, []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
            where = ".".join(path) or "the top level"
            close = difflib.get_close_matches(part, valid, n=3)
            hint = f" Did you mean {', '.join('.'.join([*path, c]) for c in close)}?" if close else ""
            raise UnknownConfigKeyError(
                f"Unknown config key {key!r}: {where} has no key {part!r}.{hint} Valid keys of {where}: "
                f"{', '.join(valid)}. To add a new key on purpose, write +{key}=..."
            )
        node, path = node[part] if part in node else None, [*path, part]
