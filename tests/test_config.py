"""The configuration file: ``--config FILE``, ``--print-config`` and the sample ``chat.toml``.

The file's keys, types and checks come from the same fields as the command-line options,
so these tests hold the three (options, file, sample) to one another.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tomllib
from dataclasses import MISSING
from pathlib import Path

import pytest
from conftest import ROOT, TIMEOUT, ServerProcess, password_of
from test_hardening import unprivileged

from securechat import crypto_utils
from securechat.client import ChatClient, KnownHosts
from securechat.config import (
    ConfigFileError,
    ServerConfig,
    config_to_toml,
    option_default,
    option_dest,
    option_fields,
    option_key,
    option_problem,
    read_config_file,
    toml_value,
)

SERVER = str(ROOT / "server.py")
SAMPLE = ROOT / "chat.toml"
OPTION_KEYS = [option_key(spec) for spec in option_fields()]


def run_server_py(*args: str, cwd: Path = ROOT, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python server.py ARGS`` to its end (every call here should end without serving)."""
    return subprocess.run(
        [*prefix, sys.executable, SERVER, *args], capture_output=True, text=True, timeout=TIMEOUT * 4, cwd=cwd
    )


def printed_config(*args: str, cwd: Path = ROOT) -> dict:
    """The options ``server.py ARGS --print-config`` prints, parsed as TOML."""
    result = run_server_py(*args, "--print-config", cwd=cwd)
    assert (result.returncode, result.stderr) == (0, ""), result
    return tomllib.loads(result.stdout)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- reading a file


def test_every_option_can_be_set_in_a_file(tmp_path):
    changed = {
        "host": "::1",
        "port": 9999,
        "users": Path("/srv/chat/users.json"),
        "data-dir": Path("/srv/chat/data"),
        "key-size": 3072,
        "log-level": "WARNING",
        "allow-demo-accounts": True,
        "default-room": "#hall",
        "backend": "redis://redis.internal:6379/2",
        "workers": "auto",
    }
    for spec in option_fields():
        if option_key(spec) not in changed:  # a number: one more than its default
            changed[option_key(spec)] = option_default(spec) + 1
    lines = [f"{key} = {toml_value(value)}" for key, value in changed.items()]
    values = read_config_file(write(tmp_path / "all.toml", "\n".join(lines)))
    assert values == {option_dest(spec): changed[option_key(spec)] for spec in option_fields()}


def test_an_integer_will_do_for_a_number_and_is_read_as_one(tmp_path):
    values = read_config_file(write(tmp_path / "chat.toml", "flood-rate = 3\nhistory-days = 7\n"))
    assert values == {"flood_rate": 3.0, "history_days": 7.0}
    assert all(isinstance(value, float) for value in values.values())


def test_workers_is_written_as_on_the_command_line_a_number_or_auto(tmp_path):
    # `--workers 2` is `workers = 2`; the file refused it: "expected a string, not an integer".
    assert read_config_file(write(tmp_path / "chat.toml", "workers = 2\n")) == {"workers": "2"}
    assert read_config_file(write(tmp_path / "auto.toml", 'workers = "auto"\n')) == {"workers": "auto"}
    with pytest.raises(ConfigFileError, match="workers = 0: must be auto"):
        read_config_file(write(tmp_path / "zero.toml", "workers = 0\n"))


def test_relative_paths_are_taken_from_the_files_folder(tmp_path, monkeypatch):
    config = write(tmp_path / "etc" / "chat.toml", 'users = "accounts.json"\ndata-dir = "../var/data"\n')
    monkeypatch.chdir(tmp_path)  # not the file's folder
    values = read_config_file(Path("etc/chat.toml"))
    assert values["users"] == config.parent / "accounts.json"
    assert values["data_dir"] == tmp_path / "var" / "data"  # as --print-config shows it: no "etc/.."
    assert values["users"].is_absolute()


