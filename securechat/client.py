"""The chat client library: ``ChatClient``, which the command-line program (``ui.py``) drives.

    python client.py --user alice            # interactive, on a terminal
    CHAT_PASSWORD=... python client.py --user bot < lines.txt   # non-interactive

A bot: README.md's "Scripts and bots" has one (an echo bot, run by tests/test_readme.py), and
says what ``ChatClient`` offers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import random
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from securechat import crypto_utils
from securechat.channel import ConnectionClosed, Deadline, SecureChannel, read_frame
from securechat.crypto_utils import CryptoError, PrivateKey, PublicKey
from securechat.group_writer import GroupWriter
from securechat.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    HANDSHAKE_NONCE_SIZE,
    MAX_DEVICE_TOKEN_CHARS,
    MAX_FRAME_SIZE,
    MAX_SEEN_ROOMS,
    MAX_TEXT_BYTES,
    PROTOCOL_VERSION,
    SERVER_KINDS,
    Batch,
    Chat,
    Command,
    ControlError,
    Envelope,
    ErrorReply,
    FrameType,
    Goodbye,
    Hello,
    History,
    Joined,
    Kind,
    Leave,
    Login,
    Message,
    Notice,
    Ping,
    Pong,
    Private,
    ProtocolError,
    Resume,
    Room,
    RoomList,
    Roster,
    Say,
    ServerHello,
    Sessions,
    TokenRefresh,
    VersionMismatch,
    Welcome,
    Who,
    address_text,
    b64encode,
    client_auth_signed_data,
    decode_control_message,
    hello_batch_digests,
    normalize_room,
    sanitize_text,
    server_hello_digest,
    server_hello_signed_data,
)
from securechat.ratelimit import FloodControl

__all__ = [
    "Chat",
    "ChatClient",
    "ChatError",
    "Disconnected",
    "ErrorReply",
    "Goodbye",
    "History",
    "HostKeyError",
    "KnownHosts",
    "LoginRefused",
    "MessageRefused",
    "Notice",
    "Reconnected",
    "Reconnecting",
    "Room",
    "RoomList",
    "Roster",
    "Sessions",
    "Welcome",
]

#: How long connect + login may take (the server may queue password hashing).
LOGIN_TIMEOUT = 60.0
#: How long the server's answer to our hello may take: the server itself gives a connection 10 s to
#: finish its handshake (it would drop us then), and signs hellos in batches within milliseconds even
#: in a login storm. A port that accepts and says nothing (another program, a wrong --port) is named
#: in 10 s, not after a minute of a blank screen.
HANDSHAKE_TIMEOUT = 10.0
#: The server pings a quiet client every 20 s; hearing nothing this long means the link is dead.
IDLE_TIMEOUT = 75.0
#: How long leave() waits for the server's goodbye.
LEAVE_TIMEOUT = 5.0


PONG_FRAME = Pong().encode()

#: Reconnection back-off: the first wait, doubled after each failure up to the longest.
RECONNECT_FIRST_DELAY = 1.0
RECONNECT_MAX_DELAY = 30.0
#: The first wait after the server said it is going down: a restart is usually quick.
RECONNECT_RESTART_DELAY = 0.3
#: Each wait is the delay times a random factor within this much of 1, so that the clients a
#: restart sent away together do not all come back in the same instant.
RECONNECT_JITTER = 0.25
#: Refusals that mean "not now" (the server is full, busy, or briefly cannot check us): keep backing off.
RETRYABLE_CODES = ("server_full", "too_many_connections", "busy", "rate_limited", "server_error", "timeout")
#: Refusals of a connection that say something of one server only: another node of the service may take it.
NODE_REFUSALS = ("server_full", "too_many_connections")

#: Refusal codes meaning the token itself is no good: only a password can log in again.
TOKEN_CODES = ("token_expired", "token_revoked", "token_invalid", "token_wrong_key", "token_missing")
#: The account was deleted: no token or password can bring the session back.
ACCOUNT_DELETED = "account_deleted"


class ChatError(Exception):
    """Something the user should read, in one line."""


class MessageRefused(ChatError):
    """This one message cannot be sent (too long, not valid text); the connection is fine."""


class HostKeyError(ChatError):
    """The server's key is unknown (and not accepted) or has changed."""


class LoginRefused(ChatError):
    """The server refused the login or the token; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Unreachable(ChatError):
    """A server that could not be connected to at all (its reason, without its address)."""


@dataclass(frozen=True)
class Disconnected:
    """Local event: the connection ended. ``reason`` is for the user."""

    reason: str
    #: True when the session ended for good (we left, or the server said not to come back);
    #: False when the link was lost or the server is restarting: worth reconnecting.
    clean: bool = False
    #: True when the server said it was going down and to come back: it may be back at once.
    restarting: bool = False
    #: True when the server ended the session itself (its token is revoked: a password changed, a
    #: /logout): only a new login gets back in, so there is nothing to resume.
    needs_login: bool = False


@dataclass(frozen=True)
class Reconnecting:
    """Local event (with ``reconnect=True``): the link was lost, and the client is getting it back by itself."""

    reason: str


@dataclass(frozen=True)
class Reconnected:
    """Local event: the session goes on over a new connection (what was missed follows, as history)."""


Event = (
    Chat
    | Notice
    | Roster
    | Room
    | RoomList
    | History
    | Sessions
    | ErrorReply
    | Goodbye
    | Reconnecting
    | Reconnected
    | Disconnected
)

#: Events a client keeps while nobody reads them; past this the oldest is dropped and counted
#: (see ``ChatClient.dropped_events``): a bot that only speaks must not grow without bound.
MAX_QUEUED_EVENTS = 10_000
#: Refused lines (and joins) kept for the front end to ask about (``refused_text``, ``refused_join``).
MAX_REFUSED_KEPT = 100
#: How many private lines' ids a client keeps, to show none twice.
MAX_PRIVATES_KEPT = 2000


def _shown(value: object, limit: int = 300) -> str:
    """Text from the server made safe for a terminal, for our own error messages and reasons."""
    return sanitize_text(str(value))[:limit]


def frame_writer(sock: socket.socket) -> GroupWriter[bytes]:
    """What sends ``sock``'s frames: those that pile up while a send is under way go in one ``sendall``."""
    return GroupWriter(lambda frames: sock.sendall(b"".join(frames)))


