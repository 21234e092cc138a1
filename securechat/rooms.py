"""A room as this process sees it: which local sessions are in it, and who receives what.

No sockets, no cryptography, no storage: a member is anything with an account
``name``, a ``session_id`` and a non-blocking ``deliver``. One account may be in a
room from several sessions (devices); presence is per account: the others hear
"alice joined" when her first session comes in and "alice left" when her last
one goes. What the room says is published through the backend (which gives it
its id and time), and comes back to ``deliver_published`` for local delivery.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from securechat.protocol import Chat, Joined, Message, Notice


class Member(Protocol):
    """One session of an account: a user name, a session id and a way to hand it a message."""

    name: str
    session_id: str

    def deliver(self, message: Message) -> None:
        """Queue ``message`` for this session. Must never block, nor call back into the room; may drop it."""


#: Seconds a "joined" notice waits for others to go out with it. Every notice costs
#: each member a sealed frame, so a burst of N logins would cost about N²/2 of them;
#: gathered, it costs each member one frame per interval.
JOIN_NOTICE_DELAY = 0.25
#: In a long burst (a login storm, everyone coming back after a restart) rounds are also
#: spaced by the room's size, so that they cost about this many frames a second: at 520
#: members, one round every 1.3 s instead of every 0.25 s. A join that comes when no round
#: went out for that long waits only JOIN_NOTICE_DELAY. Not a hard bound: a line or a
#: leave from someone still pending sends a round at once (ordering comes first).
JOIN_NOTICE_FRAMES_PER_SECOND = 400
#: ... but pacing never holds a notice longer than this, however big the room (so above
#: 800 members a burst costs more than JOIN_NOTICE_FRAMES_PER_SECOND).
JOIN_NOTICE_MAX_DELAY = 2.0
#: When rooms share a ``NoticePacer`` (a server's rooms do), the budget above is for all of them
#: together, and a round may wait this long for its turn: an account in 50 rooms of 500 would
#: otherwise cost 25,000 notice frames per round of logins. Lateness is all it costs: nothing
#: about a member overtakes its join notice.
SHARED_JOIN_NOTICE_MAX_DELAY = 30.0


class NoticePacer:
    """One budget of join-notice frames a second for several rooms: each round books its frames.

    ``book(frames)`` returns how long the round should wait for its turn. Guarded by
    ``_schedule_lock``; it holds nothing else and calls nothing.
    """

    def __init__(
        self, rate: float = JOIN_NOTICE_FRAMES_PER_SECOND, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self._clock = clock
        # Guards _next_free: when the budget is free again, by ``_clock``.
        self._schedule_lock = threading.Lock()
        self._next_free = -math.inf

    def book(self, frames: int) -> float:
        """Book ``frames`` notice frames; returns the seconds until their turn (0: now)."""
        if self.rate <= 0:
            return 0.0
        with self._schedule_lock:
            now = self._clock()
            start = max(now, self._next_free)
            self._next_free = start + frames / self.rate
            return start - now


#: Most names in one ``Joined`` frame: 1,000 names of 32 characters are about 35 KB of JSON,
#: well within a 64 KiB frame beside the envelope.
MAX_NAMES_PER_JOINED = 1000
#: Recent lines a room keeps in memory, sent to whoever joins (as history) with no disk read.
DEFAULT_RECENT_LINES = 50

#: What a room's recent-lines buffer holds: lines and topic changes, with their ids.
RoomEvent = Chat | Notice


class RoomRetired(Exception):
    """The room was retired (its last member here left) as a session came to join: make a fresh one."""


class Welcome(Protocol):
    """Called by ``Room.join`` under the room's lock, as the session joins: a few queue puts."""

    def __call__(self, roster: list[str], devices: list[int], recent: list[RoomEvent], news: list[Notice]) -> None: ...


