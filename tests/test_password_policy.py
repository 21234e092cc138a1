"""The password policy of ``adduser`` and ``passwd`` (NIST SP 800-63B), through the real program.

At least 8 characters, at most 1024, no composition rules; not the user name; not a
commonly used or easily guessed password (zxcvbn's score below 2). Refusals are one
line on stderr, exit status 1, and leave the store as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, TIMEOUT, password_of

from securechat.accounts import (
    MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
    UserStore,
    hash_password,
    password_problem,
    verify_password,
)

SERVER = str(ROOT / "server.py")
GOOD_PASSPHRASE = "violet kayak under the stairs"


def admin(command: str, name: str, users: Path, password: str, *extra: str) -> subprocess.CompletedProcess:
    """``python server.py COMMAND NAME --users FILE``, the password as one line of stdin."""
    return subprocess.run(
        [sys.executable, SERVER, command, name, "--users", str(users), *extra],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
        cwd=ROOT,
    )


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one line of a refusal; fails unless it is exactly that."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the password")
    return lines[0]


@pytest.fixture
def users(tmp_path: Path) -> Path:
    """A store holding alice, as an operator's would."""
    path = tmp_path / "users.json"
    entry = {"password_hash": hash_password("alice-pass-5"), "demo": False, "created": ""}
    path.write_text(json.dumps({"format": 1, "users": {"alice": entry}}, indent=2) + "\n")
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- through the program


@pytest.mark.parametrize(
    ("name", "password", "reason"),
    [
        ("x", "password", "top-10 common password"),
        ("x", "x", "at least 8 characters"),
        ("bob", "12345678", "common password"),
        ("bob", "qwertyuiop", "common password"),
        ("bob", "aaaaaaaaaaaa", "repeats"),
        ("alexander", "Alexander", "the user name"),
        ("alexander", "alexander2024", "the user name"),
        ("bob", "", "empty"),
        ("bob", "x" * (MAX_PASSWORD_CHARS + 1), "too long"),
    ],
)
def test_adduser_refuses_a_weak_password_in_one_line_and_changes_nothing(users, name, password, reason):
    before = users.read_bytes()
    line = refusal(admin("adduser", name, users, password))
    assert reason in line.lower()
    assert users.read_bytes() == before


def test_adduser_accepts_a_good_passphrase(users):
    result = admin("adduser", "bob", users, GOOD_PASSPHRASE)
    assert result.returncode == 0, result.stderr
    record = UserStore(users).get("bob")
    assert record is not None and verify_password(GOOD_PASSPHRASE, record.password_hash)


def test_no_composition_rules_a_long_lowercase_passphrase_is_enough(users):
    assert admin("adduser", "bob", users, "tangerine lighthouse gravel").returncode == 0


def test_passwd_applies_the_same_policy(users):
    before = users.read_bytes()
    assert "common password" in refusal(admin("passwd", "alice", users, "password"))
    assert users.read_bytes() == before
    assert admin("passwd", "alice", users, GOOD_PASSPHRASE).returncode == 0
    assert verify_password(GOOD_PASSPHRASE, UserStore(users).get("alice").password_hash)


def test_the_minimum_length_can_be_raised(users):
    line = refusal(admin("adduser", "bob", users, "violet kayak", "--min-password-length", "15"))
    assert "at least 15 characters" in line
    assert admin("adduser", "bob", users, GOOD_PASSPHRASE, "--min-password-length", "15").returncode == 0


@pytest.mark.parametrize("length", ["7", "0", "2000", "many"])
def test_the_minimum_length_cannot_go_below_nist_or_above_the_maximum(users, length):
    result = admin("adduser", "bob", users, GOOD_PASSPHRASE, "--min-password-length", length)
    assert result.returncode == 2
    assert "--min-password-length" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_demo_accounts_still_log_in_with_their_short_passwords():
    """The policy is for new passwords: the shipped, already hashed ones keep working."""
    store = UserStore(ROOT / "users.json")
    demo = store.get("alice")
    assert demo is not None and demo.demo
    assert verify_password("alice-demo", demo.password_hash)


def adduser_on_a_terminal(users, name: str, typed: str, expected_error: str) -> int:
    """``adduser NAME`` on a pseudo-terminal, typing ``typed`` at the first prompt; the refusal
    must come before "Repeat it". Returns the exit status."""
    child = pexpect.spawn(
        sys.executable,
        [SERVER, "adduser", name, "--users", str(users)],
        cwd=str(ROOT),
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=TIMEOUT * 4,
    )
    try:
        child.expect(f"New password for {name}: ")
        child.sendline(typed)
        index = child.expect(["Repeat it", expected_error, pexpect.EOF])
        assert index == 1, child.before
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return child.exitstatus


def test_on_a_terminal_an_empty_password_is_refused_before_the_repeat_prompt(users):
    assert adduser_on_a_terminal(users, "bob", "", "error: the password is empty") == 1
    assert "bob" not in users.read_text()


def test_on_a_terminal_a_weak_password_is_refused_before_the_repeat_prompt(users):
    assert adduser_on_a_terminal(users, "bob", "password", "error: the password is too easy to guess") == 1


def test_on_a_terminal_a_good_password_is_asked_twice(users):
    child = pexpect.spawn(
        sys.executable,
        [SERVER, "adduser", "bob", "--users", str(users)],
        cwd=str(ROOT),
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=TIMEOUT * 4,
    )
    try:
        child.expect("New password for bob: ")
        child.sendline(GOOD_PASSPHRASE)
        child.expect("Repeat it: ")
        child.sendline(GOOD_PASSPHRASE)
        child.expect("added bob")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# --------------------------------------------------------------------------- the rule itself


def test_password_problem_is_none_for_a_good_password_and_one_line_otherwise():
    assert password_problem(GOOD_PASSPHRASE, "bob") is None
    for weak in ("", "short", "password", "bob12345", "BOB00000000", "11111111", "abcdefgh"):
        problem = password_problem(weak, "bob")
        assert problem is not None and "\n" not in problem, weak


def test_the_limits_are_nist_s():
    assert MIN_PASSWORD_CHARS == 8
    assert MAX_PASSWORD_CHARS == 1024
    assert password_problem("x" * 7, "bob") is not None
    long_and_good = (GOOD_PASSPHRASE + " ") * 40
    assert password_problem(long_and_good[:MAX_PASSWORD_CHARS], "bob") is None
    assert "too long" in (password_problem(long_and_good[: MAX_PASSWORD_CHARS + 1], "bob") or "")


def test_the_name_inside_a_longer_passphrase_is_not_refused_for_that_alone():
    assert password_problem("alice rides a violet kayak", "alice") is None


@pytest.mark.parametrize("name", ["alice", "bob", "carol", "dave", "erin", "echo", "user0"])
def test_the_test_suite_s_own_passwords_meet_the_policy(name):
    """conftest's ``password_of`` is what the other tests log in and add users with."""
    assert password_problem(password_of(name), name) is None
