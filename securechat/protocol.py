"""The chat protocol as data: framing, envelope layout and message types.

Nothing here touches a socket, a thread or a key. Bytes go in, typed messages
come out, and the reverse; the whole protocol can be tested by feeding it bytes.
See docs/PROTOCOL.md for the handshake and the meaning of every field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import struct
import unicodedata
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
from enum import IntEnum
from functools import cached_property
from typing import Any, ClassVar

PROTOCOL_VERSION = 5

#: Largest frame payload accepted or sent. Checked before anything is allocated.
MAX_FRAME_SIZE = 64 * 1024
#: Largest chat text a user may send, in UTF-8 bytes.
MAX_TEXT_BYTES = 32 * 1024
#: Largest chat text once sanitized and JSON-escaped: what must fit in one frame beside the
#: envelope (a 4096-bit wrapped key is 512 bytes) and the other fields, with room to spare.
MAX_TEXT_WIRE_BYTES = MAX_FRAME_SIZE - 2048
#: Longest reason a client may give when leaving.
MAX_REASON_CHARS = 200

FRAME_HEADER = struct.Struct("!I")
ENVELOPE_HEADER = struct.Struct("!BQH")  # kind, sequence number, wrapped-key length
NONCE_SIZE = 12
GCM_TAG_SIZE = 16
MAC_SIZE = 32

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
#: A room name once case-folded: "#" and 1-32 of a-z, 0-9, "_" and "-".
ROOM_PATTERN = re.compile(r"#[a-z0-9_-]{1,32}")
DEFAULT_ROOM = "#lobby"
#: Longest client-chosen reference echoed back with a line (IRCv3's label).
MAX_REF_CHARS = 32
#: Longest room topic, in characters.
MAX_TOPIC_CHARS = 300
#: Longest command argument list a client may send.
MAX_COMMAND_ARGS = 8
#: Longest text (a refusal's code or message) kept from a control frame.
MAX_CONTROL_TEXT_CHARS = 300
#: Most rooms a login may name in ``seen`` (well above the rooms one account may join).
MAX_SEEN_ROOMS = 200
#: Longest device token a login may carry (the server's are about 300 characters).
MAX_DEVICE_TOKEN_CHARS = 1024

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878
#: Random bytes each side contributes to the handshake.
HANDSHAKE_NONCE_SIZE = 32
#: Prefixes of the two handshake signatures, so neither can be passed off as the other.
SERVER_HELLO_CONTEXT = b"chat-server-hello/%d\0" % PROTOCOL_VERSION
CLIENT_AUTH_CONTEXT = b"chat-client-auth/%d\0" % PROTOCOL_VERSION
#: Size of one hello's digest in the batch the server signs.
HELLO_DIGEST_SIZE = 32
#: Most hellos the server answers with one signature. Every client in a batch receives
#: all of its digests (32 bytes each), so this also bounds the server_hello's size.
MAX_HELLO_BATCH = 32


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow (routine: drop the peer)."""


class FrameTooLarge(ProtocolError):
    """A length prefix announced more than the maximum frame size."""


class MessageTooLarge(ValueError):
    """A frame we were asked to send would exceed the maximum frame size.

    A local error, unlike ``FrameTooLarge``: nothing was sent and no state changed,
    so the sender can skip the message and carry on.
    """


class FrameType(IntEnum):
    """First byte of every frame payload."""

    CONTROL = 1  # cleartext JSON: handshake, pre-login errors, keepalive
    SEALED = 2  # encrypted envelope, see Envelope


_SEALED_TYPE_BYTE = bytes((FrameType.SEALED,))


class Kind(IntEnum):
    """What a sealed envelope carries. Bound into the AES-GCM associated data."""

    # client -> server
    LOGIN = 1
    RESUME = 2
    SAY = 3
    PRIVATE = 4
    WHO = 5
    LEAVE = 6
    COMMAND = 7
    # server -> client
    WELCOME = 16
    CHAT = 17
    NOTICE = 18
    ROSTER = 19
    ERROR = 20
    TOKEN = 21
    GOODBYE = 22
    JOINED = 23
    ROOM = 24
    ROOM_LIST = 25
    HISTORY = 26
    SESSIONS = 27
    BATCH = 28


# --------------------------------------------------------------------------- framing


def address_text(host: str, port: int) -> str:
    """``HOST:PORT`` as a user types it back: an IPv6 address in brackets (``[::1]:7878``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_frame(frame_type: FrameType, body: bytes) -> bytes:
    """Return one length-prefixed frame; raises ``MessageTooLarge`` if it would be too large."""
    size = 1 + len(body)
    check_outgoing_size(size)
    return FRAME_HEADER.pack(size) + bytes((frame_type,)) + body


def check_outgoing_size(size: int) -> None:
    """Raise ``MessageTooLarge`` unless a frame payload of ``size`` bytes may be sent."""
    if size > MAX_FRAME_SIZE:
        raise MessageTooLarge(f"frame of {size} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")


class FrameSplitter:
    """Incremental frame parser that copies no frame: feed bytes in any split, and learn where
    each whole payload lies in them.

    For a reader that looks at a few bytes of most frames and keeps few of them (the
    benchmarks' load clients); ``FrameDecoder`` copies every payload out. Raises
    ``ProtocolError`` on an empty or oversized frame, from its prefix alone; the payload's
    type byte is the caller's to check (``split_payload``).
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        # The bytes after the last whole frame: the start of the next one.
        self._rest = b""

    def feed(self, data: bytes) -> tuple[bytes, Iterator[tuple[int, int]]]:
        """Add received bytes; return them (behind any partial frame left over from before) and an
        iterator of (start, end): where each payload now whole lies in them, in order.

        Until the iteration ends, all of them count as pending; then only what follows the
        last whole frame does, kept for the next call: take every span (or give up the stream).
        """
        buffer = self._rest + data if self._rest else data
        self._rest = buffer
        return buffer, self._spans(buffer)

    def _spans(self, buffer: bytes) -> Iterator[tuple[int, int]]:
        header_size, limit, received = FRAME_HEADER.size, self.max_frame_size, len(buffer)
        offset = 0
        while received - offset >= header_size:
            (size,) = FRAME_HEADER.unpack_from(buffer, offset)
            if size == 0 or size > limit:
                check_frame_size(size, limit)
            end = offset + header_size + size
            if end > received:
                break
            yield offset + header_size, end
            offset = end
        self._rest = buffer[offset:]

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._rest)


