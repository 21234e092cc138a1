"""The chat room as data: who is here and who receives what.

No sockets and no cryptography: a member is anything with a ``name`` and a
non-blocking ``deliver``. The server's connections are members; the tests can
use plain objects. ``Room`` is the one interface for fan-out, so a room shared
by several server processes (through a message broker) can replace
``LocalRoom`` without touching the connection code.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from securechat.protocol import Chat, Joined, Message, Notice


class Member(Protocol):
    """A room member: a user name and a way to hand it a message."""

    name: str

    def deliver(self, message: Message) -> None:
        """Queue ``message`` for this member. Must never block, nor call back into the room; may drop the member."""


class Room(Protocol):
    """Fan-out: who is in the room, and delivery of what they say."""

    def join(
        self, member: Member, welcome: Callable[[list[str]], None] | None = None
    ) -> tuple[list[str], Member | None]: ...
    def leave(self, member: Member, reason: str = "") -> None: ...
    def say(self, sender: Member, text: str, *, action: bool = False) -> None: ...
    def send_private(self, sender: Member, recipient: str, text: str, *, action: bool = False) -> bool: ...
    def who(self) -> list[str]: ...
    def announce(self, text: str) -> None: ...
    def close(self) -> None: ...


#: Seconds a "joined" notice waits for others to go out with it. Every notice costs
#: each member an RSA wrap, so a burst of N logins would cost about N²/2 of them;
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


class LocalRoom:
    """A room held in this process.

    Delivery never happens under the lock (but for the joiner's own welcome):
    the member list is copied under ``members_lock`` and each member's
    ``deliver`` (a queue put) runs after, so one member can never hold up the
    others.

    "Joined" notices are gathered for ``join_notice_delay`` seconds and go out
    together (one ``Joined`` per member), on a timer thread. Rounds of notices
    are also spaced by the room's size over ``join_notice_rate`` (frames a
    second); that pacing adds at most ``JOIN_NOTICE_MAX_DELAY``. ``clock`` is
    the time source of the pacing (tests set it). They still come before anything
    else about the people they name: a leave, or a line from one of them, sends
    the gathered notices first.
    """

    def __init__(
        self,
        join_notice_delay: float = JOIN_NOTICE_DELAY,
        join_notice_rate: float = JOIN_NOTICE_FRAMES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.join_notice_delay = join_notice_delay
        self.join_notice_rate = join_notice_rate
        self._clock = clock
        # Guards members, _pending_joins, _join_timer and _last_join_notices.
        self.members_lock = threading.Lock()
        #: user name -> the member's current connection.
        self.members: dict[str, Member] = {}
        # Members whose "joined" notice has not gone out yet, in the order they joined.
        self._pending_joins: list[Member] = []
        # Sends the pending notices when the delay is up; None when nothing is pending.
        self._join_timer: threading.Timer | None = None
        # When the last round of join notices went out, by ``_clock``.
        self._last_join_notices = -math.inf
        # Held while join notices are taken and handed out (taken before members_lock),
        # so a line or a leave that must come after them cannot overtake them.
        self._join_notices_lock = threading.Lock()
        # Set by close(), under members_lock: no more notices or timers after it.
        self._closed = False

    def join(
        self, member: Member, welcome: Callable[[list[str]], None] | None = None
    ) -> tuple[list[str], Member | None]:
        """Add ``member``; returns who is here now and the session it replaced.

        ``welcome(roster)`` is called with who is here, at the moment of joining and
        before anything else can reach the member: it hears of later joins only, and
        of every leave after the roster. A user who logs in again (say after a dropped
        connection) replaces their old session: the caller closes the one returned.
        The others hear of the join after ``join_notice_delay`` seconds, or in a
        burst of joins up to ``JOIN_NOTICE_MAX_DELAY`` later.
        """
        timer = None
        with self.members_lock:
            replaced = self.members.get(member.name)
            self.members[member.name] = member
            roster = sorted(self.members)
            if welcome is not None:
                welcome(roster)  # a queue put: the one delivery made under the lock
            if self._closed:
                return roster, replaced
            self._pending_joins.append(member)
            if self._join_timer is None and self.join_notice_delay > 0:
                timer = self._join_timer = threading.Timer(self._join_notice_wait(), self._on_join_timer)
                timer.name = "join-notices"
                timer.daemon = True
        if timer is not None:
            timer.start()
        elif self.join_notice_delay <= 0:
            self.send_join_notices()
        return roster, replaced

    def _join_notice_wait(self) -> float:
        """Seconds until the next round of join notices; called under ``members_lock``."""
        spacing = len(self.members) / self.join_notice_rate if self.join_notice_rate > 0 else 0.0
        paced = self._last_join_notices + spacing - self._clock()
        return max(self.join_notice_delay, min(JOIN_NOTICE_MAX_DELAY, paced))

    def send_join_notices(self) -> None:
        """Tell everyone of the joins not yet announced: each member hears of those who came after it."""
        with self._join_notices_lock:
            self._send_join_notices()

    def _on_join_timer(self) -> None:
        with self._join_notices_lock:
            self._send_join_notices(from_timer=threading.current_thread())

    def _send_join_notices(self, from_timer: threading.Thread | None = None) -> None:
        """Send the pending round; called by ``from_timer``, only if it is still the room's timer."""
        with self.members_lock:  # the swap, the filter and the snapshot in one hold: no join can fall between
            if from_timer is not None and from_timer is not self._join_timer:
                # A round went out while this timer waited for the lock (too late to cancel it): the
                # joins since then have a timer of their own, paced from that round.
                return
            joined, self._pending_joins = self._pending_joins, []
            timer, self._join_timer = self._join_timer, None
            # A session replaced before its notice went out is not announced; its successor is.
            joined = [member for member in joined if self.members.get(member.name) is member]
            everyone = list(self.members.values())
            if joined:
                self._last_join_notices = self._clock()
        if timer is not None:
            timer.cancel()  # sent early (a line or a leave could not wait): the timer has nothing to do
        if not joined:
            return
        position = {id(member): index for index, member in enumerate(joined)}
        # Those who were here before the round all hear the same: one message, encoded once.
        for_earlier_members = joined_notice([member.name for member in joined])
        for recipient in everyone:
            index = position.get(id(recipient))
            if index is None:
                recipient.deliver(for_earlier_members)
                continue
            # The welcome roster named those who came before this recipient.
            names = [member.name for member in joined[index + 1 :]]
            if names:
                recipient.deliver(joined_notice(names))

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

    def _announced_before(self, member: Member) -> None:
        """Send pending join notices now if ``member`` is among them: nothing about it may overtake its join."""
        with self._join_notices_lock:
            with self.members_lock:
                pending = any(joined is member for joined in self._pending_joins)
            if pending:
                self._send_join_notices()

    def leave(self, member: Member, reason: str = "") -> None:
        """Remove ``member`` if it is still the current session, and tell the others."""
        self._announced_before(member)
        with self.members_lock:
            if self.members.get(member.name) is not member:
                return
            del self.members[member.name]
            others = list(self.members.values())
        notice = Notice(event="left", name=member.name, text=reason)
        for other in others:
            other.deliver(notice)

    def say(self, sender: Member, text: str, *, action: bool = False) -> None:
        """Deliver a public line to everyone but its sender, named by the server."""
        self._announced_before(sender)
        message = Chat(sender=sender.name, text=text, sent_at=time.time(), action=action)
        with self.members_lock:
            recipients = [member for member in self.members.values() if member is not sender]
        for recipient in recipients:
            recipient.deliver(message)

    def send_private(self, sender: Member, recipient: str, text: str, *, action: bool = False) -> bool:
        """Deliver to one member only; False if nobody by that name is online."""
        self._announced_before(sender)
        with self.members_lock:
            target = self.members.get(recipient)
        if target is None:
            return False
        target.deliver(
            Chat(
                sender=sender.name,
                text=text,
                sent_at=time.time(),
                action=action,
                private=True,
                recipient=recipient,
            )
        )
        return True

    def who(self) -> list[str]:
        with self.members_lock:
            return sorted(self.members)

    def announce(self, text: str) -> None:
        """A system notice to everyone (for example: the server is shutting down)."""
        with self.members_lock:
            everyone = list(self.members.values())
        notice = Notice(event="info", text=text)
        for member in everyone:
            member.deliver(notice)


