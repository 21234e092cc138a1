"""Operators, moderation and presence, tried from outside: the real server program, the admin
command line, library clients and the batch client over real sockets.

Each test starts its own server on a free port in its own data directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TIMEOUT, ServerProcess, drain, is_disconnected, password_of, wait_for
from test_admin import run_server_py

from securechat.client import ChatClient, KnownHosts, LoginRefused
from securechat.protocol import Chat, ErrorReply, History, Notice, Roster
from securechat.protocol import Room as RoomMessage

CLIENT = [sys.executable, str(ROOT / "client.py")]


def admin_command(users_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args, "--users", str(users_file)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )


@pytest.fixture
def chat(tmp_path: Path, users_file: Path):
    """``chat.start()`` runs server.py (again, on the same port and data directory after a stop);
    ``chat.log_in(name)`` gives a logged-in library client of it."""

    class Chat_:
        server: ServerProcess | None = None
        port = 0
        clients: list[ChatClient] = []

        def start(self, *extra: str) -> ServerProcess:
            args = ["--port", str(self.port), "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
            self.server = ServerProcess([*args, "--ping-interval", "2", *extra])
            self.port = self.server.port
            return self.server

        def stop(self) -> None:
            for client in self.clients:
                client.close()
            self.clients = []
            if self.server is not None:
                status, errors = self.server.stop()
                self.server = None
                assert status == 0, errors

        def log_in(self, name: str) -> ChatClient:
            assert self.server is not None
            client = ChatClient(
                "127.0.0.1",
                self.port,
                server_fingerprint=self.server.fingerprint,
                known_hosts=KnownHosts(tmp_path / "known_hosts"),
                timeout=TIMEOUT * 2,
            )
            self.clients.append(client)
            client.login(name, password_of(name))
            return client

    chat = Chat_()
    yield chat
    chat.stop()


def moderation(action: str, target: str = ""):
    return lambda event: (
        isinstance(event, Notice)
        and event.event == "moderation"
        and event.action == action
        and (not target or event.target == target)
    )


def error_saying(pattern: str):
    return lambda event: isinstance(event, ErrorReply) and re.search(pattern, event.message) is not None


def info_saying(pattern: str):
    return lambda event: isinstance(event, Notice) and event.event == "info" and re.search(pattern, event.text)


def in_room(room: str):
    return lambda event: isinstance(event, RoomMessage) and event.room == room and event.joined


def out_of(room: str):
    return lambda event: isinstance(event, RoomMessage) and event.room == room and not event.joined


def said(text: str):
    return lambda event: isinstance(event, Chat) and event.text == text


def open_room(owner: ChatClient, room: str, *members: ChatClient) -> None:
    owner.join(room)
    wait_for(owner, in_room(room))
    for member in members:
        member.join(room)
        wait_for(member, in_room(room))


def test_an_admin_made_with_the_admin_cli_creates_a_room_and_a_member_cannot_kick(chat, users_file):
    made = admin_command(users_file, "role", "alice", "admin")
    assert made.returncode == 0 and "alice is now an admin" in made.stdout, made.stderr
    listed = admin_command(users_file, "users")
    assert re.search(r"^alice\s+\(admin", listed.stdout, flags=re.MULTILINE), listed.stdout
    refused = admin_command(users_file, "role", "alice", "boss")
    assert refused.returncode != 0 and "invalid choice" in refused.stderr

    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob, carol)
    bob.command("kick", "#ops", "carol", "go away")
    wait_for(bob, error_saying(r"^/kick needs an op of #ops \(you are a member\)$"))
    carol.say("still here", "#ops")
    wait_for(alice, said("still here"))
    # The admin may: carol is out, the room is told who did it and why.
    alice.command("kick", "#ops", "carol", "go away")
    notice = wait_for(bob, moderation("kick", "carol"))
    assert notice.name == "alice" and notice.text == "alice kicked carol: go away"
    wait_for(carol, out_of("#ops"))
    carol.join("#ops")  # a kick is not a ban
    wait_for(carol, in_room("#ops"))


def test_a_ban_keeps_a_user_out_also_after_a_restart_until_it_is_lifted(chat, users_file):
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob, carol)  # alice created it: she owns it
    alice.command("ban", "#ops", "bob", "2h spamming the channel")
    wait_for(carol, moderation("ban", "bob"))
    left = wait_for(bob, out_of("#ops"))
    assert "alice banned bob for 2h: spamming the channel" in left.reason
    bob.join("#ops")
    refusal = wait_for(bob, error_saying(r"^you are banned from #ops until \d{4}-\d\d-\d\d \d\d:\d\d UTC"))
    assert refusal.message.endswith(": spamming the channel")

    chat.stop()
    chat.start()
    bob = chat.log_in("bob")
    assert "#ops" not in bob.rooms
    bob.join("#ops")
    wait_for(bob, error_saying(r"^you are banned from #ops"))
    alice = chat.log_in("alice")
    wait_for(alice, in_room("#ops"))
    alice.command("bans", "#ops")
    wait_for(alice, info_saying(r"bans and mutes in #ops: bob banned until .* by alice: spamming the channel"))
    # The ban, like every moderation action, is kept in the room's history.
    alice.command("history", "#ops", "50", "")
    kept = wait_for(alice, lambda event: moderation("ban", "bob")(event) and event.history)
    assert kept.text == "alice banned bob for 2h: spamming the channel"
    alice.command("unban", "#ops", "bob")
    wait_for(alice, moderation("unban", "bob"))
    bob.join("#ops")
    wait_for(bob, in_room("#ops"))


def test_a_mute_silences_without_removing(chat):
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob, carol)
    alice.command("mute", "#ops", "bob", "10m")
    wait_for(carol, moderation("mute", "bob"))
    bob.say("can you hear me", "#ops")
    wait_for(bob, error_saying(r"^not sent: you are muted in #ops until "))
    bob.who("#ops")
    roster = wait_for(bob, lambda event: isinstance(event, Roster) and event.room == "#ops")
    assert "bob" in roster.members
    bob.say("in the lobby I may", "#lobby")
    wait_for(carol, said("in the lobby I may"))
    alice.command("unmute", "#ops", "bob")
    wait_for(bob, moderation("unmute", "bob"))
    bob.say("back again", "#ops")
    wait_for(carol, said("back again"))
    assert not any(said("can you hear me")(event) for event in drain(carol))


def test_a_muted_member_says_nothing_through_a_topic_or_a_parting_message(chat):
    """A mute silences every way of telling the room something: the topic (which every member is
    shown), the reason of a /part and the message of a /quit. Leaving stays allowed, in silence."""
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob, carol)
    alice.command("mute", "#ops", "bob", "10m")
    wait_for(carol, moderation("mute", "bob"))

    bob.command("topic", "#ops", "muted bob still talks")
    wait_for(bob, error_saying(r"^topic not set: you are muted in #ops until "))
    bob.command("part", "#ops", "muted bob still talks")
    assert wait_for(carol, lambda event: isinstance(event, Notice) and event.event == "left").text == ""
    bob.join("#ops")
    wait_for(bob, in_room("#ops"))
    bob.leave("muted bob still talks")
    partings = {}
    while len(partings) < 2:
        notice = wait_for(carol, lambda event: isinstance(event, Notice) and event.event == "left")
        partings[notice.room] = notice.text
    assert partings == {"#ops": "", "#lobby": "muted bob still talks"}  # where he may speak, he may say goodbye
    alice.command("topic", "#ops", "only what alice says")  # those who may speak still set it
    assert wait_for(carol, lambda event: isinstance(event, Notice) and event.event == "topic").text == (
        "only what alice says"
    )


def give_the_name_anew(users_file: Path, name: str, password: str) -> None:
    """``server.py deluser NAME``, then ``adduser NAME`` for someone else, beside the running server."""
    assert admin_command(users_file, "deluser", name).returncode == 0
    added = run_server_py("adduser", name, "--users", str(users_file), password=password)
    assert added.returncode == 0, added.stderr


def test_a_new_account_under_a_deleted_ones_name_inherits_none_of_its_rooms_roles_or_private_lines(
    chat, users_file, tmp_path
):
    """Rooms, roles and private history are kept by name: bob deleted and a new person added as
    bob (with the server running) must start afresh, not as the old bob."""
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(bob, "#team", alice, carol)
    bob.command("op", "#team", "carol")
    wait_for(alice, moderation("op", "carol"))
    open_room(bob, "#solo")
    bob.command("mode", "#solo", "+i")
    wait_for(bob, lambda event: isinstance(event, Notice) and "+i" in event.text)
    alice.private("bob", "for the old bob only: the door code is 4711")
    wait_for(bob, said("for the old bob only: the door code is 4711"))
    bob.leave()

    give_the_name_anew(users_file, "bob", "a new person's own passphrase 93")
    newcomer = ChatClient("127.0.0.1", chat.port, accept_new_host_key=True, known_hosts=KnownHosts(tmp_path / "kh2"))
    chat.clients.append(newcomer)
    welcome = newcomer.login("bob", "a new person's own passphrase 93")
    assert welcome.rooms == ["#lobby"]  # not the old bob's rooms
    assert not [event for event in drain(newcomer) if isinstance(event, Chat) and "4711" in event.text]

    newcomer.join("#solo")  # no longer his: invite-only, and he is not its owner
    wait_for(newcomer, error_saying(r"#solo is invite-only"))
    newcomer.join("#team")
    wait_for(newcomer, in_room("#team"))
    newcomer.command("kick", "#team", "alice")
    wait_for(newcomer, lambda event: isinstance(event, ErrorReply) and event.code == "not_allowed")
    carol.command("owner", "#team", "alice")  # the op in line owns #team now
    wait_for(alice, moderation("owner", "alice"))

    alice.private("bob", "welcome, new bob")  # what is said to him from now on is his
    wait_for(newcomer, said("welcome, new bob"))


def test_a_role_or_invitation_given_to_an_account_that_never_logged_in_does_not_pass_to_the_next_one(
    chat, users_file, tmp_path
):
    """alice made erin an op of the invite-only #ops and invited dave before either ever logged in; both
    accounts were deleted and their names given to two other people. The new erin was an op of #ops
    (nothing marked the name as used until a login), and the new dave walked in on the old invitation."""
    chat.start()
    alice = chat.log_in("alice")
    open_room(alice, "#ops")
    alice.command("mode", "#ops", "+i")
    wait_for(alice, moderation("mode"))
    alice.command("op", "#ops", "erin")
    wait_for(alice, moderation("op", "erin"))
    alice.command("invite", "#ops", "dave")
    wait_for(alice, moderation("invite", "dave"))
    for name in ("dave", "erin"):
        give_the_name_anew(users_file, name, f"{name} the second's passphrase 71")
    for name in ("dave", "erin"):
        newcomer = ChatClient("127.0.0.1", chat.port, accept_new_host_key=True, known_hosts=KnownHosts(tmp_path / name))
        chat.clients.append(newcomer)
        newcomer.login(name, f"{name} the second's passphrase 71")
        newcomer.join("#ops")
        wait_for(newcomer, error_saying(r"#ops is invite-only"))
    alice.command("op", "#ops", "erin")  # she is a member like any other: an op may make her one again
    wait_for(alice, moderation("op", "erin"))


def test_an_op_lifts_the_mute_of_a_deleted_account_as_they_lift_its_ban(chat, users_file):
    """/bans listed "dave muted until lifted" after dave was deleted, and /unmute dave answered "there
    is no user dave": the mute could not be lifted, and would pass to whoever is given the name next."""
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob, carol)
    alice.command("mute", "#ops", "bob")
    wait_for(alice, moderation("mute", "bob"))
    alice.command("ban", "#ops", "carol")
    wait_for(alice, moderation("ban", "carol"))
    for name in ("bob", "carol"):
        assert admin_command(users_file, "deluser", name).returncode == 0
    alice.command("unban", "#ops", "carol")
    wait_for(alice, moderation("unban", "carol"))
    alice.command("unmute", "#ops", "Bob")
    wait_for(alice, moderation("unmute", "bob"))
    alice.command("bans", "#ops")
    wait_for(alice, info_saying(r"^bans and mutes in #ops: none$"))


