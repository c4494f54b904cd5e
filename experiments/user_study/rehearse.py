"""A rehearsal of a study with scripted participants: not people, and not evidence about any model.

It serves the study with the real ``python -m trustcnn.study serve`` (answers in ``--db``, by default
``<study>/rehearsal.sqlite``, apart from real participants' answers) and sends scripted participants through
the same pages and forms a browser uses, over HTTP with their own cookies. Each answers every question:
"Can't distinguish" with probability 0.1, "They look the same" with 0.15, otherwise the map with the highest
energy pointing game (read from the manifest, which no real participant sees) with probability ``follow``
(0.8 for participants who say they have computer-vision experience, 0.5 for the others), else a map drawn
at random. ``--screenshot`` saves the first question page as headless Chromium shows it (needs selenium and
Debian's chromium and chromium-driver).

    python experiments/user_study/rehearse.py <study dir> --participants 12 --screenshot question_page.png
    python -m trustcnn.study analyze <study dir> --db <study dir>/rehearsal.sqlite
"""

from __future__ import annotations

import argparse
import http.cookiejar
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from trustcnn.study.manifest import BACKGROUND, CANT_DISTINGUISH, LOOK_SAME, load_study


def take_part(url: str, study, rng: np.random.Generator) -> int:
    """One scripted participant, start to finish; returns the number of answers sent."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def post(path: str, form: dict[str, str]) -> str:
        with opener.open(url + path, data=urllib.parse.urlencode(form).encode()) as response:
            return response.read().decode()

    opener.open(url).read()
    background = {k: str(rng.choice(["yes", "no"])) for k in BACKGROUND}
    post("start", background)
    follow = 0.8 if background["cv_experience"] == "yes" else 0.5
    for pos in range(1, len(study.questions) + 1):
        with opener.open(f"{url}q/{pos}") as response:
            qid = re.search(r'name="question" value="(q\d+)"', response.read().decode()).group(1)
        question = study.question(qid)
        draw = rng.random()
        if draw < 0.1:
            choice = CANT_DISTINGUISH
        elif draw < 0.25:
            choice = LOOK_SAME
        elif rng.random() < follow:
            choice = max(question.panels, key=lambda p: p.energy_pointing_game or 0.0).key
        else:
            choice = str(rng.choice([p.key for p in question.panels]))
        post(f"q/{pos}", {"question": qid, "choice": choice})
    return len(study.questions)


def screenshot(url: str, path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,720"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(url)
        for key in BACKGROUND:
            driver.find_element(By.CSS_SELECTOR, f'input[name="{key}"][value="no"]').click()
        driver.find_element(By.ID, "start").click()
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path)
    p.add_argument("--participants", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", type=Path, help="answers database (default <study>/rehearsal.sqlite)")
    p.add_argument("--screenshot", type=Path, help="save the first question page as a PNG here")
    args = p.parse_args()
    study = load_study(args.study)
    db = args.db or args.study / "rehearsal.sqlite"
    server = subprocess.Popen([sys.executable, "-m", "trustcnn.study", "serve", str(args.study), "--port", "0",
                               "--db", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/", server.stdout.readline()).group(0)
        rng = np.random.default_rng(args.seed)
        answers = sum(take_part(url, study, rng) for _ in range(args.participants))
        print(f"{args.participants} scripted participants sent {answers} answers to {db}")
        if args.screenshot:
            screenshot(url, args.screenshot)
            print(f"question page: {args.screenshot}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
