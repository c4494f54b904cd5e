"""``python -m trustcnn.study analyze``: the paper's Table 3 from the participants' votes, and what else they say.

**Accurate map** (per question and model). A question's votes are counted per option: each panel's map,
"Can't distinguish", "They look the same". "They look the same" counts as a vote for every panel of the
question, "Can't distinguish" for none. A model's map is *accurate* on the question when its count is
greater than zero and no other option (another panel, or "Can't distinguish") has more votes: the
plurality of the participants chose it. Ties share the plurality (two maps with equal votes are both
accurate; a map tied with "Can't distinguish" is accurate). Questions nobody answered are left out.

**Case table** (the paper's Table 3): per model, over the answered questions, case 1 correct prediction &
accurate map, 2 wrong & accurate, 3 correct & inaccurate, 4 wrong & inaccurate; "correct" is the model's
prediction on the image, stored in the manifest when the study was built. Fractions with Wilson 95% CIs
(:func:`trustcnn.metrics.case_fractions`; the paper's intervals look like normal-approximation ones, which
leave [0, 1] near 0 and 1).

Also:

* **Votes**: the share of all answers that chose each model's map (counting "They look the same" for
  every map), and of each other option, with Wilson CIs. Answers of one participant are not independent,
  so these intervals are somewhat too narrow.
* **Agreement between participants**: Krippendorff's alpha for nominal data over the questions answered by
  two or more participants (the categories: which model's map was chosen, "They look the same", "Can't
  distinguish"; it allows any number of participants per question), with a percentile bootstrap 95% CI over
  questions; and the raw share of agreeing pairs of answers to the same question.
* **By background**: the vote shares within each answer to each background question.
* **Chosen map vs energy pointing game** (studies of data with masks): among answers that chose one map, on
  questions whose maps have one highest energy pointing game (share of the map's mass on the object), how
  often the chosen map is that one; the chance level is the mean of 1 / (number of maps).

Outputs (``--out``, default ``<study dir>/analysis``): ``analysis.md`` (also printed), ``analysis.json``,
``analysis.png`` (case table and votes per model, with CIs) and ``answers.csv`` (every answer, with the
participant's number and background and the model it chose).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from trustcnn.evaluation.output import format_case_table_markdown, format_estimate, json_safe
from trustcnn.metrics import CASE_NAMES, case_counts, case_fractions
from trustcnn.metrics.stats import Estimate, wilson_estimate
from trustcnn.study.manifest import (
    ANSWERS_DB,
    BACKGROUND,
    BACKGROUND_ANSWERS,
    CANT_DISTINGUISH,
    LOOK_SAME,
    MANIFEST,
    OTHER_CHOICES,
    Question,
    Study,
    load_study,
)
from trustcnn.study.store import Answer, AnswerStore, Participant, manifest_digest


def chosen_category(question: Question, choice: str) -> str:
    """What an answer chose: the model whose panel it picked, or one of the two other options."""
    panel = question.panel(choice)
    return panel.model if panel is not None else choice


def model_support(question: Question, votes: Counter) -> dict[str, int]:
    """``{model: votes for its map}``, where a "They look the same" vote counts for every map."""
    return {p.model: votes[p.key] + votes[LOOK_SAME] for p in question.panels}


def accurate_models(question: Question, votes: Counter) -> set[str]:
    """The models whose map the plurality of the question's voters chose (see the module docstring)."""
    support = model_support(question, votes)
    top = max([*support.values(), votes[CANT_DISTINGUISH]])
    return {m for m, n in support.items() if n > 0 and n == top}


def tally(study: Study, answers: Sequence[Answer]) -> dict[str, Counter]:
    """``{question id: Counter(choice -> votes)}`` for every question of the study (empty when unanswered)."""
    counts: dict[str, Counter] = {q.id: Counter() for q in study.questions}
    for a in answers:
        counts[a.question_id][a.choice] += 1
    return counts


def case_tables(study: Study, counts: dict[str, Counter]) -> dict[str, dict[str, float]]:
    """Per model, :func:`~trustcnn.metrics.case_fractions` over the answered questions (``skipped`` = unanswered)."""
    answered = [q for q in study.questions if counts[q.id]]
    accurate = {q.id: accurate_models(q, counts[q.id]) for q in answered}
    tables = {}
    for model in study.models:
        correct = torch.tensor([next(p.correct for p in q.panels if p.model == model) for q in answered], dtype=torch.bool)
        acc = torch.tensor([model in accurate[q.id] for q in answered], dtype=torch.bool)
        result = case_fractions(case_counts(correct, acc), len(study.questions) - len(answered))
        tables[model] = {k: v.item() for k, v in result.items()}
    return tables


