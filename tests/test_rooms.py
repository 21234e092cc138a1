"""Rooms, history and several devices per account, tried from outside: a real server, real clients."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    ROOT,
    TIMEOUT,
    assert_a_notice_said_while_offline_is_not_counted_as_lost,
    assert_a_room_of_notices_alone_is_not_shown_again,
    drain,
    drop_and_resume,
    password_of,
    wait_for,
    wait_until,
)

from securechat.accounts import UserStore
from securechat.client import (
    Chat,
    ChatError,
    Disconnected,
    ErrorReply,
    History,
    LoginRefused,
    Notice,
    Room,
    RoomList,
    Roster,
    Sessions,
)

CLIENT = str(ROOT / "client.py")


def room_entered(name: str):
    return lambda event: isinstance(event, Room) and event.room == name and event.joined


def left_room(name: str):
    return lambda event: isinstance(event, Room) and event.room == name and not event.joined


def line(text: str, room: str | None = None):
    return lambda event: isinstance(event, Chat) and event.text == text and (room is None or event.room == room)


def until_history(client, room: str) -> tuple[list[Chat], History]:
    """The lines a client is sent up to the History message that closes a run of them for ``room``."""
    lines = []
    while True:
        event = wait_for(client, lambda event: isinstance(event, Chat | History))
        if isinstance(event, History) and event.room == room:
            return lines, event
        if isinstance(event, Chat):
            lines.append(event)


def test_everyone_lands_in_the_lobby_and_lines_go_to_the_active_room(connect):
    alice, bob = connect("alice"), connect("bob")
    assert alice.active_room == "#lobby" and bob.active_room == "#lobby"
    wait_for(alice, lambda event: isinstance(event, Notice) and event.name == "bob")
    alice.say("hello lobby")
    heard = wait_for(bob, line("hello lobby"))
    assert (heard.room, heard.sender, heard.history) == ("#lobby", "alice", False)
    assert heard.id > 0 and heard.seq > 0


def test_two_rooms_never_cross(connect):
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    alice.join("#dev")
    wait_for(alice, room_entered("#dev"))
    bob.join("#dev")
    wait_for(bob, room_entered("#dev"))
    alice.say("for dev only", "#dev")
    carol.say("for the lobby")
    # bob is in both rooms and hears both lines (in either order), each marked with its room
    heard = {}
    while len(heard) < 2:
        event = wait_for(bob, lambda event: isinstance(event, Chat) and event.sender != "bob")
        heard[event.text] = event.room
    assert heard == {"for dev only": "#dev", "for the lobby": "#lobby"}
    seen_by_carol = drain(carol, quiet=0.5)
    assert not any(isinstance(event, Chat) and event.room == "#dev" for event in seen_by_carol)


def test_a_late_joiner_is_shown_the_rooms_recent_lines_as_history(connect):
    alice = connect("alice")
    alice.join("#dev")
    wait_for(alice, room_entered("#dev"))
    for number in range(3):
        alice.say(f"earlier {number}", "#dev")
    wait_for(alice, line("earlier 2"))
    bob = connect("bob")
    bob.join("#dev")
    wait_for(bob, room_entered("#dev"))
    shown, _ = until_history(bob, "#dev")
    assert [event.text for event in shown] == ["earlier 0", "earlier 1", "earlier 2"]
    assert all(event.history for event in shown)


def test_one_account_on_two_devices_gets_everything_and_neither_is_pushed_out(connect):
    laptop = connect("alice", device="laptop")
    phone = connect("alice", device="phone")
    bob = connect("bob")
    bob.say("to the room")
    wait_for(laptop, line("to the room"))
    wait_for(phone, line("to the room"))
    bob.private("alice", "to alice")
    assert wait_for(laptop, line("to alice")).private
    assert wait_for(phone, line("to alice")).private
    laptop.say("from the laptop")
    mine = wait_for(phone, line("from the laptop"))
    assert mine.sender == "alice" and not mine.ref  # shown as her own, without the laptop's ref
    echo = wait_for(laptop, line("from the laptop"))
    assert echo.ref  # the laptop's own echo says its line was accepted
    assert laptop.connected and phone.connected


def test_a_second_device_does_not_announce_a_second_join(connect):
    bob = connect("bob")
    connect("alice")
    wait_for(bob, lambda event: isinstance(event, Notice) and event.event == "joined" and event.name == "alice")
    connect("alice")
    later = drain(bob, quiet=0.6)
    assert not any(isinstance(event, Notice) and event.name == "alice" for event in later)
    bob.who()
    roster = wait_for(bob, lambda event: isinstance(event, Roster))
    assert dict(zip(roster.members, roster.devices, strict=True))["alice"] == 2


def test_a_private_message_to_someone_offline_is_kept_and_shown_at_their_next_login(connect):
    alice = connect("alice")
    alice.private("dave", "read this later")
    wait_for(alice, lambda event: isinstance(event, Notice) and "offline" in event.text)
    dave = connect("dave")
    kept = wait_for(dave, line("read this later"))
    assert kept.history and kept.sender == "alice"


def test_every_private_message_kept_while_offline_is_shown_at_the_next_login(make_server, connect):
    """More than a screenful of /msg while carol was away: she gets them all, not the last 50."""
    server = make_server(flood_burst=100, flood_rate=100.0)
    carol = connect("carol", to=server)
    carol.close()  # she was here: the server knows when she left
    wait_until(lambda: "last_seen" in server.hub.backend.state("@carol"), TIMEOUT)
    alice = connect("alice", to=server, pace=False)
    for number in range(60):
        alice.private("carol", f"alert {number}")
    wait_for(alice, lambda event: isinstance(event, Chat) and event.text == "alert 59")
    carol = connect("carol", to=server)
    kept = [event.text for event in drain(carol, quiet=0.5) if isinstance(event, Chat) and event.private]
    assert kept == [f"alert {number}" for number in range(60)]


def test_with_history_off_a_private_message_to_someone_offline_is_refused_not_promised(make_server, connect):
    server = make_server(history_limit=0)
    alice = connect("alice", to=server)
    ref = alice.private("dave", "read this later")
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert (refusal.ref, refusal.code) == (ref, "offline")
    assert refusal.message == "not sent: dave is offline, and this server keeps no history"
    dave = connect("dave", to=server)
    alice.private("dave", "now you are here")
    assert wait_for(dave, line("now you are here")).sender == "alice"


def test_bad_room_names_and_parting_a_room_you_are_not_in_are_refused_in_one_line(connect):
    alice = connect("alice")
    alice.command("join", "#no spaces!")
    error = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert error.code == "bad_room" and "\n" not in error.message
    alice.part("#elsewhere")
    error = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert error.code == "not_in_room" and "#elsewhere" in error.message
    assert alice.connected


def test_a_refused_private_message_gets_only_an_error(connect):
    carol = connect("carol")
    ref = carol.private("nobody-here", "hi")
    error = wait_for(carol, lambda event: isinstance(event, ErrorReply))
    assert error.ref == ref and error.code == "no_such_user"
    assert not any(isinstance(event, Chat) for event in drain(carol))


def test_history_and_remembered_rooms_survive_a_restart(make_server, connect, tmp_path):
    first = make_server()
    alice = connect("alice", to=first)
    alice.join("#dev")
    wait_for(alice, room_entered("#dev"))
    alice.say("said before the restart", "#dev")
    wait_for(alice, line("said before the restart"))
    alice.close()
    first.stop()
    second = make_server()
    back = connect("alice", to=second)
    assert "#dev" in back.rooms
    kept = wait_for(back, line("said before the restart"))
    assert kept.history and kept.room == "#dev"


def test_a_login_rejoining_many_rooms_gets_each_whole_in_a_few_frames(make_server, connect):
    # 21 rooms of 30 lines are 700 messages, more than a client's send queue holds (512): each
    # room's entry is queued as one item, and the server packs the entries into few frames.
    server = make_server(flood_rate=0)
    alice, bob = connect("alice", to=server), connect("bob", to=server)
    rooms = [f"#r{number}" for number in range(20)]
    for room in rooms:
        for client in (alice, bob):
            client.join(room)
            wait_for(client, room_entered(room))
        for number in range(30):
            bob.say(f"{room} line {number}", room)
        wait_for(alice, line(f"{room} line 29"))
    laptop = connect("alice", to=server)  # a new device: every room sends its recent lines
    heard: dict[str, list[str]] = {}
    for room in rooms:
        lines, history = until_history(laptop, room)
        heard[room] = [event.text for event in lines if event.room == room and event.history]
        assert history.count == 30
    assert heard == {room: [f"{room} line {number}" for number in range(30)] for room in rooms}
    assert list(laptop.rooms) == ["#lobby", *rooms]
    assert all(laptop.rooms[room] == ["alice", "bob"] for room in laptop.rooms)
    # The welcome, then at most a frame for each room's entry (each fits one): not one for each message.
    assert laptop.channel is not None and laptop.channel.recv_seq <= 1 + 1 + len(rooms)
    assert not any(isinstance(event, Disconnected) for event in drain(laptop))


def test_a_device_that_resumes_gets_exactly_what_it_missed(connect, server):
    alice, bob = connect("alice"), connect("bob")
    alice.say("before the drop")
    wait_for(bob, line("before the drop"))
    # bob's link dies without a word; alice goes on talking
    bob._shutdown_socket()
    wait_for(bob, lambda event: type(event).__name__ == "Disconnected")
    for number in range(3):
        alice.say(f"missed {number}")
    wait_for(alice, line("missed 2"))
    bob.close()
    bob.connect()
    bob.resume()
    caught_up, history = until_history(bob, "#lobby")
    assert [event.text for event in caught_up] == ["missed 0", "missed 1", "missed 2"]
    assert history.missing == 0


def test_a_resume_does_not_show_again_a_room_of_notices_alone(connect):
    """A room where only notices were ever said (a mode set): its lines are no news on a resume."""
    assert_a_room_of_notices_alone_is_not_shown_again(connect("bob"))


def test_a_topic_set_while_a_device_was_offline_is_not_counted_as_a_line_lost(connect):
    assert_a_notice_said_while_offline_is_not_counted_as_lost(connect("alice"), connect("bob"))


def test_a_device_away_stays_away_when_its_session_resumes(connect):
    alice, bob = connect("alice"), connect("bob")
    alice.command("away", "gone fishing")
    wait_for(alice, lambda event: isinstance(event, Notice) and "you are marked away" in event.text)

    def away_in_who() -> list[str]:
        drain(bob)
        bob.who("#lobby")
        return wait_for(bob, lambda event: isinstance(event, Roster) and event.room == "#lobby").away

    assert away_in_who() == ["alice"]
    drop_and_resume(alice)
    wait_for(alice, lambda event: isinstance(event, Notice) and event.text == "you are marked away: gone fishing")
    assert away_in_who() == ["alice"]
    alice.command("back")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.text == "you are back")
    alice.command("back")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.text == "you were not away")
    drop_and_resume(alice)
    wait_for(alice, lambda event: isinstance(event, Room) and event.room == "#lobby")
    assert away_in_who() == []


def test_a_line_said_after_two_joins_goes_to_the_second_room(make_server, connect):
    """join("#a"), join("#b"), say(): the line is for #b, also when the second join waits for the
    client's pacing while the first one's answer comes back."""
    server = make_server(flood_burst=2, flood_rate=1.0)
    bob = connect("bob", to=server)
    bob.join("#a")
    bob.join("#b")
    wait_for(bob, lambda event: isinstance(event, Room) and event.room == "#b")
    alice = connect("alice", to=server)  # paced, as every client is by default
    time.sleep(1.2)  # the pacing bucket full again
    alice.join("#a")
    alice.join("#b")
    alice.say("hello, b")
    message = wait_for(bob, line("hello, b"), timeout=TIMEOUT * 2)
    assert message.room == "#b"


def test_an_account_whose_record_lost_its_id_keeps_its_rooms(make_server, connect, users_file):
    """An older release (a rollback, an admin's older copy of server.py) rewrites users.json without
    the accounts' ids: the same account, same hash and creation time, keeps its rooms and roles."""
    UserStore(users_file).add("frank", password_of("frank"))
    server = make_server()
    frank = connect("frank", to=server)
    frank.join("#den")
    wait_for(frank, room_entered("#den"))
    frank.close()
    document = json.loads(users_file.read_text())
    del document["users"]["frank"]["id"]
    users_file.write_text(json.dumps(document))
    again = connect("frank", to=server)
    assert "#den" in again.rooms
    assert server.hub.room_state("#den").role("frank") == "owner"


def test_a_name_used_before_any_identity_was_kept_is_not_inherited(make_server, connect, users_file):
    """bob made #den under a release that kept no account identity; then his account was deleted
    and the name given to someone new. The newcomer does not own #den, nor is in it."""
    server = make_server()
    bob = connect("bob", to=server)
    bob.join("#den")
    wait_for(bob, room_entered("#den"))
    server.hub.backend.set_state("@bob", "account", None)  # as the earlier release left it
    bob.close()
    wait_until(lambda: "last_seen" in server.hub.backend.state("@bob"), TIMEOUT)
    store = UserStore(users_file)
    store.delete("bob")
    store.add("bob", "another person's password")
    newcomer = connect("bob", to=server, password="another person's password")
    assert "#den" not in newcomer.rooms
    assert server.hub.room_state("#den").role("bob") != "owner"


def test_nothing_of_a_message_text_is_readable_in_the_data_directory(make_server, connect, tmp_path):
    server = make_server()
    alice = connect("alice", to=server)
    marker = "zebra-marker-4417"
    alice.say(f"secret {marker}")
    bob_chat = wait_for(alice, line(f"secret {marker}"))
    assert bob_chat.id
    alice.private("bob", f"private {marker}")
    wait_for(alice, line(f"private {marker}"))
    server.stop()
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            assert marker.encode() not in path.read_bytes(), path


def test_batch_mode_names_the_room_of_every_line_and_joins_with_room_option(server, connect, tmp_path):
    bob = connect("bob")
    bob.join("#ops")
    wait_for(bob, room_entered("#ops"))
    bob.say("ops only", "#ops")
    wait_for(bob, line("ops only"))
    env = {
        **os.environ,
        "CHAT_PASSWORD": password_of("carol"),
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    command = [sys.executable, CLIENT, "--port", str(server.address[1]), "--user", "carol", "--accept-new-host-key"]
    done = subprocess.run(
        [*command, "--room", "#ops"],
        input="from carol\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT * 4,
    )
    assert done.returncode == 0, done.stderr
    assert "history: #ops bob: ops only" in done.stdout
    heard = wait_for(bob, line("from carol"))
    assert heard.room == "#ops"


@pytest.mark.parametrize("limit", [0])
def test_history_can_be_turned_off(make_server, connect, tmp_path, limit):
    server = make_server(history_limit=limit)
    alice = connect("alice", to=server)
    alice.say("not kept")
    wait_for(alice, line("not kept"))
    bob = connect("bob", to=server)
    assert not any(isinstance(event, Chat) for event in drain(bob))


def test_a_login_over_the_session_limit_is_refused_and_names_sessions(make_server, connect, caplog):
    caplog.set_level(logging.INFO, logger="chat.server")
    server = make_server(max_sessions=1)
    first = connect("alice", to=server)
    with pytest.raises(LoginRefused) as refused:
        connect("alice", to=server)
    assert refused.value.code == "too_many_sessions" and "/sessions" in str(refused.value)
    assert caplog.text.count("login ok") == 1  # the refused one is no login, in the log either
    assert first.connected
    first.close()
    wait_until(lambda: not server.hub.local_sessions("alice"))
    again = connect("alice", to=server)  # the slot is free again once the first session ended
    assert again.connected


def test_topic_list_and_history_paging(connect):
    alice = connect("alice")
    alice.join("#dev")
    wait_for(alice, room_entered("#dev"))
    alice.command("topic", "#dev", "release on friday")
    topic = wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "topic")
    assert (topic.room, topic.name, topic.text) == ("#dev", "alice", "release on friday")
    for number in range(5):
        alice.say(f"line {number}", "#dev")
    last = wait_for(alice, line("line 4"))

    bob = connect("bob")
    bob.join("#dev")
    entered = wait_for(bob, room_entered("#dev"))
    assert entered.topic == "release on friday"  # shown on join
    bob.command("list")
    listing = wait_for(bob, lambda event: isinstance(event, RoomList))
    rooms = dict(zip(listing.names, zip(listing.members, listing.topics, strict=True), strict=True))
    assert rooms["#dev"] == (2, "release on friday") and rooms["#lobby"][0] == 2

    drain(bob)
    bob.command("history", "#dev", "2", str(last.id))  # the two lines before "line 4"
    paged, _ = until_history(bob, "#dev")
    assert [event.text for event in paged] == ["line 2", "line 3"] and all(event.history for event in paged)
    bob.command("history", "#dev", "501")
    refusal = wait_for(bob, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "bad_history" and "500" in refusal.message


def test_the_rooms_per_account_limit_is_refused_in_one_line(make_server, connect):
    server = make_server(max_rooms_per_account=2)
    alice = connect("alice", to=server)  # #lobby is the first
    alice.join("#one")
    wait_for(alice, room_entered("#one"))
    alice.join("#two")
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "too_many_rooms" and "/part" in refusal.message
    assert "#two" not in alice.rooms


def test_one_account_making_and_leaving_rooms_cannot_use_up_the_servers_rooms(make_server, connect):
    # Rooms stay when everyone has left, and the server holds --max-rooms: an account that joined
    # and parted new room after room made the server refuse every new room, to everyone, for good.
    server = make_server(max_rooms=8, max_rooms_per_account=3)
    erin = connect("erin", to=server)
    for number in range(3):
        erin.join(f"#junk{number}")
        wait_for(erin, room_entered(f"#junk{number}"))
        erin.part(f"#junk{number}")
    erin.join("#junk3")
    refusal = wait_for(erin, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "too_many_rooms" and refusal.message.startswith("you have made 3 rooms"), refusal
    erin.join("#junk0")  # one she made: she may go back
    wait_for(erin, room_entered("#junk0"))
    alice = connect("alice", to=server)  # the rooms erin could not make are left for others
    for room in ("#real", "#more", "#third"):
        alice.join(room)
        wait_for(alice, room_entered(room))
        alice.part(room)
    alice.join("#admins")
    assert wait_for(alice, lambda event: isinstance(event, ErrorReply)).code == "too_many_rooms"
    server.users.set_role("alice", "admin")  # an admin makes rooms past the account's number
    alice.join("#admins")
    wait_for(alice, room_entered("#admins"))


def test_an_account_added_under_a_deleted_ones_name_is_not_charged_with_the_rooms_it_made(make_server, connect):
    """The rooms an account may make are counted by their maker's name: a new account under a deleted
    one's name (whose rooms, roles and memberships the server lets go of) must not be charged with them."""
    server = make_server(max_rooms_per_account=3)
    erin = connect("erin", to=server)
    for number in range(3):
        erin.join(f"#old{number}")
        wait_for(erin, room_entered(f"#old{number}"))
        erin.part(f"#old{number}")
        wait_for(erin, left_room(f"#old{number}"))
    erin.leave()
    erin.close()
    time.sleep(1.1)  # the new account is made after the old one was last seen
    server.users.delete("erin")
    server.users.add("erin", "a new erin's own password")
    newcomer = connect("erin", to=server, password="a new erin's own password")
    newcomer.join("#fresh")
    answer = wait_for(newcomer, lambda event: isinstance(event, ErrorReply) or room_entered("#fresh")(event))
    assert not isinstance(answer, ErrorReply), f"a new account may make a room: {answer}"


def test_a_device_kicked_or_parted_elsewhere_while_offline_is_told_when_it_resumes(connect):
    # The resumed client used to lose the rooms without a word: gone from its list, its prompt moved.
    alice, bob = connect("alice"), connect("bob", device="laptop")
    for client in (alice, bob):
        client.join("#dev")
        wait_for(client, room_entered("#dev"))
    bob.join("#ops")
    wait_for(bob, room_entered("#ops"))
    bob._shutdown_socket()
    wait_for(bob, lambda event: isinstance(event, Disconnected))
    bob.close()
    alice.command("kick", "#dev", "bob", "cleanup")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.text == "alice kicked bob: cleanup")
    phone = connect("bob", device="phone")
    phone.part("#ops")
    wait_for(phone, lambda event: isinstance(event, Room) and event.room == "#ops" and not event.joined)
    bob.connect()
    bob.resume()
    told = {event.room: event.reason for event in drain(bob, quiet=0.5) if isinstance(event, Room) and not event.joined}
    assert told == {"#dev": "alice kicked bob: cleanup", "#ops": "while you were away"}, told
    assert "#dev" not in bob.rooms and "#ops" not in bob.rooms
    # Told once: not at every resume after, nor for a room the device parted itself, live.
    bob.join("#own")
    wait_for(bob, room_entered("#own"))
    bob.part("#own")
    wait_for(bob, lambda event: isinstance(event, Room) and event.room == "#own" and not event.joined)
    drop_and_resume(bob)
    again = [event for event in drain(bob, quiet=0.5) if isinstance(event, Room) and not event.joined]
    assert again == [], again


def test_sessions_lists_every_device_and_logout_ends_one(connect):
    laptop = connect("alice", device="laptop")
    phone = connect("alice", device="phone")
    laptop.command("sessions")
    listing = wait_for(laptop, lambda event: isinstance(event, Sessions))
    assert sorted(listing.devices) == ["laptop", "phone"] and listing.current == laptop.session
    phone_id = listing.ids[listing.devices.index("phone")]
    refusals = []
    for wrong in (phone_id[:1], laptop.session):  # a letter could end any session; this one is /quit's
        laptop.command("logout", wrong)
        refusals.append(wait_for(laptop, lambda event: isinstance(event, ErrorReply)).message)
    assert refusals == ["give at least 4 characters of the id (see /sessions)", "that is this session: /quit ends it"]
    laptop.command("logout", phone_id)
    wait_for(phone, lambda event: type(event).__name__ == "Goodbye")
    wait_for(phone, lambda event: type(event).__name__ == "Disconnected")
    assert laptop.connected
    laptop.command("logout", "others")
    assert wait_for(laptop, lambda event: isinstance(event, ErrorReply)).message == (
        "you have no other session (see /sessions)"
    )


def test_two_resumes_of_one_token_racing_each_other_spend_it_once(server, connect):
    alice = connect("alice")
    claims = server.tokens.verify(alice.token, next(iter(server.connections)).key_thumbprint)
    results = []
    barrier = threading.Barrier(2)

    def spend() -> None:
        barrier.wait()
        results.append(server.tokens.revoke(claims))

    racers = [threading.Thread(target=spend) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(results) == [False, True]


def test_a_line_sent_while_a_new_session_is_being_opened_is_refused_not_sent_with_the_old_token(connect):
    alice = connect("alice")
    alice.close()
    drain(alice, quiet=0.1)  # what the closed session left, up to its Disconnected
    alice.connect()  # a new connection, its welcome not yet received: nothing may go out on it
    with pytest.raises(ChatError, match="not connected"):
        alice.say("too early")
    alice.resume()
    alice.say("now it goes")
    assert wait_for(alice, line("now it goes")).ref


def test_the_server_keeps_accepting_when_a_connection_cannot_be_started(make_server, connect, monkeypatch):
    from securechat import listener

    server = make_server()
    failures = []

    class Unstartable(listener.ClientConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not failures:
                failures.append(self)
                self.reader.start = lambda: (_ for _ in ()).throw(RuntimeError("can't start new thread"))

    monkeypatch.setattr(listener, "ClientConnection", Unstartable)
    with pytest.raises(ChatError):
        connect("alice", to=server)
    assert failures and failures[0] not in server.connections  # closed and unregistered
    assert connect("bob", to=server).connected  # and the next one is served
