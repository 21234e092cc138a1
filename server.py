"""The chat server: a thread per connection reading; a few threads sealing and sending for all.

Run ``python server.py`` to serve with defaults, or ``python server.py --help``.
Account management: ``python server.py adduser NAME`` (also ``deluser``,
``passwd``, ``users``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import getpass
import ipaddress
import logging
import math
import os
import secrets
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crypto_utils
from accounts import (
    DEFAULT_TOKEN_TTL,
    LoginThrottle,
    TokenAuthority,
    TokenClaims,
    TokenError,
    UserRecord,
    UserStore,
    UserStoreError,
    account_stamp,
    hash_password,
    new_session_id,
    verify_password,
)
from channel import ConnectionClosed, Deadline, SecureChannel, SequenceError, read_frame
from chat import FloodControl, LocalRoom, Room, merge_join_notices
from crypto_utils import CryptoError
from outbound import OutboundQueue, Outbox, SendPool
from protocol import (
    CLIENT_KINDS,
    DEFAULT_HOST,
    DEFAULT_PORT,
    HANDSHAKE_NONCE_SIZE,
    MAX_FRAME_SIZE,
    MAX_HELLO_BATCH,
    MAX_REASON_CHARS,
    PROTOCOL_VERSION,
    Authenticated,
    ErrorReply,
    FrameType,
    Goodbye,
    Leave,
    Login,
    Message,
    MessageTooLarge,
    Private,
    ProtocolError,
    Resume,
    Roster,
    Say,
    TokenRefresh,
    Welcome,
    Who,
    b64decode,
    b64encode,
    check_text,
    client_auth_signed_data,
    decode_control,
    encode_control,
    sanitize_text,
    server_hello_digest,
    server_hello_signed_data,
    validate_username,
)

log = logging.getLogger("chat.server")

HERE = Path(__file__).resolve().parent
DEFAULT_USERS = HERE / "users.json"
DEFAULT_DATA_DIR = HERE / "server-data"
SERVER_KEY_FILE = "server_key.pem"
TOKEN_SECRET_FILE = "token_secret"
REVOKED_SESSIONS_FILE = "revoked_sessions"
WRONG_CREDENTIALS = "wrong user name or password"
#: Most queued messages a send worker seals for one connection, and writes with one
#: system call, before it turns to the next connection.
SEND_BATCH_SIZE = 64
PING_FRAME = encode_control("ping")
PONG_FRAME = encode_control("pong")
#: Seconds a closing connection may take to flush its last messages before it is cut off.
FINISH_GRACE = 5.0
#: Addresses whose connection rate is remembered before idle ones are forgotten.
MAX_TRACKED_ADDRESSES = 10_000


def default_send_workers() -> int:
    """One sealing thread per core but one, and at most two.

    RSA releases the GIL, but every wrap takes it back: on 2 cores, in alternating
    runs, two sealing threads spent 9 to 37 % more CPU per delivery than one, with
    0.75 to 1.02 context switches per delivery instead of 0.04 to 0.18
    (BENCHMARKS.md). The core left over reads what clients send, hashes
    passwords and runs the kernel's TCP work.
    """
    try:
        usable = len(os.sched_getaffinity(0))  # what this process may run on (containers, taskset)
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, min(2, usable - 1))


@dataclass
class _PendingHello:
    """One hello waiting for the server's signature (see ``HelloSigner``)."""

    digest: bytes
    #: Set once: with the batch and signature filled in, or with ``leads`` set.
    ready: threading.Event = field(default_factory=threading.Event)
    #: True when it is this hello's turn to sign, for itself and whoever is waiting.
    leads: bool = False
    batch: bytes = b""
    signature: bytes | None = None
    #: Why this hello's batch could not be signed (the signature is then None).
    failure: BaseException | None = None


class HelloSigningError(Exception):
    """The server could not sign a hello (its own fault, never the client's)."""


class HelloSigner:
    """Signs the server's hellos: all those waiting at once with one RSA signature.

    A signature costs about 0.25 ms of CPU (twice that with the other core busy), one
    per connection. When hundreds of clients connect at once (the server restarted, a
    network came back, a login storm), the hellos that arrive while one signature is
    being made are covered by the next: it signs the digests of up to
    ``MAX_HELLO_BATCH`` hellos, and each client finds its own digest among them. A hello
    that arrives alone is signed at once, as before.

    No thread of its own (group commit): a caller who finds nobody signing signs a batch,
    itself first, then hands the turn to the oldest hello still waiting. Waiting has no
    deadline, so ``sign`` must not block: it signs with the key in this process.
    """

    def __init__(self, sign: Callable[[bytes], bytes]) -> None:
        self._sign = sign
        # Guards _waiting and _signing: whether some caller has the turn to sign.
        self._turn_lock = threading.Lock()
        self._waiting: deque[_PendingHello] = deque()
        self._signing = False

    def sign(self, digest: bytes) -> tuple[bytes, bytes]:
        """(batch, signature) for one hello's digest: the batch holds it, perhaps among others."""
        pending = _PendingHello(digest)
        with self._turn_lock:
            if self._signing:
                self._waiting.append(pending)
            else:
                self._signing = True
                pending.leads = True
        if not pending.leads:
            pending.ready.wait()  # whoever has the turn always sets it, signing or not
        if pending.leads:
            self._sign_batch(pending)
        if pending.signature is None:
            raise HelloSigningError("could not sign the server's hello") from pending.failure
        return pending.batch, pending.signature

    def _sign_batch(self, leader: _PendingHello) -> None:
        with self._turn_lock:
            members = [leader]
            while self._waiting and len(members) < MAX_HELLO_BATCH:
                members.append(self._waiting.popleft())
        batch = b"".join(member.digest for member in members)
        signature, failure = None, None
        try:
            signature = self._sign(server_hello_signed_data(batch))
        except Exception as exc:
            log.exception("could not sign a batch of %d hello(s)", len(members))  # once, not per member
            failure = exc
        finally:
            # Even if signing failed: the members then raise, and the turn still passes on.
            for member in members:
                member.batch, member.signature, member.failure = batch, signature, failure
                if member is not leader:
                    member.ready.set()
            with self._turn_lock:
                if self._waiting:
                    successor = self._waiting.popleft()
                    successor.leads = True
                    successor.ready.set()
                else:
                    self._signing = False


