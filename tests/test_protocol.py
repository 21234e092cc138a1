"""The protocol as data: framing, envelopes, message types and text sanitizing.

Everything here is fed bytes directly (h11 style) or through a socketpair for
``read_frame``; no server is involved. Property tests use hypothesis: whatever
a peer sends, the only exception the parsing layer may raise is ``ProtocolError``.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import struct
import time
import unicodedata
from dataclasses import MISSING

import pytest
from conftest import ROOT, TIMEOUT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from securechat import channel, protocol
from securechat.channel import ConnectionClosed, read_frame
from securechat.protocol import (
    MAX_FRAME_SIZE,
    Envelope,
    FrameDecoder,
    FrameTooLarge,
    FrameType,
    Kind,
    ProtocolError,
    encode_frame,
)

FRAME_TYPES = st.sampled_from(list(FrameType))
FRAMES = st.lists(st.tuples(FRAME_TYPES, st.binary(max_size=300)), max_size=8)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    sorted(
        {spec for cls in protocol.MESSAGE_TYPES.values() for spec in cls.__dataclass_fields__}
        | {"type", "version", "client_key"}
    )
)
#: JSON objects whose keys are mostly real field names, so validation code is reached.
MESSAGE_LIKE_OBJECTS = st.dictionaries(FIELD_NAMES | st.text(max_size=8), JSON_VALUES, max_size=8)


def frames_bytes(frames):
    return b"".join(encode_frame(frame_type, body) for frame_type, body in frames)


def chunks_at(data: bytes, cut_points: list[int]) -> list[bytes]:
    cuts = sorted({min(point, len(data)) for point in cut_points})
    edges = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]


# --------------------------------------------------------------------------- framing


@settings(deadline=None)
@given(frames=FRAMES, cut_points=st.lists(st.integers(min_value=0, max_value=3000), max_size=20))
def test_any_split_of_a_stream_decodes_to_the_same_frames(frames, cut_points):
    data = frames_bytes(frames)
    decoder = FrameDecoder()
    decoded = []
    for chunk in chunks_at(data, cut_points):
        decoded.extend(decoder.feed(chunk))
    assert decoded == frames
    assert decoder.pending == 0


@settings(deadline=None)
@given(frames=st.lists(st.tuples(FRAME_TYPES, st.binary(max_size=50)), min_size=1, max_size=5))
def test_byte_at_a_time_feeding_yields_each_frame_as_soon_as_it_is_complete(frames):
    decoder = FrameDecoder()
    decoded = []
    data = frames_bytes(frames)
    for index in range(len(data)):
        decoded.extend(decoder.feed(data[index : index + 1]))
        assert decoder.pending < protocol.FRAME_HEADER.size + 1 + 50
    assert decoded == frames


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=2000),
    cut_points=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    max_frame_size=st.sampled_from([16, 1000, MAX_FRAME_SIZE]),
)
def test_random_bytes_raise_nothing_but_protocol_error(data, cut_points, max_frame_size):
    decoder = FrameDecoder(max_frame_size)
    try:
        for chunk in chunks_at(data, cut_points):
            for frame_type, _ in decoder.feed(chunk):
                assert isinstance(frame_type, FrameType)
    except ProtocolError:
        pass


def test_four_gib_length_prefix_is_refused_from_the_prefix_alone():
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xff\xff\xff\xff")
    # Nothing but the 4-byte prefix was ever held.
    assert decoder.pending == 4


def test_length_one_past_the_limit_is_refused_and_the_limit_itself_accepted():
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(struct.pack("!I", MAX_FRAME_SIZE + 1))
    body = b"x" * (MAX_FRAME_SIZE - 1)
    frame = encode_frame(FrameType.CONTROL, body)
    assert FrameDecoder().feed(frame) == [(FrameType.CONTROL, body)]


def test_encode_frame_refuses_a_body_over_the_limit():
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(FrameType.SEALED, b"x" * MAX_FRAME_SIZE)


def test_empty_frame_is_refused():
    with pytest.raises(ProtocolError, match="empty"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


@pytest.mark.parametrize("type_byte", [0, 3, 255])
def test_unknown_frame_type_is_refused(type_byte):
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder().feed(b"\x00\x00\x00\x02" + bytes((type_byte,)) + b"x")


def test_frames_after_a_partial_one_wait_for_the_rest():
    first = encode_frame(FrameType.CONTROL, b'{"type":"ping"}')
    second = encode_frame(FrameType.SEALED, b"\x01" * 10)
    decoder = FrameDecoder()
    assert decoder.feed(first + second[:7]) == [(FrameType.CONTROL, b'{"type":"ping"}')]
    assert decoder.pending == 7
    assert decoder.feed(second[7:]) == [(FrameType.SEALED, b"\x01" * 10)]


# --------------------------------------------------------------------------- read_frame on a socket


@pytest.fixture
def socket_pair():
    sender, receiver = socket.socketpair()
    receiver.settimeout(TIMEOUT)
    yield sender, receiver
    sender.close()
    receiver.close()


def test_read_frame_reads_frames_sent_in_pieces(socket_pair):
    sender, receiver = socket_pair
    frames = [(FrameType.CONTROL, b'{"type":"hello"}'), (FrameType.SEALED, bytes(range(256)) * 3)]
    data = frames_bytes(frames)
    for chunk in chunks_at(data, [1, 3, 4, 5, 100, 400]):
        sender.sendall(chunk)
    assert [read_frame(receiver), read_frame(receiver)] == frames


def test_read_frame_refuses_a_four_gib_prefix_without_reading_on(socket_pair, monkeypatch):
    sender, receiver = socket_pair
    requested_sizes = []
    real_recv_exact = channel.recv_exact

    def recording_recv_exact(sock, size, deadline=None):
        requested_sizes.append(size)
        return real_recv_exact(sock, size, deadline)

    monkeypatch.setattr(channel, "recv_exact", recording_recv_exact)
    # Only the prefix is sent: a reader that waited for the body would time out instead.
    sender.sendall(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge):
        read_frame(receiver)
    assert requested_sizes == [4]


def test_read_frame_refuses_an_empty_frame(socket_pair):
    sender, receiver = socket_pair
    sender.sendall(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="empty"):
        read_frame(receiver)


def test_read_frame_honours_a_smaller_limit(socket_pair):
    sender, receiver = socket_pair
    sender.sendall(encode_frame(FrameType.CONTROL, b"x" * 100))
    with pytest.raises(FrameTooLarge):
        read_frame(receiver, max_frame_size=50)


@pytest.mark.parametrize(
    ("sent", "match"),
    [(b"", "closed by peer"), (b"\x00\x00", "middle"), (b"\x00\x00\x00\x10\x01abc", "middle")],
)
def test_read_frame_reports_a_peer_closing(socket_pair, sent, match):
    sender, receiver = socket_pair
    sender.sendall(sent)
    sender.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed, match=match):
        read_frame(receiver)


@settings(deadline=None, max_examples=60)
@given(data=st.binary(max_size=600))
def test_read_frame_on_random_bytes_raises_only_protocol_error_or_closed(data):
    sender, receiver = socket.socketpair()
    try:
        receiver.settimeout(TIMEOUT)
        sender.sendall(data)
        sender.shutdown(socket.SHUT_WR)
        try:
            while True:
                frame_type, _ = read_frame(receiver)
                assert isinstance(frame_type, FrameType)
        except (ProtocolError, ConnectionClosed):
            pass
    finally:
        sender.close()
        receiver.close()


# --------------------------------------------------------------------------- envelopes

ENVELOPES = st.builds(
    Envelope,
    kind=st.sampled_from(list(Kind)),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    wrapped_key=st.binary(max_size=600),
    nonce=st.binary(min_size=protocol.NONCE_SIZE, max_size=protocol.NONCE_SIZE),
    ciphertext=st.binary(min_size=16, max_size=200),
    mac=st.binary(min_size=protocol.MAC_SIZE, max_size=protocol.MAC_SIZE),
)


@settings(deadline=None)
@given(envelope=ENVELOPES)
def test_envelope_round_trips(envelope):
    assert Envelope.decode(envelope.encode()) == envelope


@settings(deadline=None)
@given(body=st.binary(max_size=1000))
def test_envelope_decode_of_random_bytes_raises_only_protocol_error(body):
    try:
        envelope = Envelope.decode(body)
    except ProtocolError:
        return
    assert len(envelope.nonce) == protocol.NONCE_SIZE
    assert len(envelope.mac) == protocol.MAC_SIZE


@settings(deadline=None)
@given(envelope=ENVELOPES, data=st.data())
def test_truncated_envelope_is_refused(envelope, data):
    encoded = envelope.encode()
    minimum = protocol.ENVELOPE_HEADER.size + len(envelope.wrapped_key) + protocol.NONCE_SIZE + 16
    length = data.draw(st.integers(min_value=0, max_value=minimum + protocol.MAC_SIZE - 1))
    with pytest.raises(ProtocolError):
        Envelope.decode(encoded[:length])


def test_envelope_with_an_unknown_kind_is_refused():
    body = struct.pack("!BQH", 99, 0, 0) + b"\0" * (protocol.NONCE_SIZE + 16 + protocol.MAC_SIZE)
    with pytest.raises(ProtocolError, match="unknown message kind"):
        Envelope.decode(body)


def test_envelope_announcing_a_wrapped_key_longer_than_the_body_is_refused():
    body = struct.pack("!BQH", Kind.SAY, 0, 65535) + b"\0" * 200
    with pytest.raises(ProtocolError, match="wrapped key"):
        Envelope.decode(body)


# --------------------------------------------------------------------------- decoding JSON from the peer


@settings(deadline=None)
@given(kind=st.sampled_from(list(Kind)), plaintext=st.binary(max_size=300))
def test_decode_message_of_random_bytes_raises_only_protocol_error(kind, plaintext):
    try:
        message = protocol.decode_message(kind, plaintext)
    except ProtocolError:
        return
    assert kind == message.KIND


@settings(deadline=None)
@given(kind=st.sampled_from(list(Kind)), document=MESSAGE_LIKE_OBJECTS | JSON_VALUES)
def test_decode_message_of_arbitrary_json_raises_only_protocol_error(kind, document):
    try:
        message = protocol.decode_message(kind, json.dumps(document).encode())
    except ProtocolError:
        return
    assert kind == message.KIND


@settings(deadline=None)
@given(body=st.binary(max_size=300) | MESSAGE_LIKE_OBJECTS.map(lambda doc: json.dumps(doc).encode()))
def test_decode_control_of_junk_raises_only_protocol_error(body):
    try:
        control = protocol.decode_control(body)
    except ProtocolError:
        return
    assert isinstance(control["type"], str)


# A frame may hold 64 KiB: enough to nest JSON past the recursion limit, or to
# spell an integer longer than Python's int-from-string limit (ValueError).
HOSTILE_JSON = {
    "deep_array": b"[" * 60000,
    "deep_object": b'{"a":' * 30000,
    "huge_integer": b'{"type":"ping","n":' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("body", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_decode_control_of_hostile_json_raises_protocol_error(body):
    with pytest.raises(ProtocolError):
        protocol.decode_control(body)


@pytest.mark.parametrize("body", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_decode_message_of_hostile_json_raises_protocol_error(body):
    with pytest.raises(ProtocolError):
        protocol.decode_message(Kind.SAY, body)


def test_decode_control_requires_an_object_with_a_text_type():
    assert protocol.decode_control(b'{"type":"ping"}') == {"type": "ping"}
    for body in (b'["ping"]', b'{"type":1}', b"{}", b'"ping"'):
        with pytest.raises(ProtocolError):
            protocol.decode_control(body)


# --------------------------------------------------------------------------- message types

VALID_MESSAGES = [
    protocol.Login(
        username="alice",
        password="pw",
        server_nonce="bm9uY2U=",
        client_key_fingerprint="SHA256:x",
        session_key="a2V5",
        client_signature="c2ln",
    ),
    protocol.Resume(token="t", server_nonce="n", client_key_fingerprint="f", session_key="k", client_signature="s"),
    protocol.Say(token="t", text="hello", action=True),
    protocol.Private(token="t", recipient="bob", text="psst"),
    protocol.Who(token="t"),
    protocol.Leave(token="t", reason="bye"),
    protocol.Welcome(username="alice", token="t", expires_at=10, rooms=["#lobby"], flood_burst=3, flood_rate=1.5),
    protocol.Chat(sender="alice", text="hi", sent_at=1.5, action=False, private=True, recipient="bob"),
    protocol.Notice(event="joined", name="bob"),
    protocol.Roster(members=["alice", "bob"]),
    protocol.ErrorReply(code="flood", message="slow down", fatal=True),
    protocol.TokenRefresh(token="t", expires_at=5),
    protocol.Goodbye(reason="bye"),
]


@pytest.mark.parametrize("message", VALID_MESSAGES, ids=lambda message: type(message).__name__)
def test_every_message_round_trips_through_its_json(message):
    assert protocol.decode_message(message.KIND, message.encoded) == message


def test_every_kind_has_a_message_type_and_a_side():
    assert set(protocol.MESSAGE_TYPES) == set(Kind)
    assert set(Kind) == protocol.CLIENT_KINDS | protocol.SERVER_KINDS
    assert not protocol.CLIENT_KINDS & protocol.SERVER_KINDS


WRONG_FIELD_TYPES = [
    (protocol.Login, "username", 1),
    (protocol.Login, "password", None),
    (protocol.Login, "session_key", b"bytes"),
    (protocol.Resume, "token", ["t"]),
    (protocol.Say, "token", 5),
    (protocol.Say, "text", {"a": 1}),
    (protocol.Say, "action", "yes"),
    (protocol.Private, "recipient", None),
    (protocol.Private, "action", 1),
    (protocol.Who, "token", None),
    (protocol.Leave, "reason", 3.5),
    (protocol.Welcome, "expires_at", "soon"),
    (protocol.Welcome, "rooms", ["#lobby", 2]),
    (protocol.Welcome, "rooms", "#lobby"),
    (protocol.Welcome, "flood_rate", "fast"),
    (protocol.Chat, "sender", None),
    (protocol.Chat, "sent_at", "now"),
    (protocol.Chat, "private", "no"),
    (protocol.Notice, "event", "exploded"),
    (protocol.Notice, "name", 1),
    (protocol.Roster, "members", [None]),
    (protocol.Roster, "devices", [1, True]),  # a bool is no count, though Python calls it an int
    (protocol.Roster, "devices", [1, 2.0]),
    (protocol.ErrorReply, "fatal", "true"),
    (protocol.TokenRefresh, "expires_at", None),
    (protocol.Goodbye, "reason", False),
]


@pytest.mark.parametrize(
    ("cls", "field_name", "bad_value"),
    WRONG_FIELD_TYPES,
    ids=[f"{cls.__name__}.{name}={value!r}" for cls, name, value in WRONG_FIELD_TYPES],
)
def test_messages_reject_wrong_field_types(cls, field_name, bad_value):
    valid = next(message for message in VALID_MESSAGES if type(message) is cls)
    values = {**valid.to_dict(), field_name: bad_value}
    with pytest.raises(ValueError):
        cls(**values)
    with pytest.raises(ProtocolError, match=cls.__name__):
        cls.from_dict(values)


@pytest.mark.parametrize("message", VALID_MESSAGES, ids=lambda message: type(message).__name__)
def test_a_missing_required_field_is_refused(message):
    required = [
        spec.name
        for spec in message.__dataclass_fields__.values()
        if spec.default is MISSING and spec.default_factory is MISSING
    ]
    for name in required:
        values = {key: value for key, value in message.to_dict().items() if key != name}
        with pytest.raises(ProtocolError, match="missing field"):
            protocol.decode_message(message.KIND, json.dumps(values).encode())


# --------------------------------------------------------------------------- batches

#: A room's entry, as the server queues it: the room, its roster, a line from history, the marker.
ENTRY = [
    protocol.Room(room="#dev", members=2),
    protocol.Roster(members=["alice", "bob"], devices=[1, 2], room="#dev"),
    protocol.Chat(sender="bob", text="earlier", sent_at=1.0, room="#dev", id=7, seq=3, history=True),
    protocol.History(room="#dev", count=1, oldest_id=7),
]
JOIN = protocol.Notice(event="joined", name="dave", room="#dev")
LIVE = protocol.Chat(sender="carol", text="now", sent_at=2.0, room="#dev", id=8, seq=4)
WELCOME = protocol.Welcome(username="alice", token="t", expires_at=10, rooms=["#lobby", "#dev"])


def parts_of(packed):
    """What the client reads from packed items: each batch's messages in place of the batch."""
    return [part for item in packed for part in (item.messages if isinstance(item, protocol.Batch) else [item])]


