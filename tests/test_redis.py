"""Several server processes share rooms through a real Redis (started by the test, on a free port).

Two nodes on two ports, sharing Redis and a copied data directory (so the same server key,
token secret and cluster key), as a second machine would.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from conftest import (
    REDIS_SERVER,
    ROOT,
    TIMEOUT,
    RedisServer,
    ServerProcess,
    assert_a_room_of_notices_alone_is_not_shown_again,
    drain,
    password_of,
    process_state,
    wait_for,
    wait_until,
)

from securechat.backend import BackendMismatch, BackendUnavailable, LineCharge, OverBudget
from securechat.client import ChatClient, KnownHosts, LoginRefused
from securechat.hub import ChatHub
from securechat.protocol import Chat, ErrorReply, Notice, Roster, Sessions
from securechat.protocol import Room as RoomMessage
from securechat.redis_accounts import USERS_KEY
from securechat.redis_backend import RedisBackend, key_id


def client_of(node: ServerProcess, known_hosts: Path, **options) -> ChatClient:
    """A client of ``node`` (not yet connected) that trusts its key."""
    return ChatClient(
        "127.0.0.1",
        node.port,
        server_fingerprint=node.fingerprint,
        known_hosts=KnownHosts(known_hosts),
        timeout=TIMEOUT * 2,
        **options,
    )


def server_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args], capture_output=True, text=True, timeout=TIMEOUT * 4
    )


def import_accounts(users_file: Path, redis_url: str) -> None:
    """The accounts of a Redis deployment live in Redis: the test's users.json is copied in."""
    done = server_command("import-users", str(users_file), "--backend", redis_url)
    assert done.returncode == 0 and done.stdout.startswith("imported 6 accounts"), done.stderr


class Cluster:
    def __init__(self, tmp_path: Path, users_file: Path, redis_url: str) -> None:
        self.tmp_path = tmp_path
        self.users_file = users_file
        self.redis_url = redis_url
        self.nodes: list[ServerProcess] = []
        self.clients: list[ChatClient] = []
        import_accounts(users_file, redis_url)

    def node(self, data_dir: Path, *extra: str) -> ServerProcess:
        args = ["--port", "0", "--users", str(self.users_file), "--data-dir", str(data_dir), *extra]
        node = ServerProcess([*args, "--backend", self.redis_url, "--log-level", "WARNING", "--ping-interval", "4"])
        self.nodes.append(node)
        return node

    def log_in(self, name: str, node: ServerProcess) -> ChatClient:
        client = client_of(node, self.tmp_path / f"known_hosts_{name}")
        self.clients.append(client)
        client.login(name, password_of(name))
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path, users_file, redis_server):
    cluster = Cluster(tmp_path, users_file, redis_server.url)
    yield cluster
    cluster.close()


def two_nodes(cluster: Cluster, tmp_path: Path, *extra: str) -> tuple[ServerProcess, ServerProcess]:
    first = cluster.node(tmp_path / "node1", *extra)
    # The second machine starts from a copy of the first one's data directory.
    shutil.copytree(tmp_path / "node1", tmp_path / "node2")
    second = cluster.node(tmp_path / "node2", *extra)
    assert first.fingerprint == second.fingerprint  # one server key: a pinned key works on both
    return first, second


def said(text: str):
    return lambda event: isinstance(event, Chat) and event.text == text


def entered(room: str):
    return lambda event: isinstance(event, RoomMessage) and event.room == room and event.joined


def test_users_on_two_nodes_chat_in_rooms_and_privately_and_share_history(cluster, tmp_path, redis_server):
    first, second = two_nodes(cluster, tmp_path)
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    alice.join("#dev")
    wait_for(alice, entered("#dev"))
    bob.join("#dev")
    wait_for(bob, entered("#dev"))
    alice.say("hello from node one", "#dev")
    heard = wait_for(bob, said("hello from node one"))
    assert (heard.sender, heard.room) == ("alice", "#dev")
    bob.say("and back from node two", "#dev")
    echo = wait_for(bob, said("and back from node two"))
    assert echo.ref  # the sender's own echo carries its ref, across the broker too
    assert wait_for(alice, said("and back from node two")).seq == heard.seq + 1
    bob.private("alice", "a secret between nodes")
    private = wait_for(alice, said("a secret between nodes"))
    assert private.private and private.sender == "bob"

    # History written through one node is read through the other: carol logs in to the second.
    carol = cluster.log_in("carol", second)
    carol.join("#dev")
    history = [
        event.text
        for event in [wait_for(carol, lambda event: isinstance(event, Chat) and event.history) for _ in range(2)]
    ]
    assert history == ["hello from node one", "and back from node two"]
    bob.command("away", "gone fishing at the lake")
    wait_for(bob, lambda event: isinstance(event, Notice) and "away" in event.text)
    bob.command("sessions")  # read back through Redis: the sealed record opens
    listing = wait_for(bob, lambda event: isinstance(event, Sessions))
    assert listing.addresses == ["127.0.0.1"]

    # Redis holds no message text, nor a device's address or away message: every value of every key
    # is searched.
    texts = [b"hello from node one", b"and back from node two", b"a secret between nodes"]
    texts += [b"gone fishing", b"127.0.0.1"]
    store = redis.Redis.from_url(redis_server.url)
    for key in store.scan_iter():
        kind = store.type(key)
        if kind == b"stream":
            values = [v for _, fields in store.xrange(key) for pair in fields.items() for v in pair]
        elif kind == b"hash":
            values = [v for pair in store.hgetall(key).items() for v in pair]
        elif kind == b"set":
            values = list(store.smembers(key))
        elif kind == b"zset":
            values = list(store.zrange(key, 0, -1))
        else:
            values = [store.get(key) or b""]
        for value in values:
            assert not any(text in value for text in texts), (key, value)
    store.close()


class CommandLog:
    """Every command Redis runs from now on (``redis-cli monitor``), and which process sent it."""

    def __init__(self, redis_server, folder: Path) -> None:
        self.started = time.time()
        self.path = folder / "monitor.log"
        self.file = self.path.open("wb")
        self.process = subprocess.Popen(
            ["redis-cli", "-p", str(redis_server.port), "monitor"], stdout=self.file, stderr=subprocess.DEVNULL
        )
        self.store = redis.Redis.from_url(redis_server.url)

    def reads_of(self, pid: int, after: float) -> list[str]:
        """The XREAD commands the process ``pid`` sent after ``after`` (a time.time())."""
        # Its connections are named by its process id (see securechat.redis_backend.redis_client).
        addresses = {entry["addr"] for entry in self.store.client_list() if entry["name"] == f"securechat-{pid}"}
        reads = []
        for line in self.path.read_text(errors="replace").splitlines():
            stamp, _, rest = line.partition(" ")
            address = rest[rest.find(" ") + 1 : rest.find("]")]
            if '"XREAD"' in rest and address in addresses and float(stamp) > after:
                reads.append(rest)
        return reads

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=TIMEOUT)
        self.file.close()
        self.store.close()