class FrameDecoder:
    """Incremental frame parser: feed bytes in any split, take whole payloads out.

    Raises ``ProtocolError`` (never anything else) on an empty, oversized or
    unknown frame. The size is checked from the prefix alone, before buffering.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._splitter = FrameSplitter(max_frame_size)

    def feed(self, data: bytes) -> list[tuple[FrameType, bytes]]:
        """Add received bytes; return every frame now complete, in order."""
        buffer, spans = self._splitter.feed(data)
        return [split_payload(buffer[start:end]) for start, end in spans]

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return self._splitter.pending


def check_frame_size(size: int, max_frame_size: int = MAX_FRAME_SIZE) -> None:
    """Raise ``ProtocolError`` unless a length prefix is acceptable."""
    if size == 0:
        raise ProtocolError("empty frame")
    if size > max_frame_size:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the {max_frame_size}-byte limit")


def split_payload(payload: bytes) -> tuple[FrameType, bytes]:
    """Split a frame payload into its type and body."""
    try:
        frame_type = FrameType(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown frame type {payload[0]}") from None
    return frame_type, payload[1:]


# --------------------------------------------------------------------------- envelopes


@dataclass(frozen=True, slots=True)
class Envelope:
    """The cleartext layout of a sealed frame.

    ``kind`` and ``seq`` travel in clear so the receiver can rebuild the
    associated data; both are authenticated by AES-GCM and by the MAC.
    """

    kind: Kind
    seq: int
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes
    mac: bytes

    def header(self) -> bytes:
        return ENVELOPE_HEADER.pack(self.kind, self.seq, len(self.wrapped_key))

    def mac_input(self) -> bytes:
        """The bytes the session MAC covers: everything but the MAC itself."""
        return self.header() + self.wrapped_key + self.nonce + self.ciphertext

    def encode(self) -> bytes:
        return self.mac_input() + self.mac

    @classmethod
    def decode(cls, body: bytes) -> Envelope:
        """Parse a sealed frame body; raises ``ProtocolError`` if it is malformed."""
        kind, seq, wrapped_size = read_envelope_head(body, 0, len(body))
        start = ENVELOPE_HEADER.size
        wrapped_key = body[start : start + wrapped_size]
        nonce_start = start + wrapped_size
        nonce = body[nonce_start : nonce_start + NONCE_SIZE]
        ciphertext = body[nonce_start + NONCE_SIZE : -MAC_SIZE]
        return cls(kind, seq, wrapped_key, nonce, ciphertext, body[-MAC_SIZE:])


#: The smallest sealed body: its header, a nonce, an AES-GCM tag and the MAC (no wrapped key, no text).
MIN_ENVELOPE_SIZE = ENVELOPE_HEADER.size + NONCE_SIZE + GCM_TAG_SIZE + MAC_SIZE
_KINDS_BY_VALUE = {kind.value: kind for kind in Kind}


def read_envelope_head(body: bytes, start: int, end: int) -> tuple[Kind, int, int]:
    """The kind, sequence number and wrapped-key size of the sealed body ``body[start:end]``.

    Checks what ``Envelope.decode`` checks (which calls it) and copies nothing: for a
    reader that only needs a frame's kind and number. Raises ``ProtocolError`` if the
    body is too short for its header and wrapped key, or its kind is unknown.
    """
    size = end - start
    if size < MIN_ENVELOPE_SIZE:
        raise ProtocolError("sealed frame too short")
    kind_value, seq, wrapped_size = ENVELOPE_HEADER.unpack_from(body, start)
    kind = _KINDS_BY_VALUE.get(kind_value)
    if kind is None:
        raise ProtocolError(f"unknown message kind {kind_value}")
    if size < MIN_ENVELOPE_SIZE + wrapped_size:
        raise ProtocolError("sealed frame too short for its wrapped key")
    return kind, seq, wrapped_size


def sealed_frame_size(wrapped_key_size: int, plaintext_size: int) -> int:
    """The payload size of a sealed frame, known before any encryption is done."""
    ciphertext_size = plaintext_size + GCM_TAG_SIZE
    return 1 + ENVELOPE_HEADER.size + wrapped_key_size + NONCE_SIZE + ciphertext_size + MAC_SIZE


def envelope_mac_input(kind: Kind, seq: int, wrapped_key: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    """What ``Envelope.mac_input`` returns, built in one join without an ``Envelope``."""
    return b"".join((ENVELOPE_HEADER.pack(kind, seq, len(wrapped_key)), wrapped_key, nonce, ciphertext))


def encode_sealed_frame(mac_input: bytes, mac: bytes) -> bytes:
    """The whole sealed frame (length prefix, type, envelope); ``Envelope.decode`` reverses it.

    Raises ``MessageTooLarge`` if it would exceed the frame limit.
    """
    size = 1 + len(mac_input) + len(mac)
    check_outgoing_size(size)
    return b"".join((FRAME_HEADER.pack(size), _SEALED_TYPE_BYTE, mac_input, mac))


def associated_data(kind: Kind, seq: int, hop_sender: str, hop_recipient: str) -> bytes:
    """What the AES-GCM tag binds besides the text: kind, sequence, and who to whom.

    The hop is named, not the chat author: from a client the sender is its user
    name ("" before login) and the recipient is "server"; from the server the
    sender is "server" and the recipient is the user. The author of a chat line
    travels inside the ciphertext, set by the server from the session.
    """
    return b"\0".join(
        (
            b"chat/%d" % PROTOCOL_VERSION,
            b"%d" % kind,
            b"%d" % seq,
            hop_sender.encode(),
            hop_recipient.encode(),
        )
    )


# --------------------------------------------------------------------------- handshake signatures


def server_hello_digest(server_nonce: bytes, client_nonce: bytes, client_key_der: bytes) -> bytes:
    """One hello's part of what the server signs: both nonces and the client key it saw,
    so a recording cannot pass. Both sides check that each nonce is 32 bytes, so the
    input reads one way only."""
    return hashlib.sha256(server_nonce + client_nonce + hashlib.sha256(client_key_der).digest()).digest()


def server_hello_signed_data(batch: bytes) -> bytes:
    """What the server signs: the digests of every hello it answers with this one signature.

    ``batch`` is the digests one after another, as the server_hello carries them. In a
    login storm one RSA signature then proves the server's key to many clients at once.
    """
    return SERVER_HELLO_CONTEXT + batch


def hello_batch_digests(batch: bytes) -> list[bytes]:
    """The digests of a server_hello's batch; ``ProtocolError`` if it is not 1 to MAX_HELLO_BATCH of them."""
    count, rest = divmod(len(batch), HELLO_DIGEST_SIZE)
    if rest or not 1 <= count <= MAX_HELLO_BATCH:
        raise ProtocolError("server_hello batch has the wrong size")
    return [batch[index : index + HELLO_DIGEST_SIZE] for index in range(0, len(batch), HELLO_DIGEST_SIZE)]


