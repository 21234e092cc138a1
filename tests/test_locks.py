"""No lock held over I/O or crypto, and nobody kept waiting behind one (issue 15, item 15).

Each place the review found is tested by making its slow step slow on purpose (an
fsync, a member's delivery) and checking what must not wait for it does not: token
checks and revocations while the journal is on disk, a member's line while a room's
join round goes out. The group writer under the journal and the client's socket is
tested on its own first.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import types

import pytest
from conftest import TIMEOUT, drain, password_of, wait_for, wait_until

from securechat import accounts
from securechat.accounts import RevocationNotSaved, TokenAuthority, TokenClaims
from securechat.backend import MemoryBackend
from securechat.client import ChatClient, ChatError, KnownHosts
from securechat.group_writer import GroupWriter
from securechat.history import ChatStore
from securechat.hub import ChatHub
from securechat.protocol import Chat, Notice
from securechat.rooms import Room

#: What "at once" means here: far below the deliberately slow step, far above a lock's cost.
PROMPTLY = TIMEOUT / 10

#: Ids for the lines the tests hand to a room (ids rise in a room).
LINE_IDS = itertools.count(1)


class HeldWrite:
    """A ``write`` for a GroupWriter that records its batches and can be held inside its first call."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.inside = threading.Event()
        self.release = threading.Event()
        #: The number of the call (from 1) that fails as on a full disk; 0 for none.
        self.failing_call = 0

    def __call__(self, items: list[str]) -> None:
        self.batches.append(items)
        if len(self.batches) == 1:
            self.inside.set()
            assert self.release.wait(TIMEOUT)
        if len(self.batches) == self.failing_call:
            raise OSError(28, "No space left on device")


def in_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


# --------------------------------------------------------------------------- the group writer


def test_callers_waiting_for_a_busy_writer_go_out_together_in_order():
    write = HeldWrite()
    writer: GroupWriter[str] = GroupWriter(write)
    first = in_thread(lambda: writer.flush(writer.put("a")))
    assert write.inside.wait(TIMEOUT)
    waiters = []
    for item in ("b", "c", "d"):  # put in this order, then each waits in its own thread
        ticket = writer.put(item)
        waiters.append(in_thread(writer.flush, ticket))
    write.release.set()
    for thread in (first, *waiters):
        thread.join(TIMEOUT)
    assert write.batches == [["a"], ["b", "c", "d"]]  # one write for the three that waited


def test_a_failed_batch_fails_each_of_its_items_and_the_next_batch_is_tried():
    write = HeldWrite()
    writer: GroupWriter[str] = GroupWriter(write)
    first = in_thread(lambda: writer.flush(writer.put("a")))
    assert write.inside.wait(TIMEOUT)
    errors: list[BaseException | None] = []

    def put_and_flush(item: str) -> None:
        ticket = writer.put(item)
        try:
            writer.flush(ticket)
        except OSError as exc:
            errors.append(exc)
        else:
            errors.append(None)

    waiters = [in_thread(put_and_flush, item) for item in ("b", "c")]
    wait_until(lambda: len(writer._queued) == 2)
    write.failing_call = 2  # the second batch ("b", "c") meets a full disk
    write.release.set()
    for thread in (first, *waiters):
        thread.join(TIMEOUT)
    assert len(errors) == 2 and all(isinstance(error, OSError) and error.errno == 28 for error in errors)
    writer.flush(writer.put("e"))  # the disk has room again
    assert write.batches[-1] == ["e"]


def test_an_item_that_need_not_wait_is_left_to_the_writer_at_work():
    write = HeldWrite()
    writer: GroupWriter[str] = GroupWriter(write)
    first = in_thread(lambda: writer.flush(writer.put("a")))
    assert write.inside.wait(TIMEOUT)
    started = time.monotonic()
    writer.put("pong")
    writer.flush(wait=False)  # returns at once: the writer at work sends it before it stops
    assert time.monotonic() - started < PROMPTLY
    write.release.set()
    first.join(TIMEOUT)
    assert write.batches == [["a"], ["pong"]]


def test_close_waits_for_the_write_under_way_and_refuses_later_items():
    write = HeldWrite()
    writer: GroupWriter[str] = GroupWriter(write)
    first = in_thread(lambda: writer.flush(writer.put("a")))
    assert write.inside.wait(TIMEOUT)
    closer = in_thread(writer.close)
    time.sleep(PROMPTLY)
    assert closer.is_alive()  # a socket must not be closed under the thread writing to it
    write.release.set()
    closer.join(TIMEOUT)
    first.join(TIMEOUT)
    with pytest.raises(OSError, match="closed"):
        writer.flush(writer.put("late"))
    assert write.batches == [["a"]]


