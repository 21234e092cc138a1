"""Load clients for the benchmarks: they count deliveries instead of decrypting each one.

A real client spends about 0.7 ms of RSA-OAEP decryption on every message it
receives. A thousand of them in one benchmark process would measure the
benchmark, not the server. ``SamplingChatClient`` therefore uses the project's
own ``ChatClient`` for ``connect()`` and ``login()`` and replaces only the
reading: every sealed frame is parsed (``Envelope``), its sequence number is
checked against and advances ``channel.recv_seq`` exactly as ``open`` would,
and only a random sample is kept, with its arrival time, to be opened and
verified in full after the measured window (``open_samples``). Rare kinds
(error, goodbye, token) are opened at once, as ``ChatClient`` would, and so is a
batch (several messages the server packed into one frame: what a login brings, a
burst of notices), whose notices and lines are counted; a ``LoginDriver`` can keep
its clients' batches to open after the storm instead (``open_kept_batches``).

A ``ReadLoop`` reads for all the load clients of a benchmark from one thread
(``selectors``), where ``ChatClient`` would start a reader thread each: a thread a
client cost the load generator about 23 µs of CPU a delivery, taken from the server
it measures. A ``LoginDriver`` is a ``ReadLoop`` that also logs its clients in.

``PlainLoadClient`` is the same counting reader for the plaintext baseline.

Every message the benchmark sends carries its send time in its text, so an
opened sample gives one end-to-end latency: arrival time minus send time, both
read from ``time.perf_counter`` (CLOCK_MONOTONIC, shared by the whole machine).
"""

from __future__ import annotations

import errno
import os
import random
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from securechat.channel import ConnectionClosed, SecureChannel, SequenceError, read_frame  # noqa: E402
from securechat.client import (  # noqa: E402
    IDLE_TIMEOUT,
    ChatClient,
    ChatError,
    Disconnected,
    KnownHosts,
    LoginRefused,
    frame_writer,
)
from securechat.crypto_utils import CryptoError, PrivateKey  # noqa: E402
from securechat.protocol import (  # noqa: E402
    MAX_FRAME_SIZE,
    SERVER_KINDS,
    Batch,
    Chat,
    Envelope,
    ErrorReply,
    FrameSplitter,
    FrameType,
    Goodbye,
    Joined,
    Kind,
    Message,
    Notice,
    ProtocolError,
    TokenRefresh,
    Welcome,
    decode_control,
    encode_frame,
    read_envelope_head,
    split_payload,
)

#: Text of every benchmark message: "t=<send time> m=<message number> " then filler.
TEXT_LENGTH = 100
#: Most samples one client keeps per phase (bounds memory; the phase sets the probability).
MAX_SAMPLES_PER_CLIENT = 5000
#: How long close() waits for a reader thread, and ReadLoop.stop() for its loop.
READER_JOIN_TIMEOUT = 2.0
#: Frames a load client checks in order and counts without opening: chat lines and notices (what the
#: benchmarks count), and a room's messages when one comes alone (a room's entry comes as a batch).
COUNTED_UNOPENED = frozenset({Kind.CHAT, Kind.NOTICE, Kind.ROOM, Kind.ROSTER, Kind.HISTORY})
#: Bytes a ReadLoop reads from a socket at once.
RECEIVE_SIZE = 65536
#: Longest a ReadLoop waits in select(): how late it may notice a silent connection or a LoginDriver's
#: time running out (add() and stop() wake it at once).
SELECT_TIMEOUT = 0.1
#: How often a ReadLoop looks for connections silent longer than its idle timeout.
IDLE_CHECK_INTERVAL = 1.0
AES_GCM_TAG_SIZE = 16
# Looked up once: an enum member's lookup costs about 0.1 µs, a good part of what a counted frame costs.
_SEALED, _CHAT, _NOTICE = FrameType.SEALED.value, Kind.CHAT, Kind.NOTICE


def bench_text(message_number: int, send_time: float, length: int = TEXT_LENGTH) -> str:
    """A chat line that carries its send time; padded to ``length`` characters."""
    head = f"t={send_time:.7f} m={message_number} "
    return head + "x" * max(0, length - len(head))


def send_time_of(text: str) -> float | None:
    """The send time written by ``bench_text``, or None if ``text`` is not a benchmark line."""
    if not text.startswith("t="):
        return None
    try:
        return float(text[2 : text.index(" ")])
    except ValueError:
        return None


@dataclass
class Sample:
    """One opened delivery: when it arrived and when it was sent."""

    arrived: float
    sent: float

    @property
    def latency(self) -> float:
        return self.arrived - self.sent


def keep_sample(client: Any, arrived: float, buffer: bytes, start: int, end: int) -> None:
    """Keep the chat frame body ``buffer[start:end]`` for later checking, with the client's probability
    and up to its cap; it is copied only if kept.

    ``client`` is a ``SamplingChatClient`` or a ``PlainLoadClient``: both have
    ``sample_probability``, ``raw_samples`` and ``_rng``.
    """
    if (
        client.sample_probability > 0
        and len(client.raw_samples) < MAX_SAMPLES_PER_CLIENT
        and client._rng.random() < client.sample_probability
    ):
        client.raw_samples.append((arrived, buffer[start:end]))