def client_auth_signed_data(kind: Kind, server_nonce: bytes, server_key_der: bytes) -> bytes:
    """What the client signs in its login or resume: proof it holds the key the token is bound to."""
    return CLIENT_AUTH_CONTEXT + b"%d\0" % kind + server_nonce + hashlib.sha256(server_key_der).digest()


# --------------------------------------------------------------------------- helpers


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, what: str) -> bytes:
    """Decode base64 from the peer; raises ``ProtocolError`` naming the field."""
    if not isinstance(text, str):
        raise ProtocolError(f"{what}: expected base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolError(f"{what}: invalid base64") from None


# What may never reach someone's terminal from a peer: control characters (Cc), format
# characters (Cf: zero-width spaces and joiners, direction marks, isolates and overrides, tags),
# lone surrogates (Cs), the line and paragraph separators (Zl, Zp), and the Hangul fillers,
# letters that draw nothing and so make invisible names. Private use (Co) is left alone.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_HANGUL_FILLERS = "\u115f\u1160\u3164\uffa0"
#: All the tag characters, assigned (Cf) or reserved: they can spell hidden ASCII.
_TAG_CHARACTERS = range(0xE0000, 0xE0080)
#: The planes where Unicode puts format characters (the BMP, the SMP and plane 14). Scanning only
#: these takes 30 ms at import instead of 200; a test checks the result against every code point.
_PLANES_WITH_FORMAT_CHARACTERS = (range(0x0000, 0x20000), range(0xE0000, 0xE1000))
ZERO_WIDTH_JOINER = "\u200d"
#: What may come before a zero-width joiner inside an emoji besides a symbol: the emoji
#: presentation selector (as in the rainbow flag) and the five skin tones.
_EMOJI_MODIFIERS = frozenset("\ufe0f\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff")


def _unsafe_code_points() -> set[int]:
    """Every code point ``sanitize_text`` replaces, except the zero-width joiner it judges apart."""
    unsafe = {
        code_point
        for plane in _PLANES_WITH_FORMAT_CHARACTERS
        for code_point in plane
        if unicodedata.category(chr(code_point)) in _UNSAFE_CATEGORIES
    }
    unsafe.update(map(ord, _HANGUL_FILLERS), _TAG_CHARACTERS)
    unsafe.discard(ord(ZERO_WIDTH_JOINER))
    return unsafe


def _character_class(code_points: set[int]) -> re.Pattern[str]:
    """A compiled ``[...]`` matching exactly ``code_points``, written as ranges of escapes."""
    ranges: list[list[int]] = []
    for code_point in sorted(code_points):
        if ranges and ranges[-1][1] == code_point - 1:
            ranges[-1][1] = code_point
        else:
            ranges.append([code_point, code_point])
    items = (rf"\U{low:08x}" if low == high else rf"\U{low:08x}-\U{high:08x}" for low, high in ranges)
    return re.compile("[" + "".join(items) + "]")


_UNSAFE_CODE_POINTS = _unsafe_code_points()
# Two classes, because re tests a class of code points below U+10000 against one bitmap but
# a class with any above it range by range: four times slower, so the second one only runs
# on text that holds such a code point (an emoji, say).
_UNSAFE_BMP_CHARACTERS = _character_class({cp for cp in _UNSAFE_CODE_POINTS if cp <= 0xFFFF})
_UNSAFE_BMP_CHARACTERS_BUT_NEWLINE = _character_class({cp for cp in _UNSAFE_CODE_POINTS if cp <= 0xFFFF} - {ord("\n")})
_UNSAFE_ASTRAL_CHARACTERS = _character_class({cp for cp in _UNSAFE_CODE_POINTS if cp > 0xFFFF})
_ZERO_WIDTH_JOINERS = re.compile(ZERO_WIDTH_JOINER)


def _keep_joiner_between_emoji(match: re.Match[str]) -> str:
    """A joiner between two emoji draws them as one (👩‍👩‍👧): keep it. Replace any other."""
    text, where = match.string, match.start()
    before = text[where - 1] if where else ""
    after = text[where + 1 : where + 2]
    if (
        after
        and unicodedata.category(after) == "So"
        and (before in _EMOJI_MODIFIERS or (before != "" and unicodedata.category(before) == "So"))
    ):
        return ZERO_WIDTH_JOINER
    return "\ufffd"


def sanitize_text(text: str, *, keep_newlines: bool = False) -> str:
    """Make text safe to print on someone's terminal, and return it.

    Tabs become four spaces. Every other control character (ESC included), format
    character (zero-width spaces, joiners and no-breaks, direction marks, isolates and
    overrides, tag characters), lone surrogate, line or paragraph separator and Hangul
    filler becomes U+FFFD, so a message can neither move the cursor, recolour or retitle
    a screen, nor hide, reorder or invisibly alter what it shows. The one exception is a
    zero-width joiner between two emoji, which draws them as one picture. The result is
    one line; with ``keep_newlines`` it keeps its "\\n" (only those: "\\r" still goes).
    """
    text = text.replace("\t", "    ")
    # Joiners first, while their neighbours are what was sent (U+FFFD is a symbol too).
    if ZERO_WIDTH_JOINER in text:
        text = _ZERO_WIDTH_JOINERS.sub(_keep_joiner_between_emoji, text)
    unsafe = _UNSAFE_BMP_CHARACTERS_BUT_NEWLINE if keep_newlines else _UNSAFE_BMP_CHARACTERS
    text = unsafe.sub("\ufffd", text)
    # Any code point above U+FFFF takes two UTF-16 units; surrogates are gone by now.
    if not text.isascii() and len(text.encode("utf-16-le")) != 2 * len(text):
        text = _UNSAFE_ASTRAL_CHARACTERS.sub("\ufffd", text)
    return text


def normalize_room(name: str) -> str:
    """The canonical form of a room name (``Dev`` and ``#DEV`` are ``#dev``); ``ValueError`` if it is not one."""
    if not isinstance(name, str):
        raise ValueError("a room name is text")
    folded = name.strip().casefold()
    if not folded.startswith("#"):
        folded = "#" + folded
    if not ROOM_PATTERN.fullmatch(folded):
        raise ValueError("room names are # and 1-32 of a-z, 0-9, '_' or '-' (for example #dev)")
    return folded


def validate_username(name: str) -> str:
    """Return ``name`` if it is a valid user name, else raise ``ValueError``."""
    if not isinstance(name, str) or not USERNAME_PATTERN.fullmatch(name):
        raise ValueError(
            "user names are 1-32 characters: ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_text(text: str) -> str:
    """Validate chat text from a peer and return it sanitized.

    A message may hold several lines (a paste): its newlines are kept ("\r\n" and "\r"
    become "\n"), every other control character is replaced. Refuses empty text, text
    over ``MAX_TEXT_BYTES``, and text whose sanitized, JSON-escaped form would not fit a
    frame (tabs widen, quotes are escaped): the size that matters is the one that goes
    on the wire to every recipient.
    """
    if not text.strip():
        raise ProtocolError("empty message")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escape can produce
        raise ProtocolError("message is not valid Unicode") from None
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(f"message longer than {MAX_TEXT_BYTES} bytes")
    sanitized = sanitize_text(text.replace("\r\n", "\n").replace("\r", "\n"), keep_newlines=True)
    if len(json.dumps(sanitized, ensure_ascii=False).encode("utf-8")) > MAX_TEXT_WIRE_BYTES:
        raise ProtocolError("message too long once tabs and quotes are escaped")
    return sanitized


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """Base of every sealed message: a typed record with a JSON form."""

    KIND: ClassVar[Kind]

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: every field is a str, a number, a bool or a list of str, and
        # asdict()'s deep copy of each list item cost 0.27 ms for a 500-name roster.
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}

    @cached_property
    def encoded(self) -> bytes:
        """The JSON plaintext, built once however many recipients it is sealed for."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        """Build from the peer's JSON, checking every field's type."""
        values = {}
        for spec in fields(cls):
            if spec.name not in data:
                if spec.default is not MISSING or spec.default_factory is not MISSING:
                    continue
                raise ProtocolError(f"{cls.__name__}: missing field {spec.name!r}")
            values[spec.name] = data[spec.name]
            _check_unicode(spec.name, values[spec.name])
        try:
            message = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{cls.__name__}: {exc}") from None
        return message


def _check_unicode(name: str, value: Any) -> None:
    """Refuse lone surrogates (JSON's \\ud800) in any text: they cannot be encoded again."""
    for item in value if isinstance(value, list) else (value,):
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(f"{name}: not valid Unicode") from None


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)


#: Whole numbers on the wire are signed 64-bit, as SQLite and Redis store them: a bigger one is
#: refused here, where it is a bad field, not deep in the store, where it is a crash.
MAX_WIRE_INT = 2**63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_WIRE_INT <= value <= MAX_WIRE_INT


def _is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value) and abs(value) < 2**53  # math.isfinite() overflows on huge integers


