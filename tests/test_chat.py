"""The chat as its users see it: real server on port 0, real clients over loopback.

Each test reads like a scene: people log in, someone speaks, the others hear.
"""

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    ROOT,
    TIMEOUT,
    chat_with,
    drain,
    drop_and_resume,
    is_disconnected,
    joined,
    left,
    password_of,
    wait_for,
)

from securechat import hub, rooms
from securechat.accounts import AccountBan, LoginThrottle
from securechat.client import (
    Chat,
    ChatClient,
    ChatError,
    Disconnected,
    ErrorReply,
    Goodbye,
    History,
    KnownHosts,
    LoginRefused,
    Notice,
    Roster,
)
from securechat.hub import PAGE_BUDGET, paginate
from securechat.protocol import MAX_FRAME_SIZE, Joined, Say, sealed_frame_size
from securechat.protocol import Room as RoomMessage
from securechat.rooms import Room, merge_join_notices

# --------------------------------------------------------------------------- helpers

#: Ids for the lines the tests hand to a room (ids rise in a room).
LINE_IDS = itertools.count(1)


def log_in_all(connect, *names, **options):
    """Log each person in, and wait until everyone already present has seen them join."""
    clients = []
    for name in names:
        client = connect(name, **options)
        for earlier in clients:
            wait_for(earlier, joined(name))
        clients.append(client)
    return clients


def collect_chats(client, count):
    """Exactly the next ``count`` chat lines ``client`` receives (other events are skipped)."""
    received = []
    while len(received) < count:
        event = client.next_event(timeout=TIMEOUT)
        if event is None or isinstance(event, Disconnected):
            pytest.fail(f"{client.username} got {len(received)} of {count} lines, then {event!r}")
        if isinstance(event, Chat):
            received.append(event)
    return received


def chats_in(events):
    return [event for event in events if isinstance(event, Chat)]


def send_sealed(client, message):
    """Send a hand-made message on a logged-in client's own secure channel."""
    client._send(lambda token: message)


def assert_chatting(speaker, listener, text):
    speaker.say(text)
    heard = wait_for(listener, chat_with(text))
    assert heard.sender == speaker.username


def lose_connection(client):
    """Cut the client's link under it (no goodbye), as a dropped Wi-Fi would."""
    lost_socket = client.sock
    lost_socket.shutdown(socket.SHUT_RDWR)
    wait_for(client, is_disconnected)
    return lost_socket


# --------------------------------------------------------------------------- talking


@pytest.mark.parametrize("send_workers", [1, 3])
def test_every_line_reaches_every_other_member_once_in_order(make_server, connect, send_workers):
    server = make_server(send_workers=send_workers)  # several workers: each connection still has one
    clients = log_in_all(connect, "alice", "bob", "carol", to=server)
    rounds = 15
    for number in range(rounds):
        for client in clients:
            client.say(f"{client.username} line {number}")

    for receiver in clients:
        # Everyone's lines, and its own back as echoes (each carrying the ref it was sent with).
        received = collect_chats(receiver, rounds * len(clients))
        own = [message for message in received if message.sender == receiver.username]
        assert own and all(message.ref for message in own), "an own line came back without its ref"
        assert not [message for message in received if message.sender != receiver.username and message.ref]
        for sender in clients:
            from_sender = [message.text for message in received if message.sender == sender.username]
            assert from_sender == [f"{sender.username} line {number}" for number in range(rounds)]
        assert not chats_in(drain(receiver)), "a line arrived twice"


