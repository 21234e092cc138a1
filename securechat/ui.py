"""The terminal front end of ``client.py``: its command line, commands, line formatting, the two modes.

``python client.py`` runs ``main()`` here; client.py itself is the library.
Interactive mode (standard input is a terminal) runs a prompt_toolkit prompt
whose half-typed line stays put while messages print above it. Batch mode
(standard input is a pipe or file) sends each line read and prints each event
as one line, for scripts.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import getpass
import io
import os
import platform
import random
import re
import signal
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from securechat import crypto_utils
from securechat.client import (
    LEAVE_TIMEOUT,
    RECONNECT_FIRST_DELAY,
    RECONNECT_JITTER,
    RECONNECT_MAX_DELAY,
    RECONNECT_RESTART_DELAY,
    RETRYABLE_CODES,
    TOKEN_CODES,
    Chat,
    ChatClient,
    ChatError,
    Disconnected,
    ErrorReply,
    History,
    HostKeyError,
    KnownHosts,
    LoginRefused,
    MessageRefused,
    Notice,
    Room,
    RoomList,
    Roster,
    Sessions,
    default_known_hosts_path,
)
from securechat.commands import COMMAND_TABLE, COMMANDS_BY_NAME, CommandSpec
from securechat.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ZERO_WIDTH_JOINER,
    address_text,
    normalize_room,
    sanitize_text,
)

# --------------------------------------------------------------------------- formatting

NAME_COLOURS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)
DIM, BOLD, REVERSE, RESET = "\x1b[2m", "\x1b[1m", "\x1b[7m", "\x1b[0m"


@dataclass
class Style:
    """How lines look: with or without colour, with or without a time stamp.

    Every piece of text that reaches the terminal goes through one of these
    methods, and each sanitizes its text *before* adding its own escape codes:
    whatever the server sent (names, messages, reasons) cannot drive the
    terminal, and the colours added here survive.
    """

    colour: bool = False
    timestamps: bool = False
    #: What starts each further line of a multi-line message. In batch mode a tab: text never
    #: holds one (tabs arrive as spaces), so a line starting with a tab always continues the
    #: message above it, one record per message.
    continuation: str = "\t"
    #: On a terminal: each line's trailing spaces go, and a run of more than two empty lines shows
    #: as one row, "(N empty lines)": one message must not scroll a screen's worth of nothing.
    compact: bool = False

    def text(self, text: str) -> str:
        """Plain text, made safe to print."""
        return sanitize_text(text)

    def message(self, text: str) -> str:
        """A message's text, made safe to print, its further lines set off by ``continuation``."""
        text = sanitize_text(text, keep_newlines=True)
        if self.compact:
            text = _without_empty_runs(text)
        return text.replace("\n", "\n" + self.continuation)

    def name(self, name: str) -> str:
        name = sanitize_text(name)
        if not self.colour:
            return name
        colour = NAME_COLOURS[zlib.crc32(name.encode()) % len(NAME_COLOURS)]
        return f"\x1b[{colour}m{name}{RESET}"

    def system(self, text: str, *, several_lines: bool = False) -> str:
        """A line from the client itself (``*** ...``), dimmed; ``text`` is sanitized first.

        ``several_lines``: the text may hold lines of its own (the message of the day), set off as
        a message's further lines are.
        """
        text = self.message(text) if several_lines else sanitize_text(text)
        return f"{DIM}{text}{RESET}" if self.colour else text

    def room(self, room: str) -> str:
        room = sanitize_text(room)
        return f"{BOLD}{room}{RESET}" if self.colour else room

    def when(self, when: float) -> str:
        """A time of day for today, with the date for any other day (history brings old lines)."""
        try:
            moment = time.localtime(when)
        except (OverflowError, OSError, ValueError):  # a time no calendar holds: the server's word, shown as none
            return "--:--"
        if time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d"):
            return time.strftime("%H:%M", moment)
        return time.strftime("%Y-%m-%d %H:%M", moment)

    def mention(self, line: str) -> str:
        """A line that names the user, made to stand out (reverse video; a "!" mark without colour)."""
        if not self.colour:
            return f"! {line}"
        # Every reset within the line (after the time, after the name) would end the reverse video too.
        return f"{REVERSE}{line.replace(RESET, RESET + REVERSE)}{RESET}"

    def stamp(self, when: float) -> str:
        if not self.timestamps:
            return ""
        text = self.when(when)
        return f"{DIM}{text}{RESET} " if self.colour else f"{text} "


#: The most empty lines in a row a message shows on a terminal as they are.
MOST_EMPTY_LINES = 2


def _without_empty_runs(text: str) -> str:
    """``text`` with its lines' trailing spaces and its empty last lines gone, and each run of more
    than ``MOST_EMPTY_LINES`` empty lines made one line that counts them."""
    shown: list[str] = []
    empty = 0
    for line in text.split("\n"):
        if not line.strip():
            empty += 1
            continue
        if empty > MOST_EMPTY_LINES:
            shown.append(f"({empty} empty lines)")
        else:
            shown.extend([""] * empty)
        empty = 0
        shown.append(line.rstrip())
    return "\n".join(shown)  # a run of empty lines at the end is dropped: nothing follows it


#: A skin tone after an emoji: part of its picture.
_EMOJI_MODIFIER = re.compile("[\U0001f3fb-\U0001f3ff]").fullmatch

#: The escape codes this module adds (colours, bold, reverse video): they take no room on a row.
_OWN_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def fold(line: str, columns: int, indent: str) -> str:
    """``line`` cut into rows of at most ``columns`` cells, every row it continues starting with ``indent``.

    Left to wrap a long line itself, the terminal starts its next row at the left edge, as if it were a
    line of its own: text padded out to the edge could pass for a line from someone else. Rows that
    continue a line start indented instead, as a message's further lines do (its newlines start a row
    already indented). A row ends at its last space, which the fold takes, so that no word is cut in
    two, unless the word is too long for a row of its own. ``line`` holds no escape code but this
    module's own (server text is sanitized).
    """
    from prompt_toolkit.utils import get_cwidth

    if columns <= len(indent) + 2:
        return line  # too narrow to fold anything usefully: the terminal wraps it
    done: list[str] = []
    # The row being filled: its pieces (characters and escape codes) and the cells each takes.
    row: list[tuple[str, int]] = []
    used = 0
    last_space = -1  # where in ``row`` its last space is: where it may end
    previous = ""

    def end_row(at: int = -1) -> None:
        """End the row before ``row[at]``, a space, dropped (-1: all of it); what follows starts the next."""
        nonlocal row, used, last_space
        rest = row[at + 1 :] if at >= 0 else []
        done.extend(piece for piece, _ in (row[:at] if at >= 0 else row))
        done.append("\n" + indent)
        row = rest
        used = len(indent) + sum(width for _, width in rest)
        last_space = -1

    position = 0
    for escape in [*_OWN_ESCAPE.finditer(line), None]:
        end = escape.start() if escape is not None else len(line)
        for character in line[position:end]:
            width = 0
            if character == "\n":
                done.extend(piece for piece, _ in row)
                row, used, last_space = [], 0, -1
            elif previous == ZERO_WIDTH_JOINER or character == ZERO_WIDTH_JOINER or _EMOJI_MODIFIER(character):
                pass  # part of the picture before it (a family, a skin tone): drawn with it, never cut from it
            else:
                width = get_cwidth(character)
                if used + width > columns:
                    rest = sum(cells for _, cells in row[last_space + 1 :]) if last_space >= 0 else 0
                    if character == " ":
                        end_row()  # full to the edge with whole words: the space is the fold's
                        previous = character
                        continue
                    if last_space >= 0 and len(indent) + rest + width <= columns:
                        end_row(last_space)  # the word being written moves down whole
                    else:
                        end_row()  # no space, or a word longer than a row: cut where the row is full
            row.append((character, width))
            used += width
            if character == " ":
                last_space = len(row) - 1
            previous = character
        if escape is not None:
            row.append((escape.group(), 0))
            position = escape.end()
    done.extend(piece for piece, _ in row)
    return "".join(done)


