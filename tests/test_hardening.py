"""Hardening of what reaches a terminal and what lies on disk, through the real programs where possible.

The sanitizer against Unicode's own categories; the user store's, the secret files' and
known_hosts' permissions; copies of the store a killed ``adduser`` left behind; the login
throttle under a flood of one-off failures; and the server's start-up errors, one line each.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import unicodedata
from pathlib import Path

import pytest
from conftest import ROOT, TIMEOUT, USER_NAMES, ServerProcess, drain, process_state, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from securechat import crypto_utils, protocol
from securechat.accounts import LoginThrottle, UserStore, hash_password
from securechat.client import ChatClient, ChatError, KnownHosts, LoginRefused

SERVER = str(ROOT / "server.py")
CLIENT = str(ROOT / "client.py")

# --------------------------------------------------------------------------- helpers


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """A refusal as the README promises: non-zero status, one line on stderr, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def run_program(
    program: str, *args: str, stdin: str = "", prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python PROGRAM ARGS`` to its end, with ``stdin`` as a pipe."""
    return subprocess.run(
        [*prefix, sys.executable, program, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def unprivileged() -> tuple[str, ...]:
    """A command prefix under which file modes bind us: nothing as a user, root without its file capabilities."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make file modes apply")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")


@pytest.fixture
def start_server():
    """Factory: ``start_server(*args)`` runs the real server; every one started is stopped at teardown."""
    servers: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        servers.append(ServerProcess(list(args)))
        return servers[-1]

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def store_document() -> str:
    """A users file with one account, hashed once for the module (hashing is deliberately slow)."""
    user = {"password_hash": hash_password("alice-pass-5"), "demo": False, "created": ""}
    return json.dumps({"format": 1, "users": {"alice": user}}, indent=2) + "\n"


@pytest.fixture
def users(tmp_path: Path, store_document: str) -> Path:
    path = tmp_path / "users.json"
    path.write_text(store_document)
    path.chmod(0o600)
    return path


def server_args(users: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--users", str(users), "--port", "0", "--host", "127.0.0.1", "--data-dir", str(data_dir), *extra]


# --------------------------------------------------------------------------- 1. the sanitizer

UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
HANGUL_FILLERS = "\u115f\u1160\u3164\uffa0"
ZWJ = "\u200d"
EMOJI_MODIFIERS = "\ufe0f\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff"


def is_unsafe(character: str) -> bool:
    """The rule, stated from Unicode's categories: what must never reach a terminal."""
    return (
        unicodedata.category(character) in UNSAFE_CATEGORIES
        or character in HANGUL_FILLERS
        or 0xE0000 <= ord(character) <= 0xE007F
    )


def joins_emoji(text: str, index: int) -> bool:
    """True if the joiner at ``index`` sits between two emoji (the one unsafe character kept)."""
    before = text[index - 1] if index else ""
    after = text[index + 1 : index + 2]
    return (
        after != ""
        and unicodedata.category(after) == "So"
        and (before in EMOJI_MODIFIERS or (before != "" and unicodedata.category(before) == "So"))
    )


def assert_safe(cleaned: str, *, newlines_allowed: bool = False) -> None:
    for index, character in enumerate(cleaned):
        if character == "\n" and newlines_allowed:
            continue
        if character == ZWJ and joins_emoji(cleaned, index):
            continue
        assert not is_unsafe(character), f"U+{ord(character):04X} at {index} in {cleaned!r}"


# Text drawn from all of Unicode, and text crowded with the characters that matter here.
TRICKY = (
    "\t\n\r\x0b\x0c\x1b\x85\x7f\x9b\u00ad\u061c\u180e\u200b\u200c\u200d\u200e\u200f\u2028\u2029"
    "\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2066\u2067\u2068\u2069\ufeff\ufff9"
    "\u115f\u1160\u3164\uffa0\U000e0000\U000e0001\U000e0020\U000e0041\U000e007f\U000110bd\U0001d173"
    "\ud800\udfff\ue000\ufe0f\U0001f3fd\U0001f469\U0001f467\u2764\ufffd a\u00e9"
)
any_text = st.text(max_size=200) | st.text(alphabet=st.sampled_from(TRICKY), max_size=60)


@settings(deadline=None)
@given(text=any_text)
def test_sanitized_text_holds_no_unsafe_character_and_is_one_line(text):
    cleaned = protocol.sanitize_text(text)
    assert_safe(cleaned)
    assert len(cleaned.splitlines()) <= 1
    # Replaced one for one, so nothing vanishes unseen; only tabs widen.
    assert len(cleaned) == len(text) + 3 * text.count("\t")


@settings(deadline=None)
@given(text=any_text)
def test_keep_newlines_keeps_only_the_newlines(text):
    cleaned = protocol.sanitize_text(text, keep_newlines=True)
    assert_safe(cleaned, newlines_allowed=True)
    assert cleaned.count("\n") == text.count("\n")
    assert all(len(line.splitlines()) <= 1 for line in cleaned.split("\n"))


@settings(deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(
            categories=["L", "M", "N", "P", "S", "Zs", "Co"], exclude_characters=HANGUL_FILLERS + "\t"
        ),
        max_size=100,
    )
)
def test_text_without_unsafe_characters_is_left_alone(text):
    assert protocol.sanitize_text(text) == text