class SamplingChatClient(ChatClient):
    """A ``ChatClient`` whose reader counts CHAT frames and keeps a random sample of them.

    The counters are written by whoever reads the connection (its reader thread, or the
    ``ReadLoop`` given as ``read_loop``, which it joins at login) and read by the
    benchmark's driver (int reads are atomic under the GIL). Set
    ``sample_probability`` before a phase; call ``open_samples()`` after it.
    """

    def __init__(self, *args: Any, read_loop: ReadLoop | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The loop that reads this client's connection once logged in (None: a thread of its own).
        self.read_loop = read_loop
        self.chat_frames = 0
        #: Notices received: one per NOTICE frame, one per name of a merged JOINED frame.
        self.notice_frames = 0
        #: When (``time.perf_counter``) the frame bringing the last notice counted arrived: for a
        #: kept batch, when it arrived, not when it was opened.
        self.last_notice_arrived = 0.0
        self.sample_probability = 0.0
        # (arrival time, sealed frame body); appended by the reader, taken by open_samples().
        self.raw_samples: list[tuple[float, bytes]] = []
        #: Why the reader stopped when it was not asked to ("" while running or after a clean end).
        self.failure = ""
        self._session_key: bytes | None = None
        self._rng = random.Random()
        #: True while a ``ReadLoop`` (or a ``LoginDriver``) reads this connection in place of a reader thread.
        self.driven = False
        #: A sealed welcome taken unopened by ``keep_welcome``, until ``open_kept_welcome``.
        self.kept_welcome = b""
        #: Keep BATCH frames unopened (checked in order) for ``open_kept_batches``, instead of
        #: opening each on arrival: set by a ``LoginDriver`` that keeps welcomes.
        self.keep_batches = False
        # (arrival time, sealed body) of the batches kept by the reader (a LoginDriver's thread),
        # taken by open_kept_batches().
        self.kept_batches: deque[tuple[float, bytes]] = deque()

    def accept_welcome(self, username: str, frame_type: FrameType, body: bytes) -> Welcome:
        welcome = super().accept_welcome(username, frame_type, body)
        assert self.channel is not None
        # Kept for open_samples(), which must work even after close() has dropped the channel.
        self._session_key = self.channel.session_key
        return welcome

    def keep_welcome(self, username: str, frame_type: FrameType, body: bytes) -> bool:
        """Take the server's answer to our login unopened if it is a welcome, to open later.

        Checked and counted as ``accept_welcome`` would before its RSA unwrap (the frame's
        kind and sequence number), and our channel set up as it would be; the unwrap
        itself waits for ``open_kept_welcome``. Returns False, taking nothing, for any
        other answer: that one ``accept_welcome`` must judge (a refusal, say).
        """
        channel = self.channel
        assert channel is not None
        if frame_type is not FrameType.SEALED:
            return False
        envelope = Envelope.decode(body)
        if envelope.kind is not Kind.WELCOME or envelope.seq != channel.recv_seq:
            return False
        channel.recv_seq += 1
        channel.username = self.username = username
        self._session_key = channel.session_key
        self.kept_welcome = body
        return True

    def open_kept_welcome(self) -> str:
        """Open and check the welcome ``keep_welcome`` took: "" if it is our good welcome, else why not."""
        try:
            verifier = self._verifier()
            verifier.recv_seq = Envelope.decode(self.kept_welcome).seq
            message = verifier.open(self.kept_welcome)
        except (ProtocolError, CryptoError) as exc:
            return describe_login_error(ChatError(f"bad reply from the server: {exc}"))
        if not isinstance(message, Welcome) or message.username != self.username:
            return describe_login_error(ChatError("the server sent something unexpected after login"))
        self.rooms = {room: [] for room in message.rooms}
        self.active_room = message.rooms[0] if message.rooms else ""
        with self.send_lock:  # as accept_welcome does: the session may be used from here on
            self.token, self.token_expires_at = message.token, message.expires_at
            self._session_ready = True
        return ""

    def _verifier(self) -> SecureChannel:
        """A channel with this connection's keys, apart from the live one (which the reader owns)."""
        assert self._server_key is not None and self._session_key is not None
        verifier = SecureChannel(self.private_key, self._server_key, is_server=False, allowed_incoming=SERVER_KINDS)
        verifier.username = self.username
        verifier.session_key = self._session_key
        return verifier

    def send_text(self, text: str) -> None:
        self.say(text)

    @property
    def connected(self) -> bool:
        """True while logged in and read, by this client's reader thread or by a ``ReadLoop``."""
        return self.driven or super().connected

    def _start_reader(self) -> None:
        if self.read_loop is None:
            super()._start_reader()
        else:
            self.read_loop.add(self)

    def begin_driven(self, sock: socket.socket) -> None:
        """Take ``sock`` (not yet connected) as this client's connection, for a ``LoginDriver`` to run."""
        self._closing.clear()
        self.sock = sock  # so that close() closes it
        self._frames = frame_writer(sock)

    def close(self) -> None:
        self.driven = False
        if self.read_loop is not None:
            self.read_loop.forget(self)
        super().close()

    def _run_reader(self) -> None:
        sock, channel = self.sock, self.channel
        assert sock is not None and channel is not None
        end = ("connection closed", False)
        try:
            while True:
                frame_type, body = read_frame(sock, MAX_FRAME_SIZE)
                stop = self.take_frame(channel, frame_type, body, time.perf_counter())
                if stop is not None:
                    end = stop
                    return
        except (ConnectionClosed, OSError, ProtocolError, CryptoError) as exc:
            end = self.loss_reason(exc)
        finally:
            self.reading_ended(*end)

    def take_frame_at(
        self, channel: SecureChannel, buffer: bytes, start: int, end: int, arrived: float
    ) -> tuple[str, bool] | None:
        """``take_frame`` for the frame payload ``buffer[start:end]`` (its type byte first).

        A chat line, notice or room entry (``COUNTED_UNOPENED``) is checked and counted from
        its envelope's header alone, and copied only if kept as a sample; any other frame is
        copied out for ``take_frame``. Returns and raises as ``take_frame`` does.
        """
        if buffer[start] == _SEALED:
            kind, seq, _wrapped_size = read_envelope_head(buffer, start + 1, end)
            if kind in COUNTED_UNOPENED:
                self._count_unopened(channel, kind, seq, arrived, buffer, start + 1, end)
                return None
        frame_type, body = split_payload(buffer[start:end])
        return self.take_frame(channel, frame_type, body, arrived)

    def take_frame(
        self, channel: SecureChannel, frame_type: FrameType, body: bytes, arrived: float
    ) -> tuple[str, bool] | None:
        """Count (or keep, or open) one frame received after login.

        Returns None to go on reading, or why the connection ended and whether cleanly.
        Raises ``ProtocolError``, ``CryptoError`` or ``OSError`` (from answering a ping).
        """
        if frame_type is FrameType.CONTROL:
            control = decode_control(body)
            if control["type"] == "ping":
                frames = self._frames
                if frames is not None:  # None once close() has begun
                    self.answer_ping(frames)
            elif control["type"] == "error":
                self.failure = str(control.get("message", "error"))
                return self.failure, False
            return None
        envelope = Envelope.decode(body)
        if envelope.kind is Kind.BATCH:
            if not self.keep_batches:
                self._count_batch(channel.open(body), arrived)
                return None
            # As for a kept welcome: checked in order now, opened (an RSA unwrap) later.
            self._advance(channel, envelope.seq)
            self.kept_batches.append((arrived, body))
            return None
        merged_joins = self._count_merged_joins(envelope) if envelope.kind is Kind.JOINED else 0
        if merged_joins:
            # As for notices below: checked in order and counted, not opened.
            self._advance(channel, envelope.seq)
            self.notice_frames += merged_joins
            self.last_notice_arrived = arrived
            return None
        if envelope.kind in COUNTED_UNOPENED:
            self._count_unopened(channel, envelope.kind, envelope.seq, arrived, body, 0, len(body))
            return None
        if envelope.kind not in SERVER_KINDS:
            raise ProtocolError(f"{envelope.kind.name} is not allowed from the server")
        message = channel.open(body)
        if isinstance(message, Joined):
            # Join notices the server merged while catching up: count each one (rare
            # enough to open, and the counts are what the benchmarks wait on).
            self.notice_frames += len(message.names)
            self.last_notice_arrived = arrived
        elif isinstance(message, TokenRefresh):
            self.token, self.token_expires_at = message.token, message.expires_at
        elif isinstance(message, Goodbye):
            return message.reason, True
        elif isinstance(message, ErrorReply):
            self.failure = f"server error {message.code}: {message.message}"
            if message.fatal:
                return message.message, False
        return None

    def _count_unopened(
        self, channel: SecureChannel, kind: Kind, seq: int, arrived: float, buffer: bytes, start: int, end: int
    ) -> None:
        """Check in order and count a frame of ``COUNTED_UNOPENED`` whose body is ``buffer[start:end]``."""
        self._advance(channel, seq)
        if kind is _CHAT:
            self.chat_frames += 1
            if self.sample_probability:
                keep_sample(self, arrived, buffer, start, end)
        elif kind is _NOTICE:
            self.notice_frames += 1
            self.last_notice_arrived = arrived
        # Anything else is a room entered at login (its roster, its history): checked in order.

    @staticmethod
    def _advance(channel: SecureChannel, seq: int) -> None:
        """What ``channel.open()`` checks before any cryptography, then its bookkeeping: ``seq`` is the next."""
        if seq != channel.recv_seq:
            raise SequenceError(f"sequence number {seq}, expected {channel.recv_seq}")
        channel.recv_seq = seq + 1

    def open_kept_batches(self) -> int:
        """Open and count the batches kept so far (``keep_batches``); returns how many. One that does
        not open is this client's failure, and the rest are left unopened."""
        opened = 0
        verifier = None
        while self.kept_batches:
            arrived, body = self.kept_batches.popleft()
            try:
                verifier = verifier or self._verifier()
                verifier.recv_seq = Envelope.decode(body).seq
                message = verifier.open(body)
                if not isinstance(message, Batch):
                    raise ProtocolError(f"{message.KIND.name} where a batch was")
            except (ProtocolError, CryptoError) as exc:
                self.failure = f"bad frame from the server: {exc}"
                self.kept_batches.clear()
                break
            self._count_batch(message, arrived)
            opened += 1
        return opened

    def _count_batch(self, batch: Message, arrived: float) -> None:
        """Count a batch's notices and lines as if each had come in a frame of its own, at ``arrived``."""
        if not isinstance(batch, Batch):
            raise ProtocolError(f"{batch.KIND.name} where a batch was")
        notices = self.notice_frames
        for part in batch.messages:
            if isinstance(part, Joined):
                self.notice_frames += len(part.names)
            elif isinstance(part, Notice):
                self.notice_frames += 1
            elif isinstance(part, Chat):
                self.chat_frames += 1
        if self.notice_frames > notices:
            self.last_notice_arrived = max(self.last_notice_arrived, arrived)

    def loss_reason(self, exc: BaseException) -> tuple[str, bool]:
        """Why reading stopped on ``exc``, and whether that was a clean end (we were closing)."""
        if isinstance(exc, ConnectionClosed):
            clean = self._closing.is_set()
            return ("closed" if clean else f"connection lost ({exc})"), clean
        if isinstance(exc, TimeoutError):
            return "connection lost (the server stopped answering)", False
        if isinstance(exc, (ProtocolError, CryptoError)):
            return f"bad frame from the server: {exc}", False
        clean = self._closing.is_set()
        if isinstance(exc, OSError):
            return ("closed" if clean else f"connection lost ({exc.strerror or exc})"), clean
        return f"{type(exc).__name__}: {exc}", False

    def reading_ended(self, reason: str, clean: bool) -> None:
        """The connection is over for its reader: say so, once, and shut the socket."""
        if not clean and not self.failure:
            self.failure = reason
        self._events.put(Disconnected(reason=reason, clean=clean))
        self._shutdown_socket()

    def _count_merged_joins(self, envelope: Envelope) -> int:
        """How many names a JOINED frame carries, from its size alone; 0 if that cannot tell.

        Every benchmark user name has the length of ours, and the plaintext is
        ``{"names":["n1",...,"nk"],"room":"#r"}``: 21 + len(room) + k * (length + 3) bytes,
        for one of the rooms we are in (their name lengths differ by less than a name's
        step, so at most one fits). Opening each of these frames would cost the load
        clients an RSA unwrap a real client pays anyway, but one the load generator cannot
        afford beside the server it measures.
        """
        plaintext_size = len(envelope.ciphertext) - AES_GCM_TAG_SIZE
        step = len(self.username) + 3
        counts = set()
        for room_length in {len(room) for room in self.rooms} or {len("#lobby")}:
            count, rest = divmod(plaintext_size - 21 - room_length, step)
            if rest == 0 and count >= 2:
                counts.add(count)
        return counts.pop() if len(counts) == 1 else 0

    def take_raw_samples(self) -> list[tuple[float, bytes]]:
        samples, self.raw_samples = self.raw_samples, []
        return samples

    def open_chats(self, raw_samples: list[tuple[float, bytes]]) -> tuple[list[tuple[float, Chat]], int]:
        """Open and verify kept frames in full: MAC, AES-GCM, RSA unwrap, message type.

        Uses a separate ``SecureChannel`` with the same keys, its expected
        sequence number set to each frame's own (already checked in order by the
        reader), so the live channel is never touched. Returns (arrival time, chat)
        for each frame that verified, and how many did not.
        """
        verifier = self._verifier()
        chats, failures = [], 0
        for arrived, body in raw_samples:
            try:
                verifier.recv_seq = Envelope.decode(body).seq
                message = verifier.open(body)
            except (ProtocolError, CryptoError):
                failures += 1
                continue
            if isinstance(message, Chat):
                chats.append((arrived, message))
            else:
                failures += 1
        return chats, failures

    def open_samples(self, raw_samples: list[tuple[float, bytes]]) -> tuple[list[Sample], int]:
        """Open kept frames as ``open_chats`` does; returns the samples that are benchmark
        lines, and how many frames failed to verify."""
        chats, failures = self.open_chats(raw_samples)
        samples = []
        for arrived, message in chats:
            sent = send_time_of(message.text)
            if sent is not None:
                samples.append(Sample(arrived, sent))
        return samples, failures


def new_clients(
    server: Any,
    count: int,
    keys: Sequence[PrivateKey],
    known_hosts: KnownHosts,
    *,
    first_key: int = 0,
    **options: Any,
) -> list[SamplingChatClient]:
    """``count`` load clients of a running ``harness.ServerProcess``, its key pinned, sharing ``keys`` in turn.

    Not yet connected: the caller decides how they log in (in a pool, or all at once).
    """
    return [
        SamplingChatClient(
            server.host,
            server.port,
            server_fingerprint=server.fingerprint,
            known_hosts=known_hosts,
            private_key=keys[(first_key + index) % len(keys)],
            pace=False,
            **options,
        )
        for index in range(count)
    ]


class PlainLoadClient:
    """A client of ``plain_server.py``: sends framed text, counts and samples what arrives."""

    def __init__(self, host: str, port: int, *, frame_size: int, timeout: float = 30.0) -> None:
        #: Payload size of every frame sent, so the bytes on the wire match a sealed frame's.
        self.frame_size = frame_size
        self.chat_frames = 0
        self.sample_probability = 0.0
        self.raw_samples: list[tuple[float, bytes]] = []
        self.failure = ""
        self._rng = random.Random()
        self._closing = threading.Event()
        # Guards the socket's send side.
        self.send_lock = threading.Lock()
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            frame_type, body = read_frame(self.sock, MAX_FRAME_SIZE)
            if body != b"":  # the welcome frame is the single byte 0x01, read as CONTROL + b""
                raise ConnectionError(f"unexpected welcome from the plain server: {frame_type!r} {body[:20]!r}")
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._run_reader, name="plain-load-reader", daemon=True)
        self._reader.start()

    def send_text(self, text: str) -> None:
        payload = text.encode()
        payload += b" " * max(0, self.frame_size - 1 - len(payload))
        with self.send_lock:
            self.sock.sendall(encode_frame(FrameType.CONTROL, payload))

    def _run_reader(self) -> None:
        try:
            while True:
                _, body = read_frame(self.sock, MAX_FRAME_SIZE)
                arrived = time.perf_counter()
                self.chat_frames += 1
                keep_sample(self, arrived, body, 0, len(body))
        except (ConnectionClosed, ProtocolError, OSError) as exc:
            if not self._closing.is_set():
                self.failure = f"connection lost ({exc})"

    def take_raw_samples(self) -> list[tuple[float, bytes]]:
        samples, self.raw_samples = self.raw_samples, []
        return samples

    def open_samples(self, raw_samples: list[tuple[float, bytes]]) -> tuple[list[Sample], int]:
        samples, failures = [], 0
        for arrived, body in raw_samples:
            sent = send_time_of(body.decode(errors="replace"))
            if sent is None:
                failures += 1
            else:
                samples.append(Sample(arrived, sent))
        return samples, failures

    def close(self) -> None:
        self._closing.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(timeout=READER_JOIN_TIMEOUT)
        self.sock.close()


