"""Study 2, one command: the paper's loss against the established explanation penalties on a planted shortcut.

``python -m trustcnn.shortcut_study run --out outputs/shortcut_study`` runs the protocol of
``experiment=shortcut_study`` (see ``experiments/shortcut_study/README.md``) as ordinary Hydra multiruns of
``python -m trustcnn.train``, each printed before it runs:

1. **tune** — one sweep per arm (a loss, with its saliency method): learning rate × the loss's weight (λ for
   the trust losses, ``loss.weight`` for the peers), seed 0, the paper's depth (``last_conv``), 10 epochs,
   final epoch tested; ``<out>/tune/<arm>/``.
2. **select** — per arm, the setting with the highest ``val/acc`` on the *random-decoy* validation split
   (a split without the shortcut, held apart from test; ties go to the earlier grid point);
   ``<out>/selected.json`` and ``selected.md`` (every tuning result).
3. **final** — one sweep: every arm at its chosen setting × trainable depth × seeds (``+arm=...``, the arms
   written as configs under ``<out>/conf/arm/``); ``<out>/final/``.
4. **report** — ``python -m trustcnn.report <out>/final``: tables, paired differences against cross-entropy
   (same seed, depth and saliency method) with 95% CIs; then ``<out>/final/accuracy_vs_epg.png`` (random-decoy
   accuracy against the energy pointing game per job) and, per depth, ``python -m trustcnn.evaluate`` of every
   arm's seed-0 job against the ``ce`` job (``<out>/maps/<depth>/saliency_comparison.png``: each loss's maps on
   the same images).

Every sweep runs with ``skip_finished=true``: running the same command again after an interruption completes
the study without redoing finished jobs. ``--launcher joblib`` (default) runs two jobs at once on a 2-core
machine; ``--dry-run`` prints the commands and the job counts only.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: The tuning grids, shared by every arm: 3 learning rates (SGD with momentum 0.9).
LEARNING_RATES: tuple[float, ...] = (0.01, 0.03, 0.1)
DEPTHS: tuple[str, ...] = ("last_conv", "last_block", "all")
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Arm:
    """One arm of the study: a loss with its saliency method and the grid of its weight."""

    name: str
    overrides: tuple[str, ...]
    weight_key: str | None = None  # the loss's strength: loss.lam or loss.weight (None: cross-entropy)
    weights: tuple[float, ...] = field(default_factory=tuple)

    def tune_overrides(self) -> list[str]:
        grid = [f"optim.lr={','.join(map(str, LEARNING_RATES))}"]
        if self.weight_key:
            grid.append(f"{self.weight_key}={','.join(map(str, self.weights))}")
        return [*self.overrides, *grid]


#: λ ∈ [0, 1] for the paper's losses; for RRR the input-gradient term of the pretrained decoy CNN is ~10⁴
#: (summed over 3 × 32 × 32 inputs) against a cross-entropy of ~0.05, so its weights sit near 10⁻⁴–10⁻²
#: (Ross et al. choose the weight so both terms have the same order of magnitude).
ARMS: tuple[Arm, ...] = (
    Arm("ce", ("loss=ce",)),
    Arm("ce_guided", ("loss=ce", "saliency=guided_gradcam")),  # the baseline the Guided arm pairs with
    Arm("trust", ("loss=trust",), "loss.lam", (0.5, 0.9, 0.99)),
    Arm("trust_guided", ("loss=trust", "saliency=guided_gradcam"), "loss.lam", (0.5, 0.9, 0.99)),
    Arm("trust_mask", ("loss=trust_mask",), "loss.lam", (0.5, 0.9, 0.99)),
    Arm("rrr", ("loss=rrr",), "loss.weight", (1e-4, 1e-3, 1e-2)),
    Arm("cam_outside", ("loss=cam_outside",), "loss.weight", (0.3, 1.0, 3.0)),
)
#: Arms whose tuning another arm's covers (the same training; only the test-time maps differ).
TUNED_WITH = {"ce_guided": "ce"}


def launcher_overrides(launcher: str, n_jobs: int) -> list[str]:
    if launcher == "basic":
        return []
    if launcher == "joblib":
        return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"]
    return [f"hydra/launcher={launcher}"]


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "trustcnn.train", "-m", "experiment=shortcut_study", *overrides]


def select_arms(names: list[str] | None) -> tuple[Arm, ...]:
    """The arms called ``names`` (all by default), with the arms their tuning comes from."""
    if not names:
        return ARMS
    known = {a.name for a in ARMS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"shortcut_study: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}.")
    wanted = set(names) | {TUNED_WITH[n] for n in names if n in TUNED_WITH}
    return tuple(a for a in ARMS if a.name in wanted)


def tune_commands(out: Path, launcher: list[str], arms: tuple[Arm, ...] = ARMS,
                  extra: list[str] | None = None) -> dict[str, list[str]]:
    return {arm.name: train_command([*arm.tune_overrides(), "model.trainable=last_conv", "seed=0", *(extra or []),
                                     f"hydra.sweep.dir={out / 'tune' / arm.name}", "skip_finished=true", *launcher])
            for arm in arms if arm.name not in TUNED_WITH}


def count_jobs(command: list[str]) -> int:
    """How many jobs Hydra's sweeper makes of a multirun command (its own expansion of the overrides)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    start = len(command) - command[::-1].index("-m")  # after the multirun flag (not python's -m)
    overrides = [o for o in command[start:] if not o.startswith(("hydra.", "hydra/"))]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    return sum(len(b) for b in batches)