def _stamp(style: Style, when: float, history: bool) -> str:
    """What starts a line of the chat: its time, if shown; else, for a line from history, ``history: ``."""
    return "history: " if history and not style.timestamps else style.stamp(when)


def format_chat(message: Chat, style: Style, own_name: str = "", active_room: str | None = None) -> str:
    """One line for a chat message; text is sanitized so it cannot drive the terminal.

    A room line names its room unless it is ``active_room`` (the interactive client's
    current room); batch mode passes None, so every room line names its room.
    A line sent again from history starts with ``history: `` in batch mode.
    """
    text = style.message(message.text)
    sender = style.name(message.sender)
    stamp = _stamp(style, message.sent_at, message.history)
    room = f"{style.room(message.room)} " if message.room and message.room != active_room else ""
    if message.private:
        marker = f" → {style.name(message.recipient)}" if message.sender == own_name else " (private)"
        if message.action:
            return f"{stamp}* {sender}{marker} {text}"
        return f"{stamp}{sender}{marker}: {text}"
    if message.action:
        return f"{stamp}{room}* {sender} {text}"
    return f"{stamp}{room}{sender}: {text}"


def _printable(name: str) -> bool:
    """Whether a name from the server is safe to put in the line being typed as it is (a real
    server's always are; a completion of any other would put its raw characters on the prompt)."""
    return sanitize_text(name) == name


def format_event(
    event: Any, style: Style, own_name: str = "", active_room: str | None = None
) -> tuple[str, bool] | None:
    """(line, is_error) for an event, or None for events that print nothing."""
    now = time.time()
    if isinstance(event, Chat):
        return format_chat(event, style, own_name, active_room), False

    def about(room: str, text: str, when: float = now, history: bool = False, several_lines: bool = False) -> str:
        prefix = f"{room} " if room and room != active_room else ""
        return _stamp(style, when, history) + style.system(f"{prefix}*** {text}", several_lines=several_lines)

    if isinstance(event, Notice):
        when = event.sent_at or now  # a kick shown from history is stamped when it happened
        if event.event == "joined":
            return about(event.room, f"{event.name} joined", when, event.history), False
        if event.event == "left":
            reason = f" ({event.text})" if event.text else ""
            return about(event.room, f"{event.name} left{reason}", when, event.history), False
        if event.event == "topic":
            return about(event.room, f"{event.name} set the topic: {event.text}", when, event.history), False
        # The server's own words; the message of the day among them may hold several lines.
        return about(event.room, event.text, when, event.history, several_lines=event.event == "info"), False
    if isinstance(event, Roster):
        away = set(event.away)
        shown = [
            name + (f" ({count} devices)" if count > 1 else "") + (" (away)" if name in away else "")
            for name, count in _with_devices(event)
        ]
        more = " ..." if event.more else ""
        if not shown:
            return style.system(f"*** nobody is in {event.room}"), False
        return style.system(f"*** in {event.room} ({len(event.members)}): {', '.join(shown)}{more}"), False
    if isinstance(event, Room):
        if event.joined:
            topic = f"; topic: {event.topic}" if event.topic else ""
            created = " (new room: you own it)" if event.created else ""
            # Rejoined at login, or joined on another device: lines still go where they went.
            where = "also in" if active_room and event.room != active_room and not event.requested else "you are in"
            return style.system(f"*** {where} {event.room}{created}{topic}"), False
        reason = f" ({event.reason})" if event.reason else ""
        return style.system(f"*** you left {event.room}{reason}"), False
    if isinstance(event, RoomList):
        rooms = [
            f"{name} ({count}){': ' + topic if topic else ''}"
            for name, count, topic in zip(event.names, event.members, event.topics, strict=True)
        ]
        return style.system("*** rooms: " + ("; ".join(rooms) if rooms else "none")), False
    if isinstance(event, History):
        where = event.room or "private messages"
        missing = f"; {event.missing} more were missed and are no longer kept" if event.missing else ""
        if not event.count:
            if event.more and event.room:  # every line of the page was someone's you ignore
                return style.system(f"*** no lines to show in this page of {where} (/history for earlier ones)"), False
            return style.system(f"*** no earlier lines kept in {where}{missing}"), False
        older = " (/history for earlier ones)" if event.more and event.room else ""
        counted = "1 line" if event.count == 1 else f"{event.count} lines"
        return style.system(f"*** {counted} of {where} from history{missing}{older}"), False
    if isinstance(event, Sessions):
        parts = []
        for session_id, device, since, address in zip(
            event.ids, event.devices, event.since, event.addresses, strict=True
        ):
            mine = " (this one)" if session_id == event.current else ""
            label = device or "no label"
            parts.append(f"{session_id} {label} from {address} since {style.when(since)}{mine}")
        return style.system("*** your sessions: " + "; ".join(parts)), False
    if isinstance(event, ErrorReply):
        return style.text(f"error: {event.message}"), True
    return None  # Goodbye and Disconnected: the caller reports how the session ended


def names_user(message: Chat, own_name: str) -> bool:
    """True if someone else's line names ``own_name`` as a word ("carol", "@carol", "Carol:"), any case."""
    if not own_name or message.sender == own_name:
        return False
    pattern = rf"(?<![A-Za-z0-9_-]){re.escape(own_name)}(?![A-Za-z0-9_-])"
    return re.search(pattern, message.text, flags=re.IGNORECASE) is not None


class MentionsWhileAway:
    """Counts, per room, the lines from history said since ``away_since`` that name the user, and
    says so once the room's history is in (``History``): "you were mentioned 2 times in #dev".

    A busy room's history at login (its last lines) may not reach back to when the user left:
    then the mentions before it cannot be counted, and the user is told, once, that more was said.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._reached: set[str] = set()  # rooms whose history run so far goes back past away_since
        self._told_of_more: set[str] = set()

    def note(self, event: Any, own_name: str, away_since: float) -> str | None:
        """Take one event; returns the line to show, if this event ends a room's history with mentions."""
        if isinstance(event, Chat | Notice) and event.history and event.room and away_since:
            if event.sent_at <= away_since:
                self._reached.add(event.room)
            elif isinstance(event, Chat) and names_user(event, own_name):
                self.counts[event.room] = self.counts.get(event.room, 0) + 1
        elif isinstance(event, History) and event.room:
            count = self.counts.pop(event.room, 0)
            reached = event.room in self._reached
            self._reached.discard(event.room)
            cut = bool(away_since) and event.count > 0 and event.more and not reached
            if cut and event.room not in self._told_of_more:
                self._told_of_more.add(event.room)
                counted = f" (you are named {_times(count)} in these lines)" if count else ""
                return f"*** more was said in {event.room} while you were away: /history{counted}"
            if count:
                return f"*** you were mentioned {_times(count)} in {event.room} while you were away"
        return None


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


class MissedLines:
    """Which lines from history were missed: those a resumed session catches up on, newer than
    anything shown before the link dropped. At the first login they are the rooms' recent past,
    not news, and never unread."""

    def __init__(self) -> None:
        self._newest_shown = 0
        #: The newest id shown before the current session began; None in the first.
        self._before_this_session: int | None = None

    def resumed(self) -> None:
        self._before_this_session = self._newest_shown

    def is_missed(self, event: Chat) -> bool:
        return self._before_this_session is not None and event.id > self._before_this_session

    def note(self, event: Any) -> None:
        if isinstance(event, Chat | Notice):
            self._newest_shown = max(self._newest_shown, event.id)


