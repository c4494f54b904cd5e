"""What ``python -m trustcnn.evaluate`` writes: ``evaluation.json`` (estimates as dicts, NaN as ``null``) and
``evaluation.md`` (the same as Markdown tables, also printed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trustcnn.metrics.case_table import CASE_NAMES
from trustcnn.metrics.stats import Estimate


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (``null`` in JSON, which has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def format_estimate(est: dict[str, Any] | None) -> str:
    """An estimate as written in ``evaluation.json`` (``null`` for NaN) as ``value [low, high]``; ``—`` for none."""
    return "—" if est is None else Estimate(**{**est, **{k: math.nan if est[k] is None else est[k]
                                                          for k in ("value", "ci_low", "ci_high")}}).format()


def format_case_table_markdown(models: dict[str, dict[str, Any]],
                               skipped: str = "scored / skipped (empty mask)") -> str:
    """The paper's Table 3 as Markdown: one row per case, one column per model (fraction [95% CI] (count));
    the last row counts the scored and skipped samples, under the label ``skipped``."""
    names = [n for n, m in models.items() if "case_table" in m]
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in range(1, 5):
        cells = []
        for n in names:
            t = models[n]["case_table"]
            est = {"value": t[f"case{c}_fraction"], "ci_low": t[f"case{c}_ci_low"], "ci_high": t[f"case{c}_ci_high"],
                   "n": int(t["total"]), "method": "wilson"}
            cells.append(f"{format_estimate(est)} ({int(t[f'case{c}_count'])})")
        lines.append(f"| {c}: {CASE_NAMES[c]} | " + " | ".join(cells) + " |")
    lines.append(f"| {skipped} | "
                 + " | ".join(f"{int(models[n]['case_table']['total'])} / {int(models[n]['case_table']['skipped'])}"
                              for n in names) + " |")
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    """Markdown tables of an evaluation's result (what ``evaluation.md`` holds)."""
    data, settings, models = result["data"], result["settings"], result["models"]
    base = result["baseline"]

    def table(title: str, columns: list[tuple[str, str]], note: str = "") -> list[str]:
        lines = [f"## {title}", ""]
        if note:
            lines += [note, ""]
        lines.append("| model | " + " | ".join(c for c, _ in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for name, m in models.items():
            cells = []
            for _, key in columns:
                value: Any = m
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                cells.append(format_estimate(value))
            label = f"{name} (baseline)" if name == base else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines + [""]

    out = [
        "# Evaluation", "",
        f"{data['num_images']} of {data['test_set_size']} images of the `{data['test_set']}` set of "
        f"{data['datamodule']} ({data['num_classes']} classes), data of run `{data['reference_run']}`. "
        "Values: estimate [95% CI].", "",
    ]
    out += [f"> warning: {w}" for w in result["warnings"]] + ([""] if result["warnings"] else [])
    out += [
        "| model | loss | saliency | run |", "|---|---|---|---|",
        *[f"| {n} | {m['loss']} | {m['saliency']} | `{m['run_dir']}` |" for n, m in models.items()], "",
    ]
    out += table("Classification", [("accuracy", "accuracy"), ("macro precision", "precision"),
                                     ("macro recall", "recall")],
                 f"Accuracy: Wilson interval. Macro precision / recall: percentile bootstrap over images "
                 f"({settings['bootstrap']} resamples).")
    if data["has_masks"]:
        out += table("Localization (masks)", [("pointing game", "pointing_game"),
                                               ("energy pointing game", "energy_pointing_game"),
                                               ("IoU", "iou")],
                     f"Pointing game: tolerance {settings['pointing_tolerance']} px, Wilson interval. Energy "
                     f"pointing game and IoU (min-max-normalized map >= {settings['iou_threshold']}): mean over "
                     "images, t-interval.")
        out += ["## Case table (paper's Table 3)", "",
                f"Accurate map: energy pointing game >= {settings['accurate_threshold']}. Fraction of scored "
                "images [Wilson 95% CI] (count).", "", format_case_table_markdown(models), ""]
    if settings["faithfulness"]:
        out += table("Faithfulness", [("deletion AUC ↓", "deletion_auc"), ("insertion AUC ↑", "insertion_auc")],
                     f"{settings['di_steps']} steps, `{settings['di_baseline']}` substrate, probability of the "
                     "explained class; mean over images, t-interval.")
    out += table("Model-randomization sanity check", [("Spearman ρ ↓", "randomization.spearman"),
                                                      ("SSIM ↓", "randomization.ssim")],
                 "Maps of the trained model vs. the same model with its target layer re-initialized, explaining "
                 "the same class. Lower = the map depends on the learned weights (as it should). Images with a "
                 "constant map have no ρ: " + ", ".join(f"{n}: {m['randomization']['spearman_undefined']}"
                                                          for n, m in models.items()) + ".")
    if base is not None:
        out += table(f"SSIM vs. baseline `{base}` (eq. 11)", [("SSIM", "ssim_vs_baseline")],
                     f"Maps at the image resolution {settings['ssim_size']}, min-max normalized; mean over images, "
                     "t-interval.")
    else:
        out += ["SSIM vs. baseline: no baseline given (baseline=<run dir>).", ""]
    return "\n".join(out)


def write_results(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``evaluation.json`` and ``evaluation.md`` into ``out_dir`` (made if missing); returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(json_safe(result), indent=2))
    (out / "evaluation.md").write_text(format_markdown(result))
    return out
