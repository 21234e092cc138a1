"""The server signs the hellos that wait together with one signature, and each client finds its own.

``HelloSigner`` is driven here with a signing function the test holds back, so
which hellos wait together is decided by the test, not by the scheduler; then
real clients connect all at once to a real server over loopback.
"""

import os
import threading
import time

import pytest
from conftest import TIMEOUT, USER_NAMES, password_of

import crypto_utils
from client import ChatClient, KnownHosts
from protocol import MAX_HELLO_BATCH, ProtocolError, hello_batch_digests, server_hello_signed_data
from server import HelloSigner

SERVER_KEY = crypto_utils.generate_private_key()


class HeldSigner:
    """Signs with a real key, but the first signature waits until ``release()``."""

    def __init__(self, fail_first=False):
        self.calls: list[bytes] = []
        self.fail_first = fail_first
        self.started = threading.Event()
        self._release = threading.Event()

    def __call__(self, data):
        self.calls.append(data)
        if len(self.calls) == 1:
            self.started.set()
            assert self._release.wait(TIMEOUT)
            if self.fail_first:
                raise OSError("the signing device went away")
        return crypto_utils.sign(SERVER_KEY, data)

    def release(self):
        self._release.set()


def wait_until(condition):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def sign_in_threads(signer, digests):
    """Call ``signer.sign`` for each digest, each from its own thread; returns {digest: result or exception}."""
    results = {}

    def run(digest):
        try:
            results[digest] = signer.sign(digest)
        except Exception as exc:  # kept for the test to look at
            results[digest] = exc

    threads = [threading.Thread(target=run, args=(digest,)) for digest in digests]
    for thread in threads:
        thread.start()
    return threads, results


def check_proves(digest, batch, signature):
    assert digest in hello_batch_digests(batch)
    crypto_utils.verify_signature(SERVER_KEY.public_key(), signature, server_hello_signed_data(batch))


def test_a_hello_alone_is_signed_alone_at_once():
    signer = HelloSigner(lambda data: crypto_utils.sign(SERVER_KEY, data))
    digest = os.urandom(32)
    batch, signature = signer.sign(digest)
    assert batch == digest
    check_proves(digest, batch, signature)


def test_hellos_that_wait_together_share_one_signature_and_each_finds_its_own():
    held = HeldSigner()
    signer = HelloSigner(held)
    first = os.urandom(32)
    first_thread, results = sign_in_threads(signer, [first])
    assert held.started.wait(TIMEOUT)  # the first is being signed: the next ones must wait
    waiting = [os.urandom(32) for _ in range(MAX_HELLO_BATCH + 5)]
    threads, more_results = sign_in_threads(signer, waiting)
    wait_until(lambda: len(signer._waiting) == len(waiting))
    held.release()
    for thread in [*first_thread, *threads]:
        thread.join(TIMEOUT)
    results |= more_results

    # One signature for the first, then the waiting ones in batches as large as allowed.
    assert len(held.calls) == 3
    assert results[first][0] == first
    batches = {results[digest][0] for digest in waiting}
    assert sorted(len(hello_batch_digests(batch)) for batch in batches) == [5, MAX_HELLO_BATCH]
    for digest in [first, *waiting]:
        check_proves(digest, *results[digest])


def test_a_failed_signature_fails_its_batch_only_and_the_next_hellos_are_signed():
    held = HeldSigner(fail_first=True)
    signer = HelloSigner(held)
    first = os.urandom(32)
    first_thread, results = sign_in_threads(signer, [first])
    assert held.started.wait(TIMEOUT)
    waiting = [os.urandom(32) for _ in range(3)]
    threads, more_results = sign_in_threads(signer, waiting)
    wait_until(lambda: len(signer._waiting) == len(waiting))
    held.release()
    for thread in [*first_thread, *threads]:
        thread.join(TIMEOUT)
    results |= more_results

    assert isinstance(results[first], OSError)  # the hello whose turn it was sees why
    for digest in waiting:  # signed in the next batch, by the turn handed on
        check_proves(digest, *results[digest])
    later = os.urandom(32)
    check_proves(later, *signer.sign(later))


def test_clients_connecting_all_at_once_each_verify_the_server(make_server, tmp_path):
    server = make_server()
    names = USER_NAMES
    clients = [
        ChatClient(
            *server.address,
            server_fingerprint=server.fingerprint,
            known_hosts=KnownHosts(tmp_path / "known_hosts"),
            timeout=TIMEOUT * 2,
        )
        for _ in names
    ]
    start = threading.Barrier(len(names))
    failures = []

    def log_in(client, name):
        try:
            start.wait(TIMEOUT)
            client.login(name, password_of(name))
        except Exception as exc:
            failures.append(f"{name}: {exc}")

    threads = [threading.Thread(target=log_in, args=pair) for pair in zip(clients, names, strict=True)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 2)
        assert failures == []
        assert all(client.connected for client in clients)
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("size", [0, 31, 33, 32 * (MAX_HELLO_BATCH + 1)])
def test_a_batch_of_the_wrong_size_is_malformed(size):
    with pytest.raises(ProtocolError):
        hello_batch_digests(b"\0" * size)
