"""What the default deployment (one process, SQLite) keeps across a kill -9, a full disk and damaged files.

A line the server accepted (echoed to its sender, shown to the room, or told "kept") is in the
history later; no id is given twice; history is never thrown away at start without a word; and
an error never tells the user to do what cannot work. Real servers, real clients, real files;
the full-disk tests mount a small tmpfs (root only) and always unmount it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TIMEOUT,
    ServerProcess,
    chat_with,
    drain,
    free_port,
    is_disconnected,
    password_of,
    wait_for,
    wait_until,
)

from securechat.backend import MemoryBackend
from securechat.client import Chat, ChatClient, ErrorReply, History, KnownHosts, LoginRefused, Notice, Room
from securechat.history import ChatStore, RoomRecord, StoredMessage
from securechat.protocol import Chat as ChatMessage

# --------------------------------------------------------------------------- helpers


def log_in(process: ServerProcess, name: str, tmp_path: Path, **options) -> ChatClient:
    """A logged-in client of a server process (its key pinned from what the process printed)."""
    client = ChatClient(
        "127.0.0.1",
        process.port,
        timeout=TIMEOUT * 2,
        server_fingerprint=process.fingerprint,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        **options,
    )
    client.login(name, password_of(name))
    return client


def room_history(client: ChatClient, room: str = "#lobby") -> list[Chat | Notice]:
    """Every line and kept notice of ``room`` the server still has, oldest first (/history, paged)."""
    lines: list[Chat | Notice] = []
    before = 0
    for _ in range(20):
        client.command("history", room, "500", *([str(before)] if before else []))
        page: list[Chat | Notice] = []
        while True:
            event = wait_for(client, lambda e: isinstance(e, History) or (isinstance(e, Chat | Notice) and e.history))
            if isinstance(event, History):
                break
            page.append(event)
        lines = page + lines
        if not page or not event.more:
            break
        before = page[0].id
    return lines


def texts(events: list) -> list[str]:
    return [event.text for event in events if isinstance(event, Chat)]


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Server processes a test starts (and may kill); each is stopped at teardown."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        if process.process.poll() is None:
            process.stop()
        else:
            with contextlib.suppress(Exception):
                process.process.communicate(timeout=TIMEOUT)


@pytest.fixture
def clients() -> Iterator[list[ChatClient]]:
    made: list[ChatClient] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (mode 0700) mounted for this test alone; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; returns the filler file (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


# --------------------------------------------------------------------------- 1. kill -9


def alice_says_then_the_server_is_killed(args, processes, clients, tmp_path, text: str) -> tuple[ChatClient, Chat]:
    """A server started with ``args``, alice logged in: she says ``text`` and, once it is echoed, the
    server is killed (-9). Returns alice and the echo."""
    processes.append(ServerProcess(args))
    alice = log_in(processes[-1], "alice", tmp_path)
    clients.append(alice)
    drain(alice, quiet=0.2)
    alice.say(text)
    echo = wait_for(alice, chat_with(text))
    processes[-1].process.kill()
    processes[-1].process.wait()
    return alice, echo


def test_a_line_echoed_before_a_kill_9_is_in_the_history_after_the_restart(tmp_path, users_file, processes, clients):
    """The echo is the server's word that a line is accepted (README: "Your own lines appear once the
    server has accepted them"). The store wrote behind, in batches gathered for 50 ms: a kill -9 a few
    ms after the echo lost the line. Now nothing is handed out before it is committed."""
    args = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    _, echo = alice_says_then_the_server_is_killed(args, processes, clients, tmp_path, "the accepted line")

    processes.append(ServerProcess(args))
    bob = log_in(processes[1], "bob", tmp_path)
    clients.append(bob)
    drain(bob, quiet=0.3)
    kept = {(event.id, event.text) for event in room_history(bob) if isinstance(event, Chat)}
    assert (echo.id, "the accepted line") in kept, f"accepted as id {echo.id}, gone after the restart: {kept}"


def test_an_id_is_never_given_twice_across_a_kill_9(tmp_path, users_file, processes, clients):
    """After a kill -9 the numbering restarts from the last id committed (MemoryBackend.__init__:
    store.last_id()). When lines were handed out before they were committed, the next line got the id
    of a line a device had seen, and that device, resuming with since=that id, never got it."""
    port = free_port()
    args = ["--port", str(port), "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    alice, seen = alice_says_then_the_server_is_killed(
        args, processes, clients, tmp_path, "alice's last line before the crash"
    )
    wait_for(alice, is_disconnected)

    processes.append(ServerProcess(args))  # the same port: alice's device comes back to it
    bob = log_in(processes[1], "bob", tmp_path)
    clients.append(bob)
    drain(bob, quiet=0.3)
    bob.say("bob's line after the restart")
    said = wait_for(bob, chat_with("bob's line after the restart"))
    assert said.id > seen.id, f"id {said.id} given again (alice's device saw id {seen.id} before the crash)"

    alice.close()
    alice.connect()
    alice.resume()  # since = the newest id her device saw
    caught_up = drain(alice, quiet=0.5)
    assert "bob's line after the restart" in texts(caught_up), "alice's device never gets bob's line"


# --------------------------------------------------------------------------- 2. a full disk


def start_on(disk: Path, users: Path) -> tuple[list[str], Path]:
    data = disk / "data"
    return ["--port", "0", "--users", str(users), "--data-dir", str(data)], data


def test_lines_accepted_on_a_full_disk_are_not_lost_at_a_clean_restart(
    tiny_disk, tmp_path, users_file, processes, clients
):
    """On a full disk every line was still echoed, and a private line to someone offline answered
    "they will see your message when they next log in", then dropped at the next stop. Each is now
    refused to its sender in one line, and nothing refused comes back after the restart."""
    args, _ = start_on(tiny_disk, users_file)
    processes.append(ServerProcess(args))
    alice = log_in(processes[0], "alice", tmp_path)
    clients.append(alice)
    drain(alice, quiet=0.3)
    filler = fill(tiny_disk)

    room_ref = alice.say("said while the disk was full " + "x" * 2000)
    private_ref = alice.private("carol", "kept for carol while the disk was full")
    answers = drain(alice, quiet=1.0)
    refused = {event.ref for event in answers if isinstance(event, ErrorReply)}
    echoed = {event.ref for event in answers if isinstance(event, Chat) and event.ref}
    told_kept = any(isinstance(e, Notice) and "will see your message" in e.text for e in answers)
    assert room_ref in refused | echoed and private_ref in refused | echoed, answers
    assert {room_ref, private_ref} <= refused and not told_kept, answers
    reasons = {event.message for event in answers if isinstance(event, ErrorReply)}
    assert reasons == {"not sent: the server could not save it (database or disk is full)"}, reasons

    processes[0].stop()  # a clean stop, while the disk is still full
    filler.unlink()
    processes.append(ServerProcess(args))
    carol = log_in(processes[1], "carol", tmp_path)
    clients.append(carol)
    seen_by_carol = texts(drain(carol, quiet=0.5))
    kept = texts(room_history(carol))

    lost = []
    if room_ref in echoed and not any(text.startswith("said while the disk was full") for text in kept):
        lost.append("the room line (echoed to alice)")
    if private_ref in echoed and "kept for carol while the disk was full" not in seen_by_carol:
        lost.append(f"the private line (echoed; alice was told it was kept: {told_kept})")
    assert not lost, f"accepted, then lost at the restart: {lost}"


def test_a_ban_a_topic_and_a_room_made_on_a_full_disk_are_not_lost_at_a_clean_restart(
    tiny_disk, tmp_path, users_file, processes, clients
):
    """On a full disk /ban told the room erin was banned, /topic the new topic, and /join of a new
    room "you are in" it, all lost at the next stop: erin, banned, walked back in. Each change now
    waits for its write, and one that is not saved is undone and refused to its author."""
    args, _ = start_on(tiny_disk, users_file)
    processes.append(ServerProcess(args))
    alice = log_in(processes[0], "alice", tmp_path)
    clients.append(alice)
    alice.join("#alices")  # made (and stored) while there is room on the disk
    wait_for(alice, lambda e: isinstance(e, Room) and e.room == "#alices")
    drain(alice, quiet=0.5)
    filler = fill(tiny_disk)

    alice.command("ban", "#alices", "erin")
    alice.command("topic", "#alices", "the topic set on a full disk")
    alice.join("#made-on-a-full-disk")
    answers = drain(alice, quiet=1.0)
    banned = any(isinstance(e, Notice) and e.event == "moderation" and e.target == "erin" for e in answers)
    topic_set = any(isinstance(e, Notice) and e.event == "topic" for e in answers)
    room_made = any(isinstance(e, Room) and e.room == "#made-on-a-full-disk" and e.joined for e in answers)
    assert banned or any(isinstance(e, ErrorReply) for e in answers), answers
    refusals = [e for e in answers if isinstance(e, ErrorReply)]
    assert not (banned or topic_set or room_made) and len(refusals) == 3, answers
    assert all("could not save it (database or disk is full)" in e.message for e in refusals), refusals

    processes[0].stop()  # a clean stop, while the disk is still full
    filler.unlink()
    processes.append(ServerProcess(args))
    again = log_in(processes[1], "alice", tmp_path)
    clients.append(again)
    rooms = {e.room: e for e in drain(again, quiet=0.5) if isinstance(e, Room)}
    erin = log_in(processes[1], "erin", tmp_path)
    clients.append(erin)
    drain(erin, quiet=0.3)
    erin.join("#alices")
    erin_got_in = any(isinstance(e, Room) and e.room == "#alices" and e.joined for e in drain(erin, quiet=0.5))

    lost = []
    if banned and erin_got_in:
        lost.append("erin's ban (she is back in #alices)")
    if topic_set and "#alices" in rooms and rooms["#alices"].topic != "the topic set on a full disk":
        lost.append(f"#alices' topic (now {rooms['#alices'].topic!r})")
    if room_made and "#made-on-a-full-disk" not in rooms:
        lost.append("the room alice made (and her place in it)")
    assert not lost, f"told done, then lost at the restart: {lost}"


# --------------------------------------------------------------------------- 3. files at start


@pytest.mark.parametrize("damage", ["deleted", "another key"])
def test_history_stored_under_a_history_key_that_is_gone_is_refused_at_start(
    damage, tmp_path, users_file, processes, clients
):
    """history_key deleted (or replaced, say by a restore that missed it) while history.sqlite3 holds
    lines: the server made a new key and started as if nothing were wrong, and every stored line (the
    private lines kept for offline accounts among them) failed to decrypt. The start is refused in one
    line naming history_key."""
    data = tmp_path / "data"
    args = ["--port", "0", "--users", str(users_file), "--data-dir", str(data)]
    processes.append(ServerProcess(args))
    alice = log_in(processes[0], "alice", tmp_path)
    clients.append(alice)
    drain(alice, quiet=0.2)
    alice.private("bob", "kept for bob")
    wait_for(alice, chat_with("kept for bob"))
    alice.leave()
    processes[0].stop()

    key = data / "history_key"
    key.unlink()
    if damage == "another key":
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
    try:
        started = ServerProcess(args)
    except RuntimeError as refused:  # it exited: that is what should happen
        message = str(refused)
        lines = [line.strip() for line in message.split("server exited:", 1)[-1].splitlines() if line.strip()]
        assert "Traceback" not in message, message
        assert lines and lines[-1].startswith("error: ") and "history_key" in lines[-1], message
        return
    processes.append(started)
    bob = log_in(started, "bob", tmp_path)
    clients.append(bob)
    shown = texts(drain(bob, quiet=0.5))
    pytest.fail(f"started with a new history key over stored history; bob was shown {shown} (not 'kept for bob')")


# --------------------------------------------------------------------------- 5. the revocation journal


def test_a_resume_refused_with_try_again_works_when_tried_again(server, connect):
    """A resume while the revocation journal cannot be written is refused with "the server cannot
    record sessions just now; try again" (listener.authenticate_token). The old session used to be
    revoked in memory all the same, so trying again always got "token was given up; log in again";
    now a session is spent only once that is recorded."""
    bob = connect("bob")
    drain(bob, quiet=0.2)
    journal = server.tokens.revoked_path
    if journal.exists():
        journal.unlink()
    journal.mkdir()  # cannot be written now, as on a full disk
    try:
        bob._shutdown_socket()
        wait_for(bob, is_disconnected)
        bob.close()
        bob.connect()
        with pytest.raises(LoginRefused) as refused:
            bob.resume()
        assert "try again" in str(refused.value)
    finally:
        journal.rmdir()
    bob.connect()
    try:
        bob.resume()
    except LoginRefused as again:
        pytest.fail(f"told to try again; tried again with the journal writable: {again}")
    finally:
        bob.close()


# --------------------------------------------------------------------------- 6. saved, then handed out

KEY = bytes(range(32))


# --------------------------------------------------------------------------- helpers


class Recorder:
    """A subscriber that keeps what the backend hands out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.room_events: list[object] = []

    def on_room_event(self, room, message, origin_session, ref) -> None:
        with self.lock:
            self.room_events.append(message)

    def on_private(self, account, message, origin_session, ref) -> None:
        pass

    def on_presence(self, room, notice) -> None:
        pass

    def on_account_changed(self, account) -> None:
        pass

    def handed_out(self) -> list[int]:
        with self.lock:
            return [event.id for event in self.room_events]