class FloodControl:
    """A token bucket: ``burst`` lines at once, then ``rate`` lines per second.

    Owned by one connection's reader thread, so it needs no lock. The default
    burst lets a pasted block of ten or so lines through.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def allow(self) -> bool:
        """Take one token if there is one; False means the line is over the limit."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def is_full(self) -> bool:
        """True when the bucket has refilled: its owner has been quiet, nothing to remember."""
        return self.rate <= 0 or self._tokens + (time.monotonic() - self._updated) * self.rate >= self.burst


def joined_notice(names: list[str]) -> Notice | Joined:
    """The message that tells of ``names`` joining: a ``Notice`` for one, a ``Joined`` for several."""
    return Notice(event="joined", name=names[0]) if len(names) == 1 else Joined(names=names)


def merge_join_notices(queued: list[Any]) -> list[Any]:
    """Turn each run of two or more adjacent "joined" notices in a queued batch into one ``Joined``.

    A recipient whose queue keeps up gets every notice on its own, at once (a batch of
    one is left alone); one that has fallen behind a burst of logins gets the run in one
    frame. Only adjacent notices merge, so nothing is reordered.
    """
    merged: list[Any] = []
    for item in queued:
        if _is_join(item) and merged and isinstance(merged[-1], Notice | Joined) and _joined_names(merged[-1]):
            merged[-1] = Joined(names=[*_joined_names(merged[-1]), item.name])
        else:
            merged.append(item)
    return merged


def _is_join(item: Any) -> bool:
    return isinstance(item, Notice) and item.event == "joined"


def _joined_names(item: Notice | Joined) -> list[str]:
    if isinstance(item, Joined):
        return item.names
    return [item.name] if item.event == "joined" else []