def test_an_admin_lifts_a_server_ban_typed_in_any_case(chat, users_file):
    assert admin_command(users_file, "role", "alice", "admin").returncode == 0
    chat.start()
    alice = chat.log_in("alice")
    alice.command("gban", "bob", "1h")
    wait_for(alice, moderation("gban", "bob"))
    alice.command("ungban", "Bob")  # was "Bob is not banned from the server", and the ban stood
    wait_for(alice, moderation("ungban", "bob"))
    assert chat.log_in("bob").username == "bob"


def test_a_mode_already_set_changes_nothing_and_an_admin_sets_a_topic_from_outside(chat, users_file):
    assert admin_command(users_file, "role", "alice", "admin").returncode == 0
    chat.start()
    alice, bob = chat.log_in("alice"), chat.log_in("bob")
    open_room(bob, "#dev")
    bob.command("mode", "#dev", "-t")
    wait_for(bob, info_saying(r"^#dev is already -t$"))  # said, not a failure: a setup script may run twice
    bob.command("mode", "#dev", "+t")
    wait_for(bob, moderation("mode"))
    bob.command("mode", "#dev", "+t")
    wait_for(bob, info_saying(r"^#dev is already \+t$"))
    alice.command("topic", "#dev", "set by an admin")  # not in #dev: an admin runs every room
    assert wait_for(bob, lambda event: isinstance(event, Notice) and event.event == "topic").text == "set by an admin"
    assert not [event for event in drain(bob) if moderation("mode")(event)]


