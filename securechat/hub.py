"""The chat's rules, above the backend: sessions, rooms, lines, private messages and commands.

The hub is what a connection talks to once its user is logged in. It knows the
sessions of this process and the rooms they are in (``securechat.rooms.Room``:
local fan-out and the pacing of join notices); everything shared — numbering,
presence, room state, history — goes through the ``RoomBackend``. No sockets and
no cryptography: a session is a ``Member``, and a refusal is a ``HubError`` that
the connection turns into an error reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from securechat.accounts import RevocationNotSaved
from securechat.backend import BackendLimit, RoomBackend, RoomEvent, SessionInfo
from securechat.history import RoomRecord
from securechat.protocol import (
    DEFAULT_ROOM,
    MAX_FRAME_SIZE,
    MAX_TOPIC_CHARS,
    Chat,
    History,
    Notice,
    RoomList,
    Roster,
    Sessions,
    normalize_room,
    sanitize_text,
)
from securechat.protocol import Room as RoomMessage
from securechat.ratelimit import FloodControl
from securechat.rooms import Member, NoticePacer, Room

log = logging.getLogger("chat.server")

#: Bytes of names, topics and the like one list page may hold: a frame is 64 KiB, and the
#: envelope, a wrapped key and the JSON around the list need the rest.
PAGE_BUDGET = MAX_FRAME_SIZE // 2
#: Shown as a session's id in /sessions and taken by /logout: enough to tell five apart.
SESSION_ID_CHARS = 8
#: Lines /history sends when no number is given, and the most it sends at once.
HISTORY_PAGE = 50
MAX_HISTORY_PAGE = 500


class HubError(Exception):
    """A request was refused; ``code`` and the one-line message go back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Session(Member, Protocol):
    """What the hub needs of a logged-in connection beyond ``Member``: ending it from elsewhere."""

    def end(self, reason: str) -> None:
        """End this session for good (revoking its tokens): /logout from another device."""


@dataclass
class HubConfig:
    """The hub's limits and defaults (the server's options set them)."""

    default_room: str = DEFAULT_ROOM
    max_rooms: int = 1000
    max_rooms_per_account: int = 50
    max_sessions: int = 5
    #: Room lines sent to whoever joins, from memory; also the recent lines a room keeps.
    join_history: int = 50
    #: Most lines sent to a device catching up on one room or on its private messages.
    catch_up_limit: int = 1000
    flood_burst: int = 20
    flood_rate: float = 2.0
    join_notice_delay: float = 0.25