def krippendorff_alpha_nominal(unit_counts: np.ndarray) -> float:
    """Krippendorff's alpha for nominal data from ``(units, categories)`` counts of values per unit.

    Units with fewer than two values are left out (they carry no pairable value). ``alpha = 1 − D_o / D_e``
    with the coincidence matrix ``o = Σ_u (x_u x_uᵀ − diag x_u) / (m_u − 1)``: ``D_o ∝ n − trace(o)``,
    ``D_e ∝ (n² − Σ_c n_c²) / (n − 1)``. NaN when there is no disagreement to expect (one category only).
    """
    x = np.asarray(unit_counts, dtype=np.float64)
    return float(_alpha_from_sums(*_alpha_parts(x)))


def _alpha_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = x.sum(axis=-1)
    pairable = m >= 2
    x, m = x[pairable], m[pairable]
    # per unit: its values per category (the row sums of its coincidences), its values, its coincidence trace
    return x, m, (x * (x - 1)).sum(axis=-1) / (m - 1)


def _alpha_from_sums(x: np.ndarray, m: np.ndarray, trace: np.ndarray) -> np.ndarray:
    n_c, n, tr = x.sum(axis=-2), m.sum(axis=-1), trace.sum(axis=-1)
    expected = n * n - (n_c * n_c).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected > 0, 1 - (n - 1) * (n - tr) / np.where(expected > 0, expected, 1), np.nan)