def test_a_batch_round_trips_and_reads_as_its_messages_in_order():
    batch = protocol.Batch(messages=[*ENTRY, JOIN])
    assert protocol.decode_message(Kind.BATCH, batch.encoded) == batch
    assert json.loads(batch.encoded) == batch.to_dict()  # spliced from the parts, yet the same JSON


@pytest.mark.parametrize(
    "document",
    [
        {"kinds": [Kind.WELCOME], "messages": [WELCOME.to_dict()]},  # read alone, at login
        {"kinds": [Kind.BATCH], "messages": [protocol.Batch(messages=ENTRY).to_dict()]},  # no nesting
        {"kinds": [Kind.ERROR], "messages": [{"code": "flood", "message": "slow down"}]},  # acted on at once
        {"kinds": [Kind.SAY], "messages": [{"token": "t", "text": "hi"}]},  # a client's message
        {"kinds": [Kind.NOTICE, Kind.NOTICE], "messages": [JOIN.to_dict()]},
        {"kinds": [], "messages": []},
        {"kinds": [True], "messages": [JOIN.to_dict()]},
        {"kinds": [Kind.NOTICE], "messages": ["joined"]},
        {"messages": [JOIN.to_dict()]},
    ],
    ids=["welcome", "batch", "error", "say", "lengths", "empty", "bool", "not-an-object", "no-kinds"],
)
def test_a_batch_holds_only_what_may_travel_together(document):
    with pytest.raises(ProtocolError, match="Batch"):
        protocol.decode_message(Kind.BATCH, json.dumps(document).encode())