def test_names_in_commands_are_matched_in_any_case(chat):
    """Names are unique in any case, so "Bob" can only mean bob: /msg, /whois, /ban, /unban, /ignore,
    and /deop and /devoice as much as /op and /voice."""
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob, carol)
    alice.command("op", "#ops", "BOB")
    wait_for(alice, moderation("op", "bob"))
    alice.command("voice", "#ops", "Carol")
    wait_for(alice, moderation("voice", "carol"))
    alice.command("deop", "#ops", "Bob")  # was "Bob is not an op of #ops"
    assert wait_for(alice, moderation("deop", "bob")).text == "alice took bob's op away"
    alice.command("devoice", "#ops", "CAROL")
    wait_for(alice, moderation("devoice", "carol"))
    carol.private("Bob", "hello in any case")
    message = wait_for(bob, said("hello in any case"))
    assert (message.sender, message.recipient) == ("carol", "bob")
    carol.command("whois", "ALICE")
    wait_for(carol, info_saying(r"^alice:"))
    alice.command("ban", "#ops", "BOB", "1h")
    assert wait_for(alice, moderation("ban")).target == "bob"
    alice.command("unban", "#ops", "Bob")
    wait_for(alice, moderation("unban", "bob"))
    carol.command("ignore", "Alice")
    wait_for(carol, info_saying(r"^you ignore alice now"))
    carol.command("unignore", "ALICE")
    wait_for(carol, info_saying(r"^you see alice's lines again$"))