def test_a_node_stops_reading_a_room_its_last_user_left_and_reads_it_again_on_return(cluster, tmp_path, redis_server):
    first, second = two_nodes(cluster, tmp_path)
    alice, carol = cluster.log_in("alice", first), cluster.log_in("carol", second)
    for client in (alice, carol):
        client.join("#side")
        wait_for(client, entered("#side"))
    alice.say("before the part", "#side")
    wait_for(carol, said("before the part"))
    alice.part("#side")
    wait_for(alice, lambda event: isinstance(event, RoomMessage) and event.room == "#side" and not event.joined)
    commands = CommandLog(redis_server, tmp_path)
    try:
        carol.say("while you were away", "#side")
        wait_for(carol, said("while you were away"))
        settled = time.time() + 0.5  # a read sent as the part was taken in may still name the room
        time.sleep(1.5)
        reads = commands.reads_of(first.process.pid, settled)
        assert len(reads) >= 2, reads  # the first node goes on reading (its rooms, privates, control)
        assert not [read for read in reads if "#side" in read], reads  # but no longer #side
        assert any('"chat:stream:#lobby"' in read for read in reads)

        # Back in the room: what was said meanwhile comes as history, then live lines come once,
        # with no false "lost" notice from a room read afresh.
        alice.join("#side")
        wait_for(alice, lambda event: isinstance(event, Chat) and event.history and event.text == "while you were away")
        back = time.time()
        carol.say("after you came back", "#side")
        heard = wait_for(alice, said("after you came back"))
        assert not heard.history and heard.room == "#side"
        later = drain(alice, quiet=0.6)
        assert not [event for event in later if isinstance(event, Chat)], later  # nothing twice
        assert not [event for event in later if isinstance(event, Notice) and "lost" in event.text], later
        assert any('"chat:stream:#side"' in read for read in commands.reads_of(first.process.pid, back))
    finally:
        commands.close()


def test_a_redis_restart_loses_no_line_silently(cluster, tmp_path, redis_server):
    first, second = two_nodes(cluster, tmp_path)
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    alice.say("before the restart")
    wait_for(bob, said("before the restart"))
    redis_server.stop()
    alice.say("during the outage")
    # Either the line is refused in one line (the sender knows), or it arrives after the restart.
    outcome = wait_for(
        alice, lambda event: isinstance(event, ErrorReply) or said("during the outage")(event), timeout=TIMEOUT * 2
    )
    refused = isinstance(outcome, ErrorReply)
    if refused:
        assert outcome.message.startswith("not sent: ") and "message broker" in outcome.message
    redis_server.start()
    deadline = time.monotonic() + TIMEOUT * 3
    while time.monotonic() < deadline:  # the nodes reconnect with backoff: say it until it goes
        alice.say("after the restart")
        event = alice.next_event(timeout=1.0)
        while event is not None and not said("after the restart")(event):
            event = alice.next_event(timeout=0.2)
        if event is not None:
            break
    seen = []
    event = bob.next_event(timeout=TIMEOUT)
    while event is not None and not said("after the restart")(event):
        seen.append(event)
        event = bob.next_event(timeout=TIMEOUT)
    assert event is not None, f"bob never heard a line after the restart; saw {seen!r}"
    if not refused:
        assert any(said("during the outage")(item) for item in seen), "accepted during the outage, then lost"


def test_an_unreachable_redis_is_one_line_without_its_password(tmp_path, users_file):
    from conftest import free_port

    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    closed = f"redis://chat:s3cret@127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *where, "--backend", closed],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot reach Redis at redis://chat:***@127.0.0.1:")
    assert len(done.stderr.strip().splitlines()) == 1 and "s3cret" not in done.stderr + done.stdout


def test_a_resume_does_not_show_again_a_room_of_notices_alone(cluster, tmp_path):
    """Redis numbers a room's notices with its lines: a device that has seen no line of a room (its
    seen number 0) is caught up by id, not sent the room's notices again at every resume."""
    node = cluster.node(tmp_path / "node")
    assert_a_room_of_notices_alone_is_not_shown_again(cluster.log_in("bob", node))


def test_a_killed_nodes_clients_resume_on_the_other_and_nothing_is_shown_twice(cluster, tmp_path):
    from securechat.client import Reconnected, Reconnecting

    first, second = two_nodes(cluster, tmp_path)
    alice = client_of(first, tmp_path / "known_hosts_alice", other_servers=[("127.0.0.1", second.port)], reconnect=True)
    cluster.clients.append(alice)
    alice.login("alice", password_of("alice"))
    bob = cluster.log_in("bob", second)
    carol = cluster.log_in("carol", second)
    bob.say("before the crash")
    shown = [wait_for(alice, said("before the crash"))]
    first.process.kill()  # kill -9: no goodbye, no clean-up
    wait_for(alice, lambda event: isinstance(event, Reconnecting))
    bob.say("while alice moves")
    events = []
    event = alice.next_event(timeout=TIMEOUT * 3)
    while event is not None and not isinstance(event, Reconnected):
        events.append(event)
        event = alice.next_event(timeout=TIMEOUT * 3)
    assert isinstance(event, Reconnected), events
    assert (alice.host, alice.port) == ("127.0.0.1", second.port)  # the same session, on the other node
    alice.say("alice is back")
    wait_for(carol, said("alice is back"))
    bob.say("after the move")
    event = alice.next_event(timeout=TIMEOUT)
    while event is not None:
        events.append(event)
        if said("after the move")(event):
            break
        event = alice.next_event(timeout=TIMEOUT)
    shown += [event for event in events if isinstance(event, Chat)]
    texts = [event.text for event in shown]
    assert texts.count("before the crash") == 1 and texts.count("after the move") == 1, texts
    assert "while alice moves" in texts  # missed while moving, caught up on the other node
    assert len({event.id for event in shown}) == len(shown), "a line was shown twice"


def test_workers_serve_clients_from_every_process_and_stop_together(tmp_path, users_file, redis_server):
    import signal

    import_accounts(users_file, redis_server.url)
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    node = ServerProcess([*where, "--backend", redis_server.url, "--workers", "2"])
    clients = []
    try:
        for index in range(12):  # the kernel spreads connections by their addresses: both get some
            name = ("alice", "bob", "carol")[index % 3]
            client = client_of(node, tmp_path / "known_hosts")
            clients.append(client)
            client.login(name, password_of(name))
        clients[0].say("heard in every process")
        for client in clients[1:]:
            wait_for(client, said("heard in every process"))
        pid = node.process.pid
        children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert len(children) == 2
        for child in children:  # the supervisor's own --workers and --port are not passed on beside the worker's
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            assert command.count(b"--workers") == 1 and command.count(b"--port") == 1, command
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        status = node.process.wait(timeout=TIMEOUT)
        assert status == 0 and time.monotonic() - started < 2.5
        assert not any(_alive(child) for child in children)
    finally:
        for client in clients:
            client.close()
        _, errors = node.stop()
    logins = [line for line in errors.splitlines() if "login ok" in line]
    assert {line.split(" worker ")[1][0] for line in logins} == {"1", "2"}, logins


def _alive(pid: int) -> bool:
    try:
        return process_state(pid) != "Z"
    except OSError:
        return False


def test_workers_need_a_shared_backend(tmp_path, users_file):
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--port", "0", "--users", str(users_file), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: --workers needs rooms the processes share")