def test_the_send_worker_packs_neighbours_in_order_and_leaves_the_rest_alone():
    queued = [
        WELCOME,
        protocol.Batch(messages=ENTRY[:2]),
        protocol.Batch(messages=ENTRY[2:]),
        JOIN,
        LIVE,  # a live line travels alone, as fan-out sends it
        b"control frame",
        JOIN,
        JOIN,
        protocol.Batch(messages=[JOIN]),
    ]
    packed = protocol.pack_messages(queued)
    assert packed == [
        WELCOME,
        protocol.Batch(messages=[*ENTRY, JOIN]),
        LIVE,
        b"control frame",
        protocol.Batch(messages=[JOIN, JOIN, JOIN]),
    ]
    # A batch of one is sent as its message.
    assert protocol.pack_messages([protocol.Batch(messages=[JOIN]), LIVE]) == [JOIN, LIVE]


def test_packing_splits_what_does_not_fit_a_frame_and_every_packed_frame_fits():
    names = [f"member{number:05d}" for number in range(1500)]
    page = protocol.Roster(members=names, devices=[1] * len(names), room="#big", more=True)
    lines = [
        protocol.Chat(sender="bob", text="x" * 2000, sent_at=1.0, room="#big", id=number, seq=number, history=True)
        for number in range(1, 80)
    ]
    longest = "y" * (protocol.MAX_TEXT_WIRE_BYTES - 100)
    huge = protocol.Chat(sender="bob", text=longest, sent_at=1.0, room="#big", id=80, seq=80, history=True)
    entry = [protocol.Room(room="#big", members=1500), page, page, *lines, huge, ENTRY[3]]
    packed = protocol.pack_messages([protocol.Batch(messages=entry)])
    assert parts_of(packed) == entry and len(packed) > 2
    assert huge in packed  # too large to share a frame: alone, as it would be unpacked
    overhead = 1 + protocol.ENVELOPE_HEADER.size + 512 + protocol.NONCE_SIZE + 16 + protocol.MAC_SIZE
    for item in packed:
        if item is not huge:
            assert len(item.encoded) <= protocol.BATCH_BUDGET
            assert len(item.encoded) + overhead <= MAX_FRAME_SIZE  # sealable beside a 4096-bit wrapped key


