"""The login storm's load generator: one thread logs many real clients in and reads for them.

``benchmarks/loadclient.LoginDriver`` runs the client's own handshake steps over
non-blocking sockets. Against a real server it must log in the clients whose
password is right, count the others under the reason ``ChatClient.login()``
would have raised (a wrong password, a server key that is not the pinned one, no
server at all, a server that never answers) and close their connections, then
count what reaches the logged-in ones.
"""

import socket
import sys

from conftest import ROOT, TIMEOUT, password_of, wait_until

sys.path.insert(0, str(ROOT / "benchmarks"))

from loadclient import LoginDriver, SamplingChatClient

from securechat import crypto_utils


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