def hold_writer(store: ChatStore) -> threading.Event:
    """Hold the store's writer inside a step of its own (a commit that takes long) until the event is set."""
    inside, release = threading.Event(), threading.Event()

    def hold(connection) -> None:
        inside.set()
        release.wait(TIMEOUT * 2)

    store._run_on_writer(hold)
    assert inside.wait(TIMEOUT)
    return release


def read_only(connection) -> None:
    connection.execute("PRAGMA query_only = ON")  # every later write fails, as on a full disk


def writable(connection) -> None:
    connection.execute("PRAGMA query_only = OFF")


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``target`` in a thread; the list gets what it raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


@pytest.fixture
def memory_backend(tmp_path: Path) -> Iterator[tuple[MemoryBackend, Recorder]]:
    """A MemoryBackend on a real ChatStore, handing out to a Recorder; closed (threads joined) at teardown."""
    store = ChatStore(tmp_path / "history.sqlite3", KEY)
    backend = MemoryBackend(store)
    recorder = Recorder()
    backend.start(recorder)
    yield backend, recorder
    store._run_on_writer(writable)
    backend.close()


def a_line(text: str) -> ChatMessage:
    return ChatMessage(sender="alice", text=text, sent_at=0.0, room="#r")


def history_page(client, room: str = "#lobby") -> list[object]:
    """One page of /history: its lines, up to the closing History."""
    client.command("history", room, "50")
    page: list[object] = []
    while True:
        event = wait_for(client, lambda e: isinstance(e, History) or (isinstance(e, Chat) and e.history))
        if isinstance(event, History):
            return page
        page.append(event)


