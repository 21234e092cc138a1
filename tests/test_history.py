"""The history store: real SQLite files under ``tmp_path``, real threads, no mocks."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TIMEOUT, ServerProcess, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securechat.crypto_utils import CryptoError
from securechat.history import (
    QUEUE_FULL,
    STORE_CLOSED,
    ChatStore,
    RoomRecord,
    StoredMessage,
    StoreError,
    load_or_create_history_key,
    private_stream,
)

KEY = bytes(range(32))
MARKER = "PLAINTEXT-MARKER-7f3a"
START = 1_700_000_000.0
DAY = 86400.0
#: Payload padding larger than a database page, so that every stored line needs new pages.
BIG = 5000


class FakeClock:
    """A clock the test moves by hand: ages are tested without sleeping."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def line(
    message_id: int, stream: str = "#lobby", seq: int | None = None, sent_at: float = START, size: int = 0
) -> StoredMessage:
    """A chat line as the server would store it; ``size`` pads it (over a page, it needs pages of its own)."""
    text = f'{{"text": "{MARKER} number {message_id}{"." * size}"}}'
    return StoredMessage(message_id, stream, seq or message_id, sent_at, text.encode())


def ids(messages: list[StoredMessage]) -> list[int]:
    return [message.id for message in messages]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_rows(path: Path) -> int:
    """Rows in the file, counted through a connection of our own (what is committed)."""
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT count(*) FROM messages").fetchone()[0]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "history.db"


@pytest.fixture
def open_store(db_path: Path) -> Iterator[Callable[..., ChatStore]]:
    """Factory: ``open_store(**options)`` opens the store at ``db_path``; all are closed at teardown."""
    db_path.parent.mkdir(exist_ok=True)
    stores: list[ChatStore] = []

    def open_(**options) -> ChatStore:
        options.setdefault("batch_interval", 0.01)
        options.setdefault("clock", FakeClock())  # the lines are sent at START: not yet too old
        store = ChatStore(db_path, KEY, **options)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


def fill_the_disk(connection: sqlite3.Connection) -> None:
    # A database may not grow past max_page_count: as good as a full disk, for this connection.
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {pages}")


