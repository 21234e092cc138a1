"""The terminal front end's own decisions, driven against a real server where one is needed.

``test_cli.py`` runs the whole program; these tests call ``ui`` functions
directly, so a decision (retry, ask for the password, give up) can be checked
without a terminal.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from dataclasses import replace

import pytest
from conftest import TIMEOUT, is_disconnected, joined, left, wait_for

from securechat import ui
from securechat.client import LoginRefused
from securechat.protocol import Chat, History, Notice, Room, Roster


@pytest.fixture
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back-off delays short enough for a test; the sequence is still first, doubled, capped."""
    monkeypatch.setattr(ui, "RECONNECT_FIRST_DELAY", 0.05)
    monkeypatch.setattr(ui, "RECONNECT_MAX_DELAY", 0.2)


class Reconnecting:
    """``ui.reconnect`` for one client, run in a thread as the event reader runs it."""

    def __init__(self, client, give_up_after: float | None = None) -> None:
        self.shown: list[str] = []
        self.cancelled = threading.Event()
        self.result: tuple[ui.Reconnected, str] | None = None
        self.thread = threading.Thread(
            target=self._run, args=(client, give_up_after), name="test-reconnect", daemon=True
        )
        self.thread.start()

    def _run(self, client, give_up_after: float | None) -> None:
        self.result = ui.reconnect(client, self.shown.append, self.cancelled, give_up_after)

    def outcome(self, timeout: float = TIMEOUT) -> tuple[ui.Reconnected, str]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.cancelled.set()
            self.thread.join(TIMEOUT)
            pytest.fail(f"reconnect still running after {timeout} s; shown: {self.shown!r}")
        assert self.result is not None
        return self.result

    def wait_until_shown(self, text: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.shown):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                pytest.fail(f"never shown {text!r}; shown: {self.shown!r}, result: {self.result!r}")
            time.sleep(0.05)


def log_in_when_room(connect, name: str, **options):
    """Log in, retrying while the server still counts a connection that is on its way out."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            return connect(name, **options)
        except LoginRefused as refusal:
            if refusal.code != "server_full":
                raise
            time.sleep(0.1)
    pytest.fail(f"{name} could not log in: the server stayed full")


def cut(client) -> None:
    """Drop the client's link without a goodbye, and wait until it has noticed."""
    client.sock.shutdown(2)
    wait_for(client, is_disconnected)


# --------------------------------------------------------------------------- reconnecting


def test_a_full_server_is_retried_not_taken_for_an_expired_session(make_server, connect, quick_reconnect):
    small = make_server(max_clients=2)
    alice, carol = connect("alice", to=small), connect("carol", to=small)
    wait_for(alice, joined("carol"))
    cut(alice)
    wait_for(carol, left("alice"))
    bob = log_in_when_room(connect, "bob", to=small)  # the room is full again: carol and bob

    attempt = Reconnecting(alice)
    attempt.wait_until_shown("server is full")
    assert attempt.thread.is_alive(), f"gave up on a full server: {attempt.result!r}"
    bob.leave()
    assert attempt.outcome() == (ui.Reconnected.RESUMED, "")
    wait_for(carol, joined("alice"))


class RefusingClient:
    """Stands in for a ChatClient whose resume is refused with ``code`` a given number of times."""

    host, port, username = "127.0.0.1", 7878, "alice"

    def __init__(self, code: str, refusals: int = 1_000) -> None:
        self.code = code
        self.refusals = refusals
        self.resumes = 0

    def close(self) -> None:
        pass

    def connect(self) -> None:
        pass

    def resume(self) -> None:
        self.resumes += 1
        if self.resumes <= self.refusals:
            raise LoginRefused(self.code, f"refused ({self.code})")


@pytest.mark.parametrize("code", ui.TOKEN_CODES)
def test_only_a_refused_token_asks_for_the_password(code, quick_reconnect):
    result, why = Reconnecting(RefusingClient(code)).outcome()
    assert result is ui.Reconnected.NEED_PASSWORD
    assert f"refused ({code})" in why


#: "Not now" refusals: the server is full, busy or briefly unable to check the token.
PASSING_REFUSALS = ("server_full", "too_many_connections", "busy", "rate_limited", "server_error", "timeout")


@pytest.mark.parametrize("code", PASSING_REFUSALS)
def test_a_passing_refusal_is_retried_until_it_passes(code, quick_reconnect):
    client = RefusingClient(code, refusals=2)
    attempt = Reconnecting(client)
    assert attempt.outcome() == (ui.Reconnected.RESUMED, "")
    assert client.resumes == 3
    assert sum(f"still offline: refused ({code})" in line for line in attempt.shown) == 2