class Room:
    """One room's local members, its recent lines, and the pacing of its join notices.

    Delivery never happens under the lock but for the joiner's own welcome (its
    roster and the recent lines, queue puts): the member list is copied under
    ``members_lock`` and each member's ``deliver`` runs after, so one member can
    never hold up the others.

    "Joined" notices are gathered for ``join_notice_delay`` seconds and go out
    together (one ``Joined`` per member), on a timer thread. Rounds of notices are
    also spaced by the room's size over ``join_notice_rate`` (frames a second);
    that pacing adds at most ``JOIN_NOTICE_MAX_DELAY``. Rooms given one ``pacer``
    share its budget instead (and may wait up to ``SHARED_JOIN_NOTICE_MAX_DELAY``). ``clock`` is the time
    source of the pacing (tests set it). They still come before anything else
    about the people they name: a leave, or a line from one of them, sends the
    gathered notices first.
    """

    def __init__(
        self,
        name: str,
        *,
        topic: str = "",
        recent: list[RoomEvent] | None = None,
        newest_id: int = 0,
        recent_size: int = DEFAULT_RECENT_LINES,
        join_notice_delay: float = JOIN_NOTICE_DELAY,
        join_notice_rate: float = JOIN_NOTICE_FRAMES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        pacer: NoticePacer | None = None,
    ) -> None:
        self.name = name
        # Shared with the other rooms of the server, when given: their notices share one budget.
        self._pacer = pacer
        self.join_notice_delay = join_notice_delay
        self.join_notice_rate = join_notice_rate
        self._clock = clock
        # Guards sessions, topic, _recent, _newest_id, _pending_joins, _join_timer, _last_join_notices,
        # _announcing, _closed, _retired, _entering.
        self.members_lock = threading.Lock()
        #: account name -> its sessions in this room, oldest first.
        self.sessions: dict[str, list[Member]] = {}
        # Sessions about to join (``expect``) -> the joins and leaves on other server processes
        # announced meanwhile: what the roster it is welcomed with may not show yet.
        self._entering: dict[Member, list[Notice]] = {}
        self.topic = topic
        # The last lines said here (already numbered by the backend), oldest first.
        self._recent: deque[RoomEvent] = deque(recent or (), maxlen=max(0, recent_size))
        # The id of the newest event this room has (ids rise in a room; ``newest_id`` when it was made,
        # which its recent lines may not hold): one it already has, handed over again as a room is
        # retired and made afresh, is not delivered twice.
        self._newest_id = max([newest_id, *(event.id for event in recent or ())])
        # Accounts whose "joined" notice has not gone out yet, in the order they arrived.
        self._pending_joins: list[str] = []
        # Sends the pending notices when the delay is up; None when nothing is pending.
        self._join_timer: threading.Timer | None = None
        # When the last round of join notices went out, by ``_clock``.
        self._last_join_notices = -math.inf
        # The accounts whose round of join notices is being handed out (with no lock held), or
        # None: a line or a leave from one of them waits for the round, so it cannot overtake
        # its notice, and the next round goes out after it. Nobody else waits for a round.
        self._announcing: frozenset[str] | None = None
        # Notified (with members_lock) when a round has been handed out.
        self._round_done = threading.Condition(self.members_lock)
        # Set by close(): no more notices or timers after it.
        self._closed = False
        # Set by retire(): empty, and no longer the process's room of that name; nobody may join it.
        self._retired = False
        #: Which making of this room by the hub it is (they rise): tells its backend watch apart from
        #: an earlier or later one's. Set by the hub as it makes the room.
        self.generation = 0
        #: Whether the backend reads this room's events for it yet: the hub sets it (under its own
        #: lock), and puts nobody in the room before.
        self.watched = False

    # ------------------------------------------------------------------ membership

    def expect(self, member: Member) -> None:
        """``member`` is about to join: what is announced from other processes until then is kept for
        its welcome (the roster the hub reads elsewhere from now on may or may not show it)."""
        with self.members_lock:
            self._entering.setdefault(member, [])

    def join(self, member: Member, welcome: Welcome | None = None, *, quiet: bool = False) -> bool:
        """Add a session; True if it is its account's first here (the others will hear of it).

        ``welcome(roster, devices, recent)`` is called with who is here and the recent
        lines, at the moment of joining and before anything else can reach the session:
        it hears of later joins, lines and leaves only. ``quiet``: the account is already in
        the room through another server process, so nobody is told it joined. ``RoomRetired``
        if the room was retired meanwhile (nothing was done: join a fresh one).
        """
        timer = None
        with self.members_lock:
            if self._retired:
                raise RoomRetired(self.name)
            sessions = self.sessions.setdefault(member.name, [])
            first = not sessions
            if all(existing is not member for existing in sessions):
                sessions.append(member)
            news = self._entering.pop(member, [])
            if welcome is not None:
                roster = sorted(self.sessions)
                welcome(roster, [len(self.sessions[name]) for name in roster], list(self._recent), news)
            if not first or self._closed or quiet:
                return first
            self._pending_joins.append(member.name)
            if self._join_timer is None and self.join_notice_delay > 0:
                timer = self._join_timer = threading.Timer(self._join_notice_wait(), self._on_join_timer)
                timer.name = f"join-notices {self.name}"
                timer.daemon = True
        if timer is not None:
            timer.start()
        elif self.join_notice_delay <= 0:
            self.send_join_notices()
        return first

    def leave(self, member: Member, reason: str = "", *, quiet: bool = False) -> bool:
        """Remove a session; True if it was its account's last here (the others are told, unless
        ``quiet``: the account is still in the room through another server process)."""
        # After any round going out too: the leaver is among its recipients, and must not hear
        # of a join after it hears it left (a /part).
        self._announced_before(member.name, any_round=True)
        with self.members_lock:
            self._entering.pop(member, None)  # (it never got in)
            sessions = self.sessions.get(member.name)
            if not sessions or all(existing is not member for existing in sessions):
                return False
            sessions[:] = [existing for existing in sessions if existing is not member]
            if sessions:
                return False
            del self.sessions[member.name]
            others = [] if quiet else self._everyone()
        notice = Notice(event="left", name=member.name, text=reason, room=self.name)
        for other in others:
            other.deliver(notice)
        return True

    def newest_id(self) -> int:
        """The id of the newest event this room has: where reading its events goes on from."""
        with self.members_lock:
            return self._newest_id

    def sessions_of(self, name: str) -> list[Member]:
        with self.members_lock:
            return list(self.sessions.get(name, ()))

    def roster(self) -> tuple[list[str], list[int]]:
        """Who is here, sorted, and how many sessions each has."""
        with self.members_lock:
            names = sorted(self.sessions)
            return names, [len(self.sessions[name]) for name in names]

    def member_count(self) -> int:
        with self.members_lock:
            return len(self.sessions)

    def _everyone(self) -> list[Member]:
        """Every session here; called under ``members_lock``."""
        return [member for sessions in self.sessions.values() for member in sessions]

    # ------------------------------------------------------------------ what is said

    def before_line_from(self, sender: str) -> None:
        """Call before publishing a line from ``sender``: its join notice must go out first."""
        self._announced_before(sender)

    def deliver_published(
        self, message: RoomEvent, origin_session: str = "", ref: str = "", skip_accounts: frozenset[str] = frozenset()
    ) -> bool:
        """Hand a numbered line (or topic change) to every local session here, and remember it.

        The session it came from (``origin_session``) gets its own copy carrying
        ``ref``: the echo that tells it the line was accepted. Every session of every
        account here gets it, the sender's other devices included, but for ``skip_accounts``
        (those who ignore the sender). Returns whether the session it came from was here for it.
        """
        with self.members_lock:
            if message.id and message.id <= self._newest_id:
                return True  # had already (loaded with the recent lines as this room was made)
            self._newest_id = max(self._newest_id, message.id)
            if isinstance(message, Notice) and message.event == "topic":
                self.topic = message.text
            if self._recent.maxlen:
                self._recent.append(message)
            recipients = self._everyone()
        echo = replace(message, ref=ref) if ref and isinstance(message, Chat) else message
        origin_here = False
        for recipient in recipients:
            if recipient.session_id == origin_session:
                origin_here = True
                recipient.deliver(echo)
            elif not (skip_accounts and recipient.name in skip_accounts):
                recipient.deliver(message)
        return origin_here

    def announce_notice(self, notice: Notice) -> None:
        """A notice to everyone here, not kept: a join or leave on another server process, or ``announce``'s."""
        with self.members_lock:
            everyone = self._everyone()
            if notice.event in ("joined", "left"):
                for news in self._entering.values():
                    news.append(notice)
        for member in everyone:
            member.deliver(notice)

    def announce(self, text: str) -> None:
        """A system notice to everyone here, not kept (for example: the server is shutting down)."""
        self.announce_notice(Notice(event="info", text=text, room=self.name))

    # ------------------------------------------------------------------ join notices

    def _join_notice_wait(self) -> float:
        """Seconds until the next round of join notices; called under ``members_lock``."""
        if self._pacer is not None:
            turn = self._pacer.book(len(self.sessions))
            return max(self.join_notice_delay, min(SHARED_JOIN_NOTICE_MAX_DELAY, turn))
        spacing = len(self.sessions) / self.join_notice_rate if self.join_notice_rate > 0 else 0.0
        paced = self._last_join_notices + spacing - self._clock()
        return max(self.join_notice_delay, min(JOIN_NOTICE_MAX_DELAY, paced))

    def send_join_notices(self) -> None:
        """Tell everyone of the joins not yet announced: each account hears of those who came after it.

        Returns once they are handed out, and those of any round that was going out before.
        """
        self._send_join_notices()

    def _on_join_timer(self) -> None:
        self._send_join_notices(from_timer=threading.current_thread())

    def _send_join_notices(self, from_timer: threading.Thread | None = None) -> None:
        """Send the pending round; called by ``from_timer``, only if it is still the room's timer."""
        with self._round_done:  # the swap, the filter and the snapshot in one hold: no join can fall between
            while self._announcing is not None:  # one round at a time, in order
                self._round_done.wait()
            if from_timer is not None and from_timer is not self._join_timer:
                # A round went out while this timer waited for the lock (too late to cancel it): the
                # joins since then have a timer of their own, paced from that round.
                return
            joined, self._pending_joins = self._pending_joins, []
            timer, self._join_timer = self._join_timer, None
            # An account that left again before its notice went out is not announced.
            joined = [name for name in joined if name in self.sessions]
            everyone = [(name, list(sessions)) for name, sessions in self.sessions.items()]
            if joined:
                self._last_join_notices = self._clock()
                self._announcing = frozenset(joined)
        if timer is not None:
            timer.cancel()  # sent early (a line or a leave could not wait): the timer has nothing to do
        if not joined:
            return
        try:
            self._hand_out(joined, everyone)
        finally:
            with self._round_done:
                self._announcing = None
                self._round_done.notify_all()

    def _hand_out(self, joined: list[str], everyone: list[tuple[str, list[Member]]]) -> None:
        """Deliver a round's notices (O(members), no lock held): each account hears of those after it."""
        position = {name: index for index, name in enumerate(joined)}
        # Those who were here before the round all hear the same: one message, encoded once.
        for_earlier_members = joined_notices(joined, self.name)
        for name, sessions in everyone:
            index = position.get(name)
            # The welcome roster named those who came before this account.
            messages = for_earlier_members if index is None else joined_notices(joined[index + 1 :], self.name)
            for message in messages:
                for session in sessions:
                    session.deliver(message)

    def _announced_before(self, name: str, *, any_round: bool = False) -> None:
        """Return once ``name``'s join notice is handed out, if it is pending or going out: nothing about
        it may overtake it. A line from anyone else goes on at once, whatever a round is announcing;
        ``any_round`` waits for a round going out in any case."""
        with self._round_done:
            while self._announcing is not None and (any_round or name in self._announcing):
                self._round_done.wait()
            pending = name in self._pending_joins
        if pending:
            self._send_join_notices()  # with any round going out meanwhile (which may have taken it) before

    def retire(self) -> bool:
        """Close the room if nobody is in it (its last member here left): True if it did. From then on
        ``join`` refuses with ``RoomRetired``, so a session coming in meanwhile goes to a fresh room
        rather than to one nobody delivers to any more."""
        with self.members_lock:
            if self.sessions:
                return False
            self._retired = self._closed = True
            timer, self._join_timer = self._join_timer, None
            self._pending_joins = []
        if timer is not None:
            timer.cancel()  # with nobody here, a round that started anyway hands out nothing
        return True

    def close(self) -> None:
        """Stop the notice timer (the server is shutting down); pending notices are dropped."""
        with self.members_lock:
            self._closed = True
            timer, self._join_timer = self._join_timer, None
            self._pending_joins = []
        if timer is not None:
            timer.cancel()
            # join() starts the timer after releasing the lock: it may not have started yet.
            if timer is not threading.current_thread() and timer.ident is not None:
                timer.join()


