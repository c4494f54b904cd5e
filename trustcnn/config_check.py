"""The command line checked before Hydra runs (and before torch is imported), so a mistake costs a second.

* An unknown key (``optim.lrr=1``) names the valid keys and the close matches (Hydra only says the key is not
  in the struct); an unknown option of a group (``loss=foo``) lists the group's options.
* A value outside its range (``loss.lam=2``), on the command line or from an experiment file, is refused
  with the range and an example.
* An output directory that cannot be created is refused with the path and the key that moves it.

:func:`check_command_line` raises :class:`CommandLineError` (a bad key or value: exit status 2) or
:class:`OutputDirError` (exit status 1, as for any failure at run time). Only Hydra and OmegaConf are
imported here: ``--help``, shell completion and these errors never wait for torch.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent / "conf"


class CommandLineError(ValueError):
    """A key or value on the command line (or in the config it composes) that cannot run: exit status 2."""

    exit_code = 2


class UnknownConfigKeyError(KeyError, CommandLineError):
    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class OutputDirError(OSError):
    """A directory the run must write cannot be created: exit status 1 (a failure at run time)."""

    exit_code = 1


def config_groups(conf_dir: Path = CONF_DIR) -> set[str]:
    return {p.name for p in conf_dir.iterdir() if p.is_dir()}


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of config group ``group`` (``loss`` -> ``ce, trust, trust_mask, trust_prose``)."""
    folder = conf_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ value checks

def _unit_interval(key: str, value: Any) -> str | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{key} must be a number in [0, 1], got {value!r}; set e.g. {key}=0.9."
    if not 0.0 <= number <= 1.0 or math.isnan(number):
        # The same words as trustcnn.loss (which checks again when the loss is built).
        return (f"loss.lam must lie in [0, 1] (eq. 7 weighs CE by λ and saliency by 1-λ), got {number}; "
                "set e.g. loss.lam=0.9.")
    return None


def _one_of(*allowed: str) -> Callable[[str, Any], str | None]:
    def check(key: str, value: Any) -> str | None:
        if str(value) not in allowed:
            return f"{key} must be one of {', '.join(allowed)}, got {value!r}; set e.g. {key}={allowed[0]}."
        return None
    return check