class RoomEntries:
    """Which lines of a room's entry ("you are in", then the roster) are news to the user.

    A resumed session enters every room again, after each network blip or failover.
    Repeating "you are in #room" and its roster for every room pushes the lines that
    were missed off the screen, so an entry the user did not ask for shows only what
    differs from what the user was last told of that room (by its last roster and the
    joins and leaves shown since): a new topic, other members. A /join is always
    answered in full, and so is /who (its roster is no entry).
    """

    def __init__(self) -> None:
        #: room -> its topic as last shown.
        self._topics: dict[str, str] = {}
        #: room -> who the user was last told is in it.
        self._members: dict[str, set[str]] = {}
        #: room -> (whether its entry repeats so far, its roster's names and lines so far), until the last page.
        self._entering: dict[str, tuple[bool, list[str], list[str]]] = {}

    def lines_to_show(self, event: Any, line: str) -> list[str]:
        """What to show for ``line``, the formatted ``event``: itself, nothing, or a roster's held pages."""
        if isinstance(event, Room):
            if not event.joined:
                self._forget(event.room)
                return [line]
            # The topic, not the line: "(new room: you own it)" is news once.
            repeat = self._topics.get(event.room) == event.topic and not event.requested
            self._topics[event.room] = event.topic
            self._entering[event.room] = (repeat, [], [])
            return [] if repeat else [line]
        if isinstance(event, Roster) and event.room in self._entering:
            # A roster's pages come in one batch: held until the last, then shown all or not at all.
            repeat, names, pages = self._entering[event.room]
            names.extend(event.members)
            pages.append(line)
            if event.more:
                return []
            del self._entering[event.room]
            known = self._members.get(event.room)
            self._members[event.room] = set(names)
            return [] if repeat and known == set(names) else pages
        if isinstance(event, Notice) and event.event in ("joined", "left") and event.room in self._members:
            members = self._members[event.room]
            if event.event == "joined":
                members.add(event.name)
            else:
                members.discard(event.name)
        return [line]

    def _forget(self, room: str) -> None:
        self._topics.pop(room, None)
        self._members.pop(room, None)
        self._entering.pop(room, None)


def _with_devices(roster: Roster) -> list[tuple[str, int]]:
    counts = roster.devices if len(roster.devices) == len(roster.members) else [1] * len(roster.members)
    return list(zip(roster.members, counts, strict=True))


# --------------------------------------------------------------------------- commands


class Quit(Exception):
    """Raised by /quit: leave with an optional parting message."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


@dataclass
class CommandContext:
    """What a command may use: the connection, a way to print, and a little memory."""

    client: ChatClient
    show: Callable[[str], None]
    last_private_sender: str = ""
    style: Style = field(default_factory=Style)
    #: Set by /reconnect: the reconnection loop tries at once (interactive mode only).
    reconnect_now: threading.Event | None = None
    #: The oldest message id seen per room, so /history pages back from there.
    oldest_seen: dict[str, int] = field(default_factory=dict)
    #: Commands refused here, before reaching the server (a usage error, an unknown command): in
    #: batch mode any makes the exit status 1, as a refusal by the server does.
    refusals: int = 0

    def refuse(self, text: str) -> None:
        """Say why a command was not carried out (and count it)."""
        self.refusals += 1
        self.show(text)

    def note(self, event: Any) -> None:
        """Remember what /reply and /history need from an event."""
        if isinstance(event, Chat):
            if event.private and event.sender != self.client.username:
                self.last_private_sender = event.sender
            if event.room and event.id:
                self._seen_back_to(event.room, event.id)
        elif isinstance(event, History) and event.room and event.oldest_id:
            # The page's own bound: where lines of someone ignored were left out, none of them shows it.
            self._seen_back_to(event.room, event.oldest_id)

    def _seen_back_to(self, room: str, message_id: int) -> None:
        known = self.oldest_seen.get(room)
        self.oldest_seen[room] = message_id if known is None else min(known, message_id)


@dataclass(frozen=True)
class Command:
    """A command of the one table (``securechat.commands``) with what the client does for it."""

    spec: CommandSpec
    run: Callable[[CommandContext, str], None]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def usage(self) -> str:
        return self.spec.usage

    @property
    def help(self) -> str:
        return self.spec.help


def _cmd_help(context: CommandContext, args: str) -> None:
    wanted = args.strip().lstrip("/").lower()
    if wanted:
        spec = COMMANDS_BY_NAME.get(wanted)
        if spec is None:
            context.refuse(f"unknown command /{wanted[:20]}: /help lists them all")
        else:
            context.show(spec.describe())
        return
    width = 2 + max(len(command.spec.synopsis) for command in COMMANDS.values())  # every description aligned
    for command in COMMANDS.values():
        needs = "" if command.spec.role == "member" else f" [{command.spec.role}]"
        context.show(f"  {command.spec.synopsis}".ljust(width) + " " + command.help + needs)
    context.show("  //text".ljust(width) + " send a line that starts with /")


def _split_room(context: CommandContext, args: str) -> tuple[str, str]:
    """(room, rest): a leading #room names the room, else the active room is meant."""
    first, _, rest = args.strip().partition(" ")
    if first.startswith("#"):
        return first, rest.strip()
    return context.client.active_room, args.strip()


def _cmd_who(context: CommandContext, args: str) -> None:
    room, _ = _split_room(context, args)
    context.client.who(room or None)


def _cmd_msg(context: CommandContext, args: str) -> None:
    recipient, _, text = args.strip().partition(" ")
    if not recipient or not text.strip():
        context.refuse("usage: /msg NAME text")
        return
    context.client.private(recipient, text)  # shown when the server's echo comes back


def _cmd_reply(context: CommandContext, args: str) -> None:
    if not context.last_private_sender:
        context.refuse("nobody has written to you privately yet")
        return
    if not args.strip():
        context.refuse(f"usage: /reply text (to {context.last_private_sender})")
        return
    _cmd_msg(context, f"{context.last_private_sender} {args}")


def _cmd_me(context: CommandContext, args: str) -> None:
    if not args.strip():
        context.refuse("usage: /me action")
        return
    context.client.action(args)


def _cmd_join(context: CommandContext, args: str) -> None:
    words = args.split()
    if len(words) != 1:  # "/join #a b" meant a room named "a b", which no room can be: say so
        context.refuse("usage: /join #room (one room; a room name has no spaces)")
        return
    room = words[0]
    try:
        name = normalize_room(room)
    except ValueError as exc:
        context.refuse(f"error: {exc}")
        return
    if name in context.client.rooms:
        context.client.active_room = name
        context.show(f"*** now talking in {name}")
        return
    context.client.join(name)  # lines after this go to the new room


def _cmd_part(context: CommandContext, args: str) -> None:
    room, reason = _split_room(context, args)
    context.client.part(room or None, reason)


def _cmd_topic(context: CommandContext, args: str) -> None:
    room, text = _split_room(context, args)
    if not room:
        context.refuse("usage: /topic [#room] [text]")
        return
    context.client.command("topic", room, *([text] if text else []))


def _cmd_history(context: CommandContext, args: str) -> None:
    room, rest = _split_room(context, args)
    count = rest.split(" ")[0] if rest else ""
    if count and not count.isdigit():
        context.refuse("usage: /history [#room] [number of lines]")
        return
    oldest = context.oldest_seen.get(room, 0)
    context.client.command("history", room, count, str(oldest) if oldest else "")


def _cmd_reconnect(context: CommandContext, _args: str) -> None:
    if context.reconnect_now is None or context.client.connected:
        if context.client.connected:
            context.show("*** already connected")
        else:
            context.refuse("/reconnect works on a terminal")
        return
    context.reconnect_now.set()
    context.show("*** reconnecting now")


def _cmd_quit(_context: CommandContext, args: str) -> None:
    raise Quit(args.strip())


def _send_to_server(spec: CommandSpec) -> Callable[[CommandContext, str], None]:
    """The client side of a plain server command: the room first (named, or the active one) when the
    command is about a room, then the words, the last one taking the rest of the line."""
    low, high = spec.wire_args

    def run(context: CommandContext, args: str) -> None:
        room: list[str] = []
        if spec.room_scoped:
            name, args = _split_room(context, args)
            room = [name]
        words_wanted = high - len(room)
        words = args.split(maxsplit=words_wanted - 1) if words_wanted > 0 and args.strip() else []
        if len(room) + len(words) < low:
            context.refuse(f"usage: {spec.synopsis}")
            return
        context.client.command(spec.name, *room, *words)

    return run


