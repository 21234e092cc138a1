"""The room backend: the one interface between the chat rules and where rooms really live.

The hub (``securechat.hub``) keeps the chat's rules and this process's sessions; a
backend numbers what is said (ids, sequence numbers and times come from here),
hands it back for delivery, keeps presence, room state and history. This module
holds the interface and the in-process implementation (``MemoryBackend``), which
keeps live state in memory and makes it durable in the SQLite store
(``securechat.history``). A backend shared by several processes (through a broker)
implements the same calls: nothing a call returns is an object that exists only
in this process — every value is plain data or a protocol message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from securechat.history import ChatStore, RoomRecord, StoredMessage, Write, private_stream
from securechat.protocol import Chat, Kind, Notice, ProtocolError, decode_message

log = logging.getLogger("chat.server")

#: What a room's stream carries besides lines: topic changes (joins and leaves are presence, not history).
RoomEvent = Chat | Notice


@dataclass(frozen=True)
class SessionInfo:
    """One logged-in session (device) of an account, as /sessions lists it."""

    account: str
    session_id: str
    device: str
    since: float
    address: str
    #: The away message, or None while the device is not away (an account is away when all are).
    away: str | None = None
    #: When this session last said something (0: not yet).
    active: float = 0.0


@dataclass(frozen=True)
class LineCharge:
    """What a line costs its sender's flood budget (a token bucket: ``rate`` a second, up to ``burst``),
    for a backend that counts budgets in the same step as it stores the line (``charges_lines``)."""

    account: str
    cost: float
    rate: float
    burst: int


class Subscriber(Protocol):
    """Who the backend hands numbered events to, for delivery to this process's sessions."""

    def on_room_event(self, room: str, message: RoomEvent, origin_session: str, ref: str) -> None: ...

    def on_private(self, account: str, message: Chat, origin_session: str, ref: str) -> None: ...

    def on_presence(self, room: str, notice: Notice) -> None: ...

    def on_account_changed(self, account: str) -> None: ...

    def on_account_notice(self, account: str, notice: Notice) -> None: ...

    # Only a shared backend calls these: it read too late what it had to hand over (trimmed meanwhile).
    def on_room_gap(self, room: str, missed: int) -> None: ...

    def on_privates_missed(self, after_id: int, before_id: int) -> None: ...

    def on_control_missed(self) -> None: ...

    def on_members_gone(self, room: str, accounts: list[str]) -> None: ...


