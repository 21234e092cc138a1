"""One client connection on the server: its reader thread (handshake, then frames) and its send side."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from securechat.accounts import (
    RevocationNotSaved,
    TokenClaims,
    TokenError,
    new_session_id,
)
from securechat.backend import BackendUnavailable
from securechat.channel import ConnectionClosed, Deadline, SecureChannel, SequenceError, read_frame
from securechat.crypto_utils import CryptoError
from securechat.handshake import ServerHandshake
from securechat.hello_signer import HelloSigningError
from securechat.hub import SESSION_ID_CHARS, HubError, run_command
from securechat.outbound import OutboundQueue, Outbox, SealedRun
from securechat.protocol import (
    MAX_REASON_CHARS,
    PROTOCOL_VERSION,
    Authenticated,
    Chat,
    Command,
    ControlError,
    ErrorReply,
    FrameType,
    Goodbye,
    Leave,
    Login,
    Message,
    MessageTooLarge,
    Ping,
    Pong,
    Private,
    ProtocolError,
    Resume,
    Say,
    TokenRefresh,
    VersionMismatch,
    Welcome,
    Who,
    check_text,
    decode_control_message,
    pack_messages,
    sanitize_text,
)
from securechat.ratelimit import FloodControl, address_bucket
from securechat.rooms import merge_join_notices

if TYPE_CHECKING:
    from securechat.listener import ChatServer

log = logging.getLogger("chat.server")

#: Most queued messages a send worker seals for one connection, and writes with one
#: system call, before it turns to the next connection.
SEND_BATCH_SIZE = 64
#: Above this much plaintext waiting for a client, its /history is refused until it reads, and
#: so is a /join while that much waits for any device of the account here (each enters the room
#: with its lines): one answer may hold 500 lines of up to 32 KiB, and a client that asked page
#: after page and never read had the server hold gigabytes for it, in too few items to be dropped.
#: Only what is asked for is held back: a device catching up on its rooms at login may queue
#: more, and the room's lines go on reaching it (a slow reader is dropped by item count).
REQUESTS_WAIT_ABOVE = 8 * 1024 * 1024
#: The commands whose answers can be that large.
LARGE_ANSWERS = frozenset({"history", "join"})
PING_FRAME = Ping().encode()
PONG_FRAME = Pong().encode()
#: Seconds a closing connection may take to flush its last messages before it is cut off.
FINISH_GRACE = 5.0
#: Seconds a /quit or /part waits for the echoes of the session's own lines: with several server
#: processes a line is echoed once this process reads it back from the broker, and the client counts
#: a line with no echo as not sent.
ECHO_WAIT = 2.0
#: Longest reason a disconnect's log line carries.
MAX_LOGGED_REASON_CHARS = 200
#: Longest device label shown in /sessions.
MAX_DEVICE_CHARS = 40


class FloodError(Exception):
    """A connection sent frames far faster than any client would."""


class AuthenticationFailed(Exception):
    """A login was refused (or the server cannot check it); ``code`` and the message go to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ClientConnection:
    """One client: its socket, its secure channel, its reader thread and its outbound side.

    The reader thread owns the handshake and everything received. Once logged in,
    everything sent goes through ``send_queue`` and ``outbox``: one worker of the
    server's send pool, always the same, seals it (so it owns the outgoing sequence
    numbers and the message keys) and writes it without blocking. Other threads only call
    ``deliver``, ``finish`` and ``close``, which never block.
    """

    def __init__(self, server: ChatServer, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.server = server
        self.sock = sock
        self.address = peer[0]
        #: What per-address limits count this peer under (its IPv6 /64, say).
        self.address_bucket = address_bucket(peer[0])
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
        #: The device token a password login earned, for the welcome ("" after a resume).
        self.device_token = ""
        self.send_queue = OutboundQueue(
            server.config.send_queue_size,
            on_ready=self._schedule_send,
            size_of=_queued_size,
        )
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
        #: The login or resume this session began with (what it has seen, its device label).
        self.login_request: Login | Resume | None = None
        #: The device label the client gave, shown in /sessions.
        self.device = ""
        #: Shown to the others when this user leaves with /quit; never logged (it is message text).
        self.parting_message = ""
        # The lines (and private lines) this session had accepted whose echo is not queued yet. Written
        # by the reader (a line accepted) and whichever thread queues the echo; a /quit or a /part
        # waits until there are none.
        self._echoes_due = threading.Condition(threading.Lock())
        self._unechoed = 0
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
        if isinstance(message, Chat) and message.ref:  # only this session's own lines carry its refs
            with self._echoes_due:
                self._unechoed -= 1
                self._echoes_due.notify_all()

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

    def finish(self, reason: str, *last_messages: Message, urgent: bool = False) -> None:
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
            self.send_queue.finish(*last_messages, drop_queued=urgent)
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
            try:
                if self.in_room:
                    self.server.hub.close_session(self, self._public_reason(), parting=self.close_reason == "quit")
            except Exception:  # never leave the connection on the books (it holds its address's share)
                log.exception("%s: closing the session failed", self.peer)
            finally:
                self.server.forget(self)
            who = f" user={self.name}" if self.name else ""
            # A protocol error's text can quote the peer (a field name, say): bounded and made safe.
            logged = sanitize_text(self.close_reason or reason)[:MAX_LOGGED_REASON_CHARS]
            log.info("disconnect %s%s: %s", self.peer, who, logged)

    def _public_reason(self) -> str:
        """What the others see in the leave notice: the parting message, or why the link ended."""
        reason = self.close_reason
        if reason == "quit":
            return self.parting_message
        if reason.startswith(("protocol error", "login refused")):
            return "protocol error"
        if reason.startswith("token refused"):
            # Its account deleted, banned, its password changed: no fault of the client's, and
            # the details are the account's business.
            return "session ended"
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
        self._send_now(ControlError(code=code, message=message).encode())

    def _send_now(self, data: bytes) -> None:
        """Best-effort direct send, only before the send pool owns the socket."""
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass

    def _handshake(self) -> None:
        self.server.count_across_nodes(self)
        config = self.server.config
        deadline = Deadline(config.handshake_timeout)
        handshake = ServerHandshake(self.server.private_key, self.server.public_key_der, self.server.hello_signer.sign)
        server_hello = handshake.receive_hello(*read_frame(self.sock, config.max_frame_size, deadline))
        self.key_thumbprint = handshake.key_thumbprint
        self._send_now(server_hello)
        self.channel = handshake.channel
        request = handshake.receive_login(*read_frame(self.sock, config.max_frame_size, deadline))
        self.server.logged_in(self)  # its login is here: it no longer counts among those logging in
        self.sock.settimeout(None)  # from here the time spent is ours, not the client's
        self.login_request = request
        if isinstance(request, Login):
            self.name = self.server.authenticate_password(self, request)
        else:
            self.name = self.server.authenticate_token(self, request)

    def _enter_room(self) -> None:
        """Open the session: its token and welcome first, then its rooms and what it missed."""
        assert self.channel is not None and self.login_request is not None
        request = self.login_request
        self.device = sanitize_text(request.device.strip())[:MAX_DEVICE_CHARS]
        hub = self.server.hub
        try:
            # Before anything is issued: a refusal here leaves no token to take back.
            rooms, devices = hub.open_session(self, self.device, self.address)
        except HubError as exc:
            raise AuthenticationFailed(exc.code, str(exc)) from None
        except BackendUnavailable as exc:
            raise AuthenticationFailed("unavailable", f"{exc}; try again in a moment") from None
        # Logged once the session is open: a login then refused (too many sessions) is no login.
        log.info("%s ok %s user=%s", "resume" if isinstance(request, Resume) else "login", self.peer, self.name)
        # The time since the client's last frame was ours (a queue for hashing, say): the keepalive
        # counts silence from now, or it could put a ping ahead of the welcome.
        self.last_inbound = time.monotonic()
        self.in_room = True  # from here the reader's finally closes the session in the hub
        self.channel.username = self.name
        if isinstance(request, Login):
            self.channel.login_username = request.username
        token, expires_at = self.server.issue_token(self, self.verified_stamp)
        self.attach_sender(self.server.send_pool.assign())
        config = self.server.config
        offline_since = hub.away_since(self.name) if devices == 1 else 0.0  # 0: another device was on
        # First in the queue: nothing can reach this session before enter_rooms() makes it a member.
        self.deliver(
            Welcome(
                username=self.name,
                token=token,
                expires_at=expires_at,
                rooms=rooms,
                session=self.session_id[:SESSION_ID_CHARS],
                devices=devices,
                flood_burst=config.flood_burst,
                flood_rate=config.flood_rate,
                away_since=offline_since,
                device_token=self.device_token,
            )
        )
        try:
            hub.enter_rooms(
                self,
                rooms,
                since=request.since,
                seen=request.seen,
                resumed=isinstance(request, Resume),
                offline_since=offline_since,
            )
        except BackendUnavailable as exc:  # the welcome went out; the session ends with one clear line
            raise AuthenticationFailed("unavailable", f"{exc}; try again in a moment") from None

    def end(self, reason: str) -> None:
        """End this session from another of the account's devices (/logout): its tokens are revoked."""
        claims = self.claims
        self.finish(reason, Goodbye(reason=reason))
        if claims is not None:
            self.server.tokens.revoke(claims)  # RevocationNotSaved reaches whoever asked (/logout)

    def _handle_frame(self, frame_type: FrameType, body: bytes) -> None:
        if not self.frame_flood.allow():  # pings too: parsing JSON is work, and so is each pong
            raise FloodError("far too many frames")
        if frame_type is FrameType.CONTROL:
            control = decode_control_message(body)
            if isinstance(control, Ping):
                self.send_queue.put_urgent(PONG_FRAME)
            elif not isinstance(control, Pong):
                raise ProtocolError(f"unexpected control message {control.TYPE!r}")
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
        if isinstance(message, Leave):
            self.parting_message = sanitize_text(message.reason.strip())[:MAX_REASON_CHARS]
            self._wait_for_echoes()  # the goodbye after every echo of a line accepted before it
            # Finishing first marks us closing, so the keepalive will not try to refresh a
            # token of the session being revoked (and lose the goodbye and parting message).
            goodbye = "bye"
            try:
                self.server.tokens.revoke(claims)
            except RevocationNotSaved as exc:
                log.error("%s", exc)
                goodbye = "bye; but the server could not record that this session ended: tell its operator"
            self.finish("quit", Goodbye(reason=goodbye))
            return
        if isinstance(message, Command) and message.name == "part":
            self._wait_for_echoes()  # out of the room, a line's echo read back later would not reach it
        ref = getattr(message, "ref", "")
        counted = isinstance(message, Say | Private) and bool(ref)
        if counted:  # counted before it can be echoed, and given back if it is refused
            with self._echoes_due:
                self._unechoed += 1
        accepted = False
        try:
            self._dispatch(message)
            accepted = True
        except HubError as exc:
            self.deliver(ErrorReply(code=exc.code, message=str(exc), ref=ref))
        except BackendUnavailable as exc:  # a line or a command that could not be carried out: say so
            self.deliver(ErrorReply(code="unavailable", message=f"not sent: {exc}", ref=ref))
        except RevocationNotSaved as exc:  # /logout ended the sessions, but a restart would forget it
            log.error("%s", exc)
            self.deliver(
                ErrorReply(
                    code="server_error",
                    message="the sessions were ended, but the server could not record it: tell its operator",
                    ref=ref,
                )
            )
        finally:
            if counted and not accepted:
                with self._echoes_due:
                    self._unechoed -= 1

    def _wait_for_echoes(self) -> None:
        """Wait (up to ``ECHO_WAIT``) until every line this session had accepted is echoed (reader thread)."""
        with self._echoes_due:
            self._echoes_due.wait_for(lambda: self._unechoed <= 0, ECHO_WAIT)

    def _dispatch(self, message: Authenticated) -> None:
        """Run one request of a logged-in user; a refusal raises ``HubError``."""
        hub = self.server.hub
        if isinstance(message, Say):
            hub.say(self, message.room, self._checked_text(message.text), action=message.action, ref=message.ref)
        elif isinstance(message, Private):
            text = self._checked_text(message.text)
            hub.private(self, message.recipient, text, action=message.action, ref=message.ref)
        elif isinstance(message, Who):
            hub.who(self, message.room)
        elif isinstance(message, Command):
            if message.name in LARGE_ANSWERS:
                self._check_backlog(message.name)
            run_command(hub, self, message.name, message.args)
        else:
            raise ProtocolError(f"{message.KIND.name} is not allowed after login")

    def backlog(self) -> int:
        return self.send_queue.waiting_bytes

    def _check_backlog(self, command: str) -> None:
        """``HubError`` if ``command``'s answer would pile up on too much that waits: /history answers
        this device, /join every device of the account here (each enters the room with its lines)."""
        devices = self.server.hub.local_sessions(self.name) if command == "join" else []
        waiting, busiest = max(
            [(self.backlog(), self), *((device.backlog(), device) for device in devices)], key=lambda pair: pair[0]
        )
        if waiting > REQUESTS_WAIT_ABOVE:
            whom = "you" if busiest is self else "another of your devices"
            raise HubError("backlog", f"/{command} must wait: {waiting / 2**20:.0f} MiB sent to {whom} is on its way")

    def _checked_text(self, text: str) -> str:
        """The text of a line, sanitized; ``HubError`` if it cannot be sent as it is."""
        try:
            return check_text(text)
        except ProtocolError as exc:
            raise HubError("bad_message", f"not sent: {exc}") from None

    # ------------------------------------------------------------------ run by this connection's send worker

    def seal_queued(self) -> SealedRun | None:
        """Seal what is queued, up to the outbox's room, for ``write_sealed``; None if nothing may be.

        Only ever run by this connection's one send worker, which writes what it returns next,
        so frames are sealed and written in order. The outbox's high-water mark holds per frame:
        sealing stops once the frames of this round fill the room left, and the rest waits in
        the queue, unsealed. What was taken weighs in the queue until ``write_sealed`` is done.
        """
        room = self.outbox.room()
        if self.closed.is_set() or room <= 0:
            return None  # a full outbox has the flusher schedule us again when it drains
        assert self.channel is not None
        batch, more = self.send_queue.take_batch(SEND_BATCH_SIZE)
        sealed: SealedRun | None = None
        try:
            frames: list[bytes] = []
            close_after = False
            # A run of join notices becomes one Joined, then every run of messages that may travel
            # together one Batch: each frame is sealed and sent on its own, so a login entering 50
            # rooms, or a burst of notices, costs a few frames instead of one or two hundred.
            items = pack_messages(merge_join_notices(batch))
            for index, item in enumerate(items):
                if room <= 0:
                    self.send_queue.put_back(items[index:])  # sealed later, once the outbox has drained
                    more = True
                    break
                if item is OutboundQueue.CLOSE_AFTER_FLUSH:
                    close_after = True  # always the last item queued: finish() closes the queue
                    break
                if isinstance(item, bytes):
                    frames.append(item)
                    room -= len(item)
                    continue
                try:
                    frames.append(self.channel.seal(item))
                    room -= len(frames[-1])
                except MessageTooLarge as exc:
                    # One unsendable message must not cost the client its connection; the
                    # channel's state is unchanged, so the next message seals as usual.
                    log.warning("%s: %s message not sent: %s", self.peer, item.KIND.name, exc)
                except Exception:
                    log.exception("%s: cannot seal a %s message", self.peer, item.KIND.name)
                    self.close("internal error while sending")
                    return None
            if PING_FRAME in frames and self.ping_sent_at <= self.last_inbound:
                # The reply window runs from when the first unanswered ping was written, not from
                # when it was queued: a ping held up behind our own backlog is not the client's fault.
                self.ping_sent_at = time.monotonic()
            sealed = SealedRun(b"".join(frames), close_after, more)
            return sealed
        finally:
            if sealed is None:
                self.send_queue.release_taken()  # handed back, or dropped

    def write_sealed(self, sealed: SealedRun | None) -> bool:
        """Write what ``seal_queued`` returned without blocking; True if more is queued."""
        if sealed is None:
            return False
        try:
            if sealed.data or sealed.close_after:
                self.outbox.write(sealed.data, close_when_empty=sealed.close_after)
            return sealed.more
        finally:
            self.send_queue.release_taken()  # in the outbox now, sent or waiting for the flusher


def _queued_size(item: object) -> int:
    """What a queued item weighs in a send queue: a message's plaintext (encoded once, shared by
    its recipients), a keepalive frame's bytes; the close sign nothing."""
    if isinstance(item, Message):
        return len(item.encoded)
    return len(item) if isinstance(item, bytes) else 0
