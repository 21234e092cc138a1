"""Races between an account's devices, its rooms and moderation, shown from outside: a real server,
real clients over real sockets.

Each race is rare on its own, so the moment is held still with a wrapped hub or backend call
(as test_durability.py does with the writer): the wrapper waits on an event, with a deadline,
so that a fixed server, which never reaches the held moment or gets past it another way, still
finishes the test in time.
"""

from __future__ import annotations

import threading

from conftest import TIMEOUT, drain, wait_for, wait_until
from test_moderation import in_room, moderation

from securechat.client import ChatClient
from securechat.protocol import Chat, ErrorReply
from securechat.protocol import Room as RoomMessage

#: How long a held moment waits for the other side before it lets go (a fixed server may never come).
HOLD = TIMEOUT


def log_in_in_background(connect, name: str) -> tuple[threading.Thread, list[ChatClient]]:
    """Log ``name`` in on a thread (its entry into its rooms may be held); the client lands in the list."""
    made: list[ChatClient] = []
    thread = threading.Thread(target=lambda: made.append(connect(name)), name=f"login {name}")
    thread.start()
    return thread, made


def hold_entry_of_second_device(server, account: str) -> tuple[threading.Event, threading.Event]:
    """Hold ``enter_rooms`` of ``account``'s next login until ``release``: its rooms are read, it is
    not yet among the account's sessions. ``inside`` is set once it is held."""
    hub = server.hub
    original = hub.enter_rooms
    inside, release = threading.Event(), threading.Event()

    def held(member, rooms, *args, **kwargs):
        if member.name == account and not inside.is_set():
            inside.set()
            release.wait(HOLD)
        return original(member, rooms, *args, **kwargs)

    hub.enter_rooms = held
    return inside, release


# -------------------- 1. /join on one device while another logs in


def test_a_device_logging_in_while_another_device_joins_a_room_ends_up_in_it(server, connect):
    """alice's laptop runs /join #team while her phone is logging in (its rooms already read from
    the account, the phone not yet among her sessions). The /join enters every session it finds;
    the phone enters the rooms it read before the /join.

    Users see: the laptop is in #team, the phone never is (until its next login); its /who shows
    no #team and a line to #team from the phone is refused "you are not in #team".
    They should see: a /join is on every device of the account, the one logging in too."""
    laptop = connect("alice", device="laptop")
    drain(laptop, quiet=0.2)
    inside, release = hold_entry_of_second_device(server, "alice")
    thread, made = log_in_in_background(connect, "alice")
    try:
        assert inside.wait(HOLD), "the phone's login never got to entering its rooms"
        laptop.join("#team")
        wait_for(laptop, in_room("#team"))
    finally:
        release.set()
        thread.join(TIMEOUT * 3)
    (phone,) = made
    events = drain(phone, quiet=1.0)
    assert any(in_room("#team")(event) for event in events), (
        "alice's phone was never put in #team, which her laptop joined as the phone logged in"
    )


def test_a_device_logging_in_while_another_device_parts_a_room_stays_out_of_it(server, connect):
    """carol and alice's laptop are in #team. alice's phone logs in (its rooms read: #team among them)
    as her laptop runs /part #team. The /part takes out every session it finds; the phone then
    enters #team from the rooms it read.

    Users see: alice's laptop is out of #team, her phone is in it; carol sees "alice left" and then
    "alice joined" for a /part; the account is no member of #team any more, so the phone drops out
    of it at its next login, without a word.
    They should see: a /part is on every device of the account: the phone stays out of #team."""
    laptop = connect("alice", device="laptop")
    carol = connect("carol")
    carol.join("#team")
    wait_for(carol, in_room("#team"))
    laptop.join("#team")
    wait_for(laptop, in_room("#team"))
    drain(carol, quiet=0.5)  # alice's join notice
    inside, release = hold_entry_of_second_device(server, "alice")
    thread, made = log_in_in_background(connect, "alice")
    try:
        assert inside.wait(HOLD), "the phone's login never got to entering its rooms"
        laptop.part("#team")
        wait_for(laptop, lambda event: isinstance(event, RoomMessage) and event.room == "#team" and not event.joined)
    finally:
        release.set()
        thread.join(TIMEOUT * 3)
    (phone,) = made
    drain(phone, quiet=1.0)
    assert "#team" not in phone.rooms, "alice's phone is in #team, which her laptop parted as the phone logged in"
    assert "alice" not in (carol.rooms.get("#team") or []), "carol's roster of #team still shows alice after /part"


# -------------------- 2. two owners give up ownership at once


