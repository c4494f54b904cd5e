"""Multiruns that tell the truth: a summary of every job at the end, reruns that skip finished jobs, and
the direction a sweeper optimizes ``optimized_metric`` in.

* :class:`SweepSummary` is a Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``). At the end
  of a multirun it reads the sweep directory's job directories (``metrics.json``: finished, ``error.json``:
  failed, ``refused.json``: refused by ``skip_finished``, none: did not finish), so it works with every
  launcher, including those that run jobs in other processes or on other machines. It prints the summary,
  writes ``<sweep dir>/summary.md`` and ``summary.json``, and keeps it for :func:`exit_code`, which
  ``trustcnn.cli.train_main`` turns into the exit status (Hydra discards the return value of ``hydra.main``).
* ``skip_finished=true`` (see :func:`skip_finished_job`): a job whose directory already holds a finished
  run of the same resolved configuration returns that run's value instead of training again.
* ``${trustcnn.direction:<metric>[,<mode>]}`` resolves to ``maximize`` or ``minimize`` by
  :func:`trustcnn.checkpoints.metric_mode`, the rule of the checkpoint callback (registered on import of
  ``trustcnn``).

* :func:`run_once`: jobs of one sweep that differ only in settings that do not apply to their loss (``loss.lam``
  or ``ablation`` of ``loss=ce`` in ``-m loss=ce,trust loss.lam=0.5,0.9``) are one configuration: the first job
  to claim it runs it, the others record ``duplicate.json`` (which job they repeat) and return its value. The
  summary shows them as duplicates; the report counts the configuration once.

``python -m trustcnn.sweep <sweep dir>`` prints (and rewrites) the summary of a sweep directory at any time.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import logging
import math
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trustcnn.checkpoints import metric_mode, read_run_record

log = logging.getLogger("trustcnn.sweep")

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
#: Written into a finished job's directory when ``skip_finished`` refused to run another config there.
REFUSED = "refused.json"
#: The finished job's ``.hydra`` files, saved before Hydra rewrites them for the rerun (restored on skip/refusal).
PREVIOUS = Path(".hydra") / "previous"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
#: Written by a job whose configuration another job of the sweep runs (:func:`run_once`).
DUPLICATE = "duplicate.json"
#: ``<sweep dir>/.claims/<hash of a configuration>.json``: the job that runs it (:func:`run_once`).
CLAIMS = ".claims"
_JOB_MARKERS = ("metrics.json", "error.json", DUPLICATE, "config.yaml", ".hydra/overrides.yaml")
#: ``<sweep dir>/evaluation``: where ``python -m trustcnn.evaluate ... out=<sweep dir>/evaluation`` writes (its
#: Hydra files make it look like a job directory; it is not one).
EVALUATION_DIR = "evaluation"
#: Keys that may differ between a finished job and its rerun without making the stored result another config's
#: (``feature_cache`` changes the speed, not the results; runs from before it existed lack it; ``logger`` records
#: a run without changing it, and names a W&B run by its job's overrides, ``skip_finished=true`` included).
IGNORED_KEYS = frozenset({"skip_finished", "feature_cache", "logger"})
COMMAND = "python -m trustcnn.train"
STOPPED = "the multirun stopped early, with an error or an interrupt"


# --------------------------------------------------------------------------------------------- resolvers

def direction(metric: str, mode: str | None = None) -> str:
    """``"maximize"`` or ``"minimize"``: the direction of ``metric`` (``mode`` max|min when given)."""
    return {"max": "maximize", "min": "minimize"}[metric_mode(str(metric), mode or None)]


def register_resolvers() -> None:
    """Register ``${trustcnn.direction:...}`` (idempotent; must happen before Hydra resolves the sweeper)."""
    if not OmegaConf.has_resolver("trustcnn.direction"):
        OmegaConf.register_new_resolver("trustcnn.direction", direction)


# ------------------------------------------------------------------------------------------ the summary

@dataclass
class Job:
    num: int | None
    path: str
    status: str  # finished | duplicate | failed | refused | unfinished
    overrides: list[str]
    value: float | None = None
    error: str | None = None
    #: For a duplicate: the job number (or directory) of the job that ran its configuration.
    duplicate_of: str | None = None
    #: The job's own ``metrics.json`` (empty when it has none); the report aggregates it, the summary does not.
    metrics: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        """Finished, or a duplicate of a finished job (its value is that job's)."""
        return self.status in ("finished", "duplicate")


@dataclass
class Summary:
    sweep_dir: str
    optimized_metric: str
    direction: str
    jobs: list[Job]
    #: This multirun's command line into the same sweep directory with skip_finished=true.
    command: str | None = None
    rerun_in_place: str | None = None
    rerun_each: list[str] = field(default_factory=list)
    #: With refused jobs: the (in-place) command of the last multirun in this sweep directory that refused none.
    previous_command: str | None = None
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs)

    @property
    def not_finished(self) -> list[Job]:
        return [j for j in self.jobs if not j.finished]

    @property
    def ok(self) -> bool:
        return bool(self.jobs) and not self.not_finished and not self.interrupted

    @property
    def best(self) -> Job | None:
        scored = [j for j in self.jobs if j.status == "finished" and j.value is not None and math.isfinite(j.value)]
        if not scored:
            return None
        pick = max if self.direction == "maximize" else min
        return pick(scored, key=lambda j: j.value)

    def headline(self) -> str:
        parts = [f"{self.count('finished')} finished", f"{self.count('failed')} failed"]
        if self.count("duplicate"):
            parts.insert(1, f"{self.count('duplicate')} duplicate (settings that do not apply to their loss; "
                            "run once)")
        if self.count("refused"):
            parts.append(f"{self.count('refused')} refused by skip_finished")
        parts.append(f"{self.count('unfinished')} did not finish")
        return f"{len(self.jobs)} job{'s' if len(self.jobs) != 1 else ''}: " + ", ".join(parts)

    def _rows(self) -> list[tuple[str, str, str, str]]:
        shown = _shown_overrides(self.jobs)
        return [(str(j.num if j.num is not None else j.path),
                 f"= job {j.duplicate_of}" if j.status == "duplicate" else
                 j.status.upper() if not j.finished else j.status,
                 _fmt(j.value) if j.finished else "-", " ".join(shown[i]) or "-") for i, j in enumerate(self.jobs)]

    def to_text(self) -> str:
        lines = [f"Sweep summary: {self.sweep_dir}" + (f"  ({STOPPED})" if self.interrupted else ""),
                 f"{self.headline()}.  optimized_metric: {self.optimized_metric} ({self.direction})"]
        if not self.jobs:
            lines.append("No job directory in the sweep directory.")
        rows = [("job", "status", self.optimized_metric, "overrides")] + self._rows()
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        for i, row in enumerate(rows):
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
            if i and self.jobs[i - 1].error:
                lines.append("  " + " " * widths[0] + "  " + self.jobs[i - 1].error)
        lines += self._closing()
        return "\n".join(lines)

    def _closing(self, markdown: bool = False) -> list[str]:
        """The lines after the table: best job, notes, rerun commands (Markdown: paragraphs and code blocks)."""
        blocks: list[list[str]] = []
        best = self.best
        if best is not None:
            blocks.append([f"Best: job {best.num}, {self.optimized_metric} = {_fmt(best.value)}"])
        blocks += [[note] for note in self.notes]
        todo = [j for j in self.not_finished if j.status != "refused"]
        if self.previous_command:
            blocks.append(["The command line that made this sweep directory, to rerun it in place:",
                           self.previous_command])
        elif self.rerun_in_place and todo:
            blocks.append([f"Rerun the {len(todo)} job(s) without a result in place (same command, same job numbers "
                           "and directories; finished jobs are skipped):", self.rerun_in_place])
        if self.rerun_each:
            blocks.append(["Or each of them alone, into its own directory:", *self.rerun_each])
        lines: list[str] = []
        for block in blocks:
            text, commands = block[0], block[1:]
            if markdown:
                lines += [text, ""] + (["```bash", *commands, "```", ""] if commands else [])
            else:
                lines += [text] + ["  " + c for c in commands]
        return lines

    def to_markdown(self) -> str:
        lines = [f"# Sweep summary: `{self.sweep_dir}`", "",
                 f"{self.headline()}" + (f" ({STOPPED})" if self.interrupted else "") + ". "
                 f"optimized_metric: `{self.optimized_metric}` ({self.direction}).", "",
                 f"| job | status | {self.optimized_metric} | overrides | error |", "|---|---|---|---|---|"]
        for job, row in zip(self.jobs, self._rows()):
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in (*row, job.error or "")) + " |")
        lines.append("")
        lines += self._closing(markdown=True)
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for job in out["jobs"]:
            del job["metrics"]  # summary.json names each job's value; the metrics stay in the job directories
        out.update(ok=self.ok, counts={s: self.count(s) for s in ("finished", "duplicate", "failed", "refused",
                                                                    "unfinished")},
                   best_job=self.best.num if self.best else None)
        return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def _shown_overrides(jobs: Sequence[Job]) -> list[list[str]]:
    """Each job's overrides of the keys whose value is not the same in every job (all of them for one job)."""
    overrides = [[o for o in j.overrides if _split(o)[0].lstrip("+~") not in IGNORED_KEYS] for j in jobs]
    if len(jobs) < 2:
        return overrides
    maps = [dict(_split(o) for o in job) for job in overrides]
    keys = set().union(*maps)
    varying = {k for k in keys if len({m.get(k) for m in maps}) > 1}
    return [[o for o in job if _split(o)[0] in varying] for job in overrides]


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).strip().splitlines()[:1]) or "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    try:
        return [str(o) for o in (OmegaConf.to_container(OmegaConf.load(path)) or [])]
    except Exception:  # noqa: BLE001 - a broken file must not hide the other jobs
        return []