class ChatHub:
    """Every local session's view of the chat.

    ``sessions_lock`` guards ``_local`` and ``_session_rooms``; ``rooms_lock`` guards
    ``_rooms`` (the local ``Room`` of each room with sessions here); ``flood_lock``
    guards ``_flood``. None is held while a message is delivered or the backend is
    called, but for the backend's own publish (whose delivery is queue puts).
    """

    def __init__(
        self,
        backend: RoomBackend,
        config: HubConfig | None = None,
        account_exists: Callable[[str], bool] = lambda _name: True,
    ) -> None:
        self.backend = backend
        self.config = config or HubConfig()
        self.account_exists = account_exists
        self.sessions_lock = threading.Lock()
        #: account -> session id -> the session, for the sessions of this process.
        self._local: dict[str, dict[str, Session]] = {}
        #: session id -> the rooms it is in.
        self._session_rooms: dict[str, list[str]] = {}
        self.rooms_lock = threading.Lock()
        self._rooms: dict[str, Room] = {}
        self.flood_lock = threading.Lock()
        # account -> its line budget, shared by all its devices.
        self._flood: dict[str, FloodControl] = {}
        # Every room's join notices share one budget of frames a second (see rooms.NoticePacer).
        self._notice_pacer = NoticePacer()
        self._closed = False
        backend.start(self)
        self.ensure_room(self.config.default_room, owner="")

    # ------------------------------------------------------------------ backend callbacks

    def on_room_event(self, room: str, message: RoomEvent, origin_session: str, ref: str) -> None:
        local = self._local_room(room, create=False)
        if local is not None:
            local.deliver_published(message, origin_session, ref)

    def on_private(self, account: str, message: Chat, origin_session: str, ref: str) -> None:
        echo = replace(message, ref=ref) if ref else message
        for session in self.local_sessions(account):
            session.deliver(echo if session.session_id == origin_session else message)

    # ------------------------------------------------------------------ sessions

    def open_session(self, member: Session, device: str, address: str) -> tuple[list[str], int]:
        """Count a logged-in session against its account's limit; returns the rooms it will enter
        and how many sessions the account has now. Raises ``HubError`` past ``max_sessions``.

        Nothing is delivered to it until ``enter_rooms``, so its welcome can go first.
        """
        info = SessionInfo(member.name, member.session_id, device, time.time(), address)
        try:
            devices = self.backend.add_session(info, self.config.max_sessions)
        except BackendLimit:
            raise HubError(
                "too_many_sessions",
                f"you already have {self.config.max_sessions} sessions open (the limit): "
                "list them with /sessions and end one with /logout ID",
            ) from None
        rooms = [self.config.default_room]
        rooms += [room for room in self.backend.memberships(member.name) if room != self.config.default_room]
        return rooms, devices

    def enter_rooms(
        self, member: Session, rooms: list[str], since: int = 0, seen: dict[str, int] | None = None
    ) -> None:
        """Make an opened session a member: it enters its rooms, then gets what it missed of its private lines.

        With ``since`` (the newest id the device saw) and ``seen`` (room -> last sequence
        number seen), each room sends exactly what was missed, up to the catch-up limit;
        a room the device has not seen sends its recent lines, as a join does.
        """
        with self.sessions_lock:
            self._local.setdefault(member.name, {})[member.session_id] = member
            self._session_rooms[member.session_id] = []
        seen = seen or {}
        for room in rooms:
            try:
                self._enter(member, room, requested=False, since=since if room in seen else 0, seen=seen.get(room))
            except HubError as exc:  # a remembered room that can no longer be entered: say so, go on
                member.deliver(Notice(event="info", text=f"cannot rejoin {room}: {exc}"))
        if since > 0:
            missed = self.backend.private_since(member.name, since, self.config.catch_up_limit)
        else:
            missed = self.backend.private_recent(member.name, self.config.join_history)
        for message in missed:
            member.deliver(replace(message, history=True))
        if missed:
            member.deliver(History(room="", count=len(missed), oldest_id=missed[0].id))

    def close_session(self, member: Member, reason: str) -> None:
        """The session ended: it leaves its rooms (the others hear of it if it was the account's last)."""
        with self.sessions_lock:
            rooms = self._session_rooms.pop(member.session_id, [])
            sessions = self._local.get(member.name, {})
            if sessions.get(member.session_id) is member:
                del sessions[member.session_id]
            if not sessions:
                self._local.pop(member.name, None)
        for room in rooms:
            local = self._local_room(room, create=False)
            if local is not None:
                local.leave(member, reason)
        self.backend.remove_session(member.name, member.session_id)

    def local_sessions(self, account: str) -> list[Session]:
        with self.sessions_lock:
            return list(self._local.get(account, {}).values())

    def _in_room(self, member: Member, room: str) -> bool:
        with self.sessions_lock:
            return room in self._session_rooms.get(member.session_id, ())

    # ------------------------------------------------------------------ rooms

    def ensure_room(self, name: str, owner: str) -> bool:
        """Create the room if it does not exist; True if this call created it."""
        try:
            return self.backend.create_room(
                RoomRecord(name, owner=owner, created_at=time.time()), self.config.max_rooms
            )
        except BackendLimit:
            raise HubError(
                "too_many_rooms", f"the server has {self.config.max_rooms} rooms, the most it allows"
            ) from None

    def _local_room(self, name: str, create: bool = True) -> Room | None:
        with self.rooms_lock:
            room = self._rooms.get(name)
            if room is not None or not create or self._closed:
                return room
        # Read outside the lock (a disk read); if another thread made it meanwhile, theirs wins.
        record = self.backend.room(name)
        recent = self.backend.recent(name, self.config.join_history)
        fresh = Room(
            name,
            topic=record.topic if record is not None else "",
            recent=recent,
            recent_size=self.config.join_history,
            join_notice_delay=self.config.join_notice_delay,
            pacer=self._notice_pacer,
        )
        with self.rooms_lock:
            return self._rooms.setdefault(name, fresh)

    def join(self, member: Member, room_name: str) -> None:
        """/join: enter a room (created if new, the joiner owning it) on every device of the account."""
        room = self._room_name(room_name)
        if self._in_room(member, room):
            raise HubError("already_joined", f"you are already in {room}")
        # The default room counts too: every session is in it.
        joined = {self.config.default_room, *self.backend.memberships(member.name)}
        if room not in joined and len(joined) >= self.config.max_rooms_per_account:
            raise HubError(
                "too_many_rooms",
                f"you are in {len(joined)} rooms, the most allowed: /part one first",
            )
        created = self.ensure_room(room, owner=member.name)
        if created:
            log.info("room created %s by user=%s", room, member.name)
        self.backend.add_membership(member.name, room)
        for session in self.local_sessions(member.name):
            if not self._in_room(session, room):
                self._enter(session, room, requested=session is member, created=created)

    def _enter(
        self,
        member: Member,
        room: str,
        *,
        requested: bool,
        created: bool = False,
        since: int = 0,
        seen: int | None = None,
    ) -> None:
        """Put one session in a room: it gets the room, its roster, then its recent lines or what it missed."""
        if self.backend.room(room) is None:
            raise HubError("no_such_room", f"{room} no longer exists")
        local = self._local_room(room)
        assert local is not None
        # A device catching up reads what it missed before entering (a disk read, never under the
        # room's lock); lines said meanwhile are in the room's recent lines, sent after these.
        missed: list[RoomEvent] = []
        over = 0
        if since > 0:
            missed, over = self.backend.history_since(room, since, self.config.catch_up_limit)

        def welcome(roster: list[str], devices: list[int], recent: list[RoomEvent]) -> None:
            member.deliver(
                RoomMessage(
                    room=room,
                    topic=local.topic,
                    members=len(roster),
                    created=created,
                    requested=requested,
                )
            )
            for page in paginate(roster, devices):
                member.deliver(Roster(members=page[0], devices=page[1], room=room, more=page[2]))
            if since > 0:
                newest = missed[-1].id if missed else since
                lines = missed + [event for event in recent if event.id > newest]
            else:
                lines = recent
            for event in lines:
                member.deliver(replace(event, history=True))
            missing = over
            if seen is not None and lines:
                first_seq = next((event.seq for event in lines if isinstance(event, Chat)), 0)
                missing += max(0, first_seq - seen - 1) if first_seq else 0
            if lines or missing:
                member.deliver(
                    History(
                        room=room,
                        count=len(lines),
                        missing=missing,
                        oldest_id=lines[0].id if lines else 0,
                        more=_has_older(lines),
                    )
                )

        with self.sessions_lock:
            rooms = self._session_rooms.get(member.session_id)
            if rooms is None:  # the session ended meanwhile
                return
            if room not in rooms:
                rooms.append(room)
        local.join(member, welcome)

    def part(self, member: Member, room_name: str, reason: str = "") -> None:
        """/part: leave a room on every device of the account; it is no longer rejoined at login."""
        room = self._room_name(room_name)
        if not self._in_room(member, room):
            raise HubError("not_in_room", f"you are not in {room}")
        self.backend.remove_membership(member.name, room)
        local = self._local_room(room, create=False)
        reason = _clean(reason, MAX_TOPIC_CHARS)
        for session in self.local_sessions(member.name):
            with self.sessions_lock:
                rooms = self._session_rooms.get(session.session_id, [])
                if room not in rooms:
                    continue
                rooms.remove(room)
            if local is not None:
                local.leave(session, reason)
            session.deliver(RoomMessage(room=room, joined=False, reason=reason, requested=session is member))

    def say(self, member: Member, room_name: str, text: str, *, action: bool = False, ref: str = "") -> None:
        """A line for a room the session is in: numbered, stored, and echoed to the sender with ``ref``."""
        room = self._room_name(room_name)
        if not self._in_room(member, room):
            raise HubError("not_in_room", f"not sent: you are not in {room} (/join {room} first)")
        self.check_flood(member.name)
        local = self._local_room(room, create=False)
        if local is not None:
            local.before_line_from(member.name)
        message = Chat(sender=member.name, text=text, sent_at=0.0, action=action, room=room)
        self.backend.publish_room(room, message, member.session_id, ref)

    def private(self, member: Member, recipient: str, text: str, *, action: bool = False, ref: str = "") -> None:
        """A line for one account: every device of it, and of the sender; kept for whoever is offline."""
        if recipient == member.name:
            raise HubError("no_such_user", "not sent: that is you")
        if not self.account_exists(recipient):
            raise HubError("no_such_user", f"not sent: there is no user {_clean(recipient, 40)}")
        self.check_flood(member.name)
        message = Chat(sender=member.name, text=text, sent_at=0.0, action=action, private=True, recipient=recipient)
        self.backend.publish_private(message, member.session_id, ref)
        if not self.backend.sessions(recipient):
            member.deliver(
                Notice(event="info", text=f"{recipient} is offline; they will see your message when they next log in")
            )

    def who(self, member: Member, room_name: str) -> None:
        """/who, /names: a room's roster, in pages; counted against flood control by its size."""
        room = self._room_name(room_name)
        if self.backend.room(room) is None:
            raise HubError("no_such_room", f"there is no room {room}")
        local = self._local_room(room, create=False)
        names, devices = local.roster() if local is not None else ([], [])
        self.check_flood(member.name, cost=1 + len(names) / 200)
        for page in paginate(names, devices):
            member.deliver(Roster(members=page[0], devices=page[1], room=room, more=page[2]))

    def list_rooms(self, member: Member) -> None:
        """/list: every room with how many are in it now and its topic, in pages."""
        records = self.backend.rooms()
        self.check_flood(member.name, cost=1 + len(records) / 100)
        counts = []
        for record in records:
            local = self._local_room(record.name, create=False)
            counts.append(local.member_count() if local is not None else 0)
        pages = _pages([(r.name, n, r.topic) for r, n in zip(records, counts, strict=True)])
        for index, page in enumerate(pages):
            member.deliver(
                RoomList(
                    names=[name for name, _, _ in page],
                    members=[count for _, count, _ in page],
                    topics=[topic for _, _, topic in page],
                    more=index < len(pages) - 1,
                )
            )

    def topic(self, member: Member, room_name: str, text: str | None) -> None:
        """/topic: show a room's topic, or set it (told to the room and kept in its history)."""
        room = self._room_name(room_name)
        record = self.backend.room(room)
        if record is None:
            raise HubError("no_such_room", f"there is no room {room}")
        if text is None:
            shown = f"topic of {room}: {record.topic}" if record.topic else f"{room} has no topic"
            member.deliver(Notice(event="info", text=shown, room=room))
            return
        if not self._in_room(member, room):
            raise HubError("not_in_room", f"you are not in {room}")
        topic = _clean(text, MAX_TOPIC_CHARS + 1)
        if len(topic) > MAX_TOPIC_CHARS:
            raise HubError("bad_topic", f"a topic is at most {MAX_TOPIC_CHARS} characters")
        self.check_flood(member.name)
        self.backend.set_topic(room, topic)
        self.backend.publish_room(room, Notice(event="topic", name=member.name, text=topic, room=room))

    def history(self, member: Member, room_name: str, count: int, before_id: int) -> None:
        """/history: up to ``count`` earlier lines of a room the session is in, from before ``before_id``."""
        room = self._room_name(room_name)
        if not self._in_room(member, room):
            raise HubError("not_in_room", f"you are not in {room}")
        if not 1 <= count <= MAX_HISTORY_PAGE:
            raise HubError("bad_history", f"/history takes 1 to {MAX_HISTORY_PAGE} lines at a time")
        self.check_flood(member.name, cost=1 + count / 50)
        lines = self.backend.history_before(room, before_id or (1 << 62), count)
        for event in lines:
            member.deliver(replace(event, history=True))
        member.deliver(
            History(room=room, count=len(lines), oldest_id=lines[0].id if lines else 0, more=_has_older(lines))
        )

    def list_sessions(self, member: Member) -> None:
        """/sessions: this account's sessions."""
        infos = self.backend.sessions(member.name)
        member.deliver(
            Sessions(
                ids=[info.session_id[:SESSION_ID_CHARS] for info in infos],
                devices=[info.device for info in infos],
                since=[info.since for info in infos],
                addresses=[info.address for info in infos],
                current=member.session_id[:SESSION_ID_CHARS],
            )
        )

    def logout(self, member: Member, target: str) -> int:
        """/logout ID or /logout others: end those sessions of this account (their tokens are revoked).

        Returns how many were ended.
        """
        target = target.strip()
        if not target:
            raise HubError("bad_command", "usage: /logout ID (from /sessions) or /logout others")
        chosen: list[Session] = []
        for session in self.local_sessions(member.name):
            if session.session_id == member.session_id:
                continue
            if target == "others" or session.session_id.startswith(target):
                chosen.append(session)
        if not chosen:
            raise HubError("no_such_session", f"no other session {_clean(target, 20)} (see /sessions)")
        not_saved: RevocationNotSaved | None = None
        for session in chosen:
            try:
                session.end("logged out from another device")
            except RevocationNotSaved as exc:  # that session ended all the same: end the others, then say so
                not_saved = exc
        if not_saved is not None:
            raise not_saved
        return len(chosen)

    # ------------------------------------------------------------------ limits and lifecycle

    def check_flood(self, account: str, cost: float = 1.0) -> None:
        """Count a request against the account's budget (shared by its devices); ``HubError`` past it."""
        if self.config.flood_rate <= 0:
            return
        with self.flood_lock:
            bucket = self._flood.get(account)
            if bucket is None:
                bucket = self._flood[account] = FloodControl(self.config.flood_rate, self.config.flood_burst)
        if not bucket.allow(cost):
            raise HubError(
                "flood",
                f"not sent: you are sending too fast (limit: {self.config.flood_burst} lines at once, "
                f"then {self.config.flood_rate:g} per second)",
            )

    def forget_idle_flood_buckets(self) -> None:
        """Drop the budgets of accounts that have been quiet long enough to be full again."""
        with self.flood_lock:
            full = [account for account, bucket in self._flood.items() if bucket.is_full()]
            for account in full:
                del self._flood[account]

    def announce(self, text: str) -> None:
        """A notice to every local session (for example: the server is shutting down)."""
        with self.sessions_lock:
            everyone = [session for sessions in self._local.values() for session in sessions.values()]
        notice = Notice(event="info", text=text)
        for session in everyone:
            session.deliver(notice)

    def local_room(self, name: str) -> Room | None:
        """The local ``Room`` of a room with sessions here (tests and benchmarks look inside)."""
        return self._local_room(name, create=False)

    def close(self) -> None:
        """Stop every room's timers and close the backend (its store flushes what is queued)."""
        with self.rooms_lock:
            self._closed = True
            rooms = list(self._rooms.values())
        for room in rooms:
            room.close()
        self.backend.close()

    def _room_name(self, name: str) -> str:
        try:
            return normalize_room(name)
        except ValueError as exc:
            raise HubError("bad_room", str(exc)) from None


