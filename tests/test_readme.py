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
