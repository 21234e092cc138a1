"""Keys, fingerprints, hybrid encryption, signatures and the sealed channel.

Key pairs are generated once per module (RSA generation is the slow part).
The channel tests drive two ``SecureChannel`` objects against each other with
no socket: a client side and a server side, frames passed by hand, so replays,
reorders and forgeries can be staged exactly.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import stat
import threading

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from securechat import crypto_utils, protocol
from securechat.channel import SecureChannel, SequenceError
from securechat.crypto_utils import CryptoError, InsecureFileError
from securechat.protocol import CLIENT_KINDS, SERVER_KINDS, FrameDecoder, FrameType, Kind, ProtocolError


@pytest.fixture(scope="module")
def server_key():
    return crypto_utils.generate_private_key(2048)


@pytest.fixture(scope="module")
def client_key():
    return crypto_utils.generate_private_key(2048)


@pytest.fixture(scope="module")
def stranger_key():
    return crypto_utils.generate_private_key(2048)


@pytest.fixture(scope="module")
def key_3072():
    return crypto_utils.generate_private_key(3072)


def der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes((data[index] ^ 0x01,)) + data[index + 1 :]


# --------------------------------------------------------------------------- seal / open

AAD = protocol.associated_data(Kind.SAY, 7, "alice", "server")


@pytest.mark.parametrize("key_name", ["server_key", "key_3072"])
@pytest.mark.parametrize(
    "text",
    ["hello", "x" * 10_000, "héllo wörld 你好 👍🏽 " * 500, ""],
    ids=["short", "10000-chars", "multibyte", "empty"],
)
def test_seal_then_open_returns_the_plaintext(request, key_name, text):
    private_key = request.getfixturevalue(key_name)
    plaintext = text.encode("utf-8")
    wrapped, nonce, ciphertext = crypto_utils.seal(private_key.public_key(), plaintext, AAD)
    assert len(wrapped) == private_key.key_size // 8
    assert len(nonce) == crypto_utils.NONCE_SIZE
    assert plaintext not in ciphertext or not plaintext
    assert crypto_utils.open_sealed(private_key, wrapped, nonce, ciphertext, AAD).decode("utf-8") == text


def test_each_seal_uses_a_fresh_key_and_nonce(server_key):
    first = crypto_utils.seal(server_key.public_key(), b"same", AAD)
    second = crypto_utils.seal(server_key.public_key(), b"same", AAD)
    assert all(a != b for a, b in zip(first, second, strict=True))


@pytest.fixture(scope="module")
def sealed(server_key):
    return crypto_utils.seal(server_key.public_key(), "a secret line, ünïcode".encode(), AAD)


@pytest.mark.parametrize("part", ["wrapped_key", "nonce", "ciphertext", "aad"])
def test_tampering_any_byte_fails(server_key, sealed, part):
    wrapped, nonce, ciphertext = sealed
    parts = {"wrapped_key": wrapped, "nonce": nonce, "ciphertext": ciphertext, "aad": AAD}
    original = parts[part]
    for index in range(len(original)):
        altered = {**parts, part: flip(original, index)}
        with pytest.raises(CryptoError):
            crypto_utils.open_sealed(
                server_key, altered["wrapped_key"], altered["nonce"], altered["ciphertext"], altered["aad"]
            )


@pytest.mark.parametrize("part", ["wrapped_key", "nonce", "ciphertext"])
def test_truncated_or_empty_parts_fail(server_key, sealed, part):
    wrapped, nonce, ciphertext = sealed
    for cut in (b"", None):
        parts = {"wrapped_key": wrapped, "nonce": nonce, "ciphertext": ciphertext}
        parts[part] = cut if cut is not None else parts[part][:-1]
        with pytest.raises(CryptoError):
            crypto_utils.open_sealed(server_key, parts["wrapped_key"], parts["nonce"], parts["ciphertext"], AAD)


def test_opening_with_the_wrong_private_key_fails(server_key, stranger_key, sealed):
    with pytest.raises(CryptoError):
        crypto_utils.open_sealed(stranger_key, *sealed, AAD)


def test_a_wrapped_key_of_the_wrong_size_is_refused(server_key):
    wrapped = crypto_utils.wrap_key(server_key.public_key(), b"k" * 16)
    with pytest.raises(CryptoError, match="size"):
        crypto_utils.open_sealed(server_key, wrapped, b"n" * 12, b"c" * 32, AAD)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unwrapped(private_key, wrapped: bytes) -> bytes:
    """The AES key inside a wrap. Wraps of one key differ (OAEP is randomized): keys are what to compare."""
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return private_key.decrypt(wrapped, oaep)


def test_a_recipient_sealer_renews_its_key_after_its_lifetime_or_its_uses(server_key):
    clock = FakeClock()
    sealer = crypto_utils.RecipientSealer(server_key.public_key(), key_lifetime=5.0, key_uses=3, clock=clock)
    first = [sealer.seal(b"line %d" % number, AAD) for number in range(3)]
    assert len({wrapped for wrapped, _, _ in first}) == 1  # one key and one wrap for three frames
    assert len({nonce for _, nonce, _ in first}) == 3  # each frame its own nonce
    first_key = unwrapped(server_key, first[0][0])
    after_uses = sealer.seal(b"fourth", AAD)[0]
    second_key = unwrapped(server_key, after_uses)
    assert second_key != first_key  # the fourth use takes a new key, not the old one wrapped again
    clock.now += 4.9
    assert sealer.seal(b"within the lifetime", AAD)[0] == after_uses
    clock.now += 0.1
    assert unwrapped(server_key, sealer.seal(b"past the lifetime", AAD)[0]) not in (first_key, second_key)


def test_frames_sealed_under_one_wrap_each_open_alone_and_only_for_the_recipient(server_key, stranger_key):
    sealer = crypto_utils.RecipientSealer(server_key.public_key())
    frames = [sealer.seal(text, AAD) for text in (b"first", b"second", b"first")]
    assert frames[0][0] == frames[1][0] == frames[2][0]
    assert frames[0][2] != frames[2][2]  # the same text under the same key, not the same ciphertext
    for text, frame in zip((b"first", b"second", b"first"), frames, strict=True):
        assert crypto_utils.open_sealed(server_key, *frame, AAD) == text
        with pytest.raises(CryptoError):
            crypto_utils.open_sealed(stranger_key, *frame, AAD)
    other_recipient = crypto_utils.RecipientSealer(stranger_key.public_key()).seal(b"first", AAD)
    assert unwrapped(stranger_key, other_recipient[0]) != unwrapped(server_key, frames[0][0])


def test_the_sealed_opener_unwraps_a_repeated_wrap_once_and_still_checks_every_frame(server_key, monkeypatch):
    sealer = crypto_utils.RecipientSealer(server_key.public_key())
    opener = crypto_utils.SealedOpener(server_key)
    unwraps = []
    real_unwrap = crypto_utils._unwrapped_cipher
    monkeypatch.setattr(
        crypto_utils, "_unwrapped_cipher", lambda key, wrapped: unwraps.append(wrapped) or real_unwrap(key, wrapped)
    )
    one, two = sealer.seal(b"one", AAD), sealer.seal(b"two", AAD)
    assert opener.open(*one, AAD) == b"one" and opener.open(*two, AAD) == b"two"
    assert len(unwraps) == 1
    wrapped, nonce, ciphertext = two
    refusals = [
        (wrapped, nonce, flip(ciphertext, 3), AAD),
        (wrapped, flip(nonce, 0), ciphertext, AAD),
        (wrapped, nonce, ciphertext, AAD + b"x"),
        (flip(wrapped, 10), nonce, ciphertext, AAD),
    ]
    for refused in refusals:
        with pytest.raises(CryptoError):
            opener.open(*refused)
    assert opener.open(*two, AAD) == b"two"  # a refusal leaves nothing behind
    fresh = crypto_utils.seal(server_key.public_key(), b"three", AAD)
    assert opener.open(*fresh, AAD) == b"three"


def test_the_sealed_opener_accepts_exactly_what_an_uncached_open_accepts(server_key, stranger_key):
    """Random runs of good, altered, foreign and garbage frames: the cache of the last unwrap never
    lets through, or refuses, anything ``open_sealed`` alone would not, whatever came before."""
    rng = random.Random(4726)
    sealers = [crypto_utils.RecipientSealer(server_key.public_key()) for _ in range(3)]
    pool = [sealer.seal(b"line %d" % number, AAD) for sealer in sealers for number in range(3)]
    pool.append(crypto_utils.RecipientSealer(stranger_key.public_key()).seal(b"not for us", AAD))

    def altered(frame):
        wrapped, nonce, ciphertext = frame
        return rng.choice(
            [
                (frame, AAD),
                ((wrapped, nonce, flip(ciphertext, 0)), AAD),
                ((wrapped, nonce[:11], ciphertext), AAD),
                (frame, AAD + b"!"),
                ((os.urandom(len(wrapped)), nonce, ciphertext), AAD),
                ((rng.choice(pool)[0], nonce, ciphertext), AAD),  # another frame's wrap with this body
                ((b"", nonce, ciphertext), AAD),
            ]
        )

    def outcome(open_frame, *sealed):
        try:
            return open_frame(*sealed)
        except CryptoError:
            return CryptoError

    opener = crypto_utils.SealedOpener(server_key)
    for _ in range(150):
        (wrapped, nonce, ciphertext), aad = altered(rng.choice(pool))
        expected = outcome(crypto_utils.open_sealed, server_key, wrapped, nonce, ciphertext, aad)
        assert outcome(opener.open, wrapped, nonce, ciphertext, aad) == expected


def test_the_session_cipher_opens_only_its_own_frames():
    session_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
    sender = crypto_utils.SessionCipher(session_key, b"c2s")
    nonce, ciphertext = sender.seal(b"hello", AAD)
    assert crypto_utils.SessionCipher(session_key, b"c2s").open(nonce, ciphertext, AAD) == b"hello"
    assert b"hello" not in ciphertext
    refusals = {
        "other direction": lambda: crypto_utils.SessionCipher(session_key, b"s2c").open(nonce, ciphertext, AAD),
        "other session": lambda: crypto_utils.SessionCipher(os.urandom(32), b"c2s").open(nonce, ciphertext, AAD),
        "other associated data": lambda: sender.open(nonce, ciphertext, AAD + b"x"),
        "flipped bit": lambda: sender.open(nonce, bytes([ciphertext[0] ^ 1]) + ciphertext[1:], AAD),
        "short nonce": lambda: sender.open(nonce[:8], ciphertext, AAD),
    }
    for case, attempt in refusals.items():
        with pytest.raises(CryptoError):
            attempt()
            pytest.fail(case)
    assert sender.seal(b"hello", AAD)[0] != nonce  # a fresh nonce every time


# --------------------------------------------------------------------------- public keys from peers


def test_load_public_key_accepts_rsa_2048_and_3072(server_key, key_3072):
    for private_key in (server_key, key_3072):
        loaded = crypto_utils.load_public_key(der(private_key.public_key()))
        assert loaded.public_numbers() == private_key.public_key().public_numbers()


def test_load_public_key_refuses_an_ec_key():
    with pytest.raises(CryptoError, match="not RSA"):
        crypto_utils.load_public_key(der(ec.generate_private_key(ec.SECP256R1()).public_key()))


def test_load_public_key_refuses_a_curve_the_library_does_not_know():
    known = der(ec.generate_private_key(ec.SECP256R1()).public_key())
    unknown = known.replace(bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2b81040006000000"))
    with pytest.raises(CryptoError):  # not cryptography's UnsupportedAlgorithm, which nobody catches
        crypto_utils.load_public_key(unknown)


def test_load_public_key_refuses_an_ed25519_key():
    with pytest.raises(CryptoError, match="not RSA"):
        crypto_utils.load_public_key(der(ed25519.Ed25519PrivateKey.generate().public_key()))


def test_load_public_key_refuses_1024_bit_rsa():
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CryptoError, match="1024"):
        crypto_utils.load_public_key(der(weak.public_key()))


def test_load_public_key_refuses_exponent_3(server_key):
    modulus = server_key.public_key().public_numbers().n
    small_exponent = rsa.RSAPublicNumbers(3, modulus).public_key()
    with pytest.raises(CryptoError, match="65537"):
        crypto_utils.load_public_key(der(small_exponent))


@pytest.mark.parametrize("junk", [b"", b"\x30\x00", b"not a key at all", os.urandom(300)])
def test_load_public_key_refuses_junk(junk):
    with pytest.raises(CryptoError):
        crypto_utils.load_public_key(junk)


def test_generate_private_key_refuses_other_sizes():
    with pytest.raises(ValueError):
        crypto_utils.generate_private_key(1024)


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_sha256_of_the_der_key_in_ssh_keygen_form(server_key):
    fingerprint = crypto_utils.fingerprint(server_key.public_key())
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint)
    digest = hashlib.sha256(der(server_key.public_key())).digest()
    assert base64.b64decode(fingerprint.removeprefix("SHA256:") + "=") == digest


def test_fingerprints_of_different_keys_differ(server_key, client_key):
    assert crypto_utils.fingerprint(server_key.public_key()) != crypto_utils.fingerprint(client_key.public_key())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rfc7638_thumbprint(public_key) -> str:
    """Written from RFC 7638 section 3: required members only, lexicographic order, no whitespace."""
    numbers = public_key.public_numbers()
    e = b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
    n = b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
    canonical = '{"e":"' + e + '","kty":"RSA","n":"' + n + '"}'
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def test_jwk_thumbprint_matches_an_independent_rfc7638_computation(server_key, key_3072):
    for private_key in (server_key, key_3072):
        assert crypto_utils.jwk_thumbprint(private_key.public_key()) == rfc7638_thumbprint(private_key.public_key())


# The example key and thumbprint of RFC 7638, section 3.1.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
    "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZ"
    "Hzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kE"
    "gU8awapJzKnqDKgw"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwk_thumbprint_of_the_rfc7638_example_key():
    modulus = int.from_bytes(base64.urlsafe_b64decode(RFC7638_N + "=" * (-len(RFC7638_N) % 4)), "big")
    public_key = rsa.RSAPublicNumbers(65537, modulus).public_key()
    assert crypto_utils.jwk_thumbprint(public_key) == RFC7638_THUMBPRINT


# --------------------------------------------------------------------------- signatures


def test_pss_signature_verifies(server_key):
    data = b"chat-server-hello/1\0" + os.urandom(32)
    signature = crypto_utils.sign(server_key, data)
    crypto_utils.verify_signature(server_key.public_key(), signature, data)


def test_pss_signatures_are_randomized(server_key):
    assert crypto_utils.sign(server_key, b"same") != crypto_utils.sign(server_key, b"same")


def test_bad_signatures_are_refused(server_key, stranger_key):
    data = b"chat-server-hello/1\0nonce"
    signature = crypto_utils.sign(server_key, data)
    attempts = [
        (server_key.public_key(), flip(signature, 0), data),
        (server_key.public_key(), flip(signature, len(signature) - 1), data),
        (server_key.public_key(), signature, data + b"x"),
        (server_key.public_key(), signature[:-1], data),
        (server_key.public_key(), b"", data),
        (stranger_key.public_key(), signature, data),
        (server_key.public_key(), crypto_utils.sign(stranger_key, data), data),
    ]
    for public_key, candidate, signed in attempts:
        with pytest.raises(CryptoError):
            crypto_utils.verify_signature(public_key, candidate, signed)


def test_session_mac_is_labelled_by_direction():
    key = os.urandom(32)
    assert crypto_utils.session_mac(key, b"c2s", b"data") != crypto_utils.session_mac(key, b"s2c", b"data")
    assert crypto_utils.macs_equal(
        crypto_utils.session_mac(key, b"c2s", b"data"), crypto_utils.session_mac(key, b"c2s", b"data")
    )


# --------------------------------------------------------------------------- the sealed channel


def body_of(frame: bytes) -> bytes:
    [(frame_type, body)] = FrameDecoder().feed(frame)
    assert frame_type is FrameType.SEALED
    return body


class Pair:
    """A client channel and a server channel for the same connection."""

    def __init__(self, server_key, client_key, username="alice"):
        self.client = SecureChannel(client_key, server_key.public_key(), is_server=False, allowed_incoming=SERVER_KINDS)
        self.server = SecureChannel(server_key, client_key.public_key(), is_server=True, allowed_incoming=CLIENT_KINDS)
        self.username = username
        self.client_key = client_key
        self.session_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)

    def login_frame(self) -> bytes:
        self.client.session_key = self.session_key
        login = protocol.Login(
            username=self.username,
            password="correct horse",
            server_nonce=protocol.b64encode(b"n" * 32),
            client_key_fingerprint=crypto_utils.fingerprint(self.client_key.public_key()),
            session_key=protocol.b64encode(self.session_key),
            client_signature="",
        )
        return self.client.seal(login)

    def log_in(self) -> protocol.Message:
        message = self.server.open(body_of(self.login_frame()))
        # What server.py and client.py do once the login is accepted.
        self.server.username = self.username
        self.client.username = self.username
        return message


@pytest.fixture
def pair(server_key, client_key):
    return Pair(server_key, client_key)


@pytest.fixture
def logged_in(pair):
    pair.log_in()
    return pair


def test_login_round_trip_establishes_the_session_key(pair):
    assert pair.server.session_key is None
    login = pair.log_in()
    assert isinstance(login, protocol.Login)
    assert (login.username, login.password) == ("alice", "correct horse")
    assert pair.server.session_key == pair.session_key
    assert (pair.server.recv_seq, pair.client.send_seq) == (1, 1)


def test_messages_flow_both_ways_after_login(logged_in):
    say = protocol.Say(token="jwt", text="hello ünïcode 👋")
    assert logged_in.server.open(body_of(logged_in.client.seal(say))) == say
    welcome = protocol.Welcome(username="alice", token="jwt", expires_at=1, rooms=["#lobby"])
    chat = protocol.Chat(sender="bob", text="hi", sent_at=1.0)
    assert logged_in.client.open(body_of(logged_in.server.seal(welcome))) == welcome
    assert logged_in.client.open(body_of(logged_in.server.seal(chat))) == chat


def test_the_plaintext_never_appears_on_the_wire(logged_in):
    frame = logged_in.client.seal(protocol.Say(token="jwt-secret", text="the launch code is 0000"))
    assert b"launch code" not in frame and b"jwt-secret" not in frame


def test_a_replayed_frame_is_refused(logged_in):
    frame = logged_in.client.seal(protocol.Say(token="jwt", text="once"))
    logged_in.server.open(body_of(frame))
    with pytest.raises(SequenceError):
        logged_in.server.open(body_of(frame))


def test_a_replayed_login_is_refused(pair):
    frame = pair.login_frame()
    pair.server.open(body_of(frame))
    with pytest.raises(ProtocolError):
        pair.server.open(body_of(frame))


def test_reordered_frames_are_refused(logged_in):
    first = logged_in.client.seal(protocol.Say(token="jwt", text="one"))
    second = logged_in.client.seal(protocol.Say(token="jwt", text="two"))
    with pytest.raises(SequenceError):
        logged_in.server.open(body_of(second))
    # The refused frame changed nothing: the expected order still works.
    assert logged_in.server.open(body_of(first)).text == "one"
    assert logged_in.server.open(body_of(second)).text == "two"


def test_a_frame_from_another_session_is_refused_before_any_rsa_work(logged_in, server_key, client_key, monkeypatch):
    other = Pair(server_key, client_key)
    other.client.session_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
    other.client.username = "alice"
    other.client.send_seq = logged_in.server.recv_seq  # same position in the stream
    forged = other.client.seal(protocol.Say(token="jwt", text="injected"))
    rsa_calls = []
    monkeypatch.setattr(crypto_utils, "open_sealed", lambda *args: rsa_calls.append(args))
    with pytest.raises(CryptoError, match="MAC"):
        logged_in.server.open(body_of(forged))
    assert rsa_calls == []


def test_a_frame_with_a_forged_mac_is_refused(logged_in):
    body = body_of(logged_in.client.seal(protocol.Say(token="jwt", text="hi")))
    with pytest.raises(CryptoError):
        logged_in.server.open(flip(body, len(body) - 1))


def test_any_altered_byte_of_a_sealed_frame_is_refused(logged_in):
    body = body_of(logged_in.client.seal(protocol.Say(token="jwt", text="hi")))
    for index in range(len(body)):
        with pytest.raises((ProtocolError, CryptoError)):
            logged_in.server.open(flip(body, index))
    assert logged_in.server.open(body).text == "hi"


def test_any_altered_byte_of_a_login_is_refused(pair):
    body = body_of(pair.login_frame())
    for index in range(0, len(body), 7):
        with pytest.raises((ProtocolError, CryptoError)):
            pair.server.open(flip(body, index))
    assert pair.server.session_key is None


@pytest.mark.parametrize(
    "message",
    [
        protocol.Chat(sender="admin", text="forged", sent_at=0.0),
        protocol.Welcome(username="alice", token="t", expires_at=1, rooms=[]),
        protocol.ErrorReply(code="x", message="y"),
        protocol.Notice(event="info", text="z"),
    ],
    ids=lambda message: type(message).__name__,
)
def test_a_server_kind_sent_by_a_client_is_refused(logged_in, message):
    with pytest.raises(ProtocolError, match="not allowed"):
        logged_in.server.open(body_of(logged_in.client.seal(message)))


def test_a_client_kind_sent_by_the_server_is_refused(logged_in):
    with pytest.raises(ProtocolError, match="not allowed"):
        logged_in.client.open(body_of(logged_in.server.seal(protocol.Say(token="t", text="x"))))


def test_a_frame_reflected_back_to_its_sender_is_refused(logged_in):
    frame = logged_in.client.seal(protocol.Say(token="jwt", text="echo"))
    with pytest.raises(ProtocolError):
        logged_in.client.open(body_of(frame))


def test_a_message_before_login_is_refused(pair):
    pair.client.session_key = pair.session_key
    with pytest.raises(ProtocolError, match="not allowed now"):
        pair.server.open(body_of(pair.client.seal(protocol.Say(token="t", text="early"))))


def test_a_second_login_on_an_established_session_is_refused(logged_in):
    with pytest.raises(ProtocolError, match="not allowed now"):
        logged_in.server.open(body_of(logged_in.login_frame()))


def test_a_frame_bound_to_another_user_name_is_refused(logged_in):
    frame = logged_in.client.seal(protocol.Say(token="jwt", text="hi"))
    logged_in.server.username = "bob"
    with pytest.raises(CryptoError):
        logged_in.server.open(body_of(frame))


def test_a_login_with_a_session_key_of_the_wrong_size_is_refused(pair):
    pair.client.session_key = os.urandom(16)
    login = protocol.Login(
        username="alice",
        password="pw",
        server_nonce="n",
        client_key_fingerprint="f",
        session_key=protocol.b64encode(pair.client.session_key),
        client_signature="",
    )
    with pytest.raises(ProtocolError, match="session key"):
        pair.server.open(body_of(pair.client.seal(login)))
    assert pair.server.session_key is None


def test_sealing_before_a_session_key_exists_is_a_local_error(pair):
    with pytest.raises(RuntimeError):
        pair.client.seal(protocol.Say(token="t", text="x"))


def test_a_login_sealed_for_another_server_is_refused(server_key, stranger_key, client_key):
    meant_for_stranger = Pair(stranger_key, client_key)
    real_server = Pair(server_key, client_key).server
    with pytest.raises(CryptoError):
        real_server.open(body_of(meant_for_stranger.login_frame()))


# --------------------------------------------------------------------------- secret files


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_key_file_is_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "server_key.pem"
    created = crypto_utils.load_or_create_private_key(path)
    assert mode_of(path) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes()
    reloaded = crypto_utils.load_or_create_private_key(path)
    assert reloaded.private_numbers() == created.private_numbers()


def test_secret_file_is_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "token_secret"
    secret = crypto_utils.load_or_create_secret(path)
    assert len(secret) >= 32
    assert mode_of(path) == 0o600
    assert crypto_utils.load_or_create_secret(path) == secret


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_group_or_world_readable_private_key_is_refused(tmp_path, mode):
    path = tmp_path / "server_key.pem"
    crypto_utils.load_or_create_private_key(path)
    path.chmod(mode)
    with pytest.raises(InsecureFileError) as refused:
        crypto_utils.load_or_create_private_key(path)
    assert str(path) in str(refused.value)
    assert f"chmod 600 {path}" in str(refused.value)


def test_a_world_readable_secret_is_refused(tmp_path):
    path = tmp_path / "token_secret"
    crypto_utils.load_or_create_secret(path)
    path.chmod(0o644)
    with pytest.raises(InsecureFileError) as refused:
        crypto_utils.load_or_create_secret(path)
    assert str(path) in str(refused.value)
    assert f"chmod 600 {path}" in str(refused.value)


def test_a_short_or_garbled_secret_is_refused(tmp_path):
    short = tmp_path / "short"
    crypto_utils.write_secret_file(short, b"abcd")
    garbled = tmp_path / "garbled"
    crypto_utils.write_secret_file(garbled, b"not hex at all")
    for path in (short, garbled):
        with pytest.raises(CryptoError, match=re.escape(str(path))):
            crypto_utils.load_or_create_secret(path)


def test_a_non_rsa_or_garbled_key_file_is_refused(tmp_path):
    ec_path = tmp_path / "ec.pem"
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    crypto_utils.write_secret_file(ec_path, ec_pem)
    garbled = tmp_path / "garbled.pem"
    crypto_utils.write_secret_file(garbled, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    for path in (ec_path, garbled):
        with pytest.raises(CryptoError, match=re.escape(str(path))):
            crypto_utils.load_or_create_private_key(path)


def test_write_secret_file_never_overwrites_or_follows_links(tmp_path):
    path = tmp_path / "secret"
    crypto_utils.write_secret_file(path, b"first")
    with pytest.raises(FileExistsError):
        crypto_utils.write_secret_file(path, b"second")
    assert path.read_bytes() == b"first"
    target = tmp_path / "elsewhere"
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError):
        crypto_utils.write_secret_file(link, b"leak")
    assert not target.exists()


def test_associated_data_binds_every_field():
    base = protocol.associated_data(Kind.SAY, 1, "alice", "server")
    variants = [
        protocol.associated_data(Kind.PRIVATE, 1, "alice", "server"),
        protocol.associated_data(Kind.SAY, 2, "alice", "server"),
        protocol.associated_data(Kind.SAY, 1, "bob", "server"),
        protocol.associated_data(Kind.SAY, 1, "server", "alice"),
    ]
    assert len({base, *variants}) == 5


def test_the_sealed_frame_layout_matches_the_envelope_parser(logged_in):
    chat = protocol.Chat(sender="bob", text="laid out by hand", sent_at=1.0)
    frame = logged_in.server.seal(chat)
    body = body_of(frame)
    envelope = protocol.Envelope.decode(body)
    assert (envelope.kind, envelope.seq) == (Kind.CHAT, 0)
    assert body == envelope.encode()
    wrapped_size = logged_in.client_key.key_size // 8
    assert len(body) + 1 == protocol.sealed_frame_size(wrapped_size, len(chat.encoded))


def test_a_message_too_large_for_a_frame_is_refused_and_leaves_the_channel_as_it_was(logged_in):
    too_long = protocol.Chat(sender="bob", text="x" * protocol.MAX_FRAME_SIZE, sent_at=1.0)
    with pytest.raises(protocol.MessageTooLarge, match="exceeds"):
        logged_in.server.seal(too_long)
    assert logged_in.server.send_seq == 0
    # The next message takes the sequence number the refused one would have had.
    fine = protocol.Chat(sender="bob", text="after the big one", sent_at=2.0)
    assert logged_in.client.open(body_of(logged_in.server.seal(fine))) == fine
    assert (logged_in.server.send_seq, logged_in.client.recv_seq) == (1, 1)


def test_a_message_that_just_fits_is_sent_and_one_byte_more_is_not(logged_in):
    wrapped_size = logged_in.client_key.key_size // 8
    overhead = protocol.sealed_frame_size(wrapped_size, 0)
    empty_notice = protocol.Notice(event="info", text="")
    room = protocol.MAX_FRAME_SIZE - overhead - len(empty_notice.encoded)
    fits = protocol.Notice(event="info", text="y" * room)
    assert logged_in.client.open(body_of(logged_in.server.seal(fits))) == fits
    with pytest.raises(protocol.MessageTooLarge):
        logged_in.server.seal(protocol.Notice(event="info", text="y" * (room + 1)))
    assert logged_in.server.send_seq == 1


def test_message_too_large_is_a_local_error_not_a_protocol_error():
    assert issubclass(protocol.MessageTooLarge, ValueError)
    assert not issubclass(protocol.MessageTooLarge, ProtocolError)


def test_the_per_connection_session_mac_equals_the_one_shot_one():
    key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
    keyed = crypto_utils.SessionMac(key, b"s2c")
    for data in (b"", b"frame one", b"x" * 5000):
        assert keyed.digest(data) == crypto_utils.session_mac(key, b"s2c", data)
    assert keyed.digest(b"frame one") != crypto_utils.SessionMac(key, b"c2s").digest(b"frame one")


def test_a_new_session_key_takes_effect_for_the_next_frame(logged_in):
    logged_in.server.seal(protocol.Notice(event="info", text="under the first key"))
    new_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
    logged_in.server.session_key = new_key
    body = body_of(logged_in.server.seal(protocol.Notice(event="info", text="under the second key")))
    envelope = protocol.Envelope.decode(body)
    assert envelope.mac == crypto_utils.session_mac(new_key, b"s2c", envelope.mac_input())


def test_the_random_pool_never_hands_out_the_same_bytes_twice():
    pool = crypto_utils.RandomPool(block_size=100)
    taken = [pool.take(44) for _ in range(10)]  # crosses several block refills
    assert all(len(chunk) == 44 for chunk in taken)
    assert len(set(taken)) == len(taken)
    assert len(pool.take(500)) == 500  # more than a block: straight from the OS


def test_threads_draw_from_their_own_blocks():
    pool = crypto_utils.RandomPool(block_size=4096)
    taken: list[bytes] = []
    threads = [threading.Thread(target=lambda: taken.extend(pool.take(44) for _ in range(50))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(taken)) == len(taken) == 200


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_random_bytes():
    pool = crypto_utils.RandomPool(block_size=4096)
    pool.take(44)  # the parent now holds a block with bytes still to hand out
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write_end, pool.take(44))
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    from_child = os.read(read_end, 44)
    os.close(read_end)
    assert len(from_child) == 44
    assert from_child != pool.take(44)