BAD_FILES = {
    "unknown key, spelled with underscores": (
        "max_clients = 60\n",
        "unknown key 'max_clients' (did you mean 'max-clients'?)",
    ),
    "unknown key": ("colour = 1\n", "unknown key 'colour'"),
    "a table": ("[server]\nport = 1\n", "unknown key 'server'"),
    "string for a number": ('max-clients = "60"\n', 'max-clients = "60": expected a whole number, not a string'),
    "float for a whole number": ("port = 80.5\n", "port = 80.5: expected a whole number, not a float"),
    "boolean for a number": ("max-clients = true\n", "max-clients = true: expected a whole number, not a boolean"),
    "number for a boolean": ("allow-demo-accounts = 1\n", "allow-demo-accounts = 1: expected true or false"),
    "number for a path": ("data-dir = 5\n", "data-dir = 5: expected a path (a string), not an integer"),
    "array": ("host = ['a', 'b']\n", "host: expected a string, not an array"),
    "date": ("token-ttl = 2026-12-07\n", "token-ttl: expected a whole number, not a date or time"),
    "port out of range": ("port = 70000\n", "port = 70000: must be from 0 to 65535"),
    "below the least": ("max-clients = 0\n", "max-clients = 0: must be at least 1"),
    "not above zero": ("ping-interval = 0\n", "ping-interval = 0: must be more than 0"),
    "infinite": ("ping-timeout = inf\n", "ping-timeout = inf: must be a finite number"),
    "not a choice": ("key-size = 1024\n", "key-size = 1024: must be one of 2048, 3072, 4096"),
    "log level": ('log-level = "LOUD"\n', 'log-level = "LOUD": must be one of DEBUG, INFO, WARNING, ERROR'),
    "bad room": ('default-room = "no spaces!"\n', 'default-room = "no spaces!": room names are'),
    "empty host": ('host = ""\n', 'host = "": must not be empty'),
    "syntax": ("port = 7878\nmax-clients = \n", "not valid TOML: Invalid value (at line 2, column 15)"),
    "unclosed": ("port = [\n", "not valid TOML: Invalid value (at end of document)"),
    "duplicate key": ("port = 1\nport = 2\n", "not valid TOML: Cannot overwrite a value (at line 2, column 9)"),
    "not UTF-8": (b"host = '\xff'\n", "not UTF-8 text (byte 8)"),
}