# --------------------------------------------------------------------------- the revocation journal


def claims_of(session_id: str) -> TokenClaims:
    return TokenClaims("alice", 0, 0, f"jti-{session_id}", "kt", "", session_id)


class HeldFsync:
    """``os.fsync`` that can be held inside its next call, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold_next = False
        self.inside = threading.Event()
        self.release = threading.Event()
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.hold_next:
            self.hold_next = False
            self.inside.set()
            assert self.release.wait(TIMEOUT)
        self._real(fd)


@pytest.fixture
def held_fsync(monkeypatch) -> HeldFsync:
    fsync = HeldFsync()
    monkeypatch.setattr(os, "fsync", fsync)
    yield fsync
    fsync.release.set()  # a failed test must not leave a thread held


def test_a_slow_fsync_delays_no_token_check_and_one_fsync_covers_the_revocations_waiting(tmp_path, held_fsync):
    path = tmp_path / "revoked"
    authority = TokenAuthority(b"k" * 32, revoked_path=path)
    live_token, _ = authority.issue("bob", "kt")
    held_fsync.calls, held_fsync.hold_next = 0, True
    results: list[bool] = []
    first = in_thread(lambda: results.append(authority.revoke(claims_of("session-0"))))
    assert held_fsync.inside.wait(TIMEOUT)  # the disk is slow: session-0's fsync has not returned
    others = [
        in_thread(lambda index=index: results.append(authority.revoke(claims_of(f"session-{index}"))))
        for index in range(1, 6)
    ]
    wait_until(lambda: authority._journal is not None and len(authority._journal._queued) == 5)
    # Meanwhile every revocation is in force already, and token checks answer at once.
    started = time.monotonic()
    assert all(authority.is_revoked(f"session-{index}") for index in range(6))
    assert authority.verify(live_token, "kt", "bob").username == "bob"
    assert time.monotonic() - started < PROMPTLY
    held_fsync.release.set()
    for thread in (first, *others):
        thread.join(TIMEOUT)
    assert results == [True] * 6
    assert held_fsync.calls == 2  # session-0's, then one for the five that waited behind it
    reloaded = TokenAuthority(b"k" * 32, revoked_path=path)
    assert all(reloaded.is_revoked(f"session-{index}") for index in range(6))


def test_a_compaction_on_a_slow_disk_keeps_revocations_in_force_and_loses_none(tmp_path, held_fsync, monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(accounts, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic))
    monkeypatch.setattr(accounts, "MIN_JOURNAL_LINES", 4)
    path = tmp_path / "revoked"
    authority = TokenAuthority(b"k" * 32, ttl=60, revoked_path=path)
    for index in range(4):
        authority.revoke(claims_of(f"old-{index}"))
    now[0] += 3600  # every one of them has expired
    held_fsync.hold_next = True
    compacting = in_thread(authority.revoke, claims_of("new-0"))  # the fifth line: the journal is rewritten
    assert held_fsync.inside.wait(TIMEOUT)
    started = time.monotonic()
    spender = in_thread(authority.revoke, claims_of("new-1"))  # revoked while the rewrite is on disk
    wait_until(lambda: authority.is_revoked("new-1"), timeout=PROMPTLY)  # in force at once, not after the rewrite
    assert authority.is_revoked("new-0") and time.monotonic() - started < PROMPTLY
    held_fsync.release.set()
    compacting.join(TIMEOUT)
    spender.join(TIMEOUT)
    assert not authority.is_revoked("old-0")  # forgotten once the rewrite was safe
    reloaded = TokenAuthority(b"k" * 32, ttl=60, revoked_path=path)
    assert reloaded.is_revoked("new-0") and reloaded.is_revoked("new-1") and not reloaded.is_revoked("old-3")


def test_every_revocation_of_a_batch_the_disk_refused_says_so(tmp_path, held_fsync):
    path = tmp_path / "revoked"
    authority = TokenAuthority(b"k" * 32, revoked_path=path)
    held_fsync.hold_next = True
    first = in_thread(authority.revoke, claims_of("session-0"))
    assert held_fsync.inside.wait(TIMEOUT)
    outcomes: list[str] = []

    def revoke(session_id: str) -> None:
        try:
            authority.revoke(claims_of(session_id))
            outcomes.append("saved")
        except RevocationNotSaved:
            outcomes.append("not saved")

    waiting = [in_thread(revoke, f"session-{index}") for index in (1, 2)]
    wait_until(lambda: authority._journal is not None and len(authority._journal._queued) == 2)
    path.unlink()
    path.mkdir()  # the next append fails (a failing disk acts alike)
    held_fsync.release.set()
    for thread in (first, *waiting):
        thread.join(TIMEOUT)
    assert outcomes == ["not saved", "not saved"]
    assert authority.is_revoked("session-1") and authority.is_revoked("session-2")  # refused all the same
    path.rmdir()


# --------------------------------------------------------------------------- join notices


class SlowMember:
    """A room member whose ``deliver`` can be held at its first join notice (a round to 10,000 takes a while)."""

    def __init__(self, name: str, *, hold_at_join_notice: bool = False) -> None:
        self.name = name
        self.session_id = f"session-{name}"
        self.received: list[object] = []
        self.hold_at_join_notice = hold_at_join_notice
        self.inside = threading.Event()
        self.release = threading.Event()

    def deliver(self, message: object) -> None:
        if self.hold_at_join_notice and isinstance(message, Notice) and message.event == "joined":
            self.hold_at_join_notice = False
            self.inside.set()
            assert self.release.wait(TIMEOUT)
        self.received.append(message)


def say_in(room: Room, sender: SlowMember, text: str) -> None:
    """What the hub does for a line: its sender's join notice first, then the numbered line."""
    room.before_line_from(sender.name)
    line_id = next(LINE_IDS)
    room.deliver_published(Chat(sender=sender.name, text=text, sent_at=0.0, room=room.name, id=line_id, seq=line_id))