def test_long_and_non_ascii_lines_arrive_intact(connect):
    alice, bob, carol = log_in_all(connect, "alice", "bob", "carol")
    pattern = "All work and no play makes Jack a dull boy. 0123456789 "
    long_text = (pattern * (10_000 // len(pattern) + 1))[:10_000]
    international = "Zoë, François & Ægir: naïve café, ñandú — 你好世界 こんにちは 안녕 😀🎉👩‍💻 Ελληνικά"
    alice.say(long_text)
    alice.say(international)
    for listener in (bob, carol):
        first, second = collect_chats(listener, 2)
        assert len(first.text) == 10_000
        assert first.text == long_text
        assert second.text == international
        assert first.sender == second.sender == "alice"


def test_wrong_password_and_unknown_user_get_the_same_refusal(connect):
    bob = connect("bob")
    with pytest.raises(LoginRefused) as wrong_password:
        connect("alice", password="not-alice-s-password")
    with pytest.raises(LoginRefused) as unknown_user:
        connect("mallory", password="anything-at-all")
    assert wrong_password.value.code == unknown_user.value.code == "auth_failed"
    assert str(wrong_password.value) == str(unknown_user.value)
    assert not [event for event in drain(bob) if isinstance(event, Notice) and event.event == "joined"]
    # The refusals did not lock the right password out.
    connect("alice")
    wait_for(bob, joined("alice"))


def test_a_name_typed_in_another_case_logs_in_to_the_account_as_it_is_spelled(connect):
    bob = connect("bob")
    alice = connect("ALICE", password=password_of("alice"))  # names are unique in any case
    assert alice.username == "alice"
    wait_for(bob, joined("alice"))
    alice.say("typed in capitals")
    assert wait_for(bob, chat_with("typed in capitals")).sender == "alice"
    drop_and_resume(alice)  # the session's token names the account as stored
    alice.say("and back")
    assert wait_for(bob, chat_with("and back")).sender == "alice"


def test_join_and_leave_notices_carry_the_parting_words(connect):
    alice, bob = log_in_all(connect, "alice", "bob")
    carol = connect("carol")
    for listener in (alice, bob):
        wait_for(listener, joined("carol"))
    assert sorted(carol.members) == ["alice", "bob", "carol"]

    carol.leave("gone fishing")
    for listener in (alice, bob):
        notice = wait_for(listener, left("carol"))
        assert "gone fishing" in notice.text
    carol_events = drain(carol, quiet=0.1)
    assert any(isinstance(event, Goodbye) for event in carol_events)
    assert isinstance(carol_events[-1], Disconnected) and carol_events[-1].clean

    # Losing the link without a word is a leave too.
    lost = lose_connection(bob)
    try:
        wait_for(alice, left("bob"))
    finally:
        lost.close()


def test_queued_join_notices_merge_only_when_adjacent():
    chat = Say(token="t", text="between")
    queued = [
        Notice(event="joined", name="a"),
        Notice(event="joined", name="b"),
        Notice(event="joined", name="c"),
        chat,
        Notice(event="left", name="a"),
        Notice(event="joined", name="d"),
        b"ping",
        Notice(event="joined", name="e"),
    ]
    assert merge_join_notices(queued) == [
        Joined(names=["a", "b", "c"]),
        chat,
        Notice(event="left", name="a"),
        Notice(event="joined", name="d"),
        b"ping",
        Notice(event="joined", name="e"),
    ]
    alone = [Notice(event="joined", name="a")]
    assert merge_join_notices(alone) == alone  # a recipient that keeps up sees no difference


class Listener:
    """A room member that keeps what it is handed (the room needs a name, a session id and deliver)."""

    def __init__(self, name, session_id=""):
        self.name = name
        self.session_id = session_id or f"{name}-session"
        self.received = []

    def deliver(self, message):
        self.received.append(message)

    def joins(self):
        names = []
        for message in self.received:
            if isinstance(message, Joined):
                names.extend(message.names)
            elif isinstance(message, Notice) and message.event == "joined":
                names.append(message.name)
        return names


def new_room(**options):
    """A room for these tests, "#test", that no server holds."""
    return Room("#test", **options)


def joined_notice(name):
    return Notice(event="joined", name=name, room="#test")


def say(room, sender, text):
    """What the hub does for a line: its sender's join goes out first, then the numbered line."""
    room.before_line_from(sender.name)
    line_id = next(LINE_IDS)
    room.deliver_published(
        Chat(sender=sender.name, text=text, sent_at=time.time(), room="#test", id=line_id, seq=line_id)
    )


def roster_of(room, member):
    """Join ``member`` and return the roster its welcome was given."""
    seen = []
    room.join(member, welcome=lambda roster, devices, recent, news: seen.append(roster))
    return seen[0]


def room_with(*names):
    """A room whose notices go out only when a test sends them, holding ``names``, already announced."""
    room = new_room(join_notice_delay=60)
    members = [Listener(name) for name in names]
    for member in members:
        room.join(member)
    room.send_join_notices()
    return room, members


def test_joins_in_a_burst_go_out_together_and_each_member_hears_of_those_after_it():
    room, (old,) = room_with("old")
    burst = [Listener(name) for name in ("a", "b", "c")]
    for member in burst:
        roster = roster_of(room, member)
    assert roster == ["a", "b", "c", "old"]
    assert old.received == []  # gathered, not sent one by one
    room.send_join_notices()
    assert old.received == [Joined(names=["a", "b", "c"], room="#test")]  # one frame for the whole burst
    assert burst[0].received == [Joined(names=["b", "c"], room="#test")]  # "a" saw "old" in its welcome roster
    assert burst[1].received == [joined_notice("c")]
    assert burst[2].received == []
    room.close()


def test_nothing_about_a_member_overtakes_its_join_notice():
    room, (old,) = room_with("old")
    quick = Listener("quick")
    room.join(quick)
    say(room, quick, "hello at once")
    assert old.joins() == ["quick"] and isinstance(old.received[-1], Chat)
    leaver = Listener("leaver")
    room.join(leaver)
    room.leave(leaver, "gone")
    assert old.joins() == ["quick", "leaver"]
    assert old.received[-1] == Notice(event="left", name="leaver", text="gone", room="#test")
    room.close()


def test_the_join_notice_timer_sends_by_itself_and_stops_with_the_room():
    room = new_room(join_notice_delay=0.05)
    old = Listener("old")
    room.join(old)
    new = Listener("new")
    room.join(new)
    deadline = time.monotonic() + TIMEOUT
    while not old.joins() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old.joins() == ["new"]
    room.join(Listener("late"))
    room.close()  # a pending timer is cancelled and joined: no thread outlives the room
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("join-notices")]


def test_members_there_before_a_round_share_one_message():
    room, earlier = room_with("old1", "old2", "old3")
    for name in ("a", "b"):
        room.join(Listener(name))
    room.send_join_notices()
    first = earlier[0].received[-1]
    assert first == Joined(names=["a", "b"], room="#test")
    # The same object, so its JSON is encoded once for the whole room.
    assert all(member.received[-1] is first for member in earlier)
    room.close()


def wait_for_joins(listener, names, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while listener.joins() != names and time.monotonic() < deadline:
        time.sleep(0.005)
    return listener.joins()


def test_the_wait_for_a_round_follows_the_room_size_and_the_last_round(monkeypatch):
    now = [1000.0]  # the pacing's clock, moved by hand (a round sent by a timer is stamped with it too)
    room = new_room(join_notice_delay=0.01, join_notice_rate=10, clock=lambda: now[0])
    for name in ("old", "a", "b", "c", "d"):
        room.join(Listener(name))
    room.send_join_notices()  # the last round: at 1000.0
    assert room._join_notice_wait() == pytest.approx(0.5)  # 5 members at 10 frames a second
    now[0] += 0.3
    assert room._join_notice_wait() == pytest.approx(0.2)
    now[0] += 10.0  # long after the last round: only the short delay
    assert room._join_notice_wait() == pytest.approx(0.01)
    monkeypatch.setattr(rooms, "JOIN_NOTICE_MAX_DELAY", 0.3)
    room.join_notice_rate = 0.001  # 5,000 s a round: the pacing is capped
    assert room._join_notice_wait() == pytest.approx(0.3)
    room.close()
    # The cap limits the pacing only, never the delay the room was given.
    patient = new_room(join_notice_delay=60, join_notice_rate=0.001)
    patient.join(Listener("old"))
    assert patient._join_notice_wait() == 60
    patient.close()


def test_a_timer_that_lost_the_race_to_an_earlier_round_sends_nothing():
    room, (old,) = room_with("old")
    room.join(Listener("new"))  # the room's timer now waits 60 s for this round
    # A timer the room no longer holds (as when a line sent the round while it waited for
    # the lock): here the test's own thread stands in for it. The round stays paced.
    room._on_join_timer()
    assert old.joins() == []
    room.send_join_notices()
    assert old.joins() == ["new"]
    room.close()


def test_rounds_of_join_notices_are_spaced_by_the_size_of_the_room():
    # 5 members at 10 frames a second: after any round, the next waits at least 0.5 s.
    start = time.monotonic()  # every round happens after this
    room = new_room(join_notice_delay=0.2, join_notice_rate=10)
    old = Listener("old")
    room.join(old)
    for name in ("a", "b", "c"):
        room.join(Listener(name))
    room.send_join_notices()
    room.join(Listener("late"))
    time.sleep(0.2)
    heard = old.joins()
    if time.monotonic() - start < 0.5:  # only then is "not yet" certain
        assert "late" not in heard
    assert wait_for_joins(old, ["a", "b", "c", "late"]) == ["a", "b", "c", "late"]
    assert time.monotonic() - start >= 0.5
    room.close()


def test_the_welcome_roster_is_taken_as_the_member_joins_and_comes_first():
    room = new_room(join_notice_delay=60)
    old = Listener("old")
    room.join(old, welcome=lambda roster, devices, recent, news: old.deliver(("welcome", roster)))
    room.send_join_notices()
    new = Listener("new")
    room.join(new, welcome=lambda roster, devices, recent, news: new.deliver(("welcome", roster)))
    say(room, old, "hello")  # reaches new after its welcome, never before
    assert new.received[0] == ("welcome", ["new", "old"])
    assert isinstance(new.received[1], Chat) and new.joins() == []
    room.close()


def test_without_a_delay_each_join_is_announced_at_once():
    room = new_room(join_notice_delay=0)
    first, second = Listener("first"), Listener("second")
    room.join(first)
    room.join(second)
    assert first.received == [joined_notice("second")]
    assert second.received == []
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("join-notices")]


def test_a_closed_room_starts_no_timer():
    room = new_room(join_notice_delay=60)
    room.close()
    assert roster_of(room, Listener("late")) == ["late"]
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("join-notices")]