@pytest.mark.parametrize(("content", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_refused_naming_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "chat.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigFileError) as raised:
        read_config_file(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigFileError, match=re.escape(f"{tmp_path / 'absent.toml'}: cannot read it: No such file")):
        read_config_file(tmp_path / "absent.toml")
    with pytest.raises(ConfigFileError, match=re.escape(f"{tmp_path}: cannot read it: Is a directory")):
        read_config_file(tmp_path)


@pytest.mark.parametrize(("key", "value"), [("port", -1), ("max-sessions", 0), ("history-days", 0.0)])
def test_the_file_and_the_command_line_share_one_check(tmp_path, key, value):
    (spec,) = [spec for spec in option_fields() if option_key(spec) == key]
    problem = option_problem(spec, value)
    assert problem
    with pytest.raises(ConfigFileError, match=re.escape(problem)):
        read_config_file(write(tmp_path / "chat.toml", f"{key} = {value}\n"))
    from_command_line = run_server_py(f"--{key}", str(value), "--print-config")
    assert from_command_line.returncode == 2
    assert from_command_line.stderr == f"error: --{key} {value}: {problem}\n"


# --------------------------------------------------------------------------- through the program


def test_a_bad_file_stops_the_program_in_one_line_with_status_2(tmp_path):
    path = write(tmp_path / "chat.toml", "port = 7878\nmax-clients 60\n")
    result = run_server_py("--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"error: {path}: not valid TOML: Expected '=' after a key in a key/value pair (at line 2, column 13)"
    ]
    absent = run_server_py("--config", str(tmp_path / "absent.toml"))
    assert (absent.returncode, absent.stdout) == (2, "")
    assert absent.stderr == f"error: {tmp_path / 'absent.toml'}: cannot read it: No such file or directory\n"


def test_a_file_others_cannot_read_is_named(tmp_path):
    path = write(tmp_path / "chat.toml", "port = 0\n")
    path.chmod(0o000)
    result = run_server_py("--config", str(path), prefix=unprivileged())
    assert (result.returncode, result.stderr) == (2, f"error: {path}: cannot read it: Permission denied\n")


def test_the_command_line_wins_over_the_file_and_defaults_fill_the_rest(tmp_path):
    path = write(
        tmp_path / "chat.toml", "max-clients = 60\nflood-rate = 3\nallow-demo-accounts = true\nlog-level = 'ERROR'\n"
    )
    printed = printed_config("--config", str(path), "--max-clients", "7", "--no-allow-demo-accounts")
    assert (printed["max-clients"], printed["allow-demo-accounts"]) == (7, False)  # the command line
    assert (printed["flood-rate"], printed["log-level"]) == (3.0, "ERROR")  # the file
    assert printed["max-rooms"] == 1000  # the default
    assert printed_config("--config", str(path), "--allow-demo-accounts")["allow-demo-accounts"] is True


def test_print_config_reads_back_as_the_same_configuration(tmp_path):
    first = run_server_py(
        "--port", "0", "--data-dir", "relative/data", "--default-room", "Hall", "--history-days", "0.5",
        "--print-config", cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    saved = write(tmp_path / "elsewhere" / "saved.toml", first.stdout)
    again = run_server_py("--config", str(saved), "--print-config", cwd=ROOT)
    assert (again.returncode, again.stdout) == (0, first.stdout)
    printed = tomllib.loads(first.stdout)
    assert list(printed) == OPTION_KEYS
    assert printed["data-dir"] == str(tmp_path / "relative" / "data")  # absolute: the same wherever it is saved
    # The room as the server names it ("Hall" is #hall), as the data directory is the path it uses.
    assert (printed["port"], printed["default-room"], printed["history-days"]) == (0, "#hall", 0.5)


def test_config_to_toml_reads_back_odd_text_and_paths(tmp_path):
    config = ServerConfig(
        host='we"ird\\host\x7f\t', data_dir=Path("/tmp/a path/with ünïcode"), send_workers=2, ping_timeout=1e-3
    )
    values = read_config_file(write(tmp_path / "odd.toml", config_to_toml(config)))
    for spec in option_fields():
        if spec.name != "host":  # an odd host is refused by its check; its text must still survive
            assert values[option_dest(spec)] == getattr(config, spec.name), spec.name
    assert tomllib.loads(config_to_toml(config))["host"] == config.host


def test_print_config_prints_the_options_only_and_starts_nothing(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    crypto_utils.load_or_create_private_key(data_dir / "server_key.pem")
    token_secret = crypto_utils.load_or_create_secret(data_dir / "token_secret")
    before = sorted(data_dir.iterdir())
    printed = run_server_py("--data-dir", str(data_dir), "--print-config")
    assert printed.returncode == 0
    lines = printed.stdout.splitlines()
    # Each option under its comment, and nothing else: no key, no secret, no fingerprint.
    assert [line.split(" = ")[0] for line in lines[1::2]] == OPTION_KEYS
    assert all(line.startswith("# ") for line in lines[::2])
    assert token_secret.hex() not in printed.stdout and "SHA256:" not in printed.stdout
    assert sorted(data_dir.iterdir()) == before
    fresh = tmp_path / "never made"
    assert run_server_py("--data-dir", str(fresh), "--print-config").returncode == 0
    assert not fresh.exists()
    # What it prints is what would start: options that cannot are refused as a start refuses them.
    refused = run_server_py("--workers", "2", "--print-config")
    assert refused.returncode == 2 and refused.stdout == "", refused
    assert (
        refused.stderr.strip() == "error: --workers needs rooms the processes share: add --backend redis://HOST:PORT/DB"
    )


def test_an_account_command_after_config_uses_the_files_user_store(tmp_path, users_file):
    path = write(tmp_path / "conf" / "chat.toml", f'users = "{users_file}"\n')
    listed = run_server_py("--config", str(path), "users")
    assert (listed.returncode, listed.stderr) == (0, "")
    assert sorted(listed.stdout.split()) == ["alice", "bob", "carol", "dave", "echo", "erin"]


# --------------------------------------------------------------------------- the sample chat.toml


def test_the_sample_lists_every_option_with_its_default():
    text = SAMPLE.read_text("utf-8")
    lines = text.splitlines()
    keys = [match.group(1) for line in lines if (match := re.match(r"(?:# )?([a-z][a-z-]*) = ", line))]
    assert keys == OPTION_KEYS, "chat.toml and the options differ (or are in another order)"
    for index, line in enumerate(lines):
        if re.match(r"(?:# )?[a-z][a-z-]* = ", line):
            assert lines[index - 1].startswith("# ") and " = " not in lines[index - 1], f"no comment above {line!r}"
    values = read_config_file(SAMPLE)
    for spec in option_fields():
        if option_dest(spec) not in values:  # commented out: only a default that depends on the machine
            assert spec.default_factory is not MISSING, f"{option_key(spec)} is commented out, but has a fixed default"
            continue
        # In a checkout the paths are the defaults: beside server.py, like the sample.
        assert values[option_dest(spec)] == option_default(spec), option_key(spec)


def test_the_sample_as_shipped_changes_nothing():
    assert printed_config("--config", str(SAMPLE)) == printed_config()


def test_a_server_started_with_the_sample_lets_a_client_log_in(tmp_path, users_file):
    server = ServerProcess(
        ["--config", str(SAMPLE), "--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    )
    try:
        client = ChatClient(
            "127.0.0.1", server.port, server_fingerprint=server.fingerprint, known_hosts=KnownHosts(tmp_path / "kh")
        )
        try:
            assert client.login("alice", password_of("alice")).username == "alice"
        finally:
            client.close()
    finally:
        status, stderr = server.stop()
    assert status == 0, stderr
    assert "Traceback" not in stderr


def test_print_config_hides_a_redis_password():
    from securechat.config import hide_password

    assert hide_password("redis://chat:s3cret@redis.internal:6379/0") == "redis://chat:***@redis.internal:6379/0"
    assert hide_password("rediss://:s3cret@host/1") == "rediss://:***@host/1"
    assert hide_password("redis://host:6379/0") == "redis://host:6379/0"
    assert hide_password("redis://host:6379/0?password=s3cret&db=1") == "redis://host:6379/0?password=***&db=1"
    assert hide_password("memory") == "memory"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0/",  # a trailing slash after the DB: redis-py reads DB 0
        "redis://[::1]:6379/0",
        "rediss://chat:p%40ss@redis.internal/2?ssl_cert_reqs=required",
        "unix:///run/redis/redis.sock?db=3",
    ],
)
def test_backend_urls_the_redis_client_takes_are_not_refused(url):
    """check_backend refuses what the Redis client would misread, never what it reads."""
    from securechat.config import check_backend

    check_backend(url)


def test_a_relative_path_in_a_config_file_reached_through_a_symlink_names_what_it_did(tmp_path):
    """Paths of a config file are now normalized as text ("a/../b" is "b"), which is not what the
    system does when "a" is a symbolic link: a config in a linked folder (/etc/securechat -> the
    checkout of a config repository) with ``data-dir = "../data"`` now names another folder, and the
    server starts there with a fresh server key and token secret (every client warned of a changed
    key), or an empty history."""
    from securechat.config import read_config_file

    real = tmp_path / "srv" / "chat" / "conf"
    real.mkdir(parents=True)
    (tmp_path / "srv" / "chat" / "users.json").write_text("{}")
    (real / "chat.toml").write_text('users = "../users.json"\n')
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "securechat").symlink_to(real)
    users = read_config_file(tmp_path / "etc" / "securechat" / "chat.toml")["users"]
    assert Path(users).exists(), f"{users} is not the file the config named"


def test_a_ping_timeout_no_longer_than_the_ping_interval_is_refused(tmp_path):
    """`--ping-timeout 3` with the default `--ping-interval 20` was taken without a word, and every idle,
    healthy client was then dropped 3 s after its last line ("no reply to keepalive"), though no ping
    had been sent; the terminal client reconnected, and was dropped again."""
    result = run_server_py("--ping-timeout", "3", "--port", "0", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: --ping-timeout 3 must be longer than --ping-interval 20:"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_an_ipv6_address_is_announced_as_it_is_typed_back(tmp_path, users_file):
    # "Listening on ::1:40895" (or ":::17895"): neither can be given back to --server HOST:PORT.
    where = ["--host", "::1", "--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    server = subprocess.Popen(
        [sys.executable, SERVER, *where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    announced = []
    try:
        assert server.stdout is not None
        while line := server.stdout.readline():  # "" once it exits
            if line.startswith("Listening on"):
                announced.append(line.strip())
                break
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=TIMEOUT * 2)
    if "not an address of this machine" in stderr:
        pytest.skip("no IPv6 loopback here")
    assert announced and re.fullmatch(r"Listening on \[::1\]:\d+", announced[0]), (announced, stderr)


def test_a_ping_interval_clients_take_for_silence_is_refused(tmp_path):
    # Clients take a server silent for 75 s for gone: pinged less often, every idle one reconnected.
    result = run_server_py("--ping-interval", "80", "--ping-timeout", "160", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: --ping-interval 80 must be under 75:"), result.stderr
