"""`trustcnn.study`: the study directory `build` writes, the app's rules (through Flask's test client) and the
analysis (against hand counts and the `krippendorff` package). The browser run is in test_study_browser.py."""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import krippendorff
import numpy as np
import pytest
import torch
from conftest import STUDY_MODELS
from PIL import Image

from trustcnn.study.__main__ import main as study_main
from trustcnn.study.analyze import (
    accurate_models,
    agreement,
    analyze_study,
    krippendorff_alpha_nominal,
    tally,
)
from trustcnn.study.app import COOKIE, create_app, question_order
from trustcnn.study.build import render_panels, sample_questions
from trustcnn.study.manifest import BACKGROUND, CANT_DISTINGUISH, LOOK_SAME, Panel, Question, load_study
from trustcnn.study.store import Answer, AnswerStore, manifest_digest

YES = {k: "yes" for k in BACKGROUND}


# ---- build ------------------------------------------------------------------------------------------------


def test_manifest_of_built_study(study_dir: Path) -> None:
    study = load_study(study_dir)
    assert list(study.models) == list(STUDY_MODELS) and study.baseline == "baseline_ce"
    assert len(study.questions) == 6 and study.has_masks
    assert len({q.test_index for q in study.questions}) == 6
    orders = {tuple(p.model for p in q.panels) for q in study.questions}
    assert len(orders) > 1, "the panel order is randomized per question"
    for q in study.questions:
        assert [p.key for p in q.panels] == ["A", "B", "C"]
        for p in q.panels:
            assert p.image == f"{q.id}_{p.key}.png"  # file names say nothing of the model
            assert p.correct == (p.prediction == q.label)
            assert 0 <= p.energy_pointing_game <= 1
        for name in [q.image] + [p.image for p in q.panels]:
            with Image.open(study_dir / "images" / name) as im:
                assert im.size == (96, 96) and im.mode == "RGB"


def test_build_is_seeded_and_refuses_a_used_directory(study_dir: Path, tmp_path: Path) -> None:
    indices, orders = sample_questions(100, 6, 3, seed=3)
    again = sample_questions(100, 6, 3, seed=3)
    assert np.array_equal(indices, again[0]) and np.array_equal(orders, again[1])
    assert len(set(indices.tolist())) == 6 and all(sorted(o) == [0, 1, 2] for o in orders.tolist())
    assert not np.array_equal(indices, sample_questions(100, 6, 3, seed=4)[0])
    study = load_study(study_dir)
    test_size = study.data["test_set_size"]
    expected, expected_orders = sample_questions(test_size, 6, 3, seed=3)
    assert [q.test_index for q in study.questions] == expected.tolist()
    assert [[list(study.models)[m] for m in o] for o in expected_orders.tolist()] == \
        [[p.model for p in q.panels] for q in study.questions]
    with pytest.raises(ValueError, match="more than the 100 images"):
        sample_questions(100, 101, 3, seed=0)
    runs = [study.models[n]["run_dir"] for n in study.models]
    with pytest.raises(SystemExit) as err:
        study_main(["build", "--baseline", runs[0], "--runs", *runs[1:], "--out", str(study_dir)])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        study_main(["build", "--baseline", runs[0], "--runs", runs[0], "--out", str(tmp_path / "same")])