def test_revocations_hold_on_every_node_at_once(cluster, tmp_path):
    from securechat.client import LoginRefused
    from securechat.protocol import Notice

    first, second = two_nodes(cluster, tmp_path)

    def device(node: ServerProcess, **options) -> ChatClient:
        client = client_of(node, tmp_path / "known_hosts", **options)
        cluster.clients.append(client)
        return client

    # A token is spent once: resumed on the second node, it cannot be resumed on the first.
    laptop = device(first)
    laptop.login("alice", password_of("alice"))
    token, key = laptop.token, laptop.private_key
    laptop.sock.shutdown(socket.SHUT_RDWR)  # the link drops, no goodbye
    moved = device(second, private_key=key)
    moved.token, moved.username = token, "alice"
    moved.connect()
    moved.resume()
    again = device(first, private_key=key)
    again.token, again.username = token, "alice"
    again.connect()
    with pytest.raises(LoginRefused, match="given up"):
        again.resume()

    # /logout on one node ends a session held by the other.
    phone = device(first)
    phone.login("alice", password_of("alice"))
    moved.command("sessions")
    listed = wait_for(moved, lambda event: type(event).__name__ == "Sessions")
    assert phone.session in listed.ids
    moved.command("logout", phone.session)
    wait_for(moved, lambda event: isinstance(event, Notice) and event.text == "ended 1 other session")
    wait_for(phone, lambda event: type(event).__name__ == "Disconnected", timeout=TIMEOUT * 2)


def test_who_is_in_a_room_and_its_joins_and_leaves_are_seen_across_nodes(cluster, tmp_path):
    from securechat.protocol import Notice, Roster

    first, second = two_nodes(cluster, tmp_path)
    alice = cluster.log_in("alice", first)
    alice.join("#dev")
    wait_for(alice, entered("#dev"))
    bob = cluster.log_in("bob", second)
    bob.join("#dev")
    roster = wait_for(bob, lambda event: isinstance(event, Roster) and event.room == "#dev")
    assert roster.members == ["alice", "bob"]  # alice is on the other node
    wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "joined" and event.name == "bob")
    alice.who("#dev")
    assert wait_for(alice, lambda event: isinstance(event, Roster) and event.room == "#dev").members == [
        "alice",
        "bob",
    ]
    bob.part("#dev", "lunch")
    left = wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "left")
    assert (left.name, left.text, left.room) == ("bob", "lunch", "#dev")
    alice.who("#dev")
    assert wait_for(alice, lambda event: isinstance(event, Roster) and event.room == "#dev").members == ["alice"]


def test_accounts_live_in_redis_an_account_added_on_one_node_logs_in_on_every_node(cluster, tmp_path):
    first, second = two_nodes(cluster, tmp_path)
    again = server_command("import-users", str(cluster.users_file), "--backend", cluster.redis_url)
    assert again.stdout.startswith("imported 0 accounts; 6 were there already and were kept")
    added = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "adduser", "frank", "--backend", cluster.redis_url],
        input="Correct-Horse-Battery-42\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert added.returncode == 0 and added.stdout.strip() == "added frank", added.stderr
    assert "frank" in server_command("users", "--backend", cluster.redis_url).stdout
    for node in (first, second):
        client = client_of(node, tmp_path / "known_hosts_frank")
        cluster.clients.append(client)
        client.login("frank", "Correct-Horse-Battery-42")
    assert server_command("import-users", str(cluster.users_file)).returncode == 2  # without Redis: refused
    # A mistyped file is an error, not "imported 0 accounts".
    missing = server_command("import-users", str(tmp_path / "no_such_users.json"), "--backend", cluster.redis_url)
    assert missing.returncode == 1 and missing.stderr.strip().endswith("no_such_users.json: no such file")
    # And a change made without --backend, on a node's data directory, is said to miss the deployment.
    elsewhere = ["--data-dir", str(tmp_path / "node1"), "--users", str(tmp_path / "local_users.json")]
    local = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *elsewhere, "adduser", "grace"],
        input="Correct-Horse-Battery-42\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    # Refused, in one line: an account added there would count nowhere.
    assert local.returncode == 1 and "keeps its accounts in Redis" in local.stderr, local.stderr
    assert not (tmp_path / "local_users.json").exists()


def test_spreading_over_nodes_gives_no_more_guesses_nor_lines(cluster, tmp_path):
    from securechat.client import LoginRefused

    first, second = two_nodes(cluster, tmp_path, "--flood-burst", "3", "--flood-rate", "0.05")

    def attempt(node: ServerProcess, password: str) -> None:
        # From a guesser's own address: the users' is not delayed.
        client = client_of(node, tmp_path / "known_hosts_guesser", source_address=("127.0.0.2", 0))
        cluster.clients.append(client)
        client.login("bob", password)

    for node in (first, second, first):  # the free failures, spread over both nodes
        with pytest.raises(LoginRefused, match="wrong user name or password"):
            attempt(node, "not-the-password")
    with pytest.raises(LoginRefused, match="too many failed logins"):
        attempt(second, "not-the-password")  # the next guess waits, whichever node takes it

    laptop, phone = cluster.log_in("alice", first), cluster.log_in("alice", second)
    laptop.say("one")
    phone.say("two")
    laptop.say("three")
    for client, text in ((laptop, "one"), (phone, "two"), (laptop, "three")):
        assert wait_for(client, said(text)).ref
    phone.say("four")  # the account's budget of 3 is spent, on whichever node
    refusal = wait_for(phone, lambda event: isinstance(event, ErrorReply))
    assert refusal.message.startswith("not sent: you are sending too fast")


def test_connections_from_one_address_are_counted_on_every_node(cluster, tmp_path):
    from securechat.client import ChatError

    first, second = two_nodes(cluster, tmp_path, "--max-per-address", "3")

    def connection(node: ServerProcess, name: str) -> ChatClient:
        client = client_of(node, tmp_path / "known_hosts_many", source_address=("127.0.0.3", 0))
        cluster.clients.append(client)
        client.login(name, password_of(name))
        return client

    held = [connection(first, "bob"), connection(second, "carol"), connection(first, "bob")]  # 3, on both
    with pytest.raises(ChatError, match="too many connections from your address"):
        connection(second, "carol")
    held[0].close()  # one goes: on the other node, its place is free again
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            connection(second, "carol")
            break
        except ChatError:
            assert time.monotonic() < deadline, "a closed connection still counted on the other node"
            time.sleep(0.1)
    alice = cluster.log_in("alice", second)  # from another address: not counted with these
    alice.say("still open to others")
    assert wait_for(alice, said("still open to others")).ref


def test_a_stopped_node_blocks_nobody_and_catches_up_when_it_wakes(cluster, tmp_path):
    import signal

    first, second = two_nodes(cluster, tmp_path)
    alice = cluster.log_in("alice", first)
    bob, carol = cluster.log_in("bob", second), cluster.log_in("carol", second)
    first.process.send_signal(signal.SIGSTOP)  # a node that does nothing at all: the slowest there is
    try:
        for text in ("while node one sleeps", "and again"):
            bob.say(text)
            wait_for(carol, said(text))  # the others go on at once
    finally:
        first.process.send_signal(signal.SIGCONT)
    assert [wait_for(alice, said(text)).text for text in ("while node one sleeps", "and again")] == [
        "while node one sleeps",
        "and again",
    ]


