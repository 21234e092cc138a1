"""Shared fixtures: a real server on an ephemeral loopback port, real clients, no leaks.

Every test gets its own users file, data directory and known-hosts file under
``tmp_path``. Servers and clients made through these fixtures are stopped at
teardown, and a test that leaves a thread behind fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' helpers for real processes serve the tests too

from harness import free_loopback_port as free_port  # noqa: E402
from harness import wait_until_redis_answers  # noqa: E402
from terminal import Terminal  # noqa: E402

from securechat.accounts import hash_password  # noqa: E402
from securechat.client import Chat, ChatClient, Disconnected, History, KnownHosts, Notice, Room  # noqa: E402
from securechat.listener import ChatServer, ServerConfig  # noqa: E402

#: Every wait in the tests scales from this one number (raise it on a slow machine).
TIMEOUT = float(os.environ.get("CHAT_TEST_TIMEOUT", "5"))
USER_NAMES = ("alice", "bob", "carol", "dave", "erin", "echo")


def password_of(name: str) -> str:
    return f"{name}-pass-{len(name)}"


@pytest.fixture(scope="session")
def users_document() -> dict:
    """The users file content, hashed once per test session (hashing is deliberately slow)."""
    return {
        "format": 1,
        "users": {
            name: {"password_hash": hash_password(password_of(name)), "demo": False, "created": ""}
            for name in USER_NAMES
        },
    }


@pytest.fixture
def users_file(tmp_path: Path, users_document: dict) -> Path:
    path = tmp_path / "users.json"
    path.write_text(json.dumps(users_document, indent=2))
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves threads running after its fixtures are torn down."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running: {[t.name for t in extra]}")


@pytest.fixture
def make_server(tmp_path: Path, users_file: Path) -> Iterator[Callable[..., ChatServer]]:
    """Factory: ``make_server(**config)`` starts a real server on 127.0.0.1, port 0."""
    servers: list[ChatServer] = []

    def start(**overrides) -> ChatServer:
        settings = {"host": "127.0.0.1", "port": 0, "users_path": users_file, "data_dir": tmp_path / "data"}
        settings.update(overrides)
        server = ChatServer(ServerConfig(**settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ChatServer]) -> ChatServer:
    return make_server()


@pytest.fixture
def connect(server: ChatServer, tmp_path: Path) -> Iterator[Callable[..., ChatClient]]:
    """Factory: ``connect("alice")`` returns a logged-in client of ``server`` (or ``to=...``)."""
    clients: list[ChatClient] = []

    def log_in(name: str, *, to: ChatServer | None = None, password: str | None = None, **options) -> ChatClient:
        target = to or server
        options.setdefault("server_fingerprint", target.fingerprint)
        options.setdefault("known_hosts", KnownHosts(tmp_path / "known_hosts"))
        client = ChatClient(*target.address, timeout=TIMEOUT * 2, **options)
        clients.append(client)
        client.login(name, password if password is not None else password_of(name))
        return client

    yield log_in
    for client in clients:
        client.close()


def joined(name: str) -> Callable[[object], bool]:
    """Matches the notice that ``name`` joined the room."""
    return lambda event: isinstance(event, Notice) and event.event == "joined" and event.name == name


def left(name: str) -> Callable[[object], bool]:
    """Matches the notice that ``name`` left the room."""
    return lambda event: isinstance(event, Notice) and event.event == "left" and event.name == name


def chat_with(text: str) -> Callable[[object], bool]:
    """Matches a chat line with exactly this text."""
    return lambda event: isinstance(event, Chat) and event.text == text


def is_disconnected(event: object) -> bool:
    return isinstance(event, Disconnected)


def wait_for(client: ChatClient, predicate: Callable[[object], bool], timeout: float = TIMEOUT) -> object:
    """The first event matching ``predicate``; fails the test if none comes in time."""
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        event = client.next_event(timeout=left)
        if event is None:
            break
        seen.append(event)
        if predicate(event):
            return event
        if isinstance(event, Disconnected):
            break
    pytest.fail(f"no matching event within {timeout} s; saw {seen!r}")


def wait_until(condition: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Poll until ``condition()`` holds; fails the test if it never does in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def drain(client: ChatClient, quiet: float = 0.3) -> list[object]:
    """Every event that arrives until the client has been quiet for ``quiet`` seconds."""
    events = []
    while (event := client.next_event(timeout=quiet)) is not None:
        events.append(event)
    return events


def drop_and_resume(client: ChatClient) -> None:
    """The client's link dies without a word (as in a network blip); it connects again and resumes."""
    client._shutdown_socket()
    wait_for(client, lambda event: isinstance(event, Disconnected))
    client.close()
    client.connect()
    client.resume()