def free_the_disk(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA max_page_count = 1000000")


# --------------------------------------------------------------------------- round trips


def test_history_survives_a_restart_and_numbering_continues(open_store: Callable[..., ChatStore]) -> None:
    with open_store() as store:
        assert (store.last_id(), store.last_seq("#lobby")) == (0, 0)
        for message_id in range(1, 6):
            assert store.append(line(message_id, seq=message_id))
        assert store.append(line(6, private_stream("bob", "alice"), seq=1))
    store = open_store()
    assert store.recent("#lobby", 10) == [line(n) for n in range(1, 6)]
    assert store.private_recent("alice", 10) == [line(6, "@alice:bob", seq=1)]
    assert store.last_id() == 6
    assert (store.last_seq("#lobby"), store.last_seq("@alice:bob"), store.last_seq("#elsewhere")) == (5, 1, 0)
    assert store.append(line(7, seq=6))
    assert (store.last_id(), store.last_seq("#lobby")) == (7, 6)


def test_reads_see_only_what_is_committed(open_store: Callable[..., ChatStore], db_path: Path) -> None:
    """A message not yet committed may still fail (and its sender be told so): no read shows it."""
    store = open_store(batch_interval=30)  # the writer gathers for a long time: nothing is committed yet
    first, second = store.append(line(1)), store.append(line(2))
    assert (first.problem, second.problem) == (None, None)
    assert stored_rows(db_path) == 0
    assert store.recent("#lobby", 10) == [] and store.since("#lobby", 0, 10) == ([], 0)
    assert store.oldest_seq("#lobby") == 0
    assert store.last_id() == 2  # numbering never goes back, committed or not
    assert store.flush()
    assert (first.wait(0), second.wait(0)) == ("", "")
    assert stored_rows(db_path) == 2
    assert ids(store.recent("#lobby", 10)) == [1, 2]


def test_recent_before_and_since_order_and_limit(open_store: Callable[..., ChatStore]) -> None:
    store = open_store()
    for message_id in range(1, 11):
        store.append(line(message_id))
        store.append(line(100 + message_id, "#other"))
    assert store.append(line(11)).wait(TIMEOUT) == ""
    assert ids(store.recent("#lobby", 3)) == [9, 10, 11]
    assert ids(store.recent("#lobby", 50)) == list(range(1, 12))
    assert store.recent("#lobby", 0) == []
    assert ids(store.before("#lobby", 9, 3)) == [6, 7, 8]
    assert ids(store.before("#lobby", 3, 10)) == [1, 2]
    assert store.before("#lobby", 1, 10) == []
    returned, not_returned = store.since("#lobby", 4, 3)
    assert (ids(returned), not_returned) == ([9, 10, 11], 4)
    returned, not_returned = store.since("#lobby", 8, 10)
    assert (ids(returned), not_returned) == ([9, 10, 11], 0)
    assert store.since("#lobby", 11, 10) == ([], 0)
    assert store.since("#nowhere", 0, 10) == ([], 0)
    assert store.oldest_seq("#lobby") == 1
    assert store.oldest_seq("#nowhere") == 0


def test_reads_match_a_simple_model(open_store: Callable[..., ChatStore]) -> None:
    """Whatever the bounds, reads agree with a list filtered and sliced by hand."""
    store = open_store()
    all_ids = list(range(1, 31))
    for message_id in all_ids[:20]:
        store.append(line(message_id))
    assert store.flush()
    gate = threading.Event()
    store._run_on_writer(lambda connection: gate.wait(10))  # hold the writer: the rest waits, unread
    for message_id in all_ids[20:]:
        store.append(line(message_id))
    all_ids = all_ids[:20]

    @settings(
        max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(bound=st.integers(0, 32), limit=st.integers(0, 35))
    def check(bound: int, limit: int) -> None:
        newer = [n for n in all_ids if n > bound]
        older = [n for n in all_ids if n < bound]
        expected_since = newer[-limit:] if limit else []
        assert store.since("#lobby", bound, limit) == (
            [line(n) for n in expected_since],
            len(newer) - len(expected_since),
        )
        assert ids(store.before("#lobby", bound, limit)) == (older[-limit:] if limit else [])
        assert ids(store.recent("#lobby", limit)) == (all_ids[-limit:] if limit else [])

    try:
        check()
    finally:
        gate.set()
    assert store.flush()


# --------------------------------------------------------------------------- trimming


def test_trimming_by_count_keeps_the_newest_and_the_numbering(open_store: Callable[..., ChatStore]) -> None:
    with open_store(history_limit=5) as store:
        for message_id in range(1, 13):
            store.append(line(message_id))
        store.append(line(13, "#other"))
        assert store.flush()
        assert ids(store.recent("#lobby", 100)) == [8, 9, 10, 11, 12]
        assert store.oldest_seq("#lobby") == 8
        assert ids(store.recent("#other", 100)) == [13]
    store = open_store(history_limit=5)
    assert (store.last_id(), store.last_seq("#lobby"), store.oldest_seq("#lobby")) == (13, 12, 8)


def test_trimming_by_age_at_start_and_while_running(open_store: Callable[..., ChatStore]) -> None:
    clock = FakeClock()
    with open_store(history_max_age=7 * DAY, clock=clock) as store:
        store.append(line(1, sent_at=START))
        store.append(line(2, sent_at=START + 2 * DAY))
    clock.now = START + 8 * DAY  # the first line is now too old
    with open_store(history_max_age=7 * DAY, clock=clock) as store:
        assert ids(store.recent("#lobby", 10)) == [2]
        clock.now = START + 10 * DAY  # a minute and more later by the store's clock: the second is too old too
        store.append(line(3, sent_at=clock.now))
        assert store.flush()
        assert ids(store.recent("#lobby", 10)) == [3]
        assert store.last_seq("#lobby") == 3
    with open_store(history_max_age=7 * DAY, clock=clock) as store:
        assert (store.last_id(), store.last_seq("#lobby")) == (3, 3)


def test_history_limit_zero_stores_no_messages_but_keeps_rooms(
    open_store: Callable[..., ChatStore], db_path: Path
) -> None:
    with open_store(history_limit=0) as store:
        assert store.append(line(1))
        assert store.save_room(RoomRecord("#lobby", topic="hello", owner="alice", created_at=START))
        assert store.flush()
        assert store.recent("#lobby", 10) == []
        assert store.last_id() == 0
        assert store.load_rooms() == [RoomRecord("#lobby", "hello", "alice", START)]
    assert stored_rows(db_path) == 0


# --------------------------------------------------------------------------- private conversations


def test_private_streams_are_one_per_pair_and_found_by_either_account(open_store: Callable[..., ChatStore]) -> None:
    assert private_stream("bob", "alice") == private_stream("alice", "bob") == "@alice:bob"
    with pytest.raises(ValueError):
        private_stream("alice", "b:ob")
    store = open_store()
    store.append(line(1, private_stream("alice", "bob"), seq=1))
    store.append(line(2, private_stream("bob", "carol"), seq=1))
    store.append(line(3, "#lobby", seq=1))
    store.append(line(4, private_stream("bob", "alice"), seq=2))
    store.append(line(5, private_stream("al", "zed"), seq=1))  # "al" is a prefix of "alice": not alice's
    store.append(line(6, private_stream("alice", "dave"), seq=1))
    assert store.flush()
    assert store.append(line(7, private_stream("dave", "alice"), seq=2)).wait(TIMEOUT) == ""
    assert ids(store.private_since("alice", 0, 10)) == [1, 4, 6, 7]
    assert ids(store.private_since("alice", 4, 10)) == [6, 7]
    assert ids(store.private_since("alice", 0, 2)) == [6, 7]
    assert ids(store.private_recent("alice", 3)) == [4, 6, 7]
    assert ids(store.private_recent("bob", 10)) == [1, 2, 4]
    assert ids(store.private_recent("zed", 10)) == [5]
    assert store.private_recent("lobby", 10) == []
    assert store.last_seq("@alice:dave") == 2


# --------------------------------------------------------------------------- room state


def test_rooms_and_memberships_survive_a_restart(open_store: Callable[..., ChatStore]) -> None:
    with open_store() as store:
        store.save_room(RoomRecord("#lobby", owner="alice", created_at=START))
        store.save_room(RoomRecord("#games", topic="chess", owner="bob", created_at=START + 1))
        store.save_room(RoomRecord("#gone", created_at=START + 2))
        store.save_room(RoomRecord("#lobby", topic="welcome", owner="alice", created_at=START))
        store.add_membership("alice", "#lobby")
        store.add_membership("alice", "#games")
        store.add_membership("bob", "#games")
        store.add_membership("bob", "#gone")
        store.add_membership("alice", "#lobby")  # already there: stays first
        store.remove_membership("bob", "#games")
        store.add_membership("bob", "#games")  # joined again: now last
        store.delete_room("#gone")
    store = open_store()
    assert store.load_rooms() == [
        RoomRecord("#lobby", topic="welcome", owner="alice", created_at=START),
        RoomRecord("#games", topic="chess", owner="bob", created_at=START + 1),
    ]
    assert store.load_memberships() == {"alice": ["#lobby", "#games"], "bob": ["#games"]}


# --------------------------------------------------------------------------- encryption at rest


def test_no_payload_text_in_any_file_of_the_directory(open_store: Callable[..., ChatStore], db_path: Path) -> None:
    def assert_no_plaintext() -> None:
        files = [path for path in db_path.parent.iterdir() if path.is_file()]
        assert db_path in files
        for path in files:
            raw = path.read_bytes()
            assert MARKER.encode() not in raw, path.name
            assert b"number 1" not in raw, path.name

    store = open_store()
    for message_id in range(1, 51):
        store.append(line(message_id, private_stream("alice", "bob") if message_id % 2 else "#lobby"))
    assert store.flush()
    assert db_path.with_name(db_path.name + "-wal").exists()  # the WAL is checked while it holds the data
    assert_no_plaintext()
    store.close()
    assert_no_plaintext()


def test_files_are_owner_only(open_store: Callable[..., ChatStore], db_path: Path) -> None:
    store = open_store()
    store.append(line(1))
    assert store.flush()
    for path in db_path.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path.name


def test_tampered_or_moved_rows_are_skipped(
    open_store: Callable[..., ChatStore], db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_store() as store:
        for message_id in range(1, 6):
            store.append(line(message_id))
    with sqlite3.connect(db_path) as connection:
        (sealed,) = connection.execute("SELECT sealed FROM messages WHERE id = 2").fetchone()
        flipped = bytearray(sealed)
        flipped[-1] ^= 0x01
        connection.execute("UPDATE messages SET sealed = ? WHERE id = 2", (bytes(flipped),))
        connection.execute("UPDATE messages SET id = 40 WHERE id = 3")  # moved to another id
        connection.execute("UPDATE messages SET stream = '#other' WHERE id = 4")  # moved to another stream
    store = open_store()
    with caplog.at_level(logging.WARNING, logger="chat.history"):
        assert store.recent("#lobby", 10) == [line(1), line(5)]
        assert store.recent("#other", 10) == []
    warnings = [record.getMessage() for record in caplog.records if "decrypt" in record.getMessage()]
    assert len(warnings) == 2  # one line per read, with the count
    assert "skipped 2 " in warnings[0]
    assert MARKER not in caplog.text


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["random bytes", "truncated database", "newer schema"])
def test_a_damaged_file_is_refused_and_left_as_it_was(
    damage: str, open_store: Callable[..., ChatStore], db_path: Path
) -> None:
    if damage == "random bytes":
        db_path.write_bytes(os.urandom(64 * 1024))
    else:
        with open_store() as store:
            for message_id in range(1, 201):
                store.append(line(message_id))
        if damage == "truncated database":
            db_path.write_bytes(db_path.read_bytes()[: db_path.stat().st_size // 2])
        else:
            with sqlite3.connect(db_path) as connection:
                connection.execute("PRAGMA user_version = 99")
    before = file_digest(db_path)
    with pytest.raises(StoreError) as refused:
        ChatStore(db_path, KEY)
    assert str(refused.value).startswith(f"{db_path}: ")
    assert file_digest(db_path) == before


def test_a_path_that_cannot_be_a_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as refused:
        ChatStore(tmp_path, KEY)  # a directory
    assert str(refused.value).startswith(f"{tmp_path}: ")
    with pytest.raises(StoreError):
        ChatStore(tmp_path / "missing" / "history.db", KEY)


def test_bad_arguments_are_refused_at_once(db_path: Path) -> None:
    with pytest.raises(ValueError):
        ChatStore(db_path, b"short")
    with pytest.raises(ValueError):
        StoredMessage(0, "#lobby", 1, START, b"id 0")
    with pytest.raises(TypeError):
        StoredMessage(1, "#lobby", 1, START, "text, not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RoomRecord("#lobby", topic=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- failures and limits


def test_a_full_disk_refuses_each_write_with_its_reason_and_the_store_recovers(
    open_store: Callable[..., ChatStore], db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails is not kept to be retried (and lost at the next stop, or delivered meanwhile):
    each says why, so its author can be told, and nothing of it is left in the store."""
    store = open_store()
    assert store.health() == ""
    assert store._run_on_writer(fill_the_disk).wait(TIMEOUT) == ""
    caplog.set_level(logging.WARNING, logger="chat.history")
    started = time.monotonic()
    writes = [store.append(line(message_id, size=BIG)) for message_id in range(1, 41)]
    assert time.monotonic() - started < 0.5  # appending never waits for the disk
    assert all(write.wait(TIMEOUT) == "database or disk is full" for write in writes)
    status = store.health()
    assert "database or disk is full" in status and "40 messages not saved" in status and "\n" not in status
    assert store.recent("#lobby", 100) == []
    assert store.dropped_messages == 40
    assert len([record for record in caplog.records if "disk is full" in record.getMessage()]) == 1

    store._run_on_writer(free_the_disk)
    assert store.append(line(41, size=BIG)).wait(TIMEOUT) == ""
    assert store.health() == ""
    # The writer logs the recovery just after it lets the write's author go.
    wait_until(lambda: any("saved again" in record.getMessage() for record in caplog.records))
    assert stored_rows(db_path) == 1
    store.close()
    with open_store() as reopened:
        assert reopened.recent("#lobby", 100) == [line(41, size=BIG)]
        assert reopened.last_id() == 41


def test_a_full_queue_refuses_without_blocking(
    open_store: Callable[..., ChatStore], caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(queue_size=3)
    gate = threading.Event()
    store._run_on_writer(lambda connection: gate.wait(10))  # the writer is busy elsewhere
    assert store.flush(timeout=0.1) is False
    caplog.set_level(logging.WARNING, logger="chat.history")
    writes = [store.append(line(n)) for n in range(1, 7)]
    assert [write.problem for write in writes] == [None, None, None, QUEUE_FULL, QUEUE_FULL, QUEUE_FULL]
    assert store.dropped_messages == 3
    assert len([record for record in caplog.records if "queue full" in record.getMessage()]) == 1
    room_saved = store.save_room(RoomRecord("#lobby"))  # room state may exceed the bound
    gate.set()
    assert [write.wait(TIMEOUT) for write in writes[:3]] == ["", "", ""]
    assert room_saved.wait(TIMEOUT) == ""
    assert ids(store.recent("#lobby", 10)) == [1, 2, 3]
    assert store.load_rooms() == [RoomRecord("#lobby")]
    assert store.append(line(7)).wait(TIMEOUT) == ""


# --------------------------------------------------------------------------- lifecycle and keys


def test_close_is_idempotent_and_stops_everything(open_store: Callable[..., ChatStore]) -> None:
    before = set(threading.enumerate())
    store = open_store(batch_interval=30)
    assert {thread.name for thread in set(threading.enumerate()) - before} == {"history-writer"}
    store.append(line(1))
    store.close()  # saves what was queued, though the writer was still gathering
    store.close()
    assert set(threading.enumerate()) <= before
    assert store.append(line(2)).problem == STORE_CLOSED
    assert store.save_room(RoomRecord("#lobby")).problem == STORE_CLOSED
    with pytest.raises(StoreError):
        store.recent("#lobby", 10)
    with open_store() as reopened:
        assert ids(reopened.recent("#lobby", 10)) == [1]


def test_close_on_a_failing_disk_is_quick_and_tells_each_write(open_store: Callable[..., ChatStore]) -> None:
    store = open_store()
    store._run_on_writer(fill_the_disk)
    message, room = store.append(line(1, size=BIG)), store.save_room(RoomRecord("#lobby"))
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 2
    assert message.wait(0) == room.wait(0) == "database or disk is full"


def test_the_history_key_is_created_owner_only_and_kept(tmp_path: Path) -> None:
    key_path = tmp_path / "history.key"
    key = load_or_create_history_key(key_path)
    assert len(key) == 32
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_or_create_history_key(key_path) == key
    key_path.chmod(0o644)
    with pytest.raises(CryptoError):
        load_or_create_history_key(key_path)


def test_a_store_opened_with_another_key_is_refused_and_left_as_it_was(
    open_store: Callable[..., ChatStore], db_path: Path
) -> None:
    with open_store() as store:
        assert store.append(line(1)).wait(TIMEOUT) == ""
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="sealed under another history key"):
        ChatStore(db_path, bytes(32))
    assert db_path.read_bytes() == before
    with open_store() as store:  # the right key still opens it
        assert ids(store.recent("#lobby", 10)) == [1]


def test_a_store_made_before_the_key_check_is_checked_by_its_lines(
    open_store: Callable[..., ChatStore], db_path: Path
) -> None:
    with open_store() as store:
        assert store.append(line(1)).wait(TIMEOUT) == ""
    with sqlite3.connect(db_path) as connection:  # as a database of schema 2 holds no check
        connection.execute("DELETE FROM meta")
    with pytest.raises(StoreError, match="sealed under another history key"):
        ChatStore(db_path, bytes(32))
    with open_store() as store:
        assert ids(store.recent("#lobby", 10)) == [1]
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("SELECT count(*) FROM meta").fetchone() == (1,)


def test_a_database_restored_without_its_history_key_is_refused_without_making_a_new_key(tmp_path, users_file):
    """README, Backups: "Keep history_key with the database ... a start with a database and a
    history_key that do not belong together is refused, naming both". An operator restores the data
    directory but history_key did not come along. The server first makes a brand-new history_key
    beside the database, then refuses to start saying "its lines were sealed under another history
    key than history_key beside it: put that file back": the file it names is one it just made,
    and it now sits where the real one must be copied back (an `rsync --ignore-existing`, or a
    `cp -n`, would keep the wrong one). It should say that history_key is missing, and make none."""
    data = tmp_path / "data"
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(data), "--log-level", "WARNING"]
    status, _ = ServerProcess(where).stop()
    assert status == 0
    (data / "history_key").unlink()  # the backup lacked it
    with pytest.raises(RuntimeError) as refused:
        ServerProcess(where).stop()
    assert "history_key" in str(refused.value), refused.value
    assert not (data / "history_key").exists(), f"the refused start made a new history_key: {refused.value}"
    assert "another history key" not in str(refused.value), refused.value