class RoomBackend(Protocol):
    """Publish to a room or an account, presence, room state and history."""

    #: True when several server processes share it (what one process sets, the others see).
    shared: bool
    #: True when the publish calls take a ``LineCharge`` (and raise ``OverBudget`` past it): the flood
    #: check and the append are then one step. Else the hub counts and passes none.
    charges_lines: bool

    def start(self, subscriber: Subscriber) -> None: ...
    def close(self) -> None: ...
    def health(self) -> str: ...

    # what is said: numbered here, then handed to the subscriber (in order, per room)
    def publish_room(
        self, room: str, message: RoomEvent, origin_session: str = "", ref: str = "", charge: LineCharge | None = None
    ) -> RoomEvent: ...
    def publish_private(
        self, message: Chat, origin_session: str = "", ref: str = "", charge: LineCharge | None = None
    ) -> Chat: ...
    # hand this process the events of a room after ``after_id`` (a room its sessions are in), until
    # unwatch (the room's last session here left). ``generation`` tells the hub's makings of a room
    # apart (they rise): a call for an older making than one already seen is ignored, so calls that
    # arrive out of order cannot stop the newest watch, nor start a stale one again.
    def watch(self, room: str, after_id: int, generation: int) -> None: ...
    def unwatch(self, room: str, generation: int) -> None: ...

    # who is in a room on the other processes (this process knows its own), and news of their
    # joins and leaves: presence, never history
    def enter_room(self, room: str, account: str, session_id: str) -> None: ...
    # leave_room: True if the account is still in the room through another process, read in the
    # same step as the leave (two processes whose last sessions leave at once: one finds none)
    def leave_room(self, room: str, account: str, session_id: str) -> bool: ...
    def members_elsewhere(self, room: str) -> dict[str, int]: ...
    def announce(self, room: str, notice: Notice) -> None: ...

    # presence
    def add_session(self, info: SessionInfo, limit: int) -> int: ...
    def remove_session(self, account: str, session_id: str) -> int: ...
    def sessions(self, account: str) -> list[SessionInfo]: ...
    def update_session(self, account: str, session_id: str, **changes: object) -> None: ...

    # room state
    def room(self, name: str) -> RoomRecord | None: ...
    def rooms(self) -> list[RoomRecord]: ...
    def create_room(self, record: RoomRecord, limit: int) -> bool: ...
    def set_topic(self, name: str, topic: str) -> None: ...
    def memberships(self, account: str) -> list[str]: ...
    def add_membership(self, account: str, room: str) -> None: ...
    def remove_membership(self, account: str, room: str) -> None: ...
    # the rest of a room's state (scope "#room": roles, modes, bans) and an account's (scope
    # "@account": its ignore list): text values under text keys
    def state(self, scope: str) -> dict[str, str]: ...
    def set_state(self, scope: str, key: str, value: str | None) -> None: ...
    # set_state only if the key still holds ``expected`` (None: absent); False if it did not
    # (changed meanwhile, here or by another process): read it again and retry
    def replace_state(self, scope: str, key: str, expected: str | None, value: str | None) -> bool: ...
    # tell every process that an account's own state changed (its ignore list, its rooms): they reload it
    def account_changed(self, account: str) -> None: ...
    # hand a notice to every session of an account, on every process (an invitation)
    def tell_account(self, account: str, notice: Notice) -> None: ...
    # True for the first of the processes to claim ``key`` within ``seconds`` (the others: False)
    def claim(self, key: str, seconds: float) -> bool: ...

    # history, oldest first
    def recent(self, room: str, limit: int) -> list[RoomEvent]: ...
    def history_before(self, room: str, before_id: int, limit: int) -> list[RoomEvent]: ...
    # after_seq: the room's last sequence number the device saw, when it knows it (a backend whose
    # ids can land out of order across rooms catches up by it)
    def history_since(
        self, room: str, after_id: int, limit: int, after_seq: int | None = None
    ) -> tuple[list[RoomEvent], int]: ...
    def private_since(self, account: str, after_id: int, limit: int) -> list[Chat]: ...
    def private_recent(self, account: str, limit: int) -> list[Chat]: ...


class BackendUnavailable(Exception):
    """The backend cannot be reached just now (a broker restarting); the message says so in one line."""


class BackendMismatch(Exception):
    """This process cannot join the processes already sharing the backend (it holds another cluster
    key, so neither would open the other's lines); the message says how to fix it, in one line."""


class BackendLimit(Exception):
    """A limit of the backend was reached (too many rooms, too many sessions); the message says which."""


class OverBudget(Exception):
    """The line's ``LineCharge`` was more than its sender's flood budget had left: it was not published."""


def encode_event(message: RoomEvent) -> bytes:
    """What a stored event's payload is: its kind, then its JSON."""
    return bytes((message.KIND,)) + message.encoded


def decode_event(payload: bytes) -> RoomEvent | None:
    """The event a stored payload holds, or None if it is not one (an older or damaged row)."""
    try:
        message = decode_message(Kind(payload[0]), payload[1:])
    except (ValueError, IndexError, ProtocolError):
        return None
    return message if isinstance(message, Chat | Notice) else None


#: A change of room state made in memory: its queued write, and how to undo it if that fails.
_Change = tuple[Write, Callable[[], None]]


@dataclass(frozen=True, slots=True)
class _Published:
    """An event numbered by ``MemoryBackend``, to hand out once ``write`` (its saving) is committed."""

    event: RoomEvent
    room: str  # "" for a private line
    origin_session: str
    ref: str
    write: Write | None = None