@dataclass
class LoginOutcome:
    """What happened to one login of a storm: written by whoever drives it, read after it ended."""

    name: str
    finished: float = 0.0
    error: str = ""


def describe_login_error(exc: BaseException) -> str:
    """One line for a failed login, as the storm counts them by reason."""
    if isinstance(exc, LoginRefused):
        return f"refused: {exc.code}"
    if isinstance(exc, ChatError):
        return f"error: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _as_client_error(step: str, exc: BaseException, client: ChatClient) -> BaseException:
    """``exc`` from a driven handshake step as ``ChatClient.connect()`` or ``login()`` raises it.

    So that a storm counts the same failure under the same reason whichever way its
    clients were driven.
    """
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, ConnectionClosed):
        return ChatError(f"the server closed the connection ({exc})")
    if isinstance(exc, (ProtocolError, CryptoError)):
        what = "bad handshake from the server" if step in ("connecting", "hello") else "bad reply from the server"
        return ChatError(f"{what}: {exc}")
    if isinstance(exc, OSError):
        if step == "connecting":
            where = f"{client.host}:{client.port}"
            return ChatError(f"cannot reach the server at {where}: {exc.strerror or exc}")
        if step == "login":
            return ChatError(f"connection lost while logging in: {exc.strerror or exc}")
    return exc