def test_a_burst_of_joins_reaches_the_client_as_one_notice_each(make_server, connect):
    quick = make_server()
    alice = connect("alice", to=quick)
    connection = next(c for c in quick.connections if c.name == "alice")
    wait_for(alice, lambda event: isinstance(event, Roster))  # in the lobby, with its members known
    connection.deliver(Joined(names=["bob", "carol", "dave"], room="#lobby"))  # what the writer sends when behind
    notices = [wait_for(alice, lambda event: isinstance(event, Notice)) for _ in range(3)]
    assert [(notice.event, notice.name) for notice in notices] == [
        ("joined", "bob"),
        ("joined", "carol"),
        ("joined", "dave"),
    ]
    assert {"bob", "carol", "dave"} <= set(alice.members)


def test_the_server_names_the_sender(connect):
    alice, bob, carol = log_in_all(connect, "alice", "bob", "carol")

    class SpoofedSay(Say):
        """A Say whose JSON also claims another author."""

        def to_dict(self):
            return {**super().to_dict(), "sender": "bob", "private": True, "recipient": "carol"}

    send_sealed(alice, SpoofedSay(token=alice.token, room="#lobby", text="this is bob speaking"))
    for listener in (bob, carol):
        message = wait_for(listener, chat_with("this is bob speaking"))
        assert message.sender == "alice"
        assert not message.private
    alice.private("carol", "<bob> also not bob")
    assert wait_for(carol, chat_with("<bob> also not bob")).sender == "alice"


def test_private_lines_reach_only_their_recipient(connect):
    alice, bob, carol = log_in_all(connect, "alice", "bob", "carol")
    alice.private("bob", "just between us")
    message = wait_for(bob, lambda event: isinstance(event, Chat))
    assert (message.sender, message.text, message.private, message.recipient) == (
        "alice",
        "just between us",
        True,
        "bob",
    )
    assert not chats_in(drain(carol)), "a private line reached a third person"
    echoes = chats_in(drain(alice))
    assert [(echo.text, echo.recipient, bool(echo.ref)) for echo in echoes] == [("just between us", "bob", True)]

    alice.private("nobody", "are you there?")  # no such account
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "no_such_user"
    assert not refusal.fatal
    assert not chats_in(drain(alice)), "a refused private line was echoed"
    assert_chatting(alice, bob, "still connected after the refusal")


