"""What an eavesdropper, a disk thief and a log reader get: no passwords, tokens or messages.

A recording TCP proxy sits between real clients and a real server and keeps
every byte in both directions; the tests then search those bytes (and the
server's files and log) for every secret the session used.
"""

import base64
import logging
import socket
import stat
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, TIMEOUT, joined, password_of, wait_for

from securechat.client import Chat, ChatClient, Disconnected, KnownHosts, Notice
from securechat.protocol import encode_control

# --------------------------------------------------------------------------- the recording proxy


class RecordingProxy:
    """Forwards TCP connections to ``target``, keeping a copy of every byte each way.

    A thread accepts; each connection gets one thread per direction. ``close()``
    stops accepting, shuts every socket down and joins every thread.
    """

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        # Guards the two recordings and the lists of sockets and threads.
        self.lock = threading.Lock()
        self.to_server = []
        self.to_client = []
        self.sockets = []
        self.client_sockets = []
        self.pumps = []
        self.acceptor = threading.Thread(target=self._accept, name="test-proxy-accept", daemon=True)
        self.acceptor.start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=TIMEOUT)
            upstream.settimeout(None)
            pumps = [
                threading.Thread(target=self._pump, args=(client, upstream, self.to_server), daemon=True),
                threading.Thread(target=self._pump, args=(upstream, client, self.to_client), daemon=True),
            ]
            with self.lock:
                self.sockets += [client, upstream]
                self.client_sockets.append(client)
                self.pumps += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, source, destination, recording):
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            with self.lock:
                recording.append(data)
            try:
                destination.sendall(data)
            except OSError:
                break
        for sock, how in ((destination, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass

    def inject_to_clients(self, data):
        """Send ``data`` to every client as if the server had: what anyone on the path can do."""
        with self.lock:
            for client in self.client_sockets:
                client.sendall(data)

    def recorded(self):
        """(client to server, server to client), each as one byte string."""
        with self.lock:
            return b"".join(self.to_server), b"".join(self.to_client)

    def close(self):
        # shutdown() is what wakes a thread blocked in accept() on Linux.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.acceptor.join(timeout=TIMEOUT)
        with self.lock:
            sockets, pumps = list(self.sockets), list(self.pumps)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for pump in pumps:
            pump.join(timeout=TIMEOUT)
        for sock in sockets:
            sock.close()


@pytest.fixture
def proxy(server):
    relay = RecordingProxy(server.address)
    yield relay
    relay.close()


@pytest.fixture
def via_proxy(proxy, server, tmp_path):
    """Factory: a client of ``server`` logged in through the recording proxy."""
    clients = []

    def log_in(name, password=None):
        client = ChatClient(
            *proxy.address,
            server_fingerprint=server.fingerprint,
            known_hosts=KnownHosts(tmp_path / "known_hosts"),
            timeout=TIMEOUT * 2,
        )
        clients.append(client)
        client.login(name, password if password is not None else password_of(name))
        return client

    yield log_in
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- searching for secrets


def encodings_of(secret):
    """The secret as UTF-8, and the parts of its base64 forms that depend only on it, at each alignment."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    forms = {raw}
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw)
            core = encoded[4 if offset else 0 : -4]  # drop groups mixed with padding or filler
            if len(core) >= 8:
                forms.add(core)
    return forms


def leaks(haystack, secrets):
    """The secrets found in ``haystack`` in clear or in base64, by name."""
    return sorted({name for name, secret in secrets.items() for form in encodings_of(secret) if form in haystack})


def test_the_leak_search_finds_what_it_looks_for():
    secret = "correct horse battery staple"
    for prefix in (b"", b"x", b"xy"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            assert leaks(b"..." + encode(prefix + secret.encode()) + b"...", {"s": secret}) == ["s"]
    assert leaks(b"... correct horse battery staple ...", {"s": secret}) == ["s"]
    assert leaks(b"nothing to see here", {"s": secret}) == []


LONG_TEXT = ("Call me Ishmael. Some years ago, never mind how long precisely, " * 160)[:10_000]
MESSAGES = {
    "public": "the eagle lands at midnight behind the old mill",
    "private": "my locker combination is 31-07-1968",
    "non-ascii": "Grüße aus Köln — 秘密の会議は明日 🤫🔑",
    "action": "hides the spare key under the blue flowerpot",
    "parting": "off to the dentist on Elm Street",
}


def long_text_slices():
    """Slices of the long message: a partial leak of it would show up in one of them."""
    return {f"long[{start}]": LONG_TEXT[start : start + 24] for start in range(0, len(LONG_TEXT), 500)}


def run_a_session(via_proxy):
    """Three people chat through the proxy; returns every secret the session used."""
    alice = via_proxy("alice")
    bob = via_proxy("bob")
    wait_for(alice, joined("bob"))
    carol = via_proxy("carol")
    for listener in (alice, bob):
        wait_for(listener, joined("carol"))
    tokens = {"alice token": alice.token, "bob token": bob.token, "carol token": carol.token}

    alice.say(MESSAGES["public"])
    bob.private("carol", MESSAGES["private"])
    carol.say(LONG_TEXT)
    bob.say(MESSAGES["non-ascii"])
    alice.action(MESSAGES["action"])
    expected = {
        alice: [LONG_TEXT, MESSAGES["non-ascii"]],
        bob: [MESSAGES["public"], LONG_TEXT, MESSAGES["action"]],
        carol: [MESSAGES["public"], MESSAGES["private"], MESSAGES["non-ascii"], MESSAGES["action"]],
    }
    for listener, texts in expected.items():
        # Each also hears its own lines back (the server's echoes): only the others' are counted here.
        heard = [wait_for(listener, lambda event: isinstance(event, Chat) and not event.ref).text for _ in texts]
        assert sorted(heard) == sorted(texts)

    # A reconnection resumes with the token over the wire.
    alice.close()
    alice.resume()
    tokens["alice resumed token"] = alice.token
    wait_for(bob, joined("alice"))
    carol.leave(MESSAGES["parting"])
    alice.leave()
    bob.leave()
    for name, token in list(tokens.items()):
        _header, payload, signature = token.split(".")
        tokens[f"{name} payload"] = payload
        tokens[f"{name} signature"] = signature
    secrets = {f"{name} password": password_of(name) for name in ("alice", "bob", "carol")}
    secrets.update(tokens)
    secrets.update(MESSAGES)
    secrets.update(long_text_slices())
    return secrets


# --------------------------------------------------------------------------- the tests


def test_the_wire_carries_no_password_token_or_message(via_proxy, proxy, server):
    secrets = run_a_session(via_proxy)
    to_server, to_client = proxy.recorded()
    # The recording is real: the cleartext handshake is in it.
    assert b'"type":"hello"' in to_server and b'"type":"server_hello"' in to_client
    assert len(to_server) > len(LONG_TEXT) and len(to_client) > 2 * len(LONG_TEXT)
    assert leaks(to_server, secrets) == []
    assert leaks(to_client, secrets) == []
    token_secret = (server.config.data_dir / "token_secret").read_bytes().strip()
    assert leaks(to_server + to_client, {"token secret": token_secret}) == []


def test_files_hold_no_password_and_are_private(server, users_file, tmp_path):
    new_password = "frank-has-a-new-pass-7"
    added = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "adduser", "frank", "--users", str(users_file)],
        input=new_password + "\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert added.returncode == 0, added.stderr
    assert new_password not in added.stdout + added.stderr

    data_dir = server.config.data_dir
    files = [users_file, *(path for path in data_dir.rglob("*") if path.is_file())]
    assert {path.name for path in files} >= {"users.json", "server_key.pem", "token_secret"}
    passwords = {name: password_of(name) for name in ("alice", "bob", "carol", "dave", "erin")}
    passwords["frank"] = new_password
    for path in files:
        content = path.read_bytes()
        assert leaks(content, passwords) == [], path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    lock_file = users_file.with_name(".users.json.lock")
    if lock_file.exists():
        assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".users.json.*.tmp")), "a temporary copy of the store was left behind"


def test_the_server_log_holds_no_password_token_or_message(via_proxy, caplog):
    caplog.set_level(logging.DEBUG, logger="chat.server")
    # Passwords typed in the wrong box are secrets too.
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do
        via_proxy("alice", password="alice-typed-this-wrong")
    with pytest.raises(Exception):  # noqa: B017
        via_proxy(password_of("bob"), password="bob")
    secrets = run_a_session(via_proxy)
    secrets["wrong password"] = "alice-typed-this-wrong"
    del secrets["parting"]  # see test_the_server_log_holds_no_parting_message
    logged = "\n".join(
        [caplog.text] + [f"{record.getMessage()} {record.exc_text or ''} {record.args!r}" for record in caplog.records]
    ).encode("utf-8")
    assert "login ok" in caplog.text and "disconnect" in caplog.text  # the log was captured
    assert leaks(logged, secrets) == []


def test_the_server_log_holds_no_parting_message(via_proxy, caplog):
    caplog.set_level(logging.DEBUG, logger="chat.server")
    alice = via_proxy("alice")
    bob = via_proxy("bob")
    wait_for(alice, joined("bob"))
    bob.leave(MESSAGES["parting"])
    wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "left")
    alice.leave()
    assert "disconnect" in caplog.text
    assert MESSAGES["parting"] not in caplog.text


@pytest.mark.parametrize("frame_type", ["error", "server_hello"])
def test_a_cleartext_frame_injected_after_login_is_not_believed(via_proxy, proxy, frame_type):
    alice = via_proxy("alice")
    proxy.inject_to_clients(encode_control(frame_type, code="auth_failed", message="\x1b]0;pwned\x07 log in again"))
    ended = wait_for(alice, lambda event: isinstance(event, Disconnected))
    assert "pwned" not in ended.reason and "\x1b" not in ended.reason
    assert "malformed" in ended.reason
    assert not ended.clean  # worth reconnecting: the link, not the session, is broken
