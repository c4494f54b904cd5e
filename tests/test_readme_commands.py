"""The commands the READMEs show, run as written (bash, from the repository) on the tiny runs of the `sweep`
fixture: each placeholder (`<ce run>`, `<run>`, `$S/0`, ...) becomes a tiny run, and a few settings keep them
cheap (the first 64 test images, which the runs' own test covered, without deletion/insertion)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tiny_sweep import job

REPO = Path(__file__).resolve().parents[1]
# The runs' test covered the first 64 test images (tests/tiny_sweep.py): the same images here.
CHEAP = "max_images=64 faithfulness=false bootstrap=50 grid_images=2 device=cpu"


def commands(readme: Path, program: str) -> list[str]:
    """The lines of ``readme``'s bash blocks that run ``program``, continuation lines joined, comments dropped."""
    text = readme.read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(f"python -m {program} "):
                found.append(" ".join(line.split()))
    return found


def run(command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``command`` through bash in the repository, with this interpreter first on the PATH."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def runs(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Links with plain names to the tiny runs (theirs hold `=` and `,`, which an override would need quoted)."""
    folder = tmp_path_factory.mktemp("readme_runs")
    links = {"ce": 0, "r1": 1, "r2": 2, "r3": 3}
    for name, num in links.items():
        (folder / name).symlink_to(job(sweep, num), target_is_directory=True)
    return {name: folder / name for name in links}


def check_evaluation(out: Path, baseline: Path | None) -> dict:
    """The values an evaluation must have: each model's accuracy is its run's own test accuracy (same images),
    and the baseline's maps have SSIM 1 with themselves."""
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["data"]["num_images"] == 64
    for model in saved["models"].values():
        metrics = json.loads((Path(model["run_dir"]) / "metrics.json").read_text())
        assert model["accuracy"]["value"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    if baseline is not None:
        base = saved["models"][saved["baseline"]]
        assert Path(base["run_dir"]) == baseline
        assert base["ssim_vs_baseline"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert (out / "evaluation.md").exists() and (out / "saliency_comparison.png").exists()
    return saved


def test_readme_evaluate_command(runs: dict[str, Path], tmp_path: Path) -> None:
    (command,) = commands(REPO / "README.md", "trustcnn.evaluate")
    filled = command.replace("<ce run>", str(runs["ce"]))
    for name in ("r1", "r2"):
        filled = filled.replace("<run>", str(runs[name]), 1)
    assert "<" not in filled, filled
    done = run(f"{filled} {CHEAP} out={tmp_path}")
    assert done.returncode == 0, done.stderr
    saved = check_evaluation(tmp_path, runs["ce"])
    assert list(saved["models"]) == ["ce", "r1", "r2"]
    assert "## SSIM vs. baseline `ce`" in done.stdout  # evaluation.md is printed


@pytest.mark.slow  # five evaluations, ~2 min on 2 cores
def test_paper_readme_evaluate_commands(runs: dict[str, Path], tmp_path: Path) -> None:
    """experiments/paper/README.md's commands with `$S` and `$A` two sweeps of tiny runs (job numbers as names)."""
    sweeps = {}
    for var in ("S", "A"):
        sweeps[var] = tmp_path / var
        sweeps[var].mkdir()
        for num, name in enumerate(("ce", "r1", "r2", "r3")):
            (sweeps[var] / str(num)).symlink_to(runs[name].resolve(), target_is_directory=True)
    found = commands(REPO / "experiments" / "paper" / "README.md", "trustcnn.evaluate")
    assert len(found) >= 5, found
    for command in found:
        # A placeholder stands for a path the user types, so it becomes the path itself (inside the README's single
        # quotes a shell variable would not expand); $S and $A are the README's own shell variables.
        filled = (command.replace("<baseline sweep>", str(sweeps["S"])).replace("<grid sweep>", str(sweeps["A"]))
                  .replace("<best job>", "2"))
        assert "<" not in filled, filled
        done = run(f"{filled} {CHEAP}", env={k: str(v) for k, v in sweeps.items()})
        assert done.returncode == 0, (filled, done.stderr)
        out = Path(re.search(r"out=(\S+)", filled).group(1).replace("$S", str(sweeps["S"]))
                   .replace("$A", str(sweeps["A"])))
        baseline = re.search(r"baseline=(\S+)", filled).group(1).replace("$S", str(sweeps["S"]))
        check_evaluation(out, Path(baseline))


# ------------------------------------------------------------------------------------------ report commands

@pytest.fixture()
def plain_sweep(sweep: Path, tmp_path: Path) -> Path:
    """The tiny sweep under job-number names, as `python -m trustcnn.train -m` names its job directories (the
    report writes into the sweep directory, so each test gets its own)."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    for num in range(5):
        (folder / str(num)).symlink_to(job(sweep, num), target_is_directory=True)
    return folder


def best_job(sweep_dir: Path) -> int:
    """The trust job with the highest val/acc in its metrics.json (ties: the lower number), read here."""
    scores = {}
    for num in range(5):
        path = sweep_dir / str(num)
        if (path / "metrics.json").exists() and OmegaConf.load(path / "config.yaml").loss.name != "ce":
            scores[num] = json.loads((path / "metrics.json").read_text())["val/acc"]
    return max(sorted(scores), key=lambda n: scores[n])


def check_report(sweep_dir: Path, stdout: str) -> None:
    rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 6 and [r.split(",")[1] for r in rows[1:]] == ["0", "1", "2", "3", "4"]
    assert f"Best by `val/acc` (max; validation value at each job's tested checkpoint): job {best_job(sweep_dir)} " \
        in (sweep_dir / "report.md").read_text()
    assert "## Table 1" in stdout


def test_readme_report_command(plain_sweep: Path) -> None:
    (command,) = commands(REPO / "README.md", "trustcnn.report")
    done = run(command.replace("outputs/train/multiruns/<sweep>", str(plain_sweep)))
    assert done.returncode == 0, done.stderr
    check_report(plain_sweep, done.stdout)


@pytest.mark.slow  # one evaluation, ~30 s on 2 cores
def test_decoy_readme_report_evaluate_report(plain_sweep: Path) -> None:
    """experiments/decoy_digits/README.md: the report names the evaluate command, which the README shows; after it,
    the report again reads the evaluation."""
    found = commands(REPO / "experiments" / "decoy_digits" / "README.md", "trustcnn.report")
    (evaluate,) = [c for c in commands(REPO / "experiments" / "decoy_digits" / "README.md", "trustcnn.evaluate")
                   if "<best job>" in c]
    assert len(found) == 2 and found[0] == found[1]
    report = found[0].replace("outputs/decoy_digits_study/multiruns/<time>", str(plain_sweep))
    first = run(report)
    assert first.returncode == 0, first.stderr
    check_report(plain_sweep, first.stdout)
    filled = (evaluate.replace("<sweep>", str(plain_sweep)).replace("<ce job>", "0")
              .replace("<best job>", str(best_job(plain_sweep))))
    printed = first.stdout.split("No evaluation yet; make one with:\n")[1].splitlines()[0].strip()
    assert printed == filled
    done = run(f"{filled} {CHEAP}")
    assert done.returncode == 0, done.stderr
    check_evaluation(plain_sweep / "evaluation", plain_sweep / "0")
    second = run(report)
    assert second.returncode == 0, second.stderr
    check_report(plain_sweep, second.stdout)
    table3 = (plain_sweep / "report.md").read_text().split("## Table 3")[1].split("\n## ")[0]
    assert f"From `{plain_sweep / 'evaluation' / 'evaluation.json'}`: 64 test images" in table3
