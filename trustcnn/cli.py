"""The command-line layer of every trustcnn command: light to import, clean on errors.

``python -m trustcnn.train`` starts here (``trustcnn/train.py`` hands over before it imports torch), so
``--help``, shell completion (``-sc install=bash``, ``-sc query=bash``) and a mistake on the command line
answer without importing torch or Lightning; the job itself imports :mod:`trustcnn.train`.

Errors a user causes end with one message that names the problem and the fix, and no traceback:

* a bad key, option or value on the command line: exit status 2 (:mod:`trustcnn.config_check`);
* a failure at run time (missing data, weights offline, an unwritable directory, ...): exit status 1; the
  traceback goes to the run's ``train.log`` (and ``error.json``).

``HYDRA_FULL_ERROR=1`` shows the full traceback on the terminal instead, for every command.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

log = logging.getLogger("trustcnn.cli")

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


def full_error() -> bool:
    """Whether the user asked for full tracebacks (``HYDRA_FULL_ERROR=1``, Hydra's own switch)."""
    return os.environ.get(FULL_ERROR_ENV) == "1"


def fail(message: str, code: int, prog: str = "trustcnn") -> NoReturn:
    """Print ``Error: message`` to stderr and exit with ``code`` (2: the command line; 1: at run time)."""
    print(f"Error ({prog}): {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def describe(err: BaseException) -> str:
    """One line for the terminal: the error's message, with its type where the message alone is ambiguous."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (KeyError,)) and len(err.args) == 1:
        text = str(err.args[0])
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"cannot write or read {err.filename}: {err.strerror}"
    plain = (ValueError, FileNotFoundError, RuntimeError, OSError, ImportError)
    return text if isinstance(err, plain) else f"{type(err).__name__}: {text}"


def log_traceback_to_files(err: BaseException, where: str) -> list[str]:
    """Write ``err``'s traceback to the log files of the root logger only (Hydra's ``train.log``), not to the
    terminal; returns the files written."""
    record = logging.LogRecord("trustcnn", logging.ERROR, __file__, 0, "%s failed: %s", (where, err),
                               (type(err), err, err.__traceback__))
    files = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            files.append(handler.baseFilename)
    return files


class _NoLitloggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_third_party() -> None:
    """Silence what third parties print on every run that is expected here and needs no action.

    * Lightning's tip to install ``litlogger`` (an advert, printed when no LitLogger is configured);
    * Lightning's use of a torch pytree API that torch deprecated (Lightning's own code, not ours);
    * Lightning's warning that the small decoy-digit loaders have few workers (the data lives in memory).

    Everything else (including Lightning's other warnings) still shows.
    """
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoLitloggerTip) for f in logger.filters):
            logger.addFilter(_NoLitloggerTip())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck")


# --------------------------------------------------------------------------------------------- train

def train_task(cfg: Any) -> float | None:
    """Hydra's task function for ``python -m trustcnn.train``: one job (:func:`trustcnn.train.run_job`).

    A single run that fails prints one line and exits with status 1; the traceback goes to the run's
    ``train.log`` and ``error.json`` (``HYDRA_FULL_ERROR=1``: to the terminal). In a multirun a failed job
    is recorded and the sweep goes on (``run_job``).
    """
    quiet_third_party()
    from trustcnn.train import run_job  # torch and Lightning: only once a job runs

    try:
        return run_job(cfg)
    except Exception as err:
        if full_error():
            raise
        places = [*log_traceback_to_files(err, "The run"), str(Path(str(cfg.paths.output_dir)) / "error.json")]
        print(f"Error (trustcnn.train): {describe(err)}\nThe traceback is in {' and '.join(places)}; "
              "HYDRA_FULL_ERROR=1 shows it here.", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


CONF_DIR = Path(__file__).resolve().parent / "conf"
HELP_FILE = CONF_DIR / "hydra" / "help" / "trustcnn.yaml"


def render_help(help_file: Path = HELP_FILE) -> str:
    """The text of ``--help``: Hydra's help template (``conf/hydra/help/trustcnn.yaml``, which
    ``conf/hydra/default.yaml`` selects as ``hydra/help``), filled as Hydra fills it.

    Rendered here rather than by Hydra: Hydra composes the whole config and lists every option of every group
    (its ``$APP_CONFIG_GROUPS``, computed even when the template does not use it), which takes seconds; this
    template names the groups itself, so only ``$FLAGS_HELP`` (Hydra's flags) needs Hydra.
    """
    import string

    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"hydra": {"help": OmegaConf.load(help_file)}})
    template = string.Template(str(cfg.hydra.help.template))
    options = {f"options_{group.replace('/', '_')}": " | ".join(f"{n}*" if n == default else n for n in names)
               for group, (names, default) in group_options().items()}
    return template.safe_substitute(FLAGS_HELP=Hydra.format_args_help(get_args_parser()), APP_CONFIG_GROUPS="",
                                    HYDRA_CONFIG_GROUPS="", CONFIG="", **options)


def group_options(conf_dir: Path = CONF_DIR, config_name: str = "train") -> dict[str, tuple[list[str], str | None]]:
    """Every config group (``hydra/launcher`` included): its options, and its default in the primary config."""
    from omegaconf import OmegaConf

    defaults: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config_name}.yaml")).get("defaults", []):
        if isinstance(item, dict):
            for key, value in item.items():
                defaults[str(key).removeprefix("override ").strip("/")] = str(value)
    folders = [p for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"] + [conf_dir / "hydra" / "launcher"]
    out = {}
    for folder in sorted(folders):
        group = folder.relative_to(conf_dir).as_posix()
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        out[group] = (names, defaults.get(group) if defaults.get(group) in names else None)
    return out


def _hydra_app() -> Callable[[], Any]:
    import hydra

    # An absolute path: the configs live next to this file whichever module Hydra takes for the caller.
    return hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"),
                      config_name="train")(train_task)


def train_main(argv: Sequence[str] | None = None) -> None:
    """``python -m trustcnn.train`` (and ``trustcnn-train``): check the command line, then hand over to Hydra.

    After a multirun the exit status is 1 when a job failed (or did not finish): the ``SweepSummary``
    callback, which prints the summary in this process whichever launcher ran the jobs, keeps the verdict.
    When Hydra stops a multirun early (an error, Ctrl-C), the summary of the sweep directory so far is
    printed before the error propagates.
    """
    from trustcnn import sweep
    from trustcnn.config_check import CommandLineError, OutputDirError, check_command_line
    from trustcnn.launch import quiet_schema_warning

    quiet_schema_warning()  # conf/hydra/launcher/* share the plugins' names on purpose (trustcnn.launch)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = sys.argv[1:]
    if any(a.startswith(("install=", "uninstall=")) for a in args) and sys.argv[0].endswith(".py"):
        # `python -m trustcnn.train -sc install=bash`: Hydra would complete `python <file>.py`, which bash's
        # completion cannot match to `python -m ...`; complete the installed command instead.
        sys.argv[0] = "trustcnn-train"
    if any(a in ("--help", "-h") for a in args) and "--hydra-help" not in args:
        print(render_help())
        return
    try:
        check_command_line(sys.argv[1:])
    except (CommandLineError, OutputDirError) as err:
        if full_error():
            raise
        fail(str(err), err.exit_code, "trustcnn.train")
    sweep.reset()
    try:
        _hydra_app()()
    except BaseException:
        sweep.summarize_stopped_multirun()
        raise
    if sweep.exit_code():
        sys.exit(sweep.exit_code())


# ------------------------------------------------------------------------------- evaluate, report, ...

def report_failure(prog: str, err: BaseException, usage: bool = False, fix: str | None = None) -> NoReturn:
    """End an argparse command (``evaluate``, ``report``, ...) that failed with ``err`` under the same rules as
    ``train``: one message and no traceback (``HYDRA_FULL_ERROR=1``: the traceback), exit status 2 for a
    mistake in the arguments (``usage``), 1 for a failure at run time (its traceback goes to the log files
    configured, if any). ``fix``: what to do, when the error's own message does not say."""
    if full_error():
        raise err
    if usage:
        fail(describe(err), 2, prog)
    files = log_traceback_to_files(err, prog)
    hint = f" Traceback in {files[0]}." if files else ""
    fix_text = f" Fix: {fix}." if fix else ""
    fail(f"{describe(err)}.{fix_text}{hint} HYDRA_FULL_ERROR=1 shows the traceback.", 1, prog)