def test_a_ban_from_the_command_line_tells_the_banned_why_and_asks_no_password(chat, users_file):
    chat.start()
    bob, phone = chat.log_in("bob"), chat.log_in("bob")
    assert admin_command(users_file, "ban", "bob", "10m", "spamming links").returncode == 0
    for device in (bob, phone):  # each told of the ban, though the first one's end revokes them all
        ended = wait_for(device, is_disconnected, timeout=TIMEOUT * 2)
        assert ended.clean, "a banned account has nothing to come back to"
        assert re.fullmatch(r"this account is banned until .* UTC: spamming links", ended.reason), ended.reason
    # The ban ended the session for good, as /gban does: once it is lifted, its token resumes nothing.
    assert bob.token, "the client keeps its token, so the server must refuse it"
    assert admin_command(users_file, "unban", "bob").returncode == 0
    bob.close()
    bob.connect()
    with pytest.raises(LoginRefused) as refused:
        bob.resume()
    assert refused.value.code == "token_revoked"


def test_an_invite_only_room_refuses_the_uninvited_and_admits_the_invited(chat):
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob)
    bob.command("mode", "#ops", "+i")
    wait_for(bob, error_saying(r"^/mode needs an op of #ops"))
    alice.command("mode", "#ops", "+i")
    assert wait_for(bob, moderation("mode")).text == "alice set mode +i on #ops"
    carol.join("#ops")
    wait_for(carol, error_saying(r"^#ops is invite-only \(\+i\)"))
    alice.command("invite", "#ops", "carol")
    wait_for(carol, info_saying(r"^alice invited you to #ops"))
    carol.join("#ops")
    wait_for(carol, in_room("#ops"))
    alice.command("invite", "#ops", "carol")
    wait_for(alice, error_saying(r"^carol is already in #ops$"))
    alice.command("mode", "#ops", "")
    wait_for(alice, info_saying(r"^modes of #ops: \+i \(invite-only\)$"))
    alice.command("mode", "#ops", "+x")
    wait_for(alice, error_saying(r"^unknown mode 'x'"))
    # The invitation is spent; a role in the room (voice included) lets one come back at any time.
    carol.part("#ops")
    wait_for(carol, lambda event: isinstance(event, RoomMessage) and event.room == "#ops" and not event.joined)
    carol.join("#ops")
    wait_for(carol, error_saying(r"^#ops is invite-only \(\+i\)"))
    alice.command("voice", "#ops", "carol")
    wait_for(alice, moderation("voice", "carol"))
    carol.join("#ops")
    wait_for(carol, in_room("#ops"))