class _Reading:
    """One connection a ``ReadLoop`` reads; touched by the loop's thread only once handed to it."""

    def __init__(self, client: SamplingChatClient, state: str = "reading") -> None:
        self.client = client
        # The loop's own references: close() clears the client's under it.
        self.sock = client.sock
        self.channel = client.channel
        #: Where the frames lie in what arrives, and the start of the next one.
        self.frames = FrameSplitter(MAX_FRAME_SIZE)
        #: "reading" until it ends ("ended"); a LoginDriver's connections begin earlier (see _Driven).
        self.state = state
        #: When bytes last arrived (``time.perf_counter``): a connection silent for longer than the
        #: loop's idle timeout is lost, as a reader thread's socket timeout would find.
        self.last_arrival = time.perf_counter()


class ReadLoop:
    """Reads for many logged-in ``SamplingChatClient``s from one thread, through ``selectors``.

    With a reader thread a client (``ChatClient``'s way), the load generator took about
    0.4 of this machine's 2 cores at N = 200 saturated (about 23 µs of CPU a delivery,
    0.3 cores of it in the readers), all of it taken from the server it measures, and
    N = 1000 meant a thousand threads. This loop takes 0.06 to 0.08 cores there (3 to 4
    µs a delivery; paced, a delivery comes alone and costs it a wake-up, about 25 µs).

    It reads up to RECEIVE_SIZE bytes from a connection at once, takes the arrival time
    once a read (when those bytes arrived), and hands every whole frame in them to the
    client's ``take_frame_at``, which checks and counts it as the reader thread's
    ``take_frame`` does: each frame's sequence number in order, pings answered, errors
    and goodbyes ending the connection. A connection that ends is reported as the reader
    thread reports it (``SamplingChatClient.reading_ended``: its ``failure``, a
    ``Disconnected`` event), and so is one silent for ``idle_timeout`` seconds, the
    reader thread's socket timeout. One thread is enough: at N = 1000 it is busy about
    a tenth of the time, and more of them would take turns at the GIL.

    A client made with ``read_loop=`` hands its connection over at login (``add()``, from
    any thread). ``start()`` starts the loop and ``stop()`` ends it, waiting for its thread
    at most READER_JOIN_TIMEOUT seconds; a ``with`` block does both. A client closed
    while the loop runs is forgotten by it (``forget()``, which ``close()`` calls).
    """

    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT, name: str = "load-reader") -> None:
        self._idle_timeout = idle_timeout
        self._selector = selectors.DefaultSelector()
        #: The connections being read, by client; written by the loop only (and by stop() once it has ended).
        self._reading: dict[SamplingChatClient, _Reading] = {}
        # What add() (a connection) and forget() (None) ask from other threads, in the order asked, taken
        # by the loop at its next turn (deque appends and pops are atomic): the selector is the loop's alone.
        self._requests: deque[tuple[SamplingChatClient, _Reading | None]] = deque()
        # A byte on this pair wakes the loop from select() for add(), forget() and stop().
        self._wake_receive, self._wake_send = socket.socketpair()
        self._wake_receive.setblocking(False)
        self._wake_send.setblocking(False)  # a full pair already holds a wake-up
        self._selector.register(self._wake_receive, selectors.EVENT_READ, None)
        # Set by stop(): ends the loop.
        self._stopping = threading.Event()
        # A daemon, as ChatClient's reader threads are: a benchmark stopped by Ctrl-C must not hang on it.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> ReadLoop:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> float:
        """Start the loop's thread; returns when (``time.perf_counter``)."""
        self._thread.start()
        return time.perf_counter()

    def add(self, client: SamplingChatClient) -> None:
        """Read ``client``'s logged-in connection from now on, in place of a reader thread of its own.

        Safe from any thread; the loop registers it at its next turn. The socket is made
        blocking again (its owner sends with ``sendall``): the loop reads with MSG_DONTWAIT.
        """
        assert client.sock is not None and client.channel is not None
        client.sock.settimeout(None)
        client.driven = True
        self._requests.append((client, _Reading(client)))
        self._wake()

    def forget(self, client: SamplingChatClient) -> None:
        """Stop reading ``client``, which is being closed: its reading ends cleanly if it had not ended.

        Safe from any thread.
        """
        self._requests.append((client, None))
        self._wake()

    def stop(self) -> None:
        """End the loop; the clients stay open (and no longer connected) until closed.

        Waits for the loop's thread at most READER_JOIN_TIMEOUT seconds. A thread still
        stuck in a call then (a send to a server that reads nothing) is left to end at its
        next turn, its selector open; it is a daemon, so the process does not wait for it.
        """
        self._stopping.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(READER_JOIN_TIMEOUT)
        if self._thread.is_alive():
            return
        for client in [*self._reading, *(client for client, _connection in self._requests)]:
            client.driven = False
        self._reading.clear()
        self._requests.clear()
        self._selector.close()
        self._wake_receive.close()
        self._wake_send.close()

    def _wake(self) -> None:
        try:
            self._wake_send.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (the loop has stopped)
            pass

    def _run(self) -> None:
        next_idle_check = time.perf_counter() + IDLE_CHECK_INTERVAL
        try:
            while not self._stopping.is_set():
                for key, _events in self._selector.select(timeout=SELECT_TIMEOUT):
                    connection = key.data
                    if connection is None:
                        self._drain_wake_ups()
                    elif connection.state != "ended":  # else ended earlier in this same batch
                        try:
                            self._service(connection)
                        except Exception as exc:  # one broken connection must not stop the others
                            self._end(connection, exc)
                self._take_requests()
                now = time.perf_counter()
                if now >= next_idle_check:
                    self._end_silent(now)
                    next_idle_check = now + IDLE_CHECK_INTERVAL
                self._after_turn()
        finally:
            self._loop_ended()

    def _drain_wake_ups(self) -> None:
        try:
            while self._wake_receive.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _take_requests(self) -> None:
        # In the order asked: a closed client's descriptor, which a new client's socket may reuse, is
        # let go before that one is added, and a client closed at once is added before it is forgotten.
        while self._requests:
            client, connection = self._requests.popleft()
            if connection is None:
                known = self._reading.get(client)
                if known is not None:
                    self._stop_reading(known, ("closed", True))
                continue
            try:
                self._selector.register(connection.sock, selectors.EVENT_READ, connection)  # type: ignore[arg-type]
            except (ValueError, KeyError, OSError) as exc:  # closed before the loop got to it (clean, then)
                self._stop_reading(connection, client.loss_reason(ConnectionClosed(f"cannot read it: {exc}")))
                continue
            self._reading[client] = connection

    def _end_silent(self, now: float) -> None:
        for connection in [c for c in self._reading.values() if now - c.last_arrival > self._idle_timeout]:
            self._end(connection, TimeoutError(f"nothing received for {self._idle_timeout:g} s"))

    def _service(self, connection: _Reading) -> None:
        """Take what has arrived on ``connection``: one ``recv`` of up to RECEIVE_SIZE bytes, split into frames."""
        try:
            data = connection.sock.recv(RECEIVE_SIZE, socket.MSG_DONTWAIT)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return  # a spurious wake-up: nothing to read after all
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionClosed("connection reset by peer") from exc
        if not data:
            if connection.frames.pending:
                raise ConnectionClosed("connection closed in the middle of a frame")
            raise ConnectionClosed("connection closed by peer")
        arrived = connection.last_arrival = time.perf_counter()
        buffer, spans = connection.frames.feed(data)
        if connection.state != "reading":
            self._take_before_reading(connection, buffer, spans)
            if connection.state != "reading":
                return
        take, channel = connection.client.take_frame_at, connection.channel
        for start, end in spans:
            stop = take(channel, buffer, start, end, arrived)  # type: ignore[arg-type]
            if stop is not None:
                self._stop_reading(connection, stop)
                return

    def _take_before_reading(self, connection: _Reading, buffer: bytes, spans: Iterator[tuple[int, int]]) -> None:
        """Take from ``spans`` the frames that come before ``connection`` is read for its client
        (a LoginDriver's handshake), leaving the rest in ``spans``; set its state "reading" then."""

    def _end(self, connection: _Reading, exc: BaseException) -> None:
        """``connection`` failed with ``exc``: its reading ends, with the reason a reader thread would give."""
        if connection.state == "reading":
            self._stop_reading(connection, connection.client.loss_reason(exc))

    def _stop_reading(self, connection: _Reading, end: tuple[str, bool]) -> None:
        connection.state = "ended"
        self._forget(connection)
        connection.client.driven = False
        connection.client.reading_ended(*end)

    def _forget(self, connection: _Reading) -> None:
        if self._reading.get(connection.client) is connection:
            del self._reading[connection.client]
        if connection.sock is not None:
            try:
                self._selector.unregister(connection.sock)
            except (KeyError, ValueError):  # never registered, or closed under us
                pass

    def _after_turn(self) -> None:
        """Called by the loop after each turn (a select() and what it found)."""

    def _loop_ended(self) -> None:
        """Called by the loop's thread as it ends, however it ends."""