def _job_num(job_dir: Path) -> int | None:
    """The job number: the directory's name (``<num>``, or ``<num>_<overrides>`` in sweeps made before
    ``hydra.sweep.subdir`` was the job number alone), else ``hydra.job.num`` of its ``.hydra/hydra.yaml``."""
    match = re.match(r"(\d+)(_|$)", job_dir.name)
    if match:
        return int(match.group(1))
    hydra_file = job_dir / ".hydra" / "hydra.yaml"
    try:
        num = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num", default=None)
        return int(num)
    except Exception:  # noqa: BLE001
        return None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories directly under ``sweep_dir`` (any of ``metrics.json``, ``error.json``,
    ``config.yaml``, ``.hydra/overrides.yaml``; not :data:`EVALUATION_DIR`), by job number."""
    if not sweep_dir.is_dir():
        return []
    found = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name != EVALUATION_DIR
             and any((p / m).exists() for m in _JOB_MARKERS)]
    return sorted(found, key=lambda p: (_job_num(p) is None, _job_num(p) or 0, p.name))


def _read_metrics(path: Path) -> dict[str, float] | None:
    """``metrics.json`` as name -> float; ``None`` when it is unreadable or holds a value that is not a number."""
    data = _read_json(path)
    try:
        return None if data is None else {str(k): float(v) for k, v in data.items()}
    except (TypeError, ValueError):
        return None


def read_job(job_dir: Path, metric: str = "val/acc") -> Job:
    """A job's state from its directory alone (whichever process or machine ran it).

    ``metric`` names the job's value when its ``run.json`` names no ``optimized_metric`` (the default is
    train's ``optimized_metric``). A refused job
    keeps the metrics of the finished run in its directory (the run of its restored ``config.yaml``).
    """
    overrides = _job_overrides(job_dir)
    num = _job_num(job_dir)
    refused = _read_json(job_dir / REFUSED)
    if refused is not None:
        return Job(num, str(job_dir), "refused", overrides, error=_one_line(refused.get("error", "refused")),
                   metrics=_read_metrics(job_dir / "metrics.json") or {})
    if (job_dir / "error.json").exists():
        error = (_read_json(job_dir / "error.json") or {}).get("error") or "unreadable error.json"
        return Job(num, str(job_dir), "failed", overrides, error=_one_line(error))
    duplicate = _read_json(job_dir / DUPLICATE)
    if duplicate is not None:
        original = duplicate.get("duplicate_of") or {}
        metrics = _read_json(Path(str(original.get("dir", ""))) / "metrics.json")
        if metrics is None:
            return Job(num, str(job_dir), "failed", overrides,
                       error=f"duplicate of job {original.get('job')}, which has no metrics.json")
        value = metrics.get(str(duplicate.get("optimized_metric") or metric))
        return Job(num, str(job_dir), "duplicate", overrides, value=float(value) if value is not None else None,
                   duplicate_of=str(original.get("job")))
    if (job_dir / "metrics.json").exists():
        metrics = _read_metrics(job_dir / "metrics.json")
        if metrics is None:
            return Job(num, str(job_dir), "failed", overrides, error="unreadable metrics.json")
        record = read_run_record(job_dir) or {}
        return Job(num, str(job_dir), "finished", overrides, value=metrics.get(record.get("optimized_metric") or metric),
                   metrics=metrics)
    return Job(num, str(job_dir), "unfinished", overrides,
               error="no metrics.json and no error.json: the job did not finish (killed, interrupted or still running)")


def _command(args: Iterable[str]) -> str:
    return " ".join([COMMAND, *(shlex.quote(str(a)) for a in args)])


def rerun_in_place(sweep_dir: Path, task_overrides: Sequence[str], hydra_overrides: Sequence[str]) -> str:
    """The multirun's own command line into the same sweep directory, with ``skip_finished=true``: the same
    overrides give the same job numbers, so every job lands in its own directory again."""
    task = [o for o in task_overrides if _split(o)[0].lstrip("+~") != "skip_finished"]
    hydra = [o for o in hydra_overrides if _split(o)[0] not in ("hydra.mode", "hydra.sweep.dir")]
    return _command(["-m", *task, *hydra, f"hydra.sweep.dir={sweep_dir.resolve()}", "skip_finished=true"])


def rerun_alone(job: Job) -> str:
    """One job as a single run into its own directory (whichever sweeper chose its overrides)."""
    task = [o for o in job.overrides if _split(o)[0].lstrip("+~") != "skip_finished"]
    return _command([*task, f"hydra.run.dir={Path(job.path).resolve()}"])


def summarize(sweep_dir: str | Path, optimized_metric: str = "val/acc", mode: str | None = None,
              task_overrides: Sequence[str] | None = None, hydra_overrides: Sequence[str] = (),
              sweeper: str | None = None, interrupted: bool = False,
              previous_command: str | None = None) -> Summary:
    """The summary of a sweep directory, from its job directories. ``task_overrides`` / ``hydra_overrides``
    (the multirun's command line, ``hydra.overrides``) give the in-place rerun command."""
    sweep = Path(sweep_dir)
    jobs = [read_job(d, optimized_metric) for d in job_dirs(sweep)]
    summary = Summary(str(sweep.resolve()), optimized_metric, direction(optimized_metric, mode), jobs,
                      interrupted=interrupted)
    if task_overrides is not None:
        summary.command = rerun_in_place(sweep, task_overrides, hydra_overrides)
    todo = [j for j in summary.not_finished if j.status != "refused"]
    if todo or interrupted:
        summary.rerun_in_place = summary.command
        summary.rerun_each = [rerun_alone(j) for j in todo if j.overrides]
        if sweeper and "optuna" in sweeper.lower():
            summary.notes.append("Optuna: the in-place rerun repeats the trials only while the sampler suggests the "
                                 "same parameters (same seed, same results); a finished job of other parameters is "
                                 "refused. The single-run commands always work.")
    refused = [j for j in jobs if j.status == "refused"]
    if refused:
        summary.notes.append(f"Job(s) {', '.join(str(j.num) for j in refused)} kept a finished run of another "
                             "configuration (skip_finished refused to run there): this command line does not number "
                             "its jobs as the one that made this sweep directory. Rerun with that one, or choose a "
                             "new hydra.sweep.dir.")
        summary.previous_command = previous_command
    if (sweep / "optimization_results.yaml").exists():
        summary.notes.append(f"The sweeper's result: {sweep.resolve() / 'optimization_results.yaml'}")
    return summary


def write_summary(summary: Summary) -> Path:
    sweep = Path(summary.sweep_dir)
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / SUMMARY_MD).write_text(summary.to_markdown())
    (sweep / SUMMARY_JSON).write_text(json.dumps(summary.to_json(), indent=2))
    return sweep / SUMMARY_MD