#: What the client does for the commands that are more than "send it to the server".
CLIENT_RUNNERS: dict[str, Callable[[CommandContext, str], None]] = {
    "help": _cmd_help,
    "join": _cmd_join,
    "part": _cmd_part,
    "who": _cmd_who,
    "names": _cmd_who,
    "topic": _cmd_topic,
    "history": _cmd_history,
    "msg": _cmd_msg,
    "reply": _cmd_reply,
    "me": _cmd_me,
    "reconnect": _cmd_reconnect,
    "quit": _cmd_quit,
}

COMMANDS: dict[str, Command] = {
    spec.name: Command(spec, CLIENT_RUNNERS.get(spec.name) or _send_to_server(spec)) for spec in COMMAND_TABLE
}


_TRAILING_EMPTY_LINES = re.compile(r"(?:[\r\n][ \t]*)+\Z")


def handle_line(context: CommandContext, line: str) -> None:
    """Run a command or send a line to the active room. Raises ``Quit`` for /quit, ``ChatError`` if offline."""
    if not line.strip():
        return
    # A paste of whole lines usually ends with a newline: the empty line after it is no part of it.
    line = _TRAILING_EMPTY_LINES.sub("", line)
    if line.startswith("//"):
        text = line[1:]
    elif line.startswith("/"):
        name, _, args = line[1:].partition(" ")
        command = COMMANDS.get(name.lower())
        if command is None:
            context.refuse(f"unknown command /{name}: type /help for the list (// sends a line starting with /)")
            return
        command.run(context, args)
        return
    else:
        text = line
    context.client.say(text)  # shown when the server's echo comes back


# --------------------------------------------------------------------------- reconnection


class Reconnected(Enum):
    RESUMED = "resumed"
    NEED_PASSWORD = "need password"
    FAILED = "failed"


def reconnect(
    client: ChatClient,
    show: Callable[[str], None],
    cancelled: threading.Event,
    give_up_after: float | None = None,
    on_resumed: Callable[[], None] | None = None,
    restarting: bool = False,
    retry_now: threading.Event | None = None,
) -> tuple[Reconnected, str]:
    """Retry with growing, jittered delays and resume with the token; never asks for a password.

    A lost link and a "not now" refusal (``RETRYABLE_CODES``) are retried, the first
    time after ``RECONNECT_FIRST_DELAY``, or ``RECONNECT_RESTART_DELAY`` when the server
    said it was ``restarting``; ``retry_now`` (set by /reconnect) ends a wait at once.
    Returns RESUMED; NEED_PASSWORD when the server refused the token itself
    (``TOKEN_CODES``: expired, revoked, gone); or FAILED, with a one-line
    reason, for a host key problem, any other refusal (retrying would only get
    the same answer), cancellation, or running out of time. ``on_resumed`` runs
    before "reconnected" is shown, so whoever reads that message finds us online.
    """
    delay = RECONNECT_RESTART_DELAY if restarting else RECONNECT_FIRST_DELAY
    give_up = time.monotonic() + give_up_after if give_up_after is not None else None
    while True:
        wait = delay * random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)
        show(f"*** reconnecting in {wait:.1f} s...")
        if wait_unless(cancelled, retry_now, wait):
            return Reconnected.FAILED, "cancelled"
        try:
            client.close()
            client.connect()
            client.resume()
            if on_resumed is not None:
                on_resumed()
            show(f"*** reconnected as {client.username}")
            return Reconnected.RESUMED, ""
        except LoginRefused as exc:
            if exc.code in TOKEN_CODES:
                return Reconnected.NEED_PASSWORD, f"cannot resume the session: {exc}"
            if exc.code not in RETRYABLE_CODES:
                return Reconnected.FAILED, f"cannot resume the session: {exc}"
            show(f"*** still offline: {exc}")
        except HostKeyError as exc:
            return Reconnected.FAILED, str(exc)
        except ChatError as exc:
            show(f"*** still offline: {exc}")
        if give_up is not None and time.monotonic() + delay > give_up:
            return Reconnected.FAILED, f"gave up reconnecting to {address_text(client.host, client.port)}"
        delay = min(RECONNECT_MAX_DELAY, delay * 2)


#: The longest a typed line waits to keep below the server's flood limit before it is refused instead
#: (seconds): the terminal reads no key meanwhile, Ctrl-C included.
TERMINAL_PACE_LIMIT = 2.0

#: How often a wait that /reconnect can cut short looks whether it was cancelled meanwhile.
WAIT_POLL_INTERVAL = 0.1


def wait_unless(cancelled: threading.Event, retry_now: threading.Event | None, seconds: float) -> bool:
    """Wait ``seconds``, or less if ``retry_now`` is set (and then clear it); True if ``cancelled``."""
    if retry_now is None:
        return cancelled.wait(seconds)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not cancelled.is_set():
        if retry_now.wait(min(left, WAIT_POLL_INTERVAL)):
            break
    retry_now.clear()
    return cancelled.is_set()


# --------------------------------------------------------------------------- batch mode

#: How long a script waits for the server to come back before giving up.
BATCH_RECONNECT_LIMIT = 60.0
#: Lines read but not yet sent (while offline); reading pauses when this many wait.
BATCH_BACKLOG = 1000
#: How much standard input one read takes.
INPUT_CHUNK = 65536


@dataclass
class BatchState:
    """What batch mode's three threads share; every field is guarded by ``changed``.

    The input thread appends to ``pending``; the main thread is the only one
    that sends, and takes a line off ``pending`` once it is sent; the event
    thread owns ``online``, ``sessions`` and ``ended``.
    """

    #: Held while reading or changing any field; notified after every change.
    changed: threading.Condition = field(default_factory=threading.Condition)
    #: Lines read and not yet sent, oldest first.
    pending: deque[str] = field(default_factory=deque)
    input_ended: bool = False
    #: Whether input ended while offline: then the run ends at once. Input that ended earlier (a file,
    #: a heredoc) leaves its queue to be sent once the session resumes.
    input_ended_offline: bool = False
    online: bool = True
    #: Counts resumed sessions, so a failed send can tell a new link from the one it failed on.
    sessions: int = 0
    #: Why the session is over for good ("" while it is not).
    ended: str = ""
    #: Whether the user was told ``ended`` already (the server's fatal error, printed as it came).
    ended_told: bool = False
    #: Lines and commands the server refused: any makes the exit status 1 (as the client's own refusals do).
    refused: int = 0


