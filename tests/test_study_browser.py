"""End to end, in a real headless browser: the system Chromium, driven by Selenium, takes the study served by the
real `python -m trustcnn.study serve` as two participants, with a reload mid-way, and the analysis of the real
`python -m trustcnn.study analyze` is checked against the clicks made.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the tests are skipped,
except under CI (`CI=true`), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from trustcnn.study.manifest import BACKGROUND, CANT_DISTINGUISH, LOOK_SAME, load_study
from trustcnn.study.store import AnswerStore, manifest_digest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _need_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(study_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """The real server, with its default host, on a free port: ``(url, answers db, port)``."""
    db = tmp_path_factory.mktemp("browser") / "answers.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "trustcnn.study", "serve", str(study_dir), "--port", "0",
                             "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound
        match = re.search(r"http://\S+:(\d+)/", line)
        assert match, f"the server said {line!r} (exit status {proc.poll()})"
        yield match.group(0), db, int(match.group(1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(".".join(str(b) for b in words) if width == 8 else words.hex())
    return found


def test_the_server_listens_on_localhost_only_by_default(server: tuple[str, Path, int]) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads the socket table of Linux's /proc")
    _, _, port = server
    assert listening_addresses(port) == {"127.0.0.1"}


class Participant:
    """One browser (its own profile and cookies) taking the study; ``clicks`` holds its final answers."""

    def __init__(self, url: str, study, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                    f"--user-data-dir={profile}"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.url, self.study = url, study
        self.clicks: dict[str, str] = {}

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def wait_for(self, path: str) -> None:
        deadline = time.monotonic() + 20
        while not self.driver.current_url.endswith(path):
            assert time.monotonic() < deadline, f"expected {path}, at {self.driver.current_url}"
            time.sleep(0.05)

    def start(self, background: dict[str, str]) -> None:
        self.driver.get(self.url)
        for key, value in background.items():
            self.find(f'input[name="{key}"][value="{value}"]').click()
        self.find("#start").click()
        self.wait_for("/q/1")

    def question_id(self) -> str:
        return self.find('input[name="question"]').get_attribute("value")

    def answer(self, pos: int, wanted: str) -> str:
        """On question ``pos``, choose the map of model ``wanted`` (or one of the two other options) and go on."""
        self.wait_for(f"/q/{pos}")
        qid = self.question_id()
        assert f"Question {pos} of 6" in self.find(".progress").text
        question = self.study.question(qid)
        assert self.find("#class-name").text == question.label_name
        choice = wanted if wanted in (LOOK_SAME, CANT_DISTINGUISH) else \
            next(p.key for p in question.panels if p.model == wanted)
        self.find(f'input[name="choice"][value="{choice}"]').click()
        self.find("#next").click()
        self.clicks[qid] = choice
        return qid

    def checked(self) -> str | None:
        from selenium.webdriver.common.by import By

        boxes = [b for b in self.driver.find_elements(By.CSS_SELECTOR, 'input[name="choice"]') if b.is_selected()]
        return boxes[0].get_attribute("value") if boxes else None


def test_two_participants_take_the_study_in_a_browser(server, study_dir: Path, tmp_path: Path) -> None:
    _need_browser()
    url, db, _ = server
    study = load_study(study_dir)
    ce, trust, mask = study.models
    plans = {  # what each participant chooses on its questions 1..6
        "one": [trust, trust, LOOK_SAME, mask, CANT_DISTINGUISH, trust],
        "two": [trust, ce, ce, LOOK_SAME, mask, CANT_DISTINGUISH],
    }
    backgrounds = {"one": {k: "yes" for k in BACKGROUND}, "two": {"cs_degree": "no", "saliency_familiar": "no",
                                                                 "cv_experience": "yes"}}
    one = Participant(url, study, tmp_path / "one")
    two = Participant(url, study, tmp_path / "two")
    try:
        one.start(backgrounds["one"])
        for pos in (1, 2, 3):
            one.answer(pos, plans["one"][pos - 1])
        one.wait_for("/q/4")
        # the second participant starts while the first is mid-way
        two.start(backgrounds["two"])
        for pos in (1, 2, 3):
            two.answer(pos, plans["two"][pos - 1])

        # a choice made but not sent, then a reload: the saved answers stay, the unsent one is not saved
        qid4 = one.question_id()
        one.find('input[name="choice"][value="A"]').click()
        one.driver.refresh()
        one.wait_for("/q/4")
        one.driver.get(url)  # the start page leads back to the first unanswered question
        one.wait_for("/q/4")
        assert one.question_id() == qid4 and one.checked() is None
        one.find("#back").click()
        one.wait_for("/q/3")
        assert one.checked() == one.clicks[one.question_id()]
        # sending an answered question again (here: the same answer) keeps one answer
        one.answer(3, plans["one"][2])
        for pos in (4, 5, 6):
            one.answer(pos, plans["one"][pos - 1])
        one.wait_for("/done")
        assert "all 6 answers are saved" in one.find("#status").text

        two.driver.refresh()  # a reload on the second participant's own page
        for pos in (4, 5, 6):
            two.answer(pos, plans["two"][pos - 1])
        two.wait_for("/done")
        # the pages showed each participant their own answers only
        two.driver.get(f"{url}q/1")
        assert two.checked() == two.clicks[two.question_id()]
    finally:
        one.driver.quit()
        two.driver.quit()

    # the database holds exactly the clicks, once each
    store = AnswerStore(db, manifest_digest((study_dir / "manifest.json").read_text()), readonly=True)
    participants = store.participants()
    assert [p.background for p in participants] == [backgrounds["one"], backgrounds["two"]]
    stored = {(a.participant_id, a.question_id): a.choice for a in store.answers()}
    assert len(store.answers()) == 12
    assert stored == {**{(1, q): c for q, c in one.clicks.items()}, **{(2, q): c for q, c in two.clicks.items()}}

    out = tmp_path / "analysis"
    analyzed = subprocess.run([sys.executable, "-m", "trustcnn.study", "analyze", str(study_dir), "--db", str(db),
                               "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert analyzed.returncode == 0, analyzed.stderr
    assert "# User study" in analyzed.stdout
    result = json.loads((out / "analysis.json").read_text())
    assert (out / "analysis.png").stat().st_size > 0

    # the analysis, recomputed from the clicks
    votes: dict[str, Counter] = {q.id: Counter() for q in study.questions}
    for who in (one, two):
        for qid, choice in who.clicks.items():
            votes[qid][choice] += 1
    expected_cases = {m: Counter() for m in study.models}
    for q in study.questions:
        support = {p.model: votes[q.id][p.key] + votes[q.id][LOOK_SAME] for p in q.panels}
        top = max(*support.values(), votes[q.id][CANT_DISTINGUISH])
        accurate = sorted(m for m, n in support.items() if n and n == top)
        assert result["accurate"][q.id] == accurate
        for p in q.panels:
            acc = p.model in accurate
            expected_cases[p.model][1 if p.correct and acc else 2 if acc else 3 if p.correct else 4] += 1
    for m in study.models:
        table = result["case_table"][m]
        assert [table[f"case{c}_count"] for c in range(1, 5)] == [expected_cases[m][c] for c in range(1, 5)]
        assert table["total"] == 6 and table["skipped"] == 0
    chosen = Counter()
    for who in (one, two):
        for qid, choice in who.clicks.items():
            panel = study.question(qid).panel(choice)
            chosen.update([panel.model] if panel else [choice] + (list(study.models) if choice == LOOK_SAME else []))
    for option in [*study.models, CANT_DISTINGUISH, LOOK_SAME]:
        assert result["votes"][option]["value"] == pytest.approx(chosen[option] / 12), option
    assert result["study"]["participants"] == 2 and result["study"]["answers"] == 12
    yes_group = result["background"]["cs_degree"]["yes"]
    assert yes_group["participants"] == 1 and yes_group["answers"] == 6
    assert result["background"]["cv_experience"]["yes"]["answers"] == 12