def test_a_moderated_room_lets_only_voiced_members_speak(chat):
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#stage", bob, carol)
    alice.command("mode", "#stage", "+m")
    wait_for(bob, moderation("mode"))
    bob.say("may I", "#stage")
    wait_for(bob, error_saying(r"^not sent: #stage is moderated"))
    alice.command("voice", "#stage", "bob")
    assert wait_for(bob, moderation("voice", "bob")).text == "alice gave bob voice"
    bob.say("now I may", "#stage")
    wait_for(carol, said("now I may"))
    alice.command("op", "#stage", "carol")
    wait_for(carol, moderation("op", "carol"))
    carol.command("devoice", "#stage", "bob")  # an op may take a voice away
    assert wait_for(bob, moderation("devoice", "bob")).text == "carol took bob's voice away"
    bob.say("may I still", "#stage")
    wait_for(bob, error_saying(r"^not sent: #stage is moderated"))
    alice.command("owner", "#stage", "carol")
    wait_for(bob, moderation("owner", "carol"))
    carol.command("deop", "#stage", "carol")
    assert wait_for(bob, moderation("deowner", "carol")).text == "carol gave up ownership"
    server = chat.server
    chat.stop()
    _, log_text = server.stop()
    # The log says which modes were set: "action=mode" alone left an admin guessing.
    assert "room=#stage user=alice action=mode target=- modes=+m" in log_text, log_text


def test_a_muted_op_still_acts_but_says_nothing_to_the_room_through_a_reason(chat):
    """A mute keeps every word of the member's from the room: a muted op still kicks, bans and
    mutes, but the reason (shown to everyone, kept in history) is dropped."""
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#den", bob, carol)
    alice.command("op", "#den", "bob")
    wait_for(alice, moderation("op", "bob"))
    alice.command("mute", "#den", "bob")
    wait_for(alice, moderation("mute", "bob"))
    words = "buy cheap pills at example.invalid"
    bob.command("mute", "#den", "carol", f"10m {words}")
    assert wait_for(alice, moderation("mute", "carol")).text == "bob muted carol for 10m"
    bob.command("kick", "#den", "carol", words)
    assert wait_for(alice, moderation("kick", "carol")).text == "bob kicked carol"
    bob.command("ban", "#den", "carol", words)
    assert wait_for(alice, moderation("ban", "carol")).text == "bob banned carol until lifted"
    alice.command("bans", "#den")
    listed = wait_for(alice, lambda event: isinstance(event, Notice) and event.text.startswith("bans and mutes"))
    assert words not in listed.text, listed.text