def drop(client, server) -> None:
    """The client's link dies; returns once the server has closed its session."""
    name = client.username
    client._shutdown_socket()
    wait_for(client, is_disconnected)
    client.close()
    wait_until(lambda: not server.hub.local_sessions(name))


# --------------------------------------------------------------------------- 1. a committed line handed to nobody


def test_a_line_committed_before_its_publisher_looks_at_it_is_still_handed_out(memory_backend):
    """MemoryBackend._publish queues an event for the deliverer only ``if write.problem is None``. That
    test means "not refused at once", but the writer may already have committed the write (problem "")
    between ``store.append`` returning and the test (the publisher descheduled for the length of one
    commit): the line is then saved and its author told so, but the deliverer never gets it: no echo (the
    client counts the line as not sent, and its user sends it again), nobody in the room sees it, and
    the connection's count of echoes due never comes down (/part and /quit wait ECHO_WAIT for it)."""
    backend, recorder = memory_backend
    append = backend.store.append

    def append_then_descheduled(message):
        write = append(message)
        write.wait(TIMEOUT)  # the writer commits before the publisher runs its next line
        return write

    backend.store.append = append_then_descheduled  # type: ignore[method-assign]
    said = backend.publish_room("#r", a_line("committed, told saved"))  # returns: saved
    deadline = time.monotonic() + 1.0
    while said.id not in recorder.handed_out() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert said.id in recorder.handed_out(), "the line was saved and its author told so, but handed to nobody"