def command_of(config: DictConfig) -> str:
    """The in-place rerun command of the multirun whose launching config (or multirun.yaml) is ``config``."""
    return rerun_in_place(Path(str(config.hydra.sweep.dir)),
                          list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or []),
                          list(OmegaConf.select(config, "hydra.overrides.hydra", default=[]) or []))


def summarize_config(config: DictConfig, interrupted: bool = False, previous_command: str | None = None) -> Summary:
    """:func:`summarize` for the launching config of a multirun (as the callback receives it, or multirun.yaml)."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    return summarize(
        sweep_dir,
        optimized_metric=str(OmegaConf.select(config, "optimized_metric", default="val/acc")),
        mode=OmegaConf.select(config, "callbacks.model_checkpoint.mode", default=None),
        task_overrides=list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or []),
        hydra_overrides=list(OmegaConf.select(config, "hydra.overrides.hydra", default=[]) or []),
        sweeper=OmegaConf.select(config, "hydra.sweeper._target_", default=None),
        interrupted=interrupted,
        previous_command=previous_command,
    )


def publish(summary: Summary) -> None:
    """Print the summary and write ``summary.md`` / ``summary.json`` into the sweep directory."""
    path = write_summary(summary)
    print("\n" + summary.to_text() + f"\nSummary written to {path} (and {SUMMARY_JSON}).\n", flush=True)


# ---------------------------------------------------- state the launching process keeps for the exit code

class _State:
    config: DictConfig | None = None
    summary: Summary | None = None
    previous_command: str | None = None


_STATE = _State()


def reset() -> None:
    _STATE.config = None
    _STATE.summary = None
    _STATE.previous_command = None


def exit_code() -> int:
    """1 when the multirun that just ended left a job failed, refused or unfinished; 0 otherwise (and after a
    single run, whose failure Hydra already turns into a non-zero exit)."""
    return 0 if _STATE.summary is None or _STATE.summary.ok else 1


def summarize_stopped_multirun() -> None:
    """For ``trustcnn.cli.train_main`` when Hydra stopped with an error or an interrupt: if a multirun had started
    and its summary was not made, print and write it now (the sweep directory's state at that moment)."""
    if _STATE.config is None or _STATE.summary is not None:
        return
    try:
        _STATE.summary = summarize_config(_STATE.config, interrupted=True, previous_command=_STATE.previous_command)
        publish(_STATE.summary)
    except Exception as err:  # noqa: BLE001 - never hide the error that stopped the multirun
        log.warning("Could not summarize the sweep: %s", err)


def _previous_command(sweep_dir: Path) -> str | None:
    """The in-place command of the last multirun in ``sweep_dir`` that refused no job (from its summary.json;
    else multirun.yaml, read before the launcher of this multirun rewrites it)."""
    previous = _read_json(sweep_dir / SUMMARY_JSON)
    if previous is not None:
        if (previous.get("counts") or {}).get("refused"):  # that command line did not match the directory either
            return previous.get("previous_command")
        if previous.get("command"):
            return str(previous["command"])
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return None
    try:
        config = OmegaConf.load(path)
        OmegaConf.update(config, "hydra.sweep.dir", str(sweep_dir), force_add=True)
        return command_of(config)
    except Exception:  # noqa: BLE001 - only a hint in the summary
        return None


class SweepSummary(Callback):
    """Hydra callback: the summary at the end of a multirun, and the bookkeeping of ``skip_finished``.

    Every hook runs in the launching process (the jobs may run elsewhere), and reads only the sweep directory.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _STATE.config, _STATE.summary = config, None
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _STATE.previous_command = _previous_command(sweep_dir)
        for job_dir in job_dirs(sweep_dir):
            (job_dir / REFUSED).unlink(missing_ok=True)  # a refusal belongs to the multirun that made it
            if config.get("skip_finished"):
                save_hydra_files(job_dir)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("skip_finished"):
            save_hydra_files(Path(str(config.hydra.run.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = summarize_config(config, previous_command=_STATE.previous_command)
        for job_dir in job_dirs(Path(summary.sweep_dir)):
            shutil.rmtree(job_dir / PREVIOUS, ignore_errors=True)  # jobs this multirun did not launch
        _STATE.summary = summary
        publish(summary)


# ---------------------------------------------------------------------------------------- skip_finished

class FinishedJobMismatchError(CompactHydraException):
    """``skip_finished=true`` found a finished run of another configuration in this job's directory."""


def save_hydra_files(job_dir: Path) -> None:
    """Keep a finished job's ``.hydra`` files before Hydra rewrites them for this job (restored on skip/refusal)."""
    if not (job_dir / "metrics.json").exists() or not (job_dir / ".hydra").is_dir():
        return
    previous = job_dir / PREVIOUS
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(parents=True)
    for name in HYDRA_FILES:
        if (job_dir / ".hydra" / name).exists():
            shutil.copy2(job_dir / ".hydra" / name, previous / name)


def _restore_hydra_files(job_dir: Path) -> bool:
    previous = job_dir / PREVIOUS
    if not previous.is_dir():
        return False
    for path in previous.iterdir():
        shutil.copy2(path, job_dir / ".hydra" / path.name)
    shutil.rmtree(previous, ignore_errors=True)
    return True


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, current value)`` for every leaf that differs (:data:`IGNORED_KEYS` aside)."""
    a, b = _flatten(stored), _flatten(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in IGNORED_KEYS:
            continue
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            diffs.append((key, "(absent)" if old is missing else old, "(absent)" if new is missing else new))
    return diffs


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` resolved as ``train`` writes it to ``config.yaml`` and as it reads back."""
    return OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)))  # type: ignore[return-value]