def test_login_and_resume_keep_secrets_out_of_repr():
    login = protocol.Login(
        username="alice",
        password="s3cret-pw",
        server_nonce="n",
        client_key_fingerprint="f",
        session_key="k3y",
        client_signature="s",
    )
    resume = protocol.Resume(
        token="tok3n", server_nonce="n", client_key_fingerprint="f", session_key="k3y", client_signature="s"
    )
    assert "s3cret-pw" not in repr(login) and "k3y" not in repr(login)
    assert "tok3n" not in repr(resume) and "k3y" not in repr(resume)
    assert "tok3n" not in repr(protocol.Welcome(username="a", token="tok3n", expires_at=1, rooms=[]))
    assert "tok3n" not in repr(protocol.TokenRefresh(token="tok3n", expires_at=1))
    assert "private words" not in repr(protocol.Chat(sender="a", text="private words", sent_at=0.0))


@pytest.mark.parametrize(
    "message",
    [
        protocol.Say(token="tok3n", text="private words"),
        protocol.Private(token="tok3n", recipient="bob", text="private words"),
        protocol.Who(token="tok3n"),
        protocol.Leave(token="tok3n", reason="private words"),
    ],
    ids=lambda message: type(message).__name__,
)
def test_authenticated_messages_keep_the_token_and_text_out_of_repr(message):
    # Authenticated.__repr__ promises "(...)"; each subclass's @dataclass must not regenerate it.
    assert "tok3n" not in repr(message)
    assert "private words" not in repr(message)