class _Driven(_Reading):
    """One connection a ``LoginDriver`` logs in, then reads; touched by the driver's thread only."""

    def __init__(self, client: SamplingChatClient, name: str, password: str) -> None:
        #: "connecting", "hello" (our hello sent), "login" (our login sent), then "reading",
        #: and last "ended" (failed, or read to its end).
        super().__init__(client, state="connecting")
        self.outcome = LoginOutcome(name)
        self.password = password


class LoginDriver(ReadLoop):
    """Logs many ``SamplingChatClient``s in at once from one thread, then reads for them all.

    With a thread per client, as ``ChatClient.login()`` runs, the load generator took
    about 0.2 of this machine's 2 cores during a 500-login storm, all of it taken from
    the server it measures; this single ``selectors`` loop takes about 0.12. Each
    client still does its own cryptography through ``ChatClient``'s own handshake steps
    (``accept_server_hello`` checks the server's signature and pinned key,
    ``login_frame`` signs the login, ``accept_welcome`` opens the welcome), and once
    logged in it is read as any ``ReadLoop`` reads. A failed login is counted under the
    reason ``login()`` would have raised, and its connection closed.

    With ``keep_welcomes``, a welcome is checked as far as ``accept_welcome`` goes before
    its RSA unwrap, and kept (``SamplingChatClient.keep_welcome``); ``open_kept_welcomes()``
    then opens and checks them all, after the measured window. The batches that follow
    (a login's rooms, bursts of notices) are kept likewise, for ``open_kept_batches()``.
    The server's work is the same either way; what moves is thousands of RSA decryptions
    of the load generator's, out of the CPU the storm shares with the server (a load
    generator on another machine would not take them from it either).

    ``logins`` gives each client's user name and password, in order. ``start()``
    opens every connection; ``wait()`` returns when every login has ended;
    ``stop()`` ends the loop. Every connection's state is the loop's alone:
    ``wait()`` only asks it to give up.
    """

    def __init__(
        self, clients: Sequence[SamplingChatClient], logins: Sequence[tuple[str, str]], *, keep_welcomes: bool = False
    ) -> None:
        super().__init__(name="login-driver")
        self._keep_welcomes = keep_welcomes
        self._connections = [
            _Driven(client, name, password) for client, (name, password) in zip(clients, logins, strict=True)
        ]
        for client in clients:
            client.keep_batches = keep_welcomes
            client.read_loop = self
        #: Logins not yet ended, welcomed or failed; written by the loop only.
        self._pending = len(self._connections)
        # Set by the loop when no login is pending any more (or when the loop has ended).
        self._all_ended = threading.Event()
        # Set by wait() when its time is up (after _given_up_after seconds): the loop then
        # fails every login still pending.
        self._give_up = threading.Event()
        self._given_up_after = 0.0

    @property
    def outcomes(self) -> list[LoginOutcome]:
        return [connection.outcome for connection in self._connections]

    def start(self) -> float:
        """Open every connection at once and start the loop; returns when the storm began."""
        started = time.perf_counter()
        addresses: dict[tuple[str, int], tuple[Any, ...]] = {}
        for connection in self._connections:
            client = connection.client
            try:
                where = (client.host, client.port)
                if where not in addresses:
                    addresses[where] = socket.getaddrinfo(*where, type=socket.SOCK_STREAM)[0]
                family, kind, proto, _name, address = addresses[where]
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                self._fail(connection, exc)
                continue
            client.begin_driven(sock)
            connection.sock = sock
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = sock.connect_ex(address)
            if error not in (0, errno.EINPROGRESS):
                self._fail(connection, OSError(error, os.strerror(error)))
                continue
            self._selector.register(sock, selectors.EVENT_WRITE, connection)
        if self._pending == 0:
            self._all_ended.set()
        super().start()
        return started

    def wait(self, timeout: float) -> list[LoginOutcome]:
        """Every login's outcome once all have ended; after ``timeout`` seconds the rest fail."""
        if not self._all_ended.wait(timeout):
            self._given_up_after = timeout
            self._give_up.set()
            self._wake()
            self._all_ended.wait()  # the loop fails what is pending at its next turn (or has ended)
        return self.outcomes

    def open_kept_welcomes(self) -> int:
        """Open and check every welcome kept unopened; a bad one fails its login. Returns how many.

        Call after ``wait()``. The loop is left alone: a login's outcome and kept
        welcome are not the loop's any more once the login has ended.
        """
        opened = 0
        for connection in self._connections:
            client = connection.client
            if client.kept_welcome and not connection.outcome.error:
                connection.outcome.error = client.open_kept_welcome()
                opened += 1
        return opened

    def open_kept_batches(self) -> int:
        """Open and count every batch the clients kept so far; returns how many. Safe while the loop
        runs: a batch kept meanwhile waits for the next call."""
        return sum(connection.client.open_kept_batches() for connection in self._connections)

    def _after_turn(self) -> None:
        if self._give_up.is_set() and self._pending:
            for connection in self._connections:
                if connection.state in ("connecting", "hello", "login"):
                    self._fail(connection, ChatError(f"no answer within {self._given_up_after:g} s"))

    def _loop_ended(self) -> None:
        self._all_ended.set()  # wait() must not hang on a loop that is gone

    def _service(self, connection: _Reading) -> None:
        if connection.state != "connecting":
            super()._service(connection)
            return
        client, sock = connection.client, connection.sock
        assert sock is not None
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        # Small frames into an empty send buffer: a non-blocking send takes them whole.
        sock.sendall(client.hello_frame())
        connection.state = "hello"
        self._selector.modify(sock, selectors.EVENT_READ, connection)

    def _take_before_reading(self, connection: _Reading, buffer: bytes, spans: Iterator[tuple[int, int]]) -> None:
        assert isinstance(connection, _Driven) and connection.sock is not None
        client = connection.client
        for start, end in spans:
            frame_type, body = split_payload(buffer[start:end])
            if connection.state == "hello":
                client.accept_server_hello(frame_type, body)
                login = client.login_builder(connection.outcome.name, connection.password)
                connection.sock.sendall(client.login_frame(login))  # no lock: nothing else is sent before the welcome
                connection.state = "login"
                continue
            name = connection.outcome.name
            if not (self._keep_welcomes and client.keep_welcome(name, frame_type, body)):
                client.accept_welcome(name, frame_type, body)
            connection.outcome.finished = time.perf_counter()
            # Read from now on as any ReadLoop reads (the rest of spans too); blocking, as add() leaves it.
            connection.channel = client.channel
            connection.sock.setblocking(True)
            connection.state = "reading"
            client.driven = True
            self._reading[client] = connection
            self._login_ended()
            return

    def _end(self, connection: _Reading, exc: BaseException) -> None:
        if connection.state == "reading":
            super()._end(connection, exc)
        elif connection.state != "ended":
            assert isinstance(connection, _Driven)
            self._fail(connection, exc)

    def _fail(self, connection: _Driven, exc: BaseException) -> None:
        """A login that will not happen: its reason kept, its connection closed."""
        connection.outcome.error = describe_login_error(_as_client_error(connection.state, exc, connection.client))
        connection.state = "ended"
        self._forget(connection)
        connection.client.close()
        self._login_ended()

    def _login_ended(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._all_ended.set()