def skip_finished_job(cfg: DictConfig, output_dir: Path, job: str, overrides: Sequence[str],
                      multirun: bool) -> tuple[bool, float | None]:
    """``(True, stored value)`` when ``output_dir`` holds a finished run of exactly ``cfg`` (resolved, as in its
    ``config.yaml``): the job is not run again. ``(False, None)`` when there is no finished run: run it.

    Raises:
        FinishedJobMismatchError: a finished run of another configuration is there (the command line does not
            number its jobs as the one that made the directory did). The directory is left as it was (its
            ``.hydra`` files restored); in a multirun ``refused.json`` records the refusal for the summary.
    """
    if not (output_dir / "metrics.json").exists() or (output_dir / "error.json").exists():
        shutil.rmtree(output_dir / PREVIOUS, ignore_errors=True)
        return False, None
    overrides_file = output_dir / PREVIOUS / "overrides.yaml"
    previous_overrides = ([str(o) for o in OmegaConf.to_container(OmegaConf.load(overrides_file)) or []]
                          if overrides_file.exists() else None)
    restored = _restore_hydra_files(output_dir)
    stored_file = output_dir / "config.yaml"
    if stored_file.exists():
        diffs = config_differences(OmegaConf.to_container(OmegaConf.load(stored_file)), resolved(cfg))  # type: ignore[arg-type]
    else:
        diffs = [("config.yaml", "(absent)", "(this job's config)")]
    if diffs:
        shown = "; ".join(f"{k}: {old!r} there, {new!r} here" for k, old, new in diffs[:5])
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        message = (f"skip_finished=true: job {job}'s directory {output_dir} holds a finished run of another "
                   f"configuration ({shown}{more}); it was left as it was and this job did not run. ")
        if previous_overrides is not None:
            message += (f"That run's overrides: {' '.join(previous_overrides) or '(none)'}; "
                        f"this job's: {' '.join(overrides) or '(none)'}. ")
        if multirun:
            message += ("This command line does not number its jobs as the one that made the sweep directory did: "
                        "rerun with that one (the summary at the end prints it), or give a new hydra.sweep.dir.")
            (output_dir / REFUSED).write_text(json.dumps({
                "error": f"refused by skip_finished: a finished run of another configuration is there ({shown}{more})",
                "message": message, "differences": [list(map(str, d)) for d in diffs]}, indent=2))
        else:
            message += "Give another hydra.run.dir, or leave skip_finished out to run again there."
        raise FinishedJobMismatchError(message)
    if not restored:
        log.warning("%s/.hydra was rewritten for this rerun (no copy of the finished job's files was kept: is the "
                    "trustcnn.sweep.SweepSummary callback in hydra.callbacks?).", output_dir)
    (output_dir / REFUSED).unlink(missing_ok=True)
    metrics = _read_json(output_dir / "metrics.json") or {}
    value = sweeper_value(metrics, str(cfg.optimized_metric))
    log.info("Job %s: skipped, %s already holds this configuration's finished run (%s = %s).", job, output_dir,
             cfg.optimized_metric, _fmt(value))
    return True, value