def _clean(text: str, limit: int) -> str:
    return sanitize_text(text.strip())[:limit]


def _has_older(lines: list[RoomEvent]) -> bool:
    """Whether a room kept lines before these: the first line's place says so."""
    first_seq = next((event.seq for event in lines if isinstance(event, Chat)), 0)
    return first_seq > 1


def _json_size(field: object) -> int:
    """About how many bytes ``field`` takes in JSON: a str's UTF-8 and its quotes, or its digits."""
    return len(field.encode()) + 3 if isinstance(field, str) else len(str(field)) + 1


def paginate(names: list[str], devices: list[int]) -> Iterator[tuple[list[str], list[int], bool]]:
    """A roster in pages that each fit a frame: (names, devices, more). An empty roster is one empty page."""
    pages = _pages(list(zip(names, devices, strict=True)))
    for index, page in enumerate(pages):
        yield [name for name, _ in page], [count for _, count in page], index < len(pages) - 1


Item = TypeVar("Item", bound=tuple[object, ...])


def _pages(items: list[Item]) -> list[list[Item]]:
    """Split items into runs whose JSON stays within ``PAGE_BUDGET`` bytes; at least one run, maybe empty."""
    pages: list[list[Item]] = [[]]
    size = 0
    for item in items:
        # Counted field by field, not by encoding each item: a login that rejoins 50 rooms of
        # 500 pages 25,000 names. Escaped quotes could make a page up to twice its count, which
        # a budget of half a frame leaves room for.
        item_size = sum(_json_size(field) for field in item) + 4
        if pages[-1] and size + item_size > PAGE_BUDGET:
            pages.append([])
            size = 0
        pages[-1].append(item)
        size += item_size
    return pages


