"""The annotation store: one SQLite file, one row per answer, each written in its own transaction.

The database runs in WAL mode with ``synchronous=FULL``, so an answer is on disk once the request that sent
it has returned: a server killed afterwards loses nothing already answered. Undo marks an annotator's last
answer as undone (the row stays, so the log is complete); the item then comes back as their next one.

Tables::

    meta(key, value)        the study the database belongs to (kind and options, JSON)
    answers(id, annotator, item, round, answer, shown, seconds, answered_at, undone)
"""
import json
import sqlite3
import threading
import time

__all__ = ['AnnotationStore', 'Answer']

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    annotator TEXT NOT NULL,
    item TEXT NOT NULL,
    round INTEGER NOT NULL,
    answer TEXT NOT NULL,
    shown TEXT NOT NULL,
    seconds REAL,
    answered_at REAL NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS answers_by_annotator ON answers (annotator, undone, round);
"""


class Answer(dict):
    """One answer row: ``id, annotator, item, round, answer (dict), shown (dict), seconds, answered_at``."""

    __getattr__ = dict.__getitem__


class AnnotationStore:
    """SQLite store of the answers of one study.

    Args:
        path (str): Database file (created when missing).
    """

    def __init__(self, path):
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute('PRAGMA journal_mode=WAL')
            self._db.execute('PRAGMA synchronous=FULL')
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ValueError(f'{self.path} is not an annotation database ({err}); pass another --db.') from err

    def close(self):
        with self._lock:
            self._db.close()

    # -- study -------------------------------------------------------------------------------------------
    def get_meta(self, key, default=None):
        row = self._db.execute('SELECT value FROM meta WHERE key = ?', (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key, value):
        with self._lock:
            self._db.execute('BEGIN IMMEDIATE')
            self._db.execute('INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)', (key, json.dumps(value)))
            self._db.execute('COMMIT')

    # -- answers -----------------------------------------------------------------------------------------
    def add_answer(self, annotator, item, round_index, answer, shown=None, seconds=None):
        """Write one answer in its own transaction and return its row id."""
        with self._lock:
            self._db.execute('BEGIN IMMEDIATE')
            try:
                cursor = self._db.execute(
                    'INSERT INTO answers (annotator, item, round, answer, shown, seconds, answered_at) '
                    'VALUES (?, ?, ?, ?, ?, ?, ?)',
                    (annotator, item, int(round_index), json.dumps(answer), json.dumps(shown or {}),
                     None if seconds is None else float(seconds), time.time()))
                self._db.execute('COMMIT')
            except BaseException:
                self._db.execute('ROLLBACK')
                raise
            return cursor.lastrowid

    def undo_last(self, annotator):
        """Mark the annotator's last answer undone; returns it, or None when there is none."""
        with self._lock:
            self._db.execute('BEGIN IMMEDIATE')
            row = self._db.execute('SELECT * FROM answers WHERE annotator = ? AND undone = 0 ORDER BY id DESC '
                                   'LIMIT 1', (annotator,)).fetchone()
            if row is not None:
                self._db.execute('UPDATE answers SET undone = 1 WHERE id = ?', (row[0],))
            self._db.execute('COMMIT')
        return None if row is None else self._answer(row)

    @staticmethod
    def _answer(row):
        return Answer(id=row[0], annotator=row[1], item=row[2], round=row[3], answer=json.loads(row[4]),
                      shown=json.loads(row[5]), seconds=row[6], answered_at=row[7])

    def answers(self, annotator=None):
        """The answers in force (not undone), oldest first; of one annotator when given.

        When an annotator answered an item twice in one round (possible from two browser tabs), the
        later answer counts.
        """
        query, args = 'SELECT * FROM answers WHERE undone = 0', ()
        if annotator is not None:
            query, args = query + ' AND annotator = ?', (annotator,)
        latest = {}
        for row in self._db.execute(query + ' ORDER BY id', args):
            answer = self._answer(row)
            latest[(answer.annotator, answer.item, answer.round)] = answer
        return sorted(latest.values(), key=lambda a: a.id)

    def annotators(self):
        return [row[0] for row in self._db.execute('SELECT DISTINCT annotator FROM answers ORDER BY annotator')]
