"""The server's durable store: chat history and room state in one SQLite file (WAL mode).

What it stores: the lines of every room and private conversation (``StoredMessage``,
numbered by the caller), the rooms with their topics and owners, and who has joined
which room. The server keeps its live state in memory; this store only makes that state
survive a restart. Nothing here knows about sockets or the wire protocol.

What is encrypted: every message payload, with AES-256-GCM under the history key. The
associated data binds the row's stream and id, so a row altered or moved in the file
fails to decrypt and is skipped. Stream names, ids, sequence numbers, times, rooms,
topics, owners and memberships are stored in clear: the store queries and trims by them.

Threading: one writer thread owns the writing connection. ``append`` and the room-state
calls queue their work and return a ``Write``; the writer commits everything queued, in
order, one transaction per batch, as soon as it can (what queues while it commits is the
next batch). A batch that fails (a full disk) is not retried: each of its writes says why,
so whoever made the change can tell its author it was not saved, rather than have it
delivered now and lost at the next stop. Reads see what is committed, never a message that
may yet fail. They run on a small pool of other connections (WAL lets them proceed while
the writer writes), from any thread, and hold no lock while they query.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securechat.crypto_utils import AES_KEY_SIZE, NONCE_SIZE, CryptoError, load_or_create_secret

log = logging.getLogger("chat.history")

SCHEMA_VERSION = 3
#: How often, by the store's clock, rows older than the age limit are deleted; also the writer's longest idle sleep.
AGE_TRIM_INTERVAL = 60.0
#: How long a statement waits for another process's lock on the file before failing.
BUSY_TIMEOUT = 5.0
#: How long a read, or close(), waits for a connection of the read pool.
READ_POOL_TIMEOUT = 5.0
#: How long close() waits for what is queued to be written.
CLOSE_FLUSH_TIMEOUT = 2.0
#: Why a write was refused without being tried.
QUEUE_FULL = "too many changes waiting to be saved"
STORE_CLOSED = "the server is stopping"
WRITER_STOPPED = "the history writer has stopped"
#: The largest value SQLite stores in an INTEGER column.
MAX_SQL_INTEGER = 2**63 - 1

# Migration n takes a database from user_version n - 1 to n; append, never edit, an entry.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL,"
        " sent_at REAL NOT NULL, sealed BLOB NOT NULL)",
        "CREATE INDEX messages_by_stream ON messages (stream, id)",
        "CREATE INDEX messages_by_time ON messages (sent_at)",
        # Kept apart from messages so that trimming never lowers a stream's numbering.
        "CREATE TABLE streams (stream TEXT PRIMARY KEY, last_seq INTEGER NOT NULL)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "CREATE TABLE rooms (name TEXT PRIMARY KEY, topic TEXT NOT NULL, owner TEXT NOT NULL,"
        " created_at REAL NOT NULL)",
        # Rowid order is join order: a re-join gets a rowid above every existing one.
        "CREATE TABLE memberships (account TEXT NOT NULL, room TEXT NOT NULL, UNIQUE (account, room))",
    ),
    2: (
        # Room state beyond the topic (roles, modes, invites, bans, mutes: scope "#room") and an
        # account's own (its ignore list, when it was last online: scope "@account"), as keys
        # and text values: the shape a Redis hash per scope holds just as well.
        "CREATE TABLE state (scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (scope, key))",
    ),
    3: (
        # What the store knows of itself: "key_check", a constant sealed under the history key, so that
        # a start with another key (history_key lost, or restored from another backup) is refused.
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ),
}
#: What "key_check" seals (associated data: the name).
_KEY_CHECK = b"securechat history key"
#: What a start with the wrong key is told.
WRONG_KEY = (
    "its lines were sealed under another history key than history_key beside it: put that file back"
    " (from the backup the database came from), or move the database away to start with no history"
)

_INSERT_MESSAGE = "INSERT OR REPLACE INTO messages (id, stream, seq, sent_at, sealed) VALUES (?, ?, ?, ?, ?)"
_ADVANCE_STREAM = (
    "INSERT INTO streams (stream, last_seq) VALUES (?, ?)"
    " ON CONFLICT (stream) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)"
)
_ADVANCE_LAST_ID = (
    "INSERT INTO counters (name, value) VALUES ('last_id', ?)"
    " ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)"
)
# Deletes every row at or below the (history_limit + 1)-th newest id of the stream.
_TRIM_STREAM = (
    "DELETE FROM messages WHERE stream = ?"
    " AND id <= (SELECT id FROM messages WHERE stream = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
)
_TRIM_OLD = "DELETE FROM messages WHERE sent_at < ?"
_SELECT = "SELECT id, stream, seq, sent_at, sealed FROM messages"
_RECENT = f"{_SELECT} WHERE stream = ? ORDER BY id DESC LIMIT ?"
_BEFORE = f"{_SELECT} WHERE stream = ? AND id < ? ORDER BY id DESC LIMIT ?"
_SINCE = f"{_SELECT} WHERE stream = ? AND id > ? ORDER BY id DESC LIMIT ?"
_IDS_SINCE = "SELECT id FROM messages WHERE stream = ? AND id > ?"
_PRIVATE_SINCE = (
    f"{_SELECT} WHERE stream IN (SELECT stream FROM streams WHERE substr(stream, 1, 1) = '@'"
    " AND (substr(stream, 1, length(:prefix)) = :prefix OR substr(stream, -length(:suffix)) = :suffix))"
    " AND id > :after ORDER BY id DESC LIMIT :limit"
)


class StoreError(Exception):
    """The database cannot be opened or read; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One line of a stream, numbered by the caller; ``payload`` is opaque and encrypted at rest."""

    id: int
    stream: str
    seq: int
    sent_at: float
    payload: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.stream, str) or not self.stream:
            raise ValueError("a stored message needs a stream name")
        for name, number in (("id", self.id), ("seq", self.seq)):
            if not isinstance(number, int) or not 1 <= number <= MAX_SQL_INTEGER:
                raise ValueError(f"a stored message's {name} must be an integer from 1 to {MAX_SQL_INTEGER}")
        if not isinstance(self.sent_at, int | float):
            raise TypeError("sent_at must be a number")
        if not isinstance(self.payload, bytes):
            raise TypeError("payload must be bytes")


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A room as saved across restarts."""

    name: str
    topic: str = ""
    owner: str = ""
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if not all(isinstance(text, str) for text in (self.name, self.topic, self.owner)) or not self.name:
            raise TypeError("a room record's name, topic and owner are strings, and the name is not empty")
        if not isinstance(self.created_at, int | float):
            raise TypeError("created_at must be a number")