def read_lines(fd: int, encoding: str, add: Callable[[str], None]) -> None:
    """Call ``add`` with each line of the file ``fd`` until its end.

    Raw reads, not ``sys.stdin``: this runs on a daemon thread that may still be
    blocked here when the program exits, and a buffered stream's lock held at
    exit aborts the interpreter.
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    partial = ""
    while True:
        try:
            chunk = os.read(fd, INPUT_CHUNK)
        except OSError:
            chunk = b""
        partial += decoder.decode(chunk, final=not chunk)
        *lines, partial = partial.split("\n")
        for line in lines:
            add(line.rstrip("\r"))
        if not chunk:
            break
    if partial:
        add(partial.rstrip("\r"))


def enter_room(client: ChatClient, room: str) -> None:
    """``--room``: join a room (if not in it already) and make it where lines go."""
    try:
        name = normalize_room(room)
    except ValueError as exc:
        raise ChatError(f"--room {room}: {exc}") from None
    if name not in client.rooms:
        client.join(name)  # where lines go, also if the join is refused: they are refused too, never sent elsewhere
    else:
        client.active_room = name


def run_batch(host: str, port: int, user: str | None, options: dict[str, Any], room: str = "") -> int:
    """Non-interactive mode: lines in, events out, one line each. Returns the exit status.

    Lines read while the link is down wait and are sent, in order, once the
    session is resumed. If it cannot be (the server stays away for
    ``BATCH_RECONNECT_LIMIT``, refuses the token, or ends the session), or
    input ends while offline, each line not sent is reported on stderr as
    ``not sent: ...`` after a one-line error, and the exit status is 1.
    """
    if not user:
        print("error: --user NAME is required when standard input is not a terminal", file=sys.stderr)
        return 2
    password = os.environ.get("CHAT_PASSWORD")
    if not password:  # set but empty is a script's mistake too: said as such, not as a wrong password
        print("error: set CHAT_PASSWORD (the password is never read from the command line)", file=sys.stderr)
        return 2
    style = Style()  # no colour: scripts read this output
    for stream in (sys.stdout, sys.stderr):  # a terminal or pipe in another encoding gets "?", not a traceback
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    client = ChatClient(host, port, **options)
    try:
        client.login(user, password)
        if room:
            enter_room(client, room)
    except ChatError as exc:
        print(style.text(f"error: {exc}"), file=sys.stderr)
        client.close()
        return 1
    # Guards stdout and stderr, written by the main thread and the event thread.
    output_lock = threading.Lock()
    output_closed = threading.Event()  # set once a write found its reader gone: nothing more is written
    state = BatchState()
    leaving = threading.Event()  # set once we stop: cancels reconnecting

    def write(stream: TextIO, line: str) -> None:
        """Print a line made by ``format_event`` or ``style`` (so already safe)."""
        with output_lock:
            if output_closed.is_set():
                return
            try:
                stream.write(line + "\n")
                stream.flush()
                return
            except BrokenPipeError:
                # Whoever read our output is gone (``| head -1``): stop, as a filter does on SIGPIPE.
                output_closed.set()
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # nothing more, nor at exit
        end_session("output closed", told=True)

    def report(text: str) -> None:
        """Print a line for the user on stderr; it may quote the server, so it is sanitized."""
        write(sys.stderr, style.text(text))

    def set_online(online: bool) -> None:
        with state.changed:
            state.online = online
            state.sessions += online
            state.changed.notify_all()

    def end_session(reason: str, told: bool = False) -> None:
        with state.changed:
            state.ended, state.ended_told = reason, told
            state.changed.notify_all()

    def print_events() -> None:
        fatal = ""  # the server's last fatal error, printed as it came
        while True:
            ended: Disconnected | None = None
            for event in client.events():
                if isinstance(event, Disconnected):
                    ended = event
                    break
                context.note(event)  # for /reply and /history, as in the terminal
                if isinstance(event, Chat) and event.ref:
                    continue  # the echo of a line of ours: stdout carries what others said
                if isinstance(event, ErrorReply):
                    fatal = event.message if event.fatal else fatal
                    with state.changed:
                        state.refused += 1
                formatted = format_event(naming_the_line(client, event), style, client.username)
                if formatted is not None:
                    line, is_error = formatted
                    write(sys.stderr if is_error else sys.stdout, line)
            if ended is None or leaving.is_set():
                return
            if ended.clean:  # the server said not to come back (say, we logged in elsewhere)
                end_session(f"disconnected: {ended.reason}", told=bool(fatal) and ended.reason == fatal)
                return
            if ended.needs_login:  # the server ended the session (a password changed): nothing to resume
                end_session(ended.reason, told=bool(fatal) and ended.reason == fatal)
                return
            set_online(False)  # before saying so: a line read after this message waits
            report(f"*** {lost(ended.reason)}")
            result, why = reconnect(
                client, report, leaving, BATCH_RECONNECT_LIMIT, lambda: set_online(True), restarting=ended.restarting
            )
            if result is Reconnected.RESUMED:
                continue
            if not leaving.is_set():
                end_session(why if result is Reconnected.FAILED else f"{why}; log in again")
            return

    def add_line(line: str) -> None:
        with state.changed:
            state.changed.wait_for(lambda: len(state.pending) < BATCH_BACKLOG or bool(state.ended))
            state.pending.append(line)
            state.changed.notify_all()

    def read_input() -> None:
        try:
            read_lines(sys.stdin.fileno(), sys.stdin.encoding or "utf-8", add_line)
        finally:
            with state.changed:
                state.input_ended = True
                state.input_ended_offline = not state.online
                state.changed.notify_all()

    # Our own lines are not echoed in batch mode: stdout carries only what others said. Made before
    # the event thread starts, which notes in it what /reply and /history need.
    context = CommandContext(client, show=report)
    # Daemons: the input thread may block on a pipe that never ends, the event thread on a
    # reconnection; neither holds anything that must be released when we exit.
    printer = threading.Thread(target=print_events, name="printer", daemon=True)
    reader = threading.Thread(target=read_input, name="input", daemon=True)
    printer.start()
    reader.start()

    def ready() -> bool:
        if state.ended or (state.online and state.pending):
            return True
        # Input is over: leave once all is sent, or at once if it ended while offline.
        return state.input_ended and (state.online or state.input_ended_offline)

    parting = ""
    quitting = False
    failure = ""
    failure_told = False
    try:
        while True:
            with state.changed:
                state.changed.wait_for(ready)
                if state.ended:
                    failure, failure_told = state.ended, state.ended_told
                    break
                if not (state.online and state.pending):  # input ended with nothing left to send now
                    if not state.online:
                        failure = f"input ended while offline (reconnecting to {address_text(host, port)})"
                    break
                line, session = state.pending[0], state.sessions
            try:
                handle_line(context, line)
            except Quit as quit_request:
                parting, quitting = quit_request.message, True
                break
            except MessageRefused as exc:  # about this line only: say so, and go on with the next
                context.refuse(f"{exc} (your line: {one_row(line, 80)})")
            except ChatError:
                # The link dropped under us: the line stays first; wait until the event thread has
                # noticed (or already resumed), then try it again.
                def link_changed(session: int = session) -> bool:
                    return bool(state.ended) or not state.online or state.sessions != session

                with state.changed:
                    state.changed.wait_for(link_changed, timeout=RECONNECT_FIRST_DELAY)
                continue
            with state.changed:
                state.pending.popleft()
                state.changed.notify_all()
    except KeyboardInterrupt:
        failure = "interrupted"  # Ctrl-C: what was not sent is said, and the status says so (130)
    leaving.set()
    with state.changed:
        # Lines read but never sent; after /quit they are what followed it in the input.
        unsent = [line for line in state.pending if line.strip()]
        if quitting:
            unsent = unsent[1:]  # the /quit line itself
        state.pending.clear()
        state.ended = state.ended or "leaving"  # stops the input thread adding more
        state.changed.notify_all()
    if failure or (unsent and not quitting):
        if not failure_told:  # (a fatal error from the server was printed as it came)
            report(f"error: {failure or 'interrupted'}")
        # A line counts as sent once the server echoed it: those it never confirmed come first.
        for line in unconfirmed_lines(client) + unsent:
            report(f"not sent: {line}")
        if failure == "interrupted":
            client.leave()  # the session is over: said so to the server, not left to time out
            return 130
        client.close()
        return 141 if output_closed.is_set() else 1  # 141: as a filter killed by SIGPIPE
    client.leave(parting)  # the server echoes every line it took before it says goodbye
    printer.join(timeout=LEAVE_TIMEOUT)
    not_sent = unconfirmed_lines(client) + unsent
    for line in not_sent:
        report(f"not sent: {line}")
    with state.changed:
        refused = state.refused + context.refusals
    return 1 if not_sent or refused else 0


def lost(reason: str) -> str:
    """What the user is told when the link drops: "connection lost: server shutting down", but
    never "connection lost: connection lost (…)"."""
    return reason if reason.startswith("connection lost") else f"connection lost: {reason}"


def one_row(text: str, limit: int = 200) -> str:
    """A line the user typed, quoted back on one row: sanitized, whitespace runs as one space, cut at ``limit``."""
    shown = " ".join(sanitize_text(text).split())
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def naming_the_line(client: ChatClient, event: Any) -> Any:
    """A refusal of a line of ours, saying which line: after a paste, or a run of lines refused while
    the server could not reach its broker, "not sent" alone would not tell them apart."""
    if isinstance(event, ErrorReply) and event.ref:
        text = client.refused_text(event.ref)
        if text is not None:
            return replace(event, message=f"{event.message} (your line: {one_row(text, 80)})")
    return event


def take_unconfirmed(client: ChatClient) -> list[str]:
    """Lines sent whose echo never came back, forgotten as they are returned: called once the
    connection they went out on has ended, when no echo of them can come any more."""
    with client.pending_lock:
        lines = [text for _, text in client.pending.values()]
        client.pending.clear()
    return lines


def unconfirmed_lines(client: ChatClient) -> list[str]:
    """Lines sent whose echo never came back: the server did not (or cannot be known to) take them."""
    with client.pending_lock:
        return [text for _, text in client.pending.values()]


# --------------------------------------------------------------------------- interactive mode


def ask_yes_no(host_id: str, fingerprint: str) -> bool:
    print(f"The authenticity of server {host_id} can't be established.")
    print(f"Its key fingerprint is {fingerprint}.")
    while True:
        answer = input("Are you sure you want to continue connecting (yes/no)? ").strip().lower()
        if answer in ("yes", "no"):
            return answer == "yes"
        print("Please type 'yes' or 'no'.")


class TerminalScreen:
    """Where the interactive client's own lines go: straight to the terminal between two prompts,
    above the prompt while one runs.

    prompt_toolkit's ``patch_stdout`` decides on its own thread whether a prompt is up, then
    writes: a prompt starting in between was drawn under lines written after its cursor-position
    query, so it overran the screen and scrolled lines away, or lines landed on the prompt's row.
    Here the choice and the write happen under one lock that the prompt takes as it starts
    (``prompt_started``, before it draws anything), and lines meant for a prompt that ended before
    it could show them are written once it has (``prompt_ended``): none is lost or misplaced.
    A line wider than the terminal is folded, its further rows indented by ``indent`` (see ``fold``).
    """

    def __init__(self, stream: TextIO, indent: str) -> None:
        self._stream = stream
        self._indent = indent
        # Guards _app, _pending and _show_scheduled, and is held over a write straight to the
        # terminal, so that no prompt starts drawing during one.
        self._screen_lock = threading.Lock()
        self._app: Any = None  # the prompt's application from its start until it has ended
        self._pending: list[str] = []  # lines for the running prompt to show, oldest first
        # True while a call to show _pending is on its way to the prompt's loop: lines arriving
        # meanwhile go with it (one redraw of the prompt for a burst, not one a line).
        self._show_scheduled = False

    def write(self, line: str) -> None:
        """Show ``line`` (a newline is added), from any thread."""
        line = fold(line, self._columns(), self._indent)
        with self._screen_lock:
            if self._app is None:
                self._stream.write(line + "\n")
                self._stream.flush()
                return
            self._pending.append(line)
            if self._show_scheduled:
                return
            self._show_scheduled = True
            loop = self._app.loop
        if loop is None:  # that prompt is ending: prompt_ended() writes the line
            return
        try:
            loop.call_soon_threadsafe(self._show_pending_above_prompt)
        except RuntimeError:  # its loop has closed: the same
            pass

    def _columns(self) -> int:
        """The terminal's width now (it may have been resized); 0 if the stream is no terminal."""
        try:
            return os.get_terminal_size(self._stream.fileno()).columns
        except (OSError, ValueError):
            return 0

    def prompt_started(self, app: Any) -> None:
        """Called on the prompt's thread as it starts (its ``pre_run``), before it draws."""
        with self._screen_lock:
            self._app, self._show_scheduled = app, False
            self._write_pending()

    def prompt_ended(self) -> None:
        """Called once the prompt has returned: what it did not show yet is written now."""
        with self._screen_lock:
            self._app, self._show_scheduled = None, False
            self._write_pending()

    def _show_pending_above_prompt(self) -> None:
        from prompt_toolkit.application import run_in_terminal

        def write() -> None:  # the prompt is hidden meanwhile, and drawn again below the lines
            with self._screen_lock:
                self._show_scheduled = False
                self._write_pending()

        run_in_terminal(write)

    def _write_pending(self) -> None:
        if self._pending:
            self._stream.write("".join(line + "\n" for line in self._pending))
            self._stream.flush()
            self._pending.clear()


