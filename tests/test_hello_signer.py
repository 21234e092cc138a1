"""The server signs the hellos that wait together with one signature, and each client finds its own.

``HelloSigner`` is driven here with a signing function the test holds back, so
which hellos wait together is decided by the test, not by the scheduler: first
on its own, then inside a real server whose hand-driven peers (``RawPeer``) must
each find their hello proved.
"""

import logging
import os
import threading

import pytest
from conftest import TIMEOUT, USER_NAMES, password_of, wait_until
from test_hostile import RawPeer, control_errors, hello_for

from securechat import crypto_utils
from securechat.client import ChatClient, KnownHosts
from securechat.hello_signer import HelloSigner, HelloSigningError
from securechat.protocol import MAX_HELLO_BATCH, ProtocolError, hello_batch_digests, server_hello_signed_data

TEST_KEY = crypto_utils.generate_private_key()


class HeldSigner:
    """Signs with ``key``; call 1 waits until ``release()``, and call ``fail_call`` raises."""

    def __init__(self, key=TEST_KEY, fail_call=0, hold=True):
        self.key = key
        self.fail_call = fail_call
        self.calls: list[bytes] = []
        self.started = threading.Event()
        self._release = threading.Event()
        if not hold:
            self._release.set()

    def __call__(self, data):
        self.calls.append(data)
        if len(self.calls) == 1:
            self.started.set()
            assert self._release.wait(TIMEOUT)
        if len(self.calls) == self.fail_call:
            raise OSError("the signing device went away")
        return crypto_utils.sign(self.key, data)

    def release(self):
        self._release.set()


def in_threads(function, items, results=None):
    """Run ``function(item)`` for each item, each in a daemon thread.

    Returns the threads and a dict (``results`` if given) that gets {item: result or exception}.
    """
    results = {} if results is None else results

    def run(item):
        try:
            results[item] = function(item)
        except Exception as exc:  # kept for the test to look at
            results[item] = exc

    threads = [threading.Thread(target=run, args=(item,), daemon=True) for item in items]
    for thread in threads:
        thread.start()
    return threads, results


def join_all(threads):
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a hello is still waiting for its signature"


def hold_then_queue(signer, held, waiting):
    """One hello takes the turn and is held signing; ``waiting`` then queue behind it, in order."""
    first = os.urandom(32)
    threads, results = in_threads(signer.sign, [first])
    assert held.started.wait(TIMEOUT)
    for digest in waiting:  # one at a time, so the queue's order is the list's
        threads += in_threads(signer.sign, [digest], results)[0]
        wait_until(lambda digest=digest: digest in [pending.digest for pending in signer._waiting])
    return first, threads, results


def check_proves(digest, batch, signature, key=TEST_KEY):
    assert digest in hello_batch_digests(batch)
    crypto_utils.verify_signature(key.public_key(), signature, server_hello_signed_data(batch))


def test_a_hello_alone_is_signed_alone_at_once():
    signer = HelloSigner(lambda data: crypto_utils.sign(TEST_KEY, data))
    digest = os.urandom(32)
    batch, signature = signer.sign(digest)
    assert batch == digest
    check_proves(digest, batch, signature)


def test_hellos_that_wait_together_share_a_signature_oldest_first():
    held = HeldSigner()
    signer = HelloSigner(held)
    waiting = [os.urandom(32) for _ in range(MAX_HELLO_BATCH + 5)]
    first, threads, results = hold_then_queue(signer, held, waiting)
    held.release()
    join_all(threads)

    # One signature for the first, then the waiting ones, oldest first, in batches as large as allowed.
    assert len(held.calls) == 3
    assert results[first][0] == first
    assert hello_batch_digests(results[waiting[0]][0]) == waiting[:MAX_HELLO_BATCH]
    assert hello_batch_digests(results[waiting[-1]][0]) == waiting[MAX_HELLO_BATCH:]
    for digest in [first, *waiting]:
        check_proves(digest, *results[digest])