# --------------------------------------------------------------------------- text from the peer

BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


UNSAFE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")
HANGUL_FILLERS = "\u115f\u1160\u3164\uffa0"
SKIN_TONES_AND_EMOJI_STYLE = "\ufe0f\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff"


def expected_sanitized(text: str) -> str:
    """An independent statement of the rule: tabs widen; control, format, surrogate, separator and
    Hangul filler characters become U+FFFD, but for a zero-width joiner between two emoji."""
    out = []
    for index, character in enumerate(text):
        before = text[index - 1] if index else ""
        after = text[index + 1] if index + 1 < len(text) else ""
        joins_emoji = (
            character == "\u200d"
            and after != ""
            and unicodedata.category(after) == "So"
            and (before in SKIN_TONES_AND_EMOJI_STYLE or (before != "" and unicodedata.category(before) == "So"))
        )
        if character == "\t":
            out.append("    ")
        elif joins_emoji:
            out.append(character)
        elif (
            unicodedata.category(character) in UNSAFE_CATEGORIES
            or character in HANGUL_FILLERS
            or 0xE0000 <= ord(character) <= 0xE007F  # tag characters, assigned or not
        ):
            out.append("\ufffd")
        else:
            out.append(character)
    return "".join(out)


@settings(deadline=None)
@given(text=st.text(max_size=200) | st.text(alphabet=st.characters(max_codepoint=0x2070), max_size=50))
def test_sanitize_text_matches_the_rule(text):
    assert protocol.sanitize_text(text) == expected_sanitized(text)