@dataclass
class ServerConfig:
    """Everything an operator can tune. Defaults are what ``python server.py`` uses."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    users_path: Path = DEFAULT_USERS
    data_dir: Path = DEFAULT_DATA_DIR
    key_size: int = crypto_utils.DEFAULT_KEY_SIZE
    allow_demo_accounts: bool = False
    #: Seconds a new connection has to say hello and send its login.
    handshake_timeout: float = 10.0
    max_clients: int = 1000
    max_connections_per_address: int = 20
    #: New connections one address may open: a burst, then this many per second (0: no limit).
    #: Each costs the server an RSA signature before the peer proves anything.
    connect_burst: int = 30
    connect_rate: float = 5.0
    #: Messages waiting for one slow recipient before it is dropped ("SendQ exceeded").
    send_queue_size: int = 512
    #: Flood control: a burst of this many lines, then this many lines per second.
    flood_burst: int = 20
    flood_rate: float = 2.0
    #: Keepalive: ping a connection silent this long; drop it after ping_timeout.
    ping_interval: float = 20.0
    ping_timeout: float = 50.0
    token_ttl: int = DEFAULT_TOKEN_TTL
    #: Password hashes run at once (each takes 19 MiB and a few tens of ms).
    hash_workers: int = 2
    #: How long a login waits for a free hashing slot before "server busy".
    hash_wait: float = 30.0
    #: Threads that seal and send for every client (see default_send_workers).
    send_workers: int = field(default_factory=default_send_workers)
    max_frame_size: int = MAX_FRAME_SIZE
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


class ClientConnection:
    """One client: its socket, its secure channel, its reader thread and its outbound side.

    The reader thread owns the handshake and everything received. Once logged in,
    everything sent goes through ``send_queue`` and ``outbox``: one worker of the
    server's send pool, always the same, seals it (so it owns the outgoing sequence
    numbers and the RSA work) and writes it without blocking. Other threads only call
    ``deliver``, ``finish`` and ``close``, which never block.
    """

    def __init__(self, server: ChatServer, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.server = server
        self.sock = sock
        self.address = peer[0]
        self.peer = f"{peer[0]}:{peer[1]}"
        self.name = ""
        self.channel: SecureChannel | None = None
        #: Shared by every token this connection is issued (see TokenClaims.session_id).
        self.session_id = new_session_id()
        # Guards claims: the reader replaces them on each verified frame, the keepalive on a refresh.
        self._claims_lock = threading.Lock()
        self._claims: TokenClaims | None = None
        # The token string last fully verified on this connection, and its claims: every line
        # carries the same token, and a JWT decode costs more than sealing a delivery. Only
        # the reader thread (which alone calls verify_token for us) reads or writes it.
        self.verified_token: tuple[str, TokenClaims] | None = None
        self.key_thumbprint = ""
        #: The account stamp checked at login or resume (see ChatServer.issue_token).
        self.verified_stamp = ""
        self.send_queue = OutboundQueue(server.config.send_queue_size, on_ready=self._schedule_send)
        self.outbox = Outbox(
            sock,
            server.send_pool.flusher,
            on_room=self._schedule_send,
            on_flushed_close=lambda: self.close(self.close_reason or "closed"),
            on_error=self.close,
        )
        # Set once, by attach_sender() at login: queues its send worker. Until then the
        # reader thread sends (the handshake) directly.
        self._schedule: Callable[[ClientConnection], None] | None = None
        self.flood = FloodControl(server.config.flood_rate, server.config.flood_burst)
        # Every frame costs a MAC check, a decryption and a JSON parse, so frames of any kind
        # are limited too (far above what the line limit lets through), before that work is done.
        self.frame_flood = FloodControl(server.config.flood_rate * 10, server.config.flood_burst * 5)
        # Written by the reader, read by the keepalive thread: a float store is atomic.
        self.last_inbound = time.monotonic()
        # When the keepalive thread last queued a ping (it alone writes this).
        self.last_ping = 0.0
        # When the first ping since the client last spoke was written (only the send worker writes this).
        self.ping_sent_at = 0.0
        self.in_room = False
        #: Shown to the others when this user leaves with /quit; never logged (it is message text).
        self.parting_message = ""
        # Guards close_reason and the closing of the socket, from whichever thread.
        self._close_lock = threading.Lock()
        self.close_reason = ""
        self.finishing_since = 0.0
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._run_reader, name=f"read {self.peer}", daemon=True)

    def __repr__(self) -> str:
        return f"<connection {self.peer}>"

    # ------------------------------------------------------------------ called by other threads

    @property
    def claims(self) -> TokenClaims | None:
        """The claims of the newest token this connection holds."""
        with self._claims_lock:
            return self._claims

    def set_claims(self, claims: TokenClaims) -> None:
        with self._claims_lock:
            # Never go back to an older token: the keepalive and the reader may both refresh.
            if self._claims is None or claims.issued_at >= self._claims.issued_at:
                self._claims = claims

    def deliver(self, message: Message) -> None:
        """Queue a message for this client; a full queue drops the client (SendQ exceeded)."""
        if not self.send_queue.put(message):
            self.close("SendQ exceeded (too slow to receive)")

    def close(self, reason: str) -> None:
        """Close at once, from any thread. Idempotent; the first reason is kept."""
        with self._close_lock:
            if self.closed.is_set():
                return
            if not self.close_reason:  # finish() may have set it: "quit" must survive a late close
                self.close_reason = reason
            self.closed.set()
        self.send_queue.close()
        self._shutdown_socket()

    def finish(self, reason: str, *last_messages: Message) -> None:
        """Send ``last_messages`` (typically an error or goodbye), then close.

        A peer that does not read could hold the flush forever; the keepalive
        closes a connection still finishing after ``FINISH_GRACE`` seconds.
        """
        with self._close_lock:
            if not self.close_reason:
                self.close_reason = reason
            if not self.finishing_since:
                self.finishing_since = time.monotonic()
        if self.attached:
            self.send_queue.finish(*last_messages)
        else:
            self.close(reason)

    @property
    def attached(self) -> bool:
        """Whether the send pool sends for this connection (from login on)."""
        return self._schedule is not None

    def attach_sender(self, schedule: Callable[[ClientConnection], None]) -> None:
        """Hand everything sent from now on to the send worker behind ``schedule`` (reader thread)."""
        self._schedule = schedule
        schedule(self)  # anything queued before

    def _schedule_send(self) -> None:
        schedule = self._schedule
        if schedule is not None:
            schedule(self)

    def _shutdown_socket(self) -> None:
        # shutdown() is what wakes a thread blocked in recv() or sendall() on Linux.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ------------------------------------------------------------------ the reader thread

    def _run_reader(self) -> None:
        reason = "closed"
        try:
            self._handshake()
            self.sock.settimeout(None)
            self._enter_room()
            while not self.closed.is_set():
                frame_type, body = read_frame(self.sock, self.server.config.max_frame_size)
                self.last_inbound = time.monotonic()
                self._handle_frame(frame_type, body)
            reason = self.close_reason
        except ConnectionClosed as exc:
            reason = self.close_reason or str(exc)
        except TimeoutError:
            reason = "handshake timed out"
            self._send_control_error("timeout", "handshake timed out")
        except VersionMismatch as exc:
            reason = f"protocol error: {exc}"
            self._send_control_error(
                "version",
                f"this server speaks protocol version {PROTOCOL_VERSION}, your client another: "
                "use a client of the same release as the server",
            )
        except SequenceError as exc:
            reason = f"protocol error: {exc}"
            self._refuse("replay", "replayed or out-of-order frame", reason)
        except FloodError:
            reason = "flooding"
            self._refuse("flood", "disconnected for sending far too fast", reason)
        except (ProtocolError, CryptoError) as exc:
            reason = f"protocol error: {exc}"
            # Say what class of problem it was, never the details: they may be sensitive.
            self._refuse("protocol_error", "malformed or unverifiable frame", reason)
        except AuthenticationFailed as exc:
            reason = f"login refused: {exc.code}"
            self._refuse(exc.code, str(exc), reason)
        except TokenError as exc:
            reason = f"token refused: {exc.code}"
            self._refuse(exc.code, str(exc), reason)
        except HelloSigningError:
            reason = "internal error: could not sign the hello"  # logged once for its whole batch
            self._send_control_error("server_error", "the server could not complete the handshake; try again")
        except OSError as exc:
            reason = self.close_reason or f"connection error: {exc.strerror or exc}"
        except Exception:
            log.exception("%s: unexpected error", self.peer)
            reason = "internal error"
        finally:
            self.close(reason)
            if self.in_room:
                self.server.room.leave(self, self._public_reason())
            self.server.forget(self)
            who = f" user={self.name}" if self.name else ""
            log.info("disconnect %s%s: %s", self.peer, who, self.close_reason or reason)

    def _public_reason(self) -> str:
        """What the others see in the leave notice: the parting message, or why the link ended."""
        reason = self.close_reason
        if reason == "quit":
            return self.parting_message
        if reason.startswith(("protocol error", "token refused", "login refused")):
            return "protocol error"
        return reason

    def _refuse(self, code: str, message: str, reason: str) -> None:
        """Tell the client why it is being dropped (``message``), as securely as the state allows.

        ``reason`` is ours: it goes to the log and decides what the others are told.
        """
        if self.channel is not None and self.channel.session_key is not None:
            reply = ErrorReply(code=code, message=message, fatal=True)
            if self.attached:
                self.finish(reason, reply)
                self.closed.wait(timeout=1.0)
            else:
                self._send_now(self.channel.seal(reply))
        else:
            self._send_control_error(code, message)

    def _send_control_error(self, code: str, message: str) -> None:
        self._send_now(encode_control("error", code=code, message=message))

    def _send_now(self, data: bytes) -> None:
        """Best-effort direct send, only before the send pool owns the socket."""
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass

    def _handshake(self) -> None:
        config = self.server.config
        deadline = Deadline(config.handshake_timeout)
        frame_type, body = read_frame(self.sock, config.max_frame_size, deadline)
        if frame_type is not FrameType.CONTROL:
            raise ProtocolError("expected hello")
        hello = decode_control(body)
        if hello["type"] != "hello":
            raise ProtocolError("expected hello")
        if hello.get("version") != PROTOCOL_VERSION:
            raise VersionMismatch(hello.get("version"))
        client_key_der = b64decode(hello.get("client_key"), "client_key")
        client_nonce = b64decode(hello.get("nonce"), "nonce")
        if len(client_nonce) != HANDSHAKE_NONCE_SIZE:
            raise ProtocolError("hello nonce has the wrong size")
        client_key = crypto_utils.load_public_key(client_key_der)
        self.key_thumbprint = crypto_utils.jwk_thumbprint(client_key)
        nonce = secrets.token_bytes(HANDSHAKE_NONCE_SIZE)
        batch, signature = self.server.hello_signer.sign(server_hello_digest(nonce, client_nonce, client_key_der))
        self._send_now(
            encode_control(
                "server_hello",
                version=PROTOCOL_VERSION,
                server_key=b64encode(self.server.public_key_der),
                nonce=b64encode(nonce),
                batch=b64encode(batch),
                signature=b64encode(signature),
            )
        )
        self.channel = SecureChannel(self.server.private_key, client_key, is_server=True, allowed_incoming=CLIENT_KINDS)
        frame_type, body = read_frame(self.sock, config.max_frame_size, deadline)
        if frame_type is not FrameType.SEALED:
            raise ProtocolError("expected login")
        request = self.channel.open(body)
        assert isinstance(request, Login | Resume)
        # The login is bound to this connection: a relayed or replayed one fails here.
        if not secrets.compare_digest(b64decode(request.server_nonce, "server_nonce"), nonce):
            raise ProtocolError("login is not for this connection (nonce)")
        if request.client_key_fingerprint != crypto_utils.fingerprint(client_key):
            raise ProtocolError("login is bound to another client key")
        # Whoever sent the hello key must hold its private half: a stolen token plus the
        # victim's public key must not be enough to resume the victim's session.
        crypto_utils.verify_signature(
            client_key,
            b64decode(request.client_signature, "client_signature"),
            client_auth_signed_data(request.KIND, nonce, self.server.public_key_der),
        )
        self.sock.settimeout(None)  # from here the time spent is ours, not the client's
        if isinstance(request, Login):
            self.name = self.server.authenticate_password(self, request)
        else:
            self.name = self.server.authenticate_token(self, request)

    def _enter_room(self) -> None:
        assert self.channel is not None
        self.channel.username = self.name
        token, expires_at = self.server.issue_token(self, self.verified_stamp)
        self.attach_sender(self.server.send_pool.assign())
        config = self.server.config

        def welcome(roster: list[str]) -> None:
            # Called by the room as we join: first in our queue, with exactly who was
            # here then (we hear of every later join and leave, and of nothing earlier).
            self.deliver(
                Welcome(
                    username=self.name,
                    token=token,
                    expires_at=expires_at,
                    members=roster,
                    flood_burst=config.flood_burst,
                    flood_rate=config.flood_rate,
                )
            )

        try:
            _, replaced = self.server.room.join(self, welcome)
        finally:
            self.in_room = True  # even if join failed half-way: the reader's leave() then tidies up
        if isinstance(replaced, ClientConnection):
            # Revoked, not just closed: whoever still holds that session (a stolen laptop,
            # say) must not resume it and push this login out in turn.
            # Told first (as for a leave), so nothing it does meanwhile meets a revoked token.
            replaced.finish("logged in again from elsewhere", Goodbye(reason="logged in again from elsewhere"))
            replaced_claims = replaced.claims
            if replaced_claims is not None:
                self.server.tokens.revoke(replaced_claims)

    def _handle_frame(self, frame_type: FrameType, body: bytes) -> None:
        if not self.frame_flood.allow():  # pings too: parsing JSON is work, and so is each pong
            raise FloodError("far too many frames")
        if frame_type is FrameType.CONTROL:
            control = decode_control(body)
            if control["type"] == "ping":
                self.send_queue.put_urgent(PONG_FRAME)
            elif control["type"] != "pong":
                raise ProtocolError(f"unexpected control message {control['type']!r}")
            return
        assert self.channel is not None
        message = self.channel.open(body)
        if not isinstance(message, Authenticated):
            raise ProtocolError(f"{message.KIND.name} is not allowed after login")
        claims = self.server.verify_token(self, message.token)
        if claims.session_id != self.session_id:
            # Another session's token (same user and key) must not act here, e.g. revoke it.
            raise TokenError("token_invalid", "token is for another session")
        self.set_claims(claims)
        if self.server.tokens.needs_refresh(claims):
            token, expires_at = self.server.issue_token(self, claims.account_stamp)
            self.deliver(TokenRefresh(token=token, expires_at=expires_at))
        if isinstance(message, Say):
            self._handle_say(message)
        elif isinstance(message, Private):
            self._handle_private(message)
        elif isinstance(message, Who):
            self.deliver(Roster(members=self.server.room.who()))
        elif isinstance(message, Leave):
            self.parting_message = sanitize_text(message.reason.strip())[:MAX_REASON_CHARS]
            # Finishing first marks us closing, so the keepalive will not try to refresh a
            # token of the session being revoked (and lose the goodbye and parting message).
            self.finish("quit", Goodbye(reason="bye"))
            self.server.tokens.revoke(claims)
        else:
            raise ProtocolError(f"{message.KIND.name} is not allowed after login")

    def _checked_text(self, text: str) -> str | None:
        try:
            checked = check_text(text)
        except ProtocolError as exc:
            self.deliver(ErrorReply(code="bad_message", message=f"not sent: {exc}"))
            return None
        if not self.flood.allow():
            config = self.server.config
            self.deliver(
                ErrorReply(
                    code="flood",
                    message=(
                        f"not sent: you are sending too fast (limit: {config.flood_burst} lines "
                        f"at once, then {config.flood_rate:g} per second)"
                    ),
                )
            )
            return None
        return checked

    def _handle_say(self, message: Say) -> None:
        text = self._checked_text(message.text)
        if text is not None:
            self.server.room.say(self, text, action=message.action)

    def _handle_private(self, message: Private) -> None:
        if message.recipient == self.name:
            self.deliver(ErrorReply(code="no_such_user", message="not sent: that is you"))
            return
        text = self._checked_text(message.text)
        if text is None:
            return
        if not self.server.room.send_private(self, message.recipient, text, action=message.action):
            shown = sanitize_text(message.recipient)[:40]
            self.deliver(ErrorReply(code="no_such_user", message=f"not sent: {shown} is not online"))

    # ------------------------------------------------------------------ run by this connection's send worker

    def pump(self) -> bool:
        """Seal one batch of what is queued and write it without blocking; True if more is queued.

        Only ever run by this connection's one send worker, so frames are sealed in order.
        """
        if self.closed.is_set() or not self.outbox.has_room():
            return False  # a full outbox has the flusher schedule us again when it drains
        assert self.channel is not None
        batch, more = self.send_queue.take_batch(SEND_BATCH_SIZE)
        frames: list[bytes] = []
        close_after = False
        for item in merge_join_notices(batch):
            if item is OutboundQueue.CLOSE_AFTER_FLUSH:
                close_after = True  # always the last item queued: finish() closes the queue
                break
            if isinstance(item, bytes):
                frames.append(item)
                continue
            try:
                frames.append(self.channel.seal(item))
            except MessageTooLarge as exc:
                # One unsendable message must not cost the client its connection; the
                # channel's state is unchanged, so the next message seals as usual.
                log.warning("%s: %s message not sent: %s", self.peer, item.KIND.name, exc)
            except Exception:
                log.exception("%s: cannot seal a %s message", self.peer, item.KIND.name)
                self.close("internal error while sending")
                return False
        if PING_FRAME in frames and self.ping_sent_at <= self.last_inbound:
            # The reply window runs from when the first unanswered ping was written, not from
            # when it was queued: a ping held up behind our own backlog is not the client's fault.
            self.ping_sent_at = time.monotonic()
        if frames or close_after:
            self.outbox.write(b"".join(frames), close_when_empty=close_after)
        return more


class ChatServer:
    """Accepts connections and runs the room. Same verbs as ``socketserver``.

    ``serve_forever()`` accepts until ``shutdown()``; ``server_close()`` tells
    every client the server is going down, closes them and joins every thread.
    The listening socket is bound in the constructor, so ``address`` is known
    (use port 0 for an ephemeral port).
    """

    def __init__(self, config: ServerConfig, room: Room | None = None) -> None:
        self.config = config
        data_dir = Path(config.data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_directory(data_dir)
        self.private_key = crypto_utils.load_or_create_private_key(data_dir / SERVER_KEY_FILE, config.key_size)
        self.public_key_der = crypto_utils.public_key_bytes(self.private_key.public_key())
        self.fingerprint = crypto_utils.fingerprint(self.private_key.public_key())
        self.hello_signer = HelloSigner(lambda data: crypto_utils.sign(self.private_key, data))
        self.tokens = TokenAuthority(
            crypto_utils.load_or_create_secret(data_dir / TOKEN_SECRET_FILE),
            config.token_ttl,
            revoked_path=data_dir / REVOKED_SESSIONS_FILE,
        )
        self.users = UserStore(config.users_path)
        self.users.load()  # a corrupt store is reported now, not at the first login
        # Hashed for unknown user names, so they cost the same work as a wrong password.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16))
        self.room: Room = room if room is not None else LocalRoom()
        # The only threads that hash passwords. A pool rather than a semaphore: each thread
        # that runs Argon2 keeps its own 19 MiB malloc arena, so hashing on every connection's
        # thread would grow memory with the number of clients who ever logged in.
        self.hash_pool = concurrent.futures.ThreadPoolExecutor(
            config.hash_workers, thread_name_prefix="hash", initializer=lower_thread_priority
        )
        # Seals and sends for every logged-in connection (see outbound.py).
        self.send_pool = SendPool(config.send_workers)
        # Guards connections and connections_per_address.
        self.connections_lock = threading.Lock()
        self.connections: set[ClientConnection] = set()
        self.connections_per_address: Counter[str] = Counter()
        self._connect_buckets: dict[str, FloodControl] = {}
        self.stopping = threading.Event()
        self._serving = threading.Event()
        self._wakeup_read, self._wakeup_write = socket.socketpair()
        self.listener = socket.create_server(
            (config.host, config.port),
            family=socket.AF_INET6 if ":" in config.host else socket.AF_INET,
            backlog=512,
        )
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.keepalive = threading.Thread(target=self._run_keepalive, name="keepalive", daemon=True)
        self._serve_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown()`` (or ``request_shutdown()``)."""
        self.keepalive.start()
        self.send_pool.start()
        self._serving.set()
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        selector.register(self._wakeup_read, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self.listener:
                        self._accept()
        finally:
            selector.close()
            self._serving.clear()

    def start(self) -> ChatServer:
        """Serve in a background thread (handy for tests and benchmarks)."""
        self._serve_thread = threading.Thread(target=self.serve_forever, name="accept", daemon=True)
        self._serve_thread.start()
        self._serving.wait(timeout=10.0)  # so that every thread of the server exists once this returns
        return self

    def request_shutdown(self) -> None:
        """Ask ``serve_forever`` to return. Safe from a signal handler."""
        self.stopping.set()
        try:
            self._wakeup_write.send(b"x")
        except OSError:
            pass

    def shutdown(self) -> None:
        """Stop accepting and wait until ``serve_forever`` has returned."""
        self.request_shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join()

    def server_close(self, grace: float = 1.0) -> None:
        """Tell every client the server is going down, close them, join every thread.

        Everything waits on one deadline, not a timeout per thread, so a thousand
        connections cannot add up to a slow exit.
        """
        self.request_shutdown()
        # Logins waiting for a hashing slot are refused now rather than at the end of their wait.
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            if connection.in_room:
                connection.finish("server shutting down", Goodbye(reason="server shutting down", may_reconnect=True))
            else:
                connection.close("server shutting down")
        give_up = time.monotonic() + grace
        for connection in connections:
            # A finishing connection closes itself once its goodbye is out (or its peer fails).
            connection.closed.wait(timeout=max(0.0, give_up - time.monotonic()))
            connection.close("server shutting down")
        for connection in connections:
            connection.reader.join(timeout=max(0.0, give_up + 0.5 - time.monotonic()))
            connection.outbox.close_socket()
        if self.keepalive.is_alive():
            self.keepalive.join(timeout=1.0)
        self.room.close()
        self.send_pool.stop()
        self.hash_pool.shutdown(wait=True)  # a hash already running takes a few tens of ms
        self.listener.close()
        self._wakeup_read.close()
        self._wakeup_write.close()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        try:
            sock, peer = self.listener.accept()
        except OSError:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = peer[0]
        with self.connections_lock:
            refusal = None
            if not self._connect_allowed(address):
                refusal = ("too_many_connections", "too many new connections from your address; slow down")
            elif len(self.connections) >= self.config.max_clients:
                refusal = ("server_full", "server is full; try again later")
            elif self.connections_per_address[address] >= self.config.max_connections_per_address:
                refusal = ("too_many_connections", "too many connections from your address")
            else:
                connection = ClientConnection(self, sock, peer)
                # Registered before its thread starts, so server_close() cannot miss it.
                self.connections.add(connection)
                self.connections_per_address[address] += 1
        if refusal is not None:
            log.info("refused %s:%s: %s", peer[0], peer[1], refusal[1])
            try:
                sock.settimeout(0.5)
                sock.sendall(encode_control("error", code=refusal[0], message=refusal[1]))
            except OSError:
                pass
            sock.close()
            return
        log.info("connect %s", connection.peer)
        connection.reader.start()

    def _connect_allowed(self, address: str) -> bool:
        """Per-address rate of new connections. Only the accepting thread touches the buckets."""
        if self.config.connect_rate <= 0:
            return True
        bucket = self._connect_buckets.get(address)
        if bucket is None:
            if len(self._connect_buckets) >= MAX_TRACKED_ADDRESSES:
                self._connect_buckets = {key: b for key, b in self._connect_buckets.items() if not b.is_full()}
            bucket = self._connect_buckets[address] = FloodControl(self.config.connect_rate, self.config.connect_burst)
        return bucket.allow()

    def forget(self, connection: ClientConnection) -> None:
        """Drop a finished connection from the books (called by its reader thread)."""
        with self.connections_lock:
            if connection in self.connections:
                self.connections.discard(connection)
                self.connections_per_address[connection.address] -= 1
                if self.connections_per_address[connection.address] <= 0:
                    del self.connections_per_address[connection.address]
        if not self.stopping.is_set():
            connection.outbox.close_socket()  # never under a send in flight on the pool's threads

    def _run_keepalive(self) -> None:
        """Ping quiet clients; drop those that stay silent (vanished peers, no ghosts)."""
        check_every = max(0.05, min(5.0, self.config.ping_interval / 4))
        while not self.stopping.wait(check_every):
            try:
                self._keepalive_pass()
            except Exception:  # this thread must outlive any one bad pass, or ghosts stay forever
                log.exception("keepalive pass failed")

    def _keepalive_pass(self) -> None:
        now = time.monotonic()
        with self.connections_lock:
            connections = [c for c in self.connections if c.in_room]
        stamps = self._current_account_stamps()
        for connection in connections:
            self._keep_alive(connection, now, stamps)

    def _keep_alive(self, connection: ClientConnection, now: float, stamps: dict[str, str] | None) -> None:
        """One connection's turn: end it if it must go, refresh its token, ping it if quiet."""
        if connection.close_reason:  # already on its way out, but a stuck flush must not hold it
            if connection.finishing_since and now - connection.finishing_since > FINISH_GRACE:
                connection.close(connection.close_reason)
            return
        claims = connection.claims
        if claims is None:
            return
        if claims.expires_at <= time.time():
            # Only a listener gets here (a speaker's frames are refused): end it the same way.
            connection.finish(
                "token expired", ErrorReply(code="token_expired", message="token expired; log in again", fatal=True)
            )
            return
        if stamps is not None and stamps.get(claims.username) != claims.account_stamp:
            # A listener sends nothing for the per-frame check to catch: a password
            # change or a deleted account must still end its session.
            log.info("closing %s user=%s: account changed", connection.peer, connection.name)
            connection.finish(
                "account changed",
                ErrorReply(
                    code="token_revoked", message="your account was changed or deleted; log in again", fatal=True
                ),
            )
            return
        if self.tokens.needs_refresh(claims):  # a listener needs its token kept fresh too
            try:
                token, expires_at = self.issue_token(connection, claims.account_stamp)
            except TokenError:  # its session was revoked meanwhile (by a leave racing this pass, say)
                if not connection.close_reason:
                    connection.close("session revoked")
                return
            connection.deliver(TokenRefresh(token=token, expires_at=expires_at))
        silent = now - connection.last_inbound
        if silent > self.config.ping_timeout:
            ping_sent = connection.ping_sent_at > connection.last_inbound
            # How long a client has to answer a ping that has actually been sent.
            reply_window = max(0.0, self.config.ping_timeout - self.config.ping_interval)
            # Unsent after all this time means we could not get a frame onto the
            # socket: the peer has stopped reading, which is as dead as not answering.
            if not ping_sent or now - connection.ping_sent_at > reply_window:
                connection.close("no reply to keepalive (connection lost)")
                return
        if silent > self.config.ping_interval and now - connection.last_ping > self.config.ping_interval:
            connection.last_ping = now
            # Ahead of any backlog, so a busy client hears it at once.
            connection.send_queue.put_urgent(PING_FRAME)

    # ------------------------------------------------------------------ authentication

    def authenticate_password(self, connection: ClientConnection, login: Login) -> str:
        """Check a password login; returns the user name or raises ``AuthenticationFailed``."""
        name = login.username
        address_key, account_key = ("address", connection.address), ("user", name.casefold()[:64])
        keys = [address_key, account_key]
        # Guesses at one account fired in parallel are counted as they start; the address is
        # counted when a guess fails (many people may log in at once from one address, and
        # its parallelism is already bounded by the per-address connection limit).
        wait = self.config.login_throttle.begin_attempt(keys, reserve=[account_key])
        if wait > 0:
            log.info("login throttled from %s", connection.peer)
            raise AuthenticationFailed("rate_limited", f"too many failed logins; try again in {math.ceil(wait)} s")
        outcome = "error"  # until _check_password returns: busy, shutting down, store unreadable...
        try:
            accepted = self._check_password(connection, login)
            outcome = "accepted" if accepted else "wrong"
        finally:
            throttle = self.config.login_throttle
            if outcome == "accepted":
                # The account only, never the address: owning one account must not reset
                # the count of guesses made at others.
                throttle.record_success([account_key])
            elif outcome == "wrong":
                throttle.record_failure([address_key])  # the account was counted when it began
            else:
                throttle.cancel_attempt([account_key])  # not the user's fault: give it back
        if not accepted:
            raise AuthenticationFailed("auth_failed", WRONG_CREDENTIALS)
        return name

    def _check_password(self, connection: ClientConnection, login: Login) -> bool:
        """True if the password is right, False if not; raises for anything else."""
        name = login.username
        try:
            record = self.users.get(name)
        except UserStoreError as exc:
            log.error("%s", exc)
            raise AuthenticationFailed("server_error", "the server cannot read its user store") from None
        stored_hash = record.password_hash if record is not None else self._decoy_hash
        try:
            check = self.hash_pool.submit(verify_password, login.password, stored_hash)
            password_ok = check.result(timeout=self.config.hash_wait)
        except concurrent.futures.TimeoutError:
            check.cancel()
            raise AuthenticationFailed("busy", "server busy; try again in a moment") from None
        except (concurrent.futures.CancelledError, RuntimeError):  # the pool was shut down under us
            raise AuthenticationFailed("shutting_down", "server shutting down") from None
        if record is None or not password_ok:
            # Only a known name is logged: an unknown one may be a password typed in the wrong box.
            who = f"user={name}" if record is not None else "unknown user"
            log.info("login failed %s %s: wrong password", connection.peer, who)
            return False
        self._refuse_demo_account(connection, record)
        connection.verified_stamp = account_stamp(record)
        log.info("login ok %s user=%s", connection.peer, name)
        return True

    def _refuse_demo_account(self, connection: ClientConnection, record: UserRecord) -> None:
        if record.demo and not self.config.allow_demo_accounts and not self.config.is_loopback:
            log.warning("login refused %s user=%s: demo account on a public address", connection.peer, record.name)
            raise AuthenticationFailed("demo_disabled", "demo accounts are disabled on this server")

    def _current_account_stamps(self) -> dict[str, str] | None:
        """Every account's stamp, or None if the store cannot be read just now (keep everyone)."""
        try:
            return {name: account_stamp(record) for name, record in self.users.load().items()}
        except UserStoreError as exc:
            log.error("%s", exc)
            return None

    def _account_stamp(self, name: str) -> str:
        """The current stamp of an account; raises ``TokenError`` if it is gone."""
        try:
            record = self.users.get(name)
        except UserStoreError as exc:
            log.error("%s", exc)
            raise AuthenticationFailed("server_error", "the server cannot read its user store") from None
        if record is None:
            raise TokenError("token_revoked", "that account no longer exists")
        return account_stamp(record)

    def issue_token(self, connection: ClientConnection, stamp: str) -> tuple[str, int]:
        """A fresh token for an authenticated connection's session; also becomes its current claims.

        ``stamp`` is the account stamp that was *checked* (of the record whose password was
        verified, or of the token being renewed), never re-read here: a password changed
        meanwhile must make the new token fail its next check, not inherit the new stamp.
        """
        token, expires_at = self.tokens.issue(connection.name, connection.key_thumbprint, stamp, connection.session_id)
        connection.set_claims(self.tokens.verify(token, connection.key_thumbprint, connection.name))
        return token, expires_at

    def verify_token(self, connection: ClientConnection, token: object, username: str | None = None) -> TokenClaims:
        """Verify a token for this connection, including that its account is unchanged.

        The token last verified on this connection is only re-checked for what can change
        (expiry, revocation, the account); any other token string is verified in full.
        Raises ``TokenError``.
        """
        expected_user = username or connection.name
        verified = connection.verified_token
        # Comparing with == leaks nothing: the client sent this string, and we hold it only
        # because the same client sent it before on this authenticated connection.
        if verified is not None and isinstance(token, str) and token == verified[0]:
            claims = verified[1]
            if claims.username != expected_user:
                raise TokenError("token_invalid", "token is for another user")
            self.tokens.recheck(claims)
        else:
            claims = self.tokens.verify(token, connection.key_thumbprint, expected_user)
        if claims.account_stamp != self._account_stamp(claims.username):
            raise TokenError("token_revoked", "the account's password changed; log in again")
        if isinstance(token, str):  # always, once verify() accepted it
            connection.verified_token = (token, claims)
        return claims

    def authenticate_token(self, connection: ClientConnection, resume: Resume) -> str:
        """Check a resume request; returns the user name or raises ``TokenError``."""
        claims = self.tokens.verify(resume.token, connection.key_thumbprint)
        connection.name = claims.username
        claims = self.verify_token(connection, resume.token)
        try:
            record = self.users.get(claims.username)
        except UserStoreError as exc:
            log.error("%s", exc)
            raise AuthenticationFailed("server_error", "the server cannot read its user store") from None
        if record is not None:  # None only if deleted this instant; the next frame's check ends it
            self._refuse_demo_account(connection, record)
        # The old session is spent, every token of it: the new connection starts a new one.
        self.tokens.revoke(claims)
        connection.verified_stamp = claims.account_stamp
        log.info("resume ok %s user=%s", connection.peer, claims.username)
        return claims.username


#: How much lower than the rest of the server a password-hashing thread runs (a nice value).
HASHING_NICENESS = 10
MAX_NICENESS = 19


def lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to the server's other threads (Linux only).

    A login storm can keep every core hashing for seconds: at equal priority the
    room's own work (sealing and sending lines) would queue behind it. Lowered, the
    hashing uses whatever the room leaves, so the room keeps its pace and logins
    take the rest. On Linux a thread is a task with its own nice value; elsewhere
    this would reprioritise the whole process, so it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    thread_id = threading.get_native_id()
    try:
        niceness = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(MAX_NICENESS, niceness + HASHING_NICENESS))
    except OSError as exc:  # a sandbox may forbid it; hashing still works, just at full priority
        log.debug("cannot lower the hashing threads' priority: %s", exc)