#: What may be typed while offline: the rest waits for the link.
OFFLINE_COMMANDS = ("/reconnect", "/quit", "/help")
#: Password tries on a terminal before giving up, as ssh gives.
PASSWORD_TRIES = 3
#: The longest the terminal waits out delays after failed logins (in all, for one password typed).
MOST_LOGIN_DELAY_WAITED = 30
#: How the server names the delay in its refusal (code ``rate_limited``).
_LOGIN_DELAY = re.compile(r"try again in (\d+) s\b")


def log_in_on_terminal(client: ChatClient, user: str, ask_password: Callable[[], str]) -> None:
    """Reach the server and check its key first, then ask for the password: up to ``PASSWORD_TRIES`` tries.

    A wrong password is said on stderr and asked again (on a new connection: the server
    closes one after a failed login). A short delay the server names after earlier failures
    is waited out, and the password typed is tried then: it was not checked, so it is no try.
    Raises ``ChatError`` (``LoginRefused`` for the last refusal), ``KeyboardInterrupt`` or ``EOFError``.
    """
    for attempt in range(1, PASSWORD_TRIES + 1):
        client.close()
        client.connect()  # a closed port or a wrong key fails here, before any password is typed
        password = ask_password()
        waited = 0
        try:
            while True:
                try:
                    _log_in_in_time(client, user, password)
                    return
                except LoginRefused as exc:
                    delay = _LOGIN_DELAY.search(str(exc)) if exc.code == "rate_limited" else None
                    if delay is None or waited + int(delay.group(1)) > MOST_LOGIN_DELAY_WAITED:
                        raise
                    print(sanitize_text(f"error: {exc}; waiting"), file=sys.stderr, flush=True)
                    _wait_unechoed(int(delay.group(1)))
                    waited += int(delay.group(1))
                    client.close()
                    client.connect()
        except LoginRefused as exc:
            if exc.code != "auth_failed" or attempt == PASSWORD_TRIES:
                raise
            print(sanitize_text(f"error: {exc}; try again"), file=sys.stderr)


def read_password(prompt: str) -> str:
    """``getpass``, and after a Ctrl-Z and ``fg`` still unseen: the shell gives the terminal back with its
    own modes, echo on, and the rest of the password was shown in clear as it was typed."""
    import termios

    def echo_off_again(_signum: int, _frame: object) -> None:
        with contextlib.suppress(termios.error, OSError, ValueError):
            modes = termios.tcgetattr(sys.stdin.fileno())
            modes[3] &= ~termios.ECHO
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, modes)

    previous = signal.signal(signal.SIGCONT, echo_off_again)
    try:
        return getpass.getpass(prompt)
    finally:
        signal.signal(signal.SIGCONT, previous)


def _wait_unechoed(seconds: float) -> None:
    """Sleep, with what is typed meanwhile neither shown nor kept, and Ctrl-C live.

    A user who takes the wait for a new prompt types the password again: the terminal showed it in
    clear, and the chat prompt then read it as a line and sent it to the room. In the prompt's raw mode
    (logging in again), Ctrl-C was no signal, and the wait could not be cut short.
    """
    import termios  # (the client runs on Unix terminals: README)

    try:
        saved = termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError):  # not a terminal
        time.sleep(seconds)
        return
    quiet = list(saved)
    quiet[3] = (quiet[3] & ~(termios.ECHO | termios.ICANON)) | termios.ISIG  # local modes
    try:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, quiet)
        time.sleep(seconds)
    finally:
        termios.tcflush(sys.stdin.fileno(), termios.TCIFLUSH)  # what was typed meanwhile is dropped
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, saved)


