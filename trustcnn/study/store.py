"""The answers of a study, in SQLite: one row per participant, one row per (participant, question).

Each write is its own transaction, committed before the server answers, so an answer the participant saw
accepted is on disk. An answer to a question the participant has answered before replaces it (the
primary key is ``(participant, question)``), so a resubmitted form, a double click or an answer changed on
the way back is stored once. Participants are known by a random token (their browser's cookie); analyses
see only their row number.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from trustcnn.study.manifest import BACKGROUND, BACKGROUND_ANSWERS

TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL UNIQUE,
    {", ".join(f"{k} TEXT NOT NULL CHECK ({k} IN {BACKGROUND_ANSWERS})" for k in BACKGROUND)},
    started_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    participant_id INTEGER NOT NULL REFERENCES participants(id),
    question_id TEXT NOT NULL,
    choice TEXT NOT NULL,
    answered_at TEXT NOT NULL,
    PRIMARY KEY (participant_id, question_id)
);
"""


@dataclass(frozen=True)
class Participant:
    id: int
    background: dict[str, str]


@dataclass(frozen=True)
class Answer:
    participant_id: int
    question_id: str
    choice: str
    answered_at: str


def manifest_digest(manifest_text: str) -> str:
    return hashlib.sha256(manifest_text.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AnswerStore:
    """The answers database at ``path``, tied to one manifest by its digest.

    ``readonly=True`` (for analyses, also while the server runs) never creates or changes the file.
    A database made for another manifest is refused: its answers would name other questions.
    """

    def __init__(self, path: str | Path, digest: str, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path} does not exist: nobody has answered yet. Serve the study with "
                                        "`python -m trustcnn.study serve <study dir>` first.")
        else:
            with closing(self._connect()) as db, db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('manifest_sha256', ?)", (digest,))
        with closing(self._connect()) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'manifest_sha256'").fetchone()
        if row is None or row[0] != digest:
            raise ValueError(f"{self.path} holds answers to another version of this study's manifest.json; keep "
                             "the manifest the answers were given to, or pass another --db.")

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        else:
            db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def participant(self, token: str | None) -> Participant | None:
        """The participant of a browser's token, or ``None`` (no token, a malformed one, or unknown)."""
        if not token or not TOKEN.fullmatch(token):
            return None
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT id, {', '.join(BACKGROUND)} FROM participants WHERE token = ?",
                             (token,)).fetchone()
        return None if row is None else Participant(row[0], dict(zip(BACKGROUND, row[1:])))

    def add_participant(self, token: str, background: dict[str, str]) -> Participant:
        """Register the browser's token with its background answers; a token registered before keeps its
        first answers (a resubmitted background form makes no second participant)."""
        if not TOKEN.fullmatch(token):
            raise ValueError("malformed participant token")
        values = [background[k] for k in BACKGROUND]
        with closing(self._connect()) as db, db:
            db.execute(f"INSERT INTO participants (token, {', '.join(BACKGROUND)}, started_at) "
                       f"VALUES (?, {', '.join('?' for _ in BACKGROUND)}, ?) ON CONFLICT(token) DO NOTHING",
                       (token, *values, _now()))
        found = self.participant(token)
        assert found is not None
        return found

    def save_answer(self, participant_id: int, question_id: str, choice: str) -> None:
        """Store the participant's answer to the question, replacing an earlier one."""
        with closing(self._connect()) as db, db:
            db.execute("INSERT INTO answers (participant_id, question_id, choice, answered_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(participant_id, question_id) DO UPDATE SET choice = excluded.choice, "
                       "answered_at = excluded.answered_at", (participant_id, question_id, choice, _now()))

    def answers_of(self, participant_id: int) -> dict[str, str]:
        """``{question id: choice}`` of one participant."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT question_id, choice FROM answers WHERE participant_id = ?",
                              (participant_id,)).fetchall()
        return dict(rows)

    def participants(self) -> list[Participant]:
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT id, {', '.join(BACKGROUND)} FROM participants ORDER BY id").fetchall()
        return [Participant(r[0], dict(zip(BACKGROUND, r[1:]))) for r in rows]

    def answers(self) -> list[Answer]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT participant_id, question_id, choice, answered_at FROM answers "
                              "ORDER BY participant_id, question_id").fetchall()
        return [Answer(*r) for r in rows]