def select(out: Path, arms: tuple[Arm, ...] = ARMS) -> dict[str, dict]:
    """Per arm, the tuning job with the highest ``val/acc`` (finished jobs only) and its overrides."""
    from trustcnn.sweep import job_dirs, read_job

    chosen: dict[str, dict] = {}
    rows = []
    for arm in arms:
        source = TUNED_WITH.get(arm.name, arm.name)
        best = None
        for job_dir in job_dirs(out / "tune" / source):
            job = read_job(job_dir, "val/acc")
            if not job.finished:
                continue
            value = math.nan if job.value is None else job.value
            setting = [o for o in job.overrides if o.startswith(("optim.lr=", "loss.lam=", "loss.weight="))]
            if arm.name == source:
                rows.append((arm.name, " ".join(setting), value, job_dir.name))
            if math.isfinite(value) and (best is None or value > best[0]):
                best = (value, setting, job_dir.name)
        if best is None:
            raise SystemExit(f"shortcut_study: no finished tuning job for arm {arm.name!r} in {out / 'tune' / source}; "
                             "run the tune stage first (it resumes where it stopped).")
        chosen[arm.name] = {"overrides": [*arm.overrides, *best[1]], "val/acc": best[0], "tune_job": f"{source}/{best[2]}"}
    (out / "selected.json").write_text(json.dumps(chosen, indent=2))
    lines = ["# Tuning results (val/acc on random-decoy validation images, final epoch, seed 0)", "",
             "| arm | setting | val/acc | job | chosen |", "|---|---|---|---|---|"]
    for arm, setting, value, job in rows:
        mark = "✓" if chosen[arm]["tune_job"].endswith(f"/{job}") else ""
        lines.append(f"| {arm} | {setting} | {value:.4f} | {job} | {mark} |")
    (out / "selected.md").write_text("\n".join(lines) + "\n")
    return chosen


