"""Hostile peers beside honest ones: the server drops the attacker and the room keeps talking.

Every test keeps two honest people logged in, lets an attacker try something
over a real socket, checks that the attacker got nowhere, and then checks that
the honest two can still talk to each other.
"""

import base64
import functools
import itertools
import json
import os
import random
import socket
import threading
import time

import jwt
import pytest
from conftest import TIMEOUT, chat_with, drain, is_disconnected, joined, left, password_of, wait_for, wait_until
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from securechat import crypto_utils, protocol
from securechat.channel import SecureChannel, read_frame
from securechat.client import (
    Chat,
    ChatClient,
    ChatError,
    Disconnected,
    ErrorReply,
    HostKeyError,
    KnownHosts,
    LoginRefused,
    frame_writer,
)
from securechat.crypto_utils import CryptoError
from securechat.protocol import (
    HANDSHAKE_NONCE_SIZE,
    PROTOCOL_VERSION,
    SERVER_KINDS,
    Envelope,
    FrameDecoder,
    FrameType,
    Kind,
    Login,
    Resume,
    Say,
    Welcome,
    associated_data,
    b64decode,
    b64encode,
    client_auth_signed_data,
    decode_control,
    decode_message,
    encode_control,
    encode_frame,
    hello_batch_digests,
    server_hello_digest,
    server_hello_signed_data,
)

# --------------------------------------------------------------------------- helpers


@functools.cache
def spare_key(label):
    """An RSA key made once per test session for a hand-driven peer (``label`` names its owner)."""
    return crypto_utils.generate_private_key()


class RawPeer:
    """A client driven by hand: the test chooses every frame it sends, and it reads only when told."""

    def __init__(self, server, private_key=None, receive_buffer=None):
        self.private_key = private_key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Set before connecting, so the advertised window stays small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(server.address)
        self.channel = None
        self.nonce = b""
        self.signature = b""
        self.client_key_der = b""
        self.token = ""

    def hello(self, client_key_der=None):
        """Say hello with our key (or any key given); returns the server's reply."""
        if client_key_der is None:
            client_key_der = crypto_utils.public_key_bytes(self.private_key.public_key())
        self.client_key_der = client_key_der
        self.client_nonce = os.urandom(HANDSHAKE_NONCE_SIZE)
        self.sock.sendall(hello_for(client_key_der, self.client_nonce))
        frame_type, body = read_frame(self.sock)
        assert frame_type is FrameType.CONTROL
        reply = decode_control(body)
        assert reply["type"] == "server_hello", reply
        server_key = crypto_utils.load_public_key(b64decode(reply["server_key"], "server_key"))
        self.nonce = b64decode(reply["nonce"], "nonce")
        self.batch = b64decode(reply["batch"], "batch")
        self.signature = b64decode(reply["signature"], "signature")
        self.server_key = server_key
        self.channel = SecureChannel(self.private_key, server_key, is_server=False, allowed_incoming=SERVER_KINDS)
        return reply

    def server_proved_its_key(self):
        ours = server_hello_digest(self.nonce, self.client_nonce, self.client_key_der)
        if ours not in hello_batch_digests(self.batch):
            return False
        proof = server_hello_signed_data(self.batch)
        try:
            crypto_utils.verify_signature(self.server_key, self.signature, proof)
        except CryptoError:
            return False
        return True

    def auth_signature(self, kind, signing_key=None):
        """Proof of holding the hello key (or a signature by ``signing_key``, to test refusals)."""
        signed = client_auth_signed_data(kind, self.nonce, crypto_utils.public_key_bytes(self.server_key))
        return b64encode(crypto_utils.sign(signing_key or self.private_key, signed))

    def login_frame(self, username, password):
        """The sealed login an honest client would send on this connection."""
        session_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
        self.channel.session_key = session_key
        return self.channel.seal(
            Login(
                username=username,
                password=password,
                server_nonce=b64encode(self.nonce),
                client_key_fingerprint=crypto_utils.fingerprint(self.private_key.public_key()),
                session_key=b64encode(session_key),
                client_signature=self.auth_signature(Kind.LOGIN),
            )
        )

    def finish_login(self, username):
        """Read the server's answer to our login; returns the Welcome."""
        frame_type, body = read_frame(self.sock)
        assert frame_type is FrameType.SEALED
        self.channel.username = username
        welcome = self.channel.open(body)
        assert isinstance(welcome, Welcome)
        self.token = welcome.token
        return welcome

    def login(self, username, password):
        self.hello()
        self.sock.sendall(self.login_frame(username, password))
        return self.finish_login(username)

    def send_message(self, message):
        self.sock.sendall(self.channel.seal(message))

    def receive(self):
        """The next message: a dict for a control frame, a Message for a sealed one."""
        frame_type, body = read_frame(self.sock)
        if frame_type is FrameType.CONTROL:
            return decode_control(body)
        return self.channel.open(body)

    def receive_reply(self):
        """The next message that is not part of entering the rooms (room, roster, history, notices)."""
        while True:
            message = self.receive()
            entering = (
                protocol.Batch
                | protocol.Room
                | protocol.Roster
                | protocol.History
                | protocol.Notice
                | protocol.Joined
                | Chat
            )
            if not isinstance(message, entering):
                return message

    def frames_until_closed(self, timeout=TIMEOUT):
        """Every frame the server sends until it closes; fails if it keeps the connection open."""
        deadline = time.monotonic() + timeout
        received = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"the server kept the connection open for {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                continue
            if not chunk:
                break
            received += chunk
        return FrameDecoder().feed(bytes(received))

    def close(self):
        self.sock.close()