# The two list checks run over every name of a roster and are counted in C: a generator took
# five times as long, and a login entering 50 rooms of 500 checks 50,000 items. Exactly str and
# int, as JSON makes them (a bool is not a number here).
def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and set(map(type, value)) <= {str}


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and set(map(type, value)) <= {int}


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(item) for item in value)


def _is_seen_map(value: Any) -> bool:
    """A room -> sequence number map, as a client says what it has seen."""
    return isinstance(value, dict) and all(isinstance(key, str) and _is_int(item) for key, item in value.items())


def _require_text(message: Message, *names: str) -> None:
    for name in names:
        _require(isinstance(getattr(message, name), str), f"{name} must be text")


def _require_flags(message: Message, *names: str) -> None:
    for name in names:
        _require(isinstance(getattr(message, name), bool), f"{name} must be true or false")


def _require_ints(message: Message, *names: str) -> None:
    for name in names:
        _require(_is_int(getattr(message, name)), f"{name} must be a whole number")


def _require_ref(message: Message) -> None:
    _require_text(message, "ref")
    _require(len(message.ref) <= MAX_REF_CHARS, "ref is too long")  # type: ignore[attr-defined]


def _require_catch_up(message: Login | Resume) -> None:
    """A login's or resume's ``since``, ``seen`` and ``device``: what the device saw, and its label."""
    _require_text(message, "device")
    _require_ints(message, "since")
    _require(_is_seen_map(message.seen) and len(message.seen) <= MAX_SEEN_ROOMS, "seen must map rooms to numbers")


