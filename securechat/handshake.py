"""The server's side of the handshake, without the socket: a hello in, a server_hello out; a login in.

Whoever owns the socket reads each frame and hands it here (``receive_hello``, then
``receive_login``), and sends what comes back. Everything a peer could get wrong
raises ``ProtocolError`` or ``CryptoError`` (``VersionMismatch`` for another protocol
version), so the whole exchange can be tested by feeding it frames. The client's side
is ``ChatClient``'s ``hello_frame``, ``accept_server_hello``, ``login_frame`` and
``accept_welcome``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from securechat import crypto_utils
from securechat.channel import SecureChannel
from securechat.crypto_utils import PrivateKey, PublicKey
from securechat.protocol import (
    CLIENT_KINDS,
    HANDSHAKE_NONCE_SIZE,
    PROTOCOL_VERSION,
    FrameType,
    Hello,
    Login,
    ProtocolError,
    Resume,
    ServerHello,
    b64decode,
    client_auth_signed_data,
    decode_control_message,
    server_hello_digest,
)

#: Signs one hello's digest: returns the batch of digests signed (holding it) and the signature.
HelloSigning = Callable[[bytes], tuple[bytes, bytes]]


class ServerHandshake:
    """One connection's handshake as the server runs it: its nonce, the client's key, the channel."""

    def __init__(self, private_key: PrivateKey, public_key_der: bytes, sign_hello: HelloSigning) -> None:
        self._private_key = private_key
        self._public_key_der = public_key_der
        self._sign_hello = sign_hello
        self._nonce = b""
        #: The client's key, its RFC 7638 thumbprint (what its tokens are bound to), and the
        #: channel sealed for it: set by ``receive_hello``.
        self.client_key: PublicKey | None = None
        self.key_thumbprint = ""
        self.channel: SecureChannel | None = None

    def receive_hello(self, frame_type: FrameType, body: bytes) -> bytes:
        """Take the client's hello; returns the server_hello frame to send (signed, perhaps in a batch)."""
        if frame_type is not FrameType.CONTROL:
            raise ProtocolError("expected hello")
        hello = decode_control_message(body)
        if not isinstance(hello, Hello):
            raise ProtocolError("expected hello")
        if len(hello.nonce) != HANDSHAKE_NONCE_SIZE:
            raise ProtocolError("hello nonce has the wrong size")
        client_key = crypto_utils.load_public_key(hello.client_key)
        self.client_key = client_key
        self.key_thumbprint = crypto_utils.jwk_thumbprint(client_key)
        self._nonce = secrets.token_bytes(HANDSHAKE_NONCE_SIZE)
        batch, signature = self._sign_hello(server_hello_digest(self._nonce, hello.nonce, hello.client_key))
        self.channel = SecureChannel(self._private_key, client_key, is_server=True, allowed_incoming=CLIENT_KINDS)
        return ServerHello(
            version=PROTOCOL_VERSION,
            server_key=self._public_key_der,
            nonce=self._nonce,
            batch=batch,
            signature=signature,
        ).encode()

    def receive_login(self, frame_type: FrameType, body: bytes) -> Login | Resume:
        """Take the sealed login or resume; returns it once it is proven to come from the hello's key.

        Whether its password or token is good is the caller's business.
        """
        if self.channel is None or self.client_key is None:
            raise ProtocolError("login before hello")
        if frame_type is not FrameType.SEALED:
            raise ProtocolError("expected login")
        request = self.channel.open(body)
        if not isinstance(request, Login | Resume):
            raise ProtocolError("expected login")
        # The login is bound to this connection: a relayed or replayed one fails here.
        if not secrets.compare_digest(b64decode(request.server_nonce, "server_nonce"), self._nonce):
            raise ProtocolError("login is not for this connection (nonce)")
        if request.client_key_fingerprint != crypto_utils.fingerprint(self.client_key):
            raise ProtocolError("login is bound to another client key")
        # Whoever sent the hello key must hold its private half: a stolen token plus the
        # victim's public key must not be enough to resume the victim's session.
        crypto_utils.verify_signature(
            self.client_key,
            b64decode(request.client_signature, "client_signature"),
            client_auth_signed_data(request.KIND, self._nonce, self._public_key_der),
        )
        return request