def private_stream(a: str, b: str) -> str:
    """The stream of the private conversation between accounts a and b: "@" + the two names sorted, joined by ":".

    The same for (a, b) and (b, a). Raises ``ValueError`` for an empty name or one containing ":".
    """
    for name in (a, b):
        if not name or ":" in name:
            raise ValueError(f"not an account name for a private stream: {name!r}")
    return "@" + ":".join(sorted((a, b)))


def load_or_create_history_key(path: Path, database: Path | None = None) -> bytes:
    """The 32-byte history key kept in ``path``, created (mode 0600) on first run.

    Raises ``CryptoError`` if the file is readable by others or does not hold exactly one key,
    or if it is missing beside an existing ``database``: that database's lines were sealed under
    the key, and a new one made there would sit where the real one must be put back (a restore
    that skips existing files would then keep the wrong one).
    """
    if database is not None and database.exists() and not os.path.lexists(path):
        raise CryptoError(
            f"{path} is missing: {database} was sealed under it; put it back from the backup the database came from"
        )
    key = load_or_create_secret(path, AES_KEY_SIZE)
    if len(key) != AES_KEY_SIZE:
        raise CryptoError(f"{path} holds {len(key)} bytes of secret; a history key is {AES_KEY_SIZE}")
    return key


class Write:
    """One queued change: ``wait`` says once it is committed (""), or why it was not saved.

    Its outcome is set once, by the store's writer (or at once, for a refused change), under
    the store's ``_uncommitted_changed``, which is how waiting works.
    """

    __slots__ = ("_store", "problem")

    def __init__(self, store: ChatStore, problem: str | None = None) -> None:
        self._store = store
        #: None while it waits for the writer; then "" (committed) or why not.
        self.problem = problem

    def wait(self, timeout: float | None = None) -> str | None:
        """ "" once committed, else why it was not saved; None if still waiting after ``timeout``."""
        condition = self._store._uncommitted_changed
        with condition:
            condition.wait_for(lambda: self.problem is not None, timeout)
            return self.problem


