"""``python -m trustcnn.study serve``: the study as a local web app (Flask, served by waitress).

A participant's browser gets a random token in a cookie on its first visit; the background form registers
it, so one browser is one participant however often it reloads or resubmits. Questions come in an order
of the participant's own (seeded by the study's seed and the participant's number, so a reload shows the
same order), each with the test image, one panel per model in the manifest's order, and the options
"Can't distinguish" and "They look the same". A question page shows the participant's own earlier answer,
and ``/`` leads to the first unanswered question, so a study can be left and taken up again in the same
browser.

What a browser can reach: the pages, the study's PNGs (by name, from ``images/`` only) and the style
sheet. The manifest (which model made which panel) and the answers database are never served, and no page
shows any answer but the participant's own. The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Callable

import numpy as np
from flask import Flask, Response, abort, make_response, redirect, render_template, request, send_from_directory
from werkzeug.wrappers import Response as BaseResponse

from trustcnn.study.manifest import (
    ANSWERS_DB,
    BACKGROUND,
    BACKGROUND_ANSWERS,
    IMAGES,
    MANIFEST,
    OTHER_CHOICES,
    Question,
    load_study,
)
from trustcnn.study.store import TOKEN, AnswerStore, Participant, manifest_digest

COOKIE = "trustcnn_study"
COOKIE_MAX_AGE = 365 * 24 * 3600
_IMAGE_NAME = re.compile(r"q\d{3,}(_[A-Z])?\.png")


def question_order(seed: int, participant_id: int, questions: int) -> list[int]:
    """The order in which one participant sees the questions (indices into the manifest's list)."""
    return np.random.default_rng([seed, participant_id]).permutation(questions).tolist()


def create_app(study_dir: str | Path, db_path: str | Path | None = None) -> Flask:
    """The Flask app of the study in ``study_dir``; answers go to ``db_path`` (default ``<study_dir>/answers.sqlite``)."""
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    store = AnswerStore(db_path or study_dir / ANSWERS_DB, manifest_digest((study_dir / MANIFEST).read_text()))
    images = (study_dir / IMAGES).resolve()
    total = len(study.questions)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # the forms hold a few short fields

    def participant() -> Participant | None:
        return store.participant(request.cookies.get(COOKIE))

    def order_of(who: Participant) -> list[Question]:
        return [study.questions[i] for i in question_order(study.seed, who.id, total)]

    def unanswered(who: Participant) -> list[int]:
        """The participant's positions (1-based) whose question has no answer yet."""
        answered = store.answers_of(who.id)
        return [pos for pos, q in enumerate(order_of(who), 1) if q.id not in answered]

    def next_page(who: Participant) -> BaseResponse:
        pending = unanswered(who)
        return redirect(f"/q/{pending[0]}" if pending else "/done", code=303)

    def page(template: str, status: int = 200, **context: object) -> Response:
        response = make_response(render_template(template, title=study.title, total=total, **context), status)
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'"
        return response

    @app.get("/")
    def index() -> BaseResponse:
        who = participant()
        if who is not None:
            return next_page(who)
        response = page("welcome.html", background=BACKGROUND, options=BACKGROUND_ANSWERS, given={}, error=None)
        token = request.cookies.get(COOKIE)
        if not token or not TOKEN.fullmatch(token):
            token = secrets.token_urlsafe(32)
        response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE, httponly=True, samesite="Lax")
        return response

    @app.post("/start")
    def start() -> BaseResponse:
        token = request.cookies.get(COOKIE)
        if not token or not TOKEN.fullmatch(token):
            return page("message.html", 400, heading="Cookies needed",
                        text="This study keeps your place with a cookie. Allow cookies for this site and open the "
                             "start page again.", link="/")
        given = {k: request.form.get(k, "") for k in BACKGROUND}
        missing = [BACKGROUND[k] for k, v in given.items() if v not in BACKGROUND_ANSWERS]
        if missing:
            return page("welcome.html", 400, background=BACKGROUND, options=BACKGROUND_ANSWERS, given=given,
                        error="Please answer every question: " + " ".join(missing))
        return next_page(store.add_participant(token, given))

    @app.get("/q/<int:pos>")
    def question(pos: int) -> BaseResponse:
        who = participant()
        if who is None:
            return redirect("/", code=303)
        if not 1 <= pos <= total:
            abort(404)
        q = order_of(who)[pos - 1]
        return page("question.html", pos=pos, q=q, saved=store.answers_of(who.id).get(q.id), error=None,
                    others=OTHER_CHOICES)

    @app.post("/q/<int:pos>")
    def answer(pos: int) -> BaseResponse:
        who = participant()
        if who is None:
            return redirect("/", code=303)
        if not 1 <= pos <= total:
            abort(404)
        q = order_of(who)[pos - 1]
        if request.form.get("question") != q.id:
            return page("message.html", 409, heading="This page is out of date",
                        text="The form did not belong to this question. Nothing was saved; open the question "
                             "again.", link=f"/q/{pos}")
        choice = request.form.get("choice", "")
        if choice not in q.choices():
            return page("question.html", 400, pos=pos, q=q, saved=None, others=OTHER_CHOICES,
                        error="Please choose one of the images, or one of the two options below them.")
        store.save_answer(who.id, q.id, choice)
        return redirect(f"/q/{pos + 1}" if pos < total else "/done", code=303)

    @app.get("/done")
    def done() -> BaseResponse:
        who = participant()
        if who is None:
            return redirect("/", code=303)
        missing = unanswered(who)
        return page("done.html", answered=total - len(missing), missing=missing)

    @app.get("/images/<name>")
    def image(name: str) -> BaseResponse:
        if not _IMAGE_NAME.fullmatch(name):
            abort(404)
        return send_from_directory(images, name, mimetype="image/png", max_age=3600)

    return app


def serve(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, db_path: str | Path | None = None,
          threads: int = 4, announce: Callable[[str], None] = print) -> None:
    """Serve the study with waitress until interrupted; ``port=0`` takes a free port. ``announce`` gets
    the address once the socket is bound."""
    from waitress import create_server

    server = create_server(create_app(study_dir, db_path), host=host, port=port, threads=threads)
    shown = f"[{server.effective_host}]" if ":" in str(server.effective_host) else server.effective_host
    announce(f"Serving the study at http://{shown}:{server.effective_port}/ (Ctrl-C stops it)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"Listening on {host}: anyone who can reach this machine can take part. Put a TLS proxy in front "
                 "of it for a study over the internet.")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