def test_who_lists_everyone_online(connect):
    alice, _bob, _carol = log_in_all(connect, "alice", "bob", "carol")
    alice.who()
    roster = wait_for(alice, lambda event: isinstance(event, Roster))
    assert roster.members == ["alice", "bob", "carol"]


def test_me_arrives_as_an_action(connect):
    alice, bob = log_in_all(connect, "alice", "bob")
    alice.action("waves at everyone")
    message = wait_for(bob, chat_with("waves at everyone"))
    assert message.action and message.sender == "alice"
    alice.say("a plain line")
    assert not wait_for(bob, chat_with("a plain line")).action


def test_terminal_escape_sequences_are_neutralised(connect):
    alice, bob = log_in_all(connect, "alice", "bob")
    hostile = "\x1b[2J\x1b[31mred\x1b[0m \x1b]0;new title\x07 \x9b6n \u202eevil\u202c end"
    alice.say(hostile)
    message = wait_for(bob, lambda event: isinstance(event, Chat))
    assert "red" in message.text and message.text.endswith("end")
    for unsafe in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert unsafe not in message.text
    alice.private("bob", "\x1b[1;1Hpriv")
    private = wait_for(bob, lambda event: isinstance(event, Chat) and event.private)
    assert "\x1b" not in private.text and private.text.endswith("priv")
    alice.leave("\x1b[5mblinking bye")
    notice = wait_for(bob, left("alice"))
    assert "\x1b" not in notice.text and "blinking bye" in notice.text


# --------------------------------------------------------------------------- limits


def test_a_pasted_block_arrives_but_a_flood_is_cut(connect):
    alice, bob, dave = log_in_all(connect, "alice", "bob", "dave")
    pasted = [f"pasted line {number}" for number in range(10)]
    for line in pasted:
        alice.say(line)
    assert [message.text for message in collect_chats(bob, 10)] == pasted

    flooder = connect("erin", pace=False)
    for listener in (alice, bob, dave):
        wait_for(listener, joined("erin"))
    flood_size = 60
    for number in range(flood_size):
        flooder.say(f"flood {number}")
    refusals = [event for event in drain(flooder, quiet=0.5) if isinstance(event, ErrorReply) and event.code == "flood"]
    assert refusals, "the flooder was never told to slow down"
    flooded = [message for message in chats_in(drain(bob)) if message.sender == "erin"]
    # Every line was either delivered or refused, never lost silently.
    assert len(flooded) + len(refusals) == flood_size
    assert len(flooded) < flood_size

    assert_chatting(alice, bob, "we can still talk")
    assert_chatting(dave, alice, "so can I")


def test_room_commands_count_against_the_flood_budget_too(make_server, connect):
    """Every request counts: a /part tells every member of the room (its reason too), so joining and
    leaving in a loop was a flood the budget of lines never saw."""
    server = make_server(flood_burst=3, flood_rate=0.5)
    alice, carol = connect("alice", to=server), connect("carol", to=server, pace=False)
    drain(carol)
    for number in range(6):
        carol.command("join", "#spam")
        carol.command("part", "#spam", f"reason {number}")
    events = drain(carol, quiet=0.5)
    refused = [event for event in events if isinstance(event, ErrorReply) and event.code == "flood"]
    done = [event for event in events if isinstance(event, RoomMessage)]
    assert len(done) <= 4 and len(done) + len(refused) == 12, events
    assert "sending too fast" in refused[0].message
    alice.command("join", "#spam")  # the budget is carol's alone
    wait_for(alice, lambda event: isinstance(event, RoomMessage) and event.room == "#spam")


def ask_history(server, connect, times: int, room: str, count: str) -> list[object]:
    """Alice, unpaced, asks ``times`` for ``/history room count``: what came back."""
    alice = connect("alice", to=server, pace=False)
    drain(alice)
    for _ in range(times):
        alice.command("history", room, count)
    return drain(alice, quiet=0.5)


def test_refused_history_requests_count_against_the_flood_budget(make_server, connect):
    """A /history refused (a room one is not in) still costs an answer: counted like any other."""
    events = ask_history(make_server(flood_burst=3, flood_rate=0.2), connect, 10, "#nowhere", "5")
    codes = [event.code for event in events if isinstance(event, ErrorReply)]
    assert len(codes) == 10 and codes.count("flood") >= 6, codes


def test_an_empty_history_page_costs_no_more_than_a_command(make_server, connect):
    """/history is charged by the lines it returns: asking again at the start of a room is cheap."""
    events = ask_history(make_server(flood_burst=4, flood_rate=0.01), connect, 3, "#lobby", "500")
    answers = [event for event in events if isinstance(event, History | ErrorReply)]
    assert [type(event).__name__ for event in answers] == ["History"] * 3, answers