def _check_length(text: str) -> None:
    """Refuse before sending what the server would refuse for its size."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise MessageRefused("not sent: the text is not valid Unicode") from None
    if size > MAX_TEXT_BYTES:
        raise MessageRefused(f"not sent: message longer than {MAX_TEXT_BYTES} bytes")


def default_known_hosts_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "chat" / "known_hosts"


Key = TypeVar("Key")
Kept = TypeVar("Kept")


def _remember(kept: dict[Key, Kept], key: Key, value: Kept, most: int = MAX_REFUSED_KEPT) -> None:
    """Keep ``value`` under ``key``, and at most ``most`` entries: the oldest go (nobody asked)."""
    kept.pop(key, None)
    kept[key] = value
    if len(kept) > most:
        del kept[next(iter(kept))]


class KnownHosts:
    """Trust-on-first-use pins, one ``[host]:port SHA256:...`` line per server, as OpenSSH keeps.

    A file that others can write is refused: they could pin their own key for a
    server. Every failure to read or write the file is a one-line ``ChatError``.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_known_hosts_path()

    @staticmethod
    def host_id(host: str, port: int) -> str:
        return f"[{host}]:{port}"

    def _check_permissions(self, fd: int) -> None:
        try:
            crypto_utils.check_not_writable_by_others(self.path, os.fstat(fd))
        except crypto_utils.InsecureFileError as exc:
            raise ChatError(str(exc)) from None

    def lookup(self, host_id: str) -> tuple[str, int] | None:
        """The pinned fingerprint and its line number, or None if this server is new."""
        try:
            with open(self.path, "rb") as handle:
                self._check_permissions(handle.fileno())
                content = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ChatError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
            parts = line.split()
            if len(parts) >= 2 and parts[0] == host_id:
                return parts[1], number
        return None

    def add(self, host_id: str, fingerprint: str) -> None:
        """Pin ``fingerprint`` for ``host_id``, creating the file (0600) and its directory (0700) if need be."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as handle:
                self._check_permissions(handle.fileno())
                handle.write(f"{host_id} {fingerprint}\n".encode())
        except OSError as exc:
            raise ChatError(f"cannot save the server's key in {self.path}: {exc.strerror or exc}") from None


class DeviceTokens:
    """The device tokens this device was given, one file per server and account, in ``directory``.

    A password login sends the one it has for that server and user: a server that gave it
    lets the login skip the delay that failed logins from elsewhere put on the account (not
    the delay on our own address). The directory is made 0700 and each file 0600, replaced
    whole; a token that cannot be read or saved, or that others could read or write, is not
    used: the login goes on, throttled as any other.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, host_id: str, username: str) -> Path:
        # In any case: a login typed as "Alice" is alice's, whose welcome the token was saved from.
        return self.directory / hashlib.sha256(f"{host_id} {username.casefold()}".encode()).hexdigest()[:32]

    def lookup(self, host_id: str, username: str) -> str:
        """The token saved for ``username`` at ``host_id``, or "" if there is none (or none to trust)."""
        try:
            with open(self._path(host_id, username), "rb") as handle:
                info = os.fstat(handle.fileno())
                if info.st_mode & 0o077 or info.st_uid != os.getuid() or not self._private_directory():
                    return ""
                token = handle.read(MAX_DEVICE_TOKEN_CHARS + 1)
        except OSError:
            return ""
        if not token.isascii() or len(token) > MAX_DEVICE_TOKEN_CHARS:
            return ""
        return token.decode("ascii").strip()

    def _private_directory(self) -> bool:
        """Whether the directory is ours and nobody else may write in it: in a shared folder (``--known-hosts
        /tmp/x`` puts it in /tmp/device_tokens), another user could swap the files in it."""
        try:
            info = os.lstat(self.directory)
        except OSError:
            return False
        return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022

    def save(self, host_id: str, username: str, token: str) -> bool:
        """Keep ``token`` for ``username`` at ``host_id`` (in place of any before); False if it could not be."""
        if not token.isascii() or len(token) > MAX_DEVICE_TOKEN_CHARS:
            return False
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._private_directory():
                return False
            # mkstemp makes the file 0600; the rename puts it in place whole.
            fd, temp_name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(token.encode("ascii"))
                os.replace(temp_name, self._path(host_id, username))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp_name)
                raise
        except OSError:
            return False
        return True