@pytest.mark.parametrize(
    "hostile",
    [
        "\x1b[2J",  # clear screen
        "\x1b]0;pwned\x07",  # retitle the terminal
        "\x9b31m",  # C1 CSI, a one-byte escape
        "line\rover",  # carriage return overwrite
        "a\x08\x08b",  # backspaces
        "\x00nul\x7fdel",
        "user\u202egnp.exe",  # right-to-left override
        "\u2066isolated\u2069",
    ],
)
def test_sanitize_text_removes_escapes_and_bidi_overrides(hostile):
    cleaned = protocol.sanitize_text(hostile)
    assert not any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in cleaned)
    assert "\ufffd" in cleaned


def test_sanitize_text_keeps_emoji_accents_and_cjk():
    friendly = "héllo wörld, e\u0301, 你好世界, こんにちは, 👍🏽 👩\u200d👩\u200d👧 🇫🇷, Ωμέγα"
    assert protocol.sanitize_text(friendly) == friendly


def test_sanitize_text_turns_tabs_into_spaces():
    assert protocol.sanitize_text("a\tb") == "a    b"


def test_check_text_validates_and_sanitizes():
    assert protocol.check_text("hi \x1b[2J") == "hi \ufffd[2J"
    for bad in ("", "   ", "x" * (protocol.MAX_TEXT_BYTES + 1), "é" * (protocol.MAX_TEXT_BYTES // 2 + 1)):
        with pytest.raises(ProtocolError):
            protocol.check_text(bad)
    assert protocol.check_text("é" * (protocol.MAX_TEXT_BYTES // 2)) == "é" * (protocol.MAX_TEXT_BYTES // 2)


@settings(deadline=None)
@given(text=st.text(alphabet=st.characters(categories=["Cs", "L", "N", "Zs", "Cc"]), max_size=50))
@example(text="hi \udcff")
def test_check_text_raises_only_protocol_error(text):
    # JSON from the peer may carry lone surrogates ("\ud800"), which cannot be UTF-8 encoded.
    try:
        checked = protocol.check_text(text)
    except ProtocolError:
        return
    checked.encode("utf-8")


def test_check_text_refuses_a_lone_surrogate():
    with pytest.raises(ProtocolError):
        protocol.check_text("\ud800")


@pytest.mark.parametrize(
    "kind, body",
    [
        (Kind.SAY, b'{"token":"t","text":"\\ud800"}'),
        (Kind.LEAVE, b'{"token":"t","reason":"bye \\udfff"}'),
        (Kind.PRIVATE, b'{"token":"t","recipient":"\\ud800","text":"hi"}'),
        (Kind.WELCOME, b'{"username":"a","token":"t","expires_at":1,"rooms":["\\ud800"]}'),
    ],
)
def test_a_lone_surrogate_in_any_field_is_refused_when_decoding(kind, body):
    # Such a string could never be encoded again: it would break whoever has to forward it.
    with pytest.raises(ProtocolError, match="not valid Unicode"):
        protocol.decode_message(kind, body)


@pytest.mark.parametrize("filler", ["\t", '"', "\\", "\x85", "\x1b"])
def test_text_that_widens_when_escaped_never_makes_an_unsendable_frame(filler):
    # Within the byte limit as typed, but tabs widen and quotes are escaped on the wire:
    # whatever check_text accepts must fit in a frame for a 4096-bit recipient.
    text = "x" + filler * (protocol.MAX_TEXT_BYTES // len(filler.encode()) - 1)
    try:
        checked = protocol.check_text(text)
    except ProtocolError as exc:
        assert "too long" in str(exc)
        return
    chat = protocol.Chat(sender="a" * 32, text=checked, sent_at=time.time(), private=True, recipient="b" * 32)
    overhead = 1 + protocol.ENVELOPE_HEADER.size + 512 + protocol.NONCE_SIZE + 16 + protocol.MAC_SIZE
    assert len(chat.encoded) + overhead <= protocol.MAX_FRAME_SIZE


def test_a_huge_integer_is_refused_not_a_crash():
    with pytest.raises(ProtocolError):
        protocol.decode_message(Kind.CHAT, b'{"sender":"a","text":"t","sent_at":' + b"9" * 400 + b"}")


def test_handshake_signatures_cannot_stand_in_for_each_other():
    nonce, key_der = b"n" * 32, b"k" * 300
    server_signed = protocol.server_hello_signed_data(protocol.server_hello_digest(nonce, nonce, key_der))
    login_signed = protocol.client_auth_signed_data(Kind.LOGIN, nonce, key_der)
    resume_signed = protocol.client_auth_signed_data(Kind.RESUME, nonce, key_der)
    assert len({server_signed, login_signed, resume_signed}) == 3
    assert protocol.client_auth_signed_data(Kind.LOGIN, b"m" * 32, key_der) != login_signed


@pytest.mark.parametrize("name", ["alice", "A", "bob.smith", "x_y-z", "a" * 32, "0day"])
def test_valid_usernames(name):
    assert protocol.validate_username(name) == name


@pytest.mark.parametrize(
    "name", ["", "a" * 33, "alice\n", "-lead", ".hidden", "has space", "semi;colon", "ünï", "a/b", "\x1b[2J", None, 5]
)
def test_invalid_usernames(name):
    with pytest.raises(ValueError, match="ASCII letters"):  # "letters" alone would let "ünï" seem fine
        protocol.validate_username(name)


def test_the_protocol_document_names_the_signature_contexts_the_server_uses():
    """docs/PROTOCOL.md's handshake diagram said chat-server-hello/3 and chat-client-auth/3 while the
    server signs under /5 (as the page's own text said): a client written from the diagram could not
    verify a real server."""
    from securechat.protocol import CLIENT_AUTH_CONTEXT, SERVER_HELLO_CONTEXT

    document = (ROOT / "docs" / "PROTOCOL.md").read_text("utf-8")
    named = set(re.findall(r"chat-(?:server-hello|client-auth)/\d+", document))
    assert named == {SERVER_HELLO_CONTEXT.rstrip(b"\0").decode(), CLIENT_AUTH_CONTEXT.rstrip(b"\0").decode()}