def test_repeated_wrong_passwords_are_throttled(make_server, connect):
    throttled = make_server(login_throttle=LoginThrottle(free_failures=2, base_delay=60.0))
    for _ in range(2):
        with pytest.raises(LoginRefused) as refusal:
            connect("alice", to=throttled, password="guess")
        assert refusal.value.code == "auth_failed"
    with pytest.raises(LoginRefused) as refusal:
        connect("alice", to=throttled, password="another guess")
    assert refusal.value.code == "rate_limited"
    with pytest.raises(LoginRefused) as refusal:
        connect("alice", to=throttled)  # even the right password waits
    assert refusal.value.code == "rate_limited"


# --------------------------------------------------------------------------- sessions


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is a Linux feature")
def test_password_hashing_yields_the_cpu_to_the_room(server, connect):
    connect("alice")  # one login starts a hashing thread
    hashing = [thread for thread in threading.enumerate() if thread.name.startswith("hash")]
    assert hashing
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for thread in hashing:
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(19, ours + 10)
    assert os.getpriority(os.PRIO_PROCESS, server.keepalive.native_id) == ours  # the rest of the server is not lowered


def test_a_second_login_keeps_the_first_session(connect):
    first, bob = log_in_all(connect, "alice", "bob")
    second = connect("alice")
    bob.say("which alice hears this?")
    assert wait_for(first, chat_with("which alice hears this?")).sender == "bob"
    assert wait_for(second, chat_with("which alice hears this?")).sender == "bob"
    assert not [event for event in drain(first, quiet=0.1) if isinstance(event, Goodbye | Disconnected)]
    drain(bob, quiet=0.1)  # the roster bob got when he came in
    bob.who()
    roster = wait_for(bob, lambda event: isinstance(event, Roster))
    assert (roster.members, roster.devices) == (["alice", "bob"], [2, 1])
    assert_chatting(second, bob, "the new session speaks")
    assert_chatting(first, bob, "and so does the first")


def test_resume_after_a_lost_connection(connect):
    alice, bob = log_in_all(connect, "alice", "bob")
    first_token = alice.token
    lost = lose_connection(alice)
    try:
        wait_for(bob, left("alice"))
        alice.connect()
        welcome = alice.resume()
    finally:
        lost.close()
    assert welcome.username == "alice"
    assert alice.token and alice.token != first_token
    wait_for(bob, joined("alice"))
    assert_chatting(alice, bob, "back without typing my password")

    # The token that was resumed is spent: it cannot open a second session.
    thief = ChatClient(
        alice.host,
        alice.port,
        private_key=alice.private_key,
        server_fingerprint=alice.server_fingerprint,
        known_hosts=alice.known_hosts,
        timeout=alice.timeout,
    )
    thief.username, thief.token = "alice", first_token
    try:
        with pytest.raises(LoginRefused) as refusal:
            thief.resume()
        assert refusal.value.code == "token_revoked"
    finally:
        thief.close()


def test_a_token_given_up_by_leave_cannot_resume(connect):
    alice, bob = log_in_all(connect, "alice", "bob")
    token = alice.token
    alice.leave("bye for now")
    wait_for(bob, left("alice"))
    alice.token = token  # whatever the client kept, the server must refuse it
    with pytest.raises(LoginRefused) as refusal:
        alice.resume()
    assert refusal.value.code == "token_revoked"


class LateEchoes:
    """The hub, as a backend that hands a line over a moment after it is published sees it (a Redis
    reader reads each line back, after the lines of the other processes): the echo comes late."""

    def __init__(self, hub) -> None:
        self.hub = hub
        self.late: list[threading.Timer] = []

    def __getattr__(self, name: str):
        return getattr(self.hub, name)

    def on_room_event(self, room, message, origin_session, ref) -> None:
        if not ref:
            self.hub.on_room_event(room, message, origin_session, ref)
            return
        late = threading.Timer(0.5, self.hub.on_room_event, (room, message, origin_session, ref))
        self.late.append(late)
        late.start()


def test_a_quit_right_after_a_line_waits_for_its_echo(tmp_path, users_file, connect):
    """The client counts a line with no echo as not sent (a script lists it and exits 1): a /quit
    that overtakes the echo must not end the session before it."""
    from securechat.backend import MemoryBackend
    from securechat.history import ChatStore
    from securechat.listener import ChatServer, ServerConfig

    store = ChatStore(tmp_path / "late.sqlite3", os.urandom(32))
    backend = MemoryBackend(store)
    started = backend.start
    hubs: list[LateEchoes] = []

    def start(hub) -> None:
        hubs.append(LateEchoes(hub))
        started(hubs[-1])

    backend.start = start  # type: ignore[method-assign]
    server = ChatServer(
        ServerConfig(host="127.0.0.1", port=0, users_path=users_file, data_dir=tmp_path / "late"), backend
    )
    server.start()
    try:
        alice, bob = log_in_all(connect, "alice", "bob", to=server)
        alice.say("said just before leaving")
        alice.leave()
        wait_for(bob, chat_with("said just before leaving"))
        events = drain(alice, quiet=0.2)
        echo = [event for event in events if isinstance(event, Chat) and event.ref]
        assert echo and echo[0].text == "said just before leaving", events
        assert alice.pending == {}
    finally:
        server.stop()
        for late in hubs[0].late if hubs else []:
            late.join()


def test_leave_gives_up_every_token_of_the_session(make_server, connect):
    # With a short lifetime the keepalive refreshes the token; the first one, kept by
    # someone, must die with the session when alice leaves, not live on to its expiry.
    quick = make_server(token_ttl=4, ping_interval=0.4)
    alice, bob = log_in_all(connect, "alice", "bob", to=quick)
    first_token = alice.token
    deadline = time.monotonic() + TIMEOUT
    while alice.token == first_token:
        assert time.monotonic() < deadline, "the token was never refreshed"
        time.sleep(0.05)
    alice.leave()
    wait_for(bob, left("alice"))
    alice.token = first_token
    with pytest.raises(LoginRefused) as refusal:
        alice.resume()
    assert refusal.value.code == "token_revoked"