# client -> server ------------------------------------------------------------


@dataclass(frozen=True)
class Login(Message):
    """Credentials, bound to this connection's client key and server nonce.

    ``client_signature`` is the client key's signature over
    ``client_auth_signed_data``: whoever logs in holds the private key. ``since`` (the
    newest message id this client has seen) and ``seen`` (room -> the last sequence
    number seen there) ask for what was missed; both are empty for a new device.
    """

    KIND: ClassVar[Kind] = Kind.LOGIN
    username: str
    password: str
    server_nonce: str
    client_key_fingerprint: str
    session_key: str
    client_signature: str
    since: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    #: A label for this device, shown in /sessions ("laptop", "ci-bot"); may be empty.
    device: str = ""
    #: The device token an earlier login from this device was given (``Welcome``), or "".
    device_token: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "username", "password", "server_nonce", "client_key_fingerprint", "session_key")
        _require_text(self, "client_signature", "device_token")
        _require(len(self.device_token) <= MAX_DEVICE_TOKEN_CHARS, "device_token is too long")
        _require_catch_up(self)

    def __repr__(self) -> str:  # never let a password reach a log through repr()
        return f"Login(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True)
class Resume(Message):
    """Re-authentication with a still-valid token instead of a password.

    The signature matters most here: a stolen token alone must not resume.
    ``since`` and ``seen`` are as in ``Login``.
    """

    KIND: ClassVar[Kind] = Kind.RESUME
    token: str
    server_nonce: str
    client_key_fingerprint: str
    session_key: str
    client_signature: str
    since: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    device: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "token", "server_nonce", "client_key_fingerprint", "session_key", "client_signature")
        _require_catch_up(self)

    def __repr__(self) -> str:
        return "Resume(token=<hidden>)"


@dataclass(frozen=True)
class Authenticated(Message):
    """Base for every message sent after login: each carries the token."""

    token: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}(...)"


@dataclass(frozen=True, repr=False)
class Say(Authenticated):
    """A line for a room, or an action (``/me``) when ``action`` is true.

    ``ref`` is the client's own label for the line: the server's echo of the accepted
    line, or its refusal, carries it back.
    """

    KIND: ClassVar[Kind] = Kind.SAY
    room: str = ""
    text: str = ""
    action: bool = False
    ref: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "token", "room", "text")
        _require_flags(self, "action")
        _require_ref(self)


@dataclass(frozen=True, repr=False)
class Private(Authenticated):
    """A line for one account only (every device of it)."""

    KIND: ClassVar[Kind] = Kind.PRIVATE
    recipient: str = ""
    text: str = ""
    action: bool = False
    ref: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "token", "recipient", "text")
        _require_flags(self, "action")
        _require_ref(self)


@dataclass(frozen=True, repr=False)
class Who(Authenticated):
    """Ask who is in a room (the answer is one or more ``Roster`` pages)."""

    KIND: ClassVar[Kind] = Kind.WHO
    room: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "token", "room")


@dataclass(frozen=True, repr=False)
class Leave(Authenticated):
    """End this session (``/quit``), with an optional parting message."""

    KIND: ClassVar[Kind] = Kind.LEAVE
    reason: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "token", "reason")


@dataclass(frozen=True, repr=False)
class Command(Authenticated):
    """A server command (``/join``, ``/part``, ``/list``, ``/topic``, ``/history``, ``/sessions``, ``/logout``).

    ``name`` and ``args`` are checked against the server's command table; the answer
    is the command's own message (``Room``, ``RoomList``, ...) or an ``ErrorReply``
    carrying ``ref``.
    """

    KIND: ClassVar[Kind] = Kind.COMMAND
    name: str = ""
    args: list[str] = field(default_factory=list)
    ref: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "token", "name")
        _require(_is_str_list(self.args) and len(self.args) <= MAX_COMMAND_ARGS, "args must be a short list of text")
        _require_ref(self)


# server -> client ------------------------------------------------------------


@dataclass(frozen=True)
class Welcome(Message):
    """Login accepted: the token, this session's id, and the rooms this account is in.

    Each room then follows as a ``Room`` message with its roster and recent history.
    """

    KIND: ClassVar[Kind] = Kind.WELCOME
    username: str
    token: str
    expires_at: int
    rooms: list[str] = field(default_factory=list)
    #: This session's short id, as /sessions shows it.
    session: str = ""
    #: How many sessions (devices) the account has now, this one included.
    devices: int = 1
    #: The server's flood limits, so a client can pace a pasted block instead of losing lines.
    flood_burst: int = 0
    flood_rate: float = 0.0
    #: When the account's last session before this one ended (0: another was open, or never):
    #: lines from history newer than this were said while the user was away.
    away_since: float = 0.0
    #: After a password login: a token for this device to send with its next login (it then
    #: skips the account-wide delay of failed logins). "" after a resume.
    device_token: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "username", "token", "session", "device_token")
        _require_ints(self, "expires_at", "devices", "flood_burst")
        _require(_is_str_list(self.rooms), "rooms must be a list of names")
        _require(
            _is_number(self.flood_rate) and _is_number(self.away_since), "flood_rate and away_since must be numbers"
        )

    def __repr__(self) -> str:
        return f"Welcome(username={self.username!r}, rooms={self.rooms!r})"