@dataclass(frozen=True, slots=True)
class _WriterAction:
    """Something to run on the writer's connection, between batches (a seam for tests)."""

    action: Callable[[sqlite3.Connection], object]


# A queued write: a message, statements of room state (SQL with parameters), or a writer action;
# each with the Write that tells its outcome.
_Statements = tuple[tuple[str, tuple[object, ...]], ...]
_Operation = tuple[StoredMessage | _Statements | _WriterAction, Write]


def _open_database(path: Path) -> sqlite3.Connection:
    """The writer's connection, with the schema created or migrated; never alters a file it refuses."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        _make_private(path)
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from exc
    try:
        # Made here, used only by the writer thread from its start on, closed after it is joined.
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(_problem_with(path, exc)) from exc
    try:
        # Checks come before the first write (the WAL switch writes the header): a refused file stays as it was.
        problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreError(f"{path}: the database is damaged ({problems[0]})")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {version} is newer than this server's ({SCHEMA_VERSION})")
        connection.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL cannot corrupt the file; a power cut may lose the last batches.
        connection.execute("PRAGMA synchronous = NORMAL")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                for statement in _MIGRATIONS[target]:
                    connection.execute(statement)
                # A pragma takes no bound parameters; target is our own integer.
                connection.execute(f"PRAGMA user_version = {target:d}")
        # A file the server may read but not write (a backup restored by root) would start, and then
        # refuse every line and every login: said now, in one line.
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('write_check', x'00')")
        finally:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
    except sqlite3.Error as exc:
        connection.close()
        if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
            raise StoreError(f"{path}: the server cannot write it ({exc}): make it the server's user's own") from exc
        raise StoreError(_problem_with(path, exc)) from exc
    except BaseException:
        connection.close()
        raise
    return connection


#: Below this much free space on its disk, a database that cannot be opened is said to be on a full disk.
FULL_DISK_BYTES = 1024 * 1024


def _problem_with(path: Path, exc: sqlite3.Error) -> str:
    """What went wrong with the database at ``path``, and that its disk is full where it is: SQLite says
    "disk I/O error" when it cannot make its -wal and -shm files, which sends one looking for a broken disk."""
    said = f"{path}: {exc}"
    try:
        if shutil.disk_usage(path.parent).free < FULL_DISK_BYTES:
            said += " (the disk it is on is full)"
    except OSError:
        pass
    return said


def _make_private(path: Path) -> None:
    """Make the database and its -wal and -shm files readable by their owner only, saying so: a backup
    restored with an operator's umask (0644) would show room names, who wrote to whom, and ban reasons."""
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(part.stat().st_mode)
            if mode & 0o077:
                part.chmod(mode & 0o700)
                log.warning("%s was readable by other users (mode %s); it is now private", part, oct(mode))
        except FileNotFoundError:
            continue
        except OSError as exc:  # another user's file, which the server may use all the same: said, not refused
            log.warning("%s is readable by other users, and cannot be made private: %s", part, exc.strerror or exc)