def _log_in_in_time(client: ChatClient, user: str, password: str) -> None:
    """Log in with ``password``. The server gives a connection 10 s to log in (then it says
    "timeout", or just closes it): a slow typist who outlived that is logged in once more, on a
    fresh connection, with what they typed."""
    try:
        client.login(user, password)
        return
    except LoginRefused as exc:
        if exc.code != "timeout":
            raise
    except ChatError:
        pass
    client.close()
    client.connect()
    client.login(user, password)


def run_interactive(
    host: str, port: int, user: str | None, options: dict[str, Any], room: str = "", *, bell: bool = True
) -> int:
    """The terminal client. Returns the exit status."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.keys import Keys
    from prompt_toolkit.patch_stdout import patch_stdout

    try:
        while not user:
            user = input("User name: ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return 1
    style = Style(
        colour=sys.stdout.isatty() and not os.environ.get("NO_COLOR"),
        timestamps=True,
        continuation="    ",
        compact=True,
    )
    # Nothing reads keys while a line waits for its flood budget: a long wait would freeze the terminal.
    client = ChatClient(host, port, confirm_host_key=ask_yes_no, pace_limit=TERMINAL_PACE_LIMIT, **options)
    try:
        log_in_on_terminal(client, user, lambda: read_password(f"Password for {user}: "))
        if room:
            enter_room(client, room)
    except ChatError as exc:
        print(style.text(f"error: {exc}"), file=sys.stderr)
        client.close()
        return 1
    except (KeyboardInterrupt, EOFError):
        print()
        client.close()
        return 1
    # Unread lines and mentions per room, kept by the event thread and shown in the toolbar.
    # Guards unread.
    unread_lock = threading.Lock()
    unread: dict[str, int] = {}
    mentioned: dict[str, int] = {}
    while_away = MentionsWhileAway()

    class ChatCompleter(Completer):
        """Completes /commands, #rooms, and names of people in the current room (followed by a space,
        or by ": " at the start of a line, as IRC clients do)."""

        def get_completions(self, document: Any, complete_event: Any) -> Any:
            before = document.text_before_cursor
            word = before.split(" ")[-1]
            if before.startswith("/") and " " not in before:
                for name in COMMANDS:
                    if name.startswith(word[1:]):
                        yield Completion(f"/{name} ", start_position=-len(word))
                return
            if word.startswith("#"):
                for room_name in client.rooms:
                    if room_name.startswith(word.lower()) and _printable(room_name):
                        yield Completion(f"{room_name} ", start_position=-len(word))
                return
            suffix = ": " if before == word else " "
            for name in client.members:
                if name != client.username and word and name.lower().startswith(word.lower()) and _printable(name):
                    yield Completion(name + suffix, start_position=-len(word))

    def switch_room(step: int = 0, index: int | None = None) -> None:
        rooms = list(client.rooms)
        if not rooms:
            return
        if index is None:
            current = rooms.index(client.active_room) if client.active_room in rooms else 0
            index = (current + step) % len(rooms)
        if 0 <= index < len(rooms):
            client.active_room = rooms[index]
            with unread_lock:
                unread.pop(client.active_room, None)
                mentioned.pop(client.active_room, None)
            session.app.invalidate()

    bindings = KeyBindings()

    @bindings.add("c-n")
    def _next_room(_event: Any) -> None:
        switch_room(+1)

    @bindings.add("c-p")
    def _previous_room(_event: Any) -> None:
        switch_room(-1)

    for digit in range(1, 10):

        @bindings.add("escape", str(digit))
        def _room_by_number(_event: Any, number: int = digit) -> None:
            switch_room(index=number - 1)

    for key in ("0", "-"):
        # Alt-0 and Alt-minus would start prompt_toolkit's numeric argument, swallowing the next key.
        bindings.add("escape", key)(lambda _event: None)

    @bindings.add(Keys.Vt100MouseEvent)
    def _no_mouse(_event: Any) -> None:
        # The client asks for no mouse reports, so what parses as one is typed or pasted text
        # ("ESC[31m", a colour code): prompt_toolkit's own handler crashed the prompt on it.
        pass

    def toolbar() -> Any:
        """Shown where the terminal answers cursor-position queries (most do): the rooms by number,
        each with its unread lines (and of them, how many name you): ``1:#lobby 2:#dev(3@1)``."""
        with unread_lock:
            waiting, naming = dict(unread), dict(mentioned)
        rooms = []
        for number, name in enumerate(client.rooms, start=1):
            count = waiting.get(name, 0) if name != client.active_room else 0
            mark = f"({count}" + (f"@{naming[name]}" if naming.get(name) else "") + ")" if count else ""
            rooms.append(f"{number}:{name}{mark}")
        # Room names are the server's word: no character that would move or reorder the bar.
        return sanitize_text(" ".join(rooms)) + "   Ctrl-N/P, Alt-1..9: switch room"

    def prompt_text() -> str:
        """The current room, then the other rooms with unread lines (and of them, how many name you):
        ``#lobby [#dev:2 #ops:3@1]> ``."""
        with unread_lock:
            unread.pop(client.active_room, None)  # however we got here (/join, a key), this room is read
            mentioned.pop(client.active_room, None)
            waiting = [
                f"{room}:{count}" + (f"@{mentioned[room]}" if mentioned.get(room) else "")
                for room, count in unread.items()
                if count and room in client.rooms
            ]
        shown = client.active_room or client.username
        return sanitize_text(f"{shown} [{' '.join(waiting)}]> " if waiting else f"{shown}> ")

    session: PromptSession[str] = PromptSession(
        completer=ChatCompleter(),
        history=InMemoryHistory(),
        erase_when_done=True,
        complete_while_typing=False,
        key_bindings=bindings,
        bottom_toolbar=toolbar,
        # Ctrl-Z suspends, as in a shell (fg brings it back): else it put a control character in the line.
        enable_suspend=True,
    )
    online = threading.Event()  # set while a session is up
    online.set()
    leaving = threading.Event()  # set when the user quits: stops reconnecting
    need_password = threading.Event()  # set by the reader when the token was refused
    gave_up = threading.Event()  # set by the reader when reconnecting failed for good: exit non-zero

    # The real terminal: patch_stdout takes only stray writes.
    screen = TerminalScreen(sys.stdout, indent=style.continuation)

    def show(text: str) -> None:
        screen.write(style.system(text))

    reconnect_now = threading.Event()  # set by /reconnect: stop waiting, try now
    context = CommandContext(client, show=show, style=style, reconnect_now=reconnect_now)

    # What was being typed when the reader ended the prompt (to ask for the password): the next prompt
    # starts with it. Written on the prompt's loop before the prompt returns, read after, by the main thread.
    typed_when_stopped = [""]

    def exit_prompt() -> None:
        # Once only: the prompt's pre_run hook may have asked already, and a second exit raises.
        app = session.app
        if app.is_running and app.future is not None and not app.future.done():
            typed_when_stopped[0] = session.default_buffer.text
            app.exit(exception=EOFError())

    def stop_prompt() -> None:
        app = session.app
        loop = app.loop
        if app.is_running and loop is not None:
            loop.call_soon_threadsafe(exit_prompt)

    def prompt_started() -> None:
        screen.prompt_started(session.app)
        # stop_prompt() does nothing between two prompts (while a line is being sent); the
        # next prompt checks here, once running, so the reader's request is never lost.
        if leaving.is_set() or need_password.is_set():
            exit_prompt()

    def report_unconfirmed(when: str) -> None:
        # Sent, but neither echoed nor refused: the server may or may not have taken them. Said, not
        # dropped in silence; a line it took shows among the room's lines when the session resumes.
        for text in take_unconfirmed(client):
            show(f"*** no answer {when}; maybe not sent: {one_row(text)}")

    entries = RoomEntries()  # the reader's alone
    missed = MissedLines()  # the reader's, and the main loop's while no reader runs (a new login)

    def back_to_room(ref: str) -> None:
        # A refused /join: the prompt, which says where lines go, goes back to the room it showed
        # before (lines typed before the refusal came were refused: they went to the new room).
        refused = client.refused_join(ref)
        if refused is not None and client.active_room == refused[0]:
            client.active_room = refused[1]

    def read_events() -> None:
        while True:
            ended: Disconnected | None = None
            for event in client.events():
                if isinstance(event, Disconnected):
                    ended = event
                    break
                context.note(event)
                mention = isinstance(event, Chat) and not event.history and names_user(event, client.username)
                if (
                    isinstance(event, Chat)
                    and event.room
                    and event.room != client.active_room
                    and event.sender != client.username
                    and (not event.history or missed.is_missed(event))
                ):
                    with unread_lock:
                        unread[event.room] = unread.get(event.room, 0) + 1
                        if mention or (event.history and names_user(event, client.username)):
                            mentioned[event.room] = mentioned.get(event.room, 0) + 1
                missed.note(event)
                if isinstance(event, ErrorReply) and event.ref:
                    back_to_room(event.ref)
                formatted = format_event(naming_the_line(client, event), style, client.username, client.active_room)
                for shown in entries.lines_to_show(event, formatted[0]) if formatted is not None else []:
                    line = style.mention(shown) if mention else shown
                    screen.write(line + ("\a" if mention and bell else ""))
                summary = while_away.note(event, client.username, client.away_since)
                if summary is not None:
                    show(summary)
                if session.app.is_running:
                    session.app.invalidate()  # the prompt and toolbar show the active room and unread counts
            if ended is None or leaving.is_set():
                return
            online.clear()
            if ended.clean:
                show(f"*** disconnected: {ended.reason}")
                report_unconfirmed("before the server closed the session")
                leaving.set()
                stop_prompt()
                return
            if ended.needs_login:  # the server ended the session (a password changed): nothing to resume
                # (Its reason is on the screen already: the error that ended it.)
                report_unconfirmed("before the server ended the session")
                need_password.set()
                stop_prompt()
                return
            show(f"*** {lost(ended.reason)}")
            report_unconfirmed("before the link dropped")
            result, why = reconnect(
                client, show, leaving, on_resumed=online.set, restarting=ended.restarting, retry_now=reconnect_now
            )
            if result is Reconnected.RESUMED:
                missed.resumed()
                continue
            if leaving.is_set():
                return  # the user quit while we were offline: nothing went wrong
            show(f"*** {why}")
            if result is Reconnected.NEED_PASSWORD:
                need_password.set()
            else:
                gave_up.set()
                leaving.set()
            stop_prompt()
            return

    def read_line() -> str:
        typed, typed_when_stopped[0] = typed_when_stopped[0], ""
        try:
            return session.prompt(prompt_text, pre_run=prompt_started, default=typed)
        finally:
            screen.prompt_ended()

    def start_reader() -> threading.Thread:
        reader = threading.Thread(target=read_events, name="events", daemon=True)
        reader.start()
        return reader

    where = address_text(client.host, client.port)
    show(f"*** connected to {where} as {client.username}; rooms: {', '.join(client.rooms)}")
    show("*** type /help for commands, Ctrl-D or /quit to leave")
    parting = ""
    status = 0
    # The terminal stays in raw mode between two prompts too (while a line is sent and the next
    # prompt starts): keys typed then wait, unechoed, for the next prompt, which shows them once.
    # In cooked mode the terminal itself would echo them on a row of their own.
    with patch_stdout(raw=True), session.input.raw_mode():
        reader = start_reader()
        while True:
            try:
                line = read_line()
            except (EOFError, KeyboardInterrupt):
                if need_password.is_set():
                    need_password.clear()
                    if log_in_again(client, show):
                        online.set()
                        missed.resumed()  # what it catches up on was missed, as after a resume
                        reader = start_reader()
                        continue
                    status = 1
                break
            if leaving.is_set():
                break
            if not online.is_set() and line.strip() and line.split(" ")[0].lower() not in OFFLINE_COMMANDS:
                show("not sent: offline (reconnecting; /reconnect tries now); your line is in the history (up arrow)")
                continue
            try:
                handle_line(context, line)
            except Quit as quit_request:
                parting = quit_request.message
                break
            except MessageRefused as exc:  # the prompt is cleared: say which line (up arrow brings it back)
                show(f"{exc} (your line: {one_row(line, 80)})")
            except ChatError as exc:
                show(str(exc))
        leaving.set()
        client.leave(parting)  # the server answers every line it took before it says goodbye
        reader.join(timeout=2.0)
        report_unconfirmed("before the session ended")
    return 1 if gave_up.is_set() else status