def assert_a_notice_said_while_offline_is_not_counted_as_lost(alice: ChatClient, bob: ChatClient) -> None:
    """A room's notices (a topic, a kick, a mode) are numbered with its lines: alice, offline while
    bob sets a topic and says a line, is told of no line lost when she comes back."""
    bob.say("before the drop")
    wait_for(alice, chat_with("before the drop"))
    alice._shutdown_socket()
    wait_for(alice, is_disconnected)
    alice.close()
    bob.command("topic", "#lobby", "a new topic")
    wait_for(bob, lambda event: isinstance(event, Notice) and event.event == "topic")
    bob.say("after the topic")
    wait_for(bob, chat_with("after the topic"))
    alice.connect()
    alice.resume()
    events = drain(alice, quiet=0.5)
    assert any(chat_with("after the topic")(event) for event in events), events
    told = [event for event in events if isinstance(event, History) and event.room == "#lobby"]
    assert told and told[-1].missing == 0, told


def assert_a_room_of_notices_alone_is_not_shown_again(bob: ChatClient) -> None:
    """bob makes #quiet and sets +i there (a notice, no line), loses the link and resumes: nothing
    of #quiet is news, so nothing of it comes again (a device that saw no line of a room)."""
    bob.join("#quiet")
    bob.command("mode", "#quiet", "+i")
    wait_for(bob, lambda event: isinstance(event, Notice) and "+i" in event.text)
    drop_and_resume(bob)
    wait_for(bob, lambda event: isinstance(event, Room) and event.room == "#quiet")
    again = [event for event in drain(bob, quiet=0.5) if isinstance(event, Notice) and "+i" in event.text]
    assert again == [], "the mode change was shown again"


class HangsUp:
    """Listens on ``port`` (0: a free one, in ``self.port``) and resets every connection at once: the
    address of a node that is gone but still accepts TCP (a node in the middle of its shutdown or
    start, an L4 balancer whose backend died)."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hangs-up")
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


class ServerProcess:
    """``python server.py`` in a child process, on a free port, stopped at teardown."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.fingerprint = ""
        self.port = 0
        deadline = time.monotonic() + TIMEOUT * 4
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited: {self.process.stderr.read() if self.process.stderr else ''}")
            if match := re.search(r"fingerprint: \d+ (SHA256:\S+)", line):
                self.fingerprint = match.group(1)
            if match := re.search(r"Listening on [^ ]+:(\d+)", line):
                self.port = int(match.group(1))
                return
        raise RuntimeError("server did not start in time")

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then wait; returns (exit status, stderr)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            _, stderr = self.process.communicate(timeout=TIMEOUT * 2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return self.process.returncode, stderr


@pytest.fixture
def server_process(tmp_path: Path, users_file: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``server_process(*extra_args)`` runs the real program on port 0."""
    processes: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        args = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data"), *extra]
        process = ServerProcess(args)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


class RedisServer:
    """A real ``redis-server`` on a free loopback port, in its own folder; ``restart()`` keeps its data,
    unless it is not ``durable`` (then a restart starts it empty, as a Redis without persistence).
    With a ``password``, it refuses every client that does not give it (``requirepass``)."""

    def __init__(self, folder: Path, *, durable: bool = True, password: str = "") -> None:
        self.folder = folder
        self.durable = durable
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        # Kept in an append-only file, so a restart loses nothing that was written.
        kept = ["--appendonly", "yes" if self.durable else "no", "--save", "", "--protected-mode", "yes"]
        self.process = subprocess.Popen(
            [REDIS_SERVER, *where, *kept],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_redis_answers(self.process, self.port, TIMEOUT * 2)
        if self.password:  # set once it answers: the wait's PING gives no password
            import redis  # only the tests of a Redis deployment need it

            with redis.Redis(port=self.port) as admin:
                admin.config_set("requirepass", self.password)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


REDIS_SERVER = shutil.which("redis-server") or ""


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat: "T" once the process is stopped, "Z" once it has exited
    unreaped. Raises ``OSError`` when there is no such process."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis for this test alone (the test is skipped where redis-server is not installed)."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    yield server
    server.stop()


def client_args(server_port: int, user: str, known_hosts: Path, *extra: str) -> list[str]:
    """The command line of the real client program for ``user`` on a loopback server, pinning to ``known_hosts``."""
    return [
        sys.executable,
        str(ROOT / "client.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(server_port),
        "--user",
        user,
        "--known-hosts",
        str(known_hosts),
        *extra,
    ]


def client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CHAT_PASSWORD", "NO_COLOR")}
    env.update(
        PROMPT_TOOLKIT_NO_CPR="1",
        TERM="xterm-256color",
        XDG_CONFIG_HOME=str(tmp_path / "config"),  # never the real ~/.config/chat/known_hosts
    )
    env.update(extra)
    return env


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    """Factory: ``terminals(argv)`` starts a program in an 80x24 pty; every one is killed at teardown."""
    opened: list[Terminal] = []

    def spawn(argv: list[str], env: dict[str, str] | None = None) -> Terminal:
        terminal = Terminal(argv, env=env or client_env(tmp_path))
        opened.append(terminal)
        return terminal

    yield spawn
    for terminal in opened:
        terminal.close()
