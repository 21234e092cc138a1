"""Account administration and start-up checks, through the real program.

Every test runs ``python server.py ...`` as a child process, the way an
operator would: the password comes as one line of stdin, errors must be one
line on stderr (no traceback) with a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TIMEOUT, password_of

from securechat import crypto_utils
from securechat.accounts import UserStore, verify_password
from securechat.client import ChatClient, KnownHosts, LoginRefused

SERVER = str(ROOT / "server.py")


def run_server_py(*args: str, password: str | None = None) -> subprocess.CompletedProcess:
    """``python server.py ARGS`` with ``password`` (one line) on stdin; killed if it outlives the timeout."""
    return subprocess.run(
        [sys.executable, SERVER, *args],
        input="" if password is None else password + "\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )


def admin(command: str, *args: str, users, password: str | None = None) -> subprocess.CompletedProcess:
    return run_server_py(command, *args, "--users", str(users), password=password)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def users(tmp_path):
    return tmp_path / "users.json"


# --------------------------------------------------------------------------- the four commands


def test_adduser_users_passwd_deluser(users):
    added = admin("adduser", "alice", users=users, password="alice-first-password")
    assert (added.returncode, added.stdout.strip(), added.stderr) == (0, "added alice", "")
    assert admin("adduser", "bob", users=users, password="bob-password").returncode == 0

    listed = admin("users", users=users)
    assert (listed.returncode, listed.stdout.split()) == (0, ["alice", "bob"])

    changed = admin("passwd", "alice", users=users, password="alice-second-password")
    assert (changed.returncode, changed.stdout.strip()) == (0, "password changed for alice")
    alice = UserStore(users).get("alice")
    assert verify_password("alice-second-password", alice.password_hash)
    assert not verify_password("alice-first-password", alice.password_hash)

    deleted = admin("deluser", "bob", users=users)
    assert (deleted.returncode, deleted.stdout.strip(), deleted.stderr) == (0, "deleted bob", "")
    assert admin("users", users=users).stdout.split() == ["alice"]
    # The last admin may go (the command line can always make another), but not without a word.
    assert admin("role", "alice", "admin", users=users).returncode == 0
    deleted = admin("deluser", "alice", users=users)
    assert (deleted.returncode, deleted.stdout.strip()) == (0, "deleted alice")
    assert deleted.stderr == "note: no admin is left: make one with 'server.py role NAME admin'\n"


def test_users_on_an_absent_file_lists_nobody(users):
    listed = admin("users", users=users)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", "")


def test_adduser_writes_a_0600_file_without_the_password_in_clear(users):
    assert admin("adduser", "alice", users=users, password="Tr0ub4dor&3-clear").returncode == 0
    assert mode_of(users) == 0o600
    text = users.read_text()
    assert "Tr0ub4dor" not in text
    entry = json.loads(text)["users"]["alice"]
    assert entry["password_hash"].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert sorted(p.name for p in users.parent.iterdir()) == [".users.json.lock", "users.json"]


@pytest.mark.parametrize("name", ["alice", "ALICE", "Alice"])
def test_adduser_of_a_taken_name_fails_in_one_line(users, name):
    assert admin("adduser", "alice", users=users, password="plum orchard one").returncode == 0
    before = users.read_bytes()
    result = admin("adduser", name, users=users, password="pw-two")
    assert result.returncode == 1
    assert_one_line_error(result, "already exists")
    assert users.read_bytes() == before


@pytest.mark.parametrize("name", ["bad name", "_x", "a" * 33, "ünï", "x;rm"])
def test_adduser_of_an_invalid_name_fails_in_one_line(users, name):
    result = admin("adduser", name, users=users, password="pw")
    assert result.returncode == 1
    assert_one_line_error(result, "user names are")
    assert not users.exists()


def test_adduser_with_an_empty_password_fails(users):
    result = admin("adduser", "alice", users=users, password="")
    assert result.returncode == 1
    assert_one_line_error(result, "password is empty")
    assert not users.exists()


def test_deluser_of_an_unknown_name_fails_in_one_line(users):
    assert admin("adduser", "alice", users=users, password="plum orchard two").returncode == 0
    before = users.read_bytes()
    result = admin("deluser", "nobody", users=users)
    assert result.returncode == 1
    assert_one_line_error(result, "nobody", str(users))
    assert users.read_bytes() == before


def test_passwd_of_an_unknown_name_fails_in_one_line(users):
    result = admin("passwd", "nobody", users=users, password="pw")
    assert result.returncode == 1
    assert_one_line_error(result, "nobody")


CORRUPT_CONTENTS = {
    "syntax": b"{not json",
    "list": b"[]",
    "bad-entry": b'{"users": {"alice": 1}}',
    "not-utf8": b"\xff\xfe garbage",
}


@pytest.mark.parametrize("content", CORRUPT_CONTENTS.values(), ids=CORRUPT_CONTENTS.keys())
def test_users_on_a_corrupt_file_gives_one_line_naming_it(users, content):
    users.write_bytes(content)
    result = admin("users", users=users)
    assert_one_line_error(result, str(users))
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["adduser", "deluser", "passwd"])
def test_changes_to_a_corrupt_file_fail_in_one_line_and_leave_it_alone(users, command):
    users.write_bytes(CORRUPT_CONTENTS["syntax"])
    result = admin(command, "zoe", users=users, password="pw")
    assert_one_line_error(result, str(users))
    assert users.read_bytes() == CORRUPT_CONTENTS["syntax"]


def test_concurrent_adduser_processes_lose_no_account(users):
    names = [f"user{index}" for index in range(8)]
    processes = [
        subprocess.Popen(
            [sys.executable, SERVER, "adduser", name, "--users", str(users)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    results = []
    try:
        for process in processes:
            _, stderr = process.communicate(f"{process.args[3]}-password\n", timeout=TIMEOUT * 4)
            results.append((process.returncode, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert results == [(0, "")] * len(names)
    assert admin("users", users=users).stdout.split() == names


# --------------------------------------------------------------------------- starting the server


def start_server(users, data_dir) -> subprocess.CompletedProcess:
    """Run the server expecting it to refuse to start (a server that does start is killed at the timeout)."""
    return run_server_py("--port", "0", "--users", str(users), "--data-dir", str(data_dir))


def test_the_server_refuses_a_corrupt_users_file(tmp_path, users):
    users.write_text('{"format": 1, "users": {"alice": ')
    try:
        result = start_server(users, tmp_path / "data")
    except subprocess.TimeoutExpired:
        pytest.fail("the server started on a corrupt users file")
    assert_one_line_error(result, str(users))
    assert "Listening" not in result.stdout


@pytest.mark.parametrize(
    ("secret_file", "mode"), [("server_key.pem", 0o644), ("token_secret", 0o644), ("server_key.pem", 0o640)]
)
def test_the_server_refuses_a_secret_file_others_can_read(tmp_path, users_file, secret_file, mode):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    crypto_utils.load_or_create_private_key(data_dir / "server_key.pem")
    crypto_utils.load_or_create_secret(data_dir / "token_secret")
    (data_dir / secret_file).chmod(mode)
    try:
        result = start_server(users_file, data_dir)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server started with {secret_file} at mode {mode:o}")
    path = data_dir / secret_file
    assert_one_line_error(result, str(path), f"chmod 600 {path}")
    assert "Listening" not in result.stdout


def test_the_server_creates_its_data_dir_0700_and_its_secrets_0600(tmp_path, server_process):
    server = server_process()
    data_dir = tmp_path / "data"
    assert mode_of(data_dir) == 0o700
    names = {p.name for p in data_dir.iterdir()}
    made = {"server_key.pem", "token_secret", "history_key", "history.sqlite3"}
    # SQLite's write-ahead log and its index exist while the database is open.
    assert made <= names <= made | {"history.sqlite3-wal", "history.sqlite3-shm"}
    for path in data_dir.iterdir():
        assert mode_of(path) == 0o600, path
    status, stderr = server.stop()
    assert status == 0, stderr
    assert "Traceback" not in stderr


def test_an_account_added_while_the_server_runs_can_log_in_at_once(tmp_path, users_file, server_process):
    server = server_process("--handshake-timeout", "2")
    assert admin("adduser", "frank", users=users_file, password="frank-password").returncode == 0
    client = ChatClient(
        "127.0.0.1",
        server.port,
        server_fingerprint=server.fingerprint,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        timeout=TIMEOUT * 2,
    )
    try:
        welcome = client.login("frank", "frank-password")
        assert welcome.username == "frank"
    finally:
        client.close()


def test_a_password_changed_while_the_server_runs_takes_effect_at_once(tmp_path, users_file, server_process):
    server = server_process("--handshake-timeout", "2")
    assert admin("passwd", "alice", users=users_file, password="alice-new-password").returncode == 0
    known_hosts = KnownHosts(tmp_path / "known_hosts")
    old = ChatClient(
        "127.0.0.1", server.port, server_fingerprint=server.fingerprint, known_hosts=known_hosts, timeout=TIMEOUT * 2
    )
    try:
        with pytest.raises(LoginRefused):
            old.login("alice", password_of("alice"))
    finally:
        old.close()
    new = ChatClient(
        "127.0.0.1", server.port, server_fingerprint=server.fingerprint, known_hosts=known_hosts, timeout=TIMEOUT * 2
    )
    try:
        assert new.login("alice", "alice-new-password").username == "alice"
    finally:
        new.close()


def test_the_server_refuses_a_data_directory_others_can_write(tmp_path, users_file, server_process):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    with pytest.raises(RuntimeError, match=r"writable by other users.*chmod 700"):
        server_process()


def test_a_corrupt_history_database_stops_the_server_in_one_line_and_is_left_as_it_was(tmp_path, users):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    database = data_dir / "history.sqlite3"
    database.write_bytes(b"this is not a database, but someone's data" * 100)
    database.chmod(0o600)
    before = database.read_bytes()
    try:
        result = start_server(users, data_dir)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started on a corrupt history database")
    assert_one_line_error(result, str(database))
    assert "Listening" not in result.stdout
    assert database.read_bytes() == before


def test_a_bad_default_room_stops_the_server_in_one_line(tmp_path, users):
    result = run_server_py(
        "--port", "0", "--users", str(users), "--data-dir", str(tmp_path / "data"), "--default-room", "no spaces!"
    )
    assert_one_line_error(result, "--default-room", "room names are")


def test_the_installed_program_adds_the_first_account_before_the_server_ever_started(tmp_path):
    """`pip install .`, then `echo pw | chat-server adduser dana` said "error: ~/.local/share/securechat/
    .users.json.lock: cannot lock: No such file or directory": the folder README names as the store is
    made by the server's first start."""
    import os
    import shutil

    site, home = tmp_path / "site", tmp_path / "home"
    shutil.copytree(ROOT / "securechat", site / "securechat", ignore=shutil.ignore_patterns("__pycache__"))
    home.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "XDG_DATA_HOME"}
    environment.update(PYTHONPATH=str(site), HOME=str(home))  # installed: no server.py beside the package
    chat_server = [sys.executable, "-c", "import sys; from securechat.server_cli import main; sys.exit(main())"]

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*chat_server, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 6,
            env=environment,
            cwd=tmp_path,  # not the checkout, whose securechat `python -c` would import first
        )

    added = run("adduser", "dana", stdin="dana-first-password-42\n")
    assert (added.returncode, added.stdout.strip()) == (0, "added dana"), added.stderr
    assert run("users").stdout.split() == ["dana"]
    store = home / ".local" / "share" / "securechat"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    missing = run("adduser", "erin", "--users", str(tmp_path / "typo" / "users.json"), stdin="erin-password-42\n")
    assert missing.returncode == 1 and "typo: no such folder" in missing.stderr, missing.stderr