def test_two_owners_giving_up_ownership_at_once_leave_one_owner(server, connect):
    """bob and carol own #team (alice, who made it, gave it up). Both type /deop for themselves at the
    same moment. Each reads the room's roles, finds another owner besides itself ("the last owner
    stays an owner" is checked), then writes its own role away.

    Users see: both are told they gave up ownership; the room has no owner in its roles, so its
    creator alice, who had given it up, silently owns it again (and with an account deleted
    meanwhile, whoever takes her name next would).
    They should see: one of the two refused with "... is the last owner of #team"."""
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    for client in (alice, bob, carol):
        client.join("#team")
        wait_for(client, in_room("#team"))
    alice.command("owner", "#team", "bob")
    wait_for(alice, moderation("owner", "bob"))
    alice.command("owner", "#team", "carol")
    wait_for(alice, moderation("owner", "carol"))
    alice.command("deop", "#team", "alice")
    wait_for(alice, moderation("deowner", "alice"))
    drain(bob, quiet=0.3)
    drain(carol, quiet=0.3)

    backend = server.hub.backend
    original = backend.set_state
    both_checked = threading.Barrier(2, timeout=HOLD)

    def held(scope, key, value):
        if scope == "#team" and key in ("role:bob", "role:carol") and value is None:
            try:
                both_checked.wait()  # both have passed the "last owner" check before either writes
            except threading.BrokenBarrierError:
                pass  # a fixed server lets only one through here
        return original(scope, key, value)

    backend.set_state = held
    try:
        bob.command("deop", "#team", "bob")
        carol.command("deop", "#team", "carol")
        outcomes = []
        for client in (bob, carol):
            outcome = wait_for(
                client,
                lambda event, name=client.username: (
                    moderation("deowner", name)(event)
                    or (isinstance(event, ErrorReply) and "last owner" in event.message)
                ),
                timeout=HOLD * 2,
            )
            outcomes.append(outcome)
    finally:
        backend.set_state = original
    refused = [outcome for outcome in outcomes if isinstance(outcome, ErrorReply)]
    # One of them at least (both, if each looked after both had written): never neither.
    assert refused, f"both owners gave up #team at once and both were let: {outcomes!r}"
    owners = [name for name, role in server.hub.room_state("#team").roles.items() if role == "owner"]
    assert set(owners) & {"bob", "carol"}, owners


# -------------------- 3. /kick racing with the target's /join


def test_a_kick_landing_as_the_target_joins_does_not_leave_it_in_the_room_but_no_member(server, connect):
    """bob runs /join #team (made a member of it) as alice, its owner, kicks him: the kick takes
    his membership away and takes out the sessions it finds in #team, but bob's is still on its
    way in (reading the room), so it goes in after the kick.

    Users see: alice sees "alice kicked bob"; bob is in #team all the same, hears and speaks there;
    but the account is no member of #team, so bob's other devices are not in it, and at his next
    login he is told he was kicked ("alice kicked bob") from a room he joined after the kick.
    They should see: either the kick wins (bob out of #team, told so once), or the join comes
    after it (bob in #team on every device, and still in it at his next login)."""
    alice, bob = connect("alice"), connect("bob")
    alice.join("#team")
    wait_for(alice, in_room("#team"))
    drain(bob, quiet=0.2)

    hub = server.hub
    original = hub._room_to_enter
    inside, release = threading.Event(), threading.Event()

    def held(name):
        if name == "#team" and not inside.is_set():
            inside.set()
            release.wait(HOLD)
        return original(name)

    hub._room_to_enter = held
    try:
        bob.join("#team")
        assert inside.wait(HOLD), "bob's /join never got to entering #team"
        alice.command("kick", "#team", "bob", "out")
        wait_for(alice, moderation("kick", "bob"))
    finally:
        release.set()
    drain(bob, quiet=1.0)
    # bob's second device, logging in now, enters the rooms the account is in.
    phone = connect("bob", device="phone")
    drain(phone, quiet=1.0)
    # Either outcome is fine, as long as both devices agree with each other.
    assert ("#team" in bob.rooms) == ("#team" in phone.rooms), (
        f"bob's laptop {'is' if '#team' in bob.rooms else 'is not'} in #team, "
        f"his phone that logged in after {'is' if '#team' in phone.rooms else 'is not'}"
    )


# -------------------- 4. a line handed out after its sender left the room it was said in


def test_a_line_said_as_its_sender_leaves_an_empty_room_is_still_echoed_as_sent(server, connect):
    """alice is alone in #solo. Her laptop says a line; it is saved, and as it is being handed out
    her phone runs /part #solo, which takes every device out, so the room is dropped from this
    process (nobody here is in it).

    Users see: the laptop never hears its line back, so it counts it as not sent, though it was
    said: it is in #solo's history for anyone who joins.
    They should see: the line echoed to the laptop, as when the room is still there."""
    laptop = connect("alice", device="laptop")
    phone = connect("alice", device="phone")
    laptop.join("#solo")
    wait_for(laptop, in_room("#solo"))
    wait_for(phone, in_room("#solo"))

    hub = server.hub
    original = hub.on_room_event
    inside, release = threading.Event(), threading.Event()

    def held(room, message, origin_session, ref):
        if room == "#solo" and ref and not inside.is_set():
            inside.set()
            release.wait(HOLD)
        return original(room, message, origin_session, ref)

    hub.on_room_event = held
    try:
        ref = laptop.say("said as I left", room="#solo")
        assert inside.wait(HOLD), "the line was never handed out"
        phone.part("#solo")
        wait_for(phone, lambda event: isinstance(event, RoomMessage) and event.room == "#solo" and not event.joined)
        wait_until(lambda: hub.local_room("#solo") is None, HOLD)  # nobody here is in it: dropped
    finally:
        release.set()
    echo = wait_for(laptop, lambda event: isinstance(event, Chat) and event.ref == ref, timeout=HOLD)
    assert echo.text == "said as I left"
