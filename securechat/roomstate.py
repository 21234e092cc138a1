"""What a room's stored state means: roles, modes, invites, bans and mutes.

The backend keeps each room's state as text values under text keys (scope ``#room``),
the shape a SQLite table and a Redis hash hold alike; this module is the one place
that reads and writes those keys. No I/O: ``RoomState`` is a snapshot, and the
``*_key`` / ``*_value`` helpers say what to store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from securechat.accounts import AccountBan
from securechat.commands import ROLE_RANK

#: The modes a room may have, with what each means (IRC's letters).
MODES = {
    "i": "invite-only: only invited accounts, and those with a role here, may /join",
    "m": "moderated: only the owner, ops and voiced members speak",
    "t": "only ops set the topic",
}
#: The room roles stored per account (anyone else is a member).
STORED_ROLES = ("owner", "op", "voice")
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Restriction(AccountBan):
    """A ban or a mute in one room: until when (0: until lifted), why, and who set it; kept as JSON."""

    def value(self) -> str:
        return json.dumps({"until": self.until, "reason": self.reason, "by": self.by})

    @classmethod
    def parse(cls, value: str) -> Restriction:
        """The restriction a stored value holds; a damaged one counts as until lifted, no reason."""
        try:
            data = json.loads(value)
            return cls(float(data.get("until", 0)), str(data.get("reason", "")), str(data.get("by", "")))
        except (ValueError, TypeError, AttributeError):
            return cls()


@dataclass(frozen=True)
class RoomState:
    """One room's roles, modes, invites, bans and mutes at one moment."""

    roles: dict[str, str] = field(default_factory=dict)
    modes: str = ""
    invited: frozenset[str] = frozenset()
    bans: dict[str, Restriction] = field(default_factory=dict)
    mutes: dict[str, Restriction] = field(default_factory=dict)

    @classmethod
    def parse(cls, values: dict[str, str], creator: str = "") -> RoomState:
        """Read a room's stored keys. ``creator`` owns a room that names no owner (one made before roles)."""
        roles: dict[str, str] = {}
        bans: dict[str, Restriction] = {}
        mutes: dict[str, Restriction] = {}
        invited = set()
        for key, value in values.items():
            kind, _, name = key.partition(":")
            if kind == "role" and value in STORED_ROLES:
                roles[name] = value
            elif kind == "ban":
                bans[name] = Restriction.parse(value)
            elif kind == "mute":
                mutes[name] = Restriction.parse(value)
            elif kind == "invite":
                invited.add(name)
        if creator and "owner" not in roles.values() and OWNERLESS_KEY not in values:
            roles[creator] = "owner"
        modes = "".join(sorted(set(values.get("modes", "")) & set(MODES)))
        return cls(roles, modes, frozenset(invited), bans, mutes)

    def role(self, name: str) -> str:
        return self.roles.get(name, "member")

    def rank(self, name: str) -> int:
        return ROLE_RANK[self.role(name)]

    def owners(self) -> list[str]:
        return sorted(name for name, role in self.roles.items() if role == "owner")

    def ban_of(self, name: str) -> Restriction | None:
        ban = self.bans.get(name)
        return ban if ban is not None and ban.active() else None

    def mute_of(self, name: str) -> Restriction | None:
        mute = self.mutes.get(name)
        return mute if mute is not None and mute.active() else None


def role_key(name: str) -> str:
    return f"role:{name}"


def ban_key(name: str) -> str:
    return f"ban:{name}"


def mute_key(name: str) -> str:
    return f"mute:{name}"


def invite_key(name: str) -> str:
    return f"invite:{name}"


MODES_KEY = "modes"
#: Set when the room's only owner's account was deleted and nobody was in line: the creator named in
#: the room's record no longer owns it (a new account given that name would), and an admin gives it one.
OWNERLESS_KEY = "ownerless"


def parse_mode_change(text: str) -> tuple[bool, str]:
    """``"+im"`` -> (True, "im"); ``"-t"`` -> (False, "t"). ``ValueError`` naming what is wrong."""
    text = text.strip()
    letters = text[1:]
    if len(text.split()) > 1:
        raise ValueError("one change at a time: +im adds both, and /mode -t then takes one away")
    if text[:1] not in ("+", "-") or not letters:
        raise ValueError(f"say +MODE or -MODE, for example +i; the modes are {describe_modes()}")
    unknown = sorted(set(letters) - set(MODES))
    if unknown:
        raise ValueError(f"unknown mode {unknown[0][:1]!r}: the modes are {describe_modes()}")
    return text[0] == "+", "".join(sorted(set(letters)))


def describe_modes() -> str:
    return ", ".join(f"+{letter} ({meaning.split(':')[0]})" for letter, meaning in MODES.items())
