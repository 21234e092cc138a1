"""The command-line client, driven from outside as a person or a script would.

Interactive tests run ``client.py`` in a real 80x24 pseudo-terminal and read
the screen through a terminal emulator; batch tests pipe lines in and read
lines out. The server is always the real ``server.py`` program on a loopback
port; the other people in the room are library ``ChatClient`` objects or more
client programs.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (
    ROOT,
    TIMEOUT,
    HangsUp,
    ServerProcess,
    client_args,
    client_env,
    drain,
    free_port,
    password_of,
    wait_for,
)
from terminal import Terminal
from test_admin import run_server_py

from securechat.client import (
    Chat,
    ChatClient,
    Disconnected,
    ErrorReply,
    Goodbye,
    KnownHosts,
    LoginRefused,
    Notice,
    Room,
    Roster,
)
from securechat.connection import AuthenticationFailed
from securechat.hub import ChatHub
from securechat.listener import ChatServer, ServerConfig

CLIENT = str(ROOT / "client.py")
#: Starting a client means starting Python, importing, and making an RSA key.
START = TIMEOUT * 2
#: The interactive client waits RECONNECT_FIRST_DELAY (1 s) before its first retry, then 2 s more.
RECONNECT = TIMEOUT * 3
LONG_LINE = "0123456789" * 1000
NON_ASCII = "héllo wörld — 日本語 ✓ 🎉"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def chat_server(server_process) -> ServerProcess:
    """The real server program; quiet logs, because nobody drains its stderr while it runs."""
    return server_process("--log-level", "WARNING")


@pytest.fixture
def join(tmp_path: Path) -> Iterator[Callable[..., ChatClient]]:
    """Factory: ``join("bob", server)``: a library client logged in to anything with ``port`` and ``fingerprint``."""
    clients: list[ChatClient] = []

    def log_in(name: str, server: ServerProcess) -> ChatClient:
        client = ChatClient(
            "127.0.0.1",
            server.port,
            known_hosts=KnownHosts(tmp_path / "library_known_hosts"),
            server_fingerprint=server.fingerprint,
            timeout=TIMEOUT * 2,
        )
        clients.append(client)
        client.login(name, password_of(name))
        return client

    yield log_in
    for client in clients:
        client.close()


def pin(known_hosts: Path, server: ServerProcess) -> Path:
    """Write the server's real key into a known-hosts file, as an earlier "yes" would have."""
    with known_hosts.open("a") as handle:
        handle.write(f"{KnownHosts.host_id('127.0.0.1', server.port)} {server.fingerprint}\n")
    return known_hosts


def at_prompt(room: str = "#lobby", text: str = "") -> Callable[[Terminal], bool]:
    """The cursor sits on ``#ROOM> text`` (the prompt names the active room) at the end of what was typed."""
    row = f"{room}> {text}"

    def check(terminal: Terminal) -> bool:
        cursor = terminal.screen.cursor
        return terminal.screen.display[cursor.y].startswith(row) and cursor.x == len(row)

    return check


def type_password(terminal: Terminal, name: str) -> None:
    terminal.wait_for_text(f"Password for {name}:", START)
    terminal.type(password_of(name) + "\r")


@pytest.fixture
def chat_in_terminal(terminals, tmp_path: Path) -> Callable[..., Terminal]:
    """Factory: ``chat_in_terminal("alice", server)``: the interactive client, logged in, at its prompt."""

    def start(name: str, server: ServerProcess) -> Terminal:
        known_hosts = pin(tmp_path / f"known_hosts_{name}", server)
        terminal = terminals(client_args(server.port, name, known_hosts))
        type_password(terminal, name)
        terminal.wait_until(at_prompt(), START, f"{name}'s #lobby> prompt")
        return terminal

    return start


def heard(event: object) -> bool:
    """A chat line from someone else (not the server's echo of one of this client's own lines)."""
    return isinstance(event, Chat) and not event.ref


def chats(client: ChatClient, count: int) -> list[Chat]:
    """The next ``count`` lines ``client`` hears from others (other events, and its own echoes, skipped)."""
    return [wait_for(client, heard) for _ in range(count)]


def drain_chats(client: ChatClient, quiet: float = 0.3) -> list[str]:
    """Texts heard from others until the client has been quiet for ``quiet`` seconds."""
    texts = []
    while (event := client.next_event(timeout=quiet)) is not None:
        if heard(event):
            texts.append(event.text)
    return texts


def row_of(terminal: Terminal, text: str) -> int:
    rows = [number for number, line in enumerate(terminal.lines) if text in line]
    assert rows, f"{text!r} is not on the screen:\n{terminal.text}"
    return rows[-1]


class Pipe:
    """Non-blocking reader of a child's output pipe (no thread: the test pumps it)."""

    def __init__(self, stream) -> None:
        self.fd = stream.fileno()
        os.set_blocking(self.fd, False)
        self.data = bytearray()
        self.closed = False

    def pump(self, wait: float = 0.05) -> None:
        if self.closed:
            return
        ready, _, _ = select.select([self.fd], [], [], wait)
        if ready:
            chunk = os.read(self.fd, 1 << 16)
            self.closed = not chunk
            self.data.extend(chunk)

    @property
    def lines(self) -> list[str]:
        return self.data.decode("utf-8").splitlines()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            if self.closed or time.monotonic() > deadline:
                pytest.fail(f"no {what}; output so far: {self.lines!r}")
            self.pump()


class BatchClient:
    """``client.py`` with pipes for stdin, stdout and stderr; killed by ``close()`` if still running."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.stdout = Pipe(self.process.stdout)
        self.stderr = Pipe(self.process.stderr)

    def send(self, *lines: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.process.stdin.flush()

    def finish(self, timeout: float) -> int:
        """Close stdin (end of input), read everything, and return the exit status."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        deadline = time.monotonic() + timeout
        while not (self.stdout.closed and self.stderr.closed):
            if time.monotonic() > deadline:
                pytest.fail(f"the batch client did not finish; stdout {self.stdout.lines!r}")
            self.stdout.pump()
            self.stderr.pump()
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def batch_clients(tmp_path: Path) -> Iterator[Callable[..., BatchClient]]:
    started: list[BatchClient] = []

    def start(server: ServerProcess, name: str, *extra: str) -> BatchClient:
        env = client_env(tmp_path, CHAT_PASSWORD=password_of(name))
        client = BatchClient(client_args(server.port, name, tmp_path / f"known_hosts_{name}", *extra), env)
        started.append(client)
        return client

    yield start
    for client in started:
        client.close()


def run_batch(
    tmp_path: Path, port: int, name: str, *extra: str, password: str | None = None, stdin: str = "hello\n"
) -> subprocess.CompletedProcess[str]:
    """One batch run to completion (for the runs that are refused before they start)."""
    env = client_env(tmp_path)
    if password is not None:
        env["CHAT_PASSWORD"] = password
    return subprocess.run(
        client_args(port, name, tmp_path / "known_hosts", *extra),
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=START * 2,
    )


def run_script(
    tmp_path: Path, server: ServerProcess, stdin: str, *extra: str, name: str = "alice"
) -> subprocess.CompletedProcess[str]:
    """A script run as ``name`` with its password (new host keys accepted), to completion."""
    return run_batch(
        tmp_path, server.port, name, "--accept-new-host-key", *extra, password=password_of(name), stdin=stdin
    )


# --------------------------------------------------------------------------- interactive: talking


def test_interactive_login_hides_the_password_and_chats_both_ways(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)

    assert password_of("alice").encode() not in alice.output
    assert alice.lines[row_of(alice, "Password for alice:")].rstrip() == "Password for alice:"
    assert "*** connected to 127.0.0.1" in alice.text

    alice.type("hello bob\r")
    message = wait_for(bob, heard)
    assert (message.sender, message.text, message.private) == ("alice", "hello bob", False)
    alice.wait_for_text("alice: hello bob", TIMEOUT)

    bob.say("hi alice, welcome")
    alice.wait_for_text("bob: hi alice, welcome", TIMEOUT)
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt below the messages")
    assert row_of(alice, "bob: hi alice, welcome") < alice.screen.cursor.y


def test_a_message_arriving_mid_line_leaves_the_half_typed_line_intact(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)

    alice.type("half-typed words")
    alice.wait_until(at_prompt("#lobby", "half-typed words"), TIMEOUT, "the typed keys on the prompt")
    bob.say("news from bob")
    alice.wait_for_text("bob: news from bob", TIMEOUT)
    alice.wait_until(at_prompt("#lobby", "half-typed words"), TIMEOUT, "the half-typed line redrawn")

    assert row_of(alice, "bob: news from bob") < alice.screen.cursor.y
    assert alice.cursor_row == "#lobby> half-typed words"
    assert sum("half-typed words" in line for line in alice.lines) == 1

    alice.type("\r")
    message = wait_for(bob, heard)
    assert (message.sender, message.text) == ("alice", "half-typed words")


def test_keys_typed_straight_after_enter_are_shown_once_on_the_next_prompt(chat_server, join, tmp_path):
    """A fast typist's next keys land while one line is sent and the next prompt starts: they go to
    that prompt, and the terminal does not also echo them on a row of their own."""
    bob = join("bob", chat_server)
    known_hosts = pin(tmp_path / "known_hosts_alice", chat_server)
    alice = Terminal(client_args(chat_server.port, "alice", known_hosts), env=client_env(tmp_path), rows=120)
    try:
        type_password(alice, "alice")
        alice.wait_until(at_prompt(), START, "alice's #lobby> prompt")
        lines = []
        for number in range(24):  # the next keys after 0 to 11 ms: some land between two prompts
            lines += [f"first {number}", f"then {number}"]
            alice.type(f"first {number}\r")
            time.sleep(number % 12 / 1000)
            alice.type(f"then {number}\r")
        assert [message.text for message in chats(bob, len(lines))] == lines
        for line in lines:
            alice.wait_for_text(f"alice: {line}", TIMEOUT)
        alice.wait_until(at_prompt(), TIMEOUT, "an empty prompt")
        alice.settle()
        shown = [row for row in alice.lines if "first " in row or "then " in row]
        assert shown == [row for row in shown if " alice: " in row], alice.text
        assert len(shown) == len(lines)
    finally:
        alice.close()


# --------------------------------------------------------------------------- interactive: the server's key