@pytest.mark.parametrize("fail_call", [1, 2], ids=["a batch of one", "a batch of several"])
def test_a_failed_signature_fails_its_batch_only_and_the_turn_passes_on(fail_call):
    held = HeldSigner(fail_call=fail_call)
    signer = HelloSigner(held)
    waiting = [os.urandom(32) for _ in range(3)]
    first, threads, results = hold_then_queue(signer, held, waiting)
    held.release()
    join_all(threads)

    failed, signed = ([first], waiting) if fail_call == 1 else (waiting, [first])
    for digest in failed:
        assert isinstance(results[digest], HelloSigningError)
        assert isinstance(results[digest].__cause__, OSError)  # why, for the log
    for digest in signed:
        check_proves(digest, *results[digest])
    later = os.urandom(32)
    check_proves(later, *signer.sign(later))


def test_a_server_answers_hellos_that_wait_together_with_one_signature(make_server, connect):
    server = make_server()
    held = HeldSigner(key=server.private_key)
    server.hello_signer = HelloSigner(held)
    peers = [RawPeer(server, private_key=crypto_utils.generate_private_key()) for _ in range(4)]
    try:
        threads, replies = in_threads(lambda peer: peer.hello(), peers[:1])
        assert held.started.wait(TIMEOUT)
        threads += in_threads(lambda peer: peer.hello(), peers[1:], replies)[0]
        wait_until(lambda: len(server.hello_signer._waiting) == 3)
        held.release()
        join_all(threads)
        assert all(isinstance(reply, dict) for reply in replies.values())
        assert len(held.calls) == 2
        assert [len(hello_batch_digests(peer.batch)) for peer in peers] == [1, 3, 3, 3]
        assert all(peer.server_proved_its_key() for peer in peers)
        # And a login on such a hello goes through.
        peers[2].sock.sendall(peers[2].login_frame("carol", password_of("carol")))
        assert peers[2].finish_login("carol").username == "carol"
    finally:
        for peer in peers:
            peer.close()


def test_a_hello_the_server_cannot_sign_gets_one_clear_error_and_the_next_logs_in(make_server, connect, caplog):
    server = make_server()
    server.hello_signer = HelloSigner(HeldSigner(key=server.private_key, fail_call=1, hold=False))
    caplog.set_level(logging.INFO, logger="chat.server")
    unlucky = RawPeer(server, private_key=crypto_utils.generate_private_key())
    try:
        unlucky.sock.sendall(hello_for(crypto_utils.public_key_bytes(unlucky.private_key.public_key())))
        (error,) = control_errors(unlucky.frames_until_closed())
        assert error["code"] == "server_error" and "try again" in error["message"]
    finally:
        unlucky.close()
    alice = connect("alice")
    assert alice.connected
    failures = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(failures) == 1 and "could not sign a batch of 1 hello" in failures[0].getMessage()


def test_clients_connecting_all_at_once_each_verify_the_server(make_server, tmp_path):
    server = make_server()
    clients = {
        name: ChatClient(
            *server.address,
            server_fingerprint=server.fingerprint,
            known_hosts=KnownHosts(tmp_path / "known_hosts"),
            timeout=TIMEOUT * 2,
        )
        for name in USER_NAMES
    }
    start = threading.Barrier(len(clients))

    def log_in(name):
        start.wait(TIMEOUT)
        return clients[name].login(name, password_of(name))

    try:
        threads, welcomes = in_threads(log_in, list(clients))
        join_all(threads)
        assert {name: getattr(welcome, "username", welcome) for name, welcome in welcomes.items()} == {
            name: name for name in clients
        }
    finally:
        for client in clients.values():
            client.close()


@pytest.mark.parametrize("size", [0, 31, 33, 32 * (MAX_HELLO_BATCH + 1)])
def test_a_batch_of_the_wrong_size_is_malformed(size):
    with pytest.raises(ProtocolError):
        hello_batch_digests(b"\0" * size)