def log_in_again(client: ChatClient, show: Callable[[str], None]) -> bool:
    """The session expired: ask for the password on the terminal and log in afresh."""
    show(f"*** your session has ended; log in again as {client.username} (Ctrl-C to quit)")
    try:
        # prompt_toolkit's own prompt: getpass would write past patch_stdout's pending output. Shown as
        # getpass shows it, as nothing: not a star a character, nor a cursor that moves, to tell its length.
        from prompt_toolkit import prompt
        from prompt_toolkit.layout.processors import Processor, Transformation, TransformationInput

        class TypedUnseen(Processor):
            def apply_transformation(self, transformation_input: TransformationInput) -> Transformation:
                return Transformation([], source_to_display=lambda _: 0, display_to_source=lambda _: 0)

        def ask() -> str:
            # Ctrl-Z suspends here too: else it went into the password, as a character.
            return prompt(f"Password for {client.username}: ", input_processors=[TypedUnseen()], enable_suspend=True)

        log_in_on_terminal(client, client.username, ask)
    except (EOFError, KeyboardInterrupt):
        return False
    except ChatError as exc:
        show(f"error: {exc}")
        return False
    show(f"*** logged in again as {client.username}")
    return True


# --------------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Secure terminal group chat client.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"server address (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--server",
        dest="servers",
        action="append",
        type=server_address,
        metavar="HOST:PORT",
        help="a node of the chat service (repeat for several: the client fails over between them); "
        "instead of --host and --port",
    )
    parser.add_argument("--user", metavar="NAME", help="user name (asked for on a terminal if omitted)")
    parser.add_argument(
        "--room", metavar="#ROOM", type=room_name, default="", help="join this room at start and talk there"
    )
    parser.add_argument(
        "--device", metavar="LABEL", default=platform.node()[:40], help="this device's name in /sessions"
    )
    parser.add_argument(
        "--known-hosts",
        type=Path,
        metavar="FILE",
        help=f"pinned server keys (default: {default_known_hosts_path()})",
    )
    parser.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown server key without asking (a changed key is still refused)",
    )
    parser.add_argument(
        "--key-size",
        type=int,
        default=crypto_utils.DEFAULT_KEY_SIZE,
        choices=crypto_utils.ALLOWED_KEY_SIZES,
        help="RSA size of this session's key",
    )
    parser.add_argument(
        "--no-bell", dest="bell", action="store_false", help="do not ring the terminal bell when a line names you"
    )
    return parser


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1 to 65535): {text!r}")
    return int(text)


def room_name(text: str) -> str:
    """An argparse type: a room's name, checked before anything is asked or sent ("" for none)."""
    if not text:
        return ""
    try:
        return normalize_room(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def server_address(text: str) -> tuple[str, int]:
    """An argparse type: ``HOST:PORT`` (``[::1]:7878`` for an IPv6 address)."""
    host, separator, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not separator or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, port_number(port)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    crypto_utils.forbid_core_dumps()  # before the key pair is made and the password read
    options: dict[str, Any] = {
        "known_hosts": KnownHosts(args.known_hosts),
        "accept_new_host_key": args.accept_new_host_key,
        "key_size": args.key_size,
        "device": args.device,
    }
    host, port = args.host, args.port
    if args.servers:
        (host, port), options["other_servers"] = args.servers[0], args.servers[1:]
    if sys.stdin.isatty():
        return run_interactive(host, port, args.user, options, args.room, bell=args.bell)
    try:
        return run_batch(host, port, args.user, options, args.room)
    except KeyboardInterrupt:  # Ctrl-C on a script: it stops, as any command does, with no traceback
        print("error: interrupted", file=sys.stderr)
        return 130
