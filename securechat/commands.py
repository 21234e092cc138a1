"""The one table of commands: what a user can type, its arguments, its help, and the role it needs.

The terminal client (``securechat.ui``) and the server (``securechat.hub``) each
attach their own code to these entries by name; `/help`, `/help COMMAND` and the
README's command list all come from here, and tests keep every entry run by the
side that should run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Who may use a command, least to most: the room's member, voiced member, op and owner, then a
#: server admin (who may act in every room). A command needing a room role is about the room it
#: names, or the active one.
Role = Literal["member", "voice", "op", "owner", "admin"]
ROLE_RANK: dict[str, int] = {"member": 0, "voice": 1, "op": 2, "owner": 3, "admin": 4}


@dataclass(frozen=True)
class CommandSpec:
    """One command. ``server`` ones travel as a ``Command`` message with ``wire_args`` arguments
    (the room first when ``room_scoped``); the others the client runs itself."""

    name: str
    usage: str
    help: str
    role: Role = "member"
    server: bool = False
    room_scoped: bool = False
    wire_args: tuple[int, int] = (0, 0)

    @property
    def synopsis(self) -> str:
        return f"/{self.name} {self.usage}".rstrip()

    def describe(self) -> str:
        """What ``/help COMMAND`` prints: the synopsis, the help and who may use it."""
        needs = "" if self.role == "member" else f" (needs: {self.role})"
        return f"{self.synopsis}: {self.help}{needs}"


def _local(name: str, usage: str, help_text: str) -> CommandSpec:
    return CommandSpec(name, usage, help_text)


def _server(
    name: str, usage: str, help_text: str, args: tuple[int, int], role: Role = "member", room: bool = False
) -> CommandSpec:
    return CommandSpec(name, usage, help_text, role=role, server=True, room_scoped=room, wire_args=args)


COMMAND_TABLE: tuple[CommandSpec, ...] = (
    _local("help", "[COMMAND]", "list the commands, or say what one does"),
    # rooms
    _server(
        "join",
        "#room",
        "join a room (created if new: you own it) and talk there; /join of a room you are in switches to it",
        (1, 1),
    ),
    _server(
        "part",
        "[#room] [reason]",
        "leave a room (the current one by default); it is no longer rejoined at login, but the default room is",
        (1, 2),
        room=True,
    ),
    _server("list", "", "every room, with how many are in it and its topic", (0, 0)),
    _local("who", "[#room]", "who is in a room, how many devices each has, and who is away"),
    _local("names", "[#room]", "the same as /who"),
    _server("topic", "[#room] [text]", "show or set a room's topic (+t: ops only)", (1, 2), room=True),
    _server("history", "[#room] [n]", "n earlier lines of a room (default 50)", (1, 3), room=True),
    # talking
    _local("msg", "NAME text", "a private message to every device of that person; kept for them if they are offline"),
    _local("reply", "text", "answer the last person who wrote to you privately"),
    _local("me", "action", 'an action line: "* alice waves"'),
    # presence and personal controls
    _server("away", "[message]", "say you are away (answered to whoever sends you /msg)", (0, 1)),
    _server("back", "", "you are back", (0, 0)),
    _server(
        "whois", "NAME", "someone's devices (named to them and admins), rooms in common, idle time, away, role", (1, 1)
    ),
    _server("ignore", "[NAME]", "stop seeing someone's lines, on all your devices (alone: the list)", (0, 1)),
    _server("unignore", "NAME", "see someone's lines again", (1, 1)),
    _server("motd", "[text]", "show the message of the day (an admin sets it with text)", (0, 1)),
    # room roles and modes
    _server("mode", "[#room] [+i|-i|+m|-m|+t|-t]", "show a room's modes, or change them (ops)", (1, 2), room=True),
    _server("owner", "NAME", "make someone an owner of the room", (2, 2), role="owner", room=True),
    _server("op", "NAME", "make someone an op of the room", (2, 2), role="owner", room=True),
    _server(
        "deop",
        "NAME",
        "take away someone's op; an owner may give up their own ownership",
        (2, 2),
        role="owner",
        room=True,
    ),
    _server("voice", "NAME", "let someone speak when the room is moderated (+m)", (2, 2), role="op", room=True),
    _server("devoice", "NAME", "take away someone's voice", (2, 2), role="op", room=True),
    _server("invite", "NAME", "let one account into an invite-only (+i) room", (2, 2), role="op", room=True),
    # moderation
    _server("kick", "NAME [reason]", "remove someone from the room (they may rejoin)", (2, 3), role="op", room=True),
    _server(
        "ban",
        "NAME [DURATION] [reason]",
        "remove and keep someone out (10m, 2h, 7d; none: until lifted)",
        (2, 3),
        role="op",
        room=True,
    ),
    _server("unban", "NAME", "lift a ban", (2, 2), role="op", room=True),
    _server("bans", "", "the room's bans and mutes", (1, 1), role="op", room=True),
    _server("mute", "NAME [DURATION]", "keep someone in the room but silent", (2, 3), role="op", room=True),
    _server("unmute", "NAME", "let someone speak again", (2, 2), role="op", room=True),
    _server(
        "gban", "NAME [DURATION] [reason]", "end an account's sessions and refuse its logins", (1, 2), role="admin"
    ),
    _server("ungban", "NAME", "lift a server-wide ban", (1, 1), role="admin"),
    # sessions
    _server("sessions", "", "your sessions (devices): id, label, address, since when", (0, 0)),
    _server("logout", "ID|others", "end another of your sessions (or all others); their tokens are revoked", (1, 1)),
    _local("reconnect", "", "while offline: try to reconnect now instead of waiting"),
    _local("quit", "[message]", "leave, with an optional parting message"),
)

COMMANDS_BY_NAME: dict[str, CommandSpec] = {spec.name: spec for spec in COMMAND_TABLE}
SERVER_COMMAND_NAMES = frozenset(spec.name for spec in COMMAND_TABLE if spec.server)


#: Seconds in each unit a duration may use: 90s, 10m, 2h, 7d, 2w.
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The longest duration taken (ten years): anything longer is "until lifted".
MAX_DURATION = 10 * 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in a duration like ``10m``, ``2h`` or ``7d``. ``ValueError`` saying what is wrong."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in DURATION_UNITS or not number.isascii() or not number.isdigit():
        raise ValueError(f"not a duration: {text[:20]!r} (say 90s, 10m, 2h, 7d or 2w)")
    seconds = int(number) * DURATION_UNITS[unit]
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"a duration is from 1s to {MAX_DURATION // 86400} days; leave it out for 'until lifted'")
    return seconds


def looks_like_duration(word: str) -> bool:
    """True if ``word`` is meant as a duration (a number then a letter): "2h", "10x" — not "spam"."""
    return len(word) >= 2 and word[0].isascii() and word[0].isdigit() and word[-1].isalpha()


def split_duration(text: str) -> tuple[int, str]:
    """``"2h spamming"`` -> (7200, "spamming"); ``"spamming"`` -> (0, "spamming"). 0 means until lifted.

    A first word that looks like a duration but is not one raises ``ValueError``.
    """
    first, _, rest = text.strip().partition(" ")
    if first and looks_like_duration(first):
        return parse_duration(first), rest.strip()
    return 0, text.strip()


def command_reference() -> str:
    """The README's command table, made from this one (a test keeps the README equal to it)."""
    rows = ["| command | what it does | who may |", "|---|---|---|"]
    for spec in COMMAND_TABLE:
        who = "anyone" if spec.role == "member" else ("a server admin" if spec.role == "admin" else f"room {spec.role}")
        synopsis = spec.synopsis.replace("|", "\\|")  # a bare | would end the table's cell
        rows.append(f"| `{synopsis}` | {spec.help} | {who} |")
    rows.append("| `//text` | send a line that starts with `/` | anyone |")
    return "\n".join(rows) + "\n"
