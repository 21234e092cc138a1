"""One encrypted connection: the sealing state of each side, and frame I/O on a socket.

``SecureChannel`` is pure state (keys, sequence numbers, session MAC key): it
turns messages into frames and frames into messages. The few functions at the
bottom read whole frames from a socket with the size checked first.
"""

from __future__ import annotations

import socket
import time

from securechat import crypto_utils
from securechat.crypto_utils import CryptoError, PrivateKey, PublicKey
from securechat.protocol import (
    MAX_FRAME_SIZE,
    Envelope,
    FrameType,
    Kind,
    Login,
    Message,
    ProtocolError,
    Resume,
    associated_data,
    b64decode,
    check_frame_size,
    check_outgoing_size,
    decode_message,
    encode_sealed_frame,
    envelope_mac_input,
    sealed_frame_size,
    split_payload,
)

SERVER_LABEL = "server"


class ConnectionClosed(Exception):
    """The peer closed the connection (or it was closed under us)."""


class SequenceError(ProtocolError):
    """A sealed frame arrived out of order: a replay, a reorder or an injection."""


class SecureChannel:
    """Seals outgoing messages and opens incoming ones for one side of one connection.

    Not thread-safe by design: the owner serializes ``seal`` calls (one writer)
    and ``open`` calls (one reader). Sequence numbers start at 0 in each
    direction and must match exactly, so a replayed or reordered frame fails.
    """

    def __init__(
        self,
        own_private_key: PrivateKey,
        peer_public_key: PublicKey,
        *,
        is_server: bool,
        allowed_incoming: frozenset[Kind],
    ) -> None:
        self.own_private_key = own_private_key
        self.peer_public_key = peer_public_key
        self.is_server = is_server
        self.allowed_incoming = allowed_incoming
        #: The authenticated user name; "" until login succeeds.
        self.username = ""
        #: The name as the client's login spelled it, if its case differs from the account's: the
        #: server binds its welcome to it, as the client cannot know the stored spelling before then.
        self.login_username = ""
        self.send_seq = 0
        self.recv_seq = 0
        self._send_direction = b"s2c" if is_server else b"c2s"
        self._recv_direction = b"c2s" if is_server else b"s2c"
        self._wrapped_key_size = (peer_public_key.key_size + 7) // 8
        self._session_key: bytes | None = None
        # Derived from the session key when it is set: the keyed MAC state for outgoing
        # frames, and the client-to-server cipher (see SessionCipher).
        self._send_mac: crypto_utils.SessionMac | None = None
        self._recv_mac: crypto_utils.SessionMac | None = None
        self._cipher: crypto_utils.SessionCipher | None = None
        # Sealing for the peer's RSA key (a key and wrap serve a few seconds), and opening for ours.
        self._sealer = crypto_utils.RecipientSealer(peer_public_key)
        self._opener = crypto_utils.SealedOpener(own_private_key)

    @property
    def session_key(self) -> bytes | None:
        """Per-connection secret chosen by the client and sent inside its login; None before."""
        return self._session_key

    @session_key.setter
    def session_key(self, key: bytes) -> None:
        self._session_key = key
        self._send_mac = crypto_utils.SessionMac(key, self._send_direction)
        self._recv_mac = crypto_utils.SessionMac(key, self._recv_direction)
        self._cipher = crypto_utils.SessionCipher(key, b"c2s")

    def _labels(self, outgoing: bool, kind: Kind) -> tuple[str, str]:
        """(hop sender, hop recipient) for the associated data."""
        client_to_server = outgoing != self.is_server
        if client_to_server:
            return self.username, SERVER_LABEL
        if kind is Kind.WELCOME and self.login_username:
            return SERVER_LABEL, self.login_username
        return SERVER_LABEL, self.username

    def seal(self, message: Message) -> bytes:
        """Encrypt ``message`` for the peer and return the complete frame.

        Raises ``MessageTooLarge`` if the frame would exceed the frame limit; that is
        checked before any work, and nothing changes, so the caller may skip the
        message and seal the next one. Raises ``RuntimeError`` before login.
        """
        if self._send_mac is None or self._cipher is None:
            raise RuntimeError("no session key yet")
        plaintext = message.encoded
        under_session_key = self._sends_under_session_key(message.KIND)
        # RSA-OAEP output is exactly the modulus size, so the frame size is known up front.
        wrapped_key_size = 0 if under_session_key else self._wrapped_key_size
        check_outgoing_size(sealed_frame_size(wrapped_key_size, len(plaintext)))
        seq = self.send_seq
        aad = associated_data(message.KIND, seq, *self._labels(outgoing=True, kind=message.KIND))
        if under_session_key:
            wrapped = b""
            nonce, ciphertext = self._cipher.seal(plaintext, aad)
        else:
            wrapped, nonce, ciphertext = self._sealer.seal(plaintext, aad)
        mac_input = envelope_mac_input(message.KIND, seq, wrapped, nonce, ciphertext)
        mac = self._send_mac.digest(mac_input)
        frame = encode_sealed_frame(mac_input, mac)
        # Only once the frame exists: a refused message must not leave a gap in the sequence.
        self.send_seq = seq + 1
        return frame

    def open(self, body: bytes) -> Message:
        """Authenticate and decrypt a sealed frame body.

        Raises ``ProtocolError`` (including ``SequenceError``) for anything the
        peer got wrong, and ``CryptoError`` for anything that fails to verify.
        """
        envelope = Envelope.decode(body)
        if envelope.kind not in self.allowed_incoming:
            raise ProtocolError(f"{envelope.kind.name} is not allowed from this peer")
        if envelope.seq != self.recv_seq:
            raise SequenceError(
                f"sequence number {envelope.seq}, expected {self.recv_seq}: replayed or reordered frame"
            )
        first_message = envelope.kind in (Kind.LOGIN, Kind.RESUME)
        if first_message != (self.session_key is None):
            raise ProtocolError(f"{envelope.kind.name} is not allowed now")
        aad = associated_data(envelope.kind, envelope.seq, *self._labels(outgoing=False, kind=envelope.kind))
        if first_message or not self.is_server:
            # Check the MAC before any RSA work when we can: forged frames cost a hash.
            if not first_message:
                self._check_mac(envelope, self.session_key)
            plaintext = self._opener.open(envelope.wrapped_key, envelope.nonce, envelope.ciphertext, aad)
        else:
            if envelope.wrapped_key:
                raise ProtocolError("a frame after login must be sealed under the session key")
            self._check_mac(envelope, self.session_key)
            assert self._cipher is not None  # set with the session key, which this branch requires
            plaintext = self._cipher.open(envelope.nonce, envelope.ciphertext, aad)
        message = decode_message(envelope.kind, plaintext)
        if first_message:
            assert isinstance(message, Login | Resume)
            session_key = b64decode(message.session_key, "session_key")
            if len(session_key) != crypto_utils.SESSION_KEY_SIZE:
                raise ProtocolError("session key has the wrong size")
            self._check_mac(envelope, session_key)
            self.session_key = session_key
        self.recv_seq += 1
        return message

    def _sends_under_session_key(self, kind: Kind) -> bool:
        """Client frames after the login are sealed under the session key instead of RSA."""
        return not self.is_server and kind not in (Kind.LOGIN, Kind.RESUME)

    def _check_mac(self, envelope: Envelope, session_key: bytes | None) -> None:
        assert session_key is not None
        if session_key is self._session_key and self._recv_mac is not None:
            expected = self._recv_mac.digest(envelope.mac_input())  # the keyed state, derived once
        else:  # the login's own frame, whose key it carries
            expected = crypto_utils.session_mac(session_key, self._recv_direction, envelope.mac_input())
        if not crypto_utils.macs_equal(expected, envelope.mac):
            raise CryptoError("frame MAC does not verify: not from this session")


