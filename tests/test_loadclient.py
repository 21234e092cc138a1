"""The benchmarks' load generator: one thread reads for many real clients (and may log them in too).

``benchmarks/loadclient.ReadLoop`` reads every client handed to it from one
thread: it must count what reaches them, check every frame's sequence number,
answer pings, end a connection on a frame out of order, an error, a goodbye or a
silence as the client's own reader thread would, and stop. ``LoginDriver`` runs
the client's own handshake steps over non-blocking sockets. Against a real
server it must log in the clients whose password is right, count the others
under the reason ``ChatClient.login()`` would have raised (a wrong password, a
server key that is not the pinned one, no server at all, a server that never
answers) and close their connections, then count what reaches the logged-in ones.
"""

import socket
import sys
import threading
import time

import pytest
from conftest import ROOT, TIMEOUT, password_of, wait_until

sys.path.insert(0, str(ROOT / "benchmarks"))

import loadclient
from loadclient import LoginDriver, ReadLoop, SamplingChatClient, bench_text

from securechat import crypto_utils
from securechat.channel import SecureChannel, read_frame
from securechat.client import Disconnected, KnownHosts, frame_writer
from securechat.protocol import (
    CLIENT_KINDS,
    SERVER_KINDS,
    Chat,
    ErrorReply,
    FrameType,
    Goodbye,
    Notice,
    decode_control,
    encode_frame,
)