@dataclass(frozen=True)
class Chat(Message):
    """A line someone wrote. ``sender`` is set by the server, never by the author.

    ``id`` (server-wide, increasing) and ``sent_at`` come from the server; ``seq`` is the
    line's place in its room (0 for a private line). ``history`` marks a line sent
    again from history; ``ref`` is set only on the echo to the session that sent it.
    """

    KIND: ClassVar[Kind] = Kind.CHAT
    sender: str
    text: str
    sent_at: float
    action: bool = False
    private: bool = False
    recipient: str = ""
    room: str = ""
    id: int = 0
    seq: int = 0
    history: bool = False
    ref: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "sender", "text", "recipient", "room", "ref")
        _require(_is_number(self.sent_at), "sent_at must be a number")
        _require_flags(self, "action", "private", "history")
        _require_ints(self, "id", "seq")

    def __repr__(self) -> str:  # message text stays out of logs
        return f"Chat(sender={self.sender!r}, room={self.room!r}, private={self.private})"


NOTICE_EVENTS = ("joined", "left", "info", "topic", "moderation")


@dataclass(frozen=True)
class Notice(Message):
    """Something happened: ``event`` is joined, left, topic (``text`` is the new topic), info or
    moderation (``name`` did ``action`` to ``target``; ``text`` says it for people).

    ``room`` is "" for a notice about the whole server (it is going down, say).
    """

    KIND: ClassVar[Kind] = Kind.NOTICE
    event: str
    name: str = ""
    text: str = ""
    room: str = ""
    id: int = 0
    sent_at: float = 0.0
    history: bool = False
    #: For moderation: what was done (kick, ban, mute, op, mode, ...) and to whom.
    action: str = ""
    target: str = ""
    #: Its place in the room, as a line's: a room's notices are numbered with its lines, so a
    #: device that counts only the lines would take a notice it saw for a line it missed.
    seq: int = 0

    def __post_init__(self) -> None:
        _require(self.event in NOTICE_EVENTS, "unknown notice event")
        _require_text(self, "name", "text", "room", "action", "target")
        _require_ints(self, "id", "seq")
        _require(_is_number(self.sent_at), "sent_at must be a number")
        _require_flags(self, "history")


@dataclass(frozen=True)
class Roster(Message):
    """Who is in a room, sorted; ``devices`` says how many sessions each has. Long rosters come in
    pages: every page but the last has ``more`` set."""

    KIND: ClassVar[Kind] = Kind.ROSTER
    members: list[str]
    room: str = ""
    devices: list[int] = field(default_factory=list)
    more: bool = False
    #: Those of ``members`` who are away (every device of theirs is): /who shows it.
    away: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(_is_str_list(self.members) and _is_str_list(self.away), "members must be a list of names")
        _require_text(self, "room")
        _require(_is_int_list(self.devices), "devices must be a list of numbers")
        _require_flags(self, "more")


@dataclass(frozen=True)
class ErrorReply(Message):
    """The server refused something. ``fatal`` means the connection is closing; ``ref`` names the
    refused line or command when the client labelled it."""

    KIND: ClassVar[Kind] = Kind.ERROR
    code: str
    message: str
    fatal: bool = False
    ref: str = ""

    def __post_init__(self) -> None:
        _require_text(self, "code", "message", "ref")
        _require_flags(self, "fatal")


@dataclass(frozen=True)
class TokenRefresh(Message):
    """A fresh token replacing one that is past half its life."""

    KIND: ClassVar[Kind] = Kind.TOKEN
    token: str
    expires_at: int

    def __post_init__(self) -> None:
        _require_text(self, "token")
        _require_ints(self, "expires_at")

    def __repr__(self) -> str:
        return "TokenRefresh(...)"


@dataclass(frozen=True)
class Goodbye(Message):
    """The server is closing this connection, and why."""

    KIND: ClassVar[Kind] = Kind.GOODBYE
    reason: str
    #: True when the client should come back (the server is restarting), false when it should not.
    may_reconnect: bool = False

    def __post_init__(self) -> None:
        _require_text(self, "reason")
        _require_flags(self, "may_reconnect")


@dataclass(frozen=True)
class Joined(Message):
    """Several people joined a room, in order: the "joined" notices a recipient had queued, in one frame.

    Each notice costs a sealed frame per recipient, so a burst of N logins would cost
    N(N-1)/2; a recipient whose queue fell behind gets the burst in far fewer frames.
    """

    KIND: ClassVar[Kind] = Kind.JOINED
    names: list[str]
    room: str = ""

    def __post_init__(self) -> None:
        _require(_is_str_list(self.names) and len(self.names) > 0, "names must be a non-empty list of names")
        _require_text(self, "room")


@dataclass(frozen=True)
class Room(Message):
    """This session is now in ``room`` (``joined``), or has left it (``joined`` false, with ``reason``).

    On joining, a ``Roster`` (in pages) and the room's recent history follow.
    """

    KIND: ClassVar[Kind] = Kind.ROOM
    room: str
    joined: bool = True
    topic: str = ""
    members: int = 0
    #: True when this join created the room (the joiner owns it).
    created: bool = False
    reason: str = ""
    #: True when the user asked for it (/join, /part) rather than a login or another device.
    requested: bool = False

    def __post_init__(self) -> None:
        _require_text(self, "room", "topic", "reason")
        _require_flags(self, "joined", "created", "requested")
        _require_ints(self, "members")


@dataclass(frozen=True)
class RoomList(Message):
    """The answer to /list: rooms with their member counts and topics, in pages (``more``)."""

    KIND: ClassVar[Kind] = Kind.ROOM_LIST
    names: list[str]
    members: list[int]
    topics: list[str]
    more: bool = False

    def __post_init__(self) -> None:
        _require(_is_str_list(self.names) and _is_str_list(self.topics), "names and topics must be text")
        _require(_is_int_list(self.members), "members must be numbers")
        _require(len(self.names) == len(self.members) == len(self.topics), "the lists must be as long")
        _require_flags(self, "more")