def test_an_op_cannot_act_above_their_role_and_bad_input_changes_nothing(chat):
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    open_room(alice, "#ops", bob, carol)
    alice.command("op", "#ops", "bob")
    wait_for(bob, moderation("op", "bob"))
    bob.command("ban", "#ops", "alice")
    wait_for(bob, error_saying(r"^alice is an owner of #ops: you cannot act on them$"))
    bob.command("op", "#ops", "carol")
    wait_for(bob, error_saying(r"^/op needs an owner of #ops \(you are an op\)$"))
    bob.command("kick", "#ops", "nobody")
    wait_for(bob, error_saying(r"^there is no user nobody$"))
    bob.command("kick", "#ops", "dave")
    wait_for(bob, error_saying(r"^dave is not in #ops$"))
    bob.command("ban", "#ops", "carol", "10x")
    wait_for(bob, error_saying(r"^not a duration: '10x'"))
    bob.command("kick", "#elsewhere", "carol")
    wait_for(bob, error_saying(r"^there is no room #elsewhere$"))
    carol.join("#side")
    wait_for(carol, in_room("#side"))
    bob.command("topic", "#side", "mine now")
    wait_for(bob, error_saying(r"^you are not in #side$"))
    alice.command("deop", "#ops", "alice")
    wait_for(alice, error_saying(r"^alice is the last owner of #ops"))
    carol.say("nothing changed", "#ops")  # carol is still in, unbanned and unmuted
    wait_for(alice, said("nothing changed"))


def test_away_shows_in_whois_and_answers_a_private_message_once(chat):
    chat.start()
    alice, bob = chat.log_in("alice"), chat.log_in("bob")
    bob.command("away", "gone for lunch")
    wait_for(bob, info_saying(r"^you are marked away: gone for lunch$"))
    alice.command("whois", "bob")
    whois = wait_for(alice, info_saying(r"^bob: online on 1 device"))
    assert "away: gone for lunch" in whois.text and "rooms in common: #lobby" in whois.text
    assert "(" not in whois.text.split(";")[0], whois.text  # bob's device labels (host names) are his own business
    bob.command("whois", "bob")
    assert re.match(r"^bob: online on 1 device \(.+\)", wait_for(bob, info_saying(r"^bob: online on")).text)
    alice.private("bob", "are you there?")
    wait_for(alice, info_saying(r"^bob is away: gone for lunch$"))
    wait_for(bob, said("are you there?"))  # delivered all the same
    alice.private("bob", "hello?")
    wait_for(bob, said("hello?"))
    assert not any(info_saying("is away")(event) for event in drain(alice)), "answered twice within the hour"
    alice.who("#lobby")
    roster = wait_for(alice, lambda event: isinstance(event, Roster) and event.room == "#lobby")
    assert roster.away == ["bob"]
    bob.command("back")
    wait_for(bob, info_saying(r"^you are back$"))
    alice.command("whois", "bob")
    assert "away" not in wait_for(alice, info_saying(r"^bob: ")).text