def test_the_message_of_the_day_and_an_ignore_list_hold_on_every_node(cluster, tmp_path):
    from securechat.protocol import Notice

    assert server_command("role", "alice", "admin", "--backend", cluster.redis_url).returncode == 0
    first, second = two_nodes(cluster, tmp_path)
    alice = cluster.log_in("alice", first)
    alice.command("motd", "one message for the whole service")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.text == "message of the day set")
    bob = cluster.log_in("bob", second)
    wait_for(bob, lambda event: isinstance(event, Notice) and "one message for the whole service" in event.text)

    carol_laptop, carol_phone = cluster.log_in("carol", first), cluster.log_in("carol", second)
    carol_laptop.command("ignore", "bob")
    wait_for(carol_laptop, lambda event: isinstance(event, Notice) and event.text.startswith("you ignore bob"))
    deadline = time.monotonic() + TIMEOUT  # the other node hears of it through Redis; its /ignore tells
    while time.monotonic() < deadline:
        carol_phone.command("ignore")
        # "you ignore no one" until the phone's node has heard: asked again until it has.
        listed = wait_for(carol_phone, lambda event: isinstance(event, Notice) and event.text.startswith("you ignore"))
        if listed.text == "you ignore: bob":
            break
        time.sleep(0.05)
    else:
        pytest.fail("carol's other device never learnt whom she ignores")
    bob.say("carol's phone must not show this")
    alice.say("but this")
    assert wait_for(carol_phone, lambda event: isinstance(event, Chat) and not event.history).text == "but this"


def test_a_join_or_part_on_one_node_is_one_on_the_accounts_devices_on_the_other(cluster, tmp_path):
    """alice's laptop is on node 1, her phone on node 2: a /join entered only the laptop (the phone's
    lines to #dev were refused until it logged in again), and a /part left the phone in #dev, where
    bob, on node 2, was never told alice left. On one node both follow, as the README says."""
    first, second = two_nodes(cluster, tmp_path)
    laptop, phone, bob = cluster.log_in("alice", first), cluster.log_in("alice", second), cluster.log_in("bob", second)
    laptop.join("#dev")
    wait_for(laptop, entered("#dev"))
    wait_for(phone, entered("#dev"))
    bob.join("#dev")
    wait_for(bob, entered("#dev"))
    phone.say("from the phone", "#dev")
    wait_for(bob, said("from the phone"))
    laptop.part("#dev", "bye")
    wait_for(phone, lambda event: isinstance(event, RoomMessage) and event.room == "#dev" and not event.joined)
    wait_for(bob, lambda event: isinstance(event, Notice) and event.event == "left" and event.name == "alice")
    bob.who("#dev")
    assert wait_for(bob, lambda event: isinstance(event, Roster) and event.room == "#dev").members == ["bob"]


def test_an_invitation_reaches_the_invitee_on_the_other_node(cluster, tmp_path):
    # carol, on node 2 only, was never told: the notice went to the inviting node's sessions of her.
    first, second = two_nodes(cluster, tmp_path)
    alice, carol = cluster.log_in("alice", first), cluster.log_in("carol", second)
    alice.join("#secret")
    wait_for(alice, entered("#secret"))
    alice.command("mode", "#secret", "+i")
    wait_for(alice, lambda event: isinstance(event, Notice) and "+i" in event.text)
    alice.command("invite", "#secret", "carol")
    told = wait_for(carol, lambda event: isinstance(event, Notice) and "invited you" in event.text)
    assert told.text == "alice invited you to #secret: /join #secret"
    assert not [event for event in drain(carol) if isinstance(event, Notice) and "invited you" in event.text]


def test_an_away_account_answers_a_sender_once_an_hour_whichever_node_each_line_comes_through(cluster, tmp_path):
    # Each node kept its own memory of whom it had told: bob heard "erin is away" once per node.
    first, second = two_nodes(cluster, tmp_path)
    erin = cluster.log_in("erin", second)
    laptop, phone = cluster.log_in("bob", first), cluster.log_in("bob", second)
    erin.command("away", "at lunch")
    wait_for(erin, lambda event: isinstance(event, Notice) and "you are marked away" in event.text)
    laptop.private("erin", "lunch plans?")
    wait_for(laptop, lambda event: isinstance(event, Notice) and event.text == "erin is away: at lunch")
    phone.private("erin", "ping again")
    phone.command("whois", "erin")  # answered after the /msg's answer, if there is one
    seen: list[object] = []
    wait_for(phone, lambda event: seen.append(event) or (isinstance(event, Notice) and event.text.startswith("erin:")))
    assert not [event for event in seen if isinstance(event, Notice) and "is away" in event.text]


def test_the_roster_on_entering_a_room_marks_an_account_away_on_another_node(cluster, tmp_path):
    first, second = two_nodes(cluster, tmp_path)
    alice = cluster.log_in("alice", first)
    alice.command("away", "lunch")
    wait_for(alice, lambda event: isinstance(event, Notice) and "you are marked away" in event.text)

    def roster_on_entering(name: str) -> Roster:
        client = cluster.log_in(name, second)
        try:
            return wait_for(client, lambda event: isinstance(event, Roster) and event.room == "#lobby")
        finally:
            client.close()

    deadline = time.monotonic() + TIMEOUT  # node 2 hears of it through Redis
    while (roster := roster_on_entering("bob")).away != ["alice"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert roster.away == ["alice"], roster
    alice.command("back")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.text == "you are back")
    deadline = time.monotonic() + TIMEOUT
    while (roster := roster_on_entering("carol")).away and time.monotonic() < deadline:
        time.sleep(0.1)
    assert roster.away == [], roster


def test_a_refused_login_by_an_unknown_name_does_not_read_every_account_from_redis(tmp_path, users_file, redis_server):
    """A name not spelled as stored is looked up in any case, before any throttle: with accounts in Redis
    that read every account (HGETALL) at each login by a name that is no account, a guesser's included."""

    import_accounts(users_file, redis_server.url)
    node = ServerProcess(
        [
            "--port",
            "0",
            "--users",
            str(users_file),
            "--data-dir",
            str(tmp_path / "node"),
            "--backend",
            redis_server.url,
            "--log-level",
            "WARNING",
            "--ping-interval",
            "60",
            "--ping-timeout",
            "120",
        ]  # keepalive: every 5 s
    )
    reads: list[str] = []
    watcher = redis.Redis.from_url(redis_server.url)
    stop = threading.Event()

    def watch() -> None:
        with watcher.monitor() as monitor:
            for command in monitor.listen():
                if stop.is_set():
                    return
                if command["command"].upper().startswith("HGETALL") and USERS_KEY in command["command"]:
                    reads.append(command["command"])

    thread = threading.Thread(target=watch, daemon=True)
    try:
        outcomes = []
        for number in range(8):  # a guesser at names that are no accounts, from its own address
            client = client_of(node, tmp_path / "known_hosts_guesser", source_address=("127.0.0.2", 0))
            try:
                client.login(f"Ghost{number}", "whatever")
            except LoginRefused as exc:
                outcomes.append(exc.code)
            finally:
                client.close()
            if number == 3:
                thread.start()
                time.sleep(0.3)
        assert outcomes[-4:] == ["rate_limited"] * 4, outcomes  # told to wait: no password is checked
        time.sleep(0.3)
        assert len(reads) <= 1, f"{len(reads)} reads of every account for 4 refused logins"  # (1: a keepalive)
    finally:
        stop.set()
        if thread.is_alive():
            watcher.ping()  # one more command for the monitor to see, and stop at
            thread.join(TIMEOUT)
        watcher.close()
        node.stop()


