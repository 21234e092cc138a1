"""The chat's rules, above the backend: sessions, rooms, lines, private messages and commands.

The hub is what a connection talks to once its user is logged in. It knows the
sessions of this process and the rooms they are in (``securechat.rooms.Room``:
local fan-out and the pacing of join notices); everything shared — numbering,
presence, room state, history — goes through the ``RoomBackend``. No sockets and
no cryptography: a session is a ``Member``, and a refusal is a ``HubError`` that
the connection turns into an error reply.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

from securechat.accounts import AccountBan, RevocationNotSaved, format_utc, write_file_atomically
from securechat.backend import (
    BackendLimit,
    BackendUnavailable,
    LineCharge,
    OverBudget,
    RoomBackend,
    RoomEvent,
    SessionInfo,
)
from securechat.commands import COMMANDS_BY_NAME, ROLE_RANK, CommandSpec, split_duration
from securechat.history import RoomRecord
from securechat.protocol import (
    DEFAULT_ROOM,
    MAX_FRAME_SIZE,
    MAX_TOPIC_CHARS,
    MAX_WIRE_INT,
    Batch,
    Chat,
    History,
    Message,
    Notice,
    RoomList,
    Roster,
    Sessions,
    normalize_room,
    sanitize_text,
)
from securechat.protocol import Room as RoomMessage
from securechat.ratelimit import FloodControl
from securechat.rooms import Member, NoticePacer, Room, RoomRetired
from securechat.roomstate import (
    MAX_REASON_CHARS,
    MODES,
    MODES_KEY,
    OWNERLESS_KEY,
    Restriction,
    RoomState,
    ban_key,
    invite_key,
    mute_key,
    parse_mode_change,
    role_key,
)

log = logging.getLogger("chat.server")

#: The fewest characters of a session id /logout takes (/sessions shows 8).
MIN_SESSION_PREFIX = 4
#: In an account's own scope ("@NAME"): the identity of the account that last logged in under that name.
ACCOUNT_IDENTITY_KEY = "account"

#: Bytes of names, topics and the like one list page may hold: a frame is 64 KiB, and the
#: envelope, a wrapped key and the JSON around the list need the rest.
PAGE_BUDGET = MAX_FRAME_SIZE // 2
#: Shown as a session's id in /sessions and taken by /logout: enough to tell five apart.
SESSION_ID_CHARS = 8
#: Lines /history sends when no number is given, and the most it sends at once.
HISTORY_PAGE = 50
MAX_HISTORY_PAGE = 500
#: How often /mode tries its change again when another one lands between its read and its write.
MODE_ATTEMPTS = 5
#: An away account answers a /msg from one sender at most this often.
AWAY_REPLY_INTERVAL = 3600.0
#: The longest message of the day and away message.
MAX_MOTD_CHARS = 2000
MAX_AWAY_CHARS = 200


class HubError(Exception):
    """A request was refused; ``code`` and the one-line message go back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AccountDirectory(Protocol):
    """The accounts, as the hub needs them (the server's user store)."""

    def is_admin(self, name: str) -> bool: ...
    def ban(self, name: str, ban: AccountBan) -> None:
        """Ban an account server-wide; ``KeyError`` if there is none, ``HubError`` if it cannot be saved."""

    def unban(self, name: str) -> bool: ...
    def forget(self, name: str) -> None:
        """``name`` was changed by another process: drop any copy of it kept here."""

    def identity(self, name: str) -> AccountIdentity | None:
        """What tells the account ``name`` from an earlier one of that name; None if there is no
        such account, or it cannot be read just now."""

    def canonical(self, name: str) -> str | None:
        """The account ``name`` means, as it is spelled ("Bob" is bob's: names are unique in any
        case); None if there is none."""


class AccountIdentity(NamedTuple):
    """An account's id (random, "" for one made before ids) and when it was made ("" and 0 if unknown)."""

    account_id: str
    created: str
    created_at: float

    def recorded(self) -> str:
        """As kept with the name's data (``ACCOUNT_IDENTITY_KEY``)."""
        return f"{self.account_id} {self.created}"

    def is_recorded(self, recorded: str) -> bool:
        """Whether ``recorded`` names this account. An id settles it; an account without one (an older
        release rewrote the store, or made the account) is known by when it was made."""
        recorded_id, _, recorded_created = recorded.partition(" ")
        if recorded_id and self.account_id:
            return recorded_id == self.account_id
        return recorded_created == self.created


class OpenDirectory:
    """Every name is an account and nobody is an admin (for a hub without a user store: tests, benchmarks)."""

    def is_admin(self, name: str) -> bool:
        return False

    def ban(self, name: str, ban: AccountBan) -> None:
        raise HubError("not_supported", "this server has no user store to ban accounts in")

    def unban(self, name: str) -> bool:
        return False

    def forget(self, name: str) -> None:
        pass

    def identity(self, name: str) -> AccountIdentity | None:
        return AccountIdentity("", "", 0.0)

    def canonical(self, name: str) -> str | None:
        return name


class MessageOfTheDay:
    """The message of the day: a text file in the data directory, re-read when it changes.

    An admin sets it with /motd TEXT (the file is replaced atomically) or by editing
    the file. ``_cache_lock`` guards the cached text and the file's stamp.
    """

    #: Where a shared backend keeps it, so that every node shows the one an admin set on any.
    SCOPE, KEY = "!server", "motd"

    def __init__(self, path: Path | None, shared: RoomBackend | None = None) -> None:
        self.path = path
        self.shared = shared
        self._cache_lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._text = ""

    def get(self) -> str:
        if self.shared is not None:
            text = self.shared.state(self.SCOPE).get(self.KEY)
            if text is not None:
                return text
        if self.path is None:
            return ""
        try:
            info = self.path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
        except OSError:
            return ""
        with self._cache_lock:
            if stamp == self._stamp:
                return self._text
        try:
            text = self.path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        text = sanitize_text(text.strip(), keep_newlines=True)[:MAX_MOTD_CHARS]
        with self._cache_lock:
            self._stamp, self._text = stamp, text
        return text

    def set(self, text: str) -> None:
        """Replace the message (empty: none). ``HubError`` if it cannot be saved."""
        if self.shared is not None:
            self.shared.set_state(self.SCOPE, self.KEY, text)  # "" too: it overrides each node's file
            return
        if self.path is None:
            raise HubError("not_supported", "this server keeps no message of the day")
        try:
            write_file_atomically(self.path, text + "\n" if text else "")
        except OSError as exc:
            log.error("cannot save the message of the day to %s: %s", self.path, exc.strerror or exc)
            raise HubError("server_error", "the message of the day could not be saved") from None


class FloodBudget(Protocol):
    """Account line budgets shared by several server processes (``securechat.redis_limits``)."""

    def take(self, account: str, cost: float, rate: float, burst: int) -> bool | None:
        """True if allowed, False if over, None if it cannot say (the hub then counts by itself)."""


class Session(Member, Protocol):
    """What the hub needs of a logged-in connection beyond ``Member``: ending it from elsewhere, and
    how much waits for it."""

    def end(self, reason: str) -> None:
        """End this session for good (revoking its tokens): /logout from another device."""

    def backlog(self) -> int:
        """Bytes of messages queued for this session and not sent yet."""


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
    #: False with history off: nothing keeps a private line for an account that is offline.
    keeps_history: bool = True