def closed_port() -> int:
    """A loopback port nothing listens on (just released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_driver_logs_in_refuses_by_reason_and_counts_deliveries(server, connect):
    key = crypto_utils.generate_private_key()
    impostor_fingerprint = crypto_utils.fingerprint(crypto_utils.generate_private_key().public_key())
    host, port = server.address
    nowhere = closed_port()
    logins = [
        ("alice", password_of("alice")),
        ("bob", password_of("bob")),
        ("carol", "not-carols-password"),
        ("dave", password_of("dave")),
        ("erin", password_of("erin")),
    ]
    targets = [
        (port, server.fingerprint),
        (port, server.fingerprint),
        (port, server.fingerprint),
        (port, impostor_fingerprint),
        (nowhere, server.fingerprint),
    ]
    clients = [
        SamplingChatClient(host, target, server_fingerprint=fingerprint, private_key=key, pace=False)
        for target, fingerprint in targets
    ]
    driver = LoginDriver(clients, logins)
    try:
        started = driver.start()
        alice, bob, carol, dave, erin = driver.wait(TIMEOUT * 4)
        assert (alice.error, bob.error) == ("", "")
        assert alice.finished > started and bob.finished > started
        assert (carol.error, carol.finished) == ("refused: auth_failed", 0.0)
        assert dave.error.startswith("error: server key ") and "not the expected" in dave.error, dave
        assert erin.error.startswith(f"error: cannot reach the server at {host}:{nowhere}: "), erin
        assert [client.connected for client in clients] == [True, True, False, False, False]
        # Read by the driver, not by threads of their own; the failed ones are closed.
        assert all(client._reader is None for client in clients)
        assert [client.sock is None for client in clients] == [False, False, True, True, True]
        assert [clients[0].username, clients[1].username] == ["alice", "bob"]

        # Once logged in, the driver reads for them: a join notice and a line reach both.
        echo = connect("echo")
        echo.say("hello, driven clients")
        for client in clients[:2]:
            wait_until(lambda client=client: client.chat_frames == 1 and client.notice_frames >= 1)
        assert not any(client.failure for client in clients[:2])
    finally:
        driver.stop()
        for client in clients:
            client.close()
    assert not any(client.connected for client in clients)


def test_a_login_with_no_answer_fails_when_the_wait_runs_out():
    with socket.socket() as silent:  # accepts connections (in its backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host, port = silent.getsockname()
        client = SamplingChatClient(host, port, server_fingerprint="SHA256:unused", pace=False)
        driver = LoginDriver([client], [("alice", "password")])
        try:
            driver.start()
            (outcome,) = driver.wait(0.5)
            assert (outcome.error, outcome.finished) == ("error: no answer within 0.5 s", 0.0)
            assert client.sock is None and not client.connected
        finally:
            driver.stop()
            client.close()


def test_kept_welcomes_are_opened_after_the_storm_and_a_bad_one_fails_its_login(server, connect):
    key = crypto_utils.generate_private_key()
    host, port = server.address
    logins = [("alice", password_of("alice")), ("bob", password_of("bob")), ("carol", "not-carols-password")]
    clients = [
        SamplingChatClient(host, port, server_fingerprint=server.fingerprint, private_key=key, pace=False)
        for _ in logins
    ]
    driver = LoginDriver(clients, logins, keep_welcomes=True)
    try:
        driver.start()
        alice, bob, carol = driver.wait(TIMEOUT * 4)
        assert (alice.error, bob.error, carol.error) == ("", "", "refused: auth_failed")
        # Taken unopened: no token yet, and the refusal was judged at once, as before.
        assert [client.token for client in clients[:2]] == ["", ""]
        assert all(client.kept_welcome for client in clients[:2]) and not clients[2].kept_welcome

        # Counting goes on meanwhile, in sequence after the kept welcome; the lobby's entry (the room
        # and its roster, in one batch) is kept to open later too.
        echo = connect("echo")
        echo.say("hello, driven clients")
        for client in clients[:2]:
            wait_until(lambda client=client: client.chat_frames == 1)
            assert client.kept_batches
        assert driver.open_kept_batches() >= 2
        assert not any(client.kept_batches for client in clients)

        tampered = bytearray(clients[1].kept_welcome)
        tampered[-40] ^= 1  # inside the ciphertext
        clients[1].kept_welcome = bytes(tampered)
        assert driver.open_kept_welcomes() == 2
        alice, bob, carol = driver.outcomes
        assert alice.error == "" and clients[0].token and clients[0].username == "alice"
        assert bob.error.startswith("error: bad reply from the server: "), bob
        assert not any(client.failure for client in clients[:2])
    finally:
        driver.stop()
        for client in clients:
            client.close()


# --------------------------------------------------------------------------- ReadLoop


def test_a_read_loop_reads_every_client_from_one_thread_and_answers_pings(make_server, tmp_path):
    server = make_server(ping_interval=0.2, ping_timeout=1.0)
    key = crypto_utils.generate_private_key()
    with ReadLoop() as read_loop:
        clients = [
            SamplingChatClient(
                *server.address,
                server_fingerprint=server.fingerprint,
                known_hosts=KnownHosts(tmp_path / "known_hosts"),
                private_key=key,
                pace=False,
                read_loop=read_loop,
            )
            for _ in range(3)
        ]
        try:
            for client, name in zip(clients, ("alice", "bob", "carol"), strict=True):
                client.login(name, password_of(name))
            assert all(client.connected and client._reader is None for client in clients)
            assert not [thread for thread in threading.enumerate() if thread.name == "chat-reader"]
            wait_until(lambda: [client.notice_frames for client in clients] == [2, 1, 0])

            # Silent for several ping intervals: only pongs from the loop keep them in.
            time.sleep(1.5)
            assert all(client.connected for client in clients)
            for client in clients:
                client.sample_probability = 1.0
            for number in range(5):
                clients[number % 3].send_text(bench_text(number, time.perf_counter()))
            # Each line reaches the two others, and its sender as an echo.
            wait_until(lambda: [client.chat_frames for client in clients] == [5, 5, 5])
            for client in clients:
                samples, failures = client.open_samples(client.take_raw_samples())
                assert (len(samples), failures) == (5, 0)
                assert all(0 < sample.latency < TIMEOUT for sample in samples)
            assert not any(client.failure for client in clients)
        finally:
            for client in clients:
                client.close()
        assert not any(client.connected for client in clients)
        # Each close ended its reading cleanly, once.
        for client in clients:
            events = []
            while (event := client.next_event(timeout=TIMEOUT)) is not None:
                events.append(event)
                if isinstance(event, Disconnected):
                    break
            assert [(event.reason, event.clean) for event in events if isinstance(event, Disconnected)] == [
                ("closed", True)
            ]
            assert client.failure == ""


class FakeServer:
    """The server's end of a socket pair, sealing what it sends for a client made to look logged in."""

    def __init__(self, client_key: crypto_utils.PrivateKey, server_key: crypto_utils.PrivateKey) -> None:
        self.sock, client_sock = socket.socketpair()
        self.client = SamplingChatClient(
            "127.0.0.1", 1, server_fingerprint="SHA256:unused", private_key=client_key, pace=False
        )
        session_key = b"k" * crypto_utils.SESSION_KEY_SIZE
        self.channel = SecureChannel(server_key, client_key.public_key(), is_server=True, allowed_incoming=CLIENT_KINDS)
        client_channel = SecureChannel(
            client_key, server_key.public_key(), is_server=False, allowed_incoming=SERVER_KINDS
        )
        for channel in (self.channel, client_channel):
            channel.username, channel.session_key = "alice", session_key
        self.client.username = "alice"
        self.client.sock, self.client.channel = client_sock, client_channel
        self.client._frames = frame_writer(client_sock)
        self.client._session_key = session_key
        self.client._server_key = server_key.public_key()

    def chat(self, number: int) -> bytes:
        return self.channel.seal(Chat(sender="bob", text=bench_text(number, time.perf_counter()), sent_at=1.0))

    def disconnected(self) -> Disconnected:
        while True:
            event = self.client.next_event(timeout=TIMEOUT)
            assert event is not None, "no Disconnected event"
            if isinstance(event, Disconnected):
                return event


