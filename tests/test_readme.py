"""The README's examples work as printed: the echo bot, and the account commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, TIMEOUT, password_of, wait_for

from securechat.client import Chat


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


def test_the_readme_lists_every_command_the_client_has():
    from securechat.ui import COMMANDS

    table = [line for line in readme_section("Commands").splitlines() if line.startswith("| `/")]
    documented = {name for row in table for name in re.findall(r"`/([a-z]+)", row.split("|")[1])}
    assert documented == set(COMMANDS)