def test_every_code_point_is_judged_by_its_category():
    """All 1,114,112 code points at once: the import-time table misses none, wherever it lies."""
    everything = "".join(chr(code_point) for code_point in range(sys.maxunicode + 1) if chr(code_point) != ZWJ)
    cleaned = protocol.sanitize_text(everything.replace("\t", ""))
    expected = "".join("\ufffd" if is_unsafe(c) else c for c in everything.replace("\t", ""))
    assert cleaned == expected


@pytest.mark.parametrize(
    "character",
    [
        "\u200b",  # zero-width space
        "\u200c",  # zero-width non-joiner
        "\u200d",  # zero-width joiner, between letters
        "\u2060",  # word joiner
        "\ufeff",  # zero-width no-break space (BOM)
        "\u200e",  # left-to-right mark
        "\u200f",  # right-to-left mark
        "\u061c",  # Arabic letter mark
        "\u2028",  # line separator
        "\u2029",  # paragraph separator
        "\u202a",  # left-to-right embedding
        "\u202b",  # right-to-left embedding
        "\u202c",  # pop directional formatting
        "\u202d",  # left-to-right override
        "\u202e",  # right-to-left override
        "\u2066",  # left-to-right isolate
        "\u2067",  # right-to-left isolate
        "\u2068",  # first strong isolate
        "\u2069",  # pop directional isolate
        "\u115f",  # Hangul choseong filler
        "\u1160",  # Hangul jungseong filler
        "\u3164",  # Hangul filler
        "\uffa0",  # halfwidth Hangul filler
        "\U000e0000",  # a reserved tag code point
        "\U000e0001",  # language tag
        "\U000e0041",  # tag latin capital A
        "\U000e007f",  # cancel tag
        "\u00ad",  # soft hyphen
        "\ud800",  # a lone surrogate
        "\x1b",  # escape
        "\x85",  # next line (C1)
        "\r",
        "\n",
        "\x0b",
        "\x0c",
    ],
)
def test_each_listed_character_becomes_a_replacement_character(character):
    assert protocol.sanitize_text(f"a{character}b") == "a\ufffdb"


def test_newlines_stay_with_keep_newlines_but_nothing_else_does():
    assert protocol.sanitize_text("one\ntwo", keep_newlines=True) == "one\ntwo"
    assert protocol.sanitize_text("one\r\ntwo\u2028three\x85", keep_newlines=True) == "one\ufffd\ntwo\ufffdthree\ufffd"
    assert protocol.sanitize_text("a\tb", keep_newlines=True) == "a    b"


@pytest.mark.parametrize(
    "emoji",
    [
        "\U0001f469\u200d\U0001f469\u200d\U0001f467",  # family
        "\U0001f3f3\ufe0f\u200d\U0001f308",  # rainbow flag
        "\U0001f469\U0001f3fd\u200d\U0001f4bb",  # technologist, medium skin tone
        "\U0001f468\u200d\u2764\ufe0f\u200d\U0001f468",  # couple with heart
    ],
)
def test_a_joiner_inside_an_emoji_stays(emoji):
    assert protocol.sanitize_text(emoji) == emoji


def test_a_joiner_next_to_a_replaced_character_goes():
    assert protocol.sanitize_text("\u200c\u200d\u200c") == "\ufffd\ufffd\ufffd"
    assert protocol.sanitize_text("\U0001f469\u200d\u200d\U0001f469") == "\U0001f469\ufffd\ufffd\U0001f469"


# --------------------------------------------------------------------------- 2. the users file


def test_a_users_file_others_can_write_stops_the_server_in_one_line(tmp_path, users):
    users.chmod(0o666)
    result = run_program(SERVER, *server_args(users, tmp_path / "data"))
    assert result.returncode == 1
    assert_one_line_error(result, str(users), "-rw-rw-rw-", f"chmod 600 {users}")
    assert mode_of(users) == 0o666  # refused, not silently repaired: someone may have edited it


@pytest.mark.parametrize("command", ["users", "adduser", "deluser", "passwd"])
def test_admin_commands_refuse_a_users_file_others_can_write(users, command):
    users.chmod(0o620)
    before = users.read_bytes()
    args = [] if command == "users" else ["alice" if command != "adduser" else "bob"]
    result = run_program(SERVER, command, *args, "--users", str(users), stdin="a long new passphrase\n")
    assert_one_line_error(result, str(users), "chmod 600")
    assert users.read_bytes() == before


def test_a_users_file_others_can_read_is_made_private_and_the_server_starts(tmp_path, users, start_server):
    users.chmod(0o644)
    server = start_server(*server_args(users, tmp_path / "data"))
    assert mode_of(users) == 0o600
    status, stderr = server.stop()
    assert status == 0, stderr
    assert "readable by other users" in stderr
    assert "Traceback" not in stderr