class ChatClient:
    """One connection to a chat server.

    ``connect()`` checks the server's identity, ``login()`` (or ``resume()``)
    authenticates, then ``say()``, ``private()``, ``who()`` send and
    ``events()`` yields what arrives: ``Chat``, ``Notice``, ``Roster``,
    ``ErrorReply``, ``Goodbye`` and finally ``Disconnected``. ``close()`` (or leaving the
    ``with`` block) ends the connection; ``leave()`` says goodbye first.

    The server's key is checked against ``known_hosts`` (OpenSSH-style
    trust on first use) or against ``server_fingerprint`` if given. A new key
    is accepted when ``accept_new_host_key`` is true or ``confirm_host_key``
    (called with host id and fingerprint) returns true; a changed key always
    raises ``HostKeyError``. The device tokens password logins are given are
    kept in ``device_tokens`` and sent with the next password login; by default
    in a ``device_tokens`` directory beside the known_hosts file, or nowhere for
    a client given ``server_fingerprint`` (it uses no file of its own).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        known_hosts: KnownHosts | None = None,
        server_fingerprint: str | None = None,
        accept_new_host_key: bool = False,
        confirm_host_key: Callable[[str, str], bool] | None = None,
        private_key: PrivateKey | None = None,
        key_size: int = crypto_utils.DEFAULT_KEY_SIZE,
        timeout: float = LOGIN_TIMEOUT,
        pace: bool = True,
        pace_limit: float | None = None,
        device: str = "",
        source_address: tuple[str, int] | None = None,
        reconnect: bool = False,
        other_servers: Sequence[tuple[str, int]] = (),
        device_tokens: DeviceTokens | None = None,
    ) -> None:
        self.host = host
        self.port = port
        #: The nodes of one chat service, tried in turn (from the one that last worked) when one
        #: cannot be reached. They share one server key: it is pinned under the first one's name.
        self.servers: list[tuple[str, int]] = [(host, port), *other_servers]
        self.known_hosts = known_hosts if known_hosts is not None else KnownHosts()
        if device_tokens is None and server_fingerprint is None:
            device_tokens = DeviceTokens(self.known_hosts.path.with_name("device_tokens"))
        self.device_tokens = device_tokens
        self.expected_fingerprint = server_fingerprint
        self.accept_new_host_key = accept_new_host_key
        self.confirm_host_key = confirm_host_key
        # Kept across reconnections: the token is bound to this key.
        self.private_key = private_key or crypto_utils.generate_private_key(key_size)
        self.public_key_der = crypto_utils.public_key_bytes(self.private_key.public_key())
        self.timeout = timeout
        self.pace = pace
        #: The longest a line waits to keep below the server's flood limit (None: as long as it takes);
        #: one that would wait longer is refused (``MessageRefused``) rather than hold up the caller.
        self.pace_limit = pace_limit
        #: The local address to connect from (a machine with several), or None for any.
        self.source_address = source_address
        #: Get a lost link back by itself (``Reconnecting``, then ``Reconnected``), as the terminal
        #: client does: ``events()`` then ends only when the session is over, or on ``close()``.
        self.reconnect = reconnect
        # Set by close(): a reconnection under way gives up (connect() never clears it).
        self._stop_reconnecting = threading.Event()
        self.server_fingerprint = ""
        self.username = ""
        #: The rooms this session is in, in the order it entered them, each with who is there.
        self.rooms: dict[str, list[str]] = {}
        #: Where ``say()`` goes when no room is named: the first room, or the last one joined.
        self.active_room = ""
        #: The newest message id seen, and each room's last sequence number seen: sent at login and
        #: resume, so that the server sends exactly what this device missed.
        self.last_id = 0
        self.seen: dict[str, int] = {}
        #: Rooms this device was told it left. Their ``seen`` is still sent (a room rejoined on another
        #: device then catches up exactly), and a resume tells again of each as left while away: once is news.
        self._told_left: set[str] = set()
        self.away_since = 0.0
        #: This device's /away message ("" for none given) while it is away, else None: the server
        #: keeps it with the session, and a resumed session is a new one, so it is said again.
        self.away: str | None = None
        #: This device's label in /sessions.
        self.device = device
        #: The session's short id (as /sessions shows it) and how many devices the account has.
        self.session = ""
        #: Lines sent and not yet accepted: ref -> (room or "@recipient", text). The server's echo
        #: (or refusal) carries the ref back and removes it.
        self.pending: dict[str, tuple[str, str]] = {}
        #: The text of the last lines the server refused, by ref, for ``refused_text``.
        self._refused: dict[str, str] = {}
        #: The ids of the private lines shown lately (the reader's): a catch-up may send one again.
        #: And how many of the catch-up now coming in were dropped so (its HISTORY counts them).
        self._privates_seen: dict[int, None] = {}
        self._private_repeats = 0
        #: Joins not yet answered: ref -> (the room, the room lines went to before it).
        self._joining: dict[str, tuple[str, str]] = {}
        #: Joins refused, by ref, for ``refused_join``; and the room lines went to before each join.
        self._refused_joins: dict[str, tuple[str, str]] = {}
        self._came_from: dict[str, str] = {}
        #: Guards pending, _refused, _joining, _refused_joins, _came_from and _next_ref (the sender's
        #: thread adds, the reader removes).
        self.pending_lock = threading.Lock()
        self._next_ref = 0
        #: Events dropped because nobody read them (the queue holds MAX_QUEUED_EVENTS).
        self.dropped_events = 0
        self.token = ""
        self.token_expires_at = 0
        self.sock: socket.socket | None = None
        # Sends sock's frames in the order they were queued, with no lock held over a send.
        self._frames: GroupWriter[bytes] | None = None
        self.channel: SecureChannel | None = None
        self._client_nonce = b""
        self._server_nonce = b""
        self._server_key: PublicKey | None = None
        self._server_key_der = b""
        # Guards which session lines go out on (_session_ready, the token it goes with, sock,
        # _frames) and the outgoing sequence numbers. Held to seal a frame (AES-GCM, cheap) and
        # queue it in order; never over a send or RSA work.
        self.send_lock = threading.Lock()
        # True from a welcome until the connection is closed or replaced: lines may be sent.
        self._session_ready = False
        # Owned by the caller's thread (the one that sends).
        self._flood: FloodControl | None = None
        self._events: queue.Queue[Event] = queue.Queue(MAX_QUEUED_EVENTS)
        # Roster pages received so far, per room (owned by the reader thread).
        self._roster_pages: dict[str, list[str]] = {}
        self._reader: threading.Thread | None = None
        self._closing = threading.Event()

    # ------------------------------------------------------------------ connection

    def connect(self) -> None:
        """Open the connection, send our key and verify the server's identity.

        The servers are tried in turn, from the one that last answered: one that cannot be reached,
        or that drops the connection or says nothing before its hello (a node shutting down, a
        balancer with no node behind it), is passed over for the next. One that answers with the
        wrong key, or refuses us, is not: that answer stands.
        """
        with self.send_lock:
            self._session_ready = False  # until the welcome of the session this connection opens
        start = next((index for index, server in enumerate(self.servers) if server == (self.host, self.port)), 0)
        failures: list[str] = []
        for offset in range(len(self.servers)):
            host, port = self.servers[(start + offset) % len(self.servers)]
            try:
                self._shake_hands(host, port)
                return
            except LoginRefused as exc:
                # A node that is full, or has our address's share of connections, speaks for itself only.
                if exc.code not in NODE_REFUSALS or len(self.servers) == 1:
                    raise
                failures.append(f"{address_text(host, port)}: {exc}")
            except HostKeyError:
                raise
            except ChatError as exc:
                if isinstance(exc, _Unreachable):
                    failures.append(f"cannot reach the server at {address_text(host, port)}: {exc}")
                else:
                    failures.append(str(exc))  # (it names the server)
        if len(failures) == 1:
            raise ChatError(failures[0])
        raise ChatError("cannot reach any of the servers (" + "; ".join(failures) + ")")

    def _shake_hands(self, host: str, port: int) -> None:
        """Connect to one server and check its hello; ``ChatError`` (the connection closed) if not."""
        self._closing.clear()  # (a server tried before this one set it, as it was closed)
        deadline = Deadline(min(self.timeout, HANDSHAKE_TIMEOUT))
        try:
            # A host name with several addresses is tried address by address (create_connection).
            self.sock = socket.create_connection(
                (host, port), timeout=deadline.timeout(), source_address=self.source_address
            )
        except OSError as exc:
            raise _Unreachable(exc.strerror or str(exc)) from None
        # What the key is checked as (accept_server_hello), and the server tried first next time once it
        # has answered: one that dropped us is not.
        answered = (self.host, self.port)
        self.host, self.port = host, port
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._frames = frame_writer(self.sock)
        where = address_text(host, port)
        try:
            try:
                self.sock.sendall(self.hello_frame())
                answer = read_frame(self.sock, MAX_FRAME_SIZE, deadline)
            except TimeoutError:
                raise ChatError(f"{where}: the server did not answer in time (is it the chat server?)") from None
            except ConnectionClosed as exc:
                raise ChatError(f"{where}: the server closed the connection ({exc})") from None
            except OSError as exc:  # the connection was reset at once
                raise ChatError(f"{where}: the server closed the connection ({exc.strerror or exc})") from None
            try:
                self.accept_server_hello(*answer)
            except (ProtocolError, CryptoError) as exc:
                raise ChatError(f"bad handshake from the server: {exc}") from None
        except BaseException:
            self._reset_connection()
            self.host, self.port = answered
            raise

    # The handshake's steps without the socket: connect() and _authenticate() run them over
    # a blocking socket, and an event-driven caller (the benchmarks' load generator) can
    # run them over its own. Each step raises; whoever owns the socket closes it.

    def hello_frame(self) -> bytes:
        """Our first frame: our public key and a fresh nonce the server must sign."""
        self._client_nonce = os.urandom(HANDSHAKE_NONCE_SIZE)
        return Hello(version=PROTOCOL_VERSION, client_key=self.public_key_der, nonce=self._client_nonce).encode()

    def accept_server_hello(self, frame_type: FrameType, body: bytes) -> None:
        """Check the server's answer to our hello and, if it proves a trusted key, set up the channel.

        Raises ``ProtocolError`` or ``CryptoError`` if the answer is malformed,
        ``LoginRefused`` if the server refused us, ``HostKeyError`` if it is not who it
        should be, ``ChatError`` otherwise.
        """
        if frame_type is not FrameType.CONTROL:
            raise ChatError("the server sent something unexpected during the handshake")
        try:
            reply = decode_control_message(body)
        except VersionMismatch:
            raise ChatError("the server speaks another protocol version") from None
        if isinstance(reply, ControlError):
            raise LoginRefused(_shown(reply.code), f"server refused: {_shown(reply.message)}")
        if not isinstance(reply, ServerHello):
            raise ChatError("the server sent something unexpected during the handshake")
        server_key_der, nonce, batch, signature = reply.server_key, reply.nonce, reply.batch, reply.signature
        server_key = crypto_utils.load_public_key(server_key_der)
        if len(nonce) != HANDSHAKE_NONCE_SIZE:
            raise ProtocolError("server_hello nonce has the wrong size")
        fingerprint = crypto_utils.fingerprint(server_key)
        # First that the peer holds the key it shows (it signed a batch of hello digests
        # holding ours, which covers our fresh nonce, so a recording cannot pass), and only
        # then whether that key is trusted: nothing is pinned for a peer that cannot prove anything.
        ours = server_hello_digest(nonce, self._client_nonce, self.public_key_der)
        try:
            if ours not in hello_batch_digests(batch):
                raise CryptoError("our hello is not in the signed batch")
            crypto_utils.verify_signature(server_key, signature, server_hello_signed_data(batch))
        except CryptoError:
            raise HostKeyError("the server failed to prove it holds its key: possible impostor") from None
        self._check_host_key(fingerprint)
        self.server_fingerprint = fingerprint
        self._server_key = server_key
        self._server_key_der = server_key_der
        self._server_nonce = nonce
        self.channel = SecureChannel(self.private_key, server_key, is_server=False, allowed_incoming=SERVER_KINDS)

    def _check_host_key(self, fingerprint: str) -> None:
        host_id = KnownHosts.host_id(*self.servers[0])  # every node of the service shows one key
        # Said so when the node that answered is not the one the service is named after.
        shown = (
            host_id
            if (self.host, self.port) == self.servers[0]
            else f"{host_id} (answered by {address_text(self.host, self.port)})"
        )
        if self.expected_fingerprint is not None:
            if fingerprint != self.expected_fingerprint:
                raise HostKeyError(f"server key {fingerprint} is not the expected {self.expected_fingerprint}")
            return
        if self.server_fingerprint:
            # A reconnection: the service already proved its key to this client, which needs no file (nor a
            # question asked from the reader's thread, behind the chat prompt) to know it again.
            if fingerprint != self.server_fingerprint:
                raise HostKeyError(
                    f"WARNING: THE SERVER KEY FOR {shown} CHANGED DURING THIS SESSION ({fingerprint}, expected "
                    f"{self.server_fingerprint}). Someone may be intercepting the connection"
                )
            return
        pinned = self.known_hosts.lookup(host_id)
        if pinned is not None:
            known, line = pinned
            if known != fingerprint:
                raise HostKeyError(
                    f"WARNING: THE SERVER KEY FOR {shown} HAS CHANGED ({fingerprint}, "
                    f"expected {known}). Someone may be intercepting the connection. If the "
                    f"server's key really changed, remove line {line} of {self.known_hosts.path}"
                )
            return
        accepted = self.accept_new_host_key or (
            self.confirm_host_key is not None and self.confirm_host_key(shown, fingerprint)
        )
        if not accepted:
            # Asked and answered "no", the user needs no advice to be asked: only a script, never asked, does.
            advice = (
                "connect again and answer yes once it is checked"
                if self.confirm_host_key is not None
                else "connect on a terminal or pass --accept-new-host-key"
            )
            raise HostKeyError(
                f"unknown server key for {shown} ({fingerprint}); check it with the operator, then {advice}"
            )
        self.known_hosts.add(host_id, fingerprint)

    def _read(self, deadline: Deadline | None = None) -> tuple[FrameType, bytes]:
        assert self.sock is not None
        try:
            # Every read gets only the time left: a server dripping a byte at a time cannot stretch it.
            return read_frame(self.sock, MAX_FRAME_SIZE, deadline)
        except ConnectionClosed as exc:
            raise ChatError(f"the server closed the connection ({exc})") from None
        except TimeoutError:
            raise ChatError("the server did not answer in time") from None

    def login(self, username: str, password: str) -> Welcome:
        """Log in with a password. Raises ``LoginRefused`` with the server's reason."""
        self._stop_reconnecting.clear()  # a new session: an earlier close() no longer holds
        if self.channel is None:
            self.connect()
        return self._authenticate(username, self.login_builder(username, password))

    def login_builder(self, username: str, password: str) -> Callable[[str], Message]:
        """What ``login_frame`` seals for a password login, given the session key (base64)."""
        host_id = KnownHosts.host_id(*self.servers[0])  # the service's name, whichever node answers
        device_token = self.device_tokens.lookup(host_id, username) if self.device_tokens is not None else ""
        return lambda session_key: Login(
            username=username,
            password=password,
            server_nonce=b64encode(self._server_nonce),
            client_key_fingerprint=crypto_utils.fingerprint(self.private_key.public_key()),
            session_key=session_key,
            client_signature=self._auth_signature(Kind.LOGIN),
            since=self.last_id,
            seen=self._seen_to_send(),
            device=self.device,
            device_token=device_token,
        )

    def _seen_to_send(self) -> dict[str, int]:
        """What this device has seen of each room, as a login sends it (its rooms first, then others)."""
        rooms = [room for room in self.rooms if room in self.seen]
        rooms += [room for room in self.seen if room not in self.rooms]
        return {room: self.seen[room] for room in rooms[:MAX_SEEN_ROOMS]}

    def _auth_signature(self, kind: Kind) -> str:
        """Our key's proof, for this connection only, that it is us logging in."""
        signed = client_auth_signed_data(kind, self._server_nonce, self._server_key_der)
        return b64encode(crypto_utils.sign(self.private_key, signed))

    def resume(self) -> Welcome:
        """Log in again with the token from the last session (same key pair, no password)."""
        if not self.token:
            raise LoginRefused("token_missing", "no session to resume")
        if self.channel is None:
            self.connect()
        welcome = self._authenticate(
            self.username,
            lambda session_key: Resume(
                token=self.token,
                server_nonce=b64encode(self._server_nonce),
                client_key_fingerprint=crypto_utils.fingerprint(self.private_key.public_key()),
                session_key=session_key,
                client_signature=self._auth_signature(Kind.RESUME),
                since=self.last_id,
                seen=self._seen_to_send(),
                device=self.device,
            ),
        )
        if self.away is not None:
            try:
                self.command("away", *([self.away] if self.away else []))
            except ChatError:
                pass  # the link dropped again: the next resume says it
        return welcome

    def _authenticate(self, username: str, build: Callable[[str], Message]) -> Welcome:
        assert self.channel is not None and self.sock is not None
        try:
            # Signed, sealed (RSA work both) and sent with no lock held: nothing else is sealed
            # or sent on a connection before its welcome.
            frames = self._frames
            assert frames is not None
            frames.flush(frames.put(self.login_frame(build)))
            welcome = self.accept_welcome(username, *self._read(Deadline(self.timeout)))
        except (ProtocolError, CryptoError) as exc:
            self._reset_connection()
            raise ChatError(f"bad reply from the server: {exc}") from None
        except OSError as exc:
            self._reset_connection()
            raise ChatError(f"connection lost while logging in: {exc.strerror or exc}") from None
        except BaseException:
            self._reset_connection()
            raise
        self.sock.settimeout(IDLE_TIMEOUT)
        self._start_reader()
        return welcome

    def _start_reader(self) -> None:
        """Read the logged-in connection on a thread of its own (``_run_reader``).

        The hook for a subclass that reads it some other way (one loop reading many clients).
        """
        self._reader = threading.Thread(target=self._run_reader, name="chat-reader", daemon=True)
        self._reader.start()

    def login_frame(self, build: Callable[[str], Message]) -> bytes:
        """The sealed login (or resume) that ``build`` makes, under a fresh session key.

        It starts the channel's session: nothing else may be sealed or sent on this
        connection until the frame is sent (``say()`` and the others wait for the welcome).
        """
        assert self.channel is not None
        session_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
        self.channel.session_key = session_key
        return self.channel.seal(build(b64encode(session_key)))

    def accept_welcome(self, username: str, frame_type: FrameType, body: bytes) -> Welcome:
        """Take the server's answer to our login: the ``Welcome``, whose session this client now holds.

        Raises ``LoginRefused`` with the server's reason, ``ProtocolError`` or
        ``CryptoError`` if the answer is malformed, ``ChatError`` otherwise.
        """
        assert self.channel is not None
        if frame_type is FrameType.CONTROL:
            reply = decode_control_message(body)
            if not isinstance(reply, ControlError):
                raise ProtocolError("unexpected cleartext frame after login")
            if reply.code in RETRYABLE_CODES:  # "not now": nothing is given up, so nothing to forge
                raise LoginRefused(_shown(reply.code), _shown(reply.message or "refused"))
            # A server that could open our login knows the session key, and seals any refusal; one in
            # clear (a ban, a revoked token) is anyone's on the path: not believed, taken as a failed link.
            raise ChatError(f"the server's answer came unsealed ({_shown(reply.code)}): taken as a failed connection")
        # The server names us in the associated data once it has accepted us.
        kind = Envelope.decode(body).kind
        self.channel.username = username if kind is Kind.WELCOME else ""
        message = self.channel.open(body)
        if isinstance(message, ErrorReply):
            if message.code in TOKEN_CODES or message.code == ACCOUNT_DELETED:
                self.token = ""
            raise LoginRefused(_shown(message.code), _shown(message.message))
        if not isinstance(message, Welcome):
            raise ChatError("the server sent something unexpected after login")
        self.username = message.username
        self.channel.username = message.username
        self.session = message.session
        self._private_repeats = 0  # (the reader is not running: a new session's catch-up is next)
        #: When the account was last online before this login (0: unknown, or another device was on).
        self.away_since = message.away_since
        if message.device_token and self.device_tokens is not None:  # unsaved, the next login is merely throttled
            self.device_tokens.save(KnownHosts.host_id(*self.servers[0]), message.username, message.device_token)
        # Each room follows as a Room message with its roster; until then, its members are unknown.
        self.rooms = {room: self.rooms.get(room, []) for room in message.rooms}
        if self.active_room not in self.rooms:
            self.active_room = message.rooms[0] if message.rooms else ""
        with self.send_lock:
            # The token and "ready" change together: a line sent meanwhile (one waking from
            # flood pacing, say) would otherwise go out on the new session with the old token.
            self.token, self.token_expires_at = message.token, message.expires_at
            self._session_ready = True
        if self.pace and message.flood_rate > 0 and message.flood_burst > 1:
            # A margin below the server's bucket, so network jitter never tips us over.
            self._flood = FloodControl(message.flood_rate * 0.9, message.flood_burst - 1)
        else:
            self._flood = None
        return message

    # ------------------------------------------------------------------ sending

    def _send(self, build: Callable[[str], Message], paced: bool = False) -> None:
        flood = self._flood if paced else None
        wait = flood.delay() if flood is not None else 0.0
        if self.pace_limit is not None and wait > self.pace_limit:
            raise MessageRefused(f"not sent: faster than the server allows; try again in {wait:.0f} s")
        while flood is not None and not flood.allow():
            time.sleep(0.05)
        with self.send_lock:
            frames, channel = self._frames, self.channel
            if not self._session_ready or frames is None or channel is None:
                raise ChatError("not sent: not connected")
            try:
                frame = channel.seal(build(self.token))
            except (ValueError, ProtocolError):  # the sealed frame would exceed the limit
                raise MessageRefused("not sent: message too long") from None
            # Queued in sequence order; sent below, by us or by whoever is sending on this
            # connection. A reconnection replaces ``_frames``: this frame can only go out here.
            queued = frames.put(frame)
        try:
            frames.flush(queued)
        except OSError as exc:
            raise ChatError(f"not sent: connection lost ({exc.strerror or exc})") from None

    @property
    def connected(self) -> bool:
        """True while logged in and the reader has not seen the connection end."""
        reader = self._reader
        return reader is not None and reader.is_alive()

    def _new_ref(self, target: str, text: str) -> str:
        """A label for a line, remembered until the server echoes or refuses it."""
        with self.pending_lock:
            self._next_ref += 1
            ref = f"r{self._next_ref}"
            self.pending[ref] = (target, text)
        return ref

    def _forget_ref(self, ref: str, refused: bool = False) -> tuple[str, str] | None:
        with self.pending_lock:
            line = self.pending.pop(ref, None)
            if refused and line is not None:
                _remember(self._refused, ref, line[1])
            return line

    def refused_text(self, ref: str) -> str | None:
        """The text of the line the server refused under ``ref`` (an ``ErrorReply``'s), once; else None."""
        with self.pending_lock:
            return self._refused.pop(ref, None)

    def _room(self, room: str | None) -> str:
        chosen = room or self.active_room
        if not chosen:
            raise MessageRefused("not sent: you are in no room (/join #room)")
        return chosen

    def say(self, text: str, room: str | None = None, *, action: bool = False) -> str:
        """Send a line to a room (the active room by default); returns its ref.

        The line is sent when this returns, and *accepted* when its echo (a ``Chat``
        carrying the ref) comes back; a refusal is an ``ErrorReply`` carrying it.
        """
        _check_length(text)
        target = self._room(room)
        ref = self._new_ref(target, text)
        try:
            self._send(lambda token: Say(token=token, room=target, text=text, action=action, ref=ref), paced=True)
        except ChatError:
            self._forget_ref(ref)
            raise
        return ref

    def action(self, text: str, room: str | None = None) -> str:
        """Send an action line ("* alice waves") to a room; returns its ref."""
        return self.say(text, room, action=True)

    def private(self, recipient: str, text: str, *, action: bool = False) -> str:
        """Send a line to one user only (every device of theirs, and ours); returns its ref."""
        _check_length(text)
        ref = self._new_ref("@" + recipient, text)
        try:
            self._send(
                lambda token: Private(token=token, recipient=recipient, text=text, action=action, ref=ref), paced=True
            )
        except ChatError:
            self._forget_ref(ref)
            raise
        return ref

    def who(self, room: str | None = None) -> None:
        """Ask who is in a room; the answer arrives as ``Roster`` events (pages)."""
        target = self._room(room)
        self._send(lambda token: Who(token=token, room=target))

    def command(self, name: str, *args: str, ref: str = "") -> None:
        """Send a server command (join, part, list, topic, history, sessions, logout); the answer is an event."""
        self._send(lambda token: Command(token=token, name=name, args=list(args), ref=ref), paced=True)
        if name in ("away", "back"):
            self.away = (args[0] if args else "") if name == "away" else None

    def join(self, room: str) -> None:
        """Join a room (created if new) and make it where ``say()`` goes; a ``Room`` event says we are in.

        The server handles the join before any line sent after it, so a line said right after
        goes to the new room (and is refused, if the join was: a script's lines are never sent
        to another room than the one it asked for). Raises ``MessageRefused`` for a name that
        is not a room name; ``refused_join`` tells a refusal of the join itself.
        """
        try:
            name = normalize_room(room)
        except ValueError as exc:
            raise MessageRefused(f"not sent: {exc}") from None
        previous = self.active_room
        with self.pending_lock:
            self._next_ref += 1
            ref = f"j{self._next_ref}"
            # Registered before it is sent (which may wait for pacing): an earlier join answered
            # meanwhile then leaves the active room to this one (``_track``).
            self._joining[ref] = (name, previous)
            _remember(self._came_from, name, previous)
        self.active_room = name  # before it is sent, too: the refusal may come back before this line runs
        try:
            self.command("join", name, ref=ref)
        except ChatError:
            with self.pending_lock:
                self._joining.pop(ref, None)
            self.active_room = previous
            raise

    def refused_join(self, ref: str) -> tuple[str, str] | None:
        """For an ``ErrorReply``'s ref: if it refused a ``join``, (that room, the room to go back to:
        where lines went before it, or before the join that led there, if that failed too)."""
        with self.pending_lock:
            refused = self._refused_joins.pop(ref, None)
            if refused is None:
                return None
            room, back = refused
            seen = {room}
            while back and back not in self.rooms and back not in seen:  # a room never entered
                seen.add(back)
                back = self._came_from.get(back, "")
        return room, back if back in self.rooms else next(iter(self.rooms), "")

    def _join_answered(self, ref: str = "", room: str = "") -> bool:
        """A join done (``room``: its pending joins end) or refused (``ref``); True while others are pending."""
        with self.pending_lock:
            if room:
                self._joining = {key: join for key, join in self._joining.items() if join[0] != room}
            elif ref in self._joining:
                _remember(self._refused_joins, ref, self._joining.pop(ref))
            return bool(self._joining)

    def part(self, room: str | None = None, reason: str = "") -> None:
        """Leave a room (the active one by default)."""
        self.command("part", self._room(room), *([reason] if reason else []))

    def leave(self, reason: str = "") -> None:
        """Say goodbye (with an optional parting message), wait for the server, close."""
        if self.channel is not None and self.sock is not None and self._reader is not None:
            try:
                self._send(lambda token: Leave(token=token, reason=reason))
                self._reader.join(timeout=LEAVE_TIMEOUT)
            except ChatError:
                pass
        self.close()

    def answer_ping(self, frames: GroupWriter[bytes]) -> None:
        """Send a pong on the connection ``frames`` writes to. Never waits for another sender:
        if one is at work, it sends the pong too (a reader that waited would stop reading)."""
        frames.put(PONG_FRAME)
        frames.flush(wait=False)

    # ------------------------------------------------------------------ receiving

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none arrives within ``timeout`` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self) -> Iterator[Event]:
        """Yield events until (and including) ``Disconnected``."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Disconnected):
                return

    def _run_reader(self) -> None:
        # This thread's own references: close() may clear the attributes under us.
        sock, channel, frames = self.sock, self.channel, self._frames
        assert sock is not None and channel is not None and frames is not None
        reason, clean, restarting, needs_login = "connection closed", False, False, False
        try:
            while True:
                frame_type, body = read_frame(sock, MAX_FRAME_SIZE)
                if frame_type is FrameType.CONTROL:
                    # After login everything that matters is sealed: a cleartext frame other
                    # than a keepalive could come from anyone on the path, so it is not believed.
                    if not isinstance(decode_control_message(body), Ping):
                        raise ProtocolError("unexpected cleartext frame")
                    self.answer_ping(frames)
                    continue
                message = channel.open(body)
                if isinstance(message, TokenRefresh):
                    self.token, self.token_expires_at = message.token, message.expires_at
                    continue
                for event in self._track(message):
                    self._put_event(event)
                if isinstance(message, Goodbye):
                    reason, clean = _shown(message.reason), not message.may_reconnect
                    restarting = message.may_reconnect
                    return
                if isinstance(message, ErrorReply) and message.fatal:
                    reason = _shown(message.message)
                    if message.code.startswith("token") or message.code == ACCOUNT_DELETED:
                        self.token = ""
                    # No coming back: not until a ban is lifted, not ever to a deleted account.
                    clean = message.code in ("banned", ACCOUNT_DELETED)
                    needs_login = message.code in TOKEN_CODES
                    return
        except ConnectionClosed as exc:
            reason = "connection lost" if not self._closing.is_set() else "closed"
            clean = self._closing.is_set()
            if str(exc) != "connection closed by peer":
                reason = f"connection lost ({exc})"
        except TimeoutError:
            reason = "connection lost (the server stopped answering)"
        except (ProtocolError, CryptoError):
            reason = "connection dropped: the server sent a frame that is malformed or does not verify"
        except OSError as exc:
            reason = "closed" if self._closing.is_set() else f"connection lost ({exc.strerror or exc})"
            clean = self._closing.is_set()
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if self.reconnect and not clean and self.token and not self._stop_reconnecting.is_set():
                self._put_event(Reconnecting(reason=reason))
                self._put_event(self._resume_by_itself(restarting))
            else:
                self._put_event(
                    Disconnected(reason=reason, clean=clean, restarting=restarting, needs_login=needs_login)
                )

    def _resume_by_itself(self, restarting: bool) -> Reconnected | Disconnected:
        """Retry with growing, jittered delays and resume the session (run by the reader that lost it).

        Returns ``Reconnected``, or the ``Disconnected`` that ends the session: the server
        refused the token or any retry with a lasting reason, the server's key changed, or
        ``close()`` was called. A lost link and a "not now" refusal are retried without end.
        """
        delay = RECONNECT_RESTART_DELAY if restarting else RECONNECT_FIRST_DELAY
        while not self._stop_reconnecting.wait(delay * random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)):
            try:
                self._reset_connection()
                self.connect()
                self.resume()
            except LoginRefused as exc:
                if exc.code in TOKEN_CODES or exc.code not in RETRYABLE_CODES:
                    return Disconnected(reason=f"cannot resume the session: {exc}", clean=True)
            except HostKeyError as exc:
                return Disconnected(reason=str(exc), clean=True)
            except ChatError:
                pass
            else:
                if self._stop_reconnecting.is_set():  # close() came while we were resuming
                    self._reset_connection()
                    break
                return Reconnected()
            delay = min(RECONNECT_MAX_DELAY, delay * 2)
        return Disconnected(reason="closed", clean=True)

    def _put_event(self, event: Event) -> None:
        """Queue an event for the program; when nobody has read for a long while, drop the oldest."""
        while True:
            try:
                self._events.put_nowait(event)
                return
            except queue.Full:
                try:
                    self._events.get_nowait()
                    self.dropped_events += 1
                except queue.Empty:
                    pass

    def _track(self, message: Message) -> list[Event]:
        """Keep this client's view (rooms, members, what was seen) and return the events to hand on."""
        if isinstance(message, Batch):
            # Messages the server packed into one frame: each is handled as if it had come alone.
            return [event for part in message.messages for event in self._track(part)]
        if isinstance(message, Joined):
            # Joins the server sent together while catching up: one event each, as if they came one by one.
            return [event for name in message.names for event in self._track(Notice("joined", name, room=message.room))]
        if isinstance(message, Chat):
            if message.private and message.id:
                if message.id in self._privates_seen:
                    # Shown already: a catch-up of private lines looks back a little. Its HISTORY,
                    # after its lines (in this frame or a later one), counts only those shown.
                    self._private_repeats += message.history
                    return []
                _remember(self._privates_seen, message.id, None, MAX_PRIVATES_KEPT)
            self.last_id = max(self.last_id, message.id)
            if message.room and message.seq:
                self.seen[message.room] = max(self.seen.get(message.room, 0), message.seq)
            if message.ref:
                self._forget_ref(message.ref)
        elif isinstance(message, Notice):
            self.last_id = max(self.last_id, message.id)
            if message.room and message.seq:
                self.seen[message.room] = max(self.seen.get(message.room, 0), message.seq)
            members = self.rooms.get(message.room)
            if members is not None and message.event in ("joined", "left"):
                names = set(members)
                if message.event == "joined":
                    names.add(message.name)
                else:
                    names.discard(message.name)
                self.rooms[message.room] = sorted(names)
        elif isinstance(message, Room):
            if message.joined:
                self._told_left.discard(message.room)
                others_pending = self._join_answered(room=message.room)
                self.rooms.setdefault(message.room, [])
                # Seen up to no line yet: a resume then sends only what is newer than ``last_id``. A room
                # unnamed in ``seen`` gets its recent lines again, which in a room of notices alone
                # (a mode set, a kick) showed them at every reconnection.
                self.seen.setdefault(message.room, 0)
                # Asked for: lines go there, unless a later join is on its way (which ``join`` made active).
                if (message.requested and not others_pending) or not self.active_room:
                    self.active_room = message.room
            else:
                if message.room in self._told_left and message.room not in self.rooms:
                    return []
                self._told_left.add(message.room)
                self.rooms.pop(message.room, None)
                if self.active_room == message.room:
                    self.active_room = next(iter(self.rooms), "")
        elif isinstance(message, Roster):
            if message.room in self.rooms:
                # Pages accumulate until the last: a page with "more" set is followed by another.
                partial = self._roster_pages.setdefault(message.room, [])
                partial.extend(message.members)
                if not message.more:
                    self.rooms[message.room] = sorted(self._roster_pages.pop(message.room))
        elif isinstance(message, History) and not message.room and self._private_repeats:
            count, self._private_repeats = message.count - self._private_repeats, 0
            return [replace(message, count=count)] if count > 0 else []
        elif isinstance(message, ErrorReply) and message.ref:
            self._forget_ref(message.ref, refused=True)
            self._join_answered(ref=message.ref)
        if isinstance(message, TokenRefresh):
            return []
        return [message]  # type: ignore[list-item]

    @property
    def members(self) -> list[str]:
        """Who is in the active room."""
        return list(self.rooms.get(self.active_room, []))

    # ------------------------------------------------------------------ closing

    def _shutdown_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Close the connection, stop the reader thread and any reconnection. Safe to call twice."""
        self._stop_reconnecting.set()
        self._reset_connection()

    def _reset_connection(self) -> None:
        """Close the connection and stop its reader; a reconnection (which calls this) goes on."""
        self._closing.set()
        self._shutdown_socket()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=2.0)
        with self.send_lock:
            self._session_ready = False
            sock, frames = self.sock, self._frames
            self.sock, self._frames = None, None
            self.channel = None
        if frames is not None:
            frames.close()  # waits for a send under way (the shutdown above ended it): then none can start
        if sock is not None:
            sock.close()
        self._reader = None
        with self.pending_lock:
            self._joining.clear()  # never to be answered: the resumed session's rooms say where we are

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