def test_a_passing_refusal_still_gives_up_in_time(quick_reconnect):
    result, why = Reconnecting(RefusingClient("server_full"), give_up_after=0.3).outcome()
    assert result is ui.Reconnected.FAILED
    assert "gave up reconnecting to 127.0.0.1:7878" in why


@pytest.mark.parametrize("code", ["protocol_error", "demo_disabled", "account_deleted", "a_code_from_a_newer_server"])
def test_any_other_refusal_is_a_final_error_that_says_why(code, quick_reconnect):
    client = RefusingClient(code)
    result, why = Reconnecting(client).outcome()
    assert result is ui.Reconnected.FAILED
    assert why == f"cannot resume the session: refused ({code})"
    assert client.resumes == 1


def test_every_command_of_the_one_table_is_run_by_the_side_that_should_run_it():
    from securechat.commands import COMMAND_TABLE
    from securechat.hub import SERVER_RUNNERS
    from securechat.ui import CLIENT_RUNNERS

    server_side = {spec.name for spec in COMMAND_TABLE if spec.server}
    client_side = {spec.name for spec in COMMAND_TABLE if not spec.server}
    assert set(SERVER_RUNNERS) == server_side
    assert client_side <= set(CLIENT_RUNNERS)


def test_a_line_names_you_as_a_word_in_any_case_but_not_inside_another_word():
    from securechat.ui import names_user

    def line(text: str, sender: str = "bob") -> Chat:
        return Chat(sender=sender, text=text, sent_at=0.0, room="#lobby")

    assert names_user(line("carol: look"), "carol")
    assert names_user(line("ask @Carol about it"), "carol")
    assert not names_user(line("carolina is here"), "carol")
    assert not names_user(line("bob-carol2 no"), "carol")
    assert not names_user(line("carol, me"), "bob") and not names_user(line("I am carol", "carol"), "carol")


def test_a_notice_from_history_is_stamped_when_it_happened_not_when_it_is_shown():
    style = ui.Style(colour=False, timestamps=True)
    two_days_ago = time.time() - 2 * 86400
    kick = Notice(event="moderation", name="alice", action="kick", target="bob", text="alice kicked bob", room="#x")
    line, is_error = ui.format_event(replace(kick, sent_at=two_days_ago, history=True), style, "carol", "#x")
    assert line == f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(two_days_ago))} *** alice kicked bob"
    assert not is_error
    before = time.strftime("%H:%M")
    live, _ = ui.format_event(kick, style, "carol", "#x")  # no time of its own: now
    assert live in {f"{clock} *** alice kicked bob" for clock in (before, time.strftime("%H:%M"))}


def test_an_empty_rooms_roster_says_nobody_is_there():
    style = ui.Style(colour=False, timestamps=False)
    assert ui.format_event(Roster(members=[], room="#quiet", devices=[]), style, "carol", "#lobby") == (
        "*** nobody is in #quiet",
        False,
    )


def test_a_long_roster_entered_again_is_shown_whole_or_not_at_all():
    """A roster in pages: held until the last page, then shown whole if anyone came or went."""
    entries = ui.RoomEntries()
    style = ui.Style(colour=False)

    def enter(*pages: list[str]) -> list[str]:
        shown = []
        for event in [Room(room="#big"), *(Roster(members=names, room="#big", more=more) for names, more in pages)]:
            shown += entries.lines_to_show(event, ui.format_event(event, style, "alice")[0])
        return shown

    first = enter((["alice", "bob"], True), (["carol"], False))
    assert first == ["*** you are in #big", "*** in #big (2): alice, bob ...", "*** in #big (1): carol"]
    assert enter((["alice", "bob"], True), (["carol"], False)) == []  # entered again: nothing new
    entries.lines_to_show(Notice("left", "carol", room="#big"), "*** carol left")
    assert enter((["alice", "bob"], False)) == []  # as the user was told: nothing new
    assert enter((["alice", "bob"], True), (["dave"], False)) == [first[1], "*** in #big (1): dave"]
    assert enter((["alice", "bob"], True), (["dave"], False)) == []


def test_reply_without_text_says_how_reply_is_used():
    shown: list[str] = []
    context = ui.CommandContext(client=None, show=shown.append, last_private_sender="bob")  # type: ignore[arg-type]
    ui.handle_line(context, "/reply   ")
    assert shown == ["usage: /reply text (to bob)"]


def test_help_keeps_a_space_between_every_command_and_what_it_does():
    shown: list[str] = []
    ui.handle_line(ui.CommandContext(client=None, show=shown.append), "/help")  # type: ignore[arg-type]
    mode = next(line for line in shown if line.startswith("  /mode"))
    assert "+t|-t] show a room's modes" in mode
    # And every description starts in one column, the longest command's included.
    columns = {
        next(line for line in shown if line.startswith(f"  {command.spec.synopsis} ")).index(command.help)
        for command in ui.COMMANDS.values()
    }
    assert len(columns) == 1, columns


