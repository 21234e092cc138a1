"""The client against a hostile server: what a server (or someone on the path) can do to the
client, and what lies on the client's disk.

Most tests run the real ``client.py`` against ``HostileServer``: a server of the test's own
that runs the real handshake (``ServerHandshake``, its own RSA key, pinned by the client as
an earlier "yes" would have) and then sends whatever frames the test scripts, sealed with
the project's own ``SecureChannel``.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TIMEOUT, client_args, client_env
from terminal import Terminal

from securechat import crypto_utils
from securechat.channel import ConnectionClosed, SecureChannel, read_frame
from securechat.client import ChatClient, ChatError, KnownHosts
from securechat.crypto_utils import CryptoError
from securechat.handshake import ServerHandshake
from securechat.protocol import (
    Chat,
    Command,
    ControlError,
    ErrorReply,
    FrameType,
    Goodbye,
    History,
    Leave,
    Login,
    Message,
    ProtocolError,
    Resume,
    Room,
    Roster,
    Say,
    Sessions,
    Welcome,
    server_hello_signed_data,
)

CLIENT = str(ROOT / "client.py")
#: Starting a client means starting Python, importing, and making an RSA key.
START = TIMEOUT * 2


@functools.cache
def server_key() -> crypto_utils.PrivateKey:
    return crypto_utils.generate_private_key()


# --------------------------------------------------------------------------- a hostile server


class Link:
    """One client connection to ``HostileServer``, as the test's script drives it."""

    def __init__(self, server: HostileServer, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        #: 0 for the first connection the server accepted, 1 for the next (a reconnection), ...
        self.number = number
        self.channel: SecureChannel | None = None
        self.username = ""
        self._next_id = 100

    def handshake(self) -> Login | Resume:
        """The real server's handshake, with the server's own key: returns the client's login or resume."""
        key = self.server.key

        def sign(digest: bytes) -> tuple[bytes, bytes]:
            return digest, crypto_utils.sign(key, server_hello_signed_data(digest))

        handshake = ServerHandshake(key, self.server.key_der, sign)
        self.sock.sendall(handshake.receive_hello(*read_frame(self.sock)))
        request = handshake.receive_login(*read_frame(self.sock))
        assert handshake.channel is not None
        self.channel = handshake.channel
        self.username = request.username if isinstance(request, Login) else "alice"
        self.channel.username = self.username
        return request

    def send(self, *messages: Message) -> None:
        assert self.channel is not None
        for message in messages:
            self.sock.sendall(self.channel.seal(message))

    def welcome(self, rooms: tuple[str, ...] = ("#lobby",), **overrides: object) -> None:
        """Accept the login: a welcome, then each room's entry (room, roster, an empty history)."""
        fields: dict = {
            "username": self.username,
            "token": "not-a-real-token",
            "expires_at": int(time.time()) + 3600,
            "rooms": list(rooms),
            "session": f"s{self.number}",
            "flood_burst": 20,
            "flood_rate": 2.0,
        }
        fields.update(overrides)
        self.send(Welcome(**fields))
        for room in rooms:
            self.send(Room(room=room), Roster(members=["alice", "bob"], room=room), History(room=room, count=0))

    def line(self, text: str, room: str = "#lobby", sender: str = "bob", **overrides: object) -> Chat:
        self._next_id += 1
        fields: dict = {"sender": sender, "text": text, "sent_at": time.time(), "room": room, "id": self._next_id}
        fields.update(overrides)
        return Chat(**fields)

    def welcome_then_drop(self, dropped: threading.Event, *lines: Message) -> None:
        """A first login: welcomed (then sent ``lines``), and its link dies without a word once ``dropped`` is set."""
        self.welcome()
        self.send(*lines)
        dropped.wait(START)
        self.sock.shutdown(socket.SHUT_RDWR)

    def receive(self) -> Message:
        """The client's next sealed message (its pongs are skipped)."""
        assert self.channel is not None
        while True:
            frame_type, body = read_frame(self.sock)
            if frame_type is FrameType.CONTROL:
                continue
            return self.channel.open(body)

    def serve(self, answers: Callable[[Command], list[Message]] | None = None) -> None:
        """Until the client leaves: echo its lines, answer its commands with ``answers``, say goodbye."""
        while True:
            request = self.receive()
            if isinstance(request, Say):
                self.send(self.line(request.text, request.room, self.username, ref=request.ref))
            elif isinstance(request, Command) and answers is not None:
                self.send(*answers(request))
            elif isinstance(request, Leave):
                self.send(Goodbye(reason="bye"))
                return


class HostileServer:
    """Listens on a loopback port; each connection runs ``script(link)`` on a thread of its own."""

    def __init__(self, script: Callable[[Link], None], key: crypto_utils.PrivateKey | None = None) -> None:
        self.script = script
        self.key = key or server_key()
        self.key_der = crypto_utils.public_key_bytes(self.key.public_key())
        self.fingerprint = crypto_utils.fingerprint(self.key.public_key())
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._stopped = threading.Event()
        self.listener.settimeout(0.1)
        self._accepter = threading.Thread(target=self._accept, name="hostile-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(TIMEOUT * 4)
            link = Link(self, sock, len(self.socks))
            self.socks.append(sock)
            thread = threading.Thread(target=self._run, args=(link,), name="hostile-link", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, link: Link) -> None:
        try:
            self.script(link)
        except (OSError, ConnectionClosed, ProtocolError, CryptoError):
            pass
        except BaseException as exc:  # a bug in the test's script: shown at teardown
            self.errors.append(exc)
        finally:
            link.sock.close()

    def stop(self) -> None:
        self._stopped.set()
        self._accepter.join(TIMEOUT)
        self.listener.close()
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(TIMEOUT)


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileServer]]:
    started: list[HostileServer] = []

    def start(script: Callable[[Link], None], **options: object) -> HostileServer:
        server = HostileServer(script, **options)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    for server in started:
        assert not server.errors, server.errors