def test_a_users_file_made_readable_while_the_server_runs_is_made_private_again(users):
    store = UserStore(users)
    assert store.names() == ["alice"]
    users.chmod(0o604)
    assert store.names() == ["alice"]
    assert mode_of(users) == 0o600


def test_a_users_file_another_user_owns_is_refused_in_one_line(tmp_path, users):
    """Its owner may rewrite it whatever its mode says (and make themselves an admin): it is not
    trusted, nor made private (which only its owner could do)."""
    if os.geteuid() != 0:
        pytest.skip("needs a file we do not own, which only root can make")
    os.chown(users, 65534, 65534)  # nobody
    users.chmod(0o644)
    result = run_program(SERVER, *server_args(users, tmp_path / "data"), prefix=unprivileged())
    assert result.returncode == 1
    assert_one_line_error(result, str(users), "belongs to another user (uid 65534)")
    assert mode_of(users) == 0o644


def test_the_shipped_users_file_is_made_private_when_loaded(tmp_path):
    shipped = tmp_path / "users.json"
    shutil.copy(ROOT / "users.json", shipped)
    shipped.chmod(0o644)  # as a checkout leaves it: git keeps only the executable bit
    assert "alice" in UserStore(shipped).names()
    assert mode_of(shipped) == 0o600


# What a killed adduser leaves: the process stops itself (SIGSTOP) just before renaming its
# temporary copy of the store into place, and the test kills it there with SIGKILL.
ADDUSER_STOPPED_BEFORE_RENAME = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
rename = os.replace
def stop_before_rename(source, target):
    os.kill(os.getpid(), signal.SIGSTOP)
    rename(source, target)
os.replace = stop_before_rename
sys.argv = [{server!r}, "adduser", "mallory", "--users", {users!r}]
runpy.run_path({server!r}, run_name="__main__")
"""


def orphans_of(users: Path) -> list[Path]:
    return sorted(users.parent.glob(f".{users.name}.*.tmp"))


def kill_adduser_before_rename(users: Path) -> Path:
    """Run adduser until it has written its temporary copy, kill -9 it there; returns the copy."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to see that the process has stopped")
    script = ADDUSER_STOPPED_BEFORE_RENAME.format(root=str(ROOT), server=SERVER, users=str(users))
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdin is not None
        process.stdin.write(b"a long mallory passphrase\n")
        process.stdin.close()
        wait_until(lambda: process_state(process.pid) == "T", timeout=TIMEOUT * 4)
        orphans = orphans_of(users)
        assert len(orphans) == 1
        assert b"mallory" in orphans[0].read_bytes()  # a full copy, every hash in it
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert "mallory" not in users.read_text()
    return orphans[0]


def test_the_next_adduser_removes_the_copy_a_killed_adduser_left(users):
    orphan = kill_adduser_before_rename(users)
    result = run_program(SERVER, "adduser", "bob", "--users", str(users), stdin="a long bob passphrase\n")
    assert result.returncode == 0, result.stderr
    assert not orphan.exists()
    assert orphans_of(users) == []
    assert UserStore(users).names() == ["alice", "bob"]


def test_the_server_start_removes_the_copy_a_killed_adduser_left(tmp_path, users, start_server):
    orphan = kill_adduser_before_rename(users)
    server = start_server(*server_args(users, tmp_path / "data"))
    assert not orphan.exists()
    status, stderr = server.stop()
    assert status == 0, stderr
    assert str(orphan) in stderr  # said in the log


def test_a_change_removes_orphans_but_never_a_copy_being_written(users):
    """Copies are written only under the lock, so one found with the lock held is an orphan."""
    store = UserStore(users)
    orphan = users.with_name(f".{users.name}.abc123.tmp")
    orphan.write_text("{}")
    unrelated = users.with_name(".other.json.abc123.tmp")
    unrelated.write_text("{}")
    store.delete("alice")
    assert not orphan.exists()
    assert unrelated.exists()


# --------------------------------------------------------------------------- 4. the login throttle


def test_an_account_under_attack_keeps_its_delay_when_one_off_failures_fill_the_table():
    throttle = LoginThrottle(free_failures=3, base_delay=60.0, max_entries=50)
    account = [("user", "alice")]
    for _ in range(5):
        throttle.record_failure(account)
    delay = throttle.retry_after(account)
    assert delay > 60
    for index in range(1000):
        throttle.record_failure([("address", f"10.0.{index // 256}.{index % 256}")])
    assert throttle.retry_after(account) == pytest.approx(delay, abs=5)
    assert len(throttle._failures) <= throttle.max_entries


def test_a_table_full_of_active_delays_still_stays_bounded():
    throttle = LoginThrottle(free_failures=0, base_delay=60.0, max_entries=20)
    for index in range(200):
        throttle.record_failure([("address", f"10.0.0.{index}")])
    assert len(throttle._failures) <= 20
    assert throttle.retry_after([("address", "10.0.0.199")]) > 0  # the newest is kept