def installed_chat_server(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """What ``pip install .`` lays out: the package in site-packages (no server.py beside it)
    and a ``chat-server`` script; returns its command line and environment."""
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "securechat", site / "securechat", ignore=shutil.ignore_patterns("__pycache__"))
    script = tmp_path / "bin" / "chat-server"
    script.parent.mkdir()
    script.write_text("import sys\nfrom securechat.server_cli import main\nsys.exit(main())\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("XDG_DATA_HOME", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), HOME=str(home))
    return [sys.executable, str(script)], env


def test_the_installed_account_commands_name_the_users_file_they_really_use(tmp_path):
    """Installed (``pip install .``), the server keeps its users in ~/.local/share/securechat/
    (README). ``chat-server adduser --help`` says ``--users FILE  the user store (default:
    users.json beside server.py)``: there is no server.py, and the default is elsewhere."""
    command, env = installed_chat_server(tmp_path)
    shown = subprocess.run([*command, "adduser", "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "beside server.py" not in text, text
    expected = str(tmp_path / "home" / ".local" / "share" / "securechat" / "users.json")
    assert expected in "".join(shown.stdout.split()), text


def test_the_installed_server_help_names_the_installed_program(tmp_path):
    """``chat-server --help`` ends "Accounts: server.py adduser NAME | deluser NAME ...": a user of
    the installed program has no server.py to run (``chat-server adduser NAME`` is the command,
    as the server's own warning there says)."""
    command, env = installed_chat_server(tmp_path)
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert "server.py" not in shown.stdout, shown.stdout


def test_a_user_store_in_a_folder_that_does_not_exist_is_refused_at_start(tmp_path):
    """`python server.py --users /srv/chta/users.json` (a typo in the folder) started, listened, and
    warned "there are no accounts in /srv/chta/users.json: add one with 'server.py adduser NAME --users
    /srv/chta/users.json'". Run as suggested, that command failed: "/srv/chta: no such folder"."""
    users = tmp_path / "missing-folder" / "users.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--port", "0", "--users", str(users), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert (result.returncode, result.stderr) == (
        1,
        f"error: {users.parent}: no such folder, to keep users.json in (--users)\n",
    ), result
