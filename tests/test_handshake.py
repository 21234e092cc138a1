"""Both sides of the handshake without a socket: the client's steps and ServerHandshake fed each other's frames."""

from __future__ import annotations

import pytest

from securechat import crypto_utils
from securechat.client import ChatClient, HostKeyError
from securechat.handshake import ServerHandshake
from securechat.protocol import (
    ControlError,
    FrameType,
    Hello,
    Login,
    ProtocolError,
    VersionMismatch,
    decode_control_message,
    server_hello_signed_data,
    split_payload,
)

SERVER_KEY = crypto_utils.generate_private_key()
SERVER_KEY_DER = crypto_utils.public_key_bytes(SERVER_KEY.public_key())


def payload(frame: bytes) -> tuple[FrameType, bytes]:
    """A frame as read off the wire: its type and body."""
    return split_payload(frame[4:])


def sign_alone(digest: bytes) -> tuple[bytes, bytes]:
    return digest, crypto_utils.sign(SERVER_KEY, server_hello_signed_data(digest))


def new_client() -> ChatClient:
    return ChatClient(server_fingerprint=crypto_utils.fingerprint(SERVER_KEY.public_key()))


def test_a_client_and_the_server_handshake_through_frames_alone():
    client, server = new_client(), ServerHandshake(SERVER_KEY, SERVER_KEY_DER, sign_alone)
    server_hello = server.receive_hello(*payload(client.hello_frame()))
    client.accept_server_hello(*payload(server_hello))
    login = server.receive_login(*payload(client.login_frame(client.login_builder("alice", "secret words"))))
    assert isinstance(login, Login) and (login.username, login.password) == ("alice", "secret words")
    assert server.key_thumbprint == crypto_utils.jwk_thumbprint(client.private_key.public_key())


def test_a_login_made_for_another_connection_is_refused():
    client = new_client()
    first, second = (ServerHandshake(SERVER_KEY, SERVER_KEY_DER, sign_alone) for _ in range(2))
    hello = client.hello_frame()
    client.accept_server_hello(*payload(first.receive_hello(*payload(hello))))
    second.receive_hello(*payload(hello))  # the same hello replayed to another connection
    with pytest.raises(ProtocolError, match="nonce"):
        second.receive_login(*payload(client.login_frame(client.login_builder("alice", "secret words"))))


def test_a_login_before_the_hello_and_a_hello_of_another_version_are_refused():
    server = ServerHandshake(SERVER_KEY, SERVER_KEY_DER, sign_alone)
    with pytest.raises(ProtocolError, match="before hello"):
        server.receive_login(FrameType.SEALED, b"\x00" * 80)
    old = Hello(version=3, client_key=b"k", nonce=b"n" * 32).encode()
    with pytest.raises(VersionMismatch, match="version 3"):
        server.receive_hello(*payload(old))


def test_a_server_hello_signed_by_another_key_is_refused_by_the_client():
    client = new_client()
    impostor_key = crypto_utils.generate_private_key()
    impostor = ServerHandshake(
        impostor_key,
        crypto_utils.public_key_bytes(impostor_key.public_key()),
        lambda digest: (digest, crypto_utils.sign(impostor_key, server_hello_signed_data(digest))),
    )
    with pytest.raises(HostKeyError):
        client.accept_server_hello(*payload(impostor.receive_hello(*payload(client.hello_frame()))))


def test_control_messages_are_typed_and_checked_at_the_edge():
    refusal = decode_control_message(payload(ControlError(code="busy", message="try \x1b[2J later").encode())[1])
    assert refusal == ControlError(code="busy", message="try \ufffd[2J later")  # made safe to show
    with pytest.raises(ProtocolError, match="nonce"):
        decode_control_message(b'{"type":"hello","version":5,"client_key":"AA==","nonce":"not base64!"}')
    with pytest.raises(ProtocolError, match="unknown control message"):
        decode_control_message(b'{"type":"teleport"}')