# --------------------------------------------------------------------------- socket I/O


class Deadline:
    """One monotonic deadline spread over the several reads of a handshake."""

    def __init__(self, seconds: float) -> None:
        self.expires = time.monotonic() + seconds

    def timeout(self) -> float:
        """Seconds left; raises ``TimeoutError`` when none are."""
        left = self.expires - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left


def recv_exact(sock: socket.socket, size: int, deadline: Deadline | None = None) -> bytes:
    """Read exactly ``size`` bytes; raises ``ConnectionClosed`` on end of stream.

    With a ``deadline``, every read gets only the time left, so a peer dripping
    one byte at a time cannot stretch the handshake (raises ``TimeoutError``).
    """
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        if deadline is not None:
            sock.settimeout(deadline.timeout())
        try:
            count = sock.recv_into(view[received:])
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionClosed("connection reset by peer") from exc
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise ConnectionClosed(f"connection error: {exc.strerror or exc}") from exc
        if count == 0:
            if received:
                raise ConnectionClosed("connection closed in the middle of a frame")
            raise ConnectionClosed("connection closed by peer")
        received += count
    return bytes(buffer)


def read_frame(
    sock: socket.socket, max_frame_size: int = MAX_FRAME_SIZE, deadline: Deadline | None = None
) -> tuple[FrameType, bytes]:
    """Read one frame. The length prefix is checked before the body is allocated."""
    size = int.from_bytes(recv_exact(sock, 4, deadline), "big")
    check_frame_size(size, max_frame_size)
    return split_payload(recv_exact(sock, size, deadline))