@dataclass(frozen=True)
class History(Message):
    """Closes a run of history lines for ``room`` ("" for private lines): how many were sent,
    and how many the client missed that are no longer kept."""

    KIND: ClassVar[Kind] = Kind.HISTORY
    room: str
    count: int
    missing: int = 0
    #: The oldest id sent, for /history to page back from; 0 when none.
    oldest_id: int = 0
    #: True when older lines are still kept.
    more: bool = False

    def __post_init__(self) -> None:
        _require_text(self, "room")
        _require_ints(self, "count", "missing", "oldest_id")
        _require_flags(self, "more")


@dataclass(frozen=True)
class Sessions(Message):
    """The answer to /sessions: this account's sessions, one entry per list index."""

    KIND: ClassVar[Kind] = Kind.SESSIONS
    ids: list[str]
    devices: list[str]
    since: list[float]
    addresses: list[str]
    current: str = ""

    def __post_init__(self) -> None:
        _require(_is_str_list(self.ids) and _is_str_list(self.devices), "ids and devices must be text")
        _require(_is_str_list(self.addresses), "addresses must be text")
        _require(_is_number_list(self.since), "since must be numbers")
        _require(len(self.ids) == len(self.devices) == len(self.since) == len(self.addresses), "lists differ")
        _require_text(self, "current")


#: What a ``Batch`` may carry: what entering rooms brings (rooms, rosters, lines from history),
#: notices, and the answers to commands. Never a welcome (the login reads it alone), a token,
#: an error or a goodbye (a client acts on those at once), nor another batch.
BATCHABLE_KINDS = frozenset(
    {Kind.CHAT, Kind.NOTICE, Kind.ROSTER, Kind.JOINED, Kind.ROOM, Kind.ROOM_LIST, Kind.HISTORY, Kind.SESSIONS}
)
#: Most plaintext bytes one batch holds: a frame is 64 KiB, and the envelope (with a 4096-bit
#: wrapped key, 512 bytes) and the batch's own JSON need the rest.
BATCH_BUDGET = MAX_FRAME_SIZE - 2048
#: What each message adds to a batch's JSON besides its own: its kind and two commas.
_BATCH_PART_OVERHEAD = 6
_BATCH_HEAD = b'{"kinds":['
_BATCH_MIDDLE = b'],"messages":['
_BATCH_TAIL = b"]}"


@dataclass(frozen=True)
class Batch(Message):
    """Several server messages that travel together, in order; the client handles each as if it
    had come alone. Only ``BATCHABLE_KINDS`` may be inside.

    Every frame costs the server an RSA wrap. So what belongs together is queued as one
    batch (a room's entry: the room, its roster, its recent lines, the history marker), and
    the send worker packs the batches and loose notices waiting for a client into as few
    frames as fit (``pack_messages``): a login entering 50 rooms, or a burst of join notices
    in 50 rooms, costs a few frames instead of a hundred or more. As queued, a batch may be
    larger than a frame: ``pack_messages`` splits it.
    """

    KIND: ClassVar[Kind] = Kind.BATCH
    messages: list[Message]

    def __post_init__(self) -> None:
        _require(
            isinstance(self.messages, list)
            and len(self.messages) > 0
            and all(isinstance(part, Message) and part.KIND in BATCHABLE_KINDS for part in self.messages),
            "messages must be a non-empty list of messages that may travel in a batch",
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kinds": [int(part.KIND) for part in self.messages], "messages": [p.to_dict() for p in self.messages]}

    @cached_property
    def encoded(self) -> bytes:
        """The JSON of ``to_dict``, spliced from each message's own (cached) encoding: a notice
        shared by many recipients is encoded once, whatever batches it travels in."""
        kinds = b",".join(b"%d" % part.KIND for part in self.messages)
        parts = b",".join(part.encoded for part in self.messages)
        return b"".join((_BATCH_HEAD, kinds, _BATCH_MIDDLE, parts, _BATCH_TAIL))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        kinds: Any = data.get("kinds")
        parts: Any = data.get("messages")
        if not _is_int_list(kinds) or not isinstance(parts, list) or len(kinds) != len(parts) or not parts:
            raise ProtocolError("Batch: kinds and messages must be two lists as long")
        messages = []
        for kind, part in zip(kinds, parts, strict=True):
            if kind not in BATCHABLE_KINDS:
                raise ProtocolError(f"Batch: kind {kind} may not travel in a batch")
            if not isinstance(part, dict):
                raise ProtocolError("Batch: a message is not a JSON object")
            messages.append(MESSAGE_TYPES[Kind(kind)].from_dict(part))
        return cls(messages=messages)

    def __repr__(self) -> str:
        return f"Batch({len(self.messages)} messages)"


def may_batch(item: object) -> bool:
    """Whether the send worker packs a loose ``item`` with its neighbours: a message of
    ``BATCHABLE_KINDS`` but a live chat line, which is sealed alone, as fan-out always sends it."""
    if not isinstance(item, Message) or item.KIND not in BATCHABLE_KINDS:
        return False
    return not (isinstance(item, Chat) and not item.history)


def pack_messages(items: list[Any], budget: int = BATCH_BUDGET) -> list[Any]:
    """What to seal for ``items`` (queued messages, in order): as few frames as fit ``budget``.

    Each ``Batch`` is opened up, and every run of its messages and of the loose messages
    beside it that ``may_batch`` is packed into ``Batch`` messages of at most ``budget``
    bytes of JSON each; a run of one is left as it is. Everything else (a live chat line,
    a welcome, an error, a control frame's bytes) stays alone, where it was: only
    neighbours are packed, in their order, so nothing is reordered. A message too large
    to share a batch goes alone.
    """
    packed: list[Any] = []
    run: list[Message] = []
    empty_size = len(_BATCH_HEAD) + len(_BATCH_MIDDLE) + len(_BATCH_TAIL)
    size = empty_size

    def end_run() -> None:
        packed.append(Batch(messages=list(run)) if len(run) > 1 else run[0])
        run.clear()

    for item in items:
        if isinstance(item, Batch):
            parts = item.messages
        elif may_batch(item):
            parts = [item]
        else:
            if run:
                end_run()
                size = empty_size
            packed.append(item)
            continue
        for part in parts:
            part_size = len(part.encoded) + _BATCH_PART_OVERHEAD
            if run and size + part_size > budget:
                end_run()
                size = empty_size
            run.append(part)
            size += part_size
    if run:
        end_run()
    return packed


MESSAGE_TYPES: dict[Kind, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Login,
        Resume,
        Say,
        Private,
        Who,
        Leave,
        Command,
        Welcome,
        Chat,
        Notice,
        Roster,
        ErrorReply,
        TokenRefresh,
        Goodbye,
        Joined,
        Room,
        RoomList,
        History,
        Sessions,
        Batch,
    )
}