def test_a_first_start_on_an_empty_redis_copies_the_accounts_of_users_json(tmp_path, users_file, redis_server):
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    node = ServerProcess([*where, "--backend", redis_server.url, "--log-level", "WARNING"])
    try:
        client = client_of(node, tmp_path / "known_hosts")
        client.login("alice", password_of("alice"))
        client.close()
    finally:
        _, errors = node.stop()
    assert "Redis held no accounts: copied 6 from" in errors
    assert "alice" in server_command("users", "--backend", redis_server.url).stdout


def test_after_redis_lost_its_data_a_node_does_not_bring_back_the_accounts_of_users_json(tmp_path, users_file):
    """users.json is copied into Redis once: the account commands with --backend never write it, so
    after a loss of Redis's data a copy would bring back deleted accounts and old passwords."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    (tmp_path / "volatile").mkdir()
    volatile = RedisServer(tmp_path / "volatile", durable=False)
    try:
        where = ["--port", "0", "--users", str(users_file), "--backend", volatile.url, "--log-level", "WARNING"]
        node = ServerProcess([*where, "--data-dir", str(tmp_path / "data")])
        assert server_command("deluser", "carol", "--backend", volatile.url).returncode == 0
        _, errors = node.stop()
        assert "Redis held no accounts: copied 6 from" in errors
        marker = tmp_path / "data" / "accounts_in_redis"
        assert marker.stat().st_mode & 0o777 == 0o600

        volatile.restart()  # it comes back empty
        node = ServerProcess([*where, "--data-dir", str(tmp_path / "data")])
        _, errors = node.stop()
        assert "Redis held no accounts: copied" not in errors
        refusals = [line for line in errors.splitlines() if " ERROR " in line]
        assert len(refusals) == 1, errors
        assert "holds no accounts, though it held them before" in refusals[0]
        assert "python server.py import-users FILE --backend URL" in refusals[0]
        assert server_command("users", "--backend", volatile.url).stdout == ""  # carol is not back

        # Redis keeps the record too: a node from a copy without the marker (made before the first
        # start) does not copy users.json into a Redis whose accounts were all deleted.
        assert server_command("import-users", str(users_file), "--backend", volatile.url).returncode == 0
        node = ServerProcess([*where, "--data-dir", str(tmp_path / "data")])  # Redis records it held accounts
        node.stop()
        for name in ("alice", "bob", "carol", "dave", "erin", "echo"):
            assert server_command("deluser", name, "--backend", volatile.url).returncode == 0
        shutil.copytree(tmp_path / "data", tmp_path / "copy", ignore=shutil.ignore_patterns("accounts_in_redis"))
        node = ServerProcess([*where, "--data-dir", str(tmp_path / "copy")])
        _, errors = node.stop()
        assert "Redis held no accounts: copied" not in errors
        assert "holds no accounts, though it held them before" in errors
        assert server_command("users", "--backend", volatile.url).stdout == ""
    finally:
        volatile.stop()


# --------------------------------------------------------------------------- the backend's own guarantees


def backend_of(redis_server, **options):
    return RedisBackend(redis_server.url, b"k" * 32, **options)


#: The append script's last arguments for a line with no flood charge and no sequence floor.
NO_CHARGE = ["", 0, 0, 0, 0]


class Recorder:
    """A subscriber that keeps what it is handed, and can be told to fail once."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fail_next = False

    def on_room_event(self, room, message, origin_session, ref):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug in the hub")
        self.lines.append(getattr(message, "text", ""))

    def on_private(self, account, message, origin_session, ref):
        pass

    def on_presence(self, room, notice):
        pass

    def on_account_changed(self, account):
        pass

    def on_room_gap(self, room, missed):
        self.lines.append(f"{missed} lines of {room} were lost to an outage")

    def on_privates_missed(self, after_id, before_id):
        pass

    def on_control_missed(self):
        pass

    def on_members_gone(self, room, accounts):
        pass


def test_the_reader_survives_a_failing_delivery_and_a_retried_append_is_stored_once(redis_server):
    backend = backend_of(redis_server)
    recorder = Recorder()
    backend.start(recorder)
    try:
        backend.watch("#r", 0, generation=1)
        recorder.fail_next = True
        backend.publish_room("#r", Chat(sender="alice", text="lost to a bug", sent_at=0.0))
        backend.publish_room("#r", Chat(sender="alice", text="still heard", sent_at=0.0))
        deadline = time.monotonic() + TIMEOUT
        while "still heard" not in recorder.lines and time.monotonic() < deadline:
            time.sleep(0.02)
        assert recorder.lines == ["still heard"]
        # A notice the hub fails on is passed all the same: the next line is no gap.
        recorder.fail_next = True
        backend.publish_room("#r", Notice(event="info", text="a notice the hub fails on"))
        backend.publish_room("#r", Chat(sender="alice", text="after the notice", sent_at=0.0))
        deadline = time.monotonic() + TIMEOUT
        while "after the notice" not in recorder.lines and time.monotonic() < deadline:
            time.sleep(0.02)
        assert recorder.lines == ["still heard", "after the notice"]

        # The script ran but its answer was lost: the client library sends it again. Same id, once.
        numbered = Chat(sender="alice", text="once", sent_at=time.time(), room="#r", id=backend._propose_id())
        sealed = backend._seal("#r", numbered, "", "")
        keys = [backend._stream_key("#r"), "chat:seq", "chat:id", "chat:flood:alice"]
        args = [numbered.id, "#r", 1000, backend._key_id, sealed, "", "alice", 100, "0", *NO_CHARGE]
        first = [int(value) for value in backend._append(keys=keys, args=args)]
        assert first[0] > 0 and [int(value) for value in backend._append(keys=keys, args=args)] == first
        # Another line proposing the id that one took is refused, and given the next id, set aside for it.
        other = backend._seal("#r", replace(numbered, text="another"), "", "")
        args = [numbered.id, "#r", 1000, backend._key_id, other, "", "alice", 100, "0", *NO_CHARGE]
        assert [int(value) for value in backend._append(keys=keys, args=args)] == [-1, numbered.id + 1]
        assert "another" not in [event.text for event in backend.recent("#r", 10)]
        reserved = backend._seal("#r", replace(numbered, id=numbered.id + 1, text="another"), "", "")
        args = [numbered.id + 1, "#r", 1000, backend._key_id, reserved, "", "alice", 100, "1", *NO_CHARGE]
        assert int(backend._append(keys=keys, args=args)[0]) > first[0]  # taken, though no higher than the counter
        texts = [event.text for event in backend.recent("#r", 10)]
        assert texts.count("once") == 1 and texts.count("another") == 1

        # A line over its sender's flood budget is refused in the same step, and not stored.
        budget = LineCharge("bob", cost=1.0, rate=0.01, burst=2)
        for text in ("first", "second"):
            backend.publish_room("#r", Chat(sender="bob", text=text, sent_at=0.0), charge=budget)
        with pytest.raises(OverBudget):
            backend.publish_room("#r", Chat(sender="bob", text="third", sent_at=0.0), charge=budget)
        texts = [event.text for event in backend.recent("#r", 10)]
        assert texts[-2:] == ["first", "second"] and "third" not in texts
    finally:
        backend.close()