class MemoryBackend:
    """Rooms in this process, made durable in a ``ChatStore``.

    Nothing is handed out before it is saved: a line shown, echoed or kept for later is in
    the store, so a crash (even ``kill -9``) loses no line anyone saw, and a full disk is
    told to the line's sender (``BackendUnavailable``) rather than lost at the next stop.
    ``publish_lock`` numbers events and queues them in the store in id order; the writer
    commits them in that order, and one thread, the deliverer, hands each out once its
    write is committed, so every session sees a room's events in id order and one
    sender's lines stay in order. The publisher waits for its write meanwhile, never for
    the deliverer. Room state lives in memory under its own lock, and each change waits
    for its write too: one that cannot be saved is undone and refused. With history off
    (``history_limit`` 0) nothing is stored, and events are handed out at once.
    """

    shared = False
    charges_lines = False  # the hub counts flood budgets for it

    def __init__(self, store: ChatStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._subscriber: Subscriber | None = None
        # Held while an event is numbered and handed to the subscriber (see the class docstring).
        self.publish_lock = threading.Lock()
        self._last_id = store.last_id()
        # stream -> its last sequence number (read from the store the first time it is used).
        self._last_seq: dict[str, int] = {}
        # Guards _sessions: account -> session id -> SessionInfo.
        self._sessions_lock = threading.Lock()
        self._sessions: dict[str, dict[str, SessionInfo]] = {}
        # Guards _rooms, _memberships, _state and _pending_writes; the first three loaded once from the store.
        self._state_lock = threading.Lock()
        self._rooms: dict[str, RoomRecord] = {record.name: record for record in store.load_rooms()}
        self._memberships: dict[str, list[str]] = store.load_memberships()
        self._state: dict[str, dict[str, str]] = store.load_state()
        # The write of each thing being changed, until it is settled (and undone if it failed); guarded by
        # _state_lock, whose condition _state_settled is signalled when one is.
        self._pending_writes: dict[tuple[str, ...], Write] = {}
        self._state_settled = threading.Condition(self._state_lock)
        # Guards _to_deliver, _handed_out_through and _delivering; signalled when an event is queued or closing starts.
        self._delivery_changed = threading.Condition()
        # Published events not yet handed out, in id order: the deliverer's work.
        self._to_deliver: deque[_Published] = deque()
        # Every event numbered up to this id is handed out (or was not saved): what reads may show, so
        # that a line saved but not yet handed out is not both read (a catch-up) and then delivered.
        self._handed_out_through = self._last_id
        self._delivering = True
        self._deliverer: threading.Thread | None = None

    def start(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber
        if self.store.keeps_history and self._deliverer is None:
            self._deliverer = threading.Thread(target=self._deliver_loop, name="deliver", daemon=True)
            self._deliverer.start()

    def close(self) -> None:
        self.store.close()  # every write queued is settled by then: the deliverer's queue drains
        with self._delivery_changed:
            self._delivering = False
            self._delivery_changed.notify_all()
        if self._deliverer is not None:
            self._deliverer.join()

    def health(self) -> str:
        return self.store.health()

    # ------------------------------------------------------------------ publishing

    def _number(self, stream: str) -> tuple[int, int, float]:
        """The next id, the stream's next sequence number and the time; called under ``publish_lock``."""
        self._last_id += 1
        last_seq = self._last_seq.get(stream)
        if last_seq is None:
            last_seq = self.store.last_seq(stream)
        self._last_seq[stream] = last_seq + 1
        return self._last_id, last_seq + 1, self._clock()

    def publish_room(
        self, room: str, message: RoomEvent, origin_session: str = "", ref: str = "", charge: LineCharge | None = None
    ) -> RoomEvent:
        """Number, save and hand out a room event; returns once it is saved. ``BackendUnavailable``
        if it could not be (then nobody is handed it)."""
        _refuse_charge(charge)
        with self.publish_lock:
            message_id, seq, now = self._number(room)
            numbered = replace(message, room=room, id=message_id, seq=seq, sent_at=now)
            published = _Published(numbered, room, origin_session, ref)
            write = self._publish(StoredMessage(message_id, room, seq, now, encode_event(numbered)), published)
        if write is not None:
            try:
                _wait_until_saved(write)
            except BackendUnavailable:
                with self.publish_lock:  # a number nobody saw: not counted as a line missed, if still the last
                    if self._last_seq.get(room) == seq:
                        self._last_seq[room] = seq - 1
                raise
        return numbered

    def publish_private(
        self, message: Chat, origin_session: str = "", ref: str = "", charge: LineCharge | None = None
    ) -> Chat:
        """Number, save and hand out a private line (to both accounts), as ``publish_room``."""
        _refuse_charge(charge)
        stream = private_stream(message.sender, message.recipient)
        with self.publish_lock:
            message_id, _, now = self._number(stream)
            numbered = replace(message, private=True, room="", id=message_id, seq=0, sent_at=now)
            published = _Published(numbered, "", origin_session, ref)
            stored = StoredMessage(message_id, stream, self._last_seq[stream], now, encode_event(numbered))
            write = self._publish(stored, published)
        if write is not None:
            _wait_until_saved(write)
        return numbered

    def _publish(self, stored: StoredMessage, published: _Published) -> Write | None:
        """Under ``publish_lock``: queue ``stored`` in the store and ``published`` for the deliverer
        behind it, so that both queues are in id order. With history off, hand it out now (None)."""
        if not self.store.keeps_history:
            self._hand_out(published)
            return None
        write = self.store.append(stored)
        if not write.problem:  # (one refused at once is handed to nobody; one saved already still goes)
            with self._delivery_changed:
                self._to_deliver.append(replace(published, write=write))
                self._delivery_changed.notify()
        return write

    def _deliver_loop(self) -> None:
        """The deliverer: hands out each published event once its write is committed, in id order."""
        while True:
            with self._delivery_changed:
                self._delivery_changed.wait_for(lambda: bool(self._to_deliver) or not self._delivering)
                if not self._to_deliver:
                    return
                published = self._to_deliver[0]
            assert published.write is not None
            problem = published.write.wait(1.0)
            while problem is None and self._delivering:  # the store settles every write, even at close
                problem = published.write.wait(1.0)
            if problem == "":
                try:
                    self._hand_out(published)
                except Exception:  # a fault in one delivery must not stop every later one
                    log.exception("handing out event %d failed", published.event.id)
            with self._delivery_changed:
                self._to_deliver.popleft()
                self._handed_out_through = published.event.id

    def _hand_out(self, published: _Published) -> None:
        """Give ``published`` to the subscriber: a room's event to its room, a private line to both accounts."""
        subscriber = self._subscriber
        if subscriber is None:
            return
        event, origin_session, ref = published.event, published.origin_session, published.ref
        if published.room or not isinstance(event, Chat):
            subscriber.on_room_event(published.room, event, origin_session, ref)
            return
        subscriber.on_private(event.recipient, event, origin_session, ref)
        if event.sender != event.recipient:
            subscriber.on_private(event.sender, event, origin_session, ref)

    def watch(self, room: str, after_id: int, generation: int) -> None:
        """Nothing to do: in one process every event reaches the subscriber as it is published."""

    def unwatch(self, room: str, generation: int) -> None:
        pass

    # ------------------------------------------------------------------ rooms on other processes: none

    def enter_room(self, room: str, account: str, session_id: str) -> None:
        pass

    def leave_room(self, room: str, account: str, session_id: str) -> bool:
        return False

    def members_elsewhere(self, room: str) -> dict[str, int]:
        return {}

    def announce(self, room: str, notice: Notice) -> None:
        pass

    def account_changed(self, account: str) -> None:
        pass  # one process: the hub that changed it knows

    def tell_account(self, account: str, notice: Notice) -> None:
        if self._subscriber is not None:
            self._subscriber.on_account_notice(account, notice)

    def claim(self, key: str, seconds: float) -> bool:
        return True  # one process: whoever asks keeps its own count

    # ------------------------------------------------------------------ presence

    def add_session(self, info: SessionInfo, limit: int) -> int:
        """Register a session; returns how many the account has now. ``BackendLimit`` past ``limit``."""
        with self._sessions_lock:
            sessions = self._sessions.setdefault(info.account, {})
            if info.session_id not in sessions and limit > 0 and len(sessions) >= limit:
                raise BackendLimit(f"{info.account} already has {len(sessions)} sessions, the most allowed")
            sessions[info.session_id] = info
            return len(sessions)

    def remove_session(self, account: str, session_id: str) -> int:
        """Forget a session; returns how many the account still has."""
        with self._sessions_lock:
            sessions = self._sessions.get(account, {})
            sessions.pop(session_id, None)
            if not sessions:
                self._sessions.pop(account, None)
            return len(sessions)

    def sessions(self, account: str) -> list[SessionInfo]:
        with self._sessions_lock:
            return sorted(self._sessions.get(account, {}).values(), key=lambda info: info.since)

    def update_session(self, account: str, session_id: str, **changes: object) -> None:
        """Change fields of a session's ``SessionInfo`` (``away``, ``active``); nothing if it is gone."""
        with self._sessions_lock:
            sessions = self._sessions.get(account, {})
            info = sessions.get(session_id)
            if info is not None:
                sessions[session_id] = replace(info, **changes)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ room state

    def state(self, scope: str) -> dict[str, str]:
        with self._state_lock:
            return dict(self._state.get(scope, {}))

    def replace_state(self, scope: str, key: str, expected: str | None, value: str | None) -> bool:
        return self._change_state(scope, key, value, expected, check=True)

    def set_state(self, scope: str, key: str, value: str | None) -> None:
        self._change_state(scope, key, value)

    def _change_state(
        self, scope: str, key: str, value: str | None, expected: str | None = None, *, check: bool = False
    ) -> bool:
        matched = True

        def decide() -> _Change | None:
            nonlocal matched
            before = self._state.get(scope, {}).get(key)
            if check and before != expected:
                matched = False
                return None
            if before == value:
                return None
            self._put_state(scope, key, value)
            return self.store.set_state(scope, key, value), lambda: self._undo_state(scope, key, value, before)

        self._change(("state", scope, key), decide)
        return matched

    def _put_state(self, scope: str, key: str, value: str | None) -> None:
        """Set (or with None, remove) one key; an empty scope is dropped. Caller holds ``_state_lock``."""
        values = self._state.setdefault(scope, {})
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
        if not values:
            del self._state[scope]

    def _undo_state(self, scope: str, key: str, value: str | None, before: str | None) -> None:
        with self._state_lock:
            if self._state.get(scope, {}).get(key) == value:  # unless changed again meanwhile
                self._put_state(scope, key, before)

    def _change(self, key: tuple[str, ...], decide: Callable[[], _Change | None]) -> None:
        """Make one change of room state. ``decide`` runs under ``_state_lock`` once no earlier change
        of ``key`` waits for its write: it makes the change in memory and returns its queued write
        and how to undo it, or None if there is nothing to change. The change then waits for its
        write, and one not saved is undone and refused (``BackendUnavailable``). Changes of one key
        wait for each other's writes, so none is found made already (or undone) on the strength of a
        write that may yet fail."""
        with self._state_settled:  # (waiting releases _state_lock)
            self._state_settled.wait_for(lambda: key not in self._pending_writes)
            change = decide()
            if change is None:
                return
            write, undo = change
            self._pending_writes[key] = write
        try:
            _wait_until_saved(write)
        except BackendUnavailable:
            undo()
            raise
        finally:
            with self._state_settled:  # settled, and undone if it failed: the next change of key may look
                del self._pending_writes[key]
                self._state_settled.notify_all()

    def room(self, name: str) -> RoomRecord | None:
        with self._state_lock:
            return self._rooms.get(name)

    def rooms(self) -> list[RoomRecord]:
        with self._state_lock:
            return sorted(self._rooms.values(), key=lambda record: record.name)

    def create_room(self, record: RoomRecord, limit: int) -> bool:
        """Create a room unless it exists; True if created. ``BackendLimit`` when ``limit`` rooms exist."""
        created = False

        def decide() -> _Change | None:
            nonlocal created
            if record.name in self._rooms:
                return None
            if limit > 0 and len(self._rooms) >= limit:
                raise BackendLimit(f"the server has {len(self._rooms)} rooms, the most allowed")
            self._rooms[record.name] = record
            created = True

            def undo() -> None:
                with self._state_lock:
                    if self._rooms.get(record.name) is record:
                        del self._rooms[record.name]

            return self.store.save_room(record), undo

        self._change(("room", record.name), decide)
        return created

    def set_topic(self, name: str, topic: str) -> None:
        def decide() -> _Change | None:
            record = self._rooms.get(name)
            if record is None:
                return None
            changed = self._rooms[name] = replace(record, topic=topic)

            def undo() -> None:
                with self._state_lock:
                    if self._rooms.get(name) is changed:
                        self._rooms[name] = record

            return self.store.save_room(changed), undo

        self._change(("room", name), decide)

    def memberships(self, account: str) -> list[str]:
        with self._state_lock:
            return list(self._memberships.get(account, ()))

    def add_membership(self, account: str, room: str) -> None:
        def decide() -> _Change | None:
            rooms = self._memberships.setdefault(account, [])
            if room in rooms:
                return None
            rooms.append(room)

            def undo() -> None:
                with self._state_lock:
                    if room in self._memberships.get(account, []):
                        self._memberships[account].remove(room)

            return self.store.add_membership(account, room), undo

        self._change(("member", account, room), decide)

    def remove_membership(self, account: str, room: str) -> None:
        def decide() -> _Change | None:
            rooms = self._memberships.get(account, [])
            if room not in rooms:
                return None
            at = rooms.index(room)
            rooms.remove(room)

            def undo() -> None:
                with self._state_lock:
                    rooms = self._memberships.setdefault(account, [])
                    if room not in rooms:
                        rooms.insert(at, room)

            return self.store.remove_membership(account, room), undo

        self._change(("member", account, room), decide)

    # ------------------------------------------------------------------ history

    def _events(self, rows: list[StoredMessage]) -> list[RoomEvent]:
        """The events of ``rows``, less those saved but not yet handed out (they are on their way)."""
        with self._delivery_changed:
            handed_out_through = self._handed_out_through
        events = []
        for row in rows:
            if row.id > handed_out_through:
                continue
            event = decode_event(row.payload)
            if event is None:
                continue
            if not (isinstance(event, Chat) and event.private) and event.seq != row.seq:
                event = replace(event, seq=row.seq)  # a notice stored before notices carried theirs
            events.append(event)
        return events

    def recent(self, room: str, limit: int) -> list[RoomEvent]:
        return self._events(self.store.recent(room, limit)) if limit > 0 else []

    def history_before(self, room: str, before_id: int, limit: int) -> list[RoomEvent]:
        return self._events(self.store.before(room, before_id, limit))

    def history_since(
        self, room: str, after_id: int, limit: int, after_seq: int | None = None
    ) -> tuple[list[RoomEvent], int]:
        # Ids are given and stored under one lock here: every room's are in order, after_id suffices.
        rows, over = self.store.since(room, after_id, limit)
        return self._events(rows), over

    def private_since(self, account: str, after_id: int, limit: int) -> list[Chat]:
        return _chats(self._events(self.store.private_since(account, after_id, limit)))

    def private_recent(self, account: str, limit: int) -> list[Chat]:
        return _chats(self._events(self.store.private_recent(account, limit)))


def _chats(events: list[RoomEvent]) -> list[Chat]:
    return [event for event in events if isinstance(event, Chat)]


def _refuse_charge(charge: LineCharge | None) -> None:
    if charge is not None:  # a bug: the hub must count the budget itself (charges_lines is False)
        raise ValueError("this backend does not count flood budgets")


def _wait_until_saved(write: Write) -> None:
    """Return once ``write`` is committed; ``BackendUnavailable`` (said to its author) if it is not.

    No time limit: the writer settles every write (a failure at once, another process's lock within
    its busy timeout), and a change given up on here would still be saved later.
    """
    problem = write.wait()
    if problem:
        raise BackendUnavailable(f"the server could not save it ({problem})")