# --------------------------------------------------------------------------- the real client program


def pinned(tmp_path: Path, port: int, fingerprint: str, name: str = "known_hosts") -> Path:
    """A known-hosts file holding ``fingerprint`` for the port, as an earlier "yes" would have left it."""
    path = tmp_path / name
    path.write_text(f"{KnownHosts.host_id('127.0.0.1', port)} {fingerprint}\n")
    path.chmod(0o600)
    return path


class Batch:
    """``client.py`` in batch mode, stdin a pipe the test writes to; killed at teardown if still running."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.out = bytearray()
        self.err = bytearray()
        self._readers = [
            threading.Thread(target=self._drain, args=(self.process.stdout, self.out), daemon=True),
            threading.Thread(target=self._drain, args=(self.process.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream, into: bytearray) -> None:
        while chunk := stream.read1(65536):
            into.extend(chunk)

    def send(self, *lines: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.process.stdin.flush()

    def wait_for(self, what: bytes, timeout: float, stream: str = "out") -> bool:
        """Whether ``what`` shows on stdout (or stderr) within ``timeout``; gives up early on a traceback."""
        deadline = time.monotonic() + timeout
        buffer = self.out if stream == "out" else self.err
        while what not in buffer:
            ended = self.process.poll() is not None and not self._alive()
            if time.monotonic() > deadline or ended or b"Traceback" in self.err:
                time.sleep(0.2)  # the rest of what it is writing
                return what in buffer
            time.sleep(0.05)
        return True

    def _alive(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def finish(self, timeout: float) -> int | None:
        """End its input; its exit status, or None if it is still running after ``timeout``."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for reader in self._readers:
            reader.join(TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


@pytest.fixture
def batch(tmp_path: Path) -> Iterator[Callable[..., Batch]]:
    started: list[Batch] = []

    def start(port: int, known_hosts: Path, *extra: str, password: str = "any-password") -> Batch:
        process = Batch(client_args(port, "alice", known_hosts, *extra), client_env(tmp_path, CHAT_PASSWORD=password))
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def logged_in_terminal(spawn: Callable[..., Terminal], port: int, known_hosts: Path, *extra: str) -> Terminal:
    term = spawn(client_args(port, "alice", known_hosts, *extra))
    term.wait_for_text("Password for alice:", START)
    term.type("any-password\r")
    term.wait_for_text("#lobby>", START)
    return term


# --------------------------------------------------------------------------- 1. dates a calendar cannot hold


def test_batch_a_session_list_dated_beyond_the_calendar_is_no_traceback(hostile, batch, tmp_path):
    """A server answers /sessions with a ``since`` the protocol accepts (any finite number) but
    ``time.localtime`` cannot convert: the batch client's event thread dies with a traceback on
    stderr, and every later event (here bob's line) is lost while the run goes on."""

    def script(link: Link) -> None:
        link.handshake()
        link.welcome()

        def answers(command: Command) -> list[Message]:
            if command.name != "sessions":
                return []
            dated = Sessions(ids=["s0"], devices=["laptop"], since=[1e18], addresses=["127.0.0.1"], current="s0")
            return [dated, link.line("still here")]

        link.serve(answers)

    server = hostile(script)
    client = batch(server.port, pinned(tmp_path, server.port, server.fingerprint))
    client.send("/sessions")
    heard = client.wait_for(b"still here", START)
    client.finish(TIMEOUT)
    assert b"Traceback" not in client.err, client.err.decode(errors="replace")
    assert heard, f"bob's line after the session list was never printed; stderr: {client.err.decode(errors='replace')}"


def test_terminal_a_line_dated_beyond_the_calendar_is_no_traceback(hostile, terminals, tmp_path):
    """In the terminal every line is stamped with its time: a ``sent_at`` of 1e18 (a finite number,
    so the protocol takes it) kills the event thread with a traceback painted over the chat, and
    the client goes deaf: bob's next line is never shown, though the prompt still looks alive."""
    go = threading.Event()

    def script(link: Link) -> None:
        link.handshake()
        link.welcome()
        go.wait(START)
        link.send(link.line("from the far future", sent_at=1e18), link.line("still here"))
        link.serve()

    server = hostile(script)
    alice = logged_in_terminal(terminals, server.port, pinned(tmp_path, server.port, server.fingerprint))
    go.set()
    try:
        alice.wait_until(lambda t: "still here" in t.text or b"Traceback" in t.output, TIMEOUT, "bob's line")
    finally:
        alice.settle()
    assert b"Traceback" not in alice.output, alice.text
    assert "still here" in alice.text


RIGHT_TO_LEFT_OVERRIDE = "\u202e"


def test_a_room_name_never_reaches_the_prompt_with_a_bidi_override(hostile, terminals, tmp_path):
    """Every line the client prints sanitizes room names, but the prompt's list of rooms with
    unread lines (``#lobby [#room:1]>``; the bottom bar does the same) puts them on the terminal
    as the server sent them. prompt_toolkit shows C0/C1 controls as ``^[``, not U+202E: a room
    named by a hostile server reverses the rest of the prompt row, so what the user types is
    shown in reverse."""
    go = threading.Event()
    spoofed = f"#ops{RIGHT_TO_LEFT_OVERRIDE}gnp.exe"

    def script(link: Link) -> None:
        link.handshake()
        link.welcome(rooms=("#lobby", spoofed))
        go.wait(START)
        link.send(link.line("in the other room", room=spoofed))
        link.serve()

    server = hostile(script)
    alice = logged_in_terminal(terminals, server.port, pinned(tmp_path, server.port, server.fingerprint))
    before = len(alice.output)
    go.set()
    alice.wait_for_text("in the other room", TIMEOUT)
    alice.settle()
    assert "#ops\ufffdgnp.exe bob: in the other room" in alice.text  # the line itself is made safe
    drawn = bytes(alice.output[before:])
    assert RIGHT_TO_LEFT_OVERRIDE.encode() not in drawn, f"U+202E reached the terminal: {drawn!r}"


# --------------------------------------------------------------------------- 2. a server that drips


def test_a_server_dripping_its_hello_cannot_hold_the_handshake_past_its_deadline(hostile, tmp_path):
    """``ChatClient(timeout=...)`` promises how long connect and login may take (60 s in the program),
    and the server enforces its own handshake deadline on every read. The client does not:
    ``_read`` sets the socket timeout once and ``read_frame`` gets no deadline, so a server that
    sends its server_hello a byte every 0.3 s keeps ``connect()`` waiting for minutes (a script
    in batch mode hangs at start with nothing said)."""
    stop = threading.Event()

    def script(link: Link) -> None:
        handshake = ServerHandshake(link.server.key, link.server.key_der, lambda digest: (digest, b"\0" * 256))
        reply = handshake.receive_hello(*read_frame(link.sock))
        for byte in reply:
            if stop.wait(0.3):
                return
            link.sock.sendall(bytes((byte,)))

    server = hostile(script)
    client = ChatClient(
        "127.0.0.1",
        server.port,
        server_fingerprint=server.fingerprint,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        timeout=1.5,
    )
    outcome: list[object] = []

    def connect() -> None:
        try:
            client.connect()
            outcome.append("connected")
        except ChatError as exc:
            outcome.append(exc)

    connecting = threading.Thread(target=connect, name="test-connect", daemon=True)
    started = time.monotonic()
    connecting.start()
    connecting.join(4.0)
    still_waiting = connecting.is_alive()
    stop.set()
    client.close()
    connecting.join(TIMEOUT)
    assert not still_waiting, f"connect() with a 1.5 s deadline still waiting after {time.monotonic() - started:.1f} s"
    assert outcome and isinstance(outcome[0], ChatError), outcome


# --------------------------------------------------------------------------- 3. secrets and pins on disk

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user owns needs root")
def test_a_known_hosts_file_another_user_owns_is_not_trusted(hostile, batch, tmp_path):
    """``KnownHosts`` refuses a pin file that group or others may write, "they could pin their own
    key for a server", but never asks who owns it: a file that another account owns (mode 0644,
    so it passes) is one that account may rewrite at will. Planted at the known-hosts path (or
    there as a symlink) it pins that account's server, and the client sends it the password."""
    logins: list[str] = []

    def script(link: Link) -> None:
        request = link.handshake()
        if isinstance(request, Login):
            logins.append(request.password)
        link.welcome()
        link.serve()

    server = hostile(script)
    planted = pinned(tmp_path, server.port, server.fingerprint)
    os.chown(planted, NOBODY, NOBODY)
    planted.chmod(0o644)
    client = batch(server.port, planted, password="alice-secret")
    status = client.finish(START)
    assert logins == [], "the password went to the server pinned by a file another user owns"
    assert status == 1 and str(planted).encode() in client.err, (status, client.err)


# --------------------------------------------------------------------------- 4. refusals nobody signed


@pytest.mark.parametrize("code", ["account_deleted", "token_revoked"])
def test_a_refusal_in_clear_does_not_end_a_resumed_session(hostile, batch, tmp_path, code):
    """Once the server has opened a login or a resume it has the session key, and the real server
    then refuses only in a sealed ``ERROR`` (``ClientConnection._refuse``); PROTOCOL.md says a
    cleartext ``error`` "could be injected by anyone on the path". Yet ``accept_welcome`` believes
    a cleartext ``error`` in answer to a RESUME: anyone on the path, with no key at all, ends the
    session for good (``account_deleted``, ``banned``) or has the client drop its token and ask for
    the password (``token_*``). It should count as a lost link, and try again."""

    def script(link: Link) -> None:
        link.handshake()
        if link.number == 0:  # the first login; then the link dies without a word
            link.welcome()
            link.send(link.line("first"))
            time.sleep(0.5)
            link.sock.shutdown(socket.SHUT_RDWR)
        elif link.number == 1:  # a resume, answered by someone on the path
            link.sock.sendall(ControlError(code=code, message="forged in clear").encode())
        else:  # the next resume reaches the server
            link.welcome()
            link.send(link.line("back again"))
            link.serve()

    server = hostile(script)
    client = batch(server.port, pinned(tmp_path, server.port, server.fingerprint))
    assert client.wait_for(b"first", START), client.err
    resumed = client.wait_for(b"back again", TIMEOUT * 2)
    client.finish(TIMEOUT)
    assert resumed, f"gave the session up on a refusal in clear; stderr: {client.err.decode(errors='replace')}"


# --------------------------------------------------------------------------- 5. a terminal that cannot be left


def test_ctrl_c_leaves_while_a_line_waits_for_flood_pacing(hostile, terminals, tmp_path):
    """The client paces its lines below the flood limit the welcome announces, waiting on the main
    thread; meanwhile no prompt runs and the terminal stays in raw mode (ISIG off), so Ctrl-C is no
    signal and nothing reads keys. With a strict limit (``--flood-rate 0.01`` is a valid server
    option; a hostile server says 1e-300) it froze until killed. A line that would wait longer than
    a moment is refused instead, saying when to try again, and Ctrl-C works at once."""

    def script(link: Link) -> None:
        link.handshake()
        link.welcome(flood_burst=2, flood_rate=0.01)
        link.serve()

    server = hostile(script)
    alice = logged_in_terminal(terminals, server.port, pinned(tmp_path, server.port, server.fingerprint))
    alice.type("one\r")
    alice.wait_for_text("alice: one", TIMEOUT)
    alice.type("two\r")  # over the pace: it would wait about 110 s
    alice.wait_for_text("not sent: faster than the server allows; try again in", TIMEOUT)
    assert "(your line: two)" in alice.text
    alice.type("\x03")
    alice.wait_until(lambda t: not t.child.isalive(), TIMEOUT, "the client to leave on Ctrl-C")


# --------------------------------------------------------------------------- 6. the line being typed


def test_a_half_typed_line_survives_a_session_that_needs_the_password_again(hostile, terminals, tmp_path):
    """While the link is down the prompt keeps what is being typed, and a room switch keeps it too;
    but when the resume is refused (the token expired while offline) the event thread ends the
    prompt to ask for the password (``stop_prompt``: ``app.exit(exception=EOFError())``). The
    half-typed line was thrown away; the prompt after the login starts with it."""
    dropped = threading.Event()

    def script(link: Link) -> None:
        link.handshake()
        if link.number == 0:
            link.welcome_then_drop(dropped)
        elif link.number == 1:  # the resume: its token has expired meanwhile (a sealed refusal, as the server sends)
            assert link.channel is not None
            link.channel.username = ""  # a refusal is sealed before the session is named
            link.send(ErrorReply(code="token_expired", message="token expired", fatal=True))
        else:
            link.welcome()
            link.serve()

    server = hostile(script)
    alice = logged_in_terminal(terminals, server.port, pinned(tmp_path, server.port, server.fingerprint))
    alice.type("a long thought, half typed")
    alice.wait_for_text("#lobby> a long thought, half typed", TIMEOUT)
    asked_before = alice.output.count(b"Password for alice:")
    dropped.set()
    alice.wait_until(
        lambda t: t.output.count(b"Password for alice:") > asked_before, TIMEOUT * 2, "the password prompt"
    )
    alice.settle()
    alice.type("any-password\r")
    alice.wait_for_text("logged in again as alice", TIMEOUT)
    alice.settle()
    assert "#lobby> a long thought, half typed" in alice.cursor_row, alice.text  # back, to go on typing


# --------------------------------------------------------------------------- 7. the key of a resumed session


def test_a_reconnection_does_not_ask_about_the_key_from_behind_the_chat_prompt(hostile, terminals, tmp_path):
    """A reconnection checks the server's key against the known-hosts file as it is *now*, not
    against the key this session already proved. With the pin gone meanwhile (the user removed
    the line another client's "HAS CHANGED" warning named), the event thread calls the first-use
    question (``ask_yes_no``: ``print`` and ``input()``) while the chat prompt owns the terminal:
    the question lands on the prompt row, the "yes" typed goes to the chat prompt as a line
    ("not sent: offline"), and the reconnection waits on ``input()`` for ever. The same key as
    the session's should simply resume (and a different one be refused as changed)."""
    dropped = threading.Event()

    def script(link: Link) -> None:
        link.handshake()
        if link.number == 0:
            link.welcome_then_drop(dropped)
        else:  # the same server, the same key
            link.welcome()
            link.send(link.line("welcome back"))
            link.serve()

    server = hostile(script)
    known_hosts = pinned(tmp_path, server.port, server.fingerprint)
    alice = logged_in_terminal(terminals, server.port, known_hosts)
    known_hosts.write_text("")
    dropped.set()
    alice.wait_until(
        lambda t: "welcome back" in t.text or b"Are you sure" in t.output, TIMEOUT * 2, "a resume or a question"
    )
    alice.settle()
    asked = b"Are you sure" in alice.output
    if asked:
        alice.type("yes\r")  # what the user would answer
        alice.settle(1.0)
    assert not asked, f"asked about the key from behind the chat prompt:\n{alice.text}"
    assert "welcome back" in alice.text


def test_a_reconnection_to_another_key_is_refused_whatever_the_file_says(hostile, batch, tmp_path):
    """The other half: with the pin gone and ``--accept-new-host-key``, a node answering a resume
    with another key would have been trusted as new, mid-session. It is refused as a changed key."""
    dropped = threading.Event()
    impostor_logins: list[object] = []

    def script(link: Link) -> None:
        if link.number == 0:
            link.handshake()
            link.welcome_then_drop(dropped, link.line("first"))
        else:  # the key changed meanwhile
            impostor_logins.append(link.handshake())

    server = hostile(script)
    known_hosts = pinned(tmp_path, server.port, server.fingerprint)
    client = batch(server.port, known_hosts, "--accept-new-host-key")
    assert client.wait_for(b"first", START), client.err
    known_hosts.write_text("")
    other = crypto_utils.generate_private_key()
    server.key, server.key_der = other, crypto_utils.public_key_bytes(other.public_key())
    dropped.set()
    refused = client.wait_for(b"CHANGED DURING THIS SESSION", TIMEOUT * 2, stream="err")
    status = client.finish(TIMEOUT * 2)
    assert refused, client.err
    assert status == 1, client.err
    assert impostor_logins == [], "the resume went to a server with another key"