def test_first_contact_asks_about_the_key_and_pins_it(chat_server, terminals, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    first = terminals(client_args(chat_server.port, "alice", known_hosts))
    # The server is reached and its key checked before any password is asked.
    first.wait_for_text("(yes/no)?", START)
    assert "Password" not in first.text
    assert f"[127.0.0.1]:{chat_server.port}" in first.text
    assert chat_server.fingerprint in first.text
    first.type("yes\r")
    type_password(first, "alice")
    first.wait_until(at_prompt(), START, "the prompt after yes")
    assert known_hosts.read_text().split() == [f"[127.0.0.1]:{chat_server.port}", chat_server.fingerprint]
    first.type("\x04")
    assert first.wait_exit(TIMEOUT) == 0

    second = terminals(client_args(chat_server.port, "alice", known_hosts))
    type_password(second, "alice")
    second.wait_until(at_prompt(), START, "the prompt without a question")
    assert "yes/no" not in second.text
    assert chat_server.fingerprint not in second.text
    second.type("\x04")
    assert second.wait_exit(TIMEOUT) == 0


def test_refusing_an_unknown_key_exits_with_an_error(chat_server, terminals, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    terminal = terminals(client_args(chat_server.port, "alice", known_hosts))
    terminal.wait_for_text("(yes/no)?", START)
    terminal.type("no\r")
    assert terminal.wait_exit(TIMEOUT) != 0
    assert "error:" in terminal.text
    assert "Password" not in terminal.text  # never asked: the server was not trusted
    assert not known_hosts.exists() or chat_server.fingerprint not in known_hosts.read_text()
    assert "alice>" not in terminal.text


# --------------------------------------------------------------------------- batch mode


def test_a_script_whose_account_is_banned_while_it_runs_is_told_once(server_process, batch_clients, join, users_file):
    server = server_process("--log-level", "WARNING", "--ping-interval", "1")  # accounts looked at often
    carol = join("carol", server)
    script = batch_clients(server, "alice", "--accept-new-host-key")
    script.send("here for a while")
    wait_for(carol, lambda event: isinstance(event, Chat) and event.text == "here for a while", timeout=START)
    banned = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "ban", "alice", "testing", "--users", str(users_file)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert banned.returncode == 0, banned.stderr
    script.stderr.wait_for(lambda lines: any("banned" in line for line in lines), TIMEOUT * 2, "the ban")
    assert script.finish(TIMEOUT) == 1
    told = [line for line in script.stderr.lines if "banned" in line]
    assert told == ["error: this account is banned until lifted: testing"], script.stderr.lines


def test_a_terminal_whose_account_is_deleted_says_so_once_and_asks_no_password(
    chat_server, chat_in_terminal, users_file
):
    # It used to reconnect, fail to resume, and ask "Password for erin:" of an account that is gone.
    erin = chat_in_terminal("erin", chat_server)
    deleted = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--users", str(users_file), "deluser", "erin"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert deleted.returncode == 0, deleted.stderr
    erin.wait_for_text("disconnected: this account no longer exists", TIMEOUT * 3)
    erin.wait_until(lambda terminal: not terminal.child.isalive(), TIMEOUT * 2, "the client to stop")
    assert erin.text.count("Password for erin:") == 1 and "reconnecting" not in erin.text, erin.text


def test_the_bar_at_the_bottom_numbers_the_rooms_and_counts_their_unread_lines(chat_server, join, tmp_path):
    # The README promised the count, but the bar only listed the rooms.
    bob = join("bob", chat_server)
    env = client_env(tmp_path)
    del env["PROMPT_TOOLKIT_NO_CPR"]  # the bar is drawn where the terminal answers where its cursor is
    alice = Terminal(client_args(chat_server.port, "alice", pin(tmp_path / "known_hosts", chat_server)), env=env)
    alice.answers_cursor_queries = True
    try:
        type_password(alice, "alice")
        alice.wait_until(at_prompt(), START, "alice's #lobby> prompt")
        alice.type("/join #dev\r")
        alice.wait_until(at_prompt("#dev"), TIMEOUT, "the #dev prompt")
        alice.wait_for_text("1:#lobby 2:#dev   Ctrl-N/P, Alt-1..9: switch room", TIMEOUT)
        bob.say("one for the lobby", "#lobby")
        bob.say("alice, two for the lobby", "#lobby")
        alice.wait_for_text("1:#lobby(2@1) 2:#dev   Ctrl-N/P", TIMEOUT)
        alice.type("\x10")  # Ctrl-P: back to #lobby, read
        alice.wait_until(at_prompt(), TIMEOUT, "the #lobby prompt")
        alice.wait_for_text("1:#lobby 2:#dev   Ctrl-N/P", TIMEOUT)
    finally:
        alice.close()


def test_a_line_too_long_typed_in_the_terminal_is_named_in_its_error(chat_server, chat_in_terminal, join):
    join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    alice.type("\x1b[200~" + "z" * 33000 + "\x1b[201~\r")  # pasted: one line, too long
    alice.wait_for_line("not sent: message longer than 32768 bytes (your line: zzzzzzzzzz", TIMEOUT * 2)


def test_batch_clients_exchange_short_long_and_non_ascii_lines(chat_server, batch_clients, join):
    carol = join("carol", chat_server)
    alice = batch_clients(chat_server, "alice", "--accept-new-host-key")
    bob = batch_clients(chat_server, "bob", "--accept-new-host-key")
    joined = set()
    while joined != {"alice", "bob"}:
        notice = wait_for(carol, lambda event: isinstance(event, Notice) and event.event == "joined", timeout=START)
        joined.add(notice.name)

    lines = {
        "alice": ["hi from alice", LONG_LINE, NON_ASCII],
        "bob": ["hi from bob", LONG_LINE[::-1], NON_ASCII[::-1]],
    }
    alice.send(*lines["alice"])
    bob.send(*lines["bob"])
    heard = [(message.sender, message.text) for message in chats(carol, 6)]
    for name in ("alice", "bob"):
        assert [text for sender, text in heard if sender == name] == lines[name]
    carol.say("over to you")

    expected = {
        "alice": [f"#lobby bob: {line}" for line in lines["bob"]] + ["#lobby carol: over to you"],
        "bob": [f"#lobby alice: {line}" for line in lines["alice"]] + ["#lobby carol: over to you"],
    }
    for name, client in (("alice", alice), ("bob", bob)):
        client.stdout.wait_for(
            lambda seen, name=name: all(line in seen for line in expected[name]), TIMEOUT, f"lines for {name}"
        )
    assert alice.finish(TIMEOUT * 2) == 0
    assert bob.finish(TIMEOUT * 2) == 0

    for name, client in (("alice", alice), ("bob", bob)):
        output = client.stdout.lines
        for line in expected[name]:
            assert output.count(line) == 1, f"{name} got {line[:40]!r} {output.count(line)} times"
        assert not [line for line in output if line.startswith(f"#lobby {name}:")], "own lines are not echoed"
        assert client.stderr.lines == []
    assert drain_chats(carol) == [], "carol heard a line twice"


def test_batch_reports_a_line_too_long_and_goes_on_with_the_next(chat_server, batch_clients, join):
    carol = join("carol", chat_server)
    alice = batch_clients(chat_server, "alice", "--accept-new-host-key")
    wait_for(carol, lambda event: isinstance(event, Notice) and event.name == "alice", timeout=START)
    alice.send("x" * 40_000, "after the long one")
    assert [message.text for message in chats(carol, 1)] == ["after the long one"]
    assert alice.finish(TIMEOUT * 2) == 1  # a script learns that not all it said went out
    assert alice.stderr.lines == [f"not sent: message longer than 32768 bytes (your line: {'x' * 79}…)"]


def test_batch_marks_every_line_from_history_notices_too(chat_server, join, tmp_path):
    """A bot must tell what happens now from what it is shown of the past: a topic set or a kick
    replayed from history starts with ``history: ``, as a replayed chat line does."""
    bob = join("bob", chat_server)
    bob.join("#dev")
    bob.say("the build is green", "#dev")
    bob.command("topic", "#dev", "release day")
    wait_for(bob, lambda event: isinstance(event, Notice) and event.event == "topic")
    result = run_script(tmp_path, chat_server, "", "--room", "#dev")
    assert result.returncode == 0, result.stderr
    replayed = [line for line in result.stdout.splitlines() if "#dev" in line]
    assert "history: #dev bob: the build is green" in replayed
    assert "history: #dev *** bob set the topic: release day" in replayed


def test_batch_commands_with_a_word_too_many_or_too_few_say_how_they_are_used(chat_server, tmp_path):
    result = run_script(tmp_path, chat_server, "/join #a b\n/msg bob hi\n")
    assert result.stderr.splitlines()[0] == "usage: /join #room (one room; a room name has no spaces)"
    assert "#a" not in result.stdout  # no room #a was made of it


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits (Linux)")
def test_the_client_writes_no_core_file_of_its_key_or_password_if_it_crashes(chat_server, terminals, tmp_path):
    terminal = terminals(client_args(chat_server.port, "alice", pin(tmp_path / "known_hosts", chat_server)))
    terminal.wait_for_text("Password for alice:", START)
    limits = Path(f"/proc/{terminal.child.pid}/limits").read_text().splitlines()
    (row,) = [row for row in limits if row.startswith("Max core file size")]
    assert row.split()[4:6] == ["0", "0"], f"a crash at the password prompt would write it to disk: {row}"


def test_a_right_password_typed_at_once_after_a_wrong_one_logs_in(chat_server, terminals, tmp_path):
    """README: "a wrong password may be typed again, three tries in all".

    alice mistyped her password three times earlier (a run of the client that gave up), starts
    the client again, mistypes once more and types the right password at once. The server
    refuses that try with "too many failed logins; try again in 2 s" and the client exits 1:
    the right password was thrown away on the second of her three tries. It should wait out
    the delay the server names (or ask again) and log her in.
    """
    for _ in range(3):  # an earlier run of the client: three typos
        with (
            ChatClient(
                "127.0.0.1",
                chat_server.port,
                server_fingerprint=chat_server.fingerprint,
                known_hosts=KnownHosts(tmp_path / "library_known_hosts"),
                timeout=TIMEOUT * 2,
            ) as earlier,
            pytest.raises(LoginRefused),
        ):
            earlier.login("alice", "not-her-password")
    time.sleep(1.2)  # the address's first delay (1 s) has passed: the next try is checked
    alice = terminals(client_args(chat_server.port, "alice", pin(tmp_path / "known_hosts", chat_server)))
    alice.wait_for_text("Password for alice:", START)
    alice.type("still-not-her-password\r")
    alice.wait_for_text("try again", START)
    alice.wait_until(lambda terminal: terminal.text.count("Password for alice:") == 2, TIMEOUT, "the second prompt")
    alice.type(password_of("alice") + "\r")  # right, and typed at once

    def logged_in(terminal) -> bool:
        if terminal.text.count("Password for alice:") == 3 and not asked_again:  # her third and last try
            asked_again.append(True)
            terminal.type(password_of("alice") + "\r")
        return at_prompt()(terminal)

    asked_again: list[bool] = []
    alice.wait_until(logged_in, START + 5, "alice's #lobby> prompt after her second try")


def test_answering_no_to_the_host_key_question_does_not_say_to_connect_on_a_terminal(chat_server, terminals, tmp_path):
    """A user on a terminal is asked about an unknown key and answers "no". The client says
    "check it with the operator, then connect on a terminal or pass --accept-new-host-key":
    but they are on a terminal, and were just asked. The advice is the batch mode's; here it
    should say that the key was not accepted (and, say, to answer yes once it is checked)."""
    terminal = terminals(client_args(chat_server.port, "alice", tmp_path / "known_hosts"))
    terminal.wait_for_text("(yes/no)?", START)
    terminal.type("no\r")
    assert terminal.wait_exit(TIMEOUT) == 1
    assert "error:" in terminal.text
    assert "connect on a terminal" not in terminal.text.replace("\n", ""), terminal.text


def test_ctrl_z_at_the_prompt_sends_no_control_character_to_the_room(chat_server, chat_in_terminal, join):
    """A newcomer presses Ctrl-Z out of habit (to suspend the program, as in a shell). Nothing
    seems to happen; the prompt shows "^Z". They press Enter: a line made of the control character
    0x1A goes to the whole room, shown everywhere as "carol: �". Ctrl-Z should suspend the client
    (and `fg` bring it back) or do nothing; it should not put a control character in a message."""
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    alice.type("\x1a")  # Ctrl-Z
    time.sleep(0.5)
    state = Path(f"/proc/{alice.child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    if state == "T":  # suspended, as a shell would: `fg`
        os.kill(alice.child.pid, signal.SIGCONT)
    alice.type("\r")
    alice.type("after ctrl-z\r")
    assert chats(bob, 1)[0].text == "after ctrl-z"


def test_a_terminal_whose_password_is_changed_asks_for_it_without_a_pointless_reconnection(
    chat_server, terminals, tmp_path, users_file
):
    """`server.py passwd carol` while carol chats: the server tells her "this account's password
    changed; log in again" (a fatal error). The client then prints "*** connection lost: ...",
    "*** reconnecting in 1.0 s...", tries to resume a session that the server has just said is over,
    and prints "*** cannot resume the session: no session to resume" before asking the password:
    two misleading lines (nothing was lost, there was nothing to resume). A deleted account is
    handled without them (tests/test_cli.py); a changed password should go straight to the prompt, and
    say why once (the fatal error's "error: ..." was shown again as "*** ...")."""
    carol = asked_to_log_in_again(chat_server, terminals, tmp_path, users_file, "a-new-pass-for-carol-9")
    carol.settle()
    assert carol.text.count("password changed") == 1, carol.text
    assert "reconnecting" not in carol.text and "cannot resume" not in carol.text, carol.text


@pytest.fixture
def silent_listener():
    """A port that accepts connections and never says a word (another program's port, a stuck server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, name="silent-listener")
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()
    for connection in accepted:
        connection.close()


def test_a_server_that_never_answers_is_reported_before_a_minute_of_silence(silent_listener, terminals, tmp_path):
    """A newcomer gives the wrong --port (another program's, which accepts and waits, as Redis does)
    or the server is stuck. The terminal client shows nothing at all, not even the port it is trying,
    for 60 s, then says "error: the server did not answer in time". The server itself gives a
    connection 10 s for its handshake; within 15 s the user should at least be told what is
    going on (or the client should give up)."""
    terminal = terminals(client_args(silent_listener, "alice", tmp_path / "known_hosts"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not terminal.pump(0.2) or terminal.text.strip():
            break
    assert terminal.text.strip(), "15 s after start the screen is still empty"
    assert str(silent_listener) in terminal.text or "error" in terminal.text, terminal.text


def test_the_user_name_is_asked_again_when_left_empty(chat_server, terminals, tmp_path):
    argv = client_args(chat_server.port, "x", pin(tmp_path / "known_hosts", chat_server))
    del argv[argv.index("--user") : argv.index("--user") + 2]
    alice = terminals(argv)
    alice.wait_for_text("User name:", START)
    alice.type("\r")
    alice.wait_until(lambda t: t.text.count("User name:") == 2, TIMEOUT, "the name asked again")
    alice.type("alice\r")
    type_password(alice, "alice")
    alice.wait_until(at_prompt(), START, "the prompt")


def test_a_setup_script_run_twice_succeeds_twice(chat_server, tmp_path):
    """Making sure #ops is invite-only is no failure when it already is."""
    script = "/join #ops\n/mode #ops +i\n"
    for _ in range(2):
        done = run_script(tmp_path, chat_server, script)
        assert done.returncode == 0, done.stderr
    assert "#ops is already +i" in done.stdout


def test_batch_pages_back_with_history_and_replies_with_reply(server_process, batch_clients, join):
    """/history and /reply need what the client has seen: in batch mode too."""
    server = server_process("--log-level", "WARNING", "--join-history", "10")
    bob = join("bob", server)
    bob.join("#dev")
    for number in range(20):
        bob.say(f"dev line {number}", "#dev")
    wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "dev line 19")
    alice = batch_clients(server, "alice", "--accept-new-host-key", "--room", "#dev")
    alice.stdout.wait_for(has_line("history: #dev bob: dev line 19"), START, "the room's last 10 lines")
    bob.private("alice", "can you ack?")
    alice.stdout.wait_for(has_line("bob (private): can you ack?"), TIMEOUT, "the private line")
    alice.send("/history #dev 5")
    alice.stdout.wait_for(lambda lines: "history: #dev bob: dev line 5" in lines, TIMEOUT, "the first page")
    alice.send("/history #dev 5", "/reply got it")  # from the oldest line seen: the page before
    reply = wait_for(bob, lambda event: isinstance(event, Chat) and event.private and event.sender == "alice")
    assert reply.text == "got it"
    assert alice.finish(TIMEOUT * 2) == 0, alice.stderr.lines
    paged = [line for line in alice.stdout.lines if line.startswith("history: #dev bob: dev line ")]
    assert [int(line.rsplit(" ", 1)[1]) for line in paged] == list(range(10, 20)) + list(range(5, 10)) + list(range(5))


def test_batch_commands_the_client_refuses_fail_the_run(chat_server, tmp_path):
    result = run_script(tmp_path, chat_server, "/frobnicate\nhello\n")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("unknown command /frobnicate")


def test_batch_wrong_password_is_one_line_and_a_failure(chat_server, tmp_path):
    result = run_batch(tmp_path, chat_server.port, "alice", "--accept-new-host-key", password="not-the-password")
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert "not-the-password" not in result.stderr
    assert result.stdout == ""


def test_batch_unreachable_server_names_host_and_port(tmp_path):
    port = free_port()
    result = run_batch(tmp_path, port, "alice", "--accept-new-host-key", password=password_of("alice"))
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert f"127.0.0.1:{port}" in result.stderr


def test_batch_refuses_an_unknown_key_without_the_flag(chat_server, tmp_path):
    result = run_batch(tmp_path, chat_server.port, "alice", password=password_of("alice"))
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1
    assert chat_server.fingerprint in result.stderr
    assert "--accept-new-host-key" in result.stderr
    known_hosts = tmp_path / "known_hosts"
    assert not known_hosts.exists() or chat_server.fingerprint not in known_hosts.read_text()


def test_batch_refuses_a_changed_key_and_names_the_pinned_line(chat_server, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    wrong = "SHA256:" + "A" * 43
    known_hosts.write_text(f"[127.0.0.1]:1 {wrong}\n[127.0.0.1]:{chat_server.port} {wrong}\n")
    result = run_batch(tmp_path, chat_server.port, "alice", "--accept-new-host-key", password=password_of("alice"))
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1
    assert "CHANGED" in result.stderr.upper()
    assert str(known_hosts) in result.stderr
    assert "line 2" in result.stderr
    assert known_hosts.read_text().count(chat_server.fingerprint) == 0


@pytest.mark.parametrize("password", [None, ""], ids=["unset", "empty"])
def test_batch_without_chat_password_exits_2(tmp_path, password):
    # Set but empty (CHAT_PASSWORD= in a unit file or a cron line) was sent, and refused as a wrong password.
    result = run_batch(tmp_path, free_port(), "alice", "--accept-new-host-key", password=password)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "CHAT_PASSWORD" in result.stderr


# --------------------------------------------------------------------------- batch mode offline


def has_line(text: str) -> Callable[[list[str]], bool]:
    return lambda lines: any(text in line for line in lines)


@pytest.mark.parametrize("unsent", [(), ("first while offline", "second while offline")])
def test_batch_input_ending_while_offline_reports_what_was_not_sent_and_exits_at_once(
    chat_server, batch_clients, join, unsent
):
    carol = join("carol", chat_server)
    alice = batch_clients(chat_server, "alice", "--accept-new-host-key")
    wait_for(carol, lambda event: isinstance(event, Notice) and event.name == "alice", timeout=START)
    chat_server.stop()
    alice.stderr.wait_for(has_line("connection lost"), TIMEOUT, "the lost link reported")

    alice.send(*unsent)
    ended_at = time.monotonic()
    status = alice.finish(TIMEOUT)
    assert time.monotonic() - ended_at < TIMEOUT, "waited for a server that is gone"
    assert status == 1
    errors = alice.stderr.lines
    assert [line for line in errors if line.startswith("not sent: ")] == [f"not sent: {line}" for line in unsent]
    assert has_line("error: input ended while offline")(errors), errors


def test_batch_lines_read_while_offline_are_sent_in_order_after_resuming(lying_server, batch_clients, join):
    first = lying_server()
    bob = join("bob", first)
    alice = batch_clients(first, "alice", "--accept-new-host-key")
    wait_for(bob, lambda event: isinstance(event, Notice) and event.name == "alice", timeout=START)
    first.stop()
    alice.stderr.wait_for(has_line("connection lost"), TIMEOUT, "the lost link reported")
    offline_lines = [f"typed while offline {number}" for number in range(3)]
    alice.send(*offline_lines)
    # Restart after the first failed retry. Whether alice is back before carol or after, carol gets
    # the lines: live, or as the room's recent lines when she joins.
    alice.stderr.wait_for(
        lambda lines: sum("*** reconnecting in" in line for line in lines) >= 2, RECONNECT, "a second retry planned"
    )
    second = lying_server(port=first.port)
    carol = join("carol", second)

    assert [(message.sender, message.text) for message in chats(carol, 3)] == [
        ("alice", line) for line in offline_lines
    ]
    assert alice.finish(TIMEOUT * 2) == 0
    assert has_line("*** reconnected as alice")(alice.stderr.lines)
    assert not has_line("not sent")(alice.stderr.lines)


def test_batch_input_that_ended_earlier_is_still_sent_after_a_restart(server_process, batch_clients, join):
    """A script fed from a file (its input over at once, its lines paced out) whose server restarts
    midway: the lines still queued go out once the session resumes, none is dropped."""
    first = server_process("--log-level", "WARNING", "--flood-burst", "2", "--flood-rate", "4")
    bob = join("bob", first)
    alice = batch_clients(first, "alice", "--accept-new-host-key")
    lines = [f"line {number}" for number in range(20)]
    alice.send(*lines)
    assert alice.process.stdin is not None
    alice.process.stdin.close()  # input over, while online: the rest is the queue's
    chats(bob, 3)
    first.stop()
    second = server_process(
        "--log-level", "WARNING", "--flood-burst", "2", "--flood-rate", "4", "--port", str(first.port)
    )
    assert alice.finish(TIMEOUT * 4) == 0, alice.stderr.lines
    assert has_line("*** reconnected as alice")(alice.stderr.lines)
    carol = join("carol", second)
    said = [event.text for event in drain(carol, quiet=1.0) if isinstance(event, Chat) and event.sender == "alice"]
    assert said == lines


def test_batch_sent_away_by_the_server_stops_with_an_error(chat_server, batch_clients, join):
    carol = join("carol", chat_server)
    alice = batch_clients(chat_server, "alice", "--accept-new-host-key")
    wait_for(carol, lambda event: isinstance(event, Notice) and event.name == "alice", timeout=START)
    other_device = join("alice", chat_server)
    other_device.command("logout", "others")  # this session is over, not lost

    alice.stderr.wait_for(has_line("error: disconnected: logged out from another device"), TIMEOUT, "the reason")
    assert alice.process.wait(timeout=TIMEOUT) == 1, "exits without waiting for the end of its input"


# --------------------------------------------------------------------------- commands


def test_who_me_and_a_private_message_nobody_else_sees(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    carol = join("carol", chat_server)
    alice = chat_in_terminal("alice", chat_server)

    alice.type("/who\r")
    alice.wait_for_text("*** in #lobby (3): alice, bob, carol", TIMEOUT)

    alice.type("/me waves\r")
    alice.wait_for_text("* alice waves", TIMEOUT)
    alice.type("/msg bob just between us\r")
    alice.wait_for_text("alice → bob: just between us", TIMEOUT)
    alice.type("public again\r")

    assert [(m.text, m.action, m.private) for m in chats(bob, 3)] == [
        ("waves", True, False),
        ("just between us", False, True),
        ("public again", False, False),
    ]
    # carol's next chat after the action is the public line: the private one never reached her.
    assert [(m.text, m.private) for m in chats(carol, 2)] == [("waves", False), ("public again", False)]


def test_each_refused_line_is_named_in_its_refusal(chat_server, chat_in_terminal, join):
    """Lines typed (or pasted) in a row and refused: each refusal says which line it was."""
    bob = join("bob", chat_server)
    bob.join("#ops")  # bob made it: bob runs it
    alice = chat_in_terminal("alice", chat_server)
    alice.type("/join #ops\r")
    alice.wait_until(at_prompt("#ops"), TIMEOUT, "alice in #ops")
    bob.command("mute", "#ops", "alice", "10m")
    alice.wait_for_text("bob muted alice", TIMEOUT)

    alice.type("first words\rsecond words\r")
    refusals = "error: not sent: you are muted in #ops until"
    alice.wait_until(lambda t: t.unfolded.count(refusals) == 2, TIMEOUT, "both refusals")
    screen = alice.unfolded  # a refusal may be folded
    assert screen.index("(your line: first words)") < screen.index("(your line: second words)")


def test_rooms_rejoined_at_login_are_told_apart_from_where_lines_go(chat_server, chat_in_terminal, join):
    earlier = join("alice", chat_server)
    earlier.join("#dev")
    wait_for(earlier, lambda event: isinstance(event, Room) and event.room == "#dev")
    earlier.close()
    alice = chat_in_terminal("alice", chat_server)
    alice.wait_for_text("*** also in #dev", TIMEOUT)
    assert "*** you are in #lobby" in alice.text and "you are in #dev" not in alice.text
    alice.wait_until(at_prompt("#lobby"), TIMEOUT, "the #lobby prompt")  # (redrawn once the lines are shown)


def test_a_colour_code_typed_or_pasted_does_not_crash_the_prompt(chat_server, chat_in_terminal, join):
    """ "ESC[31m" parses as a mouse report, whose handler in prompt_toolkit crashed the prompt
    ("Press ENTER to continue..."); the client asks for no mouse reports and takes none."""
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    alice.type("red \x1b[31mtext\r")
    assert wait_for(bob, heard).text == "red text"
    alice.settle()
    assert "Press ENTER" not in alice.text and "Exception" not in alice.text


def test_alt_0_and_alt_minus_do_not_swallow_the_next_key(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    alice.type("\x1b0x\x1b-y\r")  # Alt-0 x Alt-minus y
    assert wait_for(bob, heard).text == "xy"


def test_a_refused_join_leaves_the_prompt_in_the_room_it_was_in(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    bob.join("#dev")
    bob.command("mode", "#dev", "+i")  # invite-only: alice may not come in
    wait_for(bob, lambda event: isinstance(event, Notice) and "+i" in event.text)
    alice = chat_in_terminal("alice", chat_server)
    alice.type("/join #dev\r")
    alice.wait_for_text("error: #dev is invite-only", TIMEOUT)
    alice.wait_until(at_prompt("#lobby"), TIMEOUT, "the #lobby prompt back")
    alice.type("still here\r")
    message = wait_for(bob, heard)
    assert (message.room, message.text) == ("#lobby", "still here")


def test_two_refused_joins_in_a_row_put_the_prompt_back_where_it_was(server_process, chat_in_terminal, join):
    """The second /join waits for the client's pacing, so the first refusal comes back while the
    prompt already shows the second room: both refused, lines go where they went before either."""
    server = server_process("--log-level", "WARNING", "--flood-burst", "2", "--flood-rate", "1")
    bob = join("bob", server)
    for room in ("#a", "#b"):
        bob.join(room)
        bob.command("mode", room, "+i")
        wait_for(bob, lambda event, room=room: isinstance(event, Notice) and f"+i on {room}" in event.text)
    bob.join("#x")
    alice = chat_in_terminal("alice", server)
    alice.type("/join #x\r")
    alice.wait_until(at_prompt("#x"), TIMEOUT, "alice in #x")
    time.sleep(1.5)  # the pacing bucket full again
    alice.type("/join #a\r/join #b\r")
    alice.wait_until(lambda t: t.text.count("invite-only") == 2, TIMEOUT * 2, "both joins refused")
    alice.wait_until(at_prompt("#x"), TIMEOUT, "the #x prompt back")
    alice.type("meant for x\r")
    message = wait_for(bob, heard)
    assert (message.room, message.text) == ("#x", "meant for x")


def test_unknown_command_hints_and_sends_nothing_and_double_slash_sends(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)

    alice.type("/frobnicate the room\r")
    alice.wait_for_text("unknown command /frobnicate", TIMEOUT)
    assert "/help" in alice.text
    alice.type("//shrug is not a command\r")

    # The first chat bob gets is the // line: the unknown command sent nothing before it.
    message = wait_for(bob, heard)
    assert (message.sender, message.text) == ("alice", "/shrug is not a command")


def test_tab_completes_commands_and_online_names(chat_server, chat_in_terminal, join):
    carol = join("carol", chat_server)
    alice = chat_in_terminal("alice", chat_server)

    alice.type("/whoi\t")
    alice.wait_until(at_prompt("#lobby", "/whois "), TIMEOUT, "'/whoi' completed to '/whois '")
    alice.type("\x15")  # Ctrl-U: clear the line
    alice.wait_until(at_prompt(), TIMEOUT, "an empty prompt")

    alice.type("thanks ca\t")
    alice.wait_until(at_prompt("#lobby", "thanks carol "), TIMEOUT, "'ca' completed to 'carol '")
    alice.type("for the tea\r")  # the completed name is followed by a space: the next word is not glued on
    message = wait_for(carol, heard)
    assert message.text == "thanks carol for the tea"
    # Her own line comes back too. Typed over as it arrived, under load, it once left the redrawn prompt
    # glued to it (the line editor's redraw between two prompts): not what this test is about.
    alice.wait_for_text("alice: thanks carol for the tea", TIMEOUT)
    alice.wait_until(at_prompt(), TIMEOUT, "an empty prompt")

    alice.type("ca\t")  # at the start of a line a name is followed by ": ", as IRC clients do
    alice.wait_until(at_prompt("#lobby", "carol: "), TIMEOUT, "'ca' completed to 'carol: '")
    alice.type("got it?\r")
    assert wait_for(carol, heard).text == "carol: got it?"


def test_quit_with_a_message_is_seen_by_the_others(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)

    alice.type("/quit see you tomorrow\r")
    assert alice.wait_exit(TIMEOUT) == 0
    notice = wait_for(bob, lambda event: isinstance(event, Notice) and event.event == "left")
    assert notice.name == "alice"
    assert "see you tomorrow" in notice.text


# --------------------------------------------------------------------------- terminal safety and exit


def test_escape_sequences_in_a_message_are_shown_harmlessly(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    banner = row_of(alice, "*** connected to")

    bob.say("\x1b[2J\x1b[31mRED\x1b]0;pwned\x07")
    alice.wait_for_text("RED", TIMEOUT)

    assert row_of(alice, "*** connected to") == banner, "the screen was cleared"
    row = row_of(alice, "RED")
    line = alice.lines[row]
    assert "bob: \ufffd[2J\ufffd[31mRED\ufffd]0;pwned\ufffd" in line
    column = line.index("RED")
    assert {alice.screen.buffer[row][column + offset].fg for offset in range(3)} == {"default"}
    assert alice.screen.title != "pwned"


ESCAPES = "\x1b[2J\x1b[31mRED\x1b]0;pwned\x07"


class HostileHub(ChatHub):
    """A hub that forwards raw escape sequences, as a compromised or buggy server might.

    The real server sanitizes text before fan-out; this one does not, so what
    the screen shows is the client's own defence.
    """

    def say(self, member, room_name: str, text: str, *, action: bool = False, ref: str = "") -> None:
        if text != "inject":
            super().say(member, room_name, text, action=action, ref=ref)
            return
        room = self.local_room(room_name)
        names, _ = room.roster()
        for name in names:
            for session in room.sessions_of(name):
                if session is member:
                    continue
                session.deliver(
                    Chat(sender=f"{member.name}\x1b[1;1H", text=ESCAPES, sent_at=time.time(), room=room_name)
                )
                session.deliver(Notice(event="info", text=f"notice {ESCAPES}", room=room_name))


@pytest.fixture
def lying_server(tmp_path: Path, users_file: Path) -> Iterator[Callable[..., SimpleNamespace]]:
    """Factory: an in-process server with the given hub (and server class); stopped at teardown."""
    started: list[ChatServer] = []

    def start(
        hub_class: type[ChatHub] = ChatHub, server_class: type[ChatServer] = ChatServer, port: int = 0
    ) -> SimpleNamespace:
        config = ServerConfig(host="127.0.0.1", port=port, users_path=users_file, data_dir=tmp_path / "hostile")
        with_hub = type(f"{server_class.__name__}With{hub_class.__name__}", (server_class,), {"hub_class": hub_class})
        server = with_hub(config).start()
        started.append(server)
        return SimpleNamespace(port=server.address[1], fingerprint=server.fingerprint, stop=server.stop)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def hostile_server(lying_server) -> SimpleNamespace:
    """An in-process server with a ``HostileHub``."""
    return lying_server(HostileHub)


def test_the_client_itself_neutralises_escapes_a_server_forwards(hostile_server, chat_in_terminal, join):
    bob = join("bob", hostile_server)
    alice = chat_in_terminal("alice", hostile_server)
    banner = row_of(alice, "*** connected to")

    bob.say("inject")
    alice.wait_for_text("*** notice", TIMEOUT)

    assert row_of(alice, "*** connected to") == banner, "the screen was cleared"
    row = row_of(alice, "[1;1H:")
    assert "bob\ufffd[1;1H: \ufffd[2J\ufffd[31mRED\ufffd]0;pwned\ufffd" in alice.lines[row]
    assert "*** notice \ufffd[2J\ufffd[31mRED" in alice.text
    column = alice.lines[row].index("RED")
    assert {alice.screen.buffer[row][column + offset].fg for offset in range(3)} == {"default"}
    assert alice.screen.title != "pwned"


#: Short enough that a line quoting it fits the 80-column screen unwrapped.
SHORT_ESCAPES = "\x1b[2J\x1b]0;pwned\x07"


class LyingHub(HostileHub):
    """Escapes in everything else a server says: member names, errors, reasons for closing."""

    def who(self, member, room_name: str) -> None:
        names, _ = self.local_room(room_name).roster()
        lying = sorted([*names, f"mal{SHORT_ESCAPES}"])
        member.deliver(Roster(members=lying, devices=[1] * len(lying), room=room_name))

    def say(self, member, room_name: str, text: str, *, action: bool = False, ref: str = "") -> None:
        if text == "inject-error":
            member.deliver(ErrorReply(code="nope", message=f"refused {ESCAPES}"))
        elif text == "inject-goodbye":
            member.finish("kicked", Goodbye(reason=f"kicked {ESCAPES}"))
        elif text == "inject-fatal":
            member.finish("kicked", ErrorReply(code="kicked", message=f"dropped {ESCAPES}", fatal=True))
        else:
            super().say(member, room_name, text, action=action, ref=ref)


class LyingLogin(ChatServer):
    """Refuses every password with a message full of escapes."""

    def authenticate_password(self, connection, login):
        raise AuthenticationFailed("auth_failed", f"no entry {ESCAPES}")


def assert_nothing_drove_the_screen(terminal: Terminal, first_line: str) -> None:
    assert first_line in terminal.text, f"the screen was cleared:\n{terminal.text}"
    assert terminal.screen.title != "pwned"
    for row, line in enumerate(terminal.lines):
        if "RED" in line:
            column = line.index("RED")
            assert {terminal.screen.buffer[row][column + offset].fg for offset in range(3)} == {"default"}


def test_names_errors_and_goodbyes_from_a_lying_server_are_shown_harmlessly(lying_server, chat_in_terminal):
    server = lying_server(LyingHub)
    alice = chat_in_terminal("alice", server)
    alice.type("/who\r")
    alice.wait_for_text("*** in #lobby (2): alice, mal\ufffd[2J\ufffd]0;pwned\ufffd", TIMEOUT)

    alice.type("inject-error\r")
    alice.wait_for_text("error: refused \ufffd[2J\ufffd[31mRED", TIMEOUT)
    alice.type("inject-goodbye\r")
    assert alice.wait_exit(TIMEOUT) == 0
    assert "*** disconnected: kicked \ufffd[2J\ufffd[31mRED" in alice.text
    assert_nothing_drove_the_screen(alice, "Password for alice:")


def test_a_user_name_the_server_makes_up_is_shown_harmlessly(lying_server, terminals, tmp_path, monkeypatch):
    from securechat import connection as server_module

    real_welcome = server_module.Welcome
    monkeypatch.setattr(
        server_module,
        "Welcome",
        lambda **fields: real_welcome(**{**fields, "username": fields["username"] + SHORT_ESCAPES}),
    )
    server = lying_server()
    alice = terminals(client_args(server.port, "alice", pin(tmp_path / "known_hosts", server)))
    type_password(alice, "alice")
    alice.wait_for_text("as alice\ufffd[2J\ufffd]0;pwned\ufffd; rooms:", START)
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt")
    assert_nothing_drove_the_screen(alice, "Password for alice:")


def test_batch_shows_a_lying_refusal_harmlessly(lying_server, tmp_path):
    server = lying_server(server_class=LyingLogin)
    result = run_batch(tmp_path, server.port, "alice", "--accept-new-host-key", password=password_of("alice"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: no entry \ufffd[2J\ufffd[31mRED\ufffd]0;pwned\ufffd"]


def test_batch_shows_why_a_lying_server_dropped_it_harmlessly(lying_server, batch_clients, join):
    server = lying_server(LyingHub)
    carol = join("carol", server)
    alice = batch_clients(server, "alice", "--accept-new-host-key")
    wait_for(carol, lambda event: isinstance(event, Notice) and event.name == "alice", timeout=START)
    alice.send("inject-fatal")
    alice.stderr.wait_for(lambda lines: any("reconnected" in line for line in lines), RECONNECT, "a reconnection")
    # The server never took that line (it dropped us instead): it is reported, and the run fails.
    assert alice.finish(TIMEOUT * 2) == 1
    assert "not sent: inject-fatal" in alice.stderr.lines
    assert "*** connection lost: dropped \ufffd[2J\ufffd[31mRED\ufffd]0;pwned\ufffd" in alice.stderr.lines
    assert b"\x1b" not in alice.stderr.data


def test_ctrl_d_leaves_cleanly_and_restores_the_terminal(chat_server, terminals, join, tmp_path):
    bob = join("bob", chat_server)
    known_hosts = pin(tmp_path / "known_hosts", chat_server)
    # A shell around the client reports, after it exits, its status and the terminal's settings.
    report = '"$0" "$@"; status=$?; stty -a; echo "client exit status: $status"'
    argv = ["/bin/sh", "-c", report, *client_args(chat_server.port, "alice", known_hosts)]
    alice = terminals(argv)
    type_password(alice, "alice")
    alice.wait_until(at_prompt(), START, "the prompt")

    alice.type("\x04")
    notice = wait_for(bob, lambda event: isinstance(event, Notice) and event.event == "left")
    assert notice.name == "alice"
    assert alice.wait_exit(TIMEOUT) == 0
    assert "client exit status: 0" in alice.text
    settings = alice.output.decode(errors="replace").split()
    assert {"icanon", "echo", "isig"} <= set(settings), "the terminal is left in raw or no-echo mode"
    assert not alice.screen.cursor.hidden


# --------------------------------------------------------------------------- reconnection


def test_reconnects_after_a_server_restart_without_asking_the_password(
    chat_server, server_process, chat_in_terminal, join
):
    port = chat_server.port
    alice = chat_in_terminal("alice", chat_server)
    bob = join("bob", chat_server)
    alice.wait_for_text("*** bob joined", TIMEOUT)

    chat_server.stop()
    ended = wait_for(bob, lambda event: isinstance(event, Disconnected))
    assert not ended.clean, f"a restarting server should invite its clients back, not send them away: {ended!r}"
    alice.wait_for_text("connection lost", TIMEOUT)
    asked_before = alice.output.count(b"Password for")
    restarted = server_process("--log-level", "WARNING", "--port", str(port))
    assert (restarted.port, restarted.fingerprint) == (port, chat_server.fingerprint)

    alice.wait_for_text("*** reconnected as alice", RECONNECT)
    assert alice.output.count(b"Password for") == asked_before
    bob_again = join("bob", restarted)
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt back")
    alice.type("still here\r")
    message = wait_for(bob_again, heard)
    assert (message.sender, message.text) == ("alice", "still here")


def test_a_resume_shows_of_each_room_only_what_changed(chat_server, server_process, chat_in_terminal, join):
    """Each blip enters every room again: "you are in" and the roster are shown again only where
    they say something new, so the lines missed meanwhile stay on the screen."""
    port = chat_server.port
    alice = chat_in_terminal("alice", chat_server)
    alice.type("/join #dev\r")
    alice.wait_for_text("*** in #dev (1): alice", TIMEOUT)
    join("bob", chat_server)
    alice.wait_for_text("*** bob joined", TIMEOUT)

    chat_server.stop()
    alice.wait_for_text("connection lost", TIMEOUT)
    restarted = server_process("--log-level", "WARNING", "--port", str(port))
    alice.wait_for_text("*** reconnected as alice", RECONNECT)
    alice.wait_until(lambda t: "*** in #lobby (1): alice" in t.text.split("reconnected as alice")[-1], TIMEOUT, "")
    alice.settle()
    after = alice.text.split("reconnected as alice")[-1]
    # bob went with the old server: #lobby's roster is news, and shown; #dev's is not, nor either "you are in".
    assert "*** in #dev" not in after
    assert "you are in" not in after
    assert alice.text.count("*** you are in #dev") == 1

    # Asked for, the same roster is shown.
    alice.type("/who #dev\r")
    alice.wait_until(lambda t: t.text.count("*** in #dev (1): alice") == 2, TIMEOUT, "/who answered")
    bob = join("bob", restarted)
    bob.join("#dev")
    alice.wait_until(lambda t: t.text.count("*** bob joined") == 3, TIMEOUT, "bob in #dev")
    alice.wait_until(at_prompt("#dev"), TIMEOUT, "the prompt back")
    alice.type("still here\r")
    assert wait_for(bob, heard).text == "still here"


def test_lines_missed_in_another_room_count_as_unread_after_a_resume(
    chat_server, server_process, chat_in_terminal, join
):
    port = chat_server.port
    alice = chat_in_terminal("alice", chat_server)
    alice.type("/join #dev\r")
    alice.wait_until(at_prompt("#dev"), TIMEOUT, "alice in #dev")
    alice.type("\x10")  # Ctrl-P: back to #lobby
    alice.wait_until(at_prompt("#lobby"), TIMEOUT, "alice back in #lobby")
    alice.child.kill(signal.SIGSTOP)  # she sees nothing of what follows until she resumes
    chat_server.stop()
    restarted = server_process("--log-level", "WARNING", "--port", str(port))
    bob = join("bob", restarted)
    bob.join("#dev")
    for text in ("one", "two", "alice: three"):
        bob.say(text, "#dev")
    wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "alice: three")
    alice.child.kill(signal.SIGCONT)
    alice.wait_for_text("*** reconnected as alice", RECONNECT)
    alice.wait_until(lambda t: "#lobby [#dev:3@1]>" in t.text, TIMEOUT, "the missed lines counted as unread")


def test_a_line_the_server_never_answered_is_named_when_the_link_drops(
    chat_server, server_process, chat_in_terminal, join
):
    """A line sent, then the server froze and died before echoing or refusing it: the client cannot
    know whether it was taken, and says so for that line, not nothing."""
    port = chat_server.port
    alice = chat_in_terminal("alice", chat_server)
    alice.type("answered\r")
    alice.wait_for_text("alice: answered", TIMEOUT)
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt back")

    chat_server.process.send_signal(signal.SIGSTOP)  # it reads nothing more, and answers nothing
    alice.type("into the void")
    alice.wait_until(at_prompt("#lobby", "into the void"), TIMEOUT, "the line typed")
    alice.type("\r")
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt back: the line went out")
    chat_server.process.kill()
    alice.wait_for_text("connection lost", TIMEOUT)
    alice.wait_for_text("*** no answer before the link dropped; maybe not sent: into the void", TIMEOUT)
    assert "maybe not sent: answered" not in alice.text  # that one was echoed: taken

    restarted = server_process("--log-level", "WARNING", "--port", str(port))
    alice.wait_for_text("*** reconnected as alice", RECONNECT)
    bob = join("bob", restarted)
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt back")
    alice.type("after\r")
    # "answered" was echoed, so it was saved: it survived the kill, in the history bob is shown on entering.
    assert [event.text for event in chats(bob, 2)] == ["answered", "after"]
    assert alice.text.count("into the void") == 1  # named once, and never said to have been sent


def test_an_expired_session_asks_for_the_password_instead_of_resuming(server_process, chat_in_terminal, join):
    """What it does: the resume is refused (token expired); the client says why and asks for
    the password again on the terminal; after that the user is back in the room."""
    first = server_process("--log-level", "WARNING", "--token-ttl", "1")
    port = first.port
    alice = chat_in_terminal("alice", first)

    first.stop()
    alice.wait_for_text("connection lost", TIMEOUT)
    # The server refreshes tokens while it runs, so let the 1 s token expire while it is down
    # (JWT expiry has whole-second resolution).
    time.sleep(2.2)
    asked_before = alice.output.count(b"Password for alice:")
    restarted = server_process("--log-level", "WARNING", "--port", str(port))
    bob = join("bob", restarted)

    alice.wait_for_text("your session has ended", RECONNECT)
    alice.wait_until(lambda t: t.output.count(b"Password for alice:") > asked_before, TIMEOUT, "a password prompt")
    alice.settle()
    assert "reconnected as alice" not in alice.text
    assert "cannot resume the session: token expired" in alice.text
    # Where the user must type the password: the prompt should sit on the cursor row, below the explanation.
    when_asked = alice.text
    prompt_at_cursor = alice.cursor_row.startswith("Password for alice:")
    explained_above = row_of(alice, "your session has ended") < alice.screen.cursor.y

    alice.type(password_of("alice"))
    alice.settle()
    typing = alice.cursor_row, alice.screen.cursor.x
    alice.type("\r")
    alice.wait_for_text("logged in again as alice", START)
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt after logging in again")
    alice.type("back again\r")
    message = wait_for(bob, lambda event: isinstance(event, Chat), timeout=TIMEOUT)
    assert (message.sender, message.text) == ("alice", "back again")
    assert password_of("alice").encode() not in alice.output
    assert prompt_at_cursor and explained_above, f"password prompt misplaced; screen when asked:\n{when_asked}"
    # Nothing tells the password's length: no stars, and the cursor has not moved (as at the first login).
    assert typing == ("Password for alice:", len("Password for alice: ")), typing


def test_a_changed_key_on_reconnection_ends_the_session_with_a_failure(
    chat_server, server_process, chat_in_terminal, tmp_path
):
    """A final reconnection error (here: another key answers on the port) is said once, and exits 1."""
    port = chat_server.port
    alice = chat_in_terminal("alice", chat_server)
    asked_before = alice.output.count(b"Password for")

    chat_server.stop()
    alice.wait_for_text("connection lost", TIMEOUT)
    impostor = server_process("--log-level", "WARNING", "--port", str(port), "--data-dir", str(tmp_path / "other"))
    assert impostor.fingerprint != chat_server.fingerprint

    assert alice.wait_exit(RECONNECT) == 1
    assert "CHANGED DURING THIS SESSION" in alice.text.upper()  # whatever known_hosts says by now
    assert alice.output.count(b"Password for") == asked_before


# --------------------------------------------------------------------------- interactive: rooms


def test_switching_rooms_keeps_a_half_typed_line_and_the_bar_counts_unread_lines(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    alice.type("/join #dev\r")
    alice.wait_until(at_prompt("#dev"), TIMEOUT, "the #dev prompt after /join")
    bob.join("#dev")
    wait_for(bob, lambda event: isinstance(event, Room) and event.room == "#dev")

    alice.type("half a thought")
    alice.type("\x10")  # Ctrl-P: the previous room
    alice.wait_until(at_prompt("#lobby", "half a thought"), TIMEOUT, "#lobby, with the half-typed line")
    bob.say("news in dev", "#dev")
    bob.say("more dev news", "#dev")
    alice.wait_for_text("#dev bob: more dev news", TIMEOUT)  # a line from another room names it
    # The prompt counts what is unread elsewhere, and the half-typed line stays.
    alice.wait_until(at_prompt("#lobby [#dev:2]", "half a thought"), TIMEOUT, "two unread lines in #dev")

    alice.type("\x0e")  # Ctrl-N: the next room
    alice.wait_until(at_prompt("#dev", "half a thought"), TIMEOUT, "#dev, read now, with the half-typed line")
    alice.type(" about builds\r")
    heard_line = wait_for(bob, heard)
    assert (heard_line.room, heard_line.text) == ("#dev", "half a thought about builds")

    alice.type("\x1b1")  # Alt-1: the first room
    alice.wait_until(at_prompt("#lobby"), TIMEOUT, "#lobby by its number")
    alice.type("/part #d\t")  # Tab completes a room name, with a space after it
    alice.wait_until(at_prompt("#lobby", "/part #dev "), TIMEOUT, "'#d' completed to '#dev '")


def test_batch_reports_the_lines_after_quit_as_not_sent(chat_server, join, tmp_path):
    bob = join("bob", chat_server)
    result = run_script(tmp_path, chat_server, "before quit\n/quit bye\nafter quit\nand this\n")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == ["not sent: after quit", "not sent: and this"]
    assert [message.text for message in chats(bob, 1)] == ["before quit"]
    assert drain_chats(bob) == []


def test_a_refused_private_message_prints_only_the_error(chat_server, join, tmp_path):
    result = run_script(tmp_path, chat_server, "/msg nobody-by-that-name hi\n", name="carol")
    assert result.stderr.splitlines() == ["error: not sent: there is no user nobody-by-that-name (your line: hi)"]
    assert "hi" not in result.stdout
    assert result.returncode == 1


def test_a_closed_port_fails_before_any_password_prompt(terminals, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    terminal = terminals(client_args(port, "alice", tmp_path / "known_hosts"))
    assert terminal.wait_exit(START) == 1
    assert "cannot reach the server" in terminal.text
    assert "Password" not in terminal.text


def test_a_wrong_password_gets_three_tries_on_a_terminal(chat_server, terminals, tmp_path):
    alice = terminals(client_args(chat_server.port, "alice", pin(tmp_path / "known_hosts", chat_server)))
    for attempt in range(2):
        alice.wait_until(
            lambda terminal, attempt=attempt: terminal.text.count("Password for alice:") == attempt + 1,
            START,
            "a prompt",
        )
        alice.type("not the password\r")
        alice.wait_until(
            lambda terminal, attempt=attempt: terminal.text.count("try again") == attempt + 1, START, "a retry"
        )
    type_password(alice, "alice")  # the third try is the right one
    alice.wait_until(at_prompt(), START, "the prompt after the third try")


def test_a_password_typed_after_the_servers_login_window_still_logs_in(server_process, terminals, tmp_path):
    """The server gives a connection a few seconds to log in; a slow typist is logged in on a fresh
    connection with what they typed, not told "handshake timed out"."""
    server = server_process("--log-level", "WARNING", "--handshake-timeout", "1")
    alice = terminals(client_args(server.port, "alice", pin(tmp_path / "known_hosts", server)))
    alice.wait_for_text("Password for alice:", START)
    time.sleep(2.5)  # past the server's window: it has closed that connection
    alice.type(password_of("alice") + "\r")
    alice.wait_until(at_prompt(), START, "the prompt after a slow password")
    assert "timed out" not in alice.text and alice.text.count("Password for alice:") == 1


def test_batch_lines_after_a_join_go_to_the_joined_room(chat_server, join, tmp_path):
    bob = join("bob", chat_server)
    bob.join("#dev")
    wait_for(bob, lambda event: isinstance(event, Room) and event.room == "#dev")
    result = run_script(tmp_path, chat_server, "/join #dev\nfor dev\n/join #lobby\nfor the lobby\n")
    assert result.returncode == 0, result.stderr
    heard = [(message.room, message.text) for message in chats(bob, 2)]
    assert heard == [("#dev", "for dev"), ("#lobby", "for the lobby")]


def test_a_bracketed_paste_of_several_lines_is_sent_as_one_message(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    # What a terminal sends for a paste: the text between the bracketed-paste markers.
    alice.type("\x1b[200~first line\nsecond line\r\nthird\x1b[201~")
    alice.type("\r")
    message = wait_for(bob, heard)
    assert message.text == "first line\nsecond line\nthird"  # one message, its newlines kept
    alice.wait_for_text("alice: first line", TIMEOUT)
    alice.wait_for_text("    second line", TIMEOUT)  # shown with its further lines indented
    assert drain_chats(bob) == []  # not three messages


def test_a_line_padded_to_the_edge_of_the_terminal_cannot_pass_for_someone_elses(chat_server, chat_in_terminal, join):
    # Left to the terminal, the row after the padding started at the left edge, like a line carol sent.
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    shown_before = len("12:34 bob: ok")  # a time, the sender, and his first two characters
    bob.say("ok" + " " * (80 - shown_before) + "12:34 carol: alice, what is your password again?")
    alice.wait_for_text("carol: alice, what is your password again?", TIMEOUT)
    (row,) = [line for line in alice.lines if "what is your password" in line]
    assert row.startswith("    12:34 carol:"), alice.text  # indented: it continues bob's line


def test_a_message_of_empty_lines_shows_as_a_count_not_a_screen_of_nothing(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    bob.say("top" + "\n" * 300 + "bottom" + "\n  " * 40)
    alice.wait_for_text("    bottom", TIMEOUT)
    alice.settle()
    assert "bob: top" in alice.text, alice.text  # still on the screen
    assert "    (299 empty lines)" in alice.lines, alice.text


def test_a_paste_that_ends_with_a_newline_sends_no_empty_last_line(chat_server, chat_in_terminal, join):
    # Copying whole lines almost always takes the last newline too: everyone saw an empty row under it.
    bob = join("bob", chat_server)
    alice = chat_in_terminal("alice", chat_server)
    alice.type("\x1b[200~first line\nsecond line\n  \n\x1b[201~")
    alice.type("\r")
    assert wait_for(bob, heard).text == "first line\nsecond line"


def test_a_message_of_the_day_of_several_lines_is_shown_as_lines(server_process, chat_in_terminal, tmp_path):
    # Notices were shown through a one-line sanitizer: "Welcome to the chat.\ufffdRules: be kind.\ufffd..."
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "motd.txt").write_text("Welcome to the chat.\nRules: be kind.\nMaintenance on Sunday 10:00.\n")
    alice = chat_in_terminal("alice", server_process("--log-level", "WARNING"))
    alice.wait_for_text("message of the day: Welcome to the chat.", TIMEOUT)
    alice.settle()
    assert "\ufffd" not in alice.text, alice.text
    first = row_of(alice, "Welcome to the chat.")
    assert alice.lines[first + 1 : first + 3] == ["    Rules: be kind.", "    Maintenance on Sunday 10:00."]


def test_a_room_name_that_cannot_be_one_is_refused_before_the_password_is_asked(chat_server, terminals, tmp_path):
    # It was checked after the login: the password typed for nothing, and #lobby saw alice come and go.
    known_hosts = pin(tmp_path / "known_hosts", chat_server)
    alice = terminals(client_args(chat_server.port, "alice", known_hosts, "--room", "bad room!"))
    assert alice.wait_exit(START) == 2
    assert "argument --room: 'bad room!': room names are" in alice.text
    assert "Password for alice:" not in alice.text


def test_a_script_that_parts_its_only_room_and_says_a_line_fails_instead_of_hanging(chat_server, batch_clients):
    """A script does ``/part`` (its only room, #lobby) and then says a line.

    The developer sees: the client never exits (it spins for ever, retrying the line as if the
    link had dropped: the library's "not sent: you are in no room" ChatError is taken for a lost
    connection), so a cron job hangs.
    Should see: one error on stderr naming the line (``not sent: you are in no room …``), the
    next line goes on, and exit status 1, as for any refused line.
    """
    alice = batch_clients(chat_server, "alice", "--accept-new-host-key")
    alice.send("/part")
    alice.stdout.wait_for(has_line("*** you left #lobby"), START, "the part")
    alice.send("hello nobody")
    assert alice.finish(TIMEOUT * 2) == 1
    assert any("you are in no room" in line and "hello nobody" in line for line in alice.stderr.lines), (
        alice.stderr.lines
    )


def test_a_batch_client_whose_reader_went_away_prints_no_traceback(chat_server, batch_clients, join):
    """``python client.py ... | head -1``: the reader of stdout exits after one line.

    The developer sees: "Exception in thread printer: Traceback … BrokenPipeError" on stderr
    (and from then on no event is handled: the thread that also reconnects is dead).
    Should see: no traceback; the client stops quietly (as a Unix filter does on SIGPIPE) or
    goes on without printing, but never a Python traceback.
    """
    bob = join("bob", chat_server)
    alice = batch_clients(chat_server, "alice", "--accept-new-host-key")
    alice.stdout.wait_for(has_line("*** you are in #lobby"), START, "the first line")
    wait_for(bob, lambda event: isinstance(event, Notice) and event.name == "alice", timeout=START)
    alice.process.stdout.close()  # head -1 has read its line and exited
    alice.stdout.closed = True
    bob.say("a line nobody reads")
    wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "a line nobody reads")
    # alice's client has tried to print it by the time it has answered a /who of its own
    alice.send("/who")
    deadline = time.monotonic() + TIMEOUT * 2
    while (
        time.monotonic() < deadline
        and alice.process.poll() is None
        and "Traceback" not in "\n".join(alice.stderr.lines)
    ):
        alice.stderr.pump()
    alice.process.stdin.close()
    deadline = time.monotonic() + TIMEOUT * 2
    while not alice.stderr.closed and time.monotonic() < deadline:
        alice.stderr.pump()
    assert alice.process.wait(timeout=TIMEOUT * 2) is not None
    assert "Traceback" not in alice.stderr.data.decode(), alice.stderr.data.decode()


def test_ctrl_c_on_a_running_script_is_not_reported_as_success(chat_server, batch_clients, join):
    """A long-running script (``tail -f log | chat --user ci``) is stopped with Ctrl-C (SIGINT).

    The developer sees: exit status 0 and nothing on stderr, as if its input had ended normally;
    a calling shell script (``set -e``, or bash's cooperative SIGINT handling) carries on as if the
    chat client had finished its job. Stopped by Ctrl-C while it logs in, the same client says
    ``error: interrupted`` and exits 130 (tests/test_hardening.py).
    Should see: ``error: interrupted`` and exit status 130, whenever Ctrl-C comes.
    """
    bob = join("bob", chat_server)
    alice = batch_clients(chat_server, "alice", "--accept-new-host-key")
    alice.send("a line before the interrupt")
    # Heard: alice is logged in and in her loop of reading lines, her input still open.
    wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "a line before the interrupt", START)
    alice.process.send_signal(signal.SIGINT)
    status = alice.process.wait(timeout=TIMEOUT * 2)
    deadline = time.monotonic() + TIMEOUT
    while not alice.stderr.closed and time.monotonic() < deadline:
        alice.stderr.pump()
    assert status == 130, (status, alice.stderr.lines)
    assert "error: interrupted" in alice.stderr.lines, alice.stderr.lines


def test_the_roster_shown_on_entering_a_room_marks_who_is_away_as_who_does(chat_server, chat_in_terminal, join):
    # It said "*** in #lobby (2): alice, bob" on entering, and "alice (away), bob" a moment later on /who.
    alice = join("alice", chat_server)
    alice.command("away", "lunch")
    wait_for(alice, lambda event: "you are marked away" in getattr(event, "text", ""))
    bob = chat_in_terminal("bob", chat_server)
    bob.type("/who\r")
    bob.wait_until(lambda terminal: terminal.text.count("*** in #lobby (2)") == 2, TIMEOUT, "/who answered")
    on_entering, on_who = [line for line in bob.lines if line.startswith("*** in #lobby (2)")]
    assert on_entering == on_who == "*** in #lobby (2): alice (away), bob", bob.text


def test_batch_prints_a_multi_line_message_as_one_record(chat_server, join, tmp_path):
    bob = join("bob", chat_server)
    bob.say("top\nmiddle\n\x1b[2Jbottom")
    result = run_script(tmp_path, chat_server, "one\ntwo\n")
    assert "history: #lobby bob: top\n\tmiddle\n\t\ufffd[2Jbottom\n" in result.stdout
    assert [message.text for message in chats(bob, 2)] == ["one", "two"]  # typed lines stay apart


def test_a_line_naming_you_stands_out_rings_the_bell_and_counts_as_a_mention(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    carol = chat_in_terminal("carol", chat_server)
    carol.type("/join #dev\r")
    carol.wait_until(at_prompt("#dev"), TIMEOUT, "the #dev prompt after /join")
    bob.join("#dev")
    wait_for(bob, lambda event: isinstance(event, Room) and event.room == "#dev")
    before = len(carol.output)
    bob.say("nothing for anyone", "#dev")
    carol.wait_for_text("bob: nothing for anyone", TIMEOUT)
    assert b"\x07" not in carol.output[before:]
    bob.say("carol: can you look at the build?", "#dev")
    carol.wait_for_text("bob: carol: can you look at the build?", TIMEOUT)
    assert b"\x07" in carol.output[before:], "no bell for a line naming carol"
    row = row_of(carol, "can you look at the build?")
    cells = carol.screen.buffer[row]
    # All along: the line's own resets (after the time, after the name) used to end the reverse video.
    assert all(cells[column].reverse for column in range(len(carol.lines[row]))), "not all in reverse video"

    carol.type("\x10")  # Ctrl-P: back to #lobby; #dev's lines now count as unread
    carol.wait_until(at_prompt("#lobby"), TIMEOUT, "#lobby")
    bob.say("ping @Carol again", "#dev")
    bob.say("and an unrelated line", "#dev")
    carol.wait_until(at_prompt("#lobby [#dev:2@1]"), TIMEOUT, "two unread lines in #dev, one naming carol")


def test_at_login_the_client_says_where_you_were_mentioned_while_away(chat_server, chat_in_terminal, join):
    bob = join("bob", chat_server)
    carol = chat_in_terminal("carol", chat_server)
    carol.type("/join #dev\r")
    carol.wait_until(at_prompt("#dev"), TIMEOUT, "the #dev prompt after /join")
    bob.join("#dev")
    wait_for(bob, lambda event: isinstance(event, Room) and event.room == "#dev")
    bob.say("carol: seen at once")
    carol.wait_for_text("bob: carol: seen at once", TIMEOUT)
    carol.type("\x04")  # Ctrl-D: carol leaves
    assert carol.wait_exit(TIMEOUT * 2) == 0
    time.sleep(0.05)  # lines after this are said while carol is away (the server stamps both)
    bob.say("carol, the release is out", "#dev")
    bob.say("did carol see it?", "#dev")
    bob.say("nothing about anyone", "#dev")
    wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "nothing about anyone")

    carol = chat_in_terminal("carol", chat_server)
    carol.wait_for_text("*** you were mentioned 2 times in #dev while you were away", TIMEOUT)
    carol.settle()
    # The lobby's line naming her was said while she was there: not counted.
    assert carol.text.count("you were mentioned") == 1, carol.text


def test_at_login_a_busy_room_whose_last_lines_do_not_reach_back_says_more_was_said(
    server_process, chat_in_terminal, join
):
    # A mention followed by 50 lines was not among the lines shown, and nothing said there was more.
    server = server_process("--log-level", "WARNING", "--flood-burst", "200")
    bob = join("bob", server)
    carol = chat_in_terminal("carol", server)
    carol.type("\x04")
    assert carol.wait_exit(TIMEOUT * 2) == 0
    time.sleep(0.05)
    bob.say("carol: the release is blocked on you, please look")
    for number in range(50):
        bob.say(f"chatter {number}" if number != 20 else "and carol, one more thing")
    wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "chatter 49")
    carol = chat_in_terminal("carol", server)
    carol.wait_for_text("*** more was said in #lobby while you were away: /history", TIMEOUT)
    carol.settle()
    screen = carol.unfolded  # the line may be folded
    assert "(you are named once in these lines)" in screen, carol.text
    assert "you were mentioned" not in screen  # said once, in the line above


def test_quit_typed_in_capitals_while_offline_still_quits(chat_server, chat_in_terminal):
    # Commands are taken in any case, but the offline check compared the word as typed: "not sent: offline".
    alice = chat_in_terminal("alice", chat_server)
    chat_server.stop()
    alice.wait_for_text("connection lost", TIMEOUT)
    alice.wait_until(at_prompt(), TIMEOUT, "the prompt while offline")
    alice.type("/QUIT\r")
    assert alice.wait_exit(TIMEOUT) == 0
    assert "not sent: offline" not in alice.text


def test_a_slow_typist_with_a_wrong_password_still_gets_another_try(server_process, terminals, tmp_path):
    """Review b53: a wrong password typed after the server's login window is retried on a fresh
    connection, refused there, and must then count as one wrong try ("try again"), not end the
    client after a single try as if it were the third."""
    server = server_process("--log-level", "WARNING", "--handshake-timeout", "1")
    alice = terminals(client_args(server.port, "alice", pin(tmp_path / "known_hosts", server)))
    alice.wait_for_text("Password for alice:", START)
    time.sleep(2.5)  # past the server's window: it has closed that connection
    alice.type("not the password\r")
    alice.wait_until(
        lambda terminal: terminal.text.count("Password for alice:") == 2 or not terminal.child.isalive(),
        START,
        "a second password prompt (or the client's exit)",
    )
    alice.settle()
    assert "try again" in alice.text and alice.text.count("Password for alice:") == 2, alice.text


# --------------------------------------------------------------------------- logging in, and again


def fail_logins(server, tmp_path: Path, name: str, count: int) -> None:
    """``count`` wrong passwords for ``name`` from this address, each one checked (waiting out the delays)."""
    done = 0
    while done < count:
        with ChatClient(
            "127.0.0.1",
            server.port,
            server_fingerprint=server.fingerprint,
            known_hosts=KnownHosts(tmp_path / "library_known_hosts"),
            timeout=TIMEOUT * 2,
        ) as client:
            try:
                client.login(name, "not-the-password")
            except LoginRefused as exc:
                if exc.code == "rate_limited":
                    time.sleep(0.5)
                    continue
                assert exc.code == "auth_failed", exc
                done += 1


def asked_to_log_in_again(chat_server, terminals, tmp_path: Path, users_file: Path, new_password: str) -> Terminal:
    """carol chatting in a terminal, her password changed meanwhile (``server.py passwd``): at the
    prompt that asks for it again."""
    carol = terminals(client_args(chat_server.port, "carol", pin(tmp_path / "known_hosts", chat_server)))
    type_password(carol, "carol")
    carol.wait_until(at_prompt(), START * 2, "carol's prompt")
    change_password(users_file, "carol", new_password)
    carol.wait_until(lambda t: t.text.count("Password for carol:") == 2, TIMEOUT * 3, "the second password prompt")
    return carol


def change_password(users_file: Path, name: str, password: str) -> None:
    changed = run_server_py("--users", str(users_file), "passwd", name, password=password)
    assert changed.returncode == 0, changed.stderr


def test_a_password_typed_again_during_the_login_delay_is_neither_shown_nor_sent_to_the_room(
    chat_server, terminals, join, tmp_path
):
    """alice's right password is refused "too many failed logins; try again in 4 s; waiting". She
    thinks she is asked again and types it again with Enter. The terminal is in cooked mode while
    the client sleeps: it echoes her password in clear, and once logged in the chat prompt reads the
    queued line and sends it to #lobby."""
    bob = join("bob", chat_server)
    fail_logins(chat_server, tmp_path, "alice", 5)
    alice = terminals(client_args(chat_server.port, "alice", pin(tmp_path / "known_hosts", chat_server)))
    type_password(alice, "alice")
    alice.wait_for_text("waiting", START * 2)
    alice.type(password_of("alice") + "\r")
    alice.wait_until(at_prompt(), START * 2, "alice's prompt")
    alice.settle(1.0)
    heard = drain_chats(bob, quiet=1.0)
    assert password_of("alice") not in heard, f"alice's password went to the room: {heard}"
    assert password_of("alice") not in alice.text, f"alice's password is on her screen:\n{alice.text}"


def test_ctrl_c_during_the_login_delay_when_logging_in_again_quits_at_once(
    chat_server, terminals, join, tmp_path, users_file
):
    """carol's password is changed (``server.py passwd``); her terminal asks for it again ("Ctrl-C to quit").
    After earlier failures the server names a delay and the client says "waiting". She presses Ctrl-C:
    the prompt's raw mode is still on, so it is no signal; nothing happens until the delay is over."""
    new_password = "a-new-pass-for-carol-9"
    carol = asked_to_log_in_again(chat_server, terminals, tmp_path, users_file, new_password)
    fail_logins(chat_server, tmp_path, "carol", 5)  # the next delay: 4 s
    carol.type(new_password + "\r")
    carol.wait_for_text("waiting", START * 2)
    carol.type("\x03")  # Ctrl-C
    asked = time.monotonic()
    status = carol.wait_exit(TIMEOUT * 4)
    took = time.monotonic() - asked
    assert took < 2, f"Ctrl-C took {took:.1f} s to quit (status {status}); screen:\n{carol.text}"


def test_a_script_whose_password_is_changed_is_not_told_the_link_was_lost_nor_reconnects(
    chat_server, tmp_path, users_file
):
    """Batch mode (stdin not a tty, CHAT_PASSWORD set): `server.py passwd carol` while the script runs.
    It prints "*** connection lost: this account's password changed", "*** reconnecting in 1.0 s...",
    reconnects, and exits with "error: cannot resume the session: no session to resume; log in again":
    the very lines 36e60ae removed from the terminal (nothing was lost; there was nothing to resume)."""
    from test_cli import BatchClient

    env = client_env(tmp_path, CHAT_PASSWORD=password_of("carol"))
    carol = BatchClient(client_args(chat_server.port, "carol", pin(tmp_path / "known_hosts", chat_server)), env)
    try:
        carol.stdout.wait_for(lambda lines: any("you are in #lobby" in line for line in lines), START * 2, "the login")
        change_password(users_file, "carol", "a-new-pass-for-carol-9")
        deadline = time.monotonic() + TIMEOUT * 3
        while carol.process.poll() is None and time.monotonic() < deadline:
            carol.stderr.pump(0.1)
        for _ in range(20):
            carol.stderr.pump(0.05)
        said = "\n".join(carol.stderr.lines)
        assert carol.process.poll() == 1, said
        assert "password changed" in said, said
        assert "connection lost" not in said and "reconnecting" not in said and "no session to resume" not in said, said
    finally:
        carol.close()


def test_a_failed_failover_names_each_server_once(tmp_path):
    """``client.py --server A --server B``, A's port closed and B's address resetting: the error reads
    "cannot reach any of the servers (127.0.0.1:A: Connection refused; 127.0.0.1:B: 127.0.0.1:B: the server
    closed the connection (...))": _shake_hands puts the address in its message, and connect() again."""
    gone = HangsUp()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        argv = [
            sys.executable,
            str(ROOT / "client.py"),
            "--server",
            f"127.0.0.1:{closed_port}",
            "--server",
            f"127.0.0.1:{gone.port}",
            "--user",
            "alice",
            "--known-hosts",
            str(tmp_path / "kh"),
        ]
        ran = subprocess.run(
            argv,
            input="hi\n",
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 4,
            env=client_env(tmp_path, CHAT_PASSWORD="x"),
        )
    finally:
        gone.close()
    assert ran.returncode == 1 and "cannot reach any of the servers" in ran.stderr, ran.stderr
    assert ran.stderr.count(f"127.0.0.1:{gone.port}") == 1, ran.stderr


def test_an_ipv6_server_is_named_in_brackets_as_the_user_typed_it(tmp_path):
    """``--server [::1]:PORT`` on a closed port: the error names "[::1]:PORT", which can be typed back,
    not "::1:PORT"."""
    try:
        closed = socket.socket(socket.AF_INET6)
        closed.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    closed_port = closed.getsockname()[1]
    closed.close()
    argv = [sys.executable, str(ROOT / "client.py"), "--server", f"[::1]:{closed_port}", "--user", "alice"]
    argv += ["--known-hosts", str(tmp_path / "kh")]
    ran = subprocess.run(
        argv, input="hi\n", capture_output=True, text=True, timeout=TIMEOUT, env=client_env(tmp_path, CHAT_PASSWORD="x")
    )
    assert ran.returncode == 1 and f"cannot reach the server at [::1]:{closed_port}" in ran.stderr, ran.stderr


@pytest.fixture
def tmux_shell(tmp_path: Path):
    """An interactive bash with job control in a private tmux server: ``send(*keys)`` and ``screen()``."""
    import shutil

    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    socket_path = str(tmp_path / "tmux.sock")
    env = client_env(tmp_path)
    env["HOME"] = str(tmp_path)
    shell = " ".join(f"{key}='{value}'" for key, value in env.items() if key.isidentifier() and "'" not in value)
    subprocess.run(
        [
            "tmux",
            "-S",
            socket_path,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            f"env -i {shell} bash --norc --noprofile -i",
        ],
        check=True,
        timeout=TIMEOUT,
    )

    def send(*keys: str) -> None:
        subprocess.run(["tmux", "-S", socket_path, "send-keys", *keys], check=True, timeout=TIMEOUT)

    def screen() -> str:
        return subprocess.run(
            ["tmux", "-S", socket_path, "capture-pane", "-p"], capture_output=True, text=True, timeout=TIMEOUT
        ).stdout

    def wait_for(text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in screen():
            assert time.monotonic() < deadline, f"no {text!r} on the screen:\n{screen()}"
            time.sleep(0.1)

    yield send, screen, wait_for
    subprocess.run(["tmux", "-S", socket_path, "kill-server"], timeout=TIMEOUT, check=False)


def test_ctrl_z_at_the_password_prompt_then_fg_does_not_echo_the_password(chat_server, tmux_shell, tmp_path):
    """README: "Ctrl-Z suspends (`fg` brings the client back)". At "Password for alice:" (getpass),
    Ctrl-Z stops the client and the shell puts the terminal back in its own modes; after `fg` the
    client reads on with echo ON: the rest of the password is shown in clear on the screen (and what
    was typed before Ctrl-Z is lost, so the login fails and costs a try)."""
    send, screen, wait_for = tmux_shell
    argv = client_args(chat_server.port, "alice", pin(tmp_path / "known_hosts", chat_server))
    send(" ".join(argv), "Enter")
    wait_for("Password for alice:", START * 2)
    send("alice-")
    time.sleep(0.3)
    send("C-z")
    wait_for("Stopped", TIMEOUT)
    send("fg", "Enter")
    time.sleep(1.0)
    send("pass-5", "Enter")
    time.sleep(2.0)
    shown = screen()
    send("C-c")
    assert "pass-5" not in shown, f"the password is on the screen:\n{shown}"


def test_ctrl_z_at_the_log_in_again_prompt_is_not_taken_into_the_password(chat_server, terminals, tmp_path, users_file):
    """f57f4b1 made Ctrl-Z suspend at the chat prompt ("it put the control character in the line"); the
    other prompt_toolkit prompt, log_in_again's "Password for carol:" (after `server.py passwd`), still
    takes Ctrl-Z as a character: the right password typed around it is refused as wrong and costs a try."""
    new_password = "a-new-pass-for-carol-9"
    carol = asked_to_log_in_again(chat_server, terminals, tmp_path, users_file, new_password)
    carol.type(new_password[:10])
    carol.type("\x1a")  # Ctrl-Z
    time.sleep(0.5)
    state = Path(f"/proc/{carol.child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    if state == "T":  # suspended, as a shell would: `fg`
        os.kill(carol.child.pid, signal.SIGCONT)
    carol.type(new_password[10:] + "\r")
    carol.wait_until(
        lambda t: "logged in again" in t.text or "wrong user name or password" in t.text, START * 2, "an answer"
    )
    assert "logged in again" in carol.text, carol.text