def _positive_int(key: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{key} must be a whole number >= 1, got {value!r}; set e.g. {key}=1."
    return None


#: Checked on every value a key takes (each value of a sweep) and on the composed config. ``None`` values
#: are settings that do not apply (e.g. ``loss.lam`` of ``loss=ce``) and are not checked.
VALUE_CHECKS: dict[str, Callable[[str, Any], str | None]] = {
    "loss.lam": _unit_interval,
    "loss.form": _one_of("paper", "prose"),
    "test_checkpoint": _one_of("last", "best"),
    "trainer.max_epochs": _positive_int,
    "feature_cache": _one_of("auto", "off"),
    "cpu_allocator": _one_of("reuse", "system"),
}


def _check_value(key: str, value: Any) -> None:
    check = VALUE_CHECKS.get(key)
    if check is None or value is None:
        return
    problem = check(key, value)
    if problem:
        raise CommandLineError(problem)


# ------------------------------------------------------------------------------------------ the command line

def hydra_arguments(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed as Hydra parses it (flags such as ``-m``, ``-sc install=bash``, ``--cfg job``; the rest
    are overrides), so a flag's value is never mistaken for an override."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _enumerable(override: Override) -> bool:
    """Whether the values of an override can be listed here: a value, a choice or a range (not an interval, which
    a sweeper samples, nor a glob, which needs Hydra's config loader)."""
    if not override.is_sweep_override():
        return True
    return override.is_discrete_sweep() and override.value_type != ValueType.GLOB_CHOICE_SWEEP


def _values(override: Override) -> list[Any]:
    """Every value an override gives its key (each value of a sweep; none where they cannot be listed)."""
    if not _enumerable(override):
        return []
    return list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]


def _compose(conf_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    """The config of ``overrides`` (with its Hydra part); a bad override or an unreadable config file
    becomes a :class:`CommandLineError`."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception as err:  # noqa: BLE001 - a bad override, or a config file that cannot be read (YAML errors)
        raise CommandLineError(f"The configuration cannot be composed: {err}") from None
    finally:
        GlobalHydra.instance().clear()


def check_command_line(argv: list[str], conf_dir: Path = CONF_DIR, config_name: str = "train",
                       check_output_dirs: bool = True) -> DictConfig | None:
    """Check the overrides of ``python -m trustcnn.<app> argv`` before Hydra runs.

    Returns the composed config (with each sweep at its first value; ``None`` for ``--help``, ``--hydra-help``,
    ``--info`` and shell completion, which check nothing).

    Raises:
        CommandLineError: an unparsable override, an unknown option of a config group, an unknown key or a
            value out of range.
        OutputDirError: the run (or sweep) directory or the shared cache cannot be created.
    """
    args = hydra_arguments(argv)
    if args.help or args.hydra_help or args.shell_completion or args.info is not None:
        return None
    if args.run + args.multirun + (args.cfg is not None) > 1:
        raise CommandLineError("Give only one of --run, --multirun (-m) and --cfg: -m runs a sweep, --cfg only "
                               "prints the config (of one run: drop -m to see it).")
    try:
        overrides = OverridesParser.create().parse_overrides(list(args.overrides))
    except HydraException as err:
        raise CommandLineError(f"{err}. Overrides are key=value, group=option or key=a,b,c (a sweep, with -m).") from None
    sweeps = [o.input_line for o in overrides if o.is_sweep_override() and not o.is_hydra_override()]
    if sweeps and not args.multirun:
        raise CommandLineError(f"{sweeps[0]} gives several values (a sweep): add -m to run one job per value, "
                               "or give one value.")
    groups = config_groups(conf_dir)
    choices, keys = [], []
    for o in overrides:
        if o.is_hydra_override():  # Hydra checks its own keys; the directories below need their values
            if _enumerable(o):
                choices.append(f"{o.get_key_element()}={_first(o)}")
            continue
        if o.is_delete():
            continue
        group = o.key_or_group
        if group in groups or group.split("/")[0] in groups and "." not in group:
            for value in _values(o):
                if value is not None and str(value) not in ("null",) and str(value) not in group_options(group, conf_dir):
                    options = ", ".join(group_options(group, conf_dir))
                    close = difflib.get_close_matches(str(value), group_options(group, conf_dir), n=1)
                    hint = f" Did you mean {group}={close[0]}?" if close else ""
                    raise CommandLineError(f"Unknown option {value!r} for config group {group!r}.{hint} "
                                           f"Options of {group}: {options}.")
            if _enumerable(o):
                choices.append(f"{group}={_first(o)}")
        else:
            if not (o.is_add() or o.is_force_add()):
                keys.append(o.key_or_group)
            for value in _values(o):
                _check_value(o.key_or_group, value)
    cfg = _compose(conf_dir, config_name, choices)
    for key in keys:
        _check_key(cfg, key)
    # Now every key exists: the config this command line runs (each sweep at its first value; an interval
    # sweep, as Optuna's, at the config's own value), for the checks of values and directories.
    given = [o.input_line if o.is_delete() else f"{o.input_line.split('=', 1)[0]}={_first(o)}" for o in overrides
             if _enumerable(o)]
    cfg = _compose(conf_dir, config_name, given)
    for key in VALUE_CHECKS:  # values set by the config files (e.g. an experiment), not on the command line
        if key not in {o.key_or_group for o in overrides}:
            _check_value(key, OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False))
    if check_output_dirs:
        _check_output_dirs(cfg, args.multirun, [o for o in args.overrides])
    return cfg


def check_overrides(args: list[str], conf_dir: Path = CONF_DIR, config_name: str = "train") -> None:
    """Raise :class:`UnknownConfigKeyError` for an override of a key the composed config lacks (and
    :class:`CommandLineError` for any other bad override): :func:`check_command_line` without the directories."""
    check_command_line(args, conf_dir, config_name, check_output_dirs=False)


def _first(override: Override) -> str:
    if override.is_sweep_override():
        if not _enumerable(override):
            return override.get_value_element_as_str()
        return str(next(iter(override.sweep_string_iterator())))
    return override.get_value_element_as_str()


def _check_key(cfg: DictConfig, key: str) -> None:
    node, path = cfg, []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            valid = sorted(str(k) for k in node.keys() if k != "hydra") if isinstance(node, DictConfig) else []
            where = ".".join(path) or "the top level"
            close = difflib.get_close_matches(part, valid, n=3)
            hint = f" Did you mean {', '.join('.'.join([*path, c]) for c in close)}?" if close else ""
            raise UnknownConfigKeyError(
                f"Unknown config key {key!r}: {where} has no key {part!r}.{hint} Valid keys of {where}: "
                f"{', '.join(valid)}. To add a new key on purpose, write +{key}=..."
            )
        node, path = node[part] if part in node else None, [*path, part]


# ------------------------------------------------------------------------------------------ output directories

def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be created or written (``None`` when it can). Tried, not inferred from permission
    bits (which do not bind root): a directory is made and removed in the nearest existing ancestor."""
    existing = _nearest_existing(Path(path))
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        probe = tempfile.mkdtemp(prefix=".trustcnn-write-check-", dir=existing)
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"
    os.rmdir(probe)
    return None


def _check_output_dirs(cfg: DictConfig, multirun: bool, overrides: Iterable[str]) -> None:
    """The run (or sweep) directory and the shared cache must be creatable before Hydra makes them."""
    def select(key: str) -> str | None:
        try:
            value = OmegaConf.select(cfg, key, default=None)
        except OmegaConfBaseException:  # e.g. an interpolation only a running job can resolve
            return None
        return None if value is None else str(value)

    targets = [("hydra.sweep.dir" if multirun else "hydra.run.dir",
                "the sweep directory" if multirun else "the run directory"),
               ("paths.cache_dir", "the shared cache (pretrained weights)")]
    for key, what in targets:
        path = select(key)
        if path is None:
            continue
        problem = unwritable(Path(path))
        if problem:
            raise OutputDirError(f"Cannot write {what} {path}: {problem}. Write elsewhere: set {key}=<a writable "
                                 "directory>, or move everything with PROJECT_ROOT=<a writable directory> "
                                 "(outputs go to $PROJECT_ROOT/outputs).")