def test_a_folded_row_never_runs_past_the_edge_whatever_its_characters_weigh():
    # Wide characters take two cells, combining marks none, this module's colour codes none: a row
    # counted in code points ran past the edge, and the terminal's own wrap started an unindented row.
    folded = ui.fold("\x1b[1mbob\x1b[0m: " + "界" * 10 + "e\u0301" * 10, 12, "    ")
    rows = ui._OWN_ESCAPE.sub("", folded).split("\n")
    # (The row of "bob:" ends at its space: the word after it, which has none, fits a row of its own.)
    assert rows == ["bob:", "    界界界界", "    界界界界", "    界界" + "e\u0301" * 4, "    " + "e\u0301" * 6]


def test_a_folded_line_ends_its_rows_between_words():
    # Cut where each row was full, a line read "a long line tha" / "    t needs folding".
    line = "23:44 bob: hello after the resize, a long line that needs folding at thirty columns"
    assert ui.fold(line, 30, "    ").split("\n") == [
        "23:44 bob: hello after the",
        "    resize, a long line that",
        "    needs folding at thirty",
        "    columns",
    ]
    # A word too long for a row of its own is still cut where the row is full.
    assert ui.fold("x: " + "a" * 40 + " end", 20, "    ").split("\n") == [
        "x: " + "a" * 17,
        "    " + "a" * 16,
        "    aaaaaaa end",
    ]
    # A message's own further lines keep every space they have.
    assert ui.fold("one\n    two is long enough to fold", 20, "    ").split("\n") == [
        "one",
        "    two is long",
        "    enough to fold",
    ]


def _read_events(client, context, seconds: float) -> list[object]:
    events = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        event = client.next_event(timeout=min(left, 0.3))
        if event is None:
            if events and isinstance(events[-1], History):
                break
            continue
        context.note(event)
        events.append(event)
    return events


def test_history_pages_past_a_run_of_lines_from_someone_ignored(make_server, connect):
    """The server now leaves the ignored out of a /history page but keeps the page's bounds in
    History.oldest_id; the client pages back from the oldest *Chat* it was shown (oldest_seen), and
    a page wholly from someone ignored shows none. So /history asks for the same page again, for
    ever, and says "no earlier lines kept" though more=True: whoever ignores a chatty user can no
    longer read back past them. /history must reach the earlier lines (and not say none are kept)."""
    server = make_server(join_history=3)
    alice = connect("alice", to=server)
    alice.command("ignore", "carol")
    time.sleep(0.3)
    alice.leave()
    bob, carol = connect("bob", to=server), connect("carol", to=server)
    bob.say("early words")
    for n in range(6):
        carol.say(f"carol's line {n}")
    time.sleep(0.5)
    alice = connect("alice", to=server)
    shown: list[str] = []
    context = ui.CommandContext(alice, show=shown.append)
    _read_events(alice, context, 1.5)  # its rooms' entries: carol's recent lines left out
    texts: list[str] = []
    said_none_kept = []
    for _ in range(4):
        ui.handle_line(context, "/history 3")
        events = _read_events(alice, context, 3.0)
        texts += [e.text for e in events if isinstance(e, Chat)]
        for event in events:
            if isinstance(event, History) and event.room and event.more:
                line, _ = ui.format_event(event, context.style, "alice")
                said_none_kept.append("no earlier lines" in line)
        if "early words" in texts:
            break
    assert "early words" in texts, f"/history never got past carol's lines; it showed {texts!r}"
    assert not any(said_none_kept), "a page of ignored lines with more before it was shown as 'no earlier lines kept'"


@pytest.mark.parametrize(
    "text",
    [
        "\U0001f468\u200d\U0001f469\u200d\U0001f467" * 4,  # family emoji: man ZWJ woman ZWJ girl
    ],
    ids=["zwj-sequence"],
)
def test_fold_never_cuts_a_row_inside_one_emoji(text):
    """ui.fold() cuts a line cell by cell, by each code point's own width: an emoji made of several code
    points (a ZWJ family, a flag's two regional indicators) is cut across rows, its parts shown as
    separate pictures (or letters) on two rows. A row may end only between whole characters as the
    terminal draws them (grapheme clusters)."""
    folded = ui.fold(text, 9, "    ")
    for row_end in [i for i, ch in enumerate(folded) if ch == "\n"]:
        before, after = folded[row_end - 1], folded[row_end + 1 + 4]
        assert before != "\u200d", f"a row ends on a zero-width joiner: {folded!r}"
        assert unicodedata.category(after) != "Mn" and before != "\u200d", f"an emoji cut in two: {folded!r}"