class ChatHub:
    """Every local session's view of the chat.

    ``sessions_lock`` guards ``_local``, ``_session_rooms``, ``_privates_held`` and
    ``_privates_caught_up``; ``rooms_lock`` guards
    ``_rooms`` (the local ``Room`` of each room with sessions here), ``_room_generations``
    and each room's ``watched``; ``flood_lock``
    guards ``_flood``. None is held while a message is delivered or the backend is
    called, but for the backend's own publish (whose delivery is queue puts).
    """

    def __init__(
        self,
        backend: RoomBackend,
        config: HubConfig | None = None,
        accounts: AccountDirectory | None = None,
        motd_path: Path | None = None,
        revoke_session: Callable[[str], object] | None = None,
        flood_budget: FloodBudget | None = None,
    ) -> None:
        self.backend = backend
        self.config = config or HubConfig()
        self.accounts: AccountDirectory = accounts or OpenDirectory()
        self.motd = MessageOfTheDay(motd_path, backend if backend.shared else None)
        #: Ends a session of another server process by revoking its tokens (its process ends it).
        self.revoke_session = revoke_session
        #: Each account's line budget shared with the other server processes (None: counted here).
        self.flood_budget = flood_budget
        # Guards _ignores, _ignorers, _away_replies and _away.
        self.personal_lock = threading.Lock()
        #: account with sessions here -> whom it ignores; and the reverse, for delivery.
        self._ignores: dict[str, frozenset[str]] = {}
        self._ignorers: dict[str, set[str]] = {}
        #: (away account, sender) -> when the sender was last told the account is away.
        self._away_replies: dict[tuple[str, str], float] = {}
        #: Accounts online whose every device is away, as this process last heard: what the roster a
        #: session gets on entering a room marks (/who reads the sessions themselves).
        self._away: set[str] = set()
        self.sessions_lock = threading.Lock()
        #: account -> session id -> the session, for the sessions of this process.
        self._local: dict[str, dict[str, Session]] = {}
        #: session id -> the rooms it is in.
        self._session_rooms: dict[str, list[str]] = {}
        #: session id -> private lines that came live while it read what it missed (sent after that).
        self._privates_held: dict[str, list[Chat]] = {}
        #: session id -> ids of the private lines its catch-up sent: the live feed may bring them again.
        self._privates_caught_up: dict[str, frozenset[int]] = {}
        self.rooms_lock = threading.Lock()
        self._rooms: dict[str, Room] = {}
        # How many local rooms were made: each one's generation (guarded by rooms_lock).
        self._room_generations = 0
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
        echoed = False
        if local is not None:
            skip: frozenset[str] = frozenset()
            if isinstance(message, Chat):
                with self.personal_lock:
                    skip = frozenset(self._ignorers.get(message.sender, ()))
            echoed = local.deliver_published(message, origin_session, ref, skip_accounts=skip)
        if ref and not echoed and isinstance(message, Chat):
            # Its sender left the room (/part) before the line came back from the broker, and may have
            # been the last one here in it (the room is gone): the line was said all the same, and
            # its client counts one with no echo as not sent.
            with self.sessions_lock:
                origin = self._local.get(message.sender, {}).get(origin_session)
            if origin is not None:
                origin.deliver(replace(message, ref=ref))
        if isinstance(message, Notice) and message.event == "moderation" and message.action in ("kick", "ban"):
            # Published by whichever process the moderator is on: each process removes its own sessions.
            self._remove_from_room(message.target, room, message.text)

    def on_presence(self, room: str, notice: Notice) -> None:
        """Someone joined or left ``room`` on another server process: told to this process's members
        (unless the account is here too, on a device of this process: then nothing changed for them)."""
        local = self._local_room(room, create=False)
        if local is None:
            return
        if not local.sessions_of(notice.name):
            local.announce_notice(notice)
        elif notice.event == "left":
            # The others were told it left, and it is here: its entries lapsed while this process
            # could not refresh them (cut off from Redis for a while), and another node swept them.
            # They come back with the next refresh; the rooms elsewhere hear it is back now.
            self.backend.announce(room, Notice(event="joined", name=notice.name, room=room))

    def on_account_changed(self, account: str) -> None:
        """A process changed ``account`` (its record, what it ignores, its rooms): drop the copy of its
        record kept here and, if its sessions are here, reload what it ignores and follow its rooms."""
        self.accounts.forget(account)
        self._note_away(account, tell=False)
        if self.local_sessions(account):
            self._load_ignores(account)
            self._follow_rooms(account)

    def _note_away(self, account: str, *, tell: bool = True) -> None:
        """Read again whether ``account`` is away (online, every device of it away); if that changed
        here and ``tell``, the other processes are told to read it again too."""
        away = bool(self._away_accounts([account]))
        with self.personal_lock:
            changed = away != (account in self._away)
            if away:
                self._away.add(account)
            else:
                self._away.discard(account)
        if changed and tell and self.backend.shared:
            # (Else the others' rosters on entering a room may mark it wrongly; /who reads it afresh.)
            self._tell_devices_elsewhere(account, "whether it is away")

    def _follow_rooms(self, account: str) -> None:
        """Put the account's sessions here in the rooms it is in, and out of those it left: a /join or
        /part on another process's device is one on every device, as on one process. Not the default
        room, which every session enters at login whatever the account's rooms say."""
        for session in self.local_sessions(account):
            self._follow_rooms_of(session)

    def _follow_rooms_of(self, session: Session) -> None:
        account = session.name
        # Its rooms before the account's: a room left since shows in neither, a room joined
        # since in the account's (entered already, or now).
        with self.sessions_lock:
            current = set(self._session_rooms.get(session.session_id, ())) - {self.config.default_room}
        wanted = set(self.backend.memberships(account)) - {self.config.default_room}
        for room in sorted(wanted - current):
            try:
                self._enter(session, room, requested=False)
            except (HubError, BackendUnavailable) as exc:
                log.info("user=%s could not follow into %s here: %s", account, room, exc)
        for room in sorted(current - wanted):
            self._remove_session_from_room(session, room, "")

    def on_account_notice(self, account: str, notice: Notice) -> None:
        for session in self.local_sessions(account):
            session.deliver(notice)

    def on_room_gap(self, room: str, missed: int) -> None:
        """Lines of ``room`` were trimmed before this process read them: its members here are told,
        and whoever was taken out meanwhile (a kick or ban among what was lost) is taken out here."""
        lost = f"{missed} lines of {room} were lost to an outage"
        self.on_room_event(room, Notice(event="info", room=room, text=lost), "", "")
        local = self._local_room(room, create=False)
        if local is None:
            return
        state = self.room_state(room)
        for account in local.roster()[0]:
            ban = state.ban_of(account)
            gone = room != self.config.default_room and room not in self.backend.memberships(account)
            if ban is not None or gone:
                reason = f"banned {_until(ban.until)}" if ban is not None else "removed while this server lagged"
                self._remove_from_room(account, room, reason)

    def on_members_gone(self, room: str, accounts: list[str]) -> None:
        """``accounts`` were in ``room`` through a process that died without a word (their entries
        lapsed): nobody told the room they left, so this process does, for every process."""
        local = self._local_room(room, create=False)
        for account in accounts:
            if local is not None and local.sessions_of(account):
                continue  # here on a device of this process: nothing changed for the room
            notice = Notice(event="left", name=account, text="connection lost", room=room)
            if local is not None:
                local.announce_notice(notice)
            self.backend.announce(room, notice)

    def on_control_missed(self) -> None:
        """Changes to accounts were lost before this process read them: every local account's is read again."""
        with self.sessions_lock:
            accounts = list(self._local)
        for account in accounts:
            self.on_account_changed(account)

    def on_privates_missed(self, after_id: int, before_id: int) -> None:
        """Private lines numbered after ``after_id`` (and before ``before_id``, if not 0) were trimmed
        from the live feed before this process read them: its accounts get theirs from history."""
        with self.sessions_lock:
            accounts = list(self._local)
        for account in accounts:
            for line in self.backend.private_since(account, after_id, self.config.catch_up_limit):
                # Between the two exactly: what the backend adds from before after_id was handed over.
                if after_id < line.id and (not before_id or line.id < before_id):
                    self.on_private(account, line, "", "")

    def on_private(self, account: str, message: Chat, origin_session: str, ref: str) -> None:
        if account != message.sender and message.sender in self.ignored_by(account):
            return
        echo = replace(message, ref=ref) if ref else message
        now: list[tuple[Session, Chat]] = []
        with self.sessions_lock:
            for session in self._local.get(account, {}).values():
                line = echo if session.session_id == origin_session else message
                held = self._privates_held.get(session.session_id)
                if held is not None:
                    held.append(line)
                elif message.id not in self._privates_caught_up.get(session.session_id, ()):
                    now.append((session, line))
        for session, line in now:
            session.deliver(line)

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
                f"this account has the most sessions open at once ({self.config.max_sessions}): "
                "end one with /logout ID on another device (/sessions lists them), or /quit there",
            ) from None
        self._load_ignores(member.name, self._claim_name(member.name))
        self._note_away(member.name)  # a device that comes is not away: nor is its account any more
        rooms = [self.config.default_room]
        rooms += [room for room in self.backend.memberships(member.name) if room != self.config.default_room]
        return rooms, devices

    def _claim_name(self, account: str) -> dict[str, str] | None:
        """If ``account`` is a new account given a deleted one's name, let go of what the old one had.

        Rooms, roles and ignore lists are kept by name, and a name's data outlives its
        account (deluser edits only the account store, maybe with this server running). So
        the identity of the account that last logged in under a name is kept with it, and
        another one logging in under that name finds none of the former's rooms or roles.
        A name whose data predates any identity kept with it was another account's if that
        one was last online, or made a room, before this one was made. Bans and mutes of
        the name stay: a restriction errs on the safe side, and an op can lift it. Private
        lines from before the account was made are kept from it (``enter_rooms``).

        Returns the account's own state as it now is (read here anyway), or None if unread.
        """
        identity = self.accounts.identity(account)
        if identity is None:  # unreadable just now: never let go of an account's rooms on a doubt
            return None
        scope = f"@{account}"
        personal = self.backend.state(scope)
        recorded = personal.get(ACCOUNT_IDENTITY_KEY)
        if recorded == identity.recorded():
            return personal
        if recorded is not None:
            former = not identity.is_recorded(recorded)
        else:
            former = self._used_before(account, identity.created_at, personal)
        if former:
            log.info("user=%s is a new account under a deleted one's name: its rooms and roles are let go", account)
            self._let_go_of_former_account(account)
        self.backend.set_state(scope, ACCOUNT_IDENTITY_KEY, identity.recorded())
        return None if former else personal  # what was let go of is read again

    def _used_before(self, account: str, made: float, personal: dict[str, str]) -> bool:
        """Whether the name ``account`` was used by an account before one made at ``made`` (0: unknown)."""
        if made <= 0:
            return False
        try:
            if float(personal.get("last_seen", "inf")) < made:
                return True
        except ValueError:
            pass
        return any(record.owner == account and 0 < record.created_at < made for record in self.backend.rooms())

    def _let_go_of_former_account(self, account: str) -> None:
        """Drop a deleted account's memberships, roles, invitations, ignore list and last-seen time.

        A room it owned alone passes to its first op (else its first voiced member); a room
        with neither is left to the server's admins, rather than to the newcomer.
        """
        for room in self.backend.memberships(account):
            self.backend.remove_membership(account, room)
        for record in self.backend.rooms():
            values = self.backend.state(record.name)
            state = RoomState.parse(values, creator=record.owner)
            if state.role(account) == "owner" and state.owners() == [account]:
                heirs = sorted(state.roles.items(), key=lambda item: (-ROLE_RANK[item[1]], item[0]))
                heir = next((name for name, role in heirs if name != account and role in ("op", "voice")), None)
                if heir is not None:
                    self.backend.set_state(record.name, role_key(heir), "owner")
                    log.info("room %s passes to user=%s: its only owner's account was deleted", record.name, heir)
                else:
                    self.backend.set_state(record.name, OWNERLESS_KEY, "1")
            for key in (role_key(account), invite_key(account)):
                if key in values:
                    self.backend.set_state(record.name, key, None)
        for key in self.backend.state(f"@{account}"):
            if key.startswith("ignore:") or key == "last_seen":
                self.backend.set_state(f"@{account}", key, None)

    def away_since(self, account: str) -> float:
        """When the account's last session ended (0: never, or unknown)."""
        try:
            return float(self.backend.state(f"@{account}").get("last_seen", 0))
        except ValueError:
            return 0.0

    def enter_rooms(
        self,
        member: Session,
        rooms: list[str],
        since: int = 0,
        seen: dict[str, int] | None = None,
        resumed: bool = False,
        offline_since: float = 0.0,
    ) -> None:
        """Make an opened session a member: it enters its rooms, then gets what it missed of its private lines.

        With ``since`` (the newest id the device saw) and ``seen`` (room -> last sequence
        number seen), each room sends exactly what was missed, up to the catch-up limit;
        a room the device has not seen sends its recent lines, as a join does. The message
        of the day comes first, at a login; a ``resumed`` session (after a blip) has seen it.
        A device that has seen nothing gets the account's recent private lines, and every one
        kept since ``offline_since`` (when the account was last online) if there are more.
        """
        with self.sessions_lock:
            self._local.setdefault(member.name, {})[member.session_id] = member
            self._session_rooms[member.session_id] = []
            # From here its private lines come live, but wait behind what it missed: a line said
            # now may be in both, and an older one must not come after a newer.
            self._privates_held[member.session_id] = []
        missed: list[Chat] = []
        try:
            self._enter_all(member, rooms, since, seen or {}, resumed)
            # A /join or /part on another device between reading the account's rooms and now (it was
            # not yet among the account's sessions here for it): followed now.
            self._follow_rooms_of(member)
            missed = self._privates_missed(member.name, since, offline_since)
        finally:
            with self.sessions_lock:
                held = self._privates_held.pop(member.session_id, [])
                caught_up = frozenset(message.id for message in missed)
                if caught_up and member.session_id in self._session_rooms:
                    self._privates_caught_up[member.session_id] = caught_up
                # Queued under the lock (queue puts): a line the feed brings next comes after these.
                if missed:
                    # One queued item, as a room's entry is (see _enter): up to the catch-up limit of lines.
                    lines: list[Message] = [replace(message, history=True) for message in missed]
                    member.deliver(
                        Batch(messages=[*lines, History(room="", count=len(missed), oldest_id=missed[0].id)])
                    )
                for line in held:
                    if line.id not in caught_up:
                        member.deliver(line)

    def _enter_all(self, member: Session, rooms: list[str], since: int, seen: dict[str, int], resumed: bool) -> None:
        """A new session enters its rooms, after the message of the day (see ``enter_rooms``)."""
        motd = "" if resumed else self.motd.get()
        if motd:
            member.deliver(Notice(event="info", text=f"message of the day: {motd}"))
        for room in rooms:
            try:
                self._enter(member, room, requested=False, since=since if room in seen else 0, seen=seen.get(room))
            except HubError as exc:  # a remembered room that can no longer be entered: say so, go on
                member.deliver(Notice(event="info", text=f"cannot rejoin {room}: {exc}"))
        # Rooms the device was in and the account no longer is: kicked, banned or parted elsewhere
        # while it was away. Told, as a live device is, rather than gone from its list without a word.
        gone = [name for name in seen if name and name not in rooms][: self.config.max_rooms_per_account]
        for room in gone:
            if self.backend.room(room) is None:
                continue
            reason = self._why_gone(member.name, room, since, seen[room])
            member.deliver(RoomMessage(room=room, joined=False, reason=reason, requested=False))

    def _why_gone(self, account: str, room: str, since: int, seen_seq: int) -> str:
        """Why a device coming back is no longer in ``room``: the kick or ban it missed, if the room
        still keeps it (only what names this account: a device cannot read a room it is not in)."""
        try:
            events, _ = self.backend.history_since(room, since, self.config.catch_up_limit, after_seq=seen_seq)
        except BackendUnavailable:
            events = []
        for event in reversed(events):
            if (
                isinstance(event, Notice)
                and event.event == "moderation"
                and event.action in ("kick", "ban")
                and event.target == account
            ):
                return event.text
        return "while you were away"

    def _privates_missed(self, account: str, since: int, offline_since: float) -> list[Chat]:
        """The private lines a session entering now missed (see ``enter_rooms``)."""
        if since > 0:
            missed = self.backend.private_since(account, since, self.config.catch_up_limit)
        else:
            missed = self.backend.private_recent(account, self.config.join_history)
            if offline_since and missed and missed[0].sent_at > offline_since:
                # Every one of the recent lines came while the account was offline: maybe more did.
                kept = self.backend.private_recent(account, self.config.catch_up_limit)
                missed = [message for message in kept if message.sent_at > offline_since]
        ignored = self.ignored_by(account)
        # Lines from before the account was made were another's, under a name since given anew.
        identity = self.accounts.identity(account)
        made = identity.created_at if identity is not None else 0.0
        return [message for message in missed if message.sender not in ignored and message.sent_at >= made]

    def close_session(self, member: Member, reason: str, *, parting: bool = False) -> None:
        """The session ended: it leaves its rooms (the others hear of it if it was the account's last).

        ``parting``: ``reason`` is the user's own words (/quit's message), shown only in the
        rooms where the user may speak: a mute would be lifted by quitting with a message.
        """
        with self.sessions_lock:
            rooms = self._session_rooms.pop(member.session_id, [])
            self._privates_caught_up.pop(member.session_id, None)
            sessions = self._local.get(member.name, {})
            if sessions.get(member.session_id) is member:
                del sessions[member.session_id]
            if not sessions:
                self._local.pop(member.name, None)
        for room in rooms:
            self._leave(member, room, self._own_words(member.name, room, reason) if parting else reason)
        try:
            if self.backend.remove_session(member.name, member.session_id) == 0:
                # Its last session: lines from now on were said while the account was away.
                self.backend.set_state(f"@{member.name}", "last_seen", f"{time.time():.3f}")
        except BackendUnavailable:
            pass  # a shared backend forgets the session by itself (its presence expires)
        self._note_away(member.name)  # the devices left may all be away, or none be left
        if not self.local_sessions(member.name):
            self._set_ignores(member.name, frozenset())  # nothing to filter for it here any more
            with self.personal_lock:
                self._ignores.pop(member.name, None)

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
        # At least the newest line, even with no join history: it is where this process starts
        # reading the room's events (none before it may come as news).
        newest = self.backend.recent(name, max(1, self.config.join_history))
        recent = newest if self.config.join_history > 0 else []
        fresh = Room(
            name,
            topic=record.topic if record is not None else "",
            recent=recent,
            newest_id=newest[-1].id if newest else 0,
            recent_size=self.config.join_history,
            join_notice_delay=self.config.join_notice_delay,
            pacer=self._notice_pacer,
        )
        with self.rooms_lock:
            room = self._rooms.setdefault(name, fresh)
            if room is fresh:  # numbered under the lock: the order in which rooms were made
                self._room_generations += 1
                fresh.generation = self._room_generations
        return room

    def _room_to_enter(self, name: str) -> Room:
        """The local room to put a session in: made if need be, and read by the backend before anyone
        is put in it (from its newest event on). A watch the broker fails is tried again by the next
        entry, so a room with members here is always read."""
        local = self._local_room(name)
        if local is None:
            raise HubError("shutting_down", "the server is shutting down")
        with self.rooms_lock:
            watched = local.watched
        if not watched:
            try:
                self.backend.watch(name, local.newest_id(), local.generation)
            except BaseException:
                self._retire_if_empty(name, local)  # nobody is in it yet: the next entry makes it again
                raise
            with self.rooms_lock:
                local.watched = True
        return local

    def _retire_if_empty(self, name: str, local: Room) -> None:
        """Drop ``local`` if nobody here is in it (its last session left, or the entry that made it
        failed), and stop reading its events: a process whose users came and went through many rooms
        must not read them all for ever. A session coming in meanwhile finds it retired and makes a
        fresh one (``_enter``)."""
        with self.rooms_lock:
            if self._rooms.get(name) is not local or not local.retire():
                return
            del self._rooms[name]
        # Its generation stops this room's watch only: if a fresh room of that name was made meanwhile,
        # its watch (a later generation) goes on, whichever call reaches the backend first.
        self.backend.unwatch(name, local.generation)

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
        if self.backend.room(room) is None:
            if room == self.config.default_room:  # everyone's, lost with Redis's data: made again, by nobody
                self.ensure_room(room, owner="")
            else:
                self._check_may_make_a_room(member.name)
        else:
            state = self.room_state(room)
            ban = state.ban_of(member.name)
            if ban is not None:
                raise HubError("banned", f"you are banned from {room} {_until(ban.until)}{_reason(ban.reason)}")
            invited = member.name in state.invited or state.rank(member.name) > 0
            if "i" in state.modes and not invited and not self.accounts.is_admin(member.name):
                raise HubError("invite_only", f"{room} is invite-only (+i): ask one of its ops to /invite you")
        created = room != self.config.default_room and self.ensure_room(room, owner=member.name)
        if created:
            self.backend.set_state(room, role_key(member.name), "owner")
            log.info("room created %s by user=%s", room, member.name)
        self.backend.set_state(room, invite_key(member.name), None)  # an invitation lets one in, once
        self.backend.add_membership(member.name, room)
        for session in self.local_sessions(member.name):
            if not self._in_room(session, room):
                self._enter(session, room, requested=session is member, created=created)
        if room not in self.backend.memberships(member.name):
            # Taken out (a kick, a /part elsewhere) between its membership and its entry: as the room says.
            self._remove_from_room(member.name, room, "taken out as you came in")
        self._tell_devices_elsewhere(member.name, "a /join")

    def _tell_devices_elsewhere(self, account: str, what: str) -> None:
        """Tell the other processes to read ``account`` again (``on_account_changed``): its rooms, whether
        it is away. If Redis cannot take it, it is done here; the others see it at their next login."""
        try:
            self.backend.account_changed(account)
        except BackendUnavailable:
            log.warning("user=%s: the other processes could not be told of %s", account, what)

    def _check_may_make_a_room(self, account: str) -> None:
        """Rooms are kept when everyone has left (with their history, topic and roles), and the server
        holds ``max_rooms``: one account making and leaving room after room must not use them all up.
        It may have made as many as it may be in; an admin, any number."""
        if self.accounts.is_admin(account):
            return
        # Only this account's: a new one under a deleted one's name is not charged with its rooms.
        identity = self.accounts.identity(account)
        since = identity.created_at if identity is not None else 0.0
        made = sum(1 for record in self.backend.rooms() if record.owner == account and record.created_at >= since)
        if made >= self.config.max_rooms_per_account:
            raise HubError(
                "too_many_rooms",
                f"you have made {made} rooms, the most one account may: join one of them, or ask an admin",
            )

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
        with self.sessions_lock:
            if room in self._session_rooms.get(member.session_id, ()):
                return  # in it, or entering it on another thread (a /join on another device, here or elsewhere)
        if self.backend.room(room) is None:
            if room != self.config.default_room:
                raise HubError("no_such_room", f"{room} no longer exists")
            self.ensure_room(room, owner="")  # the room everyone is in, lost with Redis's data: made again
        ban = self.room_state(room).ban_of(member.name)
        if ban is not None:
            raise HubError("banned", f"you are banned from {room} {_until(ban.until)}{_reason(ban.reason)}")
        elsewhere: dict[str, int] = {}  # read once the room keeps for it what is announced meanwhile
        # A device catching up reads what it missed before entering (a disk read, never under the
        # room's lock); lines said meanwhile are in the room's recent lines, sent after these.
        missed: list[RoomEvent] = []
        over = 0
        ignored = self.ignored_by(member.name)
        # Seen up to no line (0: a room of notices alone, so far): by id only. A room's numbering
        # counts its notices too where they are stored with a number (Redis), and would send them again.
        seen = seen or None
        if since > 0:
            missed, over = self.backend.history_since(room, since, self.config.catch_up_limit, after_seq=seen)

        def welcome(roster: list[str], devices: list[int], recent: list[RoomEvent], news: list[Notice]) -> None:
            roster, devices = _merged(roster, devices, elsewhere)
            assert local is not None  # called by local.join
            # The room's whole entry is one queued item: a login entering 50 rooms queues 50, not
            # thousands (the queue's bound is counted in items), and the send worker packs them
            # into as few frames as fit. Nothing is encoded here, under the room's lock.
            entry: list[Message] = [
                RoomMessage(
                    room=room,
                    topic=local.topic,
                    members=len(roster),
                    created=created,
                    requested=requested,
                )
            ]
            with self.personal_lock:  # (taken inside the room's lock, never the other way round)
                away = self._away.intersection(roster)
            for page in paginate(roster, devices):
                page_away = [name for name in page[0] if name in away]
                entry.append(Roster(members=page[0], devices=page[1], room=room, more=page[2], away=page_away))
            if since > 0:
                newest = missed[-1].id if missed else since
                lines = missed + [event for event in recent if event.id > newest]
            else:
                lines = recent
            missing = over
            if seen is not None and lines:
                # Before the ignored are left out: a line not shown is not a line lost.
                first_seq = next((event.seq for event in lines if event.seq), 0)
                missing += max(0, first_seq - seen - 1) if first_seq else 0
            if ignored:
                lines = [event for event in lines if not (isinstance(event, Chat) and event.sender in ignored)]
            entry.extend(replace(event, history=True) for event in lines)
            if lines or missing:
                entry.append(
                    History(
                        room=room,
                        count=len(lines),
                        missing=missing,
                        oldest_id=lines[0].id if lines else 0,
                        more=_has_older(lines),
                    )
                )
            # Joins and leaves elsewhere announced as it came: each name's last one, where the roster
            # read says otherwise.
            last = {notice.name: notice for notice in news if notice.name != member.name}
            entry.extend(notice for notice in last.values() if (notice.event == "joined") != (notice.name in roster))
            member.deliver(Batch(messages=entry))

        with self.sessions_lock:
            rooms = self._session_rooms.get(member.session_id)
            if rooms is None or room in rooms:
                return  # the session ended; or it is entering the room on another thread (a login's, a /join's)
            # Listed first, as the entry's claim: one thread enters it, and a kick or /part from now on
            # takes it out (then found below, once it is in, and undone).
            rooms.append(room)
        local: Room | None = None
        registered = entered = welcomed = False
        try:
            local = self._room_to_enter(room)
            local.expect(member)
            elsewhere = self.backend.members_elsewhere(room)
            registered = True
            self.backend.enter_room(room, member.name, member.session_id)
            while True:
                try:
                    first = local.join(member, welcome, quiet=member.name in elsewhere)
                    break
                except RoomRetired:  # its last session here left as this one came: a fresh room, then
                    local = self._room_to_enter(room)
                    local.expect(member)
                    elsewhere = self.backend.members_elsewhere(room)
            welcomed = True
            # Still listed: else it ended, or was taken out (a kick, a /part) as it came in.
            entered = self._in_room(member, room)
            if not entered:
                return
        finally:
            if not entered:  # it never got in (the broker failed, the session ended): undo, drop an empty room
                self._undo_entry(member, room, local, registered=registered)
                if welcomed:  # it was told it left before its welcome came: told again, after it
                    member.deliver(RoomMessage(room=room, joined=False, reason="taken out as you came in"))
        if first and member.name not in elsewhere:
            self.backend.announce(room, Notice(event="joined", name=member.name, room=room))
        ban = self.room_state(room).ban_of(member.name)
        if ban is not None:  # banned while it entered: a ban's removal may have run before it was in
            self._remove_from_room(member.name, room, f"banned {_until(ban.until)}")

    def _undo_entry(self, member: Member, room: str, local: Room | None, *, registered: bool) -> None:
        if local is not None:
            local.leave(member, quiet=True)  # if it got in before what failed (nothing if not)
        with self.sessions_lock:  # its claim (see _enter), unless a kick or /part took it already
            rooms = self._session_rooms.get(member.session_id)
            if rooms is not None and room in rooms:
                rooms.remove(room)
        if registered:  # else its presence would be refreshed in the room's roster for ever
            self.backend.leave_room(room, member.name, member.session_id)
        if local is not None:
            self._retire_if_empty(room, local)

    def part(self, member: Member, room_name: str, reason: str = "") -> None:
        """/part: leave a room on every device of the account; it is no longer rejoined at login."""
        room = self._room_name(room_name)
        if not self._in_room(member, room):
            raise HubError("not_in_room", f"you are not in {room}")
        reason = self._own_words(member.name, room, _clean(reason, MAX_TOPIC_CHARS))
        self.backend.remove_membership(member.name, room)
        self._remove_from_room(member.name, room, reason, requested_by=member)
        self._tell_devices_elsewhere(member.name, "a /part")

    def _remove_from_room(self, account: str, room: str, reason: str, requested_by: Member | None = None) -> None:
        """Take every local session of ``account`` out of ``room`` (/part, or a kick or ban)."""
        for session in self.local_sessions(account):
            self._remove_session_from_room(session, room, reason, requested=session is requested_by)

    def _remove_session_from_room(self, session: Session, room: str, reason: str, *, requested: bool = False) -> None:
        with self.sessions_lock:
            rooms = self._session_rooms.get(session.session_id, [])
            if room not in rooms:
                return
            rooms.remove(room)
        self._leave(session, room, reason)
        session.deliver(RoomMessage(room=room, joined=False, reason=reason, requested=requested))

    def _leave(self, member: Member, room: str, reason: str) -> None:
        """One session leaves a room; the other processes hear of it if it was the account's last anywhere."""
        local = self._local_room(room, create=False)
        elsewhere = self.backend.leave_room(room, member.name, member.session_id)
        last_here = local is not None and local.leave(member, reason, quiet=elsewhere)
        if last_here and not elsewhere:
            self.backend.announce(room, Notice(event="left", name=member.name, text=reason, room=room))
        if last_here and local is not None:
            self._retire_if_empty(room, local)  # if nobody else is in it either

    def say(self, member: Member, room_name: str, text: str, *, action: bool = False, ref: str = "") -> None:
        """A line for a room the session is in: numbered, stored, and echoed to the sender with ``ref``."""
        room = self._room_name(room_name)
        if not self._in_room(member, room):
            raise HubError("not_in_room", f"not sent: you are not in {room} (/join {room} first)")
        self._check_may_speak(member.name, room)
        charge = self._charge_line(member.name)
        local = self._local_room(room, create=False)
        if local is not None:
            local.before_line_from(member.name)
        message = Chat(sender=member.name, text=text, sent_at=0.0, action=action, room=room)
        try:
            self.backend.publish_room(room, message, member.session_id, ref, charge=charge)
        except OverBudget:
            raise self._flood_refusal() from None
        self.backend.update_session(member.name, member.session_id, active=time.time())  # a line it took

    def private(self, member: Member, recipient: str, text: str, *, action: bool = False, ref: str = "") -> None:
        """A line for one account: every device of it, and of the sender; kept for whoever is offline."""
        try:
            named = self.accounts.canonical(recipient)
        except HubError as exc:
            raise HubError(exc.code, f"not sent: {exc}") from None
        if named is None:
            raise HubError("no_such_user", f"not sent: there is no user {_clean(recipient, 40)}")
        recipient = named
        if recipient == member.name:
            raise HubError("no_such_user", "not sent: that is you")
        if not self.config.keeps_history and not self.backend.sessions(recipient):
            # Nothing keeps it for later: refused, not sent into the void with a promise.
            raise HubError("offline", f"not sent: {recipient} is offline, and this server keeps no history")
        charge = self._charge_line(member.name)
        message = Chat(sender=member.name, text=text, sent_at=0.0, action=action, private=True, recipient=recipient)
        try:
            self.backend.publish_private(message, member.session_id, ref, charge=charge)
        except OverBudget:
            raise self._flood_refusal() from None
        self.backend.update_session(member.name, member.session_id, active=time.time())
        devices = self.backend.sessions(recipient)
        if not devices:
            member.deliver(
                Notice(event="info", text=f"{recipient} is offline; they will see your message when they next log in")
            )
        elif all(device.away is not None for device in devices) and self._should_tell_away(recipient, member.name):
            away = next((device.away for device in devices if device.away), "")
            member.deliver(Notice(event="info", text=f"{recipient} is away" + (f": {away}" if away else "")))

    def _should_tell_away(self, account: str, sender: str) -> bool:
        """True at most once an hour per sender: an away account answers a /msg, not every /msg."""
        now = time.monotonic()
        with self.personal_lock:
            if len(self._away_replies) > 10_000:  # a bound, not a policy: the oldest answers are forgotten
                self._away_replies = dict(sorted(self._away_replies.items(), key=lambda item: item[1])[5_000:])
            last = self._away_replies.get((account, sender))
            if last is not None and now - last < AWAY_REPLY_INTERVAL:
                return False
            self._away_replies[(account, sender)] = now
        # And on no other process, where the sender's other devices may be.
        try:
            return self.backend.claim(f"away-reply {account} {sender}", AWAY_REPLY_INTERVAL)
        except BackendUnavailable:
            return True  # told once more rather than not at all

    def who(self, member: Member, room_name: str) -> None:
        """/who, /names: a room's roster, in pages; counted against flood control by its size."""
        room = self._room_name(room_name)
        if self.backend.room(room) is None:
            raise HubError("no_such_room", f"there is no room {room}")
        local = self._local_room(room, create=False)
        names, devices = local.roster() if local is not None else ([], [])
        names, devices = _merged(names, devices, self.backend.members_elsewhere(room))
        self.check_flood(member.name, cost=1 + len(names) / 200)
        away = set(self._away_accounts(names))
        for page in paginate(names, devices):
            page_away = [name for name in page[0] if name in away]
            member.deliver(Roster(members=page[0], devices=page[1], room=room, more=page[2], away=page_away))

    def _away_accounts(self, names: list[str]) -> list[str]:
        """Those of ``names`` whose every session is away."""
        away = []
        for name in names:
            devices = self.backend.sessions(name)
            if devices and all(device.away is not None for device in devices):
                away.append(name)
        return away

    def list_rooms(self, member: Member) -> None:
        """/list: every room with how many are in it now and its topic, in pages."""
        records = self.backend.rooms()
        self.check_flood(member.name, cost=len(records) / 100)  # on top of the command's own (run_command)
        counts = []
        for record in records:
            local = self._local_room(record.name, create=False)
            here = set(local.roster()[0]) if local is not None else set()
            counts.append(len(here | set(self.backend.members_elsewhere(record.name))))
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
        if not self._in_room(member, room) and not self.accounts.is_admin(member.name):  # an admin runs every room
            raise HubError("not_in_room", f"you are not in {room}")
        if "t" in self.room_state(room).modes:
            self.require_role(member, room, "topic", "op")
        self._check_may_speak(member.name, room, refused="topic not set")  # a topic is told to everyone
        topic = _clean(text, MAX_TOPIC_CHARS + 1)
        if len(topic) > MAX_TOPIC_CHARS:
            raise HubError("bad_topic", f"a topic is at most {MAX_TOPIC_CHARS} characters")
        self.backend.set_topic(room, topic)
        self.backend.publish_room(room, Notice(event="topic", name=member.name, text=topic, room=room))

    def history(self, member: Member, room_name: str, count: int, before_id: int) -> None:
        """/history: up to ``count`` earlier lines of a room the session is in, from before ``before_id``."""
        room = self._room_name(room_name)
        if not self._in_room(member, room):
            raise HubError("not_in_room", f"you are not in {room}")
        if not 1 <= count <= MAX_HISTORY_PAGE:
            raise HubError("bad_history", f"/history takes 1 to {MAX_HISTORY_PAGE} lines at a time")
        lines = self.backend.history_before(room, before_id or (1 << 62), count)
        # On top of the command's own (run_command), by what it returns: an empty page costs no more.
        self.check_flood(member.name, cost=len(lines) / 50)
        ignored = self.ignored_by(member.name)
        # The page's bounds stay those of what was read, so that the next page starts where this one ended.
        shown = [event for event in lines if not (isinstance(event, Chat) and event.sender in ignored)]
        answer: list[Message] = [replace(event, history=True) for event in shown]
        answer.append(
            History(room=room, count=len(shown), oldest_id=lines[0].id if lines else 0, more=_has_older(lines))
        )
        member.deliver(Batch(messages=answer))  # one queued item, however many lines (see _enter)

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
        if target != "others" and len(target) < MIN_SESSION_PREFIX:
            # A letter or two would end whichever sessions happen to start with it.
            raise HubError("bad_command", f"give at least {MIN_SESSION_PREFIX} characters of the id (see /sessions)")
        if target != "others" and member.session_id.startswith(target):
            raise HubError("no_such_session", "that is this session: /quit ends it")
        chosen: list[Session] = []
        for session in self.local_sessions(member.name):
            if session.session_id == member.session_id:
                continue
            if target == "others" or session.session_id.startswith(target):
                chosen.append(session)
        local = {session.session_id for session in chosen} | {member.session_id}
        elsewhere = [
            info.session_id
            for info in self.backend.sessions(member.name)
            if info.session_id not in local and (target == "others" or info.session_id.startswith(target))
        ]
        if self.revoke_session is None:
            elsewhere = []
        if not chosen and not elsewhere:
            if target == "others":
                raise HubError("no_such_session", "you have no other session (see /sessions)")
            raise HubError("no_such_session", f"no other session {_clean(target, 20)} (see /sessions)")
        not_saved: RevocationNotSaved | None = None
        for session in chosen:
            try:
                session.end("logged out from another device")
            except RevocationNotSaved as exc:  # that session ended all the same: end the others, then say so
                not_saved = exc
        for session_id in elsewhere:  # on another server process, which ends it once it sees the revocation
            assert self.revoke_session is not None
            try:
                self.revoke_session(session_id)
            except RevocationNotSaved as exc:
                not_saved = exc
        if not_saved is not None:
            raise not_saved
        return len(chosen) + len(elsewhere)

    # ------------------------------------------------------------------ roles and moderation

    def room_state(self, room: str) -> RoomState:
        record = self.backend.room(room)
        return RoomState.parse(self.backend.state(room), creator=record.owner if record is not None else "")

    def rank(self, account: str, room: str, state: RoomState | None = None) -> int:
        """How much ``account`` may do in ``room``: its room role's rank, or an admin's (the highest)."""
        if self.accounts.is_admin(account):
            return ROLE_RANK["admin"]
        return (state or self.room_state(room)).rank(account)

    def require_role(self, member: Member, room: str, command: str, role: str) -> int:
        """The acting member's rank, if it may use ``command`` (needing ``role``) in ``room``; else ``HubError``.

        Acting in a room needs being in it (admins act in any room). ``room`` is "" for a server-wide command.
        """
        if not room:
            if role == "admin" and not self.accounts.is_admin(member.name):
                raise HubError("not_allowed", f"/{command} needs a server admin")
            return self.rank(member.name, "")
        if self.backend.room(room) is None:
            raise HubError("no_such_room", f"there is no room {room}")
        rank = self.rank(member.name, room)
        if rank < ROLE_RANK["admin"] and not self._in_room(member, room):
            raise HubError("not_in_room", f"you are not in {room}")
        if rank < ROLE_RANK[role]:
            held = {value: key for key, value in ROLE_RANK.items()}[rank]
            raise HubError("not_allowed", f"/{command} needs {_a(role)} {role} of {room} (you are {_a(held)} {held})")
        return rank

    def _own_words(self, account: str, room: str, text: str) -> str:
        """``text`` (a parting message) if ``account`` may speak in ``room``; else nothing, not a refusal:
        leaving is always allowed, saying something on the way out is not."""
        if not text:
            return text
        try:
            self._check_may_speak(account, room)
        except HubError:
            return ""
        return text

    def _check_may_speak(self, account: str, room: str, refused: str = "not sent") -> None:
        """``HubError`` if ``account`` may not say anything to ``room`` (banned, muted, unvoiced in +m),
        its message starting with ``refused``."""
        values = self.backend.state(room)
        if not values:  # most rooms: no roles beyond the owner, no modes, nobody muted
            return
        record = self.backend.room(room)
        state = RoomState.parse(values, creator=record.owner if record is not None else "")
        ban = state.ban_of(account)
        if ban is not None:  # banned while entering (the removal missed the session): refused all the same
            raise HubError("banned", f"{refused}: you are banned from {room} {_until(ban.until)}")
        mute = state.mute_of(account)
        if mute is not None:
            raise HubError("muted", f"{refused}: you are muted in {room} {_until(mute.until)}")
        if "m" in state.modes and self.rank(account, room, state) < ROLE_RANK["voice"]:
            raise HubError("moderated", f"{refused}: {room} is moderated (+m): only its owner, ops and voiced speak")

    def _target(self, actor: Member, name: str) -> str:
        """A named account that exists and is not the actor; ``HubError`` otherwise."""
        name = name.strip()
        if not name:
            raise HubError("bad_command", "name someone")
        named = self.accounts.canonical(name)
        if named is None:
            raise HubError("no_such_user", f"there is no user {_clean(name, 40)}")
        if named == actor.name:
            raise HubError("bad_target", "that is you")
        return named

    def _check_outranks(self, actor: Member, rank: int, target: str, room: str, state: RoomState) -> None:
        """An op cannot act on an owner or an admin: only on those below them (an admin on anyone else)."""
        target_rank = self.rank(target, room, state)
        if rank <= target_rank and rank < ROLE_RANK["admin"]:
            held = {value: key for key, value in ROLE_RANK.items()}[target_rank]
            raise HubError("not_allowed", f"{target} is {_a(held)} {held} of {room}: you cannot act on them")

    def _remove_after_notice(self, actor: Member, room: str, action: str, target: str, text: str, *, done: str) -> None:
        """A kick's or ban's notice (see ``_notice_of_removal``), then the target's membership of the room."""
        try:
            self._notice_of_removal(actor, room, action, target, text, done=done)
        except HubError:
            with contextlib.suppress(BackendUnavailable):  # what the op is told is the notice's failure
                self.backend.remove_membership(target, room)
            raise
        try:
            self.backend.remove_membership(target, room)
        except BackendUnavailable as exc:
            if action != "ban":  # a ban keeps them out anyway; a kick's membership would bring them back
                raise HubError("unavailable", f"{done}, but would be back at their next login: {exc}") from None

    def _notice_of_removal(self, actor: Member, room: str, action: str, target: str, text: str, *, done: str) -> None:
        """Tell the room of a kick or ban (itself saved already): handing the notice out takes the target
        out of the room, on every process. If the notice alone cannot be saved (a disk with room for a
        row of state but not for a sealed line), the removal stands: the target is taken out here, and
        the op is told the room was not."""
        try:
            self._moderation_notice(actor, room, action, target, text)
        except BackendUnavailable as exc:
            self._remove_from_room(target, room, text)
            raise HubError("unavailable", f"{done}, but the room could not be told: {exc}") from None

    def _moderation_notice(
        self, actor: Member, room: str, action: str, target: str, text: str, *, logged: str = ""
    ) -> None:
        """Tell the room (kept in its history) and the server log what a moderator did.

        ``logged``: what else the log line says (the modes set), never free text such as a reason.
        """
        log.info(
            "moderation room=%s user=%s action=%s target=%s%s",
            room,
            actor.name,
            action,
            target or "-",
            f" {logged}" if logged else "",
        )
        notice = Notice(event="moderation", name=actor.name, action=action, target=target, text=text, room=room)
        self.backend.publish_room(room, notice)

    def set_room_role(self, member: Member, room: str, name: str, role: str, command: str) -> None:
        """/owner, /op, /voice (``role``) or /deop, /devoice ("member"), with the role ``command`` needs.

        Nobody demotes someone at or above their own rank but themselves (admins anyone), and
        the last owner stays an owner.
        """
        rank = self.require_role(member, room, command, COMMANDS_BY_NAME[command].role)
        oneself = name.strip().casefold() == member.name.casefold()
        state = self.room_state(room)
        if oneself:
            target = member.name
        elif role == "member":
            target = _as_listed(name, state.roles)  # the account may be gone: as the room's roles name it
        else:
            target = self._target(member, name)
            # Before the name is given a role: a deleted account's rooms and roles must not pass to
            # a new one under its name, nor this role to the account after it.
            self._claim_name(target)
            state = self.room_state(room)
        current = state.role(target)
        if role == current:
            raise HubError("no_change", f"{target} is already {_a(role)} {role} of {room}")
        if current == "owner" and role != "owner" and state.owners() == [target]:
            raise HubError("last_owner", f"{target} is the last owner of {room}: make another owner first")
        demoting = ROLE_RANK[current] > ROLE_RANK[role]
        if demoting and ROLE_RANK[current] >= rank and rank < ROLE_RANK["admin"] and target != member.name:
            raise HubError("not_allowed", f"{target} is {_a(current)} {current} of {room}: you cannot demote them")
        self.backend.set_state(room, role_key(target), None if role == "member" else role)
        if current == "owner" and not RoomState.parse(self.backend.state(room)).owners():  # (no creator's fallback)
            # Another owner stepped down at the same moment, each seeing the other stay: the room keeps
            # this one (both, if both looked after both had written).
            self.backend.set_state(room, role_key(target), "owner")
            raise HubError("last_owner", f"{target} is the last owner of {room}: make another owner first")
        what = _role_change(target, role, current, by_themselves=target == member.name)
        action = role if role != "member" else "de" + current
        self._moderation_notice(member, room, action, target, f"{member.name} {what}")

    def unset_room_role(self, member: Member, room: str, name: str, only: tuple[str, ...], command: str) -> None:
        """/deop (an op or an owner) and /devoice: back to member, if the target has one of ``only``."""
        state = self.room_state(room)
        target = _as_listed(name, state.roles)
        current = state.role(target) if target else "member"
        if current not in only:
            self.require_role(member, room, command, COMMANDS_BY_NAME[command].role)
            raise HubError("no_change", f"{_clean(target, 40) or 'nobody'} is not {_a(only[0])} {only[0]} of {room}")
        self.set_room_role(member, room, target, "member", command)

    def mode(self, member: Member, room: str, change: str) -> None:
        """/mode: show a room's modes, or change them (ops)."""
        room = self._room_name(room)
        if not change.strip():
            if self.backend.room(room) is None:
                raise HubError("no_such_room", f"there is no room {room}")
            current = self.room_state(room).modes
            shown = ", ".join(f"+{letter} ({MODES[letter].split(':')[0]})" for letter in current) or "none"
            member.deliver(Notice(event="info", text=f"modes of {room}: {shown}", room=room))
            return
        try:
            adding, letters = parse_mode_change(change)
        except ValueError as exc:
            raise HubError("bad_mode", str(exc)) from None
        self.require_role(member, room, "mode", "op")
        sign = "+" if adding else "-"
        for _attempt in range(MODE_ATTEMPTS):
            stored = self.backend.state(room).get(MODES_KEY)
            before = set(stored or "")
            modes = before | set(letters) if adding else before - set(letters)
            if modes == before:
                # Nothing to tell the room or keep in its history; and no refusal, which would fail a
                # setup script run a second time.
                member.deliver(Notice(event="info", text=f"{room} is already {sign}{letters}", room=room))
                return
            # Only over what was read: an op changing another mode at once, here or on another
            # server process, is not undone.
            if self.backend.replace_state(room, MODES_KEY, stored, "".join(sorted(modes)) or None):
                break
        else:
            raise HubError("busy", f"the modes of {room} are changing just now; try again")
        text = f"{member.name} set mode {sign}{letters} on {room}"
        self._moderation_notice(member, room, "mode", "", text, logged=f"modes={sign}{letters}")

    def invite(self, member: Member, room: str, name: str) -> None:
        self.require_role(member, room, "invite", "op")
        target = self._target(member, name)
        self._claim_name(target)  # as for a role (set_room_role)
        if self.room_state(room).ban_of(target) is not None:
            raise HubError("banned", f"{target} is banned from {room}: /unban them first")
        if self._account_in_room(target, room):
            raise HubError("already_joined", f"{target} is already in {room}")
        self.backend.set_state(room, invite_key(target), "1")
        self._moderation_notice(member, room, "invite", target, f"{member.name} invited {target}")
        invitation = Notice(event="info", text=f"{member.name} invited you to {room}: /join {room}")
        try:
            self.backend.tell_account(target, invitation)  # on every process its devices are on
        except BackendUnavailable:
            pass  # the invitation stands, and the room was told: the invitee hears of it there, or from the op

    def kick(self, member: Member, room: str, name: str, reason: str) -> None:
        rank = self.require_role(member, room, "kick", "op")
        target = self._target(member, name)
        state = self.room_state(room)
        if not self._account_in_room(target, room):
            raise HubError("not_in_room", f"{target} is not in {room}")
        self._check_outranks(member, rank, target, room, state)
        reason = self._own_words(member.name, room, _clean(reason, MAX_REASON_CHARS))
        text = f"{member.name} kicked {target}{_reason(reason)}"
        # The notice before the membership goes: the target's devices elsewhere, which follow the
        # account's rooms, are taken out by the notice, with its reason, not first with none.
        self._remove_after_notice(member, room, "kick", target, text, done=f"{target} is out of {room}")

    def ban(self, member: Member, room: str, name: str, rest: str) -> None:
        rank = self.require_role(member, room, "ban", "op")
        target = self._target(member, name)
        seconds, reason = _duration_and_reason(rest)
        reason = self._own_words(member.name, room, reason)  # a muted op still acts, but says nothing
        state = self.room_state(room)
        self._check_outranks(member, rank, target, room, state)
        until = time.time() + seconds if seconds else 0.0
        self.backend.set_state(room, ban_key(target), Restriction(until, reason, member.name).value())
        self.backend.set_state(room, invite_key(target), None)
        text = f"{member.name} banned {target} {_for(seconds)}{_reason(reason)}"
        self._remove_after_notice(member, room, "ban", target, text, done=f"{target} is banned from {room}")

    def unban(self, member: Member, room: str, name: str) -> None:
        self.require_role(member, room, "unban", "op")
        target = _as_listed(name, self.room_state(room).bans)  # the account may be gone: as the ban names it
        if self.room_state(room).ban_of(target) is None:
            raise HubError("no_change", f"{_clean(target, 40) or 'nobody'} is not banned from {room}")
        self.backend.set_state(room, ban_key(target), None)
        self._moderation_notice(member, room, "unban", target, f"{member.name} lifted {target}'s ban")

    def mute(self, member: Member, room: str, name: str, rest: str) -> None:
        rank = self.require_role(member, room, "mute", "op")
        target = self._target(member, name)
        seconds, reason = _duration_and_reason(rest)
        reason = self._own_words(member.name, room, reason)
        self._check_outranks(member, rank, target, room, self.room_state(room))
        until = time.time() + seconds if seconds else 0.0
        self.backend.set_state(room, mute_key(target), Restriction(until, reason, member.name).value())
        self._moderation_notice(
            member, room, "mute", target, f"{member.name} muted {target} {_for(seconds)}{_reason(reason)}"
        )

    def unmute(self, member: Member, room: str, name: str) -> None:
        rank = self.require_role(member, room, "unmute", "op")
        state = self.room_state(room)
        target = _as_listed(name, state.mutes)  # the account may be gone: as the mute names it
        if target == member.name:
            raise HubError("bad_target", "that is you")  # a muted op stays muted
        if state.mute_of(target) is None:
            raise HubError("no_change", f"{_clean(target, 40) or 'nobody'} is not muted in {room}")
        self._check_outranks(member, rank, target, room, state)
        self.backend.set_state(room, mute_key(target), None)
        self._moderation_notice(member, room, "unmute", target, f"{member.name} unmuted {target}")

    def list_bans(self, member: Member, room: str) -> None:
        self.require_role(member, room, "bans", "op")
        state = self.room_state(room)
        lines = [
            f"{name} banned {_until(ban.until)} by {ban.by}{_reason(ban.reason)}"
            for name, ban in sorted(state.bans.items())
            if ban.active()
        ]
        lines += [
            f"{name} muted {_until(mute.until)} by {mute.by}"
            for name, mute in sorted(state.mutes.items())
            if mute.active()
        ]
        text = f"bans and mutes in {room}: " + ("; ".join(lines) if lines else "none")
        member.deliver(Notice(event="info", text=text[:PAGE_BUDGET], room=room))

    def global_ban(self, member: Member, name: str, rest: str) -> None:
        """/gban: refuse an account's logins, end its sessions here (their tokens revoked), tell the lobby."""
        target = self._target(member, name)
        seconds, reason = _duration_and_reason(rest)
        ban = AccountBan(time.time() + seconds if seconds else 0.0, reason, member.name)
        try:
            self.accounts.ban(target, ban)
        except KeyError:
            raise HubError("no_such_user", f"there is no user {target}") from None
        not_saved: RevocationNotSaved | None = None
        here = self.local_sessions(target)
        for session in here:
            try:
                session.end(f"this account was {ban.describe()}")
            except RevocationNotSaved as exc:
                not_saved = exc
        # Its sessions on other server processes too: they end once their process sees the ban,
        # but their tokens must not resume once it is lifted (a /logout's hold, like these).
        not_saved = self.revoke_sessions_of(target, besides={session.session_id for session in here}) or not_saved
        text = f"{member.name} banned {target} from the server {_for(seconds)}{_reason(reason)}"
        self._moderation_notice(member, self.config.default_room, "gban", target, text)
        if not_saved is not None:
            raise not_saved

    def revoke_sessions_of(self, account: str, besides: set[str] | None = None) -> RevocationNotSaved | None:
        """Revoke the tokens of every session of ``account`` on every server process (but ``besides``),
        so that none resumes: a ban ends them, and lifting it must not bring them back. Returns the
        failure to record one, if any, once all were tried."""
        not_saved: RevocationNotSaved | None = None
        if self.revoke_session is None:
            return None
        for info in self.backend.sessions(account):
            if info.session_id not in (besides or set()):
                try:
                    self.revoke_session(info.session_id)
                except RevocationNotSaved as exc:
                    not_saved = exc
        return not_saved

    def global_unban(self, member: Member, name: str) -> None:
        target = self.accounts.canonical(name.strip()) or name.strip()
        if not self.accounts.unban(target):
            raise HubError("no_change", f"{_clean(target, 40) or 'nobody'} is not banned from the server")
        self._moderation_notice(
            member, self.config.default_room, "ungban", target, f"{member.name} lifted {target}'s server ban"
        )

    def _account_in_room(self, account: str, room: str) -> bool:
        if room in self.backend.memberships(account):
            return True
        local = self._local_room(room, create=False)
        return local is not None and bool(local.sessions_of(account))

    # ------------------------------------------------------------------ presence and personal controls

    def set_message_of_the_day(self, member: Member, text: str | None) -> None:
        """/motd: show it, or (admins) set it; an empty text clears it."""
        if text is None:
            motd = self.motd.get()
            member.deliver(
                Notice(event="info", text=f"message of the day: {motd}" if motd else "no message of the day")
            )
            return
        self.require_role(member, "", "motd TEXT", "admin")
        motd = sanitize_text(text.strip(), keep_newlines=True)[:MAX_MOTD_CHARS]
        self.motd.set(motd)
        log.info("message of the day set by user=%s", member.name)
        member.deliver(Notice(event="info", text="message of the day set" if motd else "message of the day cleared"))

    def set_away(self, member: Member, message: str | None) -> None:
        """/away [message] and /back, for this device; the account is away when all its devices are."""
        shown = None if message is None else (_clean(message, MAX_AWAY_CHARS) or "away")
        if shown is None:
            was = next(
                (info.away for info in self.backend.sessions(member.name) if info.session_id == member.session_id), ""
            )
            if not was:
                member.deliver(Notice(event="info", text="you were not away"))
                return
        self.backend.update_session(member.name, member.session_id, away=shown)
        self._note_away(member.name)
        member.deliver(Notice(event="info", text=f"you are marked away: {shown}" if shown else "you are back"))

    def whois(self, member: Member, name: str) -> None:
        """/whois: devices online, rooms in common, idle time, away message, roles."""
        named = self.accounts.canonical(name.strip())
        if named is None:
            raise HubError("no_such_user", f"there is no user {_clean(name, 40)}")
        name = named
        devices = self.backend.sessions(name)
        parts = [f"{name}:"]
        if devices:
            online = f"online on {len(devices)} device{'s' if len(devices) != 1 else ''}"
            if name == member.name or self.accounts.is_admin(member.name):
                # A label defaults to the machine's host name: the account's own business (and an admin's).
                online += f" ({', '.join(device.device or 'no label' for device in devices)})"
            parts.append(online)
            active = max(max(device.active, device.since) for device in devices)
            parts.append(f"idle {_span(time.time() - active)}")
            if all(device.away is not None for device in devices):
                parts.append(f"away: {next((d.away for d in devices if d.away), 'away')}")
        else:
            parts.append("offline")
        parts.append("server admin" if self.accounts.is_admin(name) else "user")
        theirs = {self.config.default_room, *self.backend.memberships(name)}
        mine = {self.config.default_room, *self.backend.memberships(member.name)}
        common = []
        for room in sorted(theirs & mine):
            role = self.room_state(room).role(name)
            common.append(room if role == "member" else f"{room} ({role})")
        parts.append("rooms in common: " + (", ".join(common) or "none"))
        member.deliver(Notice(event="info", text=" ".join(parts[:2]) + "; " + "; ".join(parts[2:])))

    def ignored_by(self, account: str) -> frozenset[str]:
        with self.personal_lock:
            return self._ignores.get(account, frozenset())

    def _load_ignores(self, account: str, personal: dict[str, str] | None = None) -> None:
        """What ``account`` ignores, from its state (``personal``, if the caller has just read it)."""
        personal = self.backend.state(f"@{account}") if personal is None else personal
        ignores = frozenset(key[7:] for key in personal if key.startswith("ignore:"))
        self._set_ignores(account, ignores)

    def _set_ignores(self, account: str, ignores: frozenset[str]) -> None:
        with self.personal_lock:
            for name in self._ignores.get(account, frozenset()) - ignores:
                self._ignorers.get(name, set()).discard(account)
            for name in ignores:
                self._ignorers.setdefault(name, set()).add(account)
            self._ignores[account] = ignores

    def ignore(self, member: Member, name: str) -> None:
        """/ignore NAME: their room lines and private messages stop reaching this account; /ignore: the list."""
        if not name.strip():
            ignored = sorted(self.ignored_by(member.name))
            # "no one", not "nobody": an account may be called nobody.
            shown = "you ignore: " + ", ".join(ignored) if ignored else "you ignore no one"
            member.deliver(Notice(event="info", text=shown))
            return
        target = self._target(member, name)
        self.backend.set_state(f"@{member.name}", f"ignore:{target}", "1")
        self._set_ignores(member.name, self.ignored_by(member.name) | {target})
        self.backend.account_changed(member.name)  # its devices on other processes too
        member.deliver(Notice(event="info", text=f"you ignore {target} now, on all your devices (/unignore {target})"))

    def unignore(self, member: Member, name: str) -> None:
        target = _as_listed(name, self.ignored_by(member.name))
        if target not in self.ignored_by(member.name):
            raise HubError("no_change", f"you do not ignore {_clean(target, 40) or 'anybody by that name'}")
        self.backend.set_state(f"@{member.name}", f"ignore:{target}", None)
        self._set_ignores(member.name, self.ignored_by(member.name) - {target})
        self.backend.account_changed(member.name)
        member.deliver(Notice(event="info", text=f"you see {target}'s lines again"))

    # ------------------------------------------------------------------ limits and lifecycle

    def check_flood(self, account: str, cost: float = 1.0) -> None:
        """Count a request against the account's budget (shared by its devices); ``HubError`` past it."""
        if self.config.flood_rate <= 0 or cost <= 0:
            return
        shared = (
            self.flood_budget.take(account, cost, self.config.flood_rate, self.config.flood_burst)
            if self.flood_budget is not None
            else None
        )
        if shared is True:
            return
        if shared is False:
            raise self._flood_refusal()
        with self.flood_lock:
            bucket = self._flood.get(account)
            if bucket is None:
                bucket = self._flood[account] = FloodControl(self.config.flood_rate, self.config.flood_burst)
        if not bucket.allow(cost):
            raise self._flood_refusal()

    def _charge_line(self, account: str) -> LineCharge | None:
        """Count a line against the account's budget: here (``HubError`` past it), or, when the budget
        is shared and the backend can, returned for the backend to take as it stores the line (the
        check and the append in one step: one round trip to the broker, not two)."""
        if self.config.flood_rate > 0 and self.flood_budget is not None and self.backend.charges_lines:
            return LineCharge(account, 1.0, self.config.flood_rate, self.config.flood_burst)
        self.check_flood(account)
        return None

    def _flood_refusal(self) -> HubError:
        return HubError(
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

    def room_name(self, name: str) -> str:
        """``name`` as a room name (``#lobby``); ``HubError`` if it cannot be one."""
        return self._room_name(name)

    def _room_name(self, name: str) -> str:
        try:
            return normalize_room(name)
        except ValueError as exc:
            raise HubError("bad_room", str(exc)) from None


def _clean(text: str, limit: int) -> str:
    return sanitize_text(text.strip())[:limit]


def _merged(names: list[str], devices: list[int], elsewhere: dict[str, int]) -> tuple[list[str], list[int]]:
    """A room's roster here joined with who is in it on other server processes, sorted."""
    if not elsewhere:
        return names, devices
    counts = dict(zip(names, devices, strict=True))
    for name, count in elsewhere.items():
        counts[name] = counts.get(name, 0) + count
    merged = sorted(counts)
    return merged, [counts[name] for name in merged]


def _a(role: str) -> str:
    return "an" if role[:1] in "aeiou" else "a"


def _until(until: float) -> str:
    return "until lifted" if not until else f"until {format_utc(until)}"


def _for(seconds: int) -> str:
    return "until lifted" if not seconds else f"for {_span(seconds)}"


def _reason(reason: str) -> str:
    return f": {reason}" if reason else ""


def _span(seconds: float) -> str:
    """3d, 2h, 10m or 5s: the largest unit that fits."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _duration_and_reason(text: str) -> tuple[int, str]:
    try:
        seconds, reason = split_duration(text)
    except ValueError as exc:
        raise HubError("bad_duration", str(exc)) from None
    return seconds, _clean(reason, MAX_REASON_CHARS)


def _has_older(lines: list[RoomEvent]) -> bool:
    """Whether a room kept lines before these: the first line's place says so."""
    first_seq = next((event.seq for event in lines if event.seq), 0)
    return first_seq > 1


def _json_size(field: object) -> int:
    """About how many bytes ``field`` takes in JSON: a str's UTF-8 and its quotes, or its digits."""
    return len(field.encode()) + 3 if isinstance(field, str) else len(str(field)) + 1


#: What ``_pages`` counts for a roster item besides the name's UTF-8 and the count's digits.
_ROSTER_ITEM_OVERHEAD = 8


def paginate(names: list[str], devices: list[int]) -> Iterator[tuple[list[str], list[int], bool]]:
    """A roster in pages that each fit a frame: (names, devices, more). An empty roster is one empty page."""
    if len(names) != len(devices):
        raise ValueError("a roster needs a device count for every name")
    # At least what _pages would count for the whole roster (str() of the counts adds ", " to
    # each), counted in C: most rosters fit one page, and a login entering 50 rooms of 500
    # would otherwise spend 30 ms in the loop below.
    size = len("".join(names).encode()) + len(str(devices)) + _ROSTER_ITEM_OVERHEAD * len(names)
    if size <= PAGE_BUDGET:
        yield names, devices, False
        return
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


def _as_listed(name: str, listed: Iterable[str]) -> str:
    """``name`` as ``listed`` spells it, if it is there in any case ("Bob" for bob); else as given."""
    name = name.strip()
    return next((entry for entry in listed if entry.casefold() == name.casefold()), name)


def _role_change(target: str, role: str, current: str, by_themselves: bool) -> str:
    """What a role change is told as, after the actor's name: "gave bob voice", "gave up ownership"."""
    held = {"owner": "ownership"}.get(current, current)
    if role == "member":
        return f"gave up {held}" if by_themselves else f"took {target}'s {held} away"
    return f"gave {target} voice" if role == "voice" else f"made {target} {_a(role)} {role}"


def _whole_number(text: str, what: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise HubError("bad_command", f"{what} must be a whole number, not {_clean(text, 20)!r}") from None
    if not 0 <= number <= MAX_WIRE_INT:  # SQLite's integers are 64-bit: a bigger one would crash the query
        raise HubError("bad_command", f"{what} must be a whole number from 0 to {MAX_WIRE_INT}")
    return number


def _run_history(hub: ChatHub, member: Member, args: list[str]) -> None:
    count = _whole_number(args[1], "the number of lines") if len(args) > 1 and args[1] else HISTORY_PAGE
    before = _whole_number(args[2], "the message id") if len(args) > 2 and args[2] else 0
    hub.history(member, args[0], count, before)


def _report_logout(member: Member, count: int) -> None:
    member.deliver(Notice(event="info", text=f"ended {count} other session{'s' if count != 1 else ''}"))


def _arg(args: list[str], index: int) -> str:
    return args[index] if len(args) > index else ""


ServerRun = Callable[[ChatHub, Member, list[str]], None]

#: What the server runs for each of its commands in the one table (``securechat.commands``).
#: For a room's command ``args[0]`` is the room (already checked to be a room name).
SERVER_RUNNERS: dict[str, ServerRun] = {
    "join": lambda hub, member, args: hub.join(member, args[0]),
    "part": lambda hub, member, args: hub.part(member, args[0], " ".join(args[1:])),
    "list": lambda hub, member, _args: hub.list_rooms(member),
    "topic": lambda hub, member, args: hub.topic(member, args[0], args[1] if len(args) > 1 else None),
    "history": _run_history,
    "away": lambda hub, member, args: hub.set_away(member, _arg(args, 0)),
    "back": lambda hub, member, _args: hub.set_away(member, None),
    "whois": lambda hub, member, args: hub.whois(member, args[0]),
    "ignore": lambda hub, member, args: hub.ignore(member, _arg(args, 0)),
    "unignore": lambda hub, member, args: hub.unignore(member, args[0]),
    "motd": lambda hub, member, args: hub.set_message_of_the_day(member, args[0] if args else None),
    "mode": lambda hub, member, args: hub.mode(member, args[0], _arg(args, 1)),
    "owner": lambda hub, member, args: hub.set_room_role(member, args[0], args[1], "owner", "owner"),
    "op": lambda hub, member, args: hub.set_room_role(member, args[0], args[1], "op", "op"),
    "deop": lambda hub, member, args: hub.unset_room_role(member, args[0], args[1], ("op", "owner"), "deop"),
    "voice": lambda hub, member, args: hub.set_room_role(member, args[0], args[1], "voice", "voice"),
    "devoice": lambda hub, member, args: hub.unset_room_role(member, args[0], args[1], ("voice",), "devoice"),
    "invite": lambda hub, member, args: hub.invite(member, args[0], args[1]),
    "kick": lambda hub, member, args: hub.kick(member, args[0], args[1], _arg(args, 2)),
    "ban": lambda hub, member, args: hub.ban(member, args[0], args[1], _arg(args, 2)),
    "unban": lambda hub, member, args: hub.unban(member, args[0], args[1]),
    "bans": lambda hub, member, args: hub.list_bans(member, args[0]),
    "mute": lambda hub, member, args: hub.mute(member, args[0], args[1], _arg(args, 2)),
    "unmute": lambda hub, member, args: hub.unmute(member, args[0], args[1]),
    "gban": lambda hub, member, args: hub.global_ban(member, args[0], _arg(args, 1)),
    "ungban": lambda hub, member, args: hub.global_unban(member, args[0]),
    "sessions": lambda hub, member, _args: hub.list_sessions(member),
    "logout": lambda hub, member, args: _report_logout(member, hub.logout(member, args[0])),
}


def run_command(hub: ChatHub, member: Member, name: str, args: list[str]) -> None:
    """Run a ``Command`` from a client, as the one command table says: an unknown name, a wrong
    number of arguments, a bad room name or a role the member lacks is a ``HubError``."""
    # Every request counts, before any other check: a /part tells every member of the room, a
    # refused /kick still costs an answer. /list and /history add their answer's size to it.
    hub.check_flood(member.name)
    spec: CommandSpec | None = COMMANDS_BY_NAME.get(name)
    run = SERVER_RUNNERS.get(name)
    if spec is None or run is None or not spec.server:
        raise HubError("unknown_command", f"the server has no command {_clean(name, 20)!r}")
    low, high = spec.wire_args
    if not low <= len(args) <= high:
        raise HubError("bad_command", f"usage: {spec.synopsis}")
    if spec.room_scoped:
        args = [hub.room_name(args[0]), *args[1:]]
    if spec.role != "member":
        hub.require_role(member, args[0] if spec.room_scoped else "", name, spec.role)
    run(hub, member, args)
