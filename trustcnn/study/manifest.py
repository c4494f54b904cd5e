"""The study directory: what ``build`` writes and ``serve`` / ``analyze`` read.

Layout::

    <study dir>/manifest.json       the questions, and the hidden identity of every panel (never served)
    <study dir>/images/q000.png     question 0's test image
    <study dir>/images/q000_A.png   its panel A: one model's map over the image (A, B, ... in random order)
    <study dir>/answers.sqlite      the participants' answers (made by ``serve``)

A panel's file name holds only the question and the panel's letter, so what a browser can fetch says
nothing of which model made which map.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
IMAGES = "images"
ANSWERS_DB = "answers.sqlite"
FORMAT_VERSION = 1

#: The two answers that pick no single panel, as the paper offered them.
CANT_DISTINGUISH = "cant_distinguish"
LOOK_SAME = "look_same"
OTHER_CHOICES: dict[str, str] = {CANT_DISTINGUISH: "Can't distinguish", LOOK_SAME: "They look the same"}

#: The paper's background questions (§4.2.1), each answered yes or no.
BACKGROUND: dict[str, str] = {
    "cs_degree": "Do you have a Bachelor's degree in Computer Science?",
    "saliency_familiar": "Are you familiar with the term \"saliency map\" as the machine learning community uses it?",
    "cv_experience": "Do you have experience in computer vision?",
}
BACKGROUND_ANSWERS = ("yes", "no")

_QUESTION_ID = re.compile(r"q\d{3,}")
_PANEL_KEY = re.compile(r"[A-Z]")


@dataclass
class Panel:
    """One model's map in one question. ``key`` is the letter participants see; the rest is hidden."""

    key: str
    image: str
    model: str
    prediction: int
    prediction_name: str
    correct: bool
    energy_pointing_game: float | None = None


@dataclass
class Question:
    id: str
    test_index: int
    label: int
    label_name: str
    image: str
    panels: list[Panel]

    def panel(self, key: str) -> Panel | None:
        return next((p for p in self.panels if p.key == key), None)

    def choices(self) -> list[str]:
        """Every valid answer: the panel letters, then "Can't distinguish" and "They look the same"."""
        return [p.key for p in self.panels] + list(OTHER_CHOICES)


@dataclass
class Study:
    """A study's manifest. ``models`` maps each model name to its run (``run_dir``, ``checkpoint``,
    ``loss``, ``saliency``); ``baseline`` is one of them."""

    title: str
    seed: int
    baseline: str
    models: dict[str, dict[str, Any]]
    data: dict[str, Any]
    rendering: dict[str, Any]
    questions: list[Question]
    has_masks: bool
    version: int = FORMAT_VERSION
    created: str = ""
    warnings: list[str] = field(default_factory=list)

    def question(self, question_id: str) -> Question | None:
        return next((q for q in self.questions if q.id == question_id), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def load_study(study_dir: str | Path) -> Study:
    """Read and check ``<study_dir>/manifest.json``; a ``ValueError`` names what is wrong."""
    study_dir = Path(study_dir)
    path = study_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; make a study directory with "
                                "`python -m trustcnn.study build --baseline RUN --runs RUN [RUN ...] --out DIR`.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rebuild the study.") from err
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {raw.get('version')!r}; this trustcnn reads version "
                         f"{FORMAT_VERSION}. Rebuild the study with this version.")
    questions = [Question(**{**q, "panels": [Panel(**p) for p in q["panels"]]}) for q in raw.pop("questions")]
    study = Study(**raw, questions=questions)
    _check(study, study_dir)
    return study


def _check(study: Study, study_dir: Path) -> None:
    if study.baseline not in study.models:
        raise ValueError(f"The manifest's baseline {study.baseline!r} is not one of its models {sorted(study.models)}.")
    ids = [q.id for q in study.questions]
    if not ids or len(set(ids)) != len(ids) or not all(_QUESTION_ID.fullmatch(i) for i in ids):
        raise ValueError("The manifest needs at least one question, with unique ids of the form q000.")
    for q in study.questions:
        keys = [p.key for p in q.panels]
        if len(keys) < 2 or len(set(keys)) != len(keys) or not all(_PANEL_KEY.fullmatch(k) for k in keys):
            raise ValueError(f"Question {q.id} needs two or more panels with unique letters A-Z, has {keys}.")
        if sorted(p.model for p in q.panels) != sorted(study.models):
            raise ValueError(f"Question {q.id} must show each model once; it shows {[p.model for p in q.panels]}.")
        for name in [q.image] + [p.image for p in q.panels]:
            if not (study_dir / IMAGES / name).is_file():
                raise ValueError(f"Question {q.id}: image {study_dir / IMAGES / name} is missing; rebuild the study.")