# --------------------------------------------------------------------------- the server's commands


@dataclass(frozen=True)
class ServerCommand:
    """A command the client sends as a ``Command`` message: its arguments and what runs it."""

    name: str
    min_args: int
    max_args: int
    run: Callable[[ChatHub, Member, list[str]], None]


def _whole_number(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise HubError("bad_command", f"{what} must be a whole number, not {_clean(text, 20)!r}") from None


def _run_history(hub: ChatHub, member: Member, args: list[str]) -> None:
    count = _whole_number(args[1], "the number of lines") if len(args) > 1 and args[1] else HISTORY_PAGE
    before = _whole_number(args[2], "the message id") if len(args) > 2 and args[2] else 0
    hub.history(member, args[0], count, before)


#: Every command the server runs: the client's table (securechat.commands) sends these.
SERVER_COMMANDS: dict[str, ServerCommand] = {
    command.name: command
    for command in (
        ServerCommand("join", 1, 1, lambda hub, member, args: hub.join(member, args[0])),
        ServerCommand("part", 1, 2, lambda hub, member, args: hub.part(member, args[0], " ".join(args[1:]))),
        ServerCommand("list", 0, 0, lambda hub, member, _args: hub.list_rooms(member)),
        ServerCommand(
            "topic", 1, 2, lambda hub, member, args: hub.topic(member, args[0], args[1] if len(args) > 1 else None)
        ),
        ServerCommand("history", 1, 3, _run_history),
        ServerCommand("sessions", 0, 0, lambda hub, member, _args: hub.list_sessions(member)),
        ServerCommand("logout", 1, 1, lambda hub, member, args: _report_logout(member, hub.logout(member, args[0]))),
    )
}


def _report_logout(member: Member, count: int) -> None:
    member.deliver(Notice(event="info", text=f"ended {count} other session{'s' if count != 1 else ''}"))


def run_command(hub: ChatHub, member: Member, name: str, args: list[str]) -> None:
    """Run a ``Command`` from a client: an unknown name or a wrong number of arguments is a ``HubError``."""
    command = SERVER_COMMANDS.get(name)
    if command is None:
        raise HubError("unknown_command", f"the server has no command {_clean(name, 20)!r}")
    if not command.min_args <= len(args) <= command.max_args:
        raise HubError("bad_command", f"/{name} takes {command.min_args} to {command.max_args} arguments")
    command.run(hub, member, args)
