"""The README's examples work as printed: the echo bot, and the account commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TIMEOUT, ServerProcess, password_of, wait_for

from securechat.client import Chat, ChatClient, KnownHosts


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text("utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "the README has no python example"
    return blocks[0]


def test_the_echo_bot_from_the_readme_echoes(server, connect, tmp_path):
    code = readme_python_block().replace("7878", str(server.address[1]))
    # alice first: a bot that logged in before her would be in her welcome, with no "joined" to wait for.
    alice = connect("alice")
    bot = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "CHAT_PASSWORD": password_of("echo"), "HOME": str(tmp_path), "XDG_CONFIG_HOME": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(alice, lambda event: getattr(event, "event", "") == "joined", timeout=TIMEOUT * 2)
        alice.say("ping")
        reply = wait_for(alice, lambda event: isinstance(event, Chat) and event.sender == "echo", timeout=TIMEOUT * 2)
        assert (reply.sender, reply.text) == ("echo", "alice said: ping")
    finally:
        bot.terminate()
        bot.communicate(timeout=TIMEOUT)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text("utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def parser_options(parser) -> dict[str, object]:
    """Each long option a parser takes, with its default."""
    return {
        flag: action.default
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


def test_the_readme_lists_every_server_option_with_its_default():
    from securechat.admin import build_parser

    options = parser_options(build_parser())
    table = [line for line in readme_section("Configuration").splitlines() if line.startswith("| `--")]
    documented = {}
    for row in table:
        names_cell, default_cell = row.split("|")[1:3]
        names = re.findall(r"--[a-z][a-z-]*", names_cell)
        defaults = re.findall(r"`([^`]*)`", default_cell)
        for index, name in enumerate(names):
            documented[name] = defaults[index] if index < len(defaults) else None
    assert set(documented) == set(options), "the README's table and --help list different options"
    for name, shown in documented.items():
        actual = options[name]
        if shown is None or isinstance(actual, bool):
            continue
        if isinstance(actual, int | float):
            assert float(shown) == float(actual), f"{name}: README says {shown}, --help {actual}"
        elif isinstance(actual, str) and "/" not in actual:
            assert shown == actual, f"{name}: README says {shown}, --help {actual}"


def test_the_readme_lists_every_client_option():
    from securechat.ui import build_parser

    paragraph = readme_section("Configuration").split("Client (`python client.py --help`):")[1].split("\n\n")[0]
    assert set(re.findall(r"--[a-z][a-z-]*", paragraph)) == set(parser_options(build_parser()))


def test_the_readme_command_table_is_the_one_the_programs_use():
    from securechat.commands import COMMAND_TABLE, command_reference
    from securechat.ui import COMMANDS

    section = readme_section("Commands")
    assert command_reference() in section, "regenerate the README's table from securechat.commands.command_reference()"
    table = [line for line in section.splitlines() if line.startswith("| `/")]
    documented = {re.match(r"\| `/([a-z]+)", row).group(1) for row in table if not row.startswith("| `//")}
    assert documented == set(COMMANDS) == {spec.name for spec in COMMAND_TABLE}


def test_the_readme_bot_runs_from_any_folder_answers_only_chat_lines_and_survives_a_restart(tmp_path, users_file):
    data_dir = tmp_path / "data"
    first = ServerProcess(["--port", "0", "--users", str(users_file), "--data-dir", str(data_dir)])
    port = first.port
    elsewhere = tmp_path / "empty folder"  # the bot is saved away from the checkout
    elsewhere.mkdir()
    (elsewhere / "bot.py").write_text(readme_python_block().replace("7878", str(port)))
    bot = subprocess.Popen(
        [sys.executable, "bot.py"],
        cwd=elsewhere,
        # The package as an installed one would be found (pip install . puts it on the path).
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CHAT_PASSWORD": password_of("echo"),
            "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": "",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = None
    try:

        def alice_on(server: ServerProcess):
            client = ChatClient(
                "127.0.0.1", server.port, server_fingerprint=server.fingerprint, known_hosts=KnownHosts(tmp_path / "kh")
            )
            client.login("alice", password_of("alice"))
            return client

        def answer_to(client, text: str):
            deadline = time.monotonic() + TIMEOUT * 4
            while time.monotonic() < deadline:  # the bot may still be (re)connecting: say it again
                client.say(text)
                event = client.next_event(timeout=1.0)
                while event is not None:
                    if isinstance(event, Chat) and event.sender == "echo" and not event.history:
                        return event.text
                    event = client.next_event(timeout=0.2)
            pytest.fail(f"the bot never answered {text!r}")

        alice = alice_on(first)
        assert answer_to(alice, "ping") == "alice said: ping"
        alice.close()
        status, _ = first.stop()  # the server restarts under the bot
        assert status == 0
        second = ServerProcess(["--port", str(port), "--users", str(users_file), "--data-dir", str(data_dir)])
        alice = alice_on(second)
        alice.action("waves")  # not a chat line: no answer
        assert answer_to(alice, "after the restart") == "alice said: after the restart"
        alice.close()
        assert bot.poll() is None, bot.stderr.read() if bot.stderr else ""
    finally:
        bot.terminate()
        _, errors = bot.communicate(timeout=TIMEOUT)
        if second is not None:
            second.stop()
        first.stop()
    assert "Traceback" not in errors