#: Which kinds each side may send, so a client cannot send a server message.
CLIENT_KINDS = frozenset({Kind.LOGIN, Kind.RESUME, Kind.SAY, Kind.PRIVATE, Kind.WHO, Kind.LEAVE, Kind.COMMAND})
SERVER_KINDS = frozenset(MESSAGE_TYPES) - CLIENT_KINDS


def decode_message(kind: Kind, plaintext: bytes) -> Message:
    """Turn a decrypted plaintext into its message type; raises ``ProtocolError``."""
    try:
        data = json.loads(plaintext.decode("utf-8"))
    except (ValueError, RecursionError):  # includes JSONDecodeError, UnicodeDecodeError, huge integers
        raise ProtocolError("sealed message is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("sealed message is not a JSON object")
    return MESSAGE_TYPES[kind].from_dict(data)


# --------------------------------------------------------------------------- control frames


def encode_control(message_type: str, **values: Any) -> bytes:
    """A cleartext control frame: handshake, pre-login error, keepalive."""
    body = json.dumps({"type": message_type, **values}, separators=(",", ":")).encode()
    return encode_frame(FrameType.CONTROL, body)


def decode_control(body: bytes) -> dict[str, Any]:
    """Parse a control frame body; it must be a JSON object with a string ``type``."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # includes JSONDecodeError, UnicodeDecodeError, huge integers
        raise ProtocolError("control frame is not UTF-8 JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("control frame has no type")
    return data


class VersionMismatch(ProtocolError):
    """A hello for another protocol version: told to the peer plainly, since it is no attack."""

    def __init__(self, version: object) -> None:
        known = _is_int(version) and 0 <= version < 1000  # type: ignore[operator]
        shown = version if known else "unknown"
        super().__init__(f"hello for protocol version {shown}, not {PROTOCOL_VERSION}")


@dataclass(frozen=True)
class Control:
    """Base of the cleartext control messages: the handshake, refusals before a session, keepalive.

    Bytes fields travel as base64; ``decode`` checks every field once, at the edge.
    """

    TYPE: ClassVar[str]

    def encode(self) -> bytes:
        """The whole control frame."""
        values = {
            spec.name: b64encode(value) if isinstance(value := getattr(self, spec.name), bytes) else value
            for spec in fields(self)
        }
        return encode_control(self.TYPE, **values)


@dataclass(frozen=True)
class Hello(Control):
    """The client's first frame: its public key (DER) and a fresh nonce the server must sign."""

    TYPE: ClassVar[str] = "hello"
    version: int
    client_key: bytes
    nonce: bytes

    def __repr__(self) -> str:
        return f"Hello(version={self.version})"


@dataclass(frozen=True)
class ServerHello(Control):
    """The server's answer: its key, its nonce, and a signature over a batch of hello digests holding this one."""

    TYPE: ClassVar[str] = "server_hello"
    version: int
    server_key: bytes
    nonce: bytes
    batch: bytes
    signature: bytes

    def __repr__(self) -> str:
        return f"ServerHello(version={self.version}, digests={len(self.batch) // HELLO_DIGEST_SIZE})"


@dataclass(frozen=True)
class ControlError(Control):
    """A refusal before a session exists (or of a connection): ``code`` for programs, ``message`` for people."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str


@dataclass(frozen=True)
class Ping(Control):
    """Keepalive: are you there?"""

    TYPE: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Pong(Control):
    """Keepalive: yes."""

    TYPE: ClassVar[str] = "pong"


CONTROL_TYPES: dict[str, type[Control]] = {cls.TYPE: cls for cls in (Hello, ServerHello, ControlError, Ping, Pong)}


def decode_control_message(body: bytes) -> Control:
    """The typed control message of a frame body; ``ProtocolError`` if it is malformed.

    A hello for another protocol version raises ``VersionMismatch`` before its other
    fields are looked at: they may differ in another version.
    """
    data = decode_control(body)
    cls = CONTROL_TYPES.get(data["type"])
    if cls is None:
        raise ProtocolError(f"unknown control message {data['type'][:40]!r}")
    if cls in (Hello, ServerHello) and data.get("version") != PROTOCOL_VERSION:
        raise VersionMismatch(data.get("version"))
    values: dict[str, Any] = {}
    for spec in fields(cls):
        value = data.get(spec.name)
        if spec.type == "bytes":
            values[spec.name] = b64decode(value, spec.name)
        elif spec.type == "int":
            _require_protocol(_is_int(value), f"{spec.name}: expected a number")
            values[spec.name] = value
        else:
            # Text from the peer is shown to a person: made safe here, and kept short.
            if not isinstance(value, str):
                raise ProtocolError(f"{spec.name}: expected text")
            values[spec.name] = sanitize_text(value)[:MAX_CONTROL_TEXT_CHARS]
    return cls(**values)


def _require_protocol(condition: bool, problem: str) -> None:
    if not condition:
        raise ProtocolError(problem)
