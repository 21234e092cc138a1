"""A deployment on several processes and machines, done by the README alone, as an operator would.

Each test drives the real programs from outside (``server.py`` and its account commands as child
processes, a real ``redis-server`` on a free loopback port). Every test ends the servers and
processes it started. Each one held a fault an operator's review found; its docstring says which.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import redis
from conftest import (
    REDIS_SERVER,
    ROOT,
    TIMEOUT,
    RedisServer,
    ServerProcess,
    drain,
    free_port,
    password_of,
    wait_for,
)
from test_redis import client_of, entered, import_accounts, said, server_command

from securechat.protocol import Chat, ErrorReply, Notice


def needs_redis() -> None:
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text("utf-8")
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start : end if end >= 0 else len(text)]


# --------------------------------------------------------------------------- growing onto Redis


def test_a_single_node_grown_onto_redis_is_told_what_it_leaves_in_history_sqlite3(tmp_path, users_file, redis_server):
    """README: "It starts in a minute as one process; when one core is not enough, several processes
    or machines share the rooms through Redis", and the only step given is ``import-users`` ("the
    accounts, once"). Roles, modes, bans and history "are kept in the data directory and survive a
    restart". Restarted on Redis with the same data directory, the node silently ignores the
    history.sqlite3 beside it: the room's history is gone, its owner is no longer in it, the private
    line kept for an offline user is lost, and a user banned from the room walks in and owns it.
    Nothing was said at start. Nothing moves them yet (README says so); each start on Redis now
    warns, in one line naming the file, what it holds and that a node on Redis does not read it."""
    data = tmp_path / "data"
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(data), "--log-level", "WARNING"]
    alone = ServerProcess(where)
    alice = client_of(alone, tmp_path / "kh_alice")
    try:
        alice.login("alice", password_of("alice"))
        alice.join("#secret")
        wait_for(alice, entered("#secret"))
        alice.say("said on the single node", "#secret")
        wait_for(alice, said("said on the single node"))
        alice.command("ban", "#secret", "bob", "keeps trolling")
        wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "moderation")
        alice.private("carol", "kept for carol until she logs in")
        drain(alice, quiet=0.5)
        alice.leave()
    finally:
        alice.close()
        alone.stop()
    assert (data / "history.sqlite3").exists()

    # The README's step: the accounts into Redis, once; then the same node on Redis.
    import_accounts(users_file, redis_server.url)
    try:
        node = ServerProcess([*where, "--backend", redis_server.url])
    except RuntimeError as refused:  # a fix may refuse to start, saying what it would leave behind
        assert "history" in str(refused), str(refused)
        return
    clients = []
    try:
        bob = client_of(node, tmp_path / "kh_bob")
        clients.append(bob)
        bob.login("bob", password_of("bob"))
        bob.join("#secret")
        bob_outcome = wait_for(
            bob, lambda event: isinstance(event, ErrorReply) or entered("#secret")(event), timeout=TIMEOUT
        )
        carol = client_of(node, tmp_path / "kh_carol")
        clients.append(carol)
        carol.login("carol", password_of("carol"))
        carol_saw = [event.text for event in drain(carol, quiet=0.8) if isinstance(event, Chat)]
    finally:
        for client in clients:
            client.close()
        _, errors = node.stop()
    assert bob_outcome is not None and carol_saw is not None
    told = [line for line in errors.splitlines() if "history.sqlite3" in line]
    assert len(told) == 1 and "holds 3 lines and 2 rooms" in told[0] and "does not read them" in told[0], errors


# --------------------------------------------------------------------------- stopping


def test_sigterm_stops_a_redis_node_within_2_seconds_while_redis_hangs(tmp_path, users_file, redis_server):
    """README: "Ctrl-C or SIGTERM tells the clients the server is going down and exits 0 within 2
    seconds" (and the unit's TimeoutStopSec=10 kills it after 10). With Redis unresponsive (a frozen
    or partitioned Redis host: SIGSTOP here) a node took about 22 s to exit: RedisBackend.close joined
    its threads for 2 s each, then made its clean-up calls with a 5 s socket timeout and 3 retries.
    It now has one budget, and leaves the sessions to expire in a Redis that does not answer."""
    import_accounts(users_file, redis_server.url)
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    node = ServerProcess([*where, "--backend", redis_server.url, "--log-level", "WARNING"])
    alice = client_of(node, tmp_path / "known_hosts")
    alice.login("alice", password_of("alice"))  # a session to take out of Redis at the stop
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        try:
            status: int | None = node.process.wait(timeout=4.0)
        except subprocess.TimeoutExpired:
            status = None
        took = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        alice.close()
        node.stop()
    assert status == 0 and took < 2.5, f"exit status {status} after {took:.1f} s (still running at 4 s: None)"


# --------------------------------------------------------------------------- the Redis password


def test_chat_redis_password_is_used_for_a_redis_user_named_in_the_url(tmp_path, users_file):
    """README: "A password for Redis goes in the URL (redis://USER:PASSWORD@HOST:PORT/DB ...) or, kept
    out of ps, in CHAT_REDIS_PASSWORD." With an ACL user, the URL must name it: redis://chat@HOST/0.
    CHAT_REDIS_PASSWORD was then ignored (redis_client used it only when "@" was not in the URL),
    and the error said "needs a password (give it in the URL or in CHAT_REDIS_PASSWORD)"."""
    needs_redis()
    (tmp_path / "locked").mkdir()
    locked = RedisServer(tmp_path / "locked", password="admin-only-secret")
    try:
        with redis.Redis(port=locked.port, password="admin-only-secret") as admin:
            admin.execute_command("ACL", "SETUSER", "chat", "on", ">chat-user-secret", "~*", "+@all")
        url = f"redis://chat@127.0.0.1:{locked.port}/0"
        done = subprocess.run(
            [sys.executable, str(ROOT / "server.py"), "import-users", str(users_file), "--backend", url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 4,
            env={**os.environ, "CHAT_REDIS_PASSWORD": "chat-user-secret"},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("imported 6 accounts"), done.stdout
    finally:
        locked.stop()


@pytest.mark.parametrize("password", ["made/by-openssl-base64", "with#hash", "a?b"])
def test_a_redis_password_with_a_url_delimiter_is_not_reported_as_a_missing_host(tmp_path, users_file, password):
    """`openssl rand -base64` passwords often hold "/". Put in the URL as the README shows
    (redis://:PASSWORD@HOST:PORT/DB), the error is "--backend 'redis://:***@127.0.0.1:PORT/0': the URL
    names no host" (or "the port must be a number") showed a URL that plainly names both, and said
    nothing of the password. It now says to percent-encode it, or to use CHAT_REDIS_PASSWORD."""
    needs_redis()
    (tmp_path / "locked").mkdir()
    locked = RedisServer(tmp_path / "locked", password=password)
    try:
        url = f"redis://:{password}@127.0.0.1:{locked.port}/0"
        done = server_command("users", "--backend", url)
    finally:
        locked.stop()
    assert password not in done.stderr + done.stdout
    if done.returncode == 0:
        return  # taken as it was meant: fine
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "names no host" not in done.stderr and "port must be" not in done.stderr, done.stderr
    assert "password" in done.stderr.lower(), done.stderr


# --------------------------------------------------------------------------- --workers


def test_a_start_error_under_workers_is_one_line(tmp_path, users_file):
    """README: a bad start "stops the server with one line" (test_redis checks it for one process).
    With --workers 2 and an unreachable Redis, the same error came once per worker, then a third line
    from the supervisor. The first worker now starts alone, and the others once it listens."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *where, "--backend", closed, "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: cannot reach Redis at "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def worker_pids(supervisor: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]


def still_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if still_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_second_workers_deployment_on_a_port_in_use_is_refused(tmp_path, users_file, redis_server):
    """A second `python server.py --port P` beside a running one stops with "error: port P is
    already in use". With `--workers` it does not: the supervisor binds its reservation with
    SO_REUSEPORT, so a second deployment (here another data directory and Redis database: another
    server key) starts, prints "Listening on 127.0.0.1:P (2 worker processes)", and the kernel
    spreads new connections over both. Clients of the first then get "WARNING: THE SERVER KEY ...
    HAS CHANGED" at random. It should be refused as the one-process server is."""
    first = ServerProcess(
        [
            *("--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "first")),
            *("--backend", redis_server.url, "--workers", "2", "--log-level", "WARNING"),
        ]
    )
    children = worker_pids(first.process.pid)
    second = None
    try:
        try:
            second = ServerProcess(
                [
                    *("--port", str(first.port), "--users", str(users_file), "--data-dir", str(tmp_path / "second")),
                    *("--backend", redis_server.url.rsplit("/", 1)[0] + "/1", "--workers", "2"),
                    *("--log-level", "WARNING"),
                ]
            )
        except RuntimeError as refused:  # it exited before listening: what should happen
            assert "in use" in str(refused), refused
        else:
            pytest.fail(f"a second deployment started on port {first.port}, which another one serves")
    finally:
        if second is not None:
            second.stop()
        first.stop()
        kill_all(children)


def test_the_workers_stop_when_their_supervisor_is_killed(tmp_path, users_file, redis_server):
    """`--workers 2` under a supervisor that is killed (kill -9, the OOM killer): its two workers
    go on serving the port as orphans, with nobody to restart or stop them, and the next
    `--workers` start on that port (see the test above) silently shares it with them. They
    should end with their supervisor (PR_SET_PDEATHSIG, or a pipe they watch)."""
    node = ServerProcess(
        [
            *("--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")),
            *("--backend", redis_server.url, "--workers", "2", "--log-level", "WARNING"),
        ]
    )
    children = worker_pids(node.process.pid)
    assert len(children) == 2
    try:
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while any(still_running(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [pid for pid in children if still_running(pid)]
        assert not orphans, f"workers {orphans} still serve port {node.port} after their supervisor was killed"
    finally:
        kill_all(children)
        node.stop()


# --------------------------------------------------------------------------- account commands


@pytest.mark.parametrize("command", [["deluser", "nobody"], ["passwd", "nobody"], ["role", "nobody", "admin"]])
def test_an_unknown_account_on_redis_is_not_said_to_be_missing_from_users_json(
    tmp_path, users_file, redis_server, command
):
    """With --backend the accounts are in Redis, yet an unknown name was reported as "error: no user
    'nobody' in /…/users.json", a file that is not the store."""
    import_accounts(users_file, redis_server.url)
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *command, "--backend", redis_server.url],
        capture_output=True,
        text=True,
        input="a-long-enough-password-42\n",
        timeout=TIMEOUT * 4,
    )
    assert done.returncode == 1, done.stderr
    assert "users.json" not in done.stderr, done.stderr
    assert "Redis" in done.stderr or redis_server.url in done.stderr, done.stderr


def test_the_demo_accounts_hint_of_a_redis_node_removes_them(tmp_path, redis_server):
    """A node on Redis with demo accounts logs "demo accounts are enabled (alice, bob, carol): remove
    them with 'server.py deluser NAME'". Done as said, it printed "deleted alice" and changed
    users.json only: the account stayed in Redis. The hint now names the backend."""
    users = tmp_path / "users.json"
    shutil.copy(ROOT / "users.json", users)  # the shipped demo accounts
    users.chmod(0o600)
    done = server_command("import-users", str(users), "--backend", redis_server.url)
    assert done.returncode == 0, done.stderr
    where = ["--port", "0", "--users", str(users), "--data-dir", str(tmp_path / "data")]
    node = ServerProcess([*where, "--backend", redis_server.url])
    _, errors = node.stop()
    hint = re.search(r"remove them with '([^']+)'", errors)
    assert hint, errors
    program, *hinted = shlex.split(hint.group(1).replace("NAME", "alice"))
    assert program == "server.py"
    done = server_command("--users", str(users), *hinted)
    assert done.returncode == 0 and done.stdout.startswith("deleted alice"), done.stderr
    listed = server_command("users", "--backend", redis_server.url)
    assert "alice" not in listed.stdout.split(), (
        f"following the hint printed 'deleted alice', yet Redis still holds alice:\n{listed.stdout}"
    )


def test_the_readmes_adduser_line_on_a_redis_node_is_not_silently_lost(tmp_path, users_file, redis_server):
    """The README's systemd deployment adds users with ``chat-server --users
    /var/lib/securechat/users.json adduser alice``. On a node whose data directory says its accounts
    are in Redis (it holds accounts_in_redis, and users.json beside it), that line prints "added
    zed", exited 0 and warned of nothing: zed went to users.json, which is not the store. The marker
    is now looked for beside --users too, and a change is refused in one line."""
    data = tmp_path / "var-lib-securechat"
    import_accounts(users_file, redis_server.url)
    node = ServerProcess(
        ["--port", "0", "--users", str(data / "users.json"), "--data-dir", str(data), "--backend", redis_server.url]
    )
    node.stop()
    assert (data / "accounts_in_redis").exists()
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--users", str(data / "users.json"), "adduser", "zed"],
        capture_output=True,
        text=True,
        input="a-long-enough-password-42\n",
        timeout=TIMEOUT * 4,
    )
    listed = server_command("users", "--backend", redis_server.url)
    assert "zed" not in listed.stdout.split()
    assert done.returncode == 1 and "keeps its accounts in Redis" in done.stderr, (done.returncode, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# --------------------------------------------------------------------------- the README's second machine


def test_the_readmes_second_machine_command_serves_the_data_directory_it_copied(tmp_path):
    """README, "Several processes, several machines": the second machine copies the first one's data
    directory with ``rsync -a --chmod=D700,F600 node1:/var/lib/securechat/ /var/lib/securechat/``,
    then runs ``chat-server --config /etc/securechat/chat.toml --backend … --workers auto``. That
    command gives no --data-dir nor --users (the unit gives both), so the installed chat.toml's
    ``data-dir = "server-data"`` was taken from the file's folder: /etc/securechat/server-data. The
    node ignored the copy and made fresh keys there. The README's command now names both paths."""
    section = readme_section("### Several processes, several machines")
    block = next(b for b in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL) if "rsync" in b)
    lines = [line for line in block.splitlines() if line.strip()]
    rsync = shlex.split(next(line for line in lines if line.startswith("rsync")))
    destination = rsync[-1].rstrip("/")
    program, *argv = shlex.split(next(line for line in lines if line.startswith("chat-server")))
    assert program == "chat-server" and "--config" in argv
    # The installed configuration, as the Deployment section makes it (install -D, then the sed line).
    etc = tmp_path / "etc-securechat"
    etc.mkdir()
    installed = (ROOT / "chat.toml").read_text()
    installed = re.sub(r"(?m)^host = .*", 'host = "0.0.0.0"', installed)
    (etc / "chat.toml").write_text(installed)
    copied = tmp_path / "var-lib-securechat"
    moved = {argv[argv.index("--config") + 1]: str(etc / "chat.toml")}
    # Any path under the rsync destination (a fixed command would name it) is moved here too.
    local = [moved.get(arg, arg.replace(destination, str(copied), 1)) for arg in argv]
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *local, "--print-config"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert done.returncode == 0, done.stderr
    printed = tomllib.loads(done.stdout)
    used = Path(printed["data-dir"])
    shown = used.relative_to(tmp_path) if used.is_relative_to(tmp_path) else used
    assert used == copied, (
        f"the README's command serves {shown}, not the directory its rsync line filled ({destination})"
    )