# --------------------------------------------------------------------------- 2. reads hand out what is not saved


def test_a_line_that_is_never_saved_is_not_shown_by_history_meanwhile(server, connect):
    """ChatStore's reads merged lines queued and not yet committed. Once a failed batch failed its lines
    (their senders told "not sent"), /history, a resume's catch-up and a fresh room's join history could
    show a line that was then refused, and whose id a restart gave again. Reads now show what is
    committed and handed out."""
    alice, bob = connect("alice"), connect("bob")
    drain(alice, quiet=0.2)
    drain(bob, quiet=0.2)
    store = server.hub.backend.store
    release = hold_writer(store)
    try:
        store._run_on_writer(read_only)  # the commit after the held step fails
        ref = alice.say("a line the server could not save")
        wait_until(lambda: any(isinstance(op, StoredMessage) for op, _ in store._write_queue))  # queued
        shown_to_bob = [event.text for event in history_page(bob)]
    finally:
        release.set()
    refused = wait_for(alice, lambda e: isinstance(e, ErrorReply) and e.ref == ref)
    assert "could not save it" in refused.message
    assert store._run_on_writer(writable).wait(TIMEOUT) == ""
    assert "a line the server could not save" not in shown_to_bob, (
        "bob's /history showed a line that was then refused to its sender as not saved"
    )


