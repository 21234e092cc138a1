"""The login storm's load generator: one thread logs many real clients in and reads for them.

``benchmarks/loadclient.LoginDriver`` runs the client's own handshake steps over
non-blocking sockets. Against a real server it must log in the clients whose
password is right, refuse the others by reason (a wrong password, a server key
that is not the pinned one), and then count what reaches the logged-in ones.
"""

import sys
import time

from conftest import ROOT, TIMEOUT, password_of

sys.path.insert(0, str(ROOT / "benchmarks"))

from loadclient import LoginDriver, SamplingChatClient

import crypto_utils


def wait_until(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_driver_logs_in_refuses_by_reason_and_counts_deliveries(server, connect):
    key = crypto_utils.generate_private_key()
    impostor_fingerprint = crypto_utils.fingerprint(crypto_utils.generate_private_key().public_key())
    logins = [
        ("alice", password_of("alice")),
        ("bob", password_of("bob")),
        ("carol", "not-carols-password"),
        ("dave", password_of("dave")),
    ]
    fingerprints = [server.fingerprint, server.fingerprint, server.fingerprint, impostor_fingerprint]
    clients = [
        SamplingChatClient(*server.address, server_fingerprint=fingerprint, private_key=key, pace=False)
        for fingerprint in fingerprints
    ]
    driver = LoginDriver(clients, logins)
    try:
        started = driver.start()
        alice, bob, carol, dave = driver.wait(TIMEOUT * 4)
        assert (alice.error, bob.error) == ("", "")
        assert alice.finished > started and bob.finished > started
        assert carol.error.startswith("refused: ") and carol.finished == 0.0, carol
        assert "not the expected" in dave.error and dave.finished == 0.0, dave
        assert [client.connected for client in clients] == [True, True, False, False]
        assert [clients[0].username, clients[1].username] == ["alice", "bob"]

        # Once logged in, the driver reads for them: a join notice and a line reach both.
        erin = connect("erin")
        erin.say("hello, driven clients")
        for client in clients[:2]:
            wait_until(lambda client=client: client.chat_frames == 1 and client.notice_frames >= 1)
        assert [clients[2].chat_frames, clients[3].chat_frames] == [0, 0]
        assert not any(client.failure for client in clients[:2])
    finally:
        driver.stop()
        for client in clients:
            client.close()
    assert not any(client.connected for client in clients)