def agreement(study: Study, counts: dict[str, Counter], bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Krippendorff's alpha (nominal) with a bootstrap CI over questions, and the share of agreeing pairs."""
    categories = list(study.models) + list(OTHER_CHOICES)
    rows = []
    for q in study.questions:
        by_category = Counter({chosen_category(q, choice): n for choice, n in counts[q.id].items()})
        rows.append([by_category[c] for c in categories])
    x, m, trace = _alpha_parts(np.array(rows, dtype=np.float64).reshape(len(rows), len(categories)))
    units = len(m)
    alpha = float(_alpha_from_sums(x, m, trace))
    low = high = math.nan
    if units >= 2 and bootstrap > 0:
        idx = np.random.default_rng(seed).integers(0, units, size=(bootstrap, units))
        boot = _alpha_from_sums(x[idx], m[idx], trace[idx])
        boot = boot[np.isfinite(boot)]
        if boot.size:
            low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    pairs = float((m * (m - 1)).sum())
    agreeing = float((x * (x - 1)).sum())
    return {
        "krippendorff_alpha": asdict(Estimate(alpha, low, high, units, f"bootstrap({bootstrap}) over questions")),
        "pairwise_agreement": agreeing / pairs if pairs else math.nan,
        "questions_with_two_or_more_answers": units,
        "categories": categories,
    }


def vote_shares(study: Study, answers: Sequence[Answer]) -> dict[str, dict[str, Any]]:
    """Share of the answers that chose each model's map ("They look the same" counting for every map),
    and each other option; Wilson estimates."""
    n = len(answers)
    chosen = Counter()
    for a in answers:
        q = study.question(a.question_id)
        assert q is not None
        if a.choice == LOOK_SAME:
            chosen.update(list(study.models))
        chosen[chosen_category(q, a.choice)] += 1
    return {k: asdict(wilson_estimate(chosen[k], n)) for k in [*study.models, *OTHER_CHOICES]}


def background_breakdown(study: Study, participants: Sequence[Participant], answers: Sequence[Answer]
                         ) -> dict[str, dict[str, Any]]:
    """Per background question and answer: participants, answers and :func:`vote_shares` of that group."""
    background = {p.id: p.background for p in participants}
    out: dict[str, dict[str, Any]] = {}
    for key in BACKGROUND:
        out[key] = {}
        for value in BACKGROUND_ANSWERS:
            group = [a for a in answers if background[a.participant_id][key] == value]
            out[key][value] = {"participants": len({a.participant_id for a in group}), "answers": len(group),
                               "shares": vote_shares(study, group)}
    return out


def pointing_agreement(study: Study, answers: Sequence[Answer]) -> dict[str, Any] | None:
    """How often an answer that chose one map chose the one with the highest energy pointing game; ``None``
    without masks. Questions whose highest score is shared (or missing, for an empty mask) are left out."""
    if not study.has_masks:
        return None
    hits, chance, left_out = 0, [], 0
    for a in answers:
        q = study.question(a.question_id)
        assert q is not None
        chosen = q.panel(a.choice)
        if chosen is None:
            continue
        scores = [p.energy_pointing_game for p in q.panels]
        if any(s is None for s in scores) or scores.count(max(scores)) > 1:
            left_out += 1
            continue
        hits += int(chosen.energy_pointing_game == max(scores))
        chance.append(1 / len(scores))
    return {"rate": asdict(wilson_estimate(hits, len(chance))),
            "chance": float(np.mean(chance)) if chance else math.nan,
            "left_out_answers": left_out}


def analyze_study(study_dir: str | Path, db_path: str | Path | None = None, out_dir: str | Path | None = None,
                  bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Read a study's manifest and answers, and compute (and, with ``out_dir``, write) the analysis."""
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    store = AnswerStore(db_path or study_dir / ANSWERS_DB, manifest_digest((study_dir / MANIFEST).read_text()),
                        readonly=True)
    participants, answers = store.participants(), store.answers()
    valid = {q.id: set(q.choices()) for q in study.questions}
    bad = [a for a in answers if a.choice not in valid.get(a.question_id, ())]
    if bad:
        raise ValueError(f"{len(bad)} answers name a question or option the manifest does not have (first: "
                         f"{bad[0].question_id} = {bad[0].choice!r}); the database belongs to another study.")
    counts = tally(study, answers)
    answered = sum(1 for c in counts.values() if c)
    result: dict[str, Any] = {
        "study": {"title": study.title, "questions": len(study.questions), "answered_questions": answered,
                  "participants": len({a.participant_id for a in answers}),
                  "registered_participants": len(participants), "answers": len(answers),
                  "baseline": study.baseline, "has_masks": study.has_masks},
        "models": {name: {**info, "accuracy": asdict(wilson_estimate(
            sum(p.correct for q in study.questions for p in q.panels if p.model == name), len(study.questions)))}
                   for name, info in study.models.items()},
        "case_table": case_tables(study, counts),
        "votes": vote_shares(study, answers),
        "agreement": agreement(study, counts, bootstrap=bootstrap, seed=seed),
        "background": background_breakdown(study, participants, answers),
        "pointing": pointing_agreement(study, answers),
        "accurate": {q.id: sorted(accurate_models(q, counts[q.id])) for q in study.questions if counts[q.id]},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "analysis.json").write_text(json.dumps(json_safe(result), indent=2))
        (out / "analysis.md").write_text(format_markdown(result))
        save_analysis_figure(result, out / "analysis.png")
        write_answers_csv(study, participants, answers, out / "answers.csv")
        result["out_dir"] = str(out)
    return result


def write_answers_csv(study: Study, participants: Sequence[Participant], answers: Sequence[Answer], path: Path) -> Path:
    background = {p.id: p.background for p in participants}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["participant", *BACKGROUND, "question", "test_index", "label", "choice", "chosen", "answered_at"])
        for a in answers:
            q = study.question(a.question_id)
            assert q is not None
            writer.writerow([a.participant_id, *(background[a.participant_id][k] for k in BACKGROUND), q.id,
                             q.test_index, q.label_name, a.choice, chosen_category(q, a.choice), a.answered_at])
    return path


def _label(option: str) -> str:
    return OTHER_CHOICES.get(option, option)


def format_markdown(result: dict[str, Any]) -> str:
    """The analysis as Markdown (what ``analysis.md`` holds)."""
    s, models = result["study"], result["models"]
    base = s["baseline"]
    out = [f"# User study: {s['title']}", "",
           f"{s['participants']} participants answered ({s['registered_participants']} registered), {s['answers']} "
           f"answers to {s['answered_questions']} of {s['questions']} questions. Values: estimate [95% CI].", "",
           "| model | loss | saliency | run |", "|---|---|---|---|",
           *[f"| {n}{' (baseline)' if n == base else ''} | {m['loss']} | {m['saliency']} | `{m['run_dir']}` |"
             for n, m in models.items()], "",
           "## Case table (paper's Table 3)", "",
           "A model's map is accurate on a question when the plurality of its participants chose it (\"They look "
           "the same\" counts for every map, \"Can't distinguish\" for none; ties share the plurality); correct = "
           "the model's prediction is the label. Fraction of the answered questions [Wilson 95% CI] (count).", "",
           format_case_table_markdown({n: {"case_table": t} for n, t in result["case_table"].items()},
                                      skipped="answered / unanswered questions"), "",
           "## Accuracy on the study images", "",
           "| model | accuracy |", "|---|---|",
           *[f"| {n} | {format_estimate(m['accuracy'])} ({m['accuracy']['n']} images) |"
             for n, m in models.items()], "",
           "## Votes", "",
           "Share of all answers choosing each option; \"They look the same\" counts for every map. Wilson 95% CI "
           "(answers of one participant are not independent: the intervals are somewhat too narrow).", "",
           "| option | share |", "|---|---|",
           *[f"| {_label(k)} | {format_estimate(v)} |" for k, v in result["votes"].items()], ""]
    a = result["agreement"]
    out += ["## Agreement between participants", "",
            f"Krippendorff's alpha (nominal; categories: the chosen model's map, \"They look the same\", \"Can't "
            f"distinguish\") over the {a['questions_with_two_or_more_answers']} questions with two or more answers: "
            f"{format_estimate(a['krippendorff_alpha'])} (percentile bootstrap over questions). Agreeing pairs of "
            "answers to the "
            f"same question: " + ("n/a" if a["pairwise_agreement"] is None or not math.isfinite(a["pairwise_agreement"])
                                  else f"{a['pairwise_agreement']:.3f}") + ".", ""]
    options = [*models, *OTHER_CHOICES]
    out += ["## By background", "",
            "Share of the group's answers choosing each option.", "",
            "| question | answer | participants | answers | " + " | ".join(_label(o) for o in options) + " |",
            "|---|---|---|---|" + "---|" * len(options)]
    for key, groups in result["background"].items():
        for value, g in groups.items():
            out.append(f"| {key} | {value} | {g['participants']} | {g['answers']} | "
                       + " | ".join(format_estimate(g["shares"][o]) for o in options) + " |")
    out.append("")
    p = result["pointing"]
    if p is not None:
        out += ["## Chosen map vs energy pointing game", "",
                f"Answers that chose one map, on questions with one highest energy pointing game: the chosen map "
                f"had the highest in {format_estimate(p['rate'])} of {p['rate']['n']} answers (chance level "
                f"{p['chance']:.3f}; {p['left_out_answers']} answers on questions with tied or missing scores left "
                "out).", ""]
    out += ["Case descriptions: " + "; ".join(f"{c}: {d}" for c, d in CASE_NAMES.items()) + ".", ""]
    return "\n".join(out)


def analysis_figure(result: dict[str, Any]) -> Figure:
    """Per model: the four case fractions, and the vote shares; bars with their 95% CIs."""
    models = list(result["models"])
    fig = Figure(figsize=(11, 4))
    ax_cases, ax_votes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        t = result["case_table"][name]
        values = np.array([t[f"case{c}_fraction"] for c in range(1, 5)], dtype=float)
        low = np.array([t[f"case{c}_ci_low"] for c in range(1, 5)], dtype=float)
        high = np.array([t[f"case{c}_ci_high"] for c in range(1, 5)], dtype=float)
        ax_cases.bar(np.arange(4) + (i - (len(models) - 1) / 2) * width, values, width, label=name,
                     yerr=np.nan_to_num([values - low, high - values]), capsize=3)
    ax_cases.set_xticks(np.arange(4), [f"{c}: {d.replace(', ', chr(10))}" for c, d in CASE_NAMES.items()], fontsize=8)
    ax_cases.set_ylabel("fraction of questions")
    ax_cases.set_ylim(0, 1)
    ax_cases.set_title("Case table (users' plurality = accurate map)", fontsize=10)
    ax_cases.legend(fontsize=8)
    options = [*models, *OTHER_CHOICES]
    votes = [result["votes"][o] for o in options]
    values = np.array([v["value"] for v in votes], dtype=float)
    errors = np.nan_to_num([values - np.array([v["ci_low"] for v in votes], dtype=float),
                            np.array([v["ci_high"] for v in votes], dtype=float) - values])
    ax_votes.bar(np.arange(len(options)), values, yerr=errors, capsize=3,
                 color=[f"C{i}" for i in range(len(models))] + ["0.6", "0.8"])
    ax_votes.set_xticks(np.arange(len(options)), [_label(o).replace(" ", "\n", 1) for o in options], fontsize=8)
    ax_votes.set_ylim(0, 1)
    ax_votes.set_ylabel("share of answers")
    s = result["study"]
    ax_votes.set_title(f"Votes ({s['answers']} answers, {s['participants']} participants)", fontsize=10)
    fig.tight_layout()
    return fig


def save_analysis_figure(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    analysis_figure(result).savefig(path, dpi=100)
    return path