def test_a_password_change_ends_a_session_that_only_listens(make_server, connect):
    quick = make_server(ping_interval=0.4)  # the keepalive looks at accounts every 0.1 s
    alice, bob = log_in_all(connect, "alice", "bob", to=quick)
    token = alice.token
    quick.users.set_password("alice", "a brand new password")
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "token_revoked" and refusal.fatal
    wait_for(alice, is_disconnected)
    assert alice.token == ""  # the client forgets a token the server has refused
    wait_for(bob, left("alice"))
    alice.close()
    alice.token = token
    with pytest.raises(LoginRefused) as resumed:
        alice.resume()
    assert resumed.value.code == "token_revoked"
    assert bob.connected
    quick.users.delete("bob")
    wait_for(bob, lambda event: isinstance(event, ErrorReply) and event.code == "account_deleted")
    wait_for(bob, is_disconnected)


def test_a_password_change_does_not_revoke_the_session_logged_in_with_the_new_password(make_server, connect):
    """The keepalive that ends the old password's session must not revoke the one the user just opened
    with the new password (it once revoked every session of an account whose stamp changed)."""
    server = make_server(ping_interval=20.0)  # the keepalive looks at accounts every 5 s
    for attempt in range(3):
        old = connect("alice", to=server, password=password_of("alice") if attempt == 0 else f"new {attempt - 1}")
        drain(old, quiet=0.1)
        server.users.set_password("alice", f"new {attempt}")
        new = connect("alice", to=server, password=f"new {attempt}", device="phone")
        if old.connected and not [event for event in drain(old, quiet=0.05) if isinstance(event, ErrorReply)]:
            break  # the new session opened before the keepalive's pass: the case to try
        new.close()
    else:
        pytest.skip("the keepalive always passed between the change and the new login")
    refusal = wait_for(old, lambda event: isinstance(event, ErrorReply), timeout=TIMEOUT * 2)
    assert refusal.code == "token_revoked"  # the old password's session ends: right
    time.sleep(0.3)
    try:
        new.say("still here with the new password")
    except ChatError as exc:
        pytest.fail(f"the new password's session was ended: {exc}")
    seen = wait_for(new, lambda event: isinstance(event, Chat | ErrorReply) or is_disconnected(event))
    assert isinstance(seen, Chat), f"the new password's session was ended: {seen}"