def joined_notices(names: list[str], room: str) -> list[Notice | Joined]:
    """The messages that tell of ``names`` joining ``room``: a ``Notice`` for one, else ``Joined`` frames
    of at most ``MAX_NAMES_PER_JOINED`` names each (a frame is 64 KiB); none for no names."""
    if len(names) == 1:
        return [Notice(event="joined", name=names[0], room=room)]
    return [
        Joined(names=names[start : start + MAX_NAMES_PER_JOINED], room=room)
        for start in range(0, len(names), MAX_NAMES_PER_JOINED)
    ]


def merge_join_notices(queued: list[Any]) -> list[Any]:
    """Turn each run of two or more adjacent "joined" notices of one room in a queued batch into one ``Joined``.

    A recipient whose queue keeps up gets every notice on its own, at once (a batch of
    one is left alone); one that has fallen behind a burst of logins gets the run in one
    frame. Only adjacent notices merge, so nothing is reordered.
    """
    merged: list[Any] = []
    for item in queued:
        previous = merged[-1] if merged else None
        if (
            _is_join(item)
            and isinstance(previous, Notice | Joined)
            and previous.room == item.room
            and 0 < len(_joined_names(previous)) < MAX_NAMES_PER_JOINED
        ):
            merged[-1] = Joined(names=[*_joined_names(previous), item.name], room=item.room)
        else:
            merged.append(item)
    return merged


def _is_join(item: Any) -> bool:
    return isinstance(item, Notice) and item.event == "joined"


def _joined_names(item: Notice | Joined) -> list[str]:
    if isinstance(item, Joined):
        return item.names
    return [item.name] if item.event == "joined" else []
