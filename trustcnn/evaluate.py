"""Post-hoc evaluation of trained runs on one shared test set (DESIGN §4), a Hydra app (``conf/eval.yaml``):

    python -m trustcnn.evaluate baseline=<run dir> 'runs=[<run dir>,...]' [saliency=gradcam|guided_gradcam]
        [names=[...]] [max_images=N] [out=<dir>] [key=value ...]

One Lightning test pass per model updates the :mod:`trustcnn.metrics` ``Metric`` classes
(:class:`trustcnn.evaluation.module.EvaluationModule`); ``evaluation.json``, ``evaluation.md`` (also printed) and
``saliency_comparison.png`` go into ``out`` (Hydra's run directory, default ``outputs/eval/<time>``). The work
is :func:`trustcnn.evaluation.run.evaluate`; this module is the command line, light to import: ``--help``, a
mistake on the command line and a flag of the former argparse command line (``--baseline``, ``--runs``, ...,
which end with the command in the new form, exit status 2) answer without importing torch.

Errors follow :mod:`trustcnn.cli`: a run, key or value that does not fit ends with one line and exit status 2,
a failure at run time with one line and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

PROG = "trustcnn.evaluate"
CONF_DIR = Path(__file__).resolve().parent / "conf"
HELP_FILE = CONF_DIR / "hydra" / "help" / "evaluate.yaml"
NEW_FORM = ("python -m trustcnn.evaluate baseline=<run dir> 'runs=[<run dir>,...]' "
            "[saliency=gradcam|guided_gradcam] [names=[...]] [max_images=N] [out=<dir>]")

# The former argparse flags and the key each became; the flags that took several values became lists.
OLD_FLAGS = {
    "--baseline": "baseline", "--runs": "runs", "--names": "names", "--out": "out", "--data-root": "data_root",
    "--max-images": "max_images", "--batch-size": "batch_size", "--di-steps": "di_steps",
    "--di-baseline": "di_baseline", "--pointing-tolerance": "pointing_tolerance",
    "--accurate-threshold": "accurate_threshold", "--bootstrap": "bootstrap", "--seed": "seed",
    "--grid-images": "grid_images", "--device": "device", "--saliency": "saliency",
    "--no-deletion-insertion": "faithfulness",
}
LIST_KEYS = ("runs", "names")


def _hydra_flags() -> set[str]:
    from hydra._internal.utils import get_args_parser

    return set(get_args_parser()._option_string_actions)


def _quote(value: str) -> str:
    """A value as Hydra's override grammar reads it: quoted when it holds a character the grammar splits on."""
    return f'"{value}"' if any(c in value for c in "=,[]{}()'\" \\") else value


def old_flags_message(args: Sequence[str]) -> str | None:
    """The one-line answer to a command line that uses a ``--flag`` other than Hydra's (``None`` when it has
    none): the command in the new form where every flag is one of the former command line's."""
    unknown = [a for a in args if a.startswith("--") and a.split("=", 1)[0] not in _hydra_flags()]
    if not unknown:
        return None
    foreign = [a for a in unknown if a.split("=", 1)[0] not in OLD_FLAGS]
    if foreign:
        return (f"{foreign[0]} is not an option of {PROG}: settings are key=value overrides, e.g. {NEW_FORM} "
                f"(every key: python -m {PROG} --help).")
    overrides: list[str] = []
    key, values = None, []

    def close() -> None:
        if key == "faithfulness":
            overrides.append("faithfulness=false")
        elif key in LIST_KEYS:
            overrides.append(shlex.quote(f"{key}=[{','.join(_quote(v) for v in values)}]"))
        elif key is not None:
            overrides.append(shlex.quote(f"{key}={_quote(values[0] if values else '')}"))

    for arg in args:
        flag, eq, inline = arg.partition("=")
        if arg.startswith("--") and flag in OLD_FLAGS:
            close()
            key, values = OLD_FLAGS[flag], [inline] if eq else []
        elif key is not None:
            values.append(arg)
        else:
            overrides.append(shlex.quote(arg))
    close()
    return (f"{unknown[0].split('=', 1)[0]} is a flag of the former command line; {PROG} takes key=value "
            f"overrides now: python -m {PROG} {' '.join(overrides)}")


def evaluate_task(cfg: Any) -> None:
    """Hydra's task function: evaluate, print the Markdown (see :func:`trustcnn.evaluation.run.evaluate`)."""
    from trustcnn.cli import describe, fail, full_error, quiet_third_party, report_failure

    quiet_third_party()
    from hydra.core.hydra_config import HydraConfig

    from trustcnn.evaluation.output import format_markdown
    from trustcnn.evaluation.run import evaluate  # torch and Lightning: only once the job runs

    out = HydraConfig.get().runtime.output_dir
    try:
        result = evaluate(cfg, out)
    except (FileNotFoundError, ValueError) as err:  # a run, directory or setting that does not fit: exit 2
        if full_error():
            raise
        fail(describe(err), 2, PROG)
    except Exception as err:  # a failure at run time: one message, exit 1 (trustcnn.cli)
        report_failure(PROG, err, fix="set out=<a writable directory>" if isinstance(err, OSError) else None)
    print(format_markdown(result))
    print(f"\nWritten to {out}: evaluation.json, evaluation.md, saliency_comparison.png", file=sys.stderr)


def _hydra_app() -> Callable[[], Any]:
    import hydra

    return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")(evaluate_task)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trustcnn.evaluate`` (and ``trustcnn-evaluate``): check the command line, then hand over to
    Hydra."""
    from trustcnn.cli import fail, full_error, render_help

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = sys.argv[1:]
    if any(a in ("--help", "-h") for a in args) and "--hydra-help" not in args:
        print(render_help(HELP_FILE))
        return
    message = old_flags_message(args)
    if message:
        fail(message, 2, PROG)
    from trustcnn.config_check import CommandLineError, OutputDirError, check_command_line

    try:
        check_command_line(args, config_name="eval")
    except (CommandLineError, OutputDirError) as err:
        if full_error():
            raise
        fail(str(err), err.exit_code, PROG)
    _hydra_app()()


if __name__ == "__main__":
    main()