# --------------------------------------------------------------------------- 3. a resume's catch-up, then the live feed


def test_a_line_saved_but_not_yet_handed_out_reaches_a_resuming_device_once(server, connect):
    """A device resuming reads what it missed from the store (history_since), then is put in the room,
    whose live feed is the deliverer. A line committed but not yet handed out (the deliverer is a step
    behind the writer, by design) is in both: the catch-up has it, and the deliverer then hands it to
    the room, the resumed session included (Room.deliver_published knows only ids it handed out
    itself), and the client keeps no ids of room lines to drop a repeat. Reads now stop at the last id
    the deliverer handed out: what comes after reaches the session live, once."""
    alice, bob = connect("alice"), connect("bob")
    drain(alice, quiet=0.2)
    alice.say("seen by bob")
    wait_for(bob, chat_with("seen by bob"))
    drop(bob, server)

    hub = server.hub
    handing_out = hub.on_room_event
    inside, release = threading.Event(), threading.Event()

    def slow_delivery(room, message, origin_session, ref):  # a big room's fan-out, say
        if isinstance(message, ChatMessage) and message.text == "said while bob was away":
            inside.set()
            release.wait(TIMEOUT * 2)
        handing_out(room, message, origin_session, ref)

    hub.on_room_event = slow_delivery  # type: ignore[method-assign]
    try:
        alice.say("said while bob was away")
        assert inside.wait(TIMEOUT)
        alice.say("said right after")
        backend = hub.backend
        wait_until(lambda: not backend.store._write_queue and len(backend._to_deliver) == 2)  # both committed
        bob.connect()
        bob.resume()
        caught_up = drain(bob, quiet=0.5)  # the catch-up, while the deliverer is held
    finally:
        release.set()
    wait_for(alice, chat_with("said right after"))
    live = drain(bob, quiet=0.5)
    shown = [event.text for event in caught_up + live if isinstance(event, Chat)]
    for text in ("said while bob was away", "said right after"):
        assert shown.count(text) == 1, (text, caught_up, live)


# --------------------------------------------------------------------------- 4. a refused line is not a lost line