@pytest.fixture
def peers():
    """Factory for RawPeer; every peer is closed at teardown."""
    made = []

    def make(*args, **kwargs):
        peer = RawPeer(*args, **kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def is_error(event):
    return isinstance(event, ErrorReply)


_line_numbers = itertools.count()


def honest_pair(connect, server, first="alice", second="bob"):
    one = connect(first, to=server)
    two = connect(second, to=server)
    wait_for(one, joined(second))
    return one, two


def pair_and_raw_carol(connect, peers, server, label="attacker", **peer_options):
    """Alice and bob chatting, and carol logged in by hand (a RawPeer) once both have seen her join."""
    alice, bob = honest_pair(connect, server)
    carol = peers(server, private_key=spare_key(label), **peer_options)
    carol.login("carol", password_of("carol"))
    wait_for(alice, joined("carol"))
    wait_for(bob, joined("carol"))
    return alice, bob, carol


def assert_still_chatting(one, two):
    """Both honest people can still hear each other."""
    for speaker, listener in ((one, two), (two, one)):
        text = f"{speaker.username} is still here ({next(_line_numbers)})"
        speaker.say(text)
        assert wait_for(listener, chat_with(text)).sender == speaker.username


def control_errors(frames):
    return [decode_control(body) for frame_type, body in frames if frame_type is FrameType.CONTROL]


def assert_refused_in_clear(frames, code):
    """The connection ended with one cleartext error carrying ``code`` (nothing else was sent)."""
    errors = control_errors(frames)
    assert [error.get("code") for error in errors] == [code], frames
    assert all(error["type"] == "error" for error in errors)


def hello_for(client_key_der, nonce=None):
    """A well-formed hello carrying ``client_key_der``."""
    nonce = nonce if nonce is not None else os.urandom(HANDSHAKE_NONCE_SIZE)
    return encode_control(
        "hello", version=PROTOCOL_VERSION, client_key=b64encode(client_key_der), nonce=b64encode(nonce)
    )


def hello_frame(private_key):
    return hello_for(crypto_utils.public_key_bytes(private_key.public_key()))


# --------------------------------------------------------------------------- bad framing


def test_a_4_gib_length_prefix_before_login(make_server, connect, peers):
    server = make_server(handshake_timeout=1.0)
    alice, bob = honest_pair(connect, server)
    attacker = peers(server)
    attacker.sock.sendall(b"\xff\xff\xff\xff")
    assert_refused_in_clear(attacker.frames_until_closed(), "protocol_error")
    assert_still_chatting(alice, bob)


def test_a_4_gib_length_prefix_after_login(make_server, connect, peers):
    alice, bob, attacker = pair_and_raw_carol(connect, peers, make_server())
    attacker.sock.sendall(b"\xff\xff\xff\xff")
    refusal = attacker.receive_reply()
    assert isinstance(refusal, ErrorReply) and refusal.code == "protocol_error" and refusal.fatal
    attacker.frames_until_closed()
    assert "protocol error" in wait_for(alice, left("carol")).text
    wait_for(bob, left("carol"))
    assert_still_chatting(alice, bob)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_garbage_is_dropped(make_server, connect, peers, seed):
    server = make_server(handshake_timeout=1.0)
    alice, bob = honest_pair(connect, server)
    garbage = random.Random(seed).randbytes(4096)
    attacker = peers(server)
    attacker.sock.sendall(garbage)
    frames = attacker.frames_until_closed(timeout=TIMEOUT + 1.0)
    assert not [body for frame_type, body in frames if frame_type is FrameType.SEALED]
    assert_still_chatting(alice, bob)


def test_garbage_after_login_is_dropped(make_server, connect, peers):
    alice, bob, attacker = pair_and_raw_carol(connect, peers, make_server())
    # A well-framed sealed frame whose envelope is noise.
    attacker.sock.sendall(encode_frame(FrameType.SEALED, random.Random(7).randbytes(600)))
    refusal = attacker.receive_reply()
    assert isinstance(refusal, ErrorReply) and refusal.code == "protocol_error" and refusal.fatal
    attacker.frames_until_closed()
    wait_for(bob, left("carol"))
    assert_still_chatting(alice, bob)


def _hello_with_key(private_key):
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hello_for(der)


MALFORMED_OPENINGS = {
    "empty frame": lambda: b"\x00\x00\x00\x00",
    "unknown frame type": lambda: encode_frame(FrameType.CONTROL, b"{}")[:4] + b"\x09{}",
    "control frame not JSON": lambda: encode_frame(FrameType.CONTROL, b"\xff\xfe not json"),
    "control frame a JSON list": lambda: encode_frame(FrameType.CONTROL, b"[1, 2, 3]"),
    "sealed frame first": lambda: encode_frame(FrameType.SEALED, bytes(200)),
    "key not base64": lambda: encode_control("hello", version=PROTOCOL_VERSION, client_key="%%%"),
    "key not DER": lambda: encode_control("hello", version=PROTOCOL_VERSION, client_key=b64encode(b"junk")),
    "1024-bit RSA key": lambda: _hello_with_key(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    "RSA key with e=3": lambda: _hello_with_key(rsa.generate_private_key(public_exponent=3, key_size=2048)),
    "elliptic-curve key": lambda: _hello_with_key(ec.generate_private_key(ec.SECP256R1())),
}


@pytest.mark.parametrize("opening", list(MALFORMED_OPENINGS))
def test_a_malformed_opening_is_refused(make_server, connect, peers, opening):
    server = make_server(handshake_timeout=1.0)
    alice, bob = honest_pair(connect, server)
    attacker = peers(server)
    attacker.sock.sendall(MALFORMED_OPENINGS[opening]())
    assert_refused_in_clear(attacker.frames_until_closed(), "protocol_error")
    assert_still_chatting(alice, bob)


@pytest.mark.parametrize("version", [PROTOCOL_VERSION - 1, 99, "3\x1b[2J", None])
def test_a_client_of_another_protocol_version_is_told_so_plainly(make_server, connect, peers, version):
    server = make_server()
    alice, bob = honest_pair(connect, server)
    old_client = peers(server)
    old_client.sock.sendall(encode_control("hello", version=version, client_key="", nonce=""))
    frames = old_client.frames_until_closed()
    assert_refused_in_clear(frames, "version")
    (error,) = control_errors(frames)
    assert f"protocol version {PROTOCOL_VERSION}" in error["message"] and "\x1b" not in error["message"]
    assert_still_chatting(alice, bob)


# --------------------------------------------------------------------------- slow and silent peers


def test_half_a_hello_then_silence_is_dropped_at_the_deadline(make_server, connect, peers):
    server = make_server(handshake_timeout=0.5)
    alice, bob = honest_pair(connect, server)
    attacker = peers(server)
    hello = hello_frame(spare_key("attacker"))
    attacker.sock.sendall(hello[: len(hello) // 2])
    assert_refused_in_clear(attacker.frames_until_closed(), "timeout")
    assert_still_chatting(alice, bob)


def test_half_a_login_then_silence_is_dropped_at_the_deadline(make_server, connect, peers):
    server = make_server(handshake_timeout=0.5)
    alice, bob = honest_pair(connect, server)
    attacker = peers(server, private_key=spare_key("attacker"))
    attacker.hello()
    login = attacker.login_frame("carol", password_of("carol"))
    attacker.sock.sendall(login[: len(login) // 2])
    assert_refused_in_clear(attacker.frames_until_closed(), "timeout")
    assert not [event for event in drain(alice, quiet=0.1) if joined("carol")(event)]
    assert_still_chatting(alice, bob)


def test_a_hello_dripped_byte_by_byte_is_dropped_at_the_deadline(make_server, connect, peers):
    """The handshake deadline bounds the whole handshake, not each read of it (slowloris)."""
    handshake_timeout = 0.5
    server = make_server(handshake_timeout=handshake_timeout)
    alice, bob = honest_pair(connect, server)
    attacker = peers(server)
    hello = hello_frame(spare_key("attacker"))
    give_up = time.monotonic() + handshake_timeout + TIMEOUT / 2
    dropped = False
    attacker.sock.settimeout(0.1)  # also the pace of the drip
    for byte in hello:
        if time.monotonic() > give_up:
            break
        try:
            attacker.sock.sendall(bytes((byte,)))
            attacker.sock.recv(4096)  # returns only once the server speaks or hangs up
        except TimeoutError:
            continue
        except OSError:
            pass
        dropped = True
        break
    assert dropped, f"a hello dripped one byte per 0.1 s outlived a {handshake_timeout} s handshake deadline"
    assert_still_chatting(alice, bob)


def test_fifty_silent_connections_do_not_stop_the_room(make_server, connect, peers):
    server = make_server(handshake_timeout=1.0, max_connections_per_address=64, connect_burst=64)
    alice, bob = honest_pair(connect, server)
    silent = [peers(server) for _ in range(50)]
    assert_still_chatting(alice, bob)
    carol = connect("carol", to=server)  # logging in still works while they hang around
    wait_for(alice, joined("carol"))
    # Each is told it timed out, or was dropped (the oldest first) to make room for a newer
    # connection: an address's connections still logging in may hold half its places.
    outcomes = [
        tuple(error.get("code") for error in control_errors(peer.frames_until_closed(timeout=1.0 + TIMEOUT)))
        for peer in silent
    ]
    assert set(outcomes) <= {("timeout",), ()}
    assert outcomes.count(("timeout",)) <= 64 // 2 < len(outcomes)
    assert_still_chatting(alice, bob)
    assert_still_chatting(carol, alice)


def test_an_address_opening_connections_too_fast_is_refused_before_any_rsa_work(make_server, connect, peers):
    server = make_server(connect_burst=4, connect_rate=0.01)
    alice, bob = honest_pair(connect, server)  # two of the four
    for _ in range(2):
        peers(server)
    flooder = peers(server)
    assert_refused_in_clear(flooder.frames_until_closed(), "too_many_connections")
    assert_still_chatting(alice, bob)


def test_the_per_address_limit_makes_room_by_dropping_an_idle_connection(make_server, connect, peers):
    server = make_server(max_connections_per_address=3, handshake_timeout=5.0)
    alice, bob = honest_pair(connect, server)
    third = peers(server)  # it never says hello
    wait_until(lambda: len(server.connections) == 3)
    fourth = peers(server, private_key=spare_key("attacker"))
    # The address's users must not be locked out by its idle connections: the idle one goes.
    assert not control_errors(third.frames_until_closed())
    fourth.login("carol", password_of("carol"))
    assert_still_chatting(alice, bob)

    # With every place taken by someone logged in, the next connection is refused.
    fifth = peers(server, private_key=spare_key("attacker"))
    assert_refused_in_clear(fifth.frames_until_closed(), "too_many_connections")

    # The place is given back when a connection ends.
    bob.close()
    wait_until(lambda: len(server.connections) == 2)
    again = peers(server, private_key=spare_key("attacker"))
    assert again.hello()["type"] == "server_hello"


def test_a_client_that_never_reads_is_dropped_with_sendq_exceeded(make_server, connect, peers):
    server = make_server(send_queue_size=8, flood_rate=0)
    alice, bob, _never_reads = pair_and_raw_carol(connect, peers, server, "sluggard", receive_buffer=4096)

    # The kernel buffers a few MiB for the sluggard before the server's own queue fills up.
    # Alice speaks in step with bob hearing her, so bob's own (equally small) queue never fills.
    padding = "x" * 30_000
    sent, heard, notice = [], [], None
    while notice is None and len(sent) < 2000:
        text = f"line {len(sent)} {padding}"
        alice.say(text)
        sent.append(text)
        while len(heard) < len(sent):
            event = bob.next_event(timeout=TIMEOUT)
            assert event is not None, f"bob stopped hearing alice after {len(heard)} lines"
            assert not isinstance(event, Disconnected), event
            if isinstance(event, Chat):
                heard.append(event.text)
            elif left("carol")(event):
                notice = event
    assert notice is not None, f"carol was never dropped ({len(sent)} lines sent)"
    assert "SendQ exceeded" in notice.text
    assert "SendQ exceeded" in wait_for(alice, left("carol")).text
    assert heard == sent
    assert_still_chatting(alice, bob)


# --------------------------------------------------------------------------- replays and forgeries


class RecordingSocket:
    """Wraps a client's socket and keeps a copy of everything it sends."""

    def __init__(self, sock):
        self._sock = sock
        self.sent = []

    def sendall(self, data):
        self.sent.append(bytes(data))
        return self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_a_replayed_frame_is_refused(make_server, connect):
    server = make_server()
    dave, erin = honest_pair(connect, server, "dave", "erin")
    alice = connect("alice", to=server)
    carol = connect("carol", to=server)
    for listener in (dave, erin):
        wait_for(listener, joined("carol"))
    recorder = RecordingSocket(alice.sock)
    with alice.send_lock:  # what alice sends from now on goes through the recorder
        alice._frames = frame_writer(recorder)
    alice.say("say this only once")
    for listener in (dave, erin):
        wait_for(listener, chat_with("say this only once"))
    (frame,) = recorder.sent
    recorded = Envelope.decode(frame[5:])
    assert recorded.wrapped_key == b""  # a line after login is sealed under the session key, not RSA

    # Injected on another connection, at the very sequence number it expects next:
    # the session MAC gives it away.
    assert recorded.seq == carol.channel.send_seq
    with carol.send_lock:
        carol.sock.sendall(frame)
    refusal = wait_for(carol, is_error)
    assert refusal.code == "protocol_error" and refusal.fatal
    wait_for(carol, is_disconnected)
    wait_for(dave, left("carol"))

    # Replayed on its own connection: the sequence number gives it away.
    with alice.send_lock:
        alice.sock.sendall(frame)
    refusal = wait_for(alice, is_error)
    assert refusal.code == "replay" and refusal.fatal
    wait_for(alice, is_disconnected)
    wait_for(dave, left("alice"))
    for listener in (dave, erin):
        assert not [event for event in drain(listener, quiet=0.1) if chat_with("say this only once")(event)]
    assert_still_chatting(dave, erin)


def sealed_chat(peer, text):
    """Read ``peer``'s frames until the chat line ``text``; its envelope, opened by the peer as usual."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        frame_type, body = read_frame(peer.sock)
        if frame_type is not FrameType.SEALED:
            continue
        message = peer.channel.open(body)
        if isinstance(message, Chat) and message.text == text:
            return Envelope.decode(body)
    pytest.fail(f"{text!r} never reached the peer")


def unwrapped(private_key, wrapped):
    """The AES key inside a wrap. Wraps of one key differ (OAEP is randomized): keys are what to compare."""
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return private_key.decrypt(wrapped, oaep)


def test_a_message_key_serves_one_connection_only_and_every_frame_opens_alone(make_server, connect, peers):
    """The server wraps a recipient's message key for a few seconds of frames: never another
    recipient's key, nor another device's of the same account and RSA key, nor a reconnection's;
    and every frame still needs the recipient's private key."""
    server = make_server()
    alice = connect("alice", to=server)
    carol_key, dave_key = spare_key("carol"), spare_key("dave")
    carol = peers(server, private_key=carol_key)
    carol.login("carol", password_of("carol"))
    carol_phone = peers(server, private_key=carol_key)
    carol_phone.login("carol", password_of("carol"))
    dave = peers(server, private_key=dave_key)
    dave.login("dave", password_of("dave"))
    wait_for(alice, joined("dave"))
    lines = ["the first of three", "the second of three", "the third of three"]
    for line in lines:
        alice.say(line)
    to_carol = [sealed_chat(carol, line) for line in lines]
    # Three lines said at once share a key, but for one renewal at most (a key serves up to 5 s).
    assert len({envelope.wrapped_key for envelope in to_carol}) <= 2
    assert len({envelope.nonce for envelope in to_carol}) == 3
    keys = {
        "carol": unwrapped(carol_key, to_carol[0].wrapped_key),
        "carol's other device": unwrapped(carol_key, sealed_chat(carol_phone, lines[0]).wrapped_key),
        "dave": unwrapped(dave_key, sealed_chat(dave, lines[0]).wrapped_key),
    }
    for envelope in to_carol:
        aad = protocol.associated_data(envelope.kind, envelope.seq, "server", "carol")
        sealed = (envelope.wrapped_key, envelope.nonce, envelope.ciphertext, aad)
        assert protocol.decode_message(envelope.kind, crypto_utils.open_sealed(carol_key, *sealed)).text in lines
        with pytest.raises(CryptoError):
            crypto_utils.open_sealed(dave_key, *sealed)
    carol.close()
    again = peers(server, private_key=carol_key)
    again.login("carol", password_of("carol"))
    alice.say("after carol came back")
    keys["carol, reconnected"] = unwrapped(carol_key, sealed_chat(again, "after carol came back").wrapped_key)
    for (one, key), (other, other_key) in itertools.combinations(keys.items(), 2):
        assert key != other_key, f"{one} and {other} were sent frames under one AES key"


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _claims_of(token):
    return jwt.decode(token, options={"verify_signature": False})


def _signed_with_another_secret(alice, bob):
    return jwt.encode(_claims_of(alice.token), b"not the server's secret, but long", algorithm="HS256")


def _alg_none(alice, bob):
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64url(json.dumps(_claims_of(alice.token)).encode())}."


def _another_users_token(alice, bob):
    return bob.token


def _subject_changed(alice, bob):
    header, _, signature = alice.token.split(".")
    claims = {**_claims_of(alice.token), "sub": "bob"}
    return f"{header}.{_b64url(json.dumps(claims).encode())}.{signature}"


def _no_token(alice, bob):
    return ""


FORGERIES = {
    "signed with another secret": _signed_with_another_secret,
    "alg none": _alg_none,
    "another user's token": _another_users_token,
    "subject changed": _subject_changed,
    "no token": _no_token,
}


@pytest.mark.parametrize("honest_lines_first", [False, True], ids=["first-line", "after-honest-lines"])
@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_token_is_refused(make_server, connect, forgery, honest_lines_first):
    # After honest lines the server re-checks the token it verified last without decoding it
    # again: any other string, even on a connection whose honest token is known, is verified in full.
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    alice = connect("alice", to=server)
    wait_for(bob, joined("alice"))
    if honest_lines_first:
        alice.say("an honest line")
        wait_for(bob, chat_with("an honest line"))
    token = FORGERIES[forgery](alice, bob)
    with alice.send_lock:
        alice.sock.sendall(alice.channel.seal(Say(token=token, text="spoken with a forged token")))
    refusal = wait_for(alice, is_error)
    assert refusal.code.startswith("token_") and refusal.fatal
    wait_for(alice, is_disconnected)
    wait_for(bob, left("alice"))
    assert not [event for event in drain(dave, quiet=0.1) if chat_with("spoken with a forged token")(event)]
    assert_still_chatting(bob, dave)


def test_a_resume_with_a_forged_token_is_refused(make_server, connect, tmp_path):
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    alice = connect("alice", to=server)
    forged = _alg_none(alice, bob)
    alice.leave()
    wait_for(bob, left("alice"))
    intruder = ChatClient(
        *server.address,
        private_key=alice.private_key,
        server_fingerprint=server.fingerprint,
        known_hosts=KnownHosts(tmp_path / "intruder_hosts"),
        timeout=TIMEOUT,
    )
    intruder.username, intruder.token = "alice", forged
    try:
        with pytest.raises(LoginRefused) as refusal:
            intruder.resume()
    finally:
        intruder.close()
    assert refusal.value.code == "token_invalid"
    assert not [event for event in drain(bob, quiet=0.1) if joined("alice")(event)]
    assert_still_chatting(bob, dave)


def test_a_stolen_token_is_useless_without_its_key(make_server, connect, tmp_path):
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    alice = connect("alice", to=server)
    wait_for(bob, joined("alice"))
    thief = ChatClient(
        *server.address,
        server_fingerprint=server.fingerprint,
        known_hosts=KnownHosts(tmp_path / "thief_hosts"),
        timeout=TIMEOUT,
    )
    thief.username, thief.token = "alice", alice.token  # copied, but the thief has its own key
    try:
        with pytest.raises(LoginRefused) as refusal:
            thief.resume()
    finally:
        thief.close()
    assert refusal.value.code == "token_wrong_key"
    assert_still_chatting(alice, bob)
    assert_still_chatting(bob, dave)


def test_a_stolen_token_with_the_victims_public_key_cannot_resume(make_server, connect, peers):
    # The thief has alice's token and her public key (it crossed the wire in clear), so the
    # key binding alone would pass; only the private key's signature stops the resume.
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    alice = connect("alice", to=server)
    wait_for(bob, joined("alice"))
    thief_key = spare_key("thief")
    thief = peers(server, private_key=thief_key)
    thief.hello(client_key_der=alice.public_key_der)
    session_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
    thief.channel.session_key = session_key
    thief.send_message(
        Resume(
            token=alice.token,
            server_nonce=b64encode(thief.nonce),
            client_key_fingerprint=crypto_utils.fingerprint(alice.private_key.public_key()),
            session_key=b64encode(session_key),
            client_signature=thief.auth_signature(Kind.RESUME, signing_key=thief_key),
        )
    )
    frames = thief.frames_until_closed()
    assert len(frames) == 1
    frame_type, body = frames[0]
    assert frame_type is FrameType.SEALED  # the refusal is sealed for alice's key, which the thief lacks
    with pytest.raises(CryptoError):
        _open_sealed_reply(body, thief_key)
    _, reply = _open_sealed_reply(body, alice.private_key)
    assert isinstance(reply, ErrorReply) and reply.code == "protocol_error"
    assert not [event for event in drain(bob, quiet=0.1) if joined("alice")(event) or left("alice")(event)]
    assert_still_chatting(alice, bob)
    assert_still_chatting(bob, dave)


@pytest.mark.parametrize("filler, count, fits", [("\t", 9000, True), ('"', 15000, True), ("\t", 20000, False)])
def test_text_that_widens_on_the_wire_never_drops_the_listeners(make_server, connect, filler, count, fits):
    # Tabs become four spaces and quotes are escaped: a line within the byte limit as typed can
    # outgrow a frame. It must be refused to its author, never break every recipient's link.
    server = make_server(flood_burst=50)
    alice, bob = honest_pair(connect, server)
    dave = connect("dave", to=server)
    wait_for(alice, joined("dave"))
    text = "x" + filler * count
    alice.say(text)
    if fits:
        expected = protocol.sanitize_text(text)
        assert wait_for(bob, lambda event: isinstance(event, Chat) and event.sender == "alice").text == expected
        assert wait_for(dave, lambda event: isinstance(event, Chat) and event.sender == "alice").text == expected
    else:
        refusal = wait_for(alice, is_error)
        assert refusal.code == "bad_message" and "too long" in refusal.message and not refusal.fatal
    assert_still_chatting(alice, bob)
    assert_still_chatting(bob, dave)


def test_a_client_cannot_send_what_only_the_server_sends(make_server, connect):
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    alice = connect("alice", to=server)
    wait_for(bob, joined("alice"))
    forged_line = Chat(sender="dave", text="a line dave never wrote", sent_at=time.time())
    with alice.send_lock:
        alice.sock.sendall(alice.channel.seal(forged_line))
    refusal = wait_for(alice, is_error)
    assert refusal.code == "protocol_error" and refusal.fatal
    wait_for(bob, left("alice"))
    assert not [event for event in drain(bob, quiet=0.1) if chat_with("a line dave never wrote")(event)]
    assert_still_chatting(bob, dave)


def test_a_line_wrapped_with_rsa_after_login_is_refused(make_server, connect, peers):
    """Version 1 wrapped every client frame; now only the login may be, so the server never unwraps a line."""
    alice, bob, carol = pair_and_raw_carol(connect, peers, make_server(), "carol")
    channel = carol.channel
    say = Say(token=carol.token, room="#lobby", text="wrapped the old way")
    aad = associated_data(Kind.SAY, channel.send_seq, "carol", "server")
    wrapped, nonce, ciphertext = crypto_utils.seal(carol.server_key, say.encoded, aad)
    mac_input = protocol.envelope_mac_input(Kind.SAY, channel.send_seq, wrapped, nonce, ciphertext)
    mac = crypto_utils.session_mac(channel.session_key, b"c2s", mac_input)
    carol.sock.sendall(protocol.encode_sealed_frame(mac_input, mac))
    refusal = carol.receive_reply()
    assert isinstance(refusal, ErrorReply) and refusal.code == "protocol_error" and refusal.fatal
    wait_for(alice, left("carol"))
    assert not [event for event in drain(bob, quiet=0.1) if chat_with("wrapped the old way")(event)]
    assert_still_chatting(alice, bob)


# --------------------------------------------------------------------------- people in the middle


def _open_sealed_reply(body, private_key):
    """Decrypt a server reply sent before login (no MAC check: we may not hold the session key)."""
    envelope = Envelope.decode(body)
    plaintext = crypto_utils.open_sealed(
        private_key,
        envelope.wrapped_key,
        envelope.nonce,
        envelope.ciphertext,
        associated_data(envelope.kind, envelope.seq, "server", ""),
    )
    return plaintext, decode_message(envelope.kind, plaintext)


def test_a_relayed_or_replayed_login_is_refused(make_server, connect, peers):
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    password = password_of("alice")

    victim = peers(server, private_key=spare_key("victim"))
    victim.hello()
    assert victim.server_proved_its_key()
    login = victim.login_frame("alice", password)

    # Mallory relays the victim's login over her own connection, where the server holds her key.
    mallory_key = spare_key("mallory")
    relay = peers(server, private_key=mallory_key)
    relay.hello()
    relay.sock.sendall(login)
    frames = relay.frames_until_closed()
    sealed = [body for frame_type, body in frames if frame_type is FrameType.SEALED]
    assert len(frames) == 1
    if sealed:
        plaintext, reply = _open_sealed_reply(sealed[0], mallory_key)
        assert isinstance(reply, ErrorReply) and reply.code == "protocol_error"
        assert password.encode() not in plaintext and b"alice" not in plaintext
    else:
        assert_refused_in_clear(frames, "protocol_error")

    # Replayed on a new connection that claims the victim's key: refused, and sealed for the victim only.
    replay = peers(server, private_key=mallory_key)
    replay.hello(client_key_der=crypto_utils.public_key_bytes(spare_key("victim").public_key()))
    replay.sock.sendall(login)
    frames = replay.frames_until_closed()
    assert len(frames) == 1
    frame_type, body = frames[0]
    if frame_type is FrameType.SEALED:
        with pytest.raises(CryptoError):
            _open_sealed_reply(body, mallory_key)
        _, reply = _open_sealed_reply(body, spare_key("victim"))
        assert isinstance(reply, ErrorReply) and reply.code == "protocol_error"
    else:
        assert_refused_in_clear(frames, "protocol_error")
    assert not [event for event in drain(bob, quiet=0.1) if joined("alice")(event)]

    # The very same frame on the connection it was made for is a good login.
    victim.sock.sendall(login)
    assert victim.finish_login("alice").username == "alice"
    wait_for(bob, joined("alice"))
    assert_still_chatting(bob, dave)


class ScriptedImpostor:
    """Answers one client's hello with a server_hello of the test's making.

    ``make_reply(hello)`` gets the client's hello (a dict) and returns the frame to
    send back. Whatever the client sends after that is kept in ``sent_after_hello``.
    """

    def __init__(self, make_reply):
        self.make_reply = make_reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.sent_after_hello = bytearray()
        self.thread = threading.Thread(target=self._run, name="test-impostor", daemon=True)
        self.thread.start()

    def _run(self):
        self.listener.settimeout(TIMEOUT)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        with client:
            client.settimeout(TIMEOUT)
            _, body = read_frame(client)
            client.sendall(self.make_reply(decode_control(body)))
            while True:
                try:
                    chunk = client.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.sent_after_hello += chunk

    def close(self):
        self.listener.close()
        self.thread.join(timeout=TIMEOUT)


def key_swapping_relay(server_address, relay_key):
    """A person in the middle: forwards the handshake but puts its own key in the client's hello."""
    relay_key_der = crypto_utils.public_key_bytes(relay_key.public_key())

    def forward_with_our_key(_hello):  # the client's hello is dropped
        with socket.create_connection(server_address, timeout=TIMEOUT) as upstream:
            upstream.sendall(hello_for(relay_key_der))
            return encode_frame(*read_frame(upstream))

    return ScriptedImpostor(forward_with_our_key)


def test_a_client_behind_a_key_swapping_relay_refuses_to_log_in(make_server, connect, tmp_path):
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    relay = key_swapping_relay(server.address, spare_key("mallory"))
    victim = ChatClient(
        *relay.address,
        server_fingerprint=server.fingerprint,  # the real server's key, correctly pinned
        known_hosts=KnownHosts(tmp_path / "victim_hosts"),
        timeout=TIMEOUT,
    )
    try:
        with pytest.raises(HostKeyError):
            victim.login("alice", password_of("alice"))
    finally:
        victim.close()
        relay.close()
    assert not relay.thread.is_alive()
    assert relay.sent_after_hello == b"", "the client sent something to an impostor"
    assert not [event for event in drain(bob, quiet=0.1) if joined("alice")(event)]
    assert_still_chatting(bob, dave)


def recorded_server_hello(server):
    """A genuine server_hello, signed by ``server`` for another connection's hello."""
    recorder = RawPeer(server, private_key=spare_key("mallory"))
    try:
        return recorder.hello()
    finally:
        recorder.close()


def replayed(reply, **changes):
    values = {key: value for key, value in reply.items() if key != "type"} | changes
    return encode_control(reply["type"], **values)


def our_digest(hello, reply):
    """The digest a client computes for its own hello and this reply."""
    return server_hello_digest(
        b64decode(reply["nonce"], "nonce"), b64decode(hello["nonce"], "nonce"), b64decode(hello["client_key"], "key")
    )


@pytest.mark.parametrize(
    "forge",
    [
        # The server's own signature over someone else's batch: the client's fresh nonce is not in it.
        pytest.param(lambda hello, reply: replayed(reply), id="replayed as recorded"),
        # The client's digest slipped into a genuine batch: the signature no longer covers the batch.
        pytest.param(
            lambda hello, reply: replayed(
                reply, batch=b64encode(b64decode(reply["batch"], "batch") + our_digest(hello, reply))
            ),
            id="our digest added to the batch",
        ),
    ],
)
def test_a_recorded_server_hello_cannot_prove_the_key_to_another_client(make_server, connect, tmp_path, forge):
    server = make_server()
    bob, dave = honest_pair(connect, server, "bob", "dave")
    reply = recorded_server_hello(server)
    impostor = ScriptedImpostor(lambda hello: forge(hello, reply))
    victim = ChatClient(
        *impostor.address,
        server_fingerprint=server.fingerprint,  # the real server's key, correctly pinned
        known_hosts=KnownHosts(tmp_path / "victim_hosts"),
        timeout=TIMEOUT,
    )
    try:
        with pytest.raises(HostKeyError, match="failed to prove"):
            victim.login("alice", password_of("alice"))
    finally:
        victim.close()
        impostor.close()
    assert impostor.sent_after_hello == b"", "the client sent something to an impostor"
    assert_still_chatting(bob, dave)


WRONG_SIZE = "bad handshake from the server: server_hello batch has the wrong size"


@pytest.mark.parametrize(
    ("batch", "refusal"),
    [
        pytest.param(lambda digest: b"", WRONG_SIZE, id="empty"),
        pytest.param(lambda digest: digest + b"x", WRONG_SIZE, id="not whole digests"),
        pytest.param(lambda digest: digest * (protocol.MAX_HELLO_BATCH + 1), WRONG_SIZE, id="too many digests"),
        pytest.param(
            lambda digest: b"\0" + digest + b"\0" * 31,
            "the server failed to prove it holds its key: possible impostor",
            id="ours not on a digest boundary",
        ),
        pytest.param(lambda digest: None, "bad handshake from the server: batch: ", id="no batch at all"),
    ],
)
def test_a_malformed_hello_batch_is_refused_before_the_login(tmp_path, batch, refusal):
    impostor_key = spare_key("impostor")
    impostor_der = crypto_utils.public_key_bytes(impostor_key.public_key())

    def answer(hello):
        nonce = os.urandom(HANDSHAKE_NONCE_SIZE)
        signed_batch = batch(our_digest(hello, {"nonce": b64encode(nonce)}))
        fields = {"server_key": b64encode(impostor_der), "nonce": b64encode(nonce)}
        if signed_batch is not None:
            fields["batch"] = b64encode(signed_batch)
        signature = crypto_utils.sign(impostor_key, server_hello_signed_data(signed_batch or b""))
        return encode_control("server_hello", version=PROTOCOL_VERSION, signature=b64encode(signature), **fields)

    impostor = ScriptedImpostor(answer)
    victim = ChatClient(
        *impostor.address,
        server_fingerprint=crypto_utils.fingerprint(impostor_key.public_key()),  # even a trusted key
        known_hosts=KnownHosts(tmp_path / "victim_hosts"),
        timeout=TIMEOUT,
    )
    try:
        with pytest.raises(ChatError) as refused:
            victim.login("alice", password_of("alice"))
    finally:
        victim.close()
        impostor.close()
    assert str(refused.value).startswith(refusal), refused.value
    assert impostor.sent_after_hello == b""


def test_a_message_id_beyond_64_bits_is_refused_not_a_crash(server, connect, caplog):
    """SQLite's integers are 64-bit: a /history past that used to crash the session in the store
    (a traceback in the log, the client dropped with "internal error")."""
    alice = connect("alice")
    drain(alice)
    alice.command("history", "#lobby", "10", str(2**64))
    refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply))
    assert refusal.code == "bad_command" and "the message id must be a whole number from 0 to" in refusal.message
    alice.command("history", "#lobby", "10", "5")  # the session goes on
    wait_for(alice, lambda event: isinstance(event, protocol.History) and event.room == "#lobby")
    assert "unexpected error" not in caplog.text


def test_a_login_claiming_to_have_seen_past_64_bits_is_a_bad_field():
    fields = {name: "x" for name in ("username", "password", "server_nonce", "client_key_fingerprint")}
    fields.update(session_key="x", client_signature="x")
    sent = json.loads(protocol.Login(**fields, since=2**63 - 1).encoded)
    assert protocol.decode_message(protocol.Kind.LOGIN, json.dumps(sent).encode()).since == 2**63 - 1
    with pytest.raises(protocol.ProtocolError, match="since must be a whole number"):
        protocol.decode_message(protocol.Kind.LOGIN, json.dumps({**sent, "since": 2**64}).encode())