def write_arm_configs(out: Path, chosen: dict[str, dict]) -> Path:
    """``<out>/conf/arm/<arm>.yaml`` (global package) for each arm's chosen setting; returns ``<out>/conf``."""
    conf = out / "conf"
    (conf / "arm").mkdir(parents=True, exist_ok=True)
    for name, entry in chosen.items():
        groups = [o for o in entry["overrides"] if o.split("=")[0] in ("loss", "saliency")]
        values = [o for o in entry["overrides"] if o not in groups]
        lines = ["# @package _global_", f"# chosen by trustcnn.shortcut_study from tune job {entry['tune_job']}"]
        if groups:
            lines += ["defaults:", *(f"  - override /{o.split('=')[0]}: {o.split('=')[1]}" for o in groups)]
        for value in values:
            key, v = value.split("=", 1)
            lines.append(_nested_yaml(key, v))
        (conf / "arm" / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return conf


def _nested_yaml(key: str, value: str) -> str:
    parts = key.split(".")
    return "\n".join("  " * i + f"{p}:" for i, p in enumerate(parts[:-1])) + ("\n" if len(parts) > 1 else "") + \
        "  " * (len(parts) - 1) + f"{parts[-1]}: {value}"


def final_command(out: Path, conf: Path, launcher: list[str], arms: tuple[Arm, ...] = ARMS,
                  seeds: tuple[int, ...] = SEEDS, depths: tuple[str, ...] = DEPTHS,
                  extra: list[str] | None = None) -> list[str]:
    return train_command([f"+arm={','.join(a.name for a in arms)}", f"model.trainable={','.join(depths)}",
                          f"seed={','.join(map(str, seeds))}", *(extra or []), f"hydra.searchpath=[file://{conf.resolve()}]",
                          f"hydra.sweep.dir={out / 'final'}", "skip_finished=true", *launcher])


def final_jobs(out: Path) -> list[dict]:
    """The finished jobs of the final stage: arm, depth, seed and test metrics per job."""
    from trustcnn.sweep import job_dirs, read_job

    jobs = []
    for job_dir in job_dirs(out / "final"):
        job = read_job(job_dir)
        if job.status != "finished":
            continue
        keys = dict(o.lstrip("+").split("=", 1) for o in job.overrides if "=" in o)
        jobs.append({"dir": job_dir, "arm": keys.get("arm"), "depth": keys.get("model.trainable"),
                     "seed": keys.get("seed"), "metrics": job.metrics})
    return jobs


def write_scatter(out: Path, arms: tuple[Arm, ...] = ARMS, depths: tuple[str, ...] = DEPTHS,
                  path: Path | None = None) -> Path:
    """``path`` (default ``<out>/final/accuracy_vs_epg.png``): random-decoy test accuracy against the energy
    pointing game, one point per finished final job, one panel per trainable depth, with the level a uniform map
    scores."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    jobs = final_jobs(out)
    if not jobs:
        raise SystemExit(f"shortcut_study: no finished job in {out / 'final'}; run the final stage first.")
    shown = [d for d in depths if any(j["depth"] == d for j in jobs)]
    fig = Figure(figsize=(4.2 * len(shown), 4.0), layout="constrained")
    axes = fig.subplots(1, len(shown), sharex=True, sharey=True, squeeze=False)[0]
    markers = "osD^v<>ph"
    uniform = [j["metrics"]["test/energy_pointing_game_uniform"] for j in jobs
               if "test/energy_pointing_game_uniform" in j["metrics"]]
    colors = matplotlib.colormaps["tab10"].colors
    for ax, depth in zip(axes, shown):
        for i, arm in enumerate(arms):  # one colour and marker per arm in every panel, drawn or not
            pts = [(j["metrics"].get("test/energy_pointing_game"), j["metrics"].get("test/acc"))
                   for j in jobs if j["depth"] == depth and j["arm"] == arm.name]
            pts = [p for p in pts if None not in p]
            ax.scatter(*(zip(*pts) if pts else ([], [])), label=arm.name, marker=markers[i % len(markers)],
                       color=colors[i % len(colors)], s=28, alpha=0.8)
        if uniform:
            ax.axvline(sum(uniform) / len(uniform), color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"model.trainable={depth}")
        ax.set_xlabel("energy pointing game (test, random decoys)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (test, random decoys)")
    axes[-1].legend(fontsize=8, loc="best")
    path = path or out / "final" / "accuracy_vs_epg.png"
    fig.savefig(path, dpi=120)
    return path


def maps_commands(out: Path, arms: tuple[Arm, ...] = ARMS, depths: tuple[str, ...] = DEPTHS,
                  seed: str = "0") -> list[list[str]]:
    """Per trainable depth, one ``python -m trustcnn.evaluate`` of every arm's job of ``seed`` against the
    ``ce`` job of the same seed and depth: each loss's maps on the same test images
    (``<out>/maps/<depth>/saliency_comparison.png``). Arms whose job did not finish are left out."""
    jobs = final_jobs(out)
    commands = []
    for depth in depths:
        found = {j["arm"]: j["dir"] for j in jobs if j["depth"] == depth and j["seed"] == seed}
        if "ce" not in found:
            continue
        others = [a.name for a in arms if a.name != "ce" and a.name in found]
        runs = ",".join(f"'{found[a]}'" for a in others)
        commands.append([sys.executable, "-m", "trustcnn.evaluate", f"baseline='{found['ce']}'", f"runs=[{runs}]",
                         f"names=[ce,{','.join(others)}]", f"out={out / 'maps' / depth}", "faithfulness=false",
                         "max_images=128", "grid_images=6"])
    return commands


def _run(command: list[str], dry_run: bool) -> int:
    print("$ " + shlex.join(command), flush=True)
    if dry_run:
        return 0
    done = subprocess.run(command)
    if done.returncode != 0:
        print(f"shortcut_study: the command above exited {done.returncode} (a sweep's summary.md lists its failed "
              "jobs). Run the study's command again to finish it (finished jobs are skipped).", file=sys.stderr)
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustcnn.shortcut_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["run", "tune", "select", "final", "report"],
                        help="run = tune, select, final and report in order")
    parser.add_argument("--out", type=Path, default=Path("outputs/shortcut_study"))
    parser.add_argument("--launcher", default="joblib", help="basic | joblib | submitit_local | submitit_slurm | ray")
    parser.add_argument("--n-jobs", type=int, default=2, help="jobs at once with --launcher joblib")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and job counts, run nothing")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(a.name for a in ARMS)}")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="final-stage seeds (default 0,...,4)")
    parser.add_argument("--depths", default=",".join(DEPTHS), help="final-stage trainable depths")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every job, e.g. paths.cache_dir=...")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    launcher = launcher_overrides(args.launcher, args.n_jobs)
    arms = select_arms(args.arms.split(",") if args.arms else None)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    depths = tuple(args.depths.split(","))
    stages = ["tune", "select", "final", "report"] if args.stage == "run" else [args.stage]
    failed = 0
    if "tune" in stages:
        commands = tune_commands(out, launcher, arms, args.extra)
        print(f"tune: {sum(map(count_jobs, commands.values()))} jobs in {len(commands)} sweeps", flush=True)
        for command in commands.values():
            failed |= _run(command, args.dry_run) != 0
    if "select" in stages and not args.dry_run:
        chosen = select(out, arms)
        print("selected (val/acc on random-decoy validation): "
              + "; ".join(f"{k}: {' '.join(v['overrides'])} ({v['val/acc']:.3f})" for k, v in chosen.items()), flush=True)
    if "final" in stages:
        if args.dry_run:
            chosen = {arm.name: {"overrides": list(arm.overrides), "tune_job": "?"} for arm in arms}
            conf_root = Path(tempfile.mkdtemp(prefix="shortcut_study_dry_"))
        else:
            if not (out / "selected.json").is_file():
                raise SystemExit(f"shortcut_study: no {out / 'selected.json'}; run the select stage first.")
            chosen = {k: v for k, v in json.loads((out / "selected.json").read_text()).items()
                      if k in {a.name for a in arms}}
            conf_root = out
        command = final_command(out, write_arm_configs(conf_root, chosen), launcher, arms, seeds, depths, args.extra)
        print(f"final: {count_jobs(command)} jobs", flush=True)
        failed |= _run(command, args.dry_run) != 0
    if "report" in stages:
        failed |= _run([sys.executable, "-m", "trustcnn.report", str(out / "final")], args.dry_run) != 0
        if not args.dry_run:
            print(f"wrote {write_scatter(out, arms, depths)}", flush=True)
            for command in maps_commands(out, arms, depths):
                failed |= _run(command, args.dry_run) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