def test_a_line_refused_to_its_sender_is_not_counted_as_missed_at_a_resume(server, connect):
    """A line is numbered (its room's sequence number taken) before it is saved; one that cannot be
    saved is refused to its sender and shown to nobody, but its number stays taken. A device resuming
    is told of lines "missing" by the gap in the sequence numbers (hub._enter: first_seq - seen - 1),
    so it is told a line was lost to it that nobody ever saw. Before, a line was handed out whatever
    happened to its write, so a gap was a line that existed."""
    alice, bob = connect("alice"), connect("bob")
    drain(alice, quiet=0.2)
    alice.say("seen by bob")
    wait_for(bob, chat_with("seen by bob"))
    drop(bob, server)
    store = server.hub.backend.store
    assert store._run_on_writer(read_only).wait(TIMEOUT) == ""
    try:
        ref = alice.say("refused: the disk is full")
        wait_for(alice, lambda e: isinstance(e, ErrorReply) and e.ref == ref)
    finally:
        assert store._run_on_writer(writable).wait(TIMEOUT) == ""
    alice.say("said once the disk had room")
    wait_for(alice, chat_with("said once the disk had room"))
    bob.connect()
    bob.resume()
    events = drain(bob, quiet=0.5)
    assert "said once the disk had room" in [e.text for e in events if isinstance(e, Chat)], events
    told = [event for event in events if isinstance(event, History) and event.room == "#lobby"]
    assert told and told[-1].missing == 0, f"bob is told of lines lost that nobody saw: {told}"


def test_a_ban_whose_notice_cannot_be_saved_still_takes_its_target_out_and_says_so(server, connect):
    """/ban is several writes: the ban, the invitation's and the membership's removal, then the notice,
    whose hand-out takes the target out of the room. When only the notice cannot be saved (a disk with
    room for a small row of state but not for a sealed line), the op was told "not sent" although the
    ban was in force, and erin stayed in the room, silenced and told nothing. The ban stands, erin is
    taken out, and the op is told in one line that the room could not be told."""
    alice, erin = connect("alice"), connect("erin")
    alice.join("#alices")
    wait_for(alice, lambda e: getattr(e, "room", None) == "#alices" and getattr(e, "joined", False))
    erin.join("#alices")
    wait_for(erin, lambda e: getattr(e, "room", None) == "#alices" and getattr(e, "joined", False))
    drain(alice, quiet=0.2)
    drain(erin, quiet=0.2)
    backend = server.hub.backend
    publish = backend.publish_room

    def disk_full_by_the_notice(room, message, *args, **kwargs):
        if getattr(message, "event", "") == "moderation":
            assert backend.store._run_on_writer(read_only).wait(TIMEOUT) == ""
        return publish(room, message, *args, **kwargs)

    backend.publish_room = disk_full_by_the_notice  # type: ignore[method-assign]
    try:
        alice.command("ban", "#alices", "erin")
        refused = wait_for(alice, lambda e: isinstance(e, ErrorReply))
    finally:
        backend.publish_room = publish  # type: ignore[method-assign]
        assert backend.store._run_on_writer(writable).wait(TIMEOUT) == ""
    assert refused.message.startswith("erin is banned from #alices, but the room could not be told: "), refused
    assert server.hub.room_state("#alices").ban_of("erin") is not None
    out = wait_for(erin, lambda e: isinstance(e, Room) and e.room == "#alices" and not e.joined)
    assert "banned erin" in out.reason
    erin.join("#alices")
    assert wait_for(erin, lambda e: isinstance(e, ErrorReply)).code == "banned"


def test_a_change_found_already_made_waits_for_that_change_to_be_saved(memory_backend):
    """_change_state returned True at once when the key already held the value, and create_room False
    ("exists") at once, though that value or room was another caller's change still waiting for its
    write. When that write failed it was undone: the second op's ban was told done and not in force, a
    /join entered a room that no longer existed. A change of a key now waits for the one before it."""
    backend, _ = memory_backend
    store = backend.store
    release = hold_writer(store)
    try:
        store._run_on_writer(read_only)
        first_ban, first_ban_refused = in_thread(lambda: backend.set_state("#r", "ban:erin", "0"))
        wait_until(lambda: backend.state("#r").get("ban:erin") == "0")  # in memory, its write queued
        second_ban, second_ban_refused = in_thread(lambda: backend.set_state("#r", "ban:erin", "0"))
        first_room, first_room_refused = in_thread(lambda: backend.create_room(RoomRecord("#new", owner="a"), 0))
        wait_until(lambda: backend.room("#new") is not None)
        made: list[bool] = []
        second_room, second_room_refused = in_thread(
            lambda: made.append(backend.create_room(RoomRecord("#new", owner="b"), 0))
        )
        time.sleep(0.2)
        assert second_ban.is_alive() and second_room.is_alive()  # each waits for the write before it
    finally:
        release.set()
    for thread in (first_ban, second_ban, first_room, second_room):
        thread.join(TIMEOUT)
    assert first_ban_refused and first_room_refused  # the disk refuses every write
    # Each second change was tried on its own, and refused as well: nothing told done is undone.
    assert second_ban_refused and second_room_refused and not made
    assert "ban:erin" not in backend.state("#r") and backend.room("#new") is None
    store._run_on_writer(writable)
    backend.set_state("#r", "ban:erin", "0")
    assert store.load_state()["#r"] == {"ban:erin": "0"}