def test_after_redis_lost_its_data_ids_and_sequence_numbers_go_on_above_what_was_seen(tmp_path):
    """A Redis with no persistence restarts empty. No line may then be numbered below what the
    processes' readers have read (they would never see it), nor reuse a room's sequence numbers (a
    device catching up by them would skip lines): not a line said the moment Redis is back, not one
    from a process started after it, not one in a room no longer read here."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    (tmp_path / "volatile").mkdir()
    volatile = RedisServer(tmp_path / "volatile", durable=False)
    before = backend_of(volatile)
    recorder = SeqRecorder()
    after = None
    try:
        before.start(recorder)
        before.watch("#r", 0, generation=1)
        before.watch("#left", 0, generation=2)
        for number in range(5):
            before.publish_room("#r", Chat(sender="alice", text=f"before {number}", sent_at=0.0))
            before.publish_room("#left", Chat(sender="alice", text=f"left {number}", sent_at=0.0))
        wait_until(lambda: len(recorder.texts) == 10)
        before.unwatch("#left", 2)  # its last member here left: no longer read
        volatile.restart()
        store = redis.Redis(port=volatile.port)
        assert not store.exists("chat:stream:#r")  # the room's lines are gone with the rest
        # Said the moment Redis is back, before this process's reader has put anything back.
        at_once = before.publish_room("#r", Chat(sender="alice", text="at once", sent_at=0.0))
        assert at_once.seq == 6 and at_once.id > 10
        # The process that was there puts its floors back as soon as its reader is back, even those of
        # a room nobody on it is in any more.
        wait_until(lambda: int(store.hget("chat:seq", "#left") or 0) >= 5)
        store.close()
        after = backend_of(volatile)  # a process started after the loss: it has seen nothing
        after.start(Recorder())
        line = after.publish_room("#r", Chat(sender="bob", text="after the loss", sent_at=0.0))
        assert line.id > at_once.id and line.seq == 7
        wait_until(lambda: "after the loss" in recorder.texts)
        assert recorder.seqs["#r"] == list(range(1, 8))
        assert not [text for text in recorder.texts if "lost" in text]
        elsewhere = after.publish_room("#left", Chat(sender="bob", text="back in #left", sent_at=0.0))
        assert elsewhere.seq == 6  # its numbering goes on, though nobody on the first process is in it
    finally:
        for backend in (before, after):
            if backend is not None:
                backend.close()
        volatile.stop()


class Session:
    """A logged-in session as the hub sees it, keeping what it is handed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.session_id = f"session-{name}"
        self.received: list[object] = []

    def deliver(self, message: object) -> None:
        self.received.append(message)

    def end(self, reason: str) -> None:
        pass

    def said(self) -> list[str]:
        return [message.text for message in self.received if isinstance(message, Chat)]


class FlakyRedisBackend(RedisBackend):
    """The Redis backend, where the test can make the broker fail the next roster entry or room
    watch, or hold the next watch, or the next entry of one session, until it lets it go on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_next_entry = self.fail_next_watch = self.hold_next_watch = False
        self.hold_entry_of = ""
        self.inside = threading.Event()
        self.release = threading.Event()

    def _hold(self) -> None:
        self.inside.set()
        assert self.release.wait(TIMEOUT)

    def enter_room(self, room: str, account: str, session_id: str) -> None:
        if self.fail_next_entry:
            self.fail_next_entry = False
            raise BackendUnavailable("the server cannot reach its message broker just now")
        if session_id == self.hold_entry_of:
            self.hold_entry_of = ""
            self._hold()
        super().enter_room(room, account, session_id)

    def watch(self, room: str, after_id: int, generation: int) -> None:
        if self.fail_next_watch:
            self.fail_next_watch = False
            raise BackendUnavailable("the server cannot reach its message broker just now")
        if self.hold_next_watch:
            self.hold_next_watch = False
            self._hold()
        super().watch(room, after_id, generation)


def hub_on(backend: RedisBackend, *names: str) -> tuple[ChatHub, list[Session]]:
    hub = ChatHub(backend)
    sessions = [Session(name) for name in names]
    for session in sessions:
        rooms, _ = hub.open_session(session, "test", "127.0.0.1")
        hub.enter_rooms(session, rooms)
    return hub, sessions


@pytest.mark.parametrize("failing", ["fail_next_entry", "fail_next_watch"])
def test_an_entry_the_broker_fails_leaves_no_half_member_and_no_room_read_for_nobody(redis_server, failing):
    """Whether the broker fails the session's roster entry or the room's watch, the entry is undone:
    no session half in the room, no room nobody reads, and the next /join works."""
    backend = FlakyRedisBackend(redis_server.url, b"k" * 32)
    hub, (alice,) = hub_on(backend, "alice")
    try:
        setattr(backend, failing, True)
        with pytest.raises(BackendUnavailable):
            hub.join(alice, "#r")
        assert hub.local_room("#r") is None and "#r" not in backend._watched  # nobody here: not read
        hub.join(alice, "#r")  # not "you are already in #r": the failed entry left nothing behind
        hub.say(alice, "#r", "in at last")
        wait_until(lambda: "in at last" in alice.said())
    finally:
        hub.close()


def test_a_room_made_again_while_an_older_one_is_still_being_watched_keeps_its_reader(redis_server):
    """The watch of a room made earlier can reach the backend after the room was retired and made
    again: it must neither stop the newer room's reading nor outlive it."""
    backend = FlakyRedisBackend(redis_server.url, b"k" * 32)
    other = backend_of(redis_server)  # another server process
    hub, (alice, bob, carol) = hub_on(backend, "alice", "bob", "carol")
    try:
        hub.ensure_room("#r", owner="alice")
        backend.hold_next_watch = True
        entering = threading.Thread(target=hub.join, args=(bob, "#r"))
        entering.start()  # makes the first local #r, and is held in its watch
        assert backend.inside.wait(TIMEOUT)
        hub.join(alice, "#r")
        hub.part(alice, "#r")  # the first #r is retired (its watch has not even begun)
        hub.join(carol, "#r")  # a second #r, watched
        backend.release.set()  # the first room's watch arrives now, late
        entering.join(TIMEOUT)
        assert not entering.is_alive()
        assert hub.local_room("#r").roster()[0] == ["bob", "carol"]
        other.publish_room("#r", Chat(sender="dave", text="from the other process", sent_at=0.0))
        wait_until(lambda: "from the other process" in carol.said() and "from the other process" in bob.said())
        hub.part(bob, "#r")
        hub.part(carol, "#r")
        assert hub.local_room("#r") is None and "#r" not in backend._watched  # read no longer
    finally:
        backend.release.set()
        other.close()
        hub.close()