@pytest.mark.parametrize("query", ["?foo=bar", "?socket_timeout=abc"], ids=["unknown-option", "bad-value"])
def test_a_typo_in_the_backend_urls_query_is_one_line_not_a_traceback(tmp_path, users_file, query):
    """--backend redis://HOST:PORT/0?foo=bar (an unknown option, or one with a value it cannot take): the
    server and the account commands died with the Redis client's traceback when they first connected,
    where every other mistake in the URL is one "error: --backend ..." line."""
    url = f"redis://127.0.0.1:{free_port()}/0{query}"  # refused before any connection
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    for command in ([*where, "--backend", url], ["users", "--backend", url]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "server.py"), *command], capture_output=True, text=True, timeout=TIMEOUT * 4
        )
        assert done.returncode == 2, (command, done.stderr)
        option = query[1:].partition("=")[0]
        assert done.stderr.startswith(f"error: --backend '{url}': the URL's option {option} "), done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_second_workers_deployment_is_refused_while_the_first_restarts_its_workers(tmp_path, redis_server):
    """4d6f41d: "--workers: a start on a port something serves is refused". The check binds the port with
    SO_REUSEADDR, which succeeds beside the running supervisor's reservation socket (bound, never
    listening) whenever none of its workers listens: for a second after a worker dies, up to 30 s while
    they keep dying (Redis down). The second deployment then starts, and once the first one's workers
    are back both serve the port (SO_REUSEPORT): the kernel hands clients to either, and to either key."""
    from conftest import ServerProcess, free_port, process_state

    port = free_port()
    common = ["--port", str(port), "--workers", "2", "--log-level", "WARNING"]
    first = ServerProcess([*common, "--backend", redis_server.url, "--data-dir", str(tmp_path / "first")])
    second = None
    try:
        workers = [int(pid) for pid in Path(f"/proc/{first.process.pid}/task/{first.process.pid}/children")
                   .read_text().split()]  # fmt: skip
        assert len(workers) == 2
        for pid in workers:  # both die at once (the OOM killer, a crash on one bad input)
            os.kill(pid, signal.SIGKILL)
        for pid in workers:
            while True:
                try:
                    if process_state(pid) == "Z":
                        break
                except OSError:
                    break
                time.sleep(0.02)
        second = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), *common, "--data-dir", str(tmp_path / "second"),
             "--backend", redis_server.url.rsplit("/", 1)[0] + "/1"],  # another service: its own database
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert second.stdout is not None and second.stderr is not None
        out = ""
        while line := second.stdout.readline():  # ends at its exit, or once it serves the port
            out += line
            if line.startswith("Listening on"):
                break
        if second.poll() is None:
            pytest.fail(f"a second deployment serves port {port}, which the first one serves too: {out!r}")
        err = second.stderr.read()
        assert second.wait(timeout=TIMEOUT) == 1 and "already in use" in err, (
            f"a second deployment started on port {port}, which the first one serves: {out!r} {err!r}"
        )
    finally:
        if second is not None and second.poll() is None:
            second.terminate()
            second.communicate(timeout=TIMEOUT * 2)
        first.stop()
