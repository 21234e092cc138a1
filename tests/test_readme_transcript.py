"""The README's session is what the programs print: the same actions, replayed, give the same lines.

The transcripts are read out of README.md (every ```text block that starts with a ``$``
command), so editing the README without the programs, or the programs without the
README, fails here. Only what honestly differs from one run to the next is left open:
clock times, ports, the server's key fingerprint and the checkout's directory. A port
or fingerprint the README shows twice must be the same real one both times.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TIMEOUT, wait_for
from terminal import Terminal

from securechat.client import Chat, ChatClient, KnownHosts
from securechat.listener import ChatServer, ServerConfig

#: Starting a program means starting Python, importing, and (the client) making an RSA key.
START = TIMEOUT * 2
#: Tall enough for the whole session: nothing scrolls off the screen the test reads.
ROWS = 60

#: What may differ between the README and a real run, and what it may be instead.
VARYING = re.compile(
    r"(?P<log_time>^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}(?= ))"
    r"|(?P<clock>^\d\d:\d\d(?= ))"
    r"|(?P<fingerprint>SHA256:[A-Za-z0-9+/]{43})"
    r"|(?P<port>(?<=127\.0\.0\.1:)\d+|(?<=\[127\.0\.0\.1\]:)\d+)"
    r"|(?P<directory>(?<![\w.])(?:/[\w.-]+)+/)(?=[\w.-])"
)
INSTEAD = {
    "log_time": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}",
    # A line from history said just before midnight carries its date.
    "clock": r"(?:\d{4}-\d\d-\d\d )?\d\d:\d\d",
    "fingerprint": r"SHA256:[A-Za-z0-9+/]{43}",
    "port": r"\d{1,5}",
    "directory": r"(?:/[^/\s]+)*/",
}
#: Fields that name one thing: one README value stands for one real value, wherever it appears.
ONE_THING = ("fingerprint", "port")


def readme_transcripts() -> dict[str, list[str]]:
    """Each ```text block of the README that starts with ``$ command``: its output lines, by command."""
    text = (ROOT / "README.md").read_text("utf-8")
    transcripts = {}
    for block in re.findall(r"```text\n(.*?)```", text, flags=re.DOTALL):
        command, *output = block.rstrip("\n").split("\n")
        if command.startswith("$ "):
            transcripts[command[2:]] = [line.rstrip() for line in output]
    return transcripts


def line_pattern(shown: str, bound: dict[tuple[str, str], str]) -> tuple[re.Pattern[str], list[tuple[str, str]]]:
    """A README line as a regular expression, and the (field, README value) that each of its groups captures."""
    parts: list[str] = []
    captured: list[tuple[str, str]] = []
    position = 0
    for field in VARYING.finditer(shown):
        parts.append(re.escape(shown[position : field.start()]))
        key = (field.lastgroup or "", field.group())
        if key in bound:
            parts.append(re.escape(bound[key]))
        elif key[0] in ONE_THING:
            parts.append(f"({INSTEAD[key[0]]})")
            captured.append(key)
        else:
            parts.append(f"(?:{INSTEAD[key[0]]})")
        position = field.end()
    parts.append(re.escape(shown[position:]))
    return re.compile("".join(parts)), captured


def bind(bound: dict[tuple[str, str], str], key: tuple[str, str], real: str) -> str:
    """Record that the README's value stands for ``real``; a reason if that contradicts an earlier line."""
    others = [value for (field, value), seen in bound.items() if field == key[0] and seen == real and value != key[1]]
    if others:
        return f"the README shows {key[1]} and {others[0]} where the program printed {real} for both"
    if bound.setdefault(key, real) != real:
        return f"the README shows {key[1]} twice where the program printed {bound[key]} and {real}"
    return ""


def assert_printed(
    shown: list[str], printed: list[str], bound: dict[tuple[str, str], str], what: str, *, whole: bool
) -> None:
    """The program printed the README's lines first, one for one (and nothing else if ``whole``).

    ``bound`` maps each port and fingerprint the README shows to the real one, across calls.
    """
    listing = "\n".join(printed)
    for number, line in enumerate(shown):
        pattern, captured = line_pattern(line, bound)
        real = printed[number] if number < len(printed) else "(nothing)"
        match = pattern.fullmatch(real)
        assert match, f"{what}: the README shows\n  {line}\nwhere the program printed\n  {real}\nin:\n{listing}"
        for key, value in zip(captured, match.groups(), strict=True):
            contradiction = bind(bound, key, value)
            assert not contradiction, f"{what}: {contradiction}, in:\n  {line}\n  {real}"
    if whole:
        assert printed[len(shown) :] == [], f"{what}: the README leaves out the end of:\n{listing}"


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    """The programs started by a test; each is killed at teardown if still running."""
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def start(terminals: list[Terminal], command: str, *extra: str, env: dict[str, str], checkout: Path = ROOT) -> Terminal:
    """The README's ``python program.py ...`` command line, with ``extra`` options, on a terminal, in ``checkout``."""
    program, script, *args = shlex.split(command)
    assert program == "python", command
    terminal = Terminal([sys.executable, str(checkout / script), *args, *extra], env=env, cwd=str(checkout), rows=ROWS)
    # Answer the program's cursor-position queries as a real terminal does: the client's bar
    # at the bottom is drawn only where they are answered.
    terminal.screen.write_process_input = lambda answer: terminal.child.send(answer.encode())
    terminals.append(terminal)
    return terminal


def demo_password(name: str) -> str:
    """The password of a demo account in the shipped users.json."""
    return f"{name}-demo"


def bob_made_dev_earlier(users: Path, data_dir: Path, known_hosts: KnownHosts) -> str:
    """Before the session, bob made #dev and said something there; returns the server's fingerprint."""
    with ChatServer(ServerConfig(host="127.0.0.1", port=0, users_path=users, data_dir=data_dir)) as earlier:
        with ChatClient(*earlier.address, server_fingerprint=earlier.fingerprint, known_hosts=known_hosts) as bob:
            bob.login("bob", demo_password("bob"))
            bob.join("#dev")
            bob.say("the build is green")
            wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "the build is green")
            bob.leave()
        return earlier.fingerprint


def test_the_readme_session_is_what_the_programs_print(tmp_path: Path, terminals: list[Terminal]):
    transcripts = readme_transcripts()
    server_command, client_command = "python server.py", "python client.py --user alice"
    assert set(transcripts) == {server_command, client_command}, "a README transcript this test does not replay"

    # A fresh clone's files, where `python server.py` finds users.json beside it and keeps its data there.
    checkout = tmp_path / "chat"
    checkout.mkdir()
    shutil.copyfile(ROOT / "server.py", checkout / "server.py")
    shutil.copytree(ROOT / "securechat", checkout / "securechat", ignore=shutil.ignore_patterns("__pycache__"))
    users, data_dir, bob_hosts = checkout / "users.json", checkout / "server-data", KnownHosts(tmp_path / "bob_hosts")
    shutil.copyfile(ROOT / "users.json", users)
    fingerprint = bob_made_dev_earlier(users, data_dir, bob_hosts)  # the session's server keeps this key
    users.chmod(0o644)  # as git leaves it in a fresh clone
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("NO_COLOR", "PROMPT_TOOLKIT_NO_CPR", "XDG_CONFIG_HOME")
    }
    env.update(HOME=str(tmp_path / "home"), TERM="xterm-256color")

    server = start(terminals, server_command, "--port", "0", env=env, checkout=checkout)
    server.wait_until(lambda terminal: b"Listening on" in terminal.output, START, "the server to listen")
    listening = re.search(rb"Listening on 127\.0\.0\.1:(\d+)", server.output)
    assert listening
    port = int(listening.group(1))

    alice = start(terminals, client_command, "--port", str(port), env=env)
    alice.wait_for_text("(yes/no)?", START)
    alice.type("yes\r")
    alice.wait_for_text("Password for alice:", START)
    alice.type(demo_password("alice") + "\r")
    alice.wait_until(lambda terminal: terminal.cursor_row == "#lobby>", START, "alice's prompt")

    with ChatClient("127.0.0.1", port, server_fingerprint=fingerprint, known_hosts=bob_hosts) as bob:
        bob.login("bob", demo_password("bob"))  # back in #lobby, and in #dev, which he joined before
        alice.wait_for_text("*** bob joined", TIMEOUT)
        bob.say("hi alice! lunch at 1?", "#lobby")
        alice.wait_for_text("bob: hi alice! lunch at 1?", TIMEOUT)
        alice.type("works for me\r")
        alice.wait_for_text("alice: works for me", TIMEOUT)
        alice.type("/join #dev\r")
        alice.wait_for_text("*** 1 line of #dev from history", TIMEOUT)
        alice.type("/msg bob will do\r")
        alice.wait_for_text("alice → bob: will do", TIMEOUT)
        bob.action("waves", "#dev")
        alice.wait_for_text("* bob waves", TIMEOUT)
        bob.private("alice", "bring the slides")
        alice.wait_for_text("bob (private): bring the slides", TIMEOUT)
        alice.type("half-typed\x10")  # then Ctrl-P: back to #lobby
        alice.wait_until(lambda terminal: terminal.cursor_row == "#lobby> half-typed", TIMEOUT, "#lobby again")
        bob.leave("see you")
    alice.wait_for_text("#dev *** bob left (see you)", TIMEOUT)
    alice.settle()
    on_screen = [line for line in alice.lines if line]
    alice.type("\x15\x04")  # Ctrl-U empties the line, Ctrl-D leaves
    assert alice.wait_exit(TIMEOUT) == 0
    server.child.kill(signal.SIGTERM)
    assert server.wait_exit(TIMEOUT * 2) == 0

    logged = server.output.decode().replace("\r\n", "\n").splitlines()
    bound: dict[tuple[str, str], str] = {}
    assert_printed(transcripts[server_command], logged, bound, server_command, whole=False)
    assert_printed(transcripts[client_command], on_screen, bound, client_command, whole=True)
    # "it is remembered in ~/.config/chat/known_hosts", says the README below the session.
    assert fingerprint in (tmp_path / "home" / ".config" / "chat" / "known_hosts").read_text()