def check_private_directory(path: Path) -> None:
    """Refuse a data directory others could write to: they could swap the key or the secret."""
    info = path.stat()
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise crypto_utils.InsecureFileError(
            f"{path} is writable by other users (mode {stat.filemode(info.st_mode)}); fix it with: chmod 700 {path}"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise crypto_utils.InsecureFileError(f"{path} belongs to another user; the server's data must be its own")


class FloodError(Exception):
    """A connection sent frames far faster than any client would."""


class VersionMismatch(ProtocolError):
    """A hello for another protocol version: told to the client plainly, since it is no attack."""

    def __init__(self, version: object) -> None:
        known = isinstance(version, int) and not isinstance(version, bool) and 0 <= version < 1000
        shown = version if known else "unknown"
        super().__init__(f"hello for protocol version {shown}, not {PROTOCOL_VERSION}")


class AuthenticationFailed(Exception):
    """A login was refused (or the server cannot check it); ``code`` and the message go to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- command line


def read_new_password(name: str) -> str:
    """Read a password: twice, hidden, on a terminal; one line of stdin otherwise."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"New password for {name}: ")
        second = getpass.getpass("Repeat it: ")
        if first != second:
            raise ValueError("the passwords do not match")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValueError("the password is empty")
    return password


def add_common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Callable[[Any], Any] = (lambda _: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument(
        "--users",
        type=Path,
        default=default(DEFAULT_USERS),
        metavar="FILE",
        help="the user store (default: users.json beside server.py)",
    )
    parser.add_argument(
        "--log-level",
        default=default("INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: INFO",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Secure terminal group chat server.",
        epilog="Accounts: server.py adduser NAME | deluser NAME | passwd NAME | users",
    )
    add_common_options(parser, suppress=False)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}; 0 picks a free port")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help="where the server key and token secret live (default: server-data/ beside server.py)",
    )
    parser.add_argument(
        "--key-size",
        type=int,
        default=crypto_utils.DEFAULT_KEY_SIZE,
        choices=crypto_utils.ALLOWED_KEY_SIZES,
        help="RSA size of a new server key (default: 2048)",
    )
    parser.add_argument(
        "--allow-demo-accounts",
        action="store_true",
        help="let demo accounts log in even on a non-loopback address",
    )
    parser.add_argument("--max-clients", type=int, default=ServerConfig.max_clients)
    parser.add_argument(
        "--max-per-address",
        type=int,
        default=ServerConfig.max_connections_per_address,
        help="connections allowed from one address",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=ServerConfig.connect_rate,
        metavar="PER_S",
        help="new connections per second from one address, after a burst of 30; 0 disables (default: 5)",
    )
    parser.add_argument("--handshake-timeout", type=float, default=ServerConfig.handshake_timeout, metavar="SECONDS")
    parser.add_argument(
        "--flood-burst",
        type=int,
        default=ServerConfig.flood_burst,
        metavar="LINES",
        help="lines one user may send at once (default: 20)",
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=ServerConfig.flood_rate,
        metavar="LINES_PER_S",
        help="sustained lines per second per user; 0 disables (default: 2)",
    )
    parser.add_argument(
        "--send-queue",
        type=int,
        default=ServerConfig.send_queue_size,
        metavar="MESSAGES",
        help="messages queued for a slow client before it is dropped (default: 512)",
    )
    parser.add_argument("--ping-interval", type=float, default=ServerConfig.ping_interval, metavar="SECONDS")
    parser.add_argument("--ping-timeout", type=float, default=ServerConfig.ping_timeout, metavar="SECONDS")
    parser.add_argument("--token-ttl", type=int, default=ServerConfig.token_ttl, metavar="SECONDS")
    parser.add_argument("--hash-workers", type=int, default=ServerConfig.hash_workers)
    parser.add_argument(
        "--send-workers",
        type=int,
        default=default_send_workers(),
        help="threads that seal and send for all clients (default: CPUs - 1, at most 2: %(default)s here)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, help_text in (
        ("adduser", "create an account (password read hidden, or one line of stdin)"),
        ("deluser", "delete an account"),
        ("passwd", "change an account's password"),
        ("users", "list the accounts"),
    ):
        sub = commands.add_parser(command, help=help_text)
        add_common_options(sub, suppress=True)
        if command != "users":
            sub.add_argument("name")
    return parser


def run_admin_command(args: argparse.Namespace) -> int:
    store = UserStore(args.users)
    try:
        if args.command == "users":
            for record in store.load().values():
                print(f"{record.name}{'  (demo)' if record.demo else ''}")
            return 0
        name = args.name
        if args.command == "adduser":
            validate_username(name)
            if store.get(name) is not None:
                raise ValueError(f"user {name!r} already exists")
            store.add(name, read_new_password(name))
            print(f"added {name}")
        elif args.command == "deluser":
            store.delete(name)
            print(f"deleted {name}")
        elif args.command == "passwd":
            if store.get(name) is None:
                raise KeyError(name)
            store.set_password(name, read_new_password(name))
            print(f"password changed for {name}")
    except KeyError as exc:
        print(f"error: no user {exc.args[0]!r} in {args.users}", file=sys.stderr)
        return 1
    except (ValueError, UserStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\ncancelled", file=sys.stderr)
        return 130
    return 0


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        users_path=args.users,
        data_dir=args.data_dir,
        key_size=args.key_size,
        allow_demo_accounts=args.allow_demo_accounts,
        handshake_timeout=args.handshake_timeout,
        max_clients=args.max_clients,
        max_connections_per_address=args.max_per_address,
        connect_rate=args.connect_rate,
        send_queue_size=args.send_queue,
        flood_burst=args.flood_burst,
        flood_rate=args.flood_rate,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        token_ttl=args.token_ttl,
        hash_workers=args.hash_workers,
        send_workers=args.send_workers,
    )


#: Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Shorten the pauses of CPython's cycle collector, which stop every thread.

    A line in flight lives long enough (until the last recipient's copy is sealed)
    to be promoted at the default thresholds, and full collections then scan it all:
    one took 44 ms in the middle of a fan-out run. Rarer young collections let most
    of it die young (that full collection took 7.8 ms instead), and freezing what
    exists at start-up (modules, the server's keys) keeps it out of every collection.
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    gc.collect()  # so that no start-up garbage is frozen with the rest
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.command:
        return run_admin_command(args)
    config = config_from_args(args)
    try:
        server = ChatServer(config)
    except (CryptoError, UserStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    demo_names = [record.name for record in server.users.load().values() if record.demo]
    if demo_names:
        if config.is_loopback or config.allow_demo_accounts:
            log.warning(
                "demo accounts are enabled (%s): remove them with 'server.py deluser NAME'",
                ", ".join(demo_names),
            )
        else:
            log.warning(
                "demo accounts (%s) are refused on %s; pass --allow-demo-accounts to allow them",
                ", ".join(demo_names),
                config.host,
            )

    def on_signal(signum: int, _frame: object) -> None:
        server.request_shutdown()

    # Before announcing the address: a supervisor may send SIGTERM as soon as it reads it.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    host, port = server.address
    key_bits = server.private_key.key_size
    print(f"Server key fingerprint: {key_bits} {server.fingerprint} (RSA)", flush=True)
    print(f"Listening on {host}:{port}", flush=True)
    tune_garbage_collector()
    try:
        server.serve_forever()
    finally:
        log.info("shutting down")
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