def test_a_round_of_join_notices_going_out_holds_up_only_what_is_about_those_it_announces():
    room = Room("#test", join_notice_delay=60)  # rounds go out when the test says
    old, slow = SlowMember("old"), SlowMember("slow", hold_at_join_notice=True)
    for member in (old, slow):
        room.join(member)
    room.send_join_notices()  # "slow" is announced to "old" (a round, but nobody is held yet)
    slow.hold_at_join_notice = True
    new = SlowMember("new")
    room.join(new)
    round_ = in_thread(room.send_join_notices)  # "new joined": handed to old, then held at slow
    assert slow.inside.wait(TIMEOUT)
    try:
        started = time.monotonic()
        say_in(room, old, "not kept waiting")  # before: queued behind the whole round
        assert time.monotonic() - started < PROMPTLY
        assert any(isinstance(message, Chat) for message in new.received)
        early = in_thread(say_in, room, new, "hello")  # about "new": must wait for its notice
        time.sleep(PROMPTLY)
        assert early.is_alive()
    finally:
        slow.release.set()
    round_.join(TIMEOUT)
    early.join(TIMEOUT)
    notice = next(index for index, item in enumerate(slow.received) if isinstance(item, Notice))
    line = next(index for index, item in enumerate(slow.received) if isinstance(item, Chat) and item.sender == "new")
    assert notice < line  # nothing about "new" overtook its join notice
    room.close()


# --------------------------------------------------------------------------- rooms made and retired


class HeldEntryBackend(MemoryBackend):
    """The in-process backend, with the next entry of ``held_account`` into a room held (a slow broker)."""

    def __init__(self, store: ChatStore) -> None:
        super().__init__(store)
        self.held_account = ""
        self.inside = threading.Event()
        self.release = threading.Event()

    def enter_room(self, room: str, account: str, session_id: str) -> None:
        if account == self.held_account:
            self.held_account = ""
            self.inside.set()
            assert self.release.wait(TIMEOUT)
        super().enter_room(room, account, session_id)


def test_a_session_entering_a_room_as_its_last_member_leaves_lands_in_a_live_room(tmp_path):
    backend = HeldEntryBackend(ChatStore(tmp_path / "chat.db", os.urandom(32)))
    hub = ChatHub(backend)
    alice, bob = SlowMember("alice"), SlowMember("bob")
    try:
        for member in (alice, bob):
            rooms, _ = hub.open_session(member, "test", "127.0.0.1")
            hub.enter_rooms(member, rooms)
        hub.join(alice, "#r")
        before = hub.local_room("#r")
        backend.held_account = "bob"
        entering = in_thread(hub.join, bob, "#r")  # has the room alice is in, and is held entering it
        assert backend.inside.wait(TIMEOUT)
        hub.part(alice, "#r")  # the last member here leaves: that room is retired
        assert hub.local_room("#r") is None
        backend.release.set()
        entering.join(TIMEOUT)
        assert not entering.is_alive()
        assert hub.local_room("#r") is not before  # bob is in a fresh room, the one lines go to
        hub.say(bob, "#r", "still heard")
        wait_until(lambda: any(isinstance(m, Chat) and m.text == "still heard" for m in bob.received))
    finally:
        backend.release.set()
        hub.close()


