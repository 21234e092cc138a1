"""The chat room as data: who is here and who receives what.

No sockets and no cryptography: a member is anything with a ``name`` and a
non-blocking ``deliver``. The server's connections are members; the tests can
use plain objects. ``Room`` is the one interface for fan-out, so a room shared
by several server processes (through a message broker) can replace
``LocalRoom`` without touching the connection code.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from protocol import Chat, Joined, Message, Notice


class Member(Protocol):
    """A room member: a user name and a way to hand it a message."""

    name: str

    def deliver(self, message: Message) -> None:
        """Queue ``message`` for this member. Must never block; may drop the member."""


class Room(Protocol):
    """Fan-out: who is in the room, and delivery of what they say."""

    def join(self, member: Member) -> tuple[list[str], Member | None]: ...
    def leave(self, member: Member, reason: str = "") -> None: ...
    def say(self, sender: Member, text: str, *, action: bool = False) -> None: ...
    def send_private(self, sender: Member, recipient: str, text: str, *, action: bool = False) -> bool: ...
    def who(self) -> list[str]: ...
    def announce(self, text: str) -> None: ...


class LocalRoom:
    """A room held in this process.

    Delivery never happens under the lock: the member list is copied under
    ``members_lock`` and each member's ``deliver`` (a queue put) runs after, so
    one member can never hold up the others.
    """

    def __init__(self) -> None:
        # Guards members: user name -> the member's current connection.
        self.members_lock = threading.Lock()
        self.members: dict[str, Member] = {}

    def join(self, member: Member) -> tuple[list[str], Member | None]:
        """Add ``member``; returns who was already here and the session it replaced.

        A user who logs in again (say after a dropped connection) replaces their
        old session: the caller closes the one returned.
        """
        with self.members_lock:
            replaced = self.members.get(member.name)
            self.members[member.name] = member
            others = [other for other in self.members.values() if other is not member]
            roster = sorted(self.members)
        notice = Notice(event="joined", name=member.name)
        for other in others:
            other.deliver(notice)
        return roster, replaced

    def leave(self, member: Member, reason: str = "") -> None:
        """Remove ``member`` if it is still the current session, and tell the others."""
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
        message = Chat(sender=sender.name, text=text, sent_at=time.time(), action=action)
        with self.members_lock:
            recipients = [member for member in self.members.values() if member is not sender]
        for recipient in recipients:
            recipient.deliver(message)

    def send_private(self, sender: Member, recipient: str, text: str, *, action: bool = False) -> bool:
        """Deliver to one member only; False if nobody by that name is online."""
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