def clear_results(output_dir: Path) -> None:
    """Remove the result files of an earlier run in ``output_dir`` before a job runs there again, so the
    directory never shows an old ``metrics.json`` next to a new ``error.json`` (or the reverse)."""
    stale = [output_dir / n for n in ("metrics.json", "error.json", REFUSED, DUPLICATE) if (output_dir / n).exists()]
    if stale:
        log.info("Removing the results of an earlier run in %s: %s", output_dir, ", ".join(p.name for p in stale))
    for path in stale:
        path.unlink(missing_ok=True)
    shutil.rmtree(output_dir / PREVIOUS, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- run_once

@dataclass
class Original:
    """The job that runs a configuration, as a duplicate job sees it."""

    job: str
    dir: str
    value: float | None


def canonical_config(cfg: DictConfig, output_dir: Path, not_applicable: dict[str, Any]) -> str:
    """The configuration a job actually runs, as text: resolved, without the settings that do not apply to its
    loss (``not_applicable``, and the null loss settings, which the loss configs use for "does not apply"),
    with its own directory replaced by a placeholder (checkpoint paths hold it) and :data:`IGNORED_KEYS` left
    out. Two jobs with the same text produce the same run."""
    config = resolved(cfg)
    if isinstance(config.get("loss"), dict):
        config["loss"] = {k: v for k, v in config["loss"].items() if v is not None}
    for key in not_applicable:
        head, _, leaf = key.rpartition(".")
        node = config
        for part in head.split(".") if head else []:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    for key in IGNORED_KEYS:
        config.pop(key, None)
    text = json.dumps(config, sort_keys=True, default=str)
    return text.replace(str(Path(output_dir).resolve()), "<job dir>").replace(str(output_dir), "<job dir>")


@contextmanager
def run_once(cfg: DictConfig, output_dir: Path, sweep_dir: Path, job_num: Any,
             not_applicable: dict[str, Any]) -> Iterator[Original | None]:
    """Run each distinct configuration of a sweep once, also when its jobs run in parallel.

    Yields ``None`` when this job runs its configuration (it holds the claim until the block ends), or the
    :class:`Original` whose run it repeats: that job finished this configuration (waited for while it runs),
    and this job writes ``duplicate.json`` instead of running.

    The claim is ``<sweep dir>/.claims/<hash>.json``, made atomically (a locked file linked into place, so the
    lock is held before any other job can see the claim); a job that finds it waits for the lock, i.e. for the
    claiming job to end (or die: the lock goes with its process). If that job left no ``metrics.json`` (it
    failed, or was killed), the waiting job takes the claim over and runs the configuration itself. A job that
    finds its own claim from an earlier multirun (a rerun in place) runs again. Locks need a file system with
    working ``flock`` (local disks, most cluster file systems).
    """
    claims = Path(sweep_dir) / CLAIMS
    claims.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(canonical_config(cfg, output_dir, not_applicable).encode()).hexdigest()[:16]
    claim = claims / f"{key}.json"
    me = {"job": str(job_num), "dir": str(Path(output_dir).resolve())}
    tmp = claims / f".{key}.{os.getpid()}.{job_num}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(me).encode())
        try:
            os.link(tmp, claim)
            mine = True
        except FileExistsError:
            mine = False
        finally:
            tmp.unlink(missing_ok=True)
        if not mine:
            os.close(fd)
            fd = -1
            fd = os.open(claim, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while the claiming job runs
            owner = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
            metrics = _read_json(Path(owner.get("dir", "")) / "metrics.json") if owner.get("dir") else None
            if owner.get("dir") != me["dir"] and metrics is not None:
                value = sweeper_value(metrics, str(cfg.optimized_metric))
                (Path(output_dir) / DUPLICATE).write_text(json.dumps({
                    "duplicate_of": owner, "optimized_metric": str(cfg.optimized_metric), "value": value,
                    "not_applicable": not_applicable,
                    "why": "this job's configuration differs from that job's only in settings that do not apply "
                           "to its loss; it was run once"}, indent=2, default=str))
                log.info("Job %s: the same configuration as job %s (%s do not apply to loss=%s); not run again, "
                         "%s = %s.", job_num, owner.get("job"), ", ".join(not_applicable) or "no settings",
                         cfg.loss.name, cfg.optimized_metric, _fmt(value))
                yield Original(str(owner.get("job")), str(owner.get("dir")), value)
                return
            # Our own claim (a rerun in place), or the claiming job left no result: this job runs it.
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        yield None
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def sweeper_value(metrics: dict[str, Any], metric: str) -> float | None:
    """The value a sweeper gets: the metric as a float, or ``None`` when it is missing or NaN (Optuna marks
    such a trial failed and goes on; a NaN would stop its whole study)."""
    value = metrics.get(metric)
    if value is None:
        log.warning("optimized_metric %s is not among the run's metrics (%s); the sweeper gets no value.",
                    metric, ", ".join(sorted(k for k in metrics if k.startswith("val/"))) or "none")
        return None
    value = float(value)
    return None if math.isnan(value) else value


# ----------------------------------------------------------------------------------------------- the CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustcnn.sweep",
                                     description="Print (and rewrite summary.md/.json of) a sweep directory's summary: "
                                                 "finished and failed jobs, and the commands that rerun the failed ones.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    multirun_file = args.sweep_dir / "multirun.yaml"
    if multirun_file.exists():
        config = OmegaConf.load(multirun_file)
        OmegaConf.update(config, "hydra.sweep.dir", str(args.sweep_dir), force_add=True)
        summary = summarize_config(config)
    else:
        summary = summarize(args.sweep_dir)
    if not summary.jobs:
        print(f"No job directory in {args.sweep_dir}.", file=sys.stderr)
        return 2
    publish(summary)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