def backup_like_the_readme(data_dir: Path, copy: Path) -> None:
    """`sqlite3 history.sqlite3 ".backup copy.sqlite3"`, as an operator's shell makes the copy (umask 022)."""
    old = os.umask(0o022)
    try:
        source = sqlite3.connect(data_dir / "history.sqlite3")
        target = sqlite3.connect(copy)
        with target:
            source.backup(target)
        source.close()
        target.close()
    finally:
        os.umask(old)


def test_a_history_database_restored_from_the_readmes_backup_is_made_private(tmp_path, users_file):
    """README, Backups: "while it runs with `sqlite3 history.sqlite3 ".backup copy.sqlite3"` beside a copy
    of the other files". The sqlite3 shell writes the copy with the operator's umask: 0644. Restored
    (`cp -p copy.sqlite3 /srv/chat/history.sqlite3`, the other files copied as they are), the server
    starts without a word and keeps it, and the -wal and -shm it makes beside it, readable by every user
    of the machine: room names and topics, who wrote privately to whom and when, ban reasons, ignore
    lists are in clear there (README, Security model). users.json in the same state is "made private
    (0600) with a warning". Should: the same for history.sqlite3 (or a refusal naming it).
    """
    data = tmp_path / "data"
    first = ServerProcess(["--port", "0", "--users", str(users_file), "--data-dir", str(data)])
    alice = log_in(first, "alice", tmp_path)
    alice.say("a line to back up")
    alice.close()
    copy = tmp_path / "copy.sqlite3"
    backup_like_the_readme(data, copy)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o644
    first.stop()

    restored = tmp_path / "restored"
    restored.mkdir()  # as `mkdir` makes it: 0755
    for name in ("server_key.pem", "token_secret", "history_key"):
        shutil.copy2(data / name, restored / name)
    shutil.copy2(copy, restored / "history.sqlite3")
    second = ServerProcess(["--port", "0", "--users", str(users_file), "--data-dir", str(restored)])
    try:
        exposed = {
            path.name: oct(stat.S_IMODE(path.stat().st_mode))
            for path in restored.iterdir()
            if path.name.startswith("history.sqlite3") and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        }
    finally:
        second.stop()
    assert not exposed, f"the server serves from history files others can read: {exposed}"


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` as the server's user cannot write it (a file root restored, root-owned, 0644).

    Root writes any file whatever its mode, so as root the file is bind-mounted read-only on itself.
    """
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.strip()}")
    try:
        again = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
        if again.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {again.stderr.strip()}")
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_history_database_the_server_cannot_write_stops_it_at_start(tmp_path, users_file):
    """The README's live backup run as root (`sqlite3 history.sqlite3 ".backup copy.sqlite3"`), restored
    as root (`cp copy.sqlite3 /var/lib/securechat/history.sqlite3`), leaves a history database the
    `securechat` user can read but not write. The server starts anyway: "Listening on ...", one
        ERROR .../history.sqlite3: could not delete old history: attempt to write a readonly database
    (which speaks of old history), and from then on every login is refused ("the server could not save
    it (attempt to write a readonly database); try again in a moment"), or, where one gets in, every
    line, /join of a new room, topic, ban... is refused with "not sent: the server could not save it",
    while systemd shows the service as running. A damaged database or a wrong history_key stop the server
    at start in one line. Should: the same here: exit status 1 and one line naming the file and that the
    server cannot write it (a fix such as `chown`), before it listens.
    """
    data = tmp_path / "data"
    first = ServerProcess(["--port", "0", "--users", str(users_file), "--data-dir", str(data)])
    first.stop()
    history = data / "history.sqlite3"
    for leftover in ("history.sqlite3-wal", "history.sqlite3-shm"):
        with contextlib.suppress(FileNotFoundError):
            (data / leftover).unlink()
    with unwritable(history):
        try:
            process = ServerProcess(["--port", "0", "--users", str(users_file), "--data-dir", str(data)])
        except RuntimeError as exc:  # it refused to start: what the operator should see
            message = str(exc)
            assert "Traceback" not in message and str(history) in message, message
            return
        answer: object = None
        try:
            try:
                alice = log_in(process, "alice", tmp_path)
            except LoginRefused as exc:  # what the users see: "... try again in a moment", forever
                answer = exc
            else:
                try:
                    ref = alice.say("can anyone hear me?")
                    deadline = time.monotonic() + TIMEOUT
                    while time.monotonic() < deadline and answer is None:
                        event = alice.next_event(timeout=deadline - time.monotonic())
                        if isinstance(event, ErrorReply | Chat) and getattr(event, "ref", "") == ref:
                            answer = event
                finally:
                    alice.close()
        finally:
            _, stderr = process.stop()
    pytest.fail(f"the server started on a history database it cannot write; a user got {answer!r}; it logged: {stderr}")


# --------------------------------------------------------------------------- 5. a full disk


def test_a_start_on_a_full_disk_says_the_disk_is_full(tiny_disk, tmp_path, users_file):
    """README, Durability: on a full disk the server refuses each line "(database or disk is full)" and
    goes on serving. But a restart while the disk is full (systemd's Restart=on-failure after a crash, a
    reboot, `systemctl restart chat`) ends with
        ERROR .../revoked_sessions: cannot save revoked sessions: No space left on device
        error: .../history.sqlite3: disk I/O error
    exit 1, restarted every 2 s until systemd gives up: "disk I/O error" sends the operator to look for a
    failing disk, not for space. Should: start and serve as a running server does on a full disk, or
    refuse in one line that says the disk (or database) is full.
    """
    data = tiny_disk / "data"
    args = ["--port", "0", "--users", str(users_file), "--data-dir", str(data)]
    first = ServerProcess(args)
    alice = log_in(first, "alice", tmp_path)
    alice.say("before the disk filled up")
    alice.close()
    first.stop()
    filler = fill(tiny_disk)
    try:
        try:
            second = ServerProcess(args)
        except RuntimeError as exc:
            errors = [line for line in str(exc).splitlines() if "error:" in line]
            assert errors, str(exc)
            said = errors[-1].replace(str(tmp_path), "TMP")  # (the test's own folder is named "...full_disk...")
            assert re.search(r"full|no space", said, re.IGNORECASE), (
                f"refused with {errors[-1]!r}, which does not say the disk is full"
            )
            return
        second.stop()  # it started on the full disk: what a running server does too
    finally:
        filler.unlink()


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root, to run the store as another user (setpriv)",
)
def test_a_database_the_server_may_write_but_does_not_own_still_opens(request):
    """_make_private chmods a database readable by others and, if chmod fails, refuses to start. A
    database the server can read and write but does not own (restored by root with mode 0666, or a
    group-writable file of a group the server is in) cannot be chmodded by it (EPERM): the server
    that ran on it yesterday now refuses to start ("cannot make it private: Operation not
    permitted"). It should open it (saying it is readable by others), as before."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="review-today-"))  # pytest's own folders are root's alone (0700)
    top.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(top, ignore_errors=True))
    data = top / "data"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65534)
    path = data / "history.sqlite3"
    import sqlite3

    made = sqlite3.connect(path)
    made.execute("create table leftover (x)")  # any healthy SQLite file: the store makes its tables
    made.commit()
    made.close()
    path.chmod(0o666)  # owned by root, writable by the server's user
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from pathlib import Path; from securechat.history import ChatStore;"
        "store = ChatStore(Path(sys.argv[2]), b'k' * 32); store.close(); print('opened')"
    )
    done = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
            str(ROOT),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "opened" in done.stdout, f"refused: {done.stderr.strip().splitlines()[-1:]}"