def test_a_device_that_ends_while_another_device_enters_it_is_left_in_no_room(redis_server):
    backend = FlakyRedisBackend(redis_server.url, b"k" * 32)
    hub = ChatHub(backend)
    phone, laptop = Session("alice"), Session("alice")
    phone.session_id, laptop.session_id = "phone", "laptop"
    for session in (phone, laptop):
        rooms, _ = hub.open_session(session, "test", "127.0.0.1")
        hub.enter_rooms(session, rooms)
    try:
        backend.hold_entry_of = "laptop"
        joining = threading.Thread(target=hub.join, args=(phone, "#r"))
        joining.start()  # the phone's /join enters the laptop too, and is held there
        assert backend.inside.wait(TIMEOUT)
        hub.close_session(laptop, "quit")  # the laptop ends meanwhile
        backend.release.set()
        joining.join(TIMEOUT)
        assert [session.session_id for session in hub.local_room("#r").sessions_of("alice")] == ["phone"]
        assert ("#r", "laptop") not in backend._local_rooms  # not kept on the room's roster either
    finally:
        backend.release.set()
        hub.close()


def test_lines_only_shown_as_history_count_as_seen_after_redis_lost_its_data(tmp_path):
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    (tmp_path / "volatile").mkdir()
    volatile = RedisServer(tmp_path / "volatile", durable=False)
    earlier = backend_of(volatile)  # a process that said three lines, then went away
    for number in range(3):
        earlier.publish_room("#r", Chat(sender="bob", text=f"old {number}", sent_at=0.0))
    earlier.close()
    backend = backend_of(volatile)
    try:
        shown = backend.recent("#r", 10)  # what a user joining here is shown
        assert [(event.id, event.seq) for event in shown] == [(1, 1), (2, 2), (3, 3)]
        volatile.restart()
        line = backend.publish_room("#r", Chat(sender="alice", text="after the loss", sent_at=0.0))
        assert line.id > 3 and line.seq == 4
    finally:
        backend.close()
        volatile.stop()


class SeqRecorder(Recorder):
    """A subscriber that keeps the texts of what it is handed, and each room's sequence numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.seqs: dict[str, list[int]] = {}

    def on_room_event(self, room, message, origin_session, ref):
        self.texts.append(getattr(message, "text", ""))
        if isinstance(message, Chat):
            self.seqs.setdefault(room, []).append(message.seq)


def test_lines_published_at_once_on_two_processes_reach_both_once_each_in_one_order(redis_server):
    """Each process hands its own lines over at once when it can, the rest as its reader reads them:
    whichever way, every line reaches every process once, all in the same order, each sender's in its own."""
    backends = [backend_of(redis_server), backend_of(redis_server)]
    recorders = [Recorder(), Recorder()]
    for backend, recorder in zip(backends, recorders, strict=True):
        backend.start(recorder)
        backend.watch("#r", 0, generation=1)
    try:
        per_sender = 60

        def say(backend, sender):
            for number in range(per_sender):
                backend.publish_room("#r", Chat(sender=sender, text=f"{sender} {number}", sent_at=0.0))

        threads = [
            threading.Thread(target=say, args=(backend, f"{name}{index}"))
            for index, backend in enumerate(backends)
            for name in ("a", "b")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=TIMEOUT * 2)
        total = per_sender * len(threads)
        deadline = time.monotonic() + TIMEOUT
        while any(len(recorder.lines) < total for recorder in recorders) and time.monotonic() < deadline:
            time.sleep(0.02)
        first, second = (recorder.lines for recorder in recorders)
        assert len(first) == total and len(set(first)) == total, "a line missing or handed over twice"
        assert first == second, "the two processes saw the room in different orders"
        for sender in ("a0", "b0", "a1", "b1"):
            assert [line for line in first if line.split()[0] == sender] == [f"{sender} {n}" for n in range(per_sender)]
        ids = [event.id for event in backends[0].recent("#r", total)]
        assert ids == sorted(ids) and len(set(ids)) == total
    finally:
        for backend in backends:
            backend.close()


def test_typed_user_names_reach_redis_only_as_keyed_hashes(cluster, tmp_path):
    from securechat.client import LoginRefused

    first, _ = two_nodes(cluster, tmp_path)
    client = client_of(first, tmp_path / "known_hosts_typo")
    cluster.clients.append(client)
    with pytest.raises(LoginRefused):
        client.login("correct horse battery staple", "whatever")  # a password in the name box
    store = redis.Redis.from_url(cluster.redis_url)
    try:
        keys = list(store.scan_iter())
        assert any(key.startswith(b"chat:throttle:") for key in keys)
        assert not any(b"horse" in key for key in keys)
    finally:
        store.close()


def test_with_no_join_history_old_lines_are_not_sent_as_news(cluster, tmp_path):
    first, second = two_nodes(cluster, tmp_path, "--join-history", "0")
    alice = cluster.log_in("alice", first)
    alice.join("#old")
    wait_for(alice, entered("#old"))
    alice.say("said before bob came", "#old")
    wait_for(alice, said("said before bob came"))
    bob = cluster.log_in("bob", second)  # the first of node two in #old: it starts reading the room
    bob.join("#old")
    wait_for(bob, entered("#old"))
    alice.say("news", "#old")
    heard = wait_for(bob, lambda event: isinstance(event, Chat))
    assert heard.text == "news"


# --------------------------------------------------------------------------- a Redis that cannot be used


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://chat:s3cret@127.0.0.1:notaport/0", "the port must be a number from 1 to 65535"),
        ("redis://chat:s3cret@127.0.0.1:16391/abc", "the DB (after the last /) must be a number"),
        ("redis://chat:s3cret@:6379/0", "the URL names no host"),
    ],
)
def test_a_bad_backend_url_is_one_line_for_the_server_and_every_account_command(tmp_path, users_file, url, problem):
    """Not a traceback from the Redis client, nor a DB it reads as 0 without a word."""
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    for command in (
        [*where, "--backend", url],
        ["users", "--backend", url],
        ["import-users", str(users_file), "--backend", url],
        ["deluser", "alice", "--backend", url],
    ):
        done = server_command(*command)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.startswith("error: --backend ") and problem in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "s3cret" not in done.stderr + done.stdout


def test_a_redis_that_wants_a_password_says_so_and_never_shows_one(tmp_path, users_file):
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    (tmp_path / "locked").mkdir()
    locked = RedisServer(tmp_path / "locked", password="the-right-one")
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    place = f"127.0.0.1:{locked.port}"
    wrong = f"redis://:not-this-one@{place}/0"
    try:
        for command, url, expected in (
            (
                [*where],
                locked.url,
                f"error: Redis at {place} needs a password (give it in the URL or in CHAT_REDIS_PASSWORD)",
            ),
            (["users"], locked.url, f"error: Redis at {place} needs a password"),
            ([*where], wrong, f"error: Redis at {place} refused the password"),
            (["users"], wrong, f"error: Redis at {place} refused the password"),
        ):
            done = server_command(*command, "--backend", url)
            assert done.returncode == 1 and done.stderr.startswith(expected), done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert "not-this-one" not in done.stderr + done.stdout
        # The password in CHAT_REDIS_PASSWORD, kept out of ps: refused when wrong, used when right.
        for password, status in (("not-this-one", 1), ("the-right-one", 0)):
            done = subprocess.run(
                [sys.executable, str(ROOT / "server.py"), "users", "--backend", locked.url],
                capture_output=True,
                text=True,
                timeout=TIMEOUT * 4,
                env={**os.environ, "CHAT_REDIS_PASSWORD": password},
            )
            assert done.returncode == status, done.stderr
            assert password not in done.stderr + done.stdout
    finally:
        locked.stop()