@pytest.fixture
def fake_servers():
    client_key, server_key = crypto_utils.generate_private_key(), crypto_utils.generate_private_key()
    made: list[FakeServer] = []

    def make() -> FakeServer:
        made.append(FakeServer(client_key, server_key))
        return made[-1]

    yield make
    for fake in made:
        fake.client.close()
        fake.sock.close()


def test_the_read_loop_checks_frames_in_any_split_and_ends_a_connection_as_its_reader_would(fake_servers):
    in_order, out_of_order, refused, leaving = (fake_servers() for _ in range(4))
    with ReadLoop() as read_loop:
        for fake in (in_order, out_of_order, refused, leaving):
            read_loop.add(fake.client)
        in_order.client.sample_probability = 1.0

        # Three lines, a ping and a notice in one stream, sent a byte at a time and then all at once.
        stream = b"".join(
            (
                in_order.chat(0),
                encode_frame(FrameType.CONTROL, b'{"type": "ping"}'),
                in_order.chat(1),
                in_order.channel.seal(Notice("joined", "carol", room="#lobby")),
            )
        )
        for byte in stream:
            in_order.sock.sendall(bytes((byte,)))
        in_order.sock.sendall(in_order.chat(2))
        wait_until(lambda: (in_order.client.chat_frames, in_order.client.notice_frames) == (3, 1))
        in_order.sock.settimeout(TIMEOUT)
        assert decode_control(read_frame(in_order.sock)[1]) == {"type": "pong"}  # answered by the loop
        samples, failures = in_order.client.open_samples(in_order.client.take_raw_samples())
        assert (len(samples), failures) == (3, 0)

        # A frame out of order (a replay) ends its connection, and only that one.
        first = out_of_order.chat(0)
        out_of_order.sock.sendall(first + out_of_order.chat(1) + first)
        assert out_of_order.disconnected().clean is False
        assert out_of_order.client.failure == "bad frame from the server: sequence number 0, expected 2"
        assert out_of_order.client.chat_frames == 2 and not out_of_order.client.connected

        refused.sock.sendall(refused.channel.seal(ErrorReply("banned", "you are banned", fatal=True)))
        assert (refused.disconnected().reason, refused.client.failure) == (
            "you are banned",
            "server error banned: you are banned",
        )

        leaving.sock.sendall(leaving.channel.seal(Goodbye("server shutting down")))
        event = leaving.disconnected()
        assert (event.reason, event.clean, leaving.client.failure) == ("server shutting down", True, "")

        assert in_order.client.connected and in_order.client.failure == ""
        in_order.sock.close()  # the server goes away
        assert in_order.disconnected().reason == "connection lost (connection closed by peer)"


def test_the_read_loop_ends_a_silent_connection_and_stops_within_its_timeout(fake_servers, monkeypatch):
    monkeypatch.setattr(loadclient, "IDLE_CHECK_INTERVAL", 0.05)
    silent, closed = fake_servers(), fake_servers()
    read_loop = ReadLoop(idle_timeout=0.3)
    read_loop.start()
    read_loop.add(silent.client)
    read_loop.add(closed.client)
    closed.client.close()  # while the loop reads it: a clean end, no failure
    assert closed.disconnected().clean and closed.client.failure == ""
    event = silent.disconnected()
    assert (event.reason, event.clean) == ("connection lost (the server stopped answering)", False)
    assert silent.client.failure == event.reason
    started = time.perf_counter()
    read_loop.stop()
    assert time.perf_counter() - started < loadclient.READER_JOIN_TIMEOUT
    assert not read_loop._thread.is_alive()