def test_panels_share_one_colour_scale() -> None:
    """A map's own scale does not change its picture: every map is drawn on [0, 1] relative to its peak,
    with the same colours, so a model with larger raw values does not look hotter."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    m = torch.rand(2, 4, 4)
    pictures, panels = render_panels(images, {"small": m, "large": 7.5 * m}, (16, 16))
    assert pictures.shape == (2, 16, 16, 3) and pictures.dtype == np.uint8
    assert np.array_equal(panels["small"], panels["large"])
    flat = {"flat": torch.ones(1, 4, 4)}
    hot = render_panels(torch.zeros(1, 3, 8, 8), flat, (8, 8))[1]["flat"]
    # an all-peak map over a black image: half of jet's top colour (dark red) everywhere
    assert np.all(np.abs(hot.astype(int) - np.array([64, 0, 0])) <= 1)


# ---- the app ---------------------------------------------------------------------------------------------


@pytest.fixture
def app(study_dir: Path, tmp_path: Path):
    return create_app(study_dir, tmp_path / "answers.sqlite")


def start(client, background: dict[str, str] | None = None):
    client.get("/")
    return client.post("/start", data=background or YES)


def current_question(client, pos: int) -> tuple[str, str]:
    """(question id, page html) of the participant's question at ``pos``."""
    page = client.get(f"/q/{pos}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    return re.search(r'name="question" value="(q\d+)"', html).group(1), html


def rows(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "answers.sqlite") as db:
        return db.execute(sql).fetchall()


def test_background_is_required_and_registers_one_participant_per_browser(app, tmp_path: Path) -> None:
    client = app.test_client()
    welcome = client.get("/")
    assert welcome.status_code == 200 and "Bachelor" in welcome.get_data(as_text=True)
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None and cookie.http_only and cookie.same_site == "Lax"
    bad = client.post("/start", data={**YES, "cv_experience": "maybe"})
    assert bad.status_code == 400 and "Please answer every question" in bad.get_data(as_text=True)
    missing = client.post("/start", data={"cs_degree": "yes"})
    assert missing.status_code == 400
    assert rows(tmp_path, "SELECT COUNT(*) FROM participants") == [(0,)]
    first = client.post("/start", data={"cs_degree": "no", "saliency_familiar": "yes", "cv_experience": "no"})
    assert first.status_code == 303 and first.headers["Location"] == "/q/1"
    again = client.post("/start", data=YES)  # a resubmitted or repeated background form
    assert again.status_code == 303
    assert rows(tmp_path, "SELECT cs_degree, saliency_familiar, cv_experience FROM participants") == [("no", "yes", "no")]
    no_cookie = app.test_client().post("/start", data=YES)
    assert no_cookie.status_code == 400 and "Cookies needed" in no_cookie.get_data(as_text=True)
    assert rows(tmp_path, "SELECT COUNT(*) FROM participants") == [(1,)]


def test_answers_are_validated(app, study_dir: Path, tmp_path: Path) -> None:
    client = app.test_client()
    assert client.get("/q/1").headers["Location"] == "/"  # no participant yet
    start(client)
    qid, html = current_question(client, 1)
    for form, status in [({"question": qid, "choice": "Z"}, 400), ({"question": qid}, 400),
                         ({"question": qid, "choice": "A' OR 1=1"}, 400), ({"question": "q999", "choice": "A"}, 409)]:
        assert client.post("/q/1", data=form).status_code == status
    assert client.get("/q/0").status_code == 404 and client.get("/q/7").status_code == 404
    assert client.post("/q/7", data={"question": qid, "choice": "A"}).status_code == 404
    assert client.post("/q/1", data={"question": qid, "choice": "x" * 20_000}).status_code == 413
    assert rows(tmp_path, "SELECT COUNT(*) FROM answers") == [(0,)]
    assert client.post("/q/1", data={"question": qid, "choice": LOOK_SAME}).headers["Location"] == "/q/2"


def test_a_resubmitted_answer_is_stored_once(app, tmp_path: Path) -> None:
    client = app.test_client()
    start(client)
    qid, _ = current_question(client, 1)
    for choice in ("B", "B", CANT_DISTINGUISH):  # a double click, then a changed mind
        assert client.post("/q/1", data={"question": qid, "choice": choice}).status_code == 303
    assert rows(tmp_path, "SELECT participant_id, question_id, choice FROM answers") == [(1, qid, CANT_DISTINGUISH)]
    _, html = current_question(client, 1)
    assert re.search(rf'value="{CANT_DISTINGUISH}" required checked', html)
    assert client.get("/").headers["Location"] == "/q/2"  # resumes at the first unanswered question


def test_no_participant_can_read_another_ones_answers(app, study_dir: Path) -> None:
    one, two = app.test_client(), app.test_client()
    start(one)
    start(two)
    order_one = [current_question(one, p)[0] for p in range(1, 7)]
    order_two = [current_question(two, p)[0] for p in range(1, 7)]
    assert sorted(order_one) == sorted(order_two) and order_one != order_two  # each has an order of their own
    for pos, qid in enumerate(order_one, 1):
        assert one.post(f"/q/{pos}", data={"question": qid, "choice": "A"}).status_code == 303
    assert "all 6 answers are saved" in one.get("/done").get_data(as_text=True)
    for pos in range(1, 7):
        html = current_question(two, pos)[1]
        assert "checked" not in html
    assert "answered 0 of 6" in two.get("/done").get_data(as_text=True)
    # a guessed, well-formed token is a new browser, not a way into someone's answers
    stranger = app.test_client()
    stranger.set_cookie(COOKIE, "A" * 43)
    assert stranger.get("/q/1").headers["Location"] == "/"
    assert "Bachelor" in stranger.get("/").get_data(as_text=True)
    # nothing but the pictures and the style sheet is served from the study directory
    for path in ["/manifest.json", "/answers.sqlite", "/images/manifest.json", "/images/..%2Fmanifest.json",
                 "/images/../manifest.json", "/static/../manifest.json", "/images/q000_A.png.json", "/admin"]:
        assert two.get(path).status_code == 404, path
    served = [two.get("/").get_data(as_text=True)] + [current_question(two, p)[1] for p in range(1, 7)]
    study = load_study(study_dir)
    for html in served:
        for secret in [*study.models, "run_dir", "energy_pointing_game", "prediction"]:
            assert secret not in html
    assert two.get("/images/q000_A.png").status_code == 200


def test_question_order_is_stable_per_participant() -> None:
    assert question_order(3, 1, 6) == question_order(3, 1, 6)
    assert sorted(question_order(3, 2, 6)) == list(range(6))
    assert question_order(3, 1, 6) != question_order(3, 2, 6)


def test_a_database_of_another_manifest_is_refused(study_dir: Path, tmp_path: Path) -> None:
    AnswerStore(tmp_path / "a.sqlite", manifest_digest("another manifest"))
    with pytest.raises(ValueError, match="another version"):
        create_app(study_dir, tmp_path / "a.sqlite")
    with pytest.raises(FileNotFoundError, match="nobody has answered"):
        analyze_study(study_dir, db_path=tmp_path / "none.sqlite")


# ---- the analysis ----------------------------------------------------------------------------------------


QUESTION = Question(id="q000", test_index=0, label=1, label_name="1", image="q000.png", panels=[
    Panel("A", "q000_A.png", "m1", 1, "1", True), Panel("B", "q000_B.png", "m2", 2, "2", False),
    Panel("C", "q000_C.png", "m3", 1, "1", True)])


@pytest.mark.parametrize("votes, accurate", [
    ({"A": 2, "B": 1}, {"m1"}),
    ({"A": 1, "B": 1}, {"m1", "m2"}),                     # a tie shares the plurality
    ({LOOK_SAME: 2, "A": 1}, {"m1"}),                     # "same" counts for every map: 3 vs 2 vs 2
    ({LOOK_SAME: 2}, {"m1", "m2", "m3"}),
    ({CANT_DISTINGUISH: 2, "A": 1}, set()),               # "can't distinguish" counts for none, and wins here
    ({CANT_DISTINGUISH: 1, "A": 1}, {"m1"}),
    ({CANT_DISTINGUISH: 1, LOOK_SAME: 1}, {"m1", "m2", "m3"}),
    ({}, set()),
])
def test_plurality_rule(votes: dict[str, int], accurate: set[str]) -> None:
    assert accurate_models(QUESTION, Counter(votes)) == accurate


def test_krippendorff_alpha_matches_the_krippendorff_package() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        raters, units, categories = rng.integers(2, 7), rng.integers(3, 15), rng.integers(2, 5)
        data = rng.integers(0, categories, size=(raters, units)).astype(float)
        if trial % 2:  # make one category common, so alpha is far from 0
            data[rng.random(data.shape) < 0.6] = 0
        data[rng.random(data.shape) < 0.3] = np.nan  # not every participant answers every question
        counts = np.stack([np.bincount(data[~np.isnan(data[:, u]), u].astype(int), minlength=categories)
                           for u in range(units)])
        if (counts.sum(axis=1) >= 2).sum() == 0 or len(np.unique(data[~np.isnan(data)])) < 2:
            continue
        expected = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
        assert krippendorff_alpha_nominal(counts) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(krippendorff_alpha_nominal(np.array([[2, 0], [3, 0]])))  # one category only: undefined


def fill(study_dir: Path, db: Path, votes: dict[tuple[int, str], str], backgrounds: dict[int, dict[str, str]]) -> None:
    """Participants (numbered 1, 2, ... in order) and their answers, written straight into the database."""
    store = AnswerStore(db, manifest_digest((study_dir / "manifest.json").read_text()))
    for pid, background in sorted(backgrounds.items()):
        assert store.add_participant(f"{pid:043d}", background).id == pid
    for (pid, qid), choice in votes.items():
        store.save_answer(pid, qid, choice)


def test_analysis_counts_by_hand(study_dir: Path, tmp_path: Path) -> None:
    study = load_study(study_dir)
    q = study.questions
    model_key = {qq.id: {p.model: p.key for p in qq.panels} for qq in q}
    ce, trust, mask = STUDY_MODELS
    votes = {
        # q0: trust 2, ce 1 -> trust accurate
        (1, q[0].id): model_key[q[0].id][trust], (2, q[0].id): model_key[q[0].id][trust],
        (3, q[0].id): model_key[q[0].id][ce],
        # q1: same 1, mask 1 -> mask 2, others 1 -> mask accurate
        (1, q[1].id): LOOK_SAME, (2, q[1].id): model_key[q[1].id][mask],
        # q2: can't 2, ce 1 -> nobody
        (1, q[2].id): CANT_DISTINGUISH, (2, q[2].id): CANT_DISTINGUISH, (3, q[2].id): model_key[q[2].id][ce],
        # q3: one vote for ce -> ce accurate; q4, q5: unanswered
        (3, q[3].id): model_key[q[3].id][ce],
    }
    backgrounds = {1: YES, 2: {**YES, "cs_degree": "no"}, 3: {k: "no" for k in BACKGROUND}}
    fill(study_dir, tmp_path / "a.sqlite", votes, backgrounds)
    study_main(["analyze", str(study_dir), "--db", str(tmp_path / "a.sqlite"), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert {f.name for f in (tmp_path / "out").iterdir()} == {"analysis.json", "analysis.md", "analysis.png",
                                                             "answers.csv"}
    assert result["accurate"] == {q[0].id: [trust], q[1].id: [mask], q[2].id: [], q[3].id: [ce]}
    correct = {m: {qq.id: next(p.correct for p in qq.panels if p.model == m) for qq in q} for m in study.models}
    accurate = {ce: {q[3].id}, trust: {q[0].id}, mask: {q[1].id}}
    for m in study.models:
        table = result["case_table"][m]
        expected = Counter()
        for qq in q[:4]:
            ok, acc = correct[m][qq.id], qq.id in accurate[m]
            expected[1 if ok and acc else 2 if acc else 3 if ok else 4] += 1
        assert [table[f"case{c}_count"] for c in range(1, 5)] == [expected[c] for c in range(1, 5)]
        assert table["total"] == 4 and table["skipped"] == 2
        assert table["case1_fraction"] == pytest.approx(expected[1] / 4)
    assert result["study"]["participants"] == 3 and result["study"]["answers"] == 9
    shares = result["votes"]
    assert shares[trust]["value"] == pytest.approx(3 / 9)  # two picks + one "same"
    assert shares[ce]["value"] == pytest.approx(4 / 9)     # three picks + one "same"
    assert shares[CANT_DISTINGUISH]["value"] == pytest.approx(2 / 9)
    cs_yes = result["background"]["cs_degree"]["yes"]
    assert cs_yes["participants"] == 1 and cs_yes["answers"] == 3
    assert cs_yes["shares"][LOOK_SAME]["value"] == pytest.approx(1 / 3)
    reliability = np.full((3, 6), np.nan)
    categories = list(study.models) + [CANT_DISTINGUISH, LOOK_SAME]
    for (pid, qid), choice in votes.items():
        qq = study.question(qid)
        panel = qq.panel(choice)
        reliability[pid - 1, int(qid[1:])] = categories.index(panel.model if panel else choice)
    assert result["agreement"]["krippendorff_alpha"]["value"] == pytest.approx(
        krippendorff.alpha(reliability_data=reliability, level_of_measurement="nominal"))
    assert result["agreement"]["questions_with_two_or_more_answers"] == 3
    # pairs of answers to one question: q0 3 pairs (1 agreeing), q1 1 (0), q2 3 (1)
    assert result["agreement"]["pairwise_agreement"] == pytest.approx(2 / 7)
    hits, scored, tied = 0, 0, 0
    for (_, qid), choice in votes.items():
        scores = {p.key: p.energy_pointing_game for p in study.question(qid).panels}
        if choice not in scores:
            continue
        if list(scores.values()).count(max(scores.values())) > 1:
            tied += 1
            continue
        scored += 1
        hits += scores[choice] == max(scores.values())
    assert scored + tied == 6
    assert result["pointing"]["rate"]["n"] == scored and result["pointing"]["left_out_answers"] == tied
    assert result["pointing"]["rate"]["value"] == pytest.approx(hits / scored)
    assert result["pointing"]["chance"] == pytest.approx(1 / 3)
    md = (tmp_path / "out" / "analysis.md").read_text()
    assert "| 1: correct prediction, accurate map |" in md and "answered / unanswered questions | 4 / 2" in md
    lines = (tmp_path / "out" / "answers.csv").read_text().splitlines()
    assert len(lines) == 10 and lines[0].startswith("participant,cs_degree,saliency_familiar,cv_experience,question")


def test_agreement_interval_and_tallies(study_dir: Path) -> None:
    study = load_study(study_dir)
    q = study.questions
    answers = [Answer(pid, q[i].id, c, "") for pid, (i, c) in enumerate(
        [(0, "A"), (0, "A"), (1, "B"), (1, "B"), (2, "A"), (2, "C"), (3, CANT_DISTINGUISH), (3, CANT_DISTINGUISH)])]
    counts = tally(study, answers)
    result = agreement(study, counts, bootstrap=200, seed=0)
    alpha = result["krippendorff_alpha"]
    assert alpha["ci_low"] <= alpha["value"] <= alpha["ci_high"] and alpha["n"] == 4
    assert result["pairwise_agreement"] == pytest.approx(3 / 4)