# --------------------------------------------------------------------------- one cluster key


def test_a_node_with_another_cluster_key_is_refused_at_start(cluster, tmp_path, redis_server):
    """A fresh data directory has a cluster key of its own: such a node would see the others in /who
    and never hear them (nor they it). It says so and stops, and the running node goes on."""
    first = cluster.node(tmp_path / "node1")
    where = ["--port", "0", "--users", str(cluster.users_file), "--data-dir", str(tmp_path / "fresh")]
    done = server_command(*where, "--backend", redis_server.url)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    # The ids are key_id() of each data directory's cluster_key: no secret is shown.
    first_id = key_id(bytes.fromhex((tmp_path / "node1" / "cluster_key").read_text()))
    fresh_id = key_id(bytes.fromhex((tmp_path / "fresh" / "cluster_key").read_text()))
    assert done.stderr.strip() == (
        f"error: this node's cluster_key (id {fresh_id}) is not the one the other nodes use (id {first_id}):"
        " copy server_key.pem, token_secret and cluster_key from a running node's data directory"
    )
    # A directory with the cluster key alone copied would show clients another server key (a
    # "KEY HAS CHANGED" stop on failover) and refuse the others' tokens: refused too.
    half = tmp_path / "half"
    half.mkdir(mode=0o700)
    shutil.copy2(tmp_path / "node1" / "cluster_key", half / "cluster_key")
    where[where.index(str(tmp_path / "fresh"))] = str(half)
    done = server_command(*where, "--backend", redis_server.url)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: this node's server_key.pem (SHA256:"), done.stderr
    assert "copy server_key.pem, token_secret and cluster_key" in done.stderr
    # A copy of the running node's data directory joins.
    shutil.copytree(tmp_path / "node1", tmp_path / "node2")
    second = cluster.node(tmp_path / "node2")
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    for client in (alice, bob):
        client.join("#mix")
        wait_for(client, entered("#mix"))
    bob.say("heard across the nodes", "#mix")
    wait_for(alice, said("heard across the nodes"))


def test_after_the_key_is_changed_old_entries_are_skipped_saying_under_which_key(redis_server, caplog):
    """The way to change the cluster key (stop every node, delete chat:cluster_key_id): what was sealed
    under the old key can no longer be read, and the log says why, with no secret and no text."""
    old_key, new_key = b"o" * 32, b"n" * 32
    before = RedisBackend(redis_server.url, old_key)
    try:
        before.publish_room("#r", Chat(sender="alice", text="under the old key", sent_at=0.0))
    finally:
        before.close()
    store = redis.Redis.from_url(redis_server.url)
    assert store.get("chat:cluster_key_id") == key_id(old_key).encode()
    with pytest.raises(BackendMismatch):
        RedisBackend(redis_server.url, new_key)
    store.delete("chat:cluster_key_id")
    store.close()
    after = RedisBackend(redis_server.url, new_key)
    try:
        with caplog.at_level("WARNING", logger="chat.server"):
            assert after.recent("#r", 10) == []
    finally:
        after.close()
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert skipped == [
        f"skipped a message in #r that failed to open (id 1): sealed under cluster key id {key_id(old_key)},"
        f" which this node does not have (its own is id {key_id(new_key)})"
    ]
    assert "under the old key" not in caplog.text


def test_a_fresh_deployment_started_with_several_workers_logs_no_false_loss_of_accounts(tmp_path, users_file):
    """Review b53: on a fresh data directory and an empty Redis, ``--workers N`` starts N processes at
    once; one copies users.json in, and the others must not log that Redis "holds no accounts, though
    it held them before: nobody can log in" (they read the empty store before the copy, then saw the
    marker the copier wrote). Racy by nature: a few fresh starts, with four workers each."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    for attempt in range(5):
        folder = tmp_path / f"attempt{attempt}"
        (folder / "redis").mkdir(parents=True)
        empty = RedisServer(folder / "redis", durable=False)
        try:
            node = ServerProcess(
                [
                    *("--port", "0", "--users", str(users_file), "--data-dir", str(folder / "data")),
                    *("--backend", empty.url, "--workers", "4", "--log-level", "WARNING"),
                ]
            )
            _, errors = node.stop()
        finally:
            empty.stop()
        assert "Redis held no accounts: copied 6" in errors, errors
        assert "though it held them before" not in errors, f"attempt {attempt}:\n{errors}"


def test_after_redis_lost_its_data_a_node_with_another_key_does_not_run_silently_beside_the_others(
    cluster, tmp_path, redis_server
):
    """Review b53: a running node records its key id again only on its next refresh (up to
    SESSION_REFRESH later), with SET NX and without looking at the answer. A node with another key
    that starts in that window claims the empty record, and from then on the two run side by side,
    each deaf to the other's lines, and neither ever says so. It must be refused, or one of them
    must say that the cluster's key is not its own."""
    from securechat.redis_backend import SESSION_REFRESH

    first = cluster.node(tmp_path / "node1")
    time.sleep(1.0)  # settled: its reader has made its first round
    with redis.Redis.from_url(redis_server.url) as store:
        store.flushall()  # a Redis that lost its data (restarted without persistence, or flushed)
    where = ["--port", "0", "--users", str(cluster.users_file), "--data-dir", str(tmp_path / "fresh")]
    try:
        second = ServerProcess([*where, "--backend", redis_server.url, "--log-level", "WARNING"])
    except RuntimeError as refused:  # what a fix may do: refuse it at start
        assert "cluster_key" in str(refused), str(refused)
        return
    cluster.nodes.append(second)
    time.sleep(2 * SESSION_REFRESH + 2)  # both have refreshed their presence and key id meanwhile
    _, first_errors = first.stop()
    _, second_errors = second.stop()
    assert "cluster_key" in first_errors + second_errors, (
        "two nodes with different cluster keys share one Redis, and neither said so:\n" + first_errors + second_errors
    )


def test_a_password_given_in_the_urls_query_is_never_shown(tmp_path, users_file):
    """Review b53: the Redis client takes ``?password=`` (and ``?username=``) from the URL's query as
    it takes ``user:password@``. hide_password only hides the latter: the server prints the password
    in "Rooms shared through ...", and a wrong one is reported as no password at all."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    (tmp_path / "locked").mkdir()
    locked = RedisServer(tmp_path / "locked", password="the-right-one")
    place = f"127.0.0.1:{locked.port}"
    try:
        where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), *where, "--backend", f"redis://{place}/0?password=the-right-one"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            shown = []
            while line := server.stdout.readline():
                shown.append(line)
                if line.startswith("Listening on"):
                    break
        finally:
            server.terminate()
            server.wait(timeout=TIMEOUT * 2)
        assert any(line.startswith("Listening on") for line in shown), shown
        assert not any("the-right-one" in line for line in shown), shown
        done = server_command("users", "--backend", f"redis://{place}/0?password=not-this-one")
        assert done.returncode == 1 and "not-this-one" not in done.stderr + done.stdout, done.stderr
        assert done.stderr.startswith(f"error: Redis at {place} refused the password"), done.stderr
    finally:
        locked.stop()