class ChatStore:
    """Chat history and room state in the SQLite file ``path``, payloads sealed under ``key``.

    Opening creates the file (mode 0600) or checks it, and raises ``StoreError`` for a file
    that is damaged, not a database, unreadable or of a newer schema; it never changes such
    a file. ``history_limit`` messages are kept per stream (0 turns history off), none older
    than ``history_max_age`` seconds; ``queue_size`` bounds the messages waiting for the
    writer, which gathers a batch for ``batch_interval`` seconds (0: commits at once; a
    writer that waits makes every change wait). Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        history_limit: int = 1000,
        history_max_age: float = 30 * 86400,
        queue_size: int = 10_000,
        batch_interval: float = 0.0,
        read_connections: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) != AES_KEY_SIZE:
            raise ValueError(f"the history key is {AES_KEY_SIZE} bytes, not {len(key)}")
        if history_limit < 0 or queue_size < 1 or read_connections < 1 or batch_interval < 0:
            raise ValueError("history_limit >= 0, queue_size >= 1, read_connections >= 1 and batch_interval >= 0")
        self.path = Path(path)
        self._aead = AESGCM(key)
        self._history_limit = history_limit
        self._history_max_age = history_max_age
        self._queue_size = queue_size
        self._batch_interval = batch_interval
        self._read_connection_count = read_connections
        self._clock = clock

        # Everything appended but not yet committed, and the writer's progress through it.
        self._uncommitted_lock = threading.Lock()
        # Signalled when work is queued, finished, requested by flush() or closing starts.
        self._uncommitted_changed = threading.Condition(self._uncommitted_lock)
        self._write_queue: deque[_Operation] = deque()  # not yet taken by the writer
        self._queued_messages = 0  # messages in _write_queue: what queue_size bounds
        self._operations_queued = 0
        self._operations_finished = 0  # the first this many queued operations are committed (or lost)
        self._flush_requests = 0  # each one cuts one wait of the writer short
        self._closing = False
        self._writer_stopped = False
        self._refused_in_burst = 0  # refused appends since the queue was last found full
        self._dropped = 0  # messages not saved: refused (a full queue) or their batch failed
        self._write_problem = ""  # why the last write failed; "" when the last one worked
        self._problem_since = 0.0

        # The numbering the caller continues from after a restart.
        self._numbering_lock = threading.Lock()
        self._last_id = 0
        self._last_seq: dict[str, int] = {}

        # Serializes close(), so that a second call returns only once the store is closed.
        self._close_lock = threading.Lock()
        self._closed = False

        self._read_pool: queue.Queue[sqlite3.Connection] = queue.Queue()
        self._write_connection = _open_database(self.path)
        try:
            self._load_numbering()
            for _ in range(read_connections):
                reader = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
                reader.execute("PRAGMA query_only = ON")
                self._read_pool.put(reader)
        except sqlite3.Error as exc:
            self._write_connection.close()
            while not self._read_pool.empty():
                self._read_pool.get_nowait().close()
            raise StoreError(_problem_with(self.path, exc)) from exc
        self._check_key()
        self._next_age_trim = self._clock()  # owned by the writer once it starts
        self._trim_by_age_at_start()
        # A daemon only so that a process dying without close() can still exit; close() always joins it.
        self._writer = threading.Thread(target=self._write_loop, name="history-writer", daemon=True)
        self._writer.start()

    def __enter__(self) -> ChatStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ numbering and health

    def last_id(self) -> int:
        """The largest message id stored or appended (0 if none); trimming never lowers it."""
        with self._numbering_lock:
            return self._last_id

    def last_seq(self, stream: str) -> int:
        """The largest seq ever stored or appended in ``stream`` (0 if none); trimming never lowers it."""
        with self._numbering_lock:
            return self._last_seq.get(stream, 0)

    @property
    def dropped_messages(self) -> int:
        """Messages refused because the queue was full, plus those lost while writes kept failing."""
        with self._uncommitted_lock:
            return self._dropped

    def health(self) -> str:
        """An empty string while history is being saved; else one line saying what is wrong, since when."""
        with self._uncommitted_lock:
            problem, since, dropped = self._write_problem, self._problem_since, self._dropped
            if self._writer_stopped and not self._closing:
                problem = problem or "the history writer has stopped"
        if not problem:
            return ""
        since_text = time.strftime("%H:%M", time.localtime(since))
        return f"history not saved since {since_text}: {problem} ({dropped} messages not saved, their senders told)"

    # ------------------------------------------------------------------ writing

    @property
    def keeps_history(self) -> bool:
        """False when ``history_limit`` is 0: ``append`` then stores nothing (and says it is done)."""
        return self._history_limit > 0

    def append(self, message: StoredMessage) -> Write:
        """Queue ``message`` to be stored; never blocks. Its ``Write`` is refused at once if the
        queue is full or the store closed."""
        if not isinstance(message, StoredMessage):
            raise TypeError("append takes a StoredMessage")
        accepted, accepted_after, refused_so_far = False, 0, 0
        write = Write(self)
        with self._uncommitted_changed:
            if self._closing or self._writer_stopped:
                return Write(self, STORE_CLOSED if self._closing else WRITER_STOPPED)
            if self._history_limit == 0:
                return Write(self, "")
            if self._queued_messages >= self._queue_size:
                self._dropped += 1
                self._refused_in_burst += 1
                refused_so_far = self._refused_in_burst
            else:
                accepted = True
                accepted_after, self._refused_in_burst = self._refused_in_burst, 0
                self._write_queue.append((message, write))
                self._queued_messages += 1
                self._operations_queued += 1
                # Wake the writer only when it waits for this: the first item (it sleeps on an empty
                # queue) or a full queue (it gathers a batch until then). A wake-up per message costs
                # a thread switch per line: 10-20 % more server CPU per delivery at N = 50.
                if len(self._write_queue) == 1 or self._queued_messages >= self._queue_size:
                    self._uncommitted_changed.notify_all()
        if not accepted:
            if refused_so_far == 1:  # once per burst, not per message
                log.warning("%s: history queue full (%d messages); refusing messages", self.path, self._queue_size)
            return Write(self, QUEUE_FULL)
        if accepted_after:
            log.warning("%s: history queue accepting again; %d messages were refused", self.path, accepted_after)
        with self._numbering_lock:
            self._last_id = max(self._last_id, message.id)
            self._last_seq[message.stream] = max(self._last_seq.get(message.stream, 0), message.seq)
        return write

    def save_room(self, record: RoomRecord) -> Write:
        """Queue saving ``record`` (insert or replace)."""
        return self._queue_statements(
            (
                "INSERT OR REPLACE INTO rooms (name, topic, owner, created_at) VALUES (?, ?, ?, ?)",
                (record.name, record.topic, record.owner, record.created_at),
            )
        )

    def delete_room(self, name: str) -> Write:
        """Queue deleting room ``name`` and every membership of it."""
        return self._queue_statements(
            ("DELETE FROM rooms WHERE name = ?", (name,)), ("DELETE FROM memberships WHERE room = ?", (name,))
        )

    def add_membership(self, account: str, room: str) -> Write:
        """Queue recording that ``account`` joined ``room``."""
        statement = "INSERT OR IGNORE INTO memberships (account, room) VALUES (?, ?)"
        return self._queue_statements((statement, (account, room)))

    def remove_membership(self, account: str, room: str) -> Write:
        """Queue recording that ``account`` left ``room``."""
        return self._queue_statements(("DELETE FROM memberships WHERE account = ? AND room = ?", (account, room)))

    def set_state(self, scope: str, key: str, value: str | None) -> Write:
        """Queue setting (or, with None, removing) one key of a scope's state."""
        if value is None:
            return self._queue_statements(("DELETE FROM state WHERE scope = ? AND key = ?", (scope, key)))
        statement = "INSERT OR REPLACE INTO state (scope, key, value) VALUES (?, ?, ?)"
        return self._queue_statements((statement, (scope, key, value)))

    def _run_on_writer(self, action: Callable[[sqlite3.Connection], object]) -> Write:
        """Queue ``action(connection)`` for the writer, in order (tests use it to fill the disk)."""
        return self._queue(_WriterAction(action))

    def _queue_statements(self, *statements: tuple[str, tuple[object, ...]]) -> Write:
        return self._queue(statements)

    def _queue(self, operation: _Statements | _WriterAction) -> Write:
        # Not counted against queue_size: room state is rare, and its author waits for it.
        write = Write(self)
        with self._uncommitted_changed:
            if self._closing or self._writer_stopped:
                return Write(self, STORE_CLOSED if self._closing else WRITER_STOPPED)
            self._write_queue.append((operation, write))
            self._operations_queued += 1
            self._uncommitted_changed.notify_all()
        return write

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is committed (True), or ``timeout`` seconds pass (False)."""
        with self._uncommitted_changed:
            target = self._operations_queued
            self._flush_requests += 1
            self._uncommitted_changed.notify_all()
            self._uncommitted_changed.wait_for(
                lambda: self._operations_finished >= target or self._writer_stopped, timeout
            )
            return self._operations_finished >= target

    def close(self) -> None:
        """Save what is queued (waiting a bounded time), stop the writer and close every connection.

        Idempotent; afterwards ``append`` returns False and reads raise ``StoreError``.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self.flush(CLOSE_FLUSH_TIMEOUT)
            with self._uncommitted_changed:
                self._closing = True
                self._uncommitted_changed.notify_all()
            self._writer.join()
            self._close_connections()

    def _close_connections(self) -> None:
        self._write_connection.close()
        for _ in range(self._read_connection_count):
            try:
                self._read_pool.get(timeout=READ_POOL_TIMEOUT).close()
            except queue.Empty:
                log.warning("%s: a read connection was not returned; leaving it open", self.path)
                break

    def _load_numbering(self) -> None:
        connection = self._write_connection
        (stored_last_id,) = connection.execute("SELECT value FROM counters WHERE name = 'last_id'").fetchone() or (0,)
        (largest_id,) = connection.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        self._last_id = max(stored_last_id, largest_id)
        self._last_seq = dict(connection.execute("SELECT stream, last_seq FROM streams").fetchall())

    def _check_key(self) -> None:
        """Refuse (``StoreError``) to open history sealed under another key; first, note the key's check."""
        connection = self._write_connection
        try:
            row = connection.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
            if row is None:  # a new database, or one made before the check: one of its newest lines must open
                newest = connection.execute(f"{_SELECT} ORDER BY id DESC LIMIT 20").fetchall()
                if newest and not any(
                    self._opens(stream, message_id, sealed) for message_id, stream, _, _, sealed in newest
                ):
                    raise StoreError(f"{self.path}: {WRONG_KEY}")
                nonce = os.urandom(NONCE_SIZE)
                check = nonce + self._aead.encrypt(nonce, _KEY_CHECK, b"key_check")
                connection.execute("INSERT INTO meta (name, value) VALUES ('key_check', ?)", (check,))
                return
            sealed = row[0]
            try:
                if self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], b"key_check") == _KEY_CHECK:
                    return
            except InvalidTag:
                pass
            raise StoreError(f"{self.path}: {WRONG_KEY}")
        except StoreError:
            self._close_connections_at_start()
            raise
        except sqlite3.Error as exc:
            self._close_connections_at_start()
            raise StoreError(f"{self.path}: {exc}") from exc

    def _opens(self, stream: str, message_id: int, sealed: bytes) -> bool:
        try:
            self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], self._associated_data(stream, message_id))
        except (InvalidTag, ValueError, TypeError):
            return False
        return True

    def _close_connections_at_start(self) -> None:
        self._write_connection.close()
        while not self._read_pool.empty():
            self._read_pool.get_nowait().close()

    def _trim_by_age_at_start(self) -> None:
        try:
            self._commit([], trim_by_age=True)
        except sqlite3.Error as exc:
            self._rollback()
            log.error("%s: could not delete old history: %s", self.path, exc)
        else:
            self._next_age_trim = self._clock() + AGE_TRIM_INTERVAL

    def _write_loop(self) -> None:
        flushes_seen = 0
        # Taken from the queue, and of it what is being written: settled even if a fault stops this thread.
        taken: list[_Operation] = []
        batch: list[tuple[StoredMessage | _Statements, Write]] = []

        def hurried() -> bool:
            return self._closing or self._flush_requests != flushes_seen

        try:
            while True:
                with self._uncommitted_changed:
                    self._uncommitted_changed.wait_for(lambda: hurried() or self._write_queue, AGE_TRIM_INTERVAL)
                    if self._write_queue and not hurried() and self._batch_interval:
                        self._uncommitted_changed.wait_for(
                            lambda: hurried() or self._queued_messages >= self._queue_size, self._batch_interval
                        )
                    closing, flushes_seen = self._closing, self._flush_requests
                    taken = list(self._write_queue)
                    self._write_queue.clear()
                    self._queued_messages = 0
                    taken_through = self._operations_queued
                for operation, write in taken:
                    if isinstance(operation, _WriterAction):
                        operation.action(self._write_connection)
                        self._settle([(operation, write)], "")
                    else:
                        batch.append((operation, write))
                trim_by_age = self._clock() >= self._next_age_trim
                problem = ""
                try:
                    if batch or trim_by_age:
                        self._commit([operation for operation, _ in batch], trim_by_age)
                except sqlite3.Error as exc:
                    self._rollback()
                    problem = str(exc)
                    self._note_failure(problem, batch)
                else:
                    if trim_by_age:
                        self._next_age_trim = self._clock() + AGE_TRIM_INTERVAL
                self._settle(batch, problem, taken_through)
                batch = []
                if closing:
                    break
        finally:
            with self._uncommitted_changed:
                self._writer_stopped = True
                # Whatever is still queued (close() came during a wait), or was being written when a fault
                # stopped this thread, will not be written: its authors must not wait for ever.
                for _, write in [*taken, *batch, *self._write_queue]:
                    if write.problem is None:
                        write.problem = STORE_CLOSED if self._closing else WRITER_STOPPED
                self._write_queue.clear()
                self._uncommitted_changed.notify_all()

    def _settle(
        self,
        batch: list[tuple[StoredMessage | _Statements, Write]] | list[tuple[_WriterAction, Write]],
        problem: str,
        taken_through: int | None = None,
    ) -> None:
        """Tell each write of ``batch`` its outcome ("" for committed), and wake whoever waits."""
        with self._uncommitted_changed:
            for operation, write in batch:
                if problem and isinstance(operation, StoredMessage):
                    self._dropped += 1
                write.problem = problem
            if taken_through is not None:
                self._operations_finished = taken_through
                recovered = not problem and self._write_problem
                if not problem:
                    self._write_problem = ""
            else:
                recovered = False
            self._uncommitted_changed.notify_all()
        if recovered:
            log.warning("%s: history saved again", self.path)

    def _commit(self, batch: Iterable[StoredMessage | _Statements], trim_by_age: bool) -> None:
        """Write ``batch`` and the trims it calls for in one transaction; raises ``sqlite3.Error``."""
        connection = self._write_connection
        streams_written: set[str] = set()
        last_id = 0
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            for operation in batch:
                if isinstance(operation, StoredMessage):
                    message = operation
                    sealed = self._seal(message)
                    connection.execute(
                        _INSERT_MESSAGE, (message.id, message.stream, message.seq, message.sent_at, sealed)
                    )
                    connection.execute(_ADVANCE_STREAM, (message.stream, message.seq))
                    streams_written.add(message.stream)
                    last_id = max(last_id, message.id)
                else:
                    for statement, parameters in operation:
                        connection.execute(statement, parameters)
            if last_id:
                connection.execute(_ADVANCE_LAST_ID, (last_id,))
            for stream in streams_written:
                connection.execute(_TRIM_STREAM, (stream, stream, self._history_limit))
            if trim_by_age:
                connection.execute(_TRIM_OLD, (self._clock() - self._history_max_age,))

    def _rollback(self) -> None:
        # A failed COMMIT (disk full) can leave the transaction open, and every later BEGIN would fail.
        try:
            if self._write_connection.in_transaction:
                self._write_connection.rollback()
        except sqlite3.Error as exc:
            log.debug("%s: rollback failed: %s", self.path, exc)

    def _note_failure(self, problem: str, batch: list[tuple[StoredMessage | _Statements, Write]]) -> None:
        with self._uncommitted_lock:
            changed = problem != self._write_problem
            if not self._write_problem:
                self._problem_since = self._clock()
            self._write_problem = problem
        if changed:
            messages = sum(isinstance(operation, StoredMessage) for operation, _ in batch)
            log.error(
                "%s: history not saved: %s (%d messages and %d room changes refused; their authors are told)",
                self.path,
                problem,
                messages,
                len(batch) - messages,
            )

    # ------------------------------------------------------------------ encryption

    @staticmethod
    def _associated_data(stream: str, message_id: int) -> bytes:
        return stream.encode() + b"\0" + str(message_id).encode()

    def _seal(self, message: StoredMessage) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, message.payload, self._associated_data(message.stream, message.id))

    def _open_rows(self, rows: Iterable[tuple]) -> list[StoredMessage]:
        """The rows as messages, skipping (and logging, count only) those that fail to decrypt."""
        opened: list[StoredMessage] = []
        failed = 0
        for message_id, stream, seq, sent_at, sealed in rows:
            try:
                nonce, ciphertext = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
                payload = self._aead.decrypt(nonce, ciphertext, self._associated_data(stream, message_id))
                opened.append(StoredMessage(message_id, stream, seq, sent_at, payload))
            except (InvalidTag, ValueError, TypeError):
                failed += 1
        if failed:
            log.warning("%s: skipped %d stored messages that failed to decrypt", self.path, failed)
        return opened

    # ------------------------------------------------------------------ reading

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._uncommitted_lock:
            if self._closing:
                raise StoreError(f"{self.path}: the store is closed")
        try:
            connection = self._read_pool.get(timeout=READ_POOL_TIMEOUT)
        except queue.Empty:
            raise StoreError(f"{self.path}: no read connection free within {READ_POOL_TIMEOUT} s") from None
        try:
            yield connection
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        finally:
            self._read_pool.put(connection)

    def _newest(self, sql: str, parameters: tuple | dict, limit: int) -> list[StoredMessage]:
        """The rows ``sql`` selects (newest first, at most ``limit``), oldest first."""
        if limit <= 0:
            return []
        with self._reading() as connection:
            rows = connection.execute(sql, parameters).fetchall()
        return self._open_rows(reversed(rows))

    def recent(self, stream: str, limit: int) -> list[StoredMessage]:
        """The newest ``limit`` messages of ``stream``, oldest first."""
        return self._newest(_RECENT, (stream, limit), limit)

    def before(self, stream: str, before_id: int, limit: int) -> list[StoredMessage]:
        """The newest ``limit`` messages of ``stream`` with id below ``before_id``, oldest first."""
        return self._newest(_BEFORE, (stream, before_id, limit), limit)

    def since(self, stream: str, after_id: int, limit: int) -> tuple[list[StoredMessage], int]:
        """The newest ``limit`` messages of ``stream`` with id above ``after_id``, oldest first,
        and how many more with id above ``after_id`` there were but were not returned."""
        with self._reading() as connection:
            connection.execute("BEGIN")  # one snapshot for the count and the rows
            try:
                total = len(connection.execute(_IDS_SINCE, (stream, after_id)).fetchall())
                rows = connection.execute(_SINCE, (stream, after_id, max(limit, 0))).fetchall()
            finally:
                connection.rollback()
        returned = self._open_rows(reversed(rows)) if limit > 0 else []
        return returned, max(total - len(returned), 0)

    def oldest_seq(self, stream: str) -> int:
        """The smallest seq still stored in ``stream``; 0 if none."""
        with self._reading() as connection:
            (stored,) = connection.execute("SELECT min(seq) FROM messages WHERE stream = ?", (stream,)).fetchone()
        return stored or 0

    def private_since(self, account: str, after_id: int, limit: int) -> list[StoredMessage]:
        """The newest ``limit`` messages with id above ``after_id`` of ``account``'s private streams, oldest first."""
        parameters = {"prefix": f"@{account}:", "suffix": f":{account}", "after": after_id, "limit": limit}
        return self._newest(_PRIVATE_SINCE, parameters, limit)

    def private_recent(self, account: str, limit: int) -> list[StoredMessage]:
        """The newest ``limit`` messages of all ``account``'s private streams, oldest first."""
        return self.private_since(account, 0, limit)

    def load_rooms(self) -> list[RoomRecord]:
        """Every saved room, from the database (not what is still queued), oldest first."""
        with self._reading() as connection:
            rows = connection.execute("SELECT name, topic, owner, created_at FROM rooms ORDER BY created_at, name")
            return [RoomRecord(*row) for row in rows]

    def load_state(self) -> dict[str, dict[str, str]]:
        """Scope -> its keys and values, from the database."""
        state: dict[str, dict[str, str]] = {}
        with self._reading() as connection:
            for scope, key, value in connection.execute("SELECT scope, key, value FROM state"):
                state.setdefault(scope, {})[key] = value
        return state

    def load_memberships(self) -> dict[str, list[str]]:
        """Account -> the rooms it has joined, in the order joined, from the database."""
        memberships: dict[str, list[str]] = {}
        with self._reading() as connection:
            for account, room in connection.execute("SELECT account, room FROM memberships ORDER BY rowid"):
                memberships.setdefault(account, []).append(room)
        return memberships