def test_ignore_stops_someones_lines_on_every_device_and_is_remembered(chat):
    chat.start()
    alice, bob, carol = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("carol")
    carol.command("ignore", "bob")
    wait_for(carol, info_saying(r"^you ignore bob now"))
    bob.say("carol cannot read this")
    bob.private("carol", "nor this")
    wait_for(alice, said("carol cannot read this"))
    wait_for(bob, said("nor this"))  # the sender's own echo: it was sent
    alice.say("but this she can")
    seen = wait_for(carol, said("but this she can"))
    assert seen.sender == "alice"
    assert not any(isinstance(event, Chat) and event.sender == "bob" for event in drain(carol))
    carol.close()
    carol = chat.log_in("carol")  # another login: the list is kept, and history is filtered too
    carol.command("ignore")
    wait_for(carol, info_saying(r"^you ignore: bob$"))
    assert not any(isinstance(event, Chat) and event.sender == "bob" for event in drain(carol))
    carol.command("history", "#lobby")  # scrolling back shows the room's lines without his, as entering did
    shown = []
    while isinstance(event := wait_for(carol, lambda event: isinstance(event, (Chat, History))), Chat):
        shown.append((event.sender, event.text))
    assert shown == [("alice", "but this she can")]
    carol.command("unignore", "bob")
    wait_for(carol, info_saying(r"^you see bob's lines again$"))
    carol.command("ignore")
    wait_for(carol, info_saying(r"^you ignore no one$"))
    bob.say("hello again")
    wait_for(carol, said("hello again"))


def test_the_message_of_the_day_appears_at_the_next_login_and_only_an_admin_sets_it(chat, users_file, tmp_path):
    assert admin_command(users_file, "role", "alice", "admin").returncode == 0
    server = chat.start()
    bob = chat.log_in("bob")
    bob.command("motd", "mine")
    wait_for(bob, error_saying(r"^/motd TEXT needs a server admin$"))
    alice = chat.log_in("alice")
    alice.command("motd", "Welcome to the team. Be kind.")
    wait_for(alice, info_saying(r"^message of the day set$"))
    assert (tmp_path / "data" / "motd.txt").read_text() == "Welcome to the team. Be kind.\n"
    # The next login, by the batch client, shows it.
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "client.py"),
            "--port",
            str(server.port),
            "--user",
            "carol",
            "--accept-new-host-key",
        ],
        input="",
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "CHAT_PASSWORD": password_of("carol"),
            "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": "",
        },
        timeout=TIMEOUT * 4,
    )
    assert "*** message of the day: Welcome to the team. Be kind." in done.stdout, done.stderr

    # A device back after a blip has seen it: not shown again at each reconnection.
    drain(bob)
    bob._shutdown_socket()
    wait_for(bob, is_disconnected)
    bob.close()
    bob.connect()
    bob.resume()
    back = drain(bob, quiet=0.5)
    assert any(in_room("#lobby")(event) for event in back)
    assert not [event for event in back if isinstance(event, Notice) and "message of the day" in event.text]


def test_a_server_ban_ends_the_sessions_and_refuses_logins_until_lifted(chat, users_file):
    assert admin_command(users_file, "role", "alice", "admin").returncode == 0
    chat.start()
    alice, bob = chat.log_in("alice"), chat.log_in("bob")
    bob.command("gban", "alice")
    wait_for(bob, error_saying(r"^/gban needs a server admin$"))
    alice.command("gban", "bob", "1d abuse")
    wait_for(alice, moderation("gban", "bob"))
    wait_for(bob, is_disconnected)
    with pytest.raises(LoginRefused, match=r"this account is banned until .* UTC: abuse"):
        chat.log_in("bob")
    alice.command("ungban", "bob")
    wait_for(alice, moderation("ungban", "bob"))
    chat.log_in("bob")

    # The admin command line bans too, with the server up: the session ends at the next check.
    carol = chat.log_in("carol")
    banned = admin_command(users_file, "ban", "carol", "spam")
    assert banned.returncode == 0 and "carol is banned until lifted: spam" in banned.stdout, banned.stderr
    wait_for(carol, is_disconnected, timeout=TIMEOUT * 2)
    with pytest.raises(LoginRefused, match="banned until lifted: spam"):
        chat.log_in("carol")
    assert "carol  (banned until lifted: spam)" in admin_command(users_file, "users").stdout
    assert admin_command(users_file, "unban", "carol").returncode == 0
    chat.log_in("carol")