def test_a_ban_set_on_the_command_line_ends_for_good_a_session_that_speaks_before_the_keepalive(make_server, connect):
    """A banned session whose next frame reaches the server before the keepalive looks is refused by
    the per-frame check: it must be revoked there too, or it resumes once the ban is lifted."""
    server = make_server(ping_interval=20.0)  # the keepalive looks at accounts every 5 s
    bob = connect("bob")
    server.users.ban("bob", AccountBan(reason="spam"))
    bob.say("still talking")
    refusal = wait_for(bob, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "banned"
    wait_for(bob, is_disconnected)
    assert bob.token, "the client keeps its token after a ban"
    assert server.users.unban("bob")
    bob.close()
    bob.connect()
    with pytest.raises(LoginRefused) as refused:
        bob.resume()
    assert refused.value.code == "token_revoked"


def test_a_password_changed_while_a_login_is_being_checked_still_ends_that_session(make_server, connect, monkeypatch):
    # The admin runs passwd while the old password is being hashed: the login was right when
    # it began, but the session it opens must not outlive the change.
    from securechat import listener as server_module

    quick = make_server(ping_interval=0.4)
    real_verify = server_module.verify_password

    def verify_then_change(password, stored_hash):
        result = real_verify(password, stored_hash)
        if password == password_of("alice"):
            quick.users.set_password("alice", "changed while hashing")
        return result

    monkeypatch.setattr(server_module, "verify_password", verify_then_change)
    bob = connect("bob", to=quick)
    alice = connect("alice", to=quick)
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "token_revoked" and refusal.fatal
    wait_for(alice, is_disconnected)
    wait_for(bob, left("alice"))


def test_a_session_logged_out_from_another_device_cannot_come_back(make_server, connect):
    quick = make_server()
    bob = connect("bob", to=quick)
    old = connect("alice", to=quick)
    old_token = old.token
    new = connect("alice", to=quick)
    new.command("logout", "others")
    wait_for(new, lambda event: isinstance(event, Notice) and event.text == "ended 1 other session")
    goodbye = wait_for(old, lambda event: isinstance(event, Goodbye))
    assert "another device" in goodbye.reason and not goodbye.may_reconnect
    wait_for(old, is_disconnected)
    old.close()
    old.token = old_token
    with pytest.raises(LoginRefused) as refused:
        old.resume()
    assert refused.value.code == "token_revoked"
    assert_chatting(new, bob, "still the one logged in")


def test_logging_in_to_your_own_account_does_not_reset_guesses_at_others(make_server, connect, tmp_path):
    quick = make_server()

    def attempt(name, password):
        client = ChatClient(
            *quick.address, server_fingerprint=quick.fingerprint, known_hosts=KnownHosts(tmp_path / "kh")
        )
        try:
            client.login(name, password)
            return "ok"
        except LoginRefused as exc:
            return exc.code
        finally:
            client.close()

    outcomes = []
    for guess in range(5):
        outcomes.append(attempt("bob", f"guess {guess}"))
        outcomes.append(attempt("carol", password_of("carol")))
    # Three free failures from this address, then the guesses at bob are throttled.
    assert outcomes[0:6:2] == ["auth_failed"] * 3
    assert outcomes[6] == "rate_limited"


def test_resume_after_a_server_restart(make_server, connect):
    first = make_server()
    alice, bob = log_in_all(connect, "alice", "bob", to=first)
    port = first.address[1]
    first.stop()
    for client in (alice, bob):
        goodbye = wait_for(client, lambda event: isinstance(event, Goodbye))
        assert goodbye.reason == "server shutting down"
        assert goodbye.may_reconnect
        wait_for(client, is_disconnected)
        client.close()

    second = make_server(port=port)
    assert second.fingerprint == first.fingerprint
    alice.resume()
    bob.resume()
    wait_for(alice, joined("bob"))
    assert_chatting(alice, bob, "the server came back")
    assert_chatting(bob, alice, "and remembered us")


def test_a_revoked_token_stays_revoked_after_a_restart(make_server, connect):
    first = make_server()
    alice = connect("alice", to=first)
    token = alice.token
    alice.leave()
    port = first.address[1]
    first.stop()
    make_server(port=port)
    alice.token = token
    with pytest.raises(LoginRefused) as refusal:
        alice.resume()
    assert refusal.value.code == "token_revoked"


def test_a_token_that_expires_mid_session_is_refused(make_server, connect):
    short_lived = make_server(token_ttl=2)
    alice, bob = log_in_all(connect, "alice", "bob", to=short_lived)
    assert_chatting(alice, bob, "while the token is good")
    while time.time() <= alice.token_expires_at + 0.2:
        time.sleep(0.1)
    alice.say("and now?")
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "token_expired"
    wait_for(bob, left("alice"))
    assert not [event for event in drain(bob) if chat_with("and now?")(event)]


def test_a_password_change_ends_a_session_that_has_been_talking(server, connect):
    alice, bob = log_in_all(connect, "alice", "bob")
    assert_chatting(alice, bob, "before the change")
    server.users.set_password("alice", "a brand-new password")
    alice.say("after the change")
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "token_revoked"
    wait_for(bob, left("alice"))
    assert not [event for event in drain(bob) if chat_with("after the change")(event)]


def test_a_token_is_decoded_once_per_connection_not_once_per_line(server, connect, monkeypatch):
    alice, bob = log_in_all(connect, "alice", "bob")
    decoded = []
    full_verify = server.tokens.verify
    monkeypatch.setattr(server.tokens, "verify", lambda *args: decoded.append(args[0]) or full_verify(*args))
    for number in range(5):
        assert_chatting(alice, bob, f"line {number}")
    assert decoded == [alice.token]


def test_an_expired_token_is_refused(make_server, connect):
    short_lived = make_server(token_ttl=1)
    alice, bob = log_in_all(connect, "alice", "bob", to=short_lived)
    while time.time() <= alice.token_expires_at + 0.2:
        time.sleep(0.1)
    alice.say("am I too late?")
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "token_expired"
    assert refusal.fatal
    wait_for(alice, is_disconnected)
    wait_for(bob, left("alice"))
    assert not [event for event in drain(bob) if chat_with("am I too late?")(event)]


def test_a_vanished_client_is_dropped_by_keepalive(make_server, connect):
    # Short enough to keep the test quick, long enough that a busy machine still gets the honest
    # clients' pongs in on time (they have ping_timeout - ping_interval to answer).
    ping_interval, ping_timeout = TIMEOUT / 10, TIMEOUT / 2
    quick = make_server(ping_interval=ping_interval, ping_timeout=ping_timeout)
    alice, bob, ghost = log_in_all(connect, "alice", "bob", "carol", to=quick)
    # The ghost's reader goes on reading, but its pongs never go out: alive, but silent.
    ghost.answer_ping = lambda frames: None
    notice = wait_for(alice, left("carol"), timeout=ping_timeout + TIMEOUT)
    assert "keepalive" in notice.text
    wait_for(bob, left("carol"))
    assert_chatting(alice, bob, "the two of us are still fine")
    assert_chatting(bob, alice, "quite fine")


# --------------------------------------------------------------------------- shutting down

#: The README's promise: SIGTERM "exits 0 within 2 seconds".
SHUTDOWN_LIMIT = 2.0


def test_sigterm_says_goodbye_and_exits_cleanly(server_process, tmp_path):
    process = server_process()
    clients = []
    try:
        for name in ("alice", "bob"):
            client = ChatClient(
                "127.0.0.1",
                process.port,
                server_fingerprint=process.fingerprint,
                known_hosts=KnownHosts(tmp_path / "known_hosts"),
                timeout=TIMEOUT * 2,
            )
            clients.append(client)
            client.login(name, password_of(name))
        wait_for(clients[0], joined("bob"))
        signalled_at = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        # Wait well past the limit, so a slow exit fails the assertion below with its time,
        # not with a TimeoutExpired; the requirement itself is checked with no slack.
        status = process.process.wait(timeout=SHUTDOWN_LIMIT + TIMEOUT)
        took = time.monotonic() - signalled_at
        assert status == 0
        assert took <= SHUTDOWN_LIMIT, f"exited {took:.2f} s after SIGTERM; the limit is {SHUTDOWN_LIMIT} s"
        for client in clients:
            goodbye = wait_for(client, lambda event: isinstance(event, Goodbye))
            assert goodbye.reason == "server shutting down"
    finally:
        for client in clients:
            client.close()
    _, stderr = process.stop()
    assert "Traceback" not in stderr


def test_stop_in_process_leaves_no_thread(make_server, connect):
    already_running = set(threading.enumerate())  # the default server of the connect fixture
    stopping = make_server()
    alice, bob = log_in_all(connect, "alice", "bob", to=stopping)
    started = [thread for thread in threading.enumerate() if thread not in already_running]
    assert {"accept", "keepalive"} <= {thread.name for thread in started}
    stopping.stop()
    left_running = [thread.name for thread in started if thread.is_alive() and thread.name != "chat-reader"]
    assert left_running == []
    for client in (alice, bob):
        assert wait_for(client, lambda event: isinstance(event, Goodbye)).reason == "server shutting down"
        wait_for(client, is_disconnected)


def test_a_round_of_1900_long_names_goes_out_in_frames_that_fit():
    # 1,900 names of 32 characters: one Joined of them all would be 67 KB, over the 64 KiB frame.
    room, (old,) = room_with("old")
    names = [f"{index:04d}".ljust(32, "x") for index in range(1900)]
    for name in names:
        room.join(Listener(name))
    room.send_join_notices()
    assert old.joins() == names
    assert len(old.received) == 2
    # Each fits a frame sealed for the largest key (a 4096-bit wrap is 512 bytes).
    assert all(sealed_frame_size(512, len(message.encoded)) <= MAX_FRAME_SIZE for message in old.received)
    room.close()


def test_a_roster_of_1900_long_names_is_sent_in_pages_that_fit():
    names = [f"{index:04d}".ljust(32, "x") for index in range(1900)]
    pages = list(paginate(names, [1] * len(names)))
    assert [name for page in pages for name in page[0]] == names
    assert [page[2] for page in pages] == [True] * (len(pages) - 1) + [False]
    for members, devices, more in pages:
        assert len(Roster(members=members, devices=devices, room="#lobby", more=more).encoded) <= PAGE_BUDGET


@pytest.mark.parametrize("name", ["{:05d}", "{:05d}".ljust(32, "é")], ids=["short", "long-non-ascii"])
def test_a_roster_is_paged_alike_whether_its_size_is_counted_at_once_or_name_by_name(name):
    # Most rosters fit one page, and their size is counted at once; a longer one is paged name by name.
    for count in (0, 1, 499, 1000, 1400, 1600, 5000):
        names = [name.format(index) for index in range(count)]
        devices = [1 + index % 3 for index in range(count)]
        pages = list(paginate(names, devices))
        assert len(pages) == len(hub._pages(list(zip(names, devices, strict=True))))
        assert [name for page in pages for name in page[0]] == names
        assert [count for page in pages for count in page[1]] == devices
        for members, counts, more in pages:
            assert len(Roster(members=members, devices=counts, room="#lobby", more=more).encoded) <= PAGE_BUDGET


def test_rooms_sharing_a_pacer_take_turns_within_one_budget():
    now = [500.0]
    pacer = rooms.NoticePacer(rate=100, clock=lambda: now[0])
    assert pacer.book(50) == 0  # the first round goes at once...
    assert pacer.book(50) == pytest.approx(0.5)  # ...the next room's waits for the first's 50 frames
    assert pacer.book(100) == pytest.approx(1.0)
    now[0] += 10.0  # long after: the budget is free again
    assert pacer.book(10) == 0
    # In a room, the shared turn replaces the room's own spacing (a short delay stays the least).
    shared = Room("#a", join_notice_delay=0.01, pacer=rooms.NoticePacer(rate=10, clock=lambda: now[0]))
    shared.join(Listener("x"))  # its round books 1 frame: 0.1 s of a 10-frames-a-second budget
    assert shared._join_notice_wait() == pytest.approx(0.1)  # the next round waits its turn
    shared.close()


def test_a_client_that_reconnects_by_itself_stops_when_closed(make_server, connect):
    quick = make_server()
    alice = connect("alice", to=quick, reconnect=True)
    quick.stop()  # gone, and not coming back
    wait_for(alice, lambda event: type(event).__name__ == "Reconnecting")
    alice.close()  # the program gives up: the reconnection stops, and events() ends
    ended = wait_for(alice, is_disconnected, timeout=TIMEOUT * 2)
    assert ended.clean


def test_an_account_deleted_while_its_user_is_on_ends_the_session_plainly(server, connect, users_file):
    """The admin deletes carol's account while she chats: her next line is refused, her session
    ends, and the others see her leave with no talk of a protocol error (she made none)."""
    alice, carol = connect("alice"), connect("carol")
    wait_for(alice, joined("carol"))
    deleted = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "deluser", "carol", "--users", str(users_file)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert deleted.returncode == 0, deleted.stderr
    try:
        carol.say("still me?")
    except ChatError:
        pass  # the server may already have closed the link
    ended = wait_for(carol, is_disconnected)
    assert "no longer exists" in ended.reason
    assert ended.clean and not carol.token, "nothing can bring the session back: no reconnecting, no token kept"
    assert wait_for(alice, left("carol")).text == "session ended"
    alice.say("anyone?")
    assert wait_for(alice, lambda event: isinstance(event, Chat) and event.text == "anyone?")