def test_a_session_whose_entry_fails_inside_the_room_is_left_neither_in_it_nor_listed(tmp_path, monkeypatch):
    hub = ChatHub(MemoryBackend(ChatStore(tmp_path / "chat.db", os.urandom(32))))
    alice = SlowMember("alice")
    try:
        rooms, _ = hub.open_session(alice, "test", "127.0.0.1")
        hub.enter_rooms(alice, rooms)
        start = threading.Timer.start

        def no_thread(timer: threading.Timer) -> None:  # the join notice's timer cannot start
            if timer.name.startswith("join-notices #r"):
                raise RuntimeError("can't start new thread")
            start(timer)

        monkeypatch.setattr(threading.Timer, "start", no_thread)
        with pytest.raises(RuntimeError):
            hub.join(alice, "#r")
        monkeypatch.setattr(threading.Timer, "start", start)
        assert hub.local_room("#r") is None  # not in it, and the empty room is gone
        hub.join(alice, "#r")  # and not "already in #r"
        hub.say(alice, "#r", "in at last")
        wait_until(lambda: any(isinstance(m, Chat) and m.text == "in at last" for m in alice.received))
    finally:
        hub.close()


# --------------------------------------------------------------------------- the client's sends


class HeldSend:
    """Wraps a client's frame writer's send so that its next call is held before it sends; counts frames per send."""

    def __init__(self, client: ChatClient) -> None:
        assert client._frames is not None
        self._send = client._frames._write
        client._frames._write = self
        self.frames_per_send: list[int] = []
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self, frames: list[bytes]) -> None:
        self.frames_per_send.append(len(frames))
        if len(self.frames_per_send) == 1:
            self.inside.set()
            assert self.release.wait(TIMEOUT)
        self._send(frames)


def test_a_send_held_on_the_wire_holds_no_lock_and_the_lines_behind_it_keep_their_order(connect):
    alice, bob = connect("alice"), connect("bob")
    send = HeldSend(alice)
    first = in_thread(alice.say, "one")
    assert send.inside.wait(TIMEOUT)  # "one" is sealed, its sendall has not returned
    try:
        assert alice.send_lock.acquire(timeout=PROMPTLY)  # free: before, held over the sendall
        alice.send_lock.release()
        second = in_thread(alice.say, "two")
        wait_until(lambda: alice._frames is not None and len(alice._frames._queued) == 1)
        started = time.monotonic()
        alice.answer_ping(alice._frames)  # what the reader does for a ping: it never waits on a send
        assert time.monotonic() - started < PROMPTLY
    finally:
        send.release.set()
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    assert [wait_for(bob, lambda event: isinstance(event, Chat)).text for _ in range(2)] == ["one", "two"]
    assert send.frames_per_send == [1, 2]  # "two" and the pong went out together, after "one"


def test_the_login_is_signed_and_sealed_with_the_send_lock_free(server, tmp_path):
    client = ChatClient(
        *server.address, server_fingerprint=server.fingerprint, known_hosts=KnownHosts(tmp_path / "kh"), timeout=TIMEOUT
    )
    sign = client._auth_signature
    lock_held_while_signing: list[bool] = []

    def watched_sign(kind):
        lock_held_while_signing.append(client.send_lock.locked())
        return sign(kind)

    client._auth_signature = watched_sign
    try:
        client.login("alice", password_of("alice"))
        assert lock_held_while_signing == [False]  # before: the RSA signature and key wrap were made under it
    finally:
        client.close()


def test_a_line_held_on_the_wire_when_its_link_is_replaced_never_goes_out_on_the_new_one(connect):
    alice, bob = connect("alice"), connect("bob")
    send = HeldSend(alice)
    outcome: list[str] = []

    def say_from_the_old_link() -> None:
        try:
            alice.say("from the old link")
            outcome.append("sent")
        except ChatError as exc:
            outcome.append(str(exc))

    speaker = in_thread(say_from_the_old_link)
    assert send.inside.wait(TIMEOUT)
    closer = in_thread(alice.close)  # as a reconnection begins: the old link is shut and given up
    wait_until(lambda: alice.sock is None)
    send.release.set()  # the held send goes on, onto the old, shut socket
    closer.join(TIMEOUT)
    speaker.join(TIMEOUT)
    assert outcome and outcome[0].startswith("not sent: connection lost")
    drain(alice, quiet=0.1)
    alice.connect()
    alice.resume()
    alice.say("from the new link")
    heard = [event.text for event in drain(bob, quiet=0.5) if isinstance(event, Chat)]
    assert heard == ["from the new link"]