def test_roles_modes_and_bans_apply_to_every_device_of_the_account(chat):
    chat.start()
    alice, bob_laptop, bob_phone = chat.log_in("alice"), chat.log_in("bob"), chat.log_in("bob")
    alice.join("#ops")
    wait_for(alice, in_room("#ops"))
    bob_laptop.join("#ops")
    wait_for(bob_phone, in_room("#ops"))  # a join is for every device
    alice.command("ban", "#ops", "bob")
    wait_for(bob_laptop, out_of("#ops"))
    wait_for(bob_phone, out_of("#ops"))
    bob_phone.join("#ops")
    wait_for(bob_phone, error_saying(r"^you are banned from #ops until lifted$"))


# --------------------------------------------------------------------------- the rules, one by one


def test_durations_are_read_as_the_commands_take_them():
    from securechat.commands import parse_duration, split_duration

    assert [parse_duration(text) for text in ("90s", "10m", "2h", "7d", "2w")] == [90, 600, 7200, 604800, 1209600]
    assert split_duration("2h spamming the channel") == (7200, "spamming the channel")
    assert split_duration("spamming") == (0, "spamming")
    assert split_duration("") == (0, "")
    for bad in ("10x", "0m", "99999d", "1.5h"):
        with pytest.raises(ValueError):
            split_duration(f"{bad} reason")
    assert split_duration("٣h reason") == (0, "٣h reason")  # not ASCII digits: words of the reason


def test_room_state_reads_roles_modes_and_restrictions_and_ignores_what_it_does_not_know():
    from securechat.roomstate import Restriction, RoomState, parse_mode_change

    past = Restriction(until=1.0, reason="old", by="alice")
    state = RoomState.parse(
        {
            "role:bob": "op",
            "role:eve": "emperor",
            "modes": "mzti",
            "ban:carol": Restriction(0, "spam", "bob").value(),
            "ban:dave": past.value(),
            "mute:erin": "not json",
            "invite:frank": "1",
        },
        creator="alice",
    )
    assert state.roles == {"bob": "op", "alice": "owner"} and state.role("eve") == "member"
    assert state.modes == "imt"
    assert state.ban_of("carol") == Restriction(0, "spam", "bob") and state.ban_of("dave") is None
    assert state.mute_of("erin") == Restriction()  # a damaged value errs on the safe side: muted
    assert state.invited == {"frank"}
    assert parse_mode_change("+mi") == (True, "im") and parse_mode_change("-t") == (False, "t")
    for bad in ("i", "+", "+x", "-iq"):
        with pytest.raises(ValueError):
            parse_mode_change(bad)
    with pytest.raises(ValueError, match=r"one change at a time: \+im adds both"):
        parse_mode_change("+i +m")


def test_roles_and_bans_are_kept_in_the_user_store_and_the_last_admin_stays(users_file):
    from securechat.accounts import AccountBan, UserStore

    store = UserStore(users_file)
    store.set_role("alice", "admin")
    with pytest.raises(ValueError, match="alice is the last admin"):
        store.set_role("alice", "user")
    store.set_role("bob", "admin")
    store.set_role("alice", "user")
    store.ban("carol", AccountBan(until=0.0, reason="spam", by="bob"))
    again = UserStore(users_file).load()  # read back from the file
    assert again["bob"].is_admin and not again["alice"].is_admin
    assert again["carol"].active_ban() == AccountBan(0.0, "spam", "bob")
    assert store.unban("carol") and not store.unban("carol")
    store.ban("dave", AccountBan(until=1.0))  # long over
    assert UserStore(users_file).get("dave").active_ban() is None


def test_a_session_whose_ban_missed_it_still_cannot_speak(make_server, connect):
    # A ban set while the session was entering the room (its removal ran before it was in).
    from securechat.roomstate import Restriction, ban_key

    server = make_server()
    alice, bob = connect("alice", to=server), connect("bob", to=server)
    alice.join("#ops")
    wait_for(alice, in_room("#ops"))
    bob.join("#ops")
    wait_for(bob, in_room("#ops"))
    server.hub.backend.set_state("#ops", ban_key("bob"), Restriction(0, "spam", "alice").value())
    bob.say("sneaking in", "#ops")
    wait_for(bob, error_saying(r"^not sent: you are banned from #ops until lifted$"))