def test_served_delays_go_before_delays_still_running():
    throttle = LoginThrottle(free_failures=1, base_delay=0.2, max_delay=1000.0, max_entries=4)
    target = [("user", "target")]
    for _ in range(10):
        throttle.record_failure(target)  # the oldest entry, and 0.2 * 2**9 s of delay
    served = [("address", "10.0.0.1"), ("address", "10.0.0.2")]
    throttle.record_failure(served)  # 0.2 s each
    time.sleep(0.3)
    throttle.record_failure([("address", "10.0.0.3")])  # the table is full now
    throttle.record_failure([("address", "10.0.0.4")])  # so this makes room
    assert throttle.retry_after(target) > 90
    assert not any(key in throttle._failures for key in served)


# --------------------------------------------------------------------------- 5. secret files


def test_a_secret_file_is_0600_whatever_the_umask(tmp_path):
    old_umask = os.umask(0)
    try:
        crypto_utils.write_secret_file(tmp_path / "secret", b"s" * 100_000)
    finally:
        os.umask(old_umask)
    assert mode_of(tmp_path / "secret") == 0o600
    assert (tmp_path / "secret").read_bytes() == b"s" * 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary file left


def test_an_existing_secret_file_is_never_overwritten(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"original")
    with pytest.raises(FileExistsError):
        crypto_utils.write_secret_file(path, b"replacement")
    assert path.read_bytes() == b"original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_a_failed_write_leaves_neither_the_secret_nor_a_temporary_file(tmp_path, monkeypatch):
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(crypto_utils.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        crypto_utils.write_secret_file(tmp_path / "secret", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_secret_file_never_links_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "secret").symlink_to(target)
    with pytest.raises(FileExistsError):
        crypto_utils.write_secret_file(tmp_path / "secret", b"data")
    assert not target.exists()


def test_starters_racing_to_create_the_secret_all_get_the_same_one(tmp_path):
    path = tmp_path / "token_secret"
    results: list[bytes] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        try:
            results.append(crypto_utils.load_or_create_secret(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1
    assert bytes.fromhex(path.read_text()) == results[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_secret"]


# --------------------------------------------------------------------------- 6. known_hosts


def test_known_hosts_others_can_write_is_refused_in_one_line(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text("[127.0.0.1]:7878 SHA256:forged\n")
    path.chmod(0o666)
    with pytest.raises(ChatError) as refused:
        KnownHosts(path).lookup("[127.0.0.1]:7878")
    message = str(refused.value)
    assert "\n" not in message
    assert str(path) in message and "-rw-rw-rw-" in message and f"chmod 600 {path}" in message
    with pytest.raises(ChatError, match="chmod 600"):
        KnownHosts(path).add("[127.0.0.1]:7879", "SHA256:new")
    assert path.read_text() == "[127.0.0.1]:7878 SHA256:forged\n"


def test_known_hosts_in_a_directory_we_cannot_write_is_a_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from securechat.client import ChatError, KnownHosts\n"
        f"try:\n    KnownHosts({str(locked / 'sub' / 'known_hosts')!r}).add('[h]:1', 'SHA256:x')\n"
        "except ChatError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [*unprivileged(), sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT * 4
    )
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1
    assert "cannot save the server's key" in result.stdout and "Permission denied" in result.stdout


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_batch_client(port: int, known_hosts: Path) -> subprocess.CompletedProcess:
    args = ["--host", "127.0.0.1", "--port", str(port), "--user", "a", "--known-hosts", str(known_hosts)]
    return run_program(CLIENT, *args, stdin="hello\n", env={"CHAT_PASSWORD": "x"})


def test_the_client_refuses_known_hosts_others_can_write(tmp_path, users, start_server):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    known_hosts.chmod(0o666)
    server = start_server(*server_args(users, tmp_path / "data"))
    result = run_batch_client(server.port, known_hosts)
    assert_one_line_error(result, str(known_hosts), "writable by other users", f"chmod 600 {known_hosts}")


def test_a_key_check_names_the_node_that_answered_when_it_is_not_the_first(tmp_path, users, start_server):
    """With several --server options the service's key is pinned under the first one's name, but the
    user is asked about (or warned of) a key another node showed: the message says which."""
    server = start_server(*server_args(users, tmp_path / "data"))
    known_hosts = tmp_path / "known_hosts"
    first = closed_port()
    args = ["--server", f"127.0.0.1:{first}", "--server", f"127.0.0.1:{server.port}", "--user", "a"]
    args += ["--known-hosts", str(known_hosts)]
    unknown = run_program(CLIENT, *args, stdin="hello\n", env={"CHAT_PASSWORD": "x"})
    assert_one_line_error(unknown, f"unknown server key for [127.0.0.1]:{first} (answered by 127.0.0.1:{server.port})")
    known_hosts.write_text(f"[127.0.0.1]:{first} SHA256:{'A' * 43}\n")
    known_hosts.chmod(0o600)
    changed = run_program(CLIENT, *args, stdin="hello\n", env={"CHAT_PASSWORD": "x"})
    assert_one_line_error(changed, f"KEY FOR [127.0.0.1]:{first} (answered by 127.0.0.1:{server.port}) HAS CHANGED")


def test_the_client_on_a_closed_port_with_bad_known_hosts_fails_in_one_line(tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    known_hosts.chmod(0o666)
    assert_one_line_error(run_batch_client(closed_port(), known_hosts))


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_the_client_refuses_a_port_out_of_range(tmp_path, port):
    """Not reduced modulo 65536 by the socket layer: 99999 would reach port 34463 while errors named 99999."""
    result = run_program(CLIENT, "--port", port, "--user", "a", stdin="", env={"CHAT_PASSWORD": "x"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"not a port (1 to 65535): '{port}'" in result.stderr


def test_ctrl_c_stops_a_batch_client_while_it_logs_in_without_a_traceback(tmp_path):
    """A server that accepts and never answers holds the login; SIGINT (Ctrl-C) stops the script in one line."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        args = ["--port", str(silent.getsockname()[1]), "--user", "a", "--known-hosts", str(tmp_path / "kh")]
        client = subprocess.Popen(
            [sys.executable, CLIENT, *args],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CHAT_PASSWORD": "x"},
        )
        try:
            connection, _ = silent.accept()  # its hello waits for an answer
            with connection:
                time.sleep(0.3)
                client.send_signal(signal.SIGINT)
                _, errors = client.communicate(timeout=TIMEOUT)
        finally:
            client.kill()
            client.wait()
    assert client.returncode == 130, errors
    assert errors.strip() == "error: interrupted", errors


# --------------------------------------------------------------------------- 7. start-up errors


def test_a_data_dir_that_is_a_file_is_named(tmp_path, users):
    data = tmp_path / "data"
    data.write_text("not a directory")
    result = run_program(SERVER, *server_args(users, data))
    assert result.returncode == 1
    assert_one_line_error(result, f"error: the data directory {data} is not a directory")


def test_a_data_dir_under_a_file_is_named(tmp_path, users):
    data = tmp_path / "file" / "data"
    data.parent.write_text("")
    result = run_program(SERVER, *server_args(users, data))
    assert result.returncode == 1
    assert_one_line_error(result, f"error: cannot create the data directory {data}", "not a directory")


def test_a_data_dir_we_cannot_create_is_named(tmp_path, users):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    data = locked / "data"
    result = run_program(SERVER, *server_args(users, data), prefix=unprivileged())
    assert result.returncode == 1
    assert_one_line_error(result, f"error: cannot create the data directory {data}", "Permission denied")


def test_a_data_dir_we_cannot_read_is_named(tmp_path, users):
    data = tmp_path / "data"
    data.mkdir(mode=0o000)
    result = run_program(SERVER, *server_args(users, data), prefix=unprivileged())
    assert result.returncode == 1
    assert_one_line_error(result, f"error: cannot read the data directory {data}", "Permission denied")


def test_a_full_disk_at_first_start_names_the_data_directory(tmp_path, users):
    """The first start writes server_key.pem; on a full disk, os.write's error names no file, and
    the operator used to read "cannot listen on 127.0.0.1:0: No space left on device". Here the
    disk is full for crypto_utils' writes alone, in a child process running the real server
    program (a full 600 KiB tmpfs did the same, but needs root to mount)."""
    data = tmp_path / "data"
    bootstrap = (
        "import errno, os, sys, types\n"
        "import securechat.crypto_utils as cu\n"
        "def full(fd, data):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "cu.os = types.SimpleNamespace(**{**vars(os), 'write': full})\n"
        "from securechat.server_cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["--host", "127.0.0.1", "--port", "0", "--users", str(users), "--data-dir", str(data)]
    result = subprocess.run(
        [sys.executable, "-c", bootstrap, *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT * 4
    )
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error == f"error: the data directory {data}: No space left on device ({data / 'server_key.pem'})"


def test_a_users_file_with_no_accounts_is_said_at_start(tmp_path):
    """A mistyped --users path starts an empty store: every login would fail with no word why. The
    command it suggests adds the account where this server reads it (it said 'server.py adduser NAME',
    which the systemd unit's operator ran, and the account went to the default store)."""
    typo = tmp_path / "user.json"
    server = ServerProcess(server_args(typo, tmp_path / "data"))
    _, errors = server.stop()
    assert f"WARNING there are no accounts in {typo}: add one with 'server.py adduser NAME --users {typo}'" in errors


def test_a_port_in_use_is_named(tmp_path, users):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = server_args(users, tmp_path / "data")
        args[args.index("--port") + 1] = str(port)
        result = run_program(SERVER, *args)
    assert result.returncode == 1
    assert_one_line_error(result, f"error: port {port} is already in use")


@pytest.mark.parametrize("host", ["999.1.1.1", "no such host.invalid"])
def test_a_bad_host_address_is_named(tmp_path, users, host):
    args = server_args(users, tmp_path / "data")
    args[args.index("--host") + 1] = host
    result = run_program(SERVER, *args)
    assert result.returncode == 1
    assert_one_line_error(result, f"error: bad host address {host!r}")


def test_an_address_of_another_machine_is_named(tmp_path, users):
    args = server_args(users, tmp_path / "data")
    args[args.index("--host") + 1] = "192.0.2.1"  # TEST-NET-1: never one of ours
    result = run_program(SERVER, *args)
    assert result.returncode == 1
    assert_one_line_error(result, "error: cannot listen on 192.0.2.1: it is not an address of this machine")


def test_a_port_out_of_range_is_named(tmp_path, users):
    args = server_args(users, tmp_path / "data")
    args[args.index("--port") + 1] = "70000"
    result = run_program(SERVER, *args)
    assert result.returncode == 2  # a configuration error, as in a configuration file
    assert_one_line_error(result, "error: --port 70000: must be from 0 to 65535")


def test_per_address_limits_count_an_ipv6_host_by_its_64():
    from securechat.ratelimit import address_bucket

    assert address_bucket("2001:db8:1:2:aaaa::1") == address_bucket("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert address_bucket("2001:db8:1:3::1") != address_bucket("2001:db8:1:2::1")
    assert address_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_bucket("192.0.2.7") == "192.0.2.7"


def test_demo_accounts_are_refused_to_a_peer_that_is_not_on_this_machine(make_server):
    from types import SimpleNamespace

    from securechat.accounts import UserRecord
    from securechat.connection import AuthenticationFailed

    server = make_server()  # listening on loopback
    demo = UserRecord(name="alice", password_hash="unused", demo=True)
    server._refuse_demo_account(SimpleNamespace(address="127.0.0.1", peer="127.0.0.1:5000"), demo)
    # A tunnel or a proxy on this machine can make a far peer reach a loopback server.
    with pytest.raises(AuthenticationFailed) as refused:
        server._refuse_demo_account(SimpleNamespace(address="192.0.2.7", peer="192.0.2.7:5000"), demo)
    assert refused.value.code == "demo_disabled"


def test_guesses_from_another_address_do_not_keep_the_real_user_out(connect):
    guesses = []
    for _ in range(8):  # far past the free failures of one (account, address)
        with pytest.raises(LoginRefused) as refused:
            connect("alice", password="not alices password", source_address=("127.0.0.2", 0))
        guesses.append(refused.value.code)
    assert "rate_limited" in guesses  # the guesser is slowed down...
    alice = connect("alice")  # ...and alice, from her own address, logs in at once
    assert alice.connected


def test_parallel_guesses_from_one_address_are_hashed_a_few_at_a_time(make_server, connect, monkeypatch):
    # 17 guesses at 17 accounts at once were all hashed at once; now an address has 3 hashing slots.
    from securechat import listener

    server = make_server(hash_workers=8)
    running, peak = [0], [0]
    count_lock = threading.Lock()
    real_verify = listener.verify_password

    def counting_verify(password: str, stored_hash: str) -> bool:
        with count_lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)  # long enough for the others to pile up behind
            return real_verify(password, stored_hash)
        finally:
            with count_lock:
                running[0] -= 1

    monkeypatch.setattr(listener, "verify_password", counting_verify)
    results = []

    def guess(index: int) -> None:
        try:
            connect(USER_NAMES[index % len(USER_NAMES)], to=server, password=f"guess {index}")
        except LoginRefused as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=guess, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 3, f"{peak[0]} hashed at once for one address"
    assert set(results) <= {"auth_failed", "rate_limited"} and len(results) == 12
    assert server._hashing_per_address == {}  # every slot given back


def test_a_burst_of_guesses_at_many_names_from_one_address_gets_no_more_checked_than_one_after_another(
    make_server, connect
):
    """A sprayer fired ten guesses at ten names at once: the address's delay was checked as each
    began and counted only once its hash had failed, so all ten were checked (the same ten one
    after another: three, then a delay). At the delay's ceiling that was ten guesses a period
    instead of one."""
    from test_hostile import RawPeer, spare_key

    from securechat.channel import read_frame
    from securechat.protocol import ErrorReply, FrameType, decode_control

    def outcome(peer: RawPeer) -> str:
        frame_type, body = read_frame(peer.sock)
        if frame_type is FrameType.CONTROL:
            return str(decode_control(body).get("code"))
        answer = peer.channel.open(body)
        assert isinstance(answer, ErrorReply), answer
        return answer.code

    def burst(server, names: list[str]) -> list[str]:
        peers = [RawPeer(server, private_key=spare_key(f"sprayer {index}")) for index in range(len(names))]
        try:
            for peer in peers:
                peer.hello()
            frames = [peer.login_frame(name, "Winter2026!") for peer, name in zip(peers, names, strict=True)]
            start = threading.Barrier(len(peers))

            def send(peer: RawPeer, frame: bytes) -> None:
                start.wait()
                peer.sock.sendall(frame)

            senders = [threading.Thread(target=send, args=pair) for pair in zip(peers, frames, strict=True)]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join()
            return [outcome(peer) for peer in peers]
        finally:
            for peer in peers:
                peer.close()

    server = make_server()
    outcomes = burst(server, [f"nobody{index}" for index in range(10)])  # unknown names cost as wrong passwords
    assert set(outcomes) <= {"auth_failed", "rate_limited"}, outcomes
    assert outcomes.count("auth_failed") == server.login_throttle.free_failures, outcomes
    assert server._hashing_per_address == {}
    alice = connect("alice", to=server, source_address=("127.0.0.2", 0))  # from elsewhere: not held up
    assert alice.connected


def test_six_bots_of_one_account_started_at_once_from_one_machine_all_log_in(make_server, connect, tmp_path):
    """A cron job starts six batch clients of one account at the same moment. Each login was counted
    as a failure of (account, address) until it succeeded, so the fourth found three "failures" and
    was refused "too many failed logins", though no password was wrong."""
    server = make_server(hash_workers=4, max_sessions=6)
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def bot(index: int) -> None:
        start.wait()
        try:
            client = connect("alice", to=server, known_hosts=KnownHosts(tmp_path / f"bot{index}"))
            outcomes.append("in" if client.connected else "not connected")
        except LoginRefused as exc:
            outcomes.append(f"{exc.code}: {exc}")

    bots = [threading.Thread(target=bot, args=(index,)) for index in range(6)]
    for thread in bots:
        thread.start()
    for thread in bots:
        thread.join(TIMEOUT * 4)
    assert outcomes == ["in"] * 6, outcomes


def test_a_server_full_of_idle_connections_still_admits_an_honest_login(make_server, tmp_path):
    # With --max-clients 60, 57 idle connections re-opened in a loop kept 10 of 10 logins out.
    server = make_server(max_clients=12, max_connections_per_address=12, connect_rate=0)
    stop = threading.Event()
    idle: list[socket.socket] = []

    def hold_the_door() -> None:  # from 127.0.0.2, re-opening whatever the server drops
        while not stop.is_set():
            try:
                idle.append(socket.create_connection(server.address, timeout=1, source_address=("127.0.0.2", 0)))
            except OSError:
                pass
            time.sleep(0.005)

    attacker = threading.Thread(target=hold_the_door)
    attacker.start()
    try:
        # Before, they filled all 12 places; now they may hold half (6), evicting their own oldest.
        wait_until(lambda: len(server.connections) >= 6)
        started = time.monotonic()
        client = ChatClient(
            *server.address,
            server_fingerprint=server.fingerprint,
            known_hosts=KnownHosts(tmp_path / "kh"),
            timeout=TIMEOUT * 2,
        )
        try:
            client.login("alice", "alice-pass-5")
            assert client.connected
        finally:
            client.close()
        assert time.monotonic() - started < TIMEOUT
    finally:
        stop.set()
        attacker.join()
        for sock in idle:
            sock.close()


def test_a_revocation_that_cannot_be_saved_is_said_loudly_and_the_session_still_ends(server, connect, caplog):
    alice = connect("alice")
    journal = server.tokens.revoked_path
    if journal.exists():
        journal.unlink()
    journal.mkdir()  # the journal cannot be written now (a full or failing disk acts alike)
    try:
        with caplog.at_level("ERROR", logger="chat.accounts"):
            alice.leave("see you")
        goodbyes = [event for event in drain(alice) if type(event).__name__ == "Goodbye"]
        assert not alice.connected
        assert goodbyes and "could not record" in goodbyes[0].reason
        assert "cannot save revoked sessions" in caplog.text
    finally:
        journal.rmdir()


def test_the_journal_is_kept_whole_across_a_compaction(tmp_path, monkeypatch):
    from securechat import accounts
    from securechat.accounts import TokenAuthority, TokenClaims

    monkeypatch.setattr(accounts, "MIN_JOURNAL_LINES", 3)
    path = tmp_path / "revoked"
    authority = TokenAuthority(b"k" * 32, revoked_path=path)
    for index in range(10):  # enough to compact several times
        assert authority.revoke(TokenClaims("alice", 0, 0, f"jti{index}", "kt", "", f"session-{index}"))
    reloaded = TokenAuthority(b"k" * 32, revoked_path=path)
    assert all(reloaded.is_revoked(f"session-{index}") for index in range(10))


# --------------------------------------------------------------------------- malloc arenas (issue 15, item 9)


class FakeMallopt:
    """Stands in for glibc's ``mallopt``: records its calls, says yes."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


def test_the_server_limits_malloc_arenas_unless_malloc_arena_max_chose(monkeypatch):
    from securechat import server_cli

    mallopt = FakeMallopt()
    monkeypatch.setattr(server_cli.ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=mallopt))
    monkeypatch.setattr(server_cli.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert "at most 1" in server_cli.limit_malloc_arenas()
    assert mallopt.calls == [(server_cli.M_ARENA_MAX, 1)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the operator's choice stands
    assert "MALLOC_ARENA_MAX='4' from the environment" in server_cli.limit_malloc_arenas()
    assert len(mallopt.calls) == 1


def test_the_server_says_at_start_how_many_malloc_arenas_it_uses(server_process):
    _, log = server_process("--log-level", "DEBUG").stop()
    if "MALLOC_ARENA_MAX" in os.environ:
        assert "from the environment" in log
    elif platform.libc_ver()[0] == "glibc":
        assert "malloc arenas: at most 1" in log
    else:
        assert "malloc arenas: left to the C library" in log


def core_file_limit(pid: int) -> str:
    """The "Max core file size" row of ``/proc/PID/limits``: its soft and hard limits."""
    for row in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if row.startswith("Max core file size"):
            return " ".join(row.split()[4:6])
    raise AssertionError(f"no core file limit for process {pid}")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits (Linux)")
def test_the_server_writes_no_core_file_of_its_secrets_if_it_crashes(server_process):
    """A core file holds the process's memory: the server's private key, the token secret, the history key."""
    server = server_process()
    assert core_file_limit(server.process.pid) == "0 0", "a crash of the server would write its memory to disk"


# --------------------------------------------------------------------------- device tokens (issue 15, item 2)


def device_client(server, tmp_path: Path, device: str, source: str = "127.0.0.1", **options) -> ChatClient:
    """A client of one device, as the terminal client is: its known_hosts file, and so its device tokens,
    in ``tmp_path/device`` (the server's key pinned there in advance)."""
    known_hosts = KnownHosts(tmp_path / device / "known_hosts")
    if known_hosts.lookup(KnownHosts.host_id(*server.address)) is None:
        known_hosts.add(KnownHosts.host_id(*server.address), server.fingerprint)
    return ChatClient(
        *server.address, known_hosts=known_hosts, source_address=(source, 0), timeout=TIMEOUT * 2, **options
    )


def login_outcome(client: ChatClient, name: str, password: str) -> str:
    """ "ok", or the code of the refusal; the client is closed either way."""
    try:
        client.login(name, password)
    except LoginRefused as exc:
        return exc.code
    finally:
        client.close()
    return "ok"


def test_a_device_that_logged_in_before_skips_the_account_wide_delay(make_server, tmp_path):
    server = make_server(account_throttle=LoginThrottle(free_failures=2, base_delay=60.0, max_delay=60.0))
    assert login_outcome(device_client(server, tmp_path, "laptop"), "alice", "alice-pass-5") == "ok"
    tokens = tmp_path / "laptop" / "device_tokens"  # beside known_hosts, the owner's alone
    (saved,) = tokens.iterdir()
    assert mode_of(tokens) == 0o700 and mode_of(saved) == 0o600
    guesser = device_client(server, tmp_path, "guesser", source="127.0.0.2")
    guesses = [login_outcome(guesser, "alice", "not alices password") for _ in range(3)]
    assert guesses == ["auth_failed", "auth_failed", "rate_limited"]  # the account-wide delay is on
    # A device the server does not know waits it out, even on alice's own address...
    assert login_outcome(device_client(server, tmp_path, "new phone"), "alice", "alice-pass-5") == "rate_limited"
    # ...the laptop, which logged in before, does not, whatever the case its user types the name in.
    assert login_outcome(device_client(server, tmp_path, "laptop"), "Alice", "alice-pass-5") == "ok"


def test_a_device_token_does_not_skip_the_delay_on_its_own_address(server, tmp_path):
    assert login_outcome(device_client(server, tmp_path, "laptop"), "alice", "alice-pass-5") == "ok"
    typos = [login_outcome(device_client(server, tmp_path, "laptop"), "alice", "typo") for _ in range(4)]
    assert typos == ["auth_failed"] * 3 + ["rate_limited"]


def test_a_stolen_device_token_guesses_no_faster_from_many_addresses(server, tmp_path):
    from securechat.client import DeviceTokens

    assert login_outcome(device_client(server, tmp_path, "laptop"), "alice", "alice-pass-5") == "ok"
    stolen = DeviceTokens(tmp_path / "laptop" / "device_tokens")
    guesses = [
        login_outcome(device_client(server, tmp_path, f"thief {n}", f"127.0.0.{n}", device_tokens=stolen), "alice", "x")
        for n in range(3, 7)  # a fresh address each time: only the token's own count can slow it
    ]
    assert guesses == ["auth_failed"] * 3 + ["rate_limited"]


def test_a_device_token_file_others_can_read_is_not_sent(tmp_path):
    from securechat.client import DeviceTokens

    store = DeviceTokens(tmp_path / "device_tokens")
    assert store.save("[127.0.0.1]:7878", "alice", "the-token")
    assert store.lookup("[127.0.0.1]:7878", "alice") == "the-token"
    assert store.lookup("[127.0.0.1]:7878", "bob") == "" and store.lookup("[127.0.0.1]:7879", "alice") == ""
    (saved,) = store.directory.iterdir()
    saved.chmod(0o640)
    assert store.lookup("[127.0.0.1]:7878", "alice") == ""


def test_device_tokens_are_neither_kept_nor_read_in_a_folder_others_may_write(tmp_path):
    # --known-hosts /tmp/x puts them in /tmp/device_tokens: a folder another user may have made there,
    # and whose files that user may swap.
    from securechat.client import DeviceTokens

    shared = tmp_path / "device_tokens"
    store = DeviceTokens(shared)
    assert store.save("[127.0.0.1]:7878", "alice", "the-token")
    shared.chmod(0o777)
    assert store.lookup("[127.0.0.1]:7878", "alice") == "", "a token read from a folder anyone may write"
    assert not store.save("[127.0.0.1]:7878", "alice", "another"), "a token kept in a folder anyone may write"
    shared.chmod(0o700)
    assert store.lookup("[127.0.0.1]:7878", "alice") == "the-token"
