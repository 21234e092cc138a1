"""Faults a deployment on Redis meets: a node that falls behind the streams, a race between nodes,
data forged in Redis, a node killed outright. The nodes are real server processes
(``test_redis.Cluster``) or, where a moment must be held still to make a race deterministic, a hub
on a ``RedisBackend`` in this process beside them, as ``test_redis.py`` does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import (
    REDIS_SERVER,
    ROOT,
    TIMEOUT,
    HangsUp,
    ServerProcess,
    assert_a_notice_said_while_offline_is_not_counted_as_lost,
    drain,
    password_of,
    wait_for,
    wait_until,
)
from test_redis import (
    Cluster,
    Session,
    client_of,
    entered,
    hub_on,
    import_accounts,
    said,
    server_command,
    two_nodes,
)

from securechat.client import Disconnected, LoginRefused
from securechat.hub import ChatHub
from securechat.protocol import Chat, ErrorReply, Notice, Roster
from securechat.protocol import Room as RoomMessage
from securechat.redis_backend import RedisBackend


@pytest.fixture
def cluster(tmp_path, users_file, redis_server):
    cluster = Cluster(tmp_path, users_file, redis_server.url)
    yield cluster
    cluster.close()


def needs_redis() -> None:
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")


def drop(client) -> None:
    """The client's link dies without a word; it stays offline until ``come_back``."""
    client._shutdown_socket()
    wait_for(client, lambda event: isinstance(event, Disconnected))
    client.close()


def come_back(client) -> list[object]:
    client.connect()
    client.resume()
    return drain(client, quiet=0.5)


def stop(node) -> None:
    """SIGSTOP a node and wait until every thread of it is stopped (then it reads nothing more)."""
    import signal

    from conftest import process_state

    node.process.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{node.process.pid}/task")
    wait_until(lambda: all(process_state_of(task) == "T" for task in tasks.iterdir()))
    assert process_state(node.process.pid) == "T"


def process_state_of(task: Path) -> str:
    return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_topic_change_while_offline_is_not_reported_as_lines_lost(cluster, tmp_path):
    node = cluster.node(tmp_path / "node")
    assert_a_notice_said_while_offline_is_not_counted_as_lost(
        cluster.log_in("alice", node), cluster.log_in("bob", node)
    )


def other_process(redis_url: str, data_dir: Path):
    """Another server process of the deployment (same cluster key), in this test's process."""
    from securechat.redis_backend import RedisBackend

    return RedisBackend(redis_url, bytes.fromhex((data_dir / "cluster_key").read_text()))


def test_a_private_line_that_arrives_while_a_device_logs_in_is_shown_once(redis_server):
    """A session is registered for live private lines at the start of ``enter_rooms`` and reads its
    private catch-up at the end: a private line from another node in between comes both ways."""
    from test_redis import Session

    from securechat.hub import ChatHub
    from securechat.redis_backend import RedisBackend

    key = b"k" * 32
    other = RedisBackend(redis_server.url, key)  # bob's node

    class LoginMeanwhile(RedisBackend):
        """Bob's line lands (and is delivered live here) just before this node reads alice's catch-up."""

        armed = False

        def _private_lines_land_first(self, alice: Session) -> None:
            if self.armed:
                self.armed = False
                other.publish_private(Chat(sender="bob", recipient="alice", text="said as alice came", sent_at=0.0))
                wait_until(lambda: "said as alice came" in handed)  # read from the feed, handed to the hub

        def private_recent(self, account, limit):
            self._private_lines_land_first(alice)
            return super().private_recent(account, limit)

        def private_since(self, account, after_id, limit):
            self._private_lines_land_first(alice)
            return super().private_since(account, after_id, limit)

    backend = LoginMeanwhile(redis_server.url, key)
    hub = ChatHub(backend)
    handed: list[str] = []
    hub_on_private = hub.on_private

    def on_private(account, message, origin, ref) -> None:
        handed.append(message.text)
        hub_on_private(account, message, origin, ref)

    hub.on_private = on_private  # type: ignore[method-assign]
    alice = Session("alice")

    def received() -> list[str]:
        return [
            getattr(message, "text", "")
            for item in alice.received
            for message in (item.messages if hasattr(item, "messages") else [item])
        ]

    try:
        rooms, _ = hub.open_session(alice, "test", "127.0.0.1")
        backend.armed = True
        hub.enter_rooms(alice, rooms)
        assert received().count("said as alice came") == 1, received()
        # And a line the catch-up sent, which a feed read late then brings again, is not shown twice.
        late = next(message for message in backend.private_recent("alice", 10) if message.text == "said as alice came")
        hub.on_private("alice", late, "", "")
        assert received().count("said as alice came") == 1, received()
    finally:
        hub.close()
        other.close()


def test_a_logout_made_while_a_node_lagged_still_ends_the_session_there(cluster, tmp_path, redis_server):
    """A node learns of revocations made elsewhere only from the control stream, which keeps about
    10,000 entries (every /join, /part, mode or role change writes one). A node that falls further
    behind than that (stopped, or cut off from Redis while its clients stay, which SCALING.md says
    it survives) never learns of a /logout made meanwhile: the session it holds goes on for good,
    though its tokens are revoked in ``chat:revoked``."""
    import signal

    from securechat.protocol import ErrorReply
    from securechat.redis_backend import CONTROL_KEY, CONTROL_STREAM_LENGTH

    first, second = two_nodes(cluster, tmp_path)
    phone = cluster.log_in("alice", first)
    laptop = cluster.log_in("alice", second)
    stop(first)  # the node that holds the phone falls behind
    try:
        with redis.Redis.from_url(redis_server.url) as store:
            # Whatever a stopped node's pending blocking read gets is what it last had in flight.
            store.xadd(CONTROL_KEY, {"state": "#elsewhere"}, maxlen=CONTROL_STREAM_LENGTH, approximate=True)
        laptop.command("logout", phone.session)
        wait_for(laptop, lambda event: isinstance(event, Notice) and event.text == "ended 1 other session")
        with redis.Redis.from_url(redis_server.url) as store:
            assert store.zscore("chat:revoked", phone.token and _session_of(phone.token)) is not None
            # What a busy deployment writes meanwhile: a state change per join, part, mode, role...
            for _ in range(2 * CONTROL_STREAM_LENGTH // 1000):
                with store.pipeline(transaction=False) as pipe:
                    for _ in range(1000):
                        pipe.xadd(CONTROL_KEY, {"state": "#elsewhere"}, maxlen=CONTROL_STREAM_LENGTH, approximate=True)
                    pipe.execute()
    finally:
        first.process.send_signal(signal.SIGCONT)
    ended = wait_for(
        phone,
        lambda event: (
            isinstance(event, Disconnected) or (isinstance(event, ErrorReply) and event.code == "token_revoked")
        ),
        timeout=TIMEOUT * 2,
    )
    assert ended is not None


def _session_of(token: str) -> str:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})["sid"]


def _wait_for_log(node, text: str, timeout: float) -> None:
    """Read the node's standard error until a line holds ``text`` (the rest is left for ``stop``)."""
    import os
    import select
    import time

    fd = node.process.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"the node never logged {text!r}; it logged {seen.decode(errors='replace')!r}"
        if select.select([fd], [], [], min(left, 0.1))[0]:
            chunk = os.read(fd, 65536)
            assert chunk, "the node exited"
            seen += chunk


def _fall_behind(store, stream: str, bound: int) -> None:
    """What a busy deployment appends to ``stream`` while a node is stopped: more than it keeps."""
    for _ in range(2 * bound // 1000 + 1):
        with store.pipeline(transaction=False) as pipe:
            for _ in range(1000):
                pipe.xadd(stream, {"x": "1"}, maxlen=bound, approximate=True)
            pipe.execute()


def test_a_private_line_is_not_lost_in_silence_by_a_node_that_fell_behind(cluster, tmp_path, redis_server):
    """Live private lines reach a node only through ``chat:privates``, which keeps about 10,000
    entries. A node further behind than that skips the line and says nothing (a room's members are
    told how many lines they lost; a private line's recipient is not), and since the client then
    sees later lines, the line is not in its next catch-up either."""
    import signal

    from securechat.redis_backend import PRIVATE_FEED_LENGTH

    first, second = two_nodes(cluster, tmp_path)
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    stop(first)  # alice's node falls behind
    try:
        with redis.Redis.from_url(redis_server.url) as store:
            store.xadd("chat:privates", {"x": "1"})  # what its pending blocking read last had in flight
            bob.private("alice", "while your node lagged")
            wait_for(bob, said("while your node lagged"))
            _fall_behind(store, "chat:privates", PRIVATE_FEED_LENGTH)
    finally:
        first.process.send_signal(signal.SIGCONT)
    wait_for(
        alice,
        lambda event: (
            said("while your node lagged")(event)
            or (isinstance(event, Notice) and event.event == "info" and "private" in event.text)
        ),
        timeout=TIMEOUT * 2,
    )


def test_a_kick_made_while_a_node_fell_behind_still_takes_its_user_out(cluster, tmp_path, redis_server):
    """Each node takes its own sessions out of a room when it reads the kick's notice in the room's
    stream. A node further behind than the stream keeps reads a gap ("N lines ... were lost")
    instead, and its kicked user stays in the room for good: hearing it, and speaking in it."""
    import signal

    from securechat.protocol import ErrorReply
    from securechat.protocol import Room as RoomMessage

    first, second = two_nodes(cluster, tmp_path, "--history-limit", "10")
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    alice.join("#r")
    wait_for(alice, entered("#r"))
    bob.join("#r")
    wait_for(bob, entered("#r"))
    others = other_process(cluster.redis_url, tmp_path / "node1")
    others.history_limit = 10
    stop(second)  # bob's node falls behind
    try:
        with redis.Redis.from_url(redis_server.url) as store:
            store.xadd("chat:privates", {"x": "1"})  # what its pending blocking read last had in flight
        alice.command("kick", "#r", "bob", "spam")
        wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "moderation")
        for number in range(300):  # the room goes on talking, past what its stream keeps
            others.publish_room("#r", Chat(sender="carol", text=f"chatter {number}", sent_at=0.0))
    finally:
        second.process.send_signal(signal.SIGCONT)
        others.close()
    out = wait_for(
        bob,
        lambda event: isinstance(event, RoomMessage) and event.room == "#r" and not event.joined,
        timeout=TIMEOUT * 2,
    )
    assert out is not None
    bob.say("still here after the kick", "#r")
    assert isinstance(wait_for(bob, lambda event: isinstance(event, ErrorReply | Chat) and event.ref), ErrorReply)


def _age(store, key: str, account: str = "") -> None:
    """Move the expiry of the records in the hash ``key`` (of ``account``'s, if named) into the past:
    the 30 s a crashed node's records take to lapse, without the wait (the rest is left as it was)."""
    import json
    import time

    for field, value in store.hgetall(key).items():
        record = json.loads(value)
        if account and record.get("account") != account:
            continue
        record["expires"] = time.time() - 1
        store.hset(key, field, json.dumps(record))


def test_the_users_of_a_killed_node_are_seen_to_leave(cluster, tmp_path, redis_server):
    """kill -9 of a node: its users drop out of /who once their records lapse, but the members on the
    other nodes are never told they left, so every client's view of the room (``members``, the
    terminal's roster and name completion) keeps them for good, and "bob left" never comes."""
    import json
    import time

    from securechat.protocol import Roster
    from securechat.redis_backend import NODES_KEY, SESSION_REFRESH

    first, second = two_nodes(cluster, tmp_path)
    alice = cluster.log_in("alice", first)
    cluster.log_in("bob", second)
    wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "joined" and event.name == "bob")
    assert alice.members == ["alice", "bob"]
    second.process.kill()  # kill -9: no goodbye, no clean-up
    second.process.wait()
    with redis.Redis.from_url(redis_server.url) as store:  # ... and the 30 s its records take to lapse
        dead = {
            json.loads(value)["node"]
            for value in store.hvals("chat:roster:#lobby")
            if json.loads(value)["account"] == "bob"
        }
        _age(store, "chat:roster:#lobby", "bob")
        _age(store, "chat:sessions:bob")
        store.zadd(NODES_KEY, {node: time.time() - 300 for node in dead})  # its last heartbeat, long ago
    alice.who("#lobby")
    roster = wait_for(alice, lambda event: isinstance(event, Roster) and event.room == "#lobby")
    assert roster.members == ["alice"]  # the server's roster has let bob go
    wait_for(
        alice,
        lambda event: isinstance(event, Notice) and event.event == "left" and event.name == "bob",
        timeout=SESSION_REFRESH + TIMEOUT,
    )
    assert alice.members == ["alice"]


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(("hset", "chat:roster:#lobby", "forged", "not json"), id="roster-entry-not-json"),
        pytest.param(
            ("hset", "chat:roster:#lobby", "forged", '{"node": "x", "expires": 1e18}'), id="roster-entry-no-account"
        ),
        pytest.param(("hset", "chat:room:#lobby", "created_at", "yesterday"), id="room-record"),
        pytest.param(("hset", "chat:sessions:alice", "forged", "not json"), id="session-record"),
        pytest.param(("xadd", "chat:stream:#lobby", "s", "x"), id="stream-entry-number"),
        # An id next to the 64-bit limit, noted before the entry is opened: the next id any node
        # proposes is past what the wire allows, and every line ends its sender's connection.
        pytest.param(("xadd", "chat:privates", "id", str(2**63 - 1)), id="private-feed-id"),
    ],
)
def test_one_malformed_value_in_redis_does_not_shut_users_out(cluster, tmp_path, redis_server, forged):
    """What Redis holds is read back without a check in places: one value another release, a bug or
    anyone with write access left malformed makes every login (everyone enters #lobby), or every
    login of one account, or every resume, end as an "internal error", on every node. The node's
    own words (``_guarded``, "a forged entry") say a hostile entry is to be skipped, not obeyed."""
    from securechat.client import ChatError

    node = cluster.node(tmp_path / "node")
    bob = cluster.log_in("bob", node)
    bob.say("before")
    wait_for(bob, said("before"))
    with redis.Redis.from_url(redis_server.url) as store:
        command, key, field, value = forged
        if command == "xadd":
            store.xadd(key, {field: value, "k": "00000000", "from": "mallory", "p": "x", "stream": "@carol:mallory"})
        else:
            store.hset(key, field, value)
    bob.private("carol", "after the forged value")  # (private lines reach their sender through
    wait_for(bob, said("after the forged value"))  # the node's reader: it has passed the forged value)
    drop(bob)
    try:
        events = come_back(bob)  # a resume: it catches up by the room's sequence numbers
    except ChatError as refused:
        pytest.fail(f"the resume was refused: {refused}")
    assert not [event for event in events if isinstance(event, Disconnected)], f"the resume was cut off: {events}"
    try:
        alice = cluster.log_in("alice", node)  # a login: it opens a session, and enters #lobby
    except ChatError as refused:
        pytest.fail(f"the login was refused: {refused}")
    alice.say("still working")
    wait_for(alice, said("still working"))
    wait_for(bob, said("still working"))


def test_two_ops_changing_a_rooms_modes_at_once_on_two_nodes_keep_both_changes(redis_server):
    """/mode reads the room's modes, adds or takes its letters, and writes the whole string back: two
    ops on two nodes at once must not lose one change that was told to the room (and kept in its
    history). Here bob's +m on one node, read before alice's +i on the other, must not undo it."""
    import threading

    from securechat.hub import HubError
    from securechat.redis_backend import RedisBackend
    from securechat.roomstate import MODES_KEY

    key = b"k" * 32

    class Slow(RedisBackend):
        """A node whose write of a room's modes (after it read them) is held until the test lets it go."""

        hold = False
        inside = threading.Event()
        release = threading.Event()

        def replace_state(self, scope, name, expected, value):
            if self.hold and name == MODES_KEY:
                self.hold = False
                self.inside.set()
                assert self.release.wait(TIMEOUT)
            return super().replace_state(scope, name, expected, value)

    first, second = RedisBackend(redis_server.url, key), Slow(redis_server.url, key)
    hub_a, (alice, carol) = hub_on(first, "alice", "carol")
    hub_b, (bob,) = hub_on(second, "bob")
    changing = None
    try:
        hub_a.join(alice, "#r")  # alice made it: she owns it
        hub_b.join(bob, "#r")
        hub_a.set_room_role(alice, "#r", "bob", "op", "op")
        wait_until(lambda: hub_b.room_state("#r").role("bob") == "op")
        second.hold = True
        changing = threading.Thread(target=hub_b.mode, args=(bob, "#r", "+m"))
        changing.start()
        assert second.inside.wait(TIMEOUT)
        hub_a.mode(alice, "#r", "+i")
        second.release.set()
        changing.join(TIMEOUT)

        def told() -> list[str]:
            return [m.text for m in alice.received if isinstance(m, Notice) and m.event == "moderation"]

        # (bob's change reaches alice's node through Redis: a moment later)
        wait_until(lambda: any("+i" in text for text in told()) and any("+m" in text for text in told()))
        wait_until(lambda: set(hub_a.room_state("#r").modes) >= {"m"})
        with pytest.raises(HubError, match="invite-only"):
            hub_a.join(carol, "#r")
    finally:
        second.release.set()
        if changing is not None:
            changing.join(TIMEOUT)
        hub_a.close()
        hub_b.close()


def test_a_kick_of_an_account_on_two_nodes_tells_the_room_once_that_it_left(redis_server):
    """carol is in #r on a device of each node; alice kicks her. Both nodes read the kick and take their
    own session out, then asked Redis whether carol was still in #r elsewhere: when both asked after
    both had left (4 runs in 6 with two server processes), each told the room "carol left"."""
    from securechat.protocol import Batch
    from securechat.redis_backend import RedisBackend

    both_left = threading.Barrier(2)

    class Meeting(RedisBackend):
        """Each node, once its session of carol has left #r, waits for the other's to have left too."""

        def leave_room(self, room, account, session_id):
            still_elsewhere = super().leave_room(room, account, session_id)
            if account == "carol":
                both_left.wait(TIMEOUT)
            return still_elsewhere

    def notices(session) -> list[Notice]:
        flat = [part for item in session.received for part in (item.messages if isinstance(item, Batch) else [item])]
        return [item for item in flat if isinstance(item, Notice) and item.room == "#r"]

    key = b"k" * 32
    hub_a, (alice, dave) = hub_on(Meeting(redis_server.url, key), "alice", "dave")
    hub_b, (bob, erin) = hub_on(Meeting(redis_server.url, key), "bob", "erin")
    carols = []
    try:
        for hub, session_id in ((hub_a, "session-carol-a"), (hub_b, "session-carol-b")):
            carol = Session("carol")
            carol.session_id = session_id
            hub.enter_rooms(carol, hub.open_session(carol, "test", "127.0.0.1")[0])
            carols.append(carol)
        hub_a.join(alice, "#r")
        hub_a.join(carols[0], "#r")  # and her device on node b follows
        hub_b.join(bob, "#r")
        wait_until(lambda: hub_b._in_room(carols[1], "#r"))
        hub_a.kick(alice, "#r", "carol", "")
        # Once both have said what they will, a join on each node comes after it on the presence stream.
        wait_until(
            lambda: all(not hub._in_room(carol, "#r") for hub, carol in zip((hub_a, hub_b), carols, strict=True))
        )
        hub_a.join(dave, "#r")
        hub_b.join(erin, "#r")
        wait_until(lambda: ("joined", "dave") in [(notice.event, notice.name) for notice in notices(bob)])
        wait_until(lambda: ("joined", "erin") in [(notice.event, notice.name) for notice in notices(alice)])
        for who in (alice, bob):
            told = [notice.text for notice in notices(who) if notice.event == "left" and notice.name == "carol"]
            assert told == ["alice kicked carol"], (who.name, told)
    finally:
        hub_a.close()
        hub_b.close()


def test_connections_that_closed_during_a_redis_outage_stop_counting_against_their_address(
    cluster, tmp_path, redis_server
):
    """Each node's share of an address's connections lives in Redis (``SharedConnectionCount``). A
    connection that closes while Redis is away is never taken off it: once Redis is back (with its
    append-only file), the address is charged for it for as long as the node runs, and its users are
    refused with "too many connections from your address" though they hold fewer than the limit."""
    import time

    from securechat.client import ChatError
    from securechat.redis_backend import SESSION_REFRESH

    node = cluster.node(tmp_path / "node", "--max-per-address", "2")

    def from_the_office(name: str):
        client = client_of(node, tmp_path / "known_hosts_office", source_address=("127.0.0.4", 0))
        cluster.clients.append(client)
        client.login(name, password_of(name))
        return client

    early = from_the_office("bob")
    redis_server.stop()
    early.close()  # the one connection from the office ends while Redis is away
    _wait_for_log(node, "connections are counted by this process alone", TIMEOUT * 2)
    redis_server.start()
    deadline = time.monotonic() + TIMEOUT * 2
    while True:  # the node is back on Redis once a login (which needs it) goes through
        try:
            cluster.log_in("alice", node)
            break
        except ChatError:
            assert time.monotonic() < deadline, "the node never got Redis back"
            time.sleep(0.2)
    held = [from_the_office("bob")]  # the office holds one connection now
    deadline = time.monotonic() + SESSION_REFRESH + 2  # (a fix may put the share right as it refreshes)
    while True:
        try:
            held.append(from_the_office("carol"))  # its second: within the limit of 2
            break
        except ChatError as refused:
            assert time.monotonic() < deadline, f"a connection closed during the outage still counts: {refused}"
            time.sleep(0.5)


def test_a_redis_that_comes_back_without_its_data_is_said_to_have_lost_it(tmp_path, users_file, redis_server):
    """Redis restarted without persistence: every session ends, and the right password is refused as
    a wrong one. The running nodes must say why, once, in their log. (A real restart: a FLUSHALL from
    outside can land between the commands of a node's refresh, which puts the record back first.)"""
    from conftest import RedisServer

    (tmp_path / "volatile").mkdir()
    volatile = RedisServer(tmp_path / "volatile", durable=False)
    cluster = Cluster(tmp_path, users_file, volatile.url)
    try:
        node = cluster.node(tmp_path / "node")
        cluster.log_in("alice", node)
        volatile.restart()  # it comes back empty
        _wait_for_log(node, "Redis came back without its data", TIMEOUT * 2)
    finally:
        cluster.close()
        volatile.stop()


def test_a_private_line_numbered_below_a_room_line_already_seen_is_not_lost_at_resume(cluster, tmp_path):
    """Ids are proposed by each process and, when a proposal loses, the next one is set aside for the
    line: so a private line can land in its stream after a room line with a higher id was delivered.
    Room catch-up goes by each room's sequence numbers for this reason; private catch-up goes by id
    alone (``private_since``), and skips such a line for good."""
    import threading

    node = cluster.node(tmp_path / "node1")
    alice, bob = cluster.log_in("alice", node), cluster.log_in("bob", node)
    bob.say("a first line")
    wait_for(alice, said("a first line"))
    other = other_process(cluster.redis_url, tmp_path / "node1")  # carol's node
    real_append = other._append
    reserved, release = threading.Event(), threading.Event()
    calls = []

    def append(keys, args):
        calls.append(args)
        if len(calls) == 2:  # its first proposal lost; this is the id set aside for it
            reserved.set()
            assert release.wait(TIMEOUT * 2)
        return real_append(keys=keys, args=args)

    other._append = append
    sending = threading.Thread(
        target=other.publish_private,
        args=(Chat(sender="carol", recipient="alice", text="carol's private line", sent_at=0.0),),
    )
    try:
        sending.start()
        reserved.wait(TIMEOUT)  # (a process that never loses a proposal goes straight on)
        bob.say("a room line said meanwhile")
        heard = wait_for(alice, said("a room line said meanwhile"))
        drop(alice)
        release.set()
        sending.join(TIMEOUT)
        assert not sending.is_alive()
        assert heard.id > max((int(args[0]) for args in calls), default=0) or len(calls) < 2
        events = come_back(alice)
        kept = [line.text for line in other.private_recent("alice", 10)]
    finally:
        release.set()
        other.close()
    assert "carol's private line" in kept  # it was stored, and alice never saw it
    assert any(said("carol's private line")(event) for event in events), events


def test_a_private_line_seen_before_a_resume_is_not_shown_again(cluster, tmp_path):
    """The private catch-up looks a little before the newest id the device saw (a line may land
    late): what the device was shown already is not shown again, nor counted as caught up."""
    from securechat.protocol import History

    node = cluster.node(tmp_path / "node")
    alice, bob = cluster.log_in("alice", node), cluster.log_in("bob", node)
    bob.private("alice", "seen before the drop")
    wait_for(alice, said("seen before the drop"))
    drop(alice)
    events = come_back(alice)
    assert not [event for event in events if said("seen before the drop")(event)], events
    assert not [event for event in events if isinstance(event, History) and not event.room], events
    bob.private("alice", "after the resume")
    wait_for(alice, said("after the resume"))


def _flat(received: list[object]) -> list[object]:
    """What a hub handed one session, with its batches opened."""
    return [message for item in received for message in (item.messages if hasattr(item, "messages") else [item])]


def _sees(received: list[object], room: str, name: str, present: bool) -> bool:
    """Whether a client that got ``received`` (rosters, then joins and leaves, in order) lists
    ``name`` in ``room``; ``present`` is what it believed before these."""
    for message in _flat(received):
        if isinstance(message, Roster) and message.room == room:
            present = name in message.members
        elif isinstance(message, Notice) and message.room == room and message.name == name:
            if message.event == "joined":
                present = True
            elif message.event == "left":
                present = False
    return present


# ---------------------------------------------------------------------------------------------------
# The roster sweep (_SWEEP_ROSTER, on_members_gone)


def test_a_node_that_missed_its_refreshes_for_a_while_does_not_leave_its_users_gone_for_good(redis_server, monkeypatch):
    """A node whose refresher is held past SESSION_TTL (Redis away or LOADING for 30 s, a VM paused,
    a process starved) keeps its users; the others' sweep finds their roster entries lapsed and tells
    every room they left ("connection lost"). The node then writes its entries back in silence: no
    "joined" ever follows, so every client elsewhere lists them as gone for good while they talk on.
    After a Redis outage longer than 30 s the first node to refresh does this to the users of every
    other node at once."""
    import securechat.redis_backend as redis_backend
    from securechat.redis_backend import RedisBackend

    monkeypatch.setattr(redis_backend, "SESSION_REFRESH", 0.3)  # the sweep and refresh, without the 10 s wait
    key = b"k" * 32

    class Held(RedisBackend):
        """A node whose refresher can be held (the test's stand-in for 30 s without Redis)."""

        holding = threading.Event()
        inside = threading.Event()
        released = threading.Event()

        def _roster_entry(self, account):
            if self.holding.is_set() and threading.current_thread().name == "redis-presence":
                self.inside.set()
                self.released.wait(TIMEOUT * 4)
            return super()._roster_entry(account)

    hub_a, (alice,) = hub_on(RedisBackend(redis_server.url, key), "alice")
    hub_b, _ = hub_on(Held(redis_server.url, key), "bob")  # bob, on the node that will lag
    store = redis.Redis.from_url(redis_server.url)
    try:
        wait_until(lambda: _sees(alice.received, "#lobby", "bob", False))
        mark = len(alice.received)
        Held.holding.set()
        assert Held.inside.wait(TIMEOUT)  # bob's node refreshes nothing from here
        for field, value in store.hgetall("chat:roster:#lobby").items():  # ... for longer than SESSION_TTL
            record = json.loads(value)
            if record["account"] == "bob":
                record["expires"] = time.time() - 1
                store.hset("chat:roster:#lobby", field, json.dumps(record))
        # Alice's node sweeps every SESSION_REFRESH: give it a few rounds.
        deadline = time.monotonic() + 10 * redis_backend.SESSION_REFRESH
        while time.monotonic() < deadline and _sees(alice.received[mark:], "#lobby", "bob", True):
            time.sleep(0.05)
        Held.holding.clear()
        Held.released.set()  # bob's node is back; bob never left

        def bob_listed_again() -> bool:
            entries = [json.loads(value) for value in store.hvals("chat:roster:#lobby")]
            return any(entry["account"] == "bob" and entry["expires"] > time.time() + 5 for entry in entries)

        wait_until(bob_listed_again)  # written back by his node's refresher
        deadline = time.monotonic() + TIMEOUT
        while not _sees(alice.received[mark:], "#lobby", "bob", True):
            assert time.monotonic() < deadline, (
                "alice was told bob left and never that he is back: "
                f"{[m for m in _flat(alice.received[mark:]) if isinstance(m, Notice)]}"
            )
            time.sleep(0.05)
    finally:
        Held.released.set()
        store.close()
        hub_a.close()
        hub_b.close()


# ---------------------------------------------------------------------------------------------------
# The welcome's news (Room.expect)


@pytest.mark.parametrize("order", ["joined", "joined-then-left", "left-then-joined"])
def test_someone_joining_and_leaving_elsewhere_as_one_enters_is_shown_as_they_end(redis_server, order):
    """Alice's node reads who is in the room on the other nodes, then puts her in it: bob joining (or
    leaving) on his node in between, his notice handed over before she was in, must still show in
    her client's list, as he ends up. With two notices of one name (a /part and /join, a join and a
    quick leave), the last one counts."""
    from securechat.redis_backend import RedisBackend

    key = b"k" * 32
    heard: list[str] = []

    class BobMovesMeanwhile(RedisBackend):
        armed = False

        def members_elsewhere(self, room):
            if self.armed and room == "#r":
                self.armed = False
                moves = {"joined": ["join"], "joined-then-left": ["join", "part"], "left-then-joined": ["part", "join"]}
                for move in moves[order]:
                    getattr(hub_b, move)(bob, "#r")
                wait_until(lambda: len(heard) == len(moves[order]))  # alice's node has them as she enters
            return super().members_elsewhere(room)

    first, second = BobMovesMeanwhile(redis_server.url, key), RedisBackend(redis_server.url, key)
    hub_a, (alice, carol) = hub_on(first, "alice", "carol")
    hub_b, (bob,) = hub_on(second, "bob")
    on_presence = hub_a.on_presence

    def presence(room, notice) -> None:
        on_presence(room, notice)
        if room == "#r" and notice.name == "bob":
            heard.append(notice.event)

    hub_a.on_presence = presence  # type: ignore[method-assign]
    try:
        hub_a.join(carol, "#r")  # the room is read on alice's node already
        if order == "left-then-joined":
            hub_b.join(bob, "#r")
            wait_until(lambda: heard == ["joined"])
            heard.clear()
        mark = len(alice.received)
        first.armed = True
        hub_a.join(alice, "#r")
        there = order != "joined-then-left"  # where bob is once alice is in
        assert set(hub_a.backend.members_elsewhere("#r")) == ({"bob"} if there else set())
        shown = [m for m in _flat(alice.received[mark:]) if isinstance(m, Notice | Roster)]
        assert _sees(alice.received[mark:], "#r", "bob", False) == there, shown
    finally:
        hub_a.close()
        hub_b.close()


# ---------------------------------------------------------------------------------------------------
# The per-address connection count (redis_limits._COUNT)


def _connections_key(data_dir: Path, address: str) -> str:
    """The key the nodes count ``address``'s connections under (SharedConnectionCount._key)."""
    import hashlib
    import hmac

    cluster_key = bytes.fromhex((data_dir / "cluster_key").read_text())
    throttle_key = hashlib.sha256(b"chat throttle keys\0" + cluster_key).digest()
    digest = hmac.new(throttle_key, f"connections\0{address}".encode(), hashlib.sha256)
    return f"chat:connections:{digest.hexdigest()[:32]}"


def test_an_address_with_no_connection_left_leaves_no_key_in_redis_for_a_week(cluster, tmp_path, redis_server):
    """Each node now writes its whole count of an address ("version count"), and a count of 0 is
    kept, with the key's 7-day expiry renewed: the key of every address that ever opened a TCP
    connection (counted before any handshake) stays in Redis a week after its last connection closed.
    Before, the field went at 0 and the key with it. One /48 of IPv6 is 65,536 /64 buckets: anyone
    can fill Redis's memory with keys that live a week, at the rate the nodes accept connections."""
    import socket

    node = cluster.node(tmp_path / "node")
    key = _connections_key(tmp_path / "node", "127.0.0.9")
    with redis.Redis.from_url(redis_server.url) as store:

        def held() -> int:
            return sum(int(value.split()[-1]) for value in store.hvals(key))

        for _ in range(3):
            probe = socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.9", 0))
            wait_until(lambda: held() == 1)  # counted as it starts, before any handshake
            probe.close()
            # Each close counted before the next probe: the counts are written as they come, and a
            # 0 read between one probe's close and the next one's open is not the end.
            wait_until(lambda: held() == 0)
        ttl = store.ttl(key)
        assert ttl < 600, f"{key} holds {store.hgetall(key)} and lives {ttl} s more"


def test_a_connection_that_closed_during_an_outage_stops_counting_on_the_other_nodes(cluster, tmp_path, redis_server):
    """A node's share of an address is written only when a connection from that address opens or
    closes on it: the share of one that closed while Redis was away stays in Redis, and the other
    nodes count it for as long as that node lives (the key is renewed for 7 days by every use),
    unless the address comes back to that very node. Behind a load balancer, or with --server
    lists, it may never: the office is refused on the other nodes below its limit."""

    from securechat.client import ChatError
    from securechat.redis_backend import SESSION_REFRESH

    first, second = two_nodes(cluster, tmp_path, "--max-per-address", "2")

    def from_the_office(node, name: str):
        client = client_of(node, tmp_path / "known_hosts_office", source_address=("127.0.0.6", 0))
        cluster.clients.append(client)
        client.login(name, password_of(name))
        return client

    early = from_the_office(first, "bob")
    redis_server.stop()
    early.close()  # its one connection on the first node ends while Redis is away
    _wait_for_log(first, "connections are counted by this process alone", TIMEOUT * 2)
    redis_server.start()
    deadline = time.monotonic() + TIMEOUT * 2
    while True:  # both nodes are back on Redis once logins (which need it) go through
        try:
            cluster.log_in("alice", first)
            cluster.log_in("dave", second)
            break
        except ChatError:
            assert time.monotonic() < deadline, "the nodes never got Redis back"
            time.sleep(0.2)
    held = [from_the_office(second, "carol")]  # the office holds one connection, on the second node
    deadline = time.monotonic() + SESSION_REFRESH + 1  # (a fix may put the share right as it refreshes)
    while True:
        try:
            held.append(from_the_office(second, "erin"))  # its second: within the limit of 2
            break
        except ChatError as refused:
            assert time.monotonic() < deadline, f"a connection closed during the outage still counts: {refused}"
            time.sleep(0.3)


# ---------------------------------------------------------------------------------------------------
# Config paths (config.read_config_file)


# ---------------------------------------------------------------------------------------------------
# The private catch-up's look-back (private_since) and the client's count of what it shows


def test_a_resume_that_resends_many_private_lines_already_seen_does_not_count_them_as_caught_up(cluster, tmp_path):
    """A resume's private catch-up now looks 1,000 ids back, so it sends again the lines the device
    was shown (all of them, in a quiet deployment, up to 1,000). The client drops those it showed and
    takes them off the count of the HISTORY that ends the batch, but only those in the same frame:
    a batch larger than a frame is split by the send worker (pack_messages), and the user is told
    "*** N lines of private messages from history" with nothing shown."""

    from securechat.protocol import Chat, History

    node = cluster.node(tmp_path / "node")
    alice = cluster.log_in("alice", node)
    bobs_node = other_process(cluster.redis_url, tmp_path / "node")
    try:
        texts = [f"{number:02} " + "x" * 4000 for number in range(30)]  # ~120 KB: two frames at least
        for text in texts:
            bobs_node.publish_private(Chat(sender="bob", recipient="alice", text=text, sent_at=0.0))
        for text in texts:
            wait_for(alice, lambda event, text=text: isinstance(event, Chat) and event.text == text)
    finally:
        bobs_node.close()
    drop(alice)
    events = come_back(alice)
    again = [event.text[:2] for event in events if isinstance(event, Chat) and event.private]
    assert again == [], f"shown again: {again}"
    told = [event for event in events if isinstance(event, History) and not event.room]
    assert told == [], f"told of private lines caught up, with none shown: {told}"


def test_a_node_that_fell_behind_the_private_feed_does_not_send_old_lines_as_new(cluster, tmp_path, redis_server):
    """After a gap in the private feed, each local account is sent private_since(the last id the
    node read), which now looks 1,000 ids back: every line the node had already handed over comes
    again, as a live line, with no check of who was shown what. A device that logged in with the
    account's last 50 lines (another device online) is shown the older ones as if just sent."""
    import signal

    from securechat.protocol import Chat
    from securechat.redis_backend import PRIVATE_FEED_LENGTH

    first, second = two_nodes(cluster, tmp_path)
    cluster.log_in("alice", second)  # her phone: online all along
    bobs_node = other_process(cluster.redis_url, tmp_path / "node1")
    try:
        for number in range(60):
            bobs_node.publish_private(Chat(sender="bob", recipient="alice", text=f"old {number:02}", sent_at=0.0))
        laptop = cluster.log_in("alice", first)  # a new device: the last 50 of them, as history
        shown = [wait_for(laptop, lambda event: isinstance(event, Chat) and event.text == "old 59")]
        stop(first)  # the laptop's node falls behind the feed
        try:
            with redis.Redis.from_url(redis_server.url) as store:
                store.xadd("chat:privates", {"x": "1"})  # what its pending blocking read last had in flight
                bobs_node.publish_private(Chat(sender="bob", recipient="alice", text="new", sent_at=0.0))
                _fall_behind(store, "chat:privates", PRIVATE_FEED_LENGTH)
        finally:
            first.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + TIMEOUT * 2
        while not any(event.text == "new" for event in shown):  # every line shown, until the new one
            event = laptop.next_event(timeout=max(0.0, deadline - time.monotonic()))
            assert event is not None, f"the line said during the gap never came; shown: {shown}"
            shown += [event] if isinstance(event, Chat) else []
        shown += [event for event in drain(laptop, quiet=1.0) if isinstance(event, Chat)]
    finally:
        bobs_node.close()
    old = [event.text for event in shown if event.text.startswith("old") and not event.history]
    assert old == [], f"sent again as new lines: {old}"


# ---------------------------------------------------------------------------------------------------
# The echo wait of a LEAVE (connection._unechoed)


def test_a_line_said_just_before_a_part_is_confirmed_to_its_sender(redis_server, make_server, users_file, tmp_path):
    """On Redis a line is echoed when this node hands it to the room's members here: at once if the
    node has handed over everything before it, else when its reader reads it back. A /part in
    between takes the sender out of the room first, so the echo never comes: the client counts an
    accepted line, which everyone in the room saw, as "not sent", and the /quit that follows waits
    the whole 2 s (ECHO_WAIT) for an echo that cannot come."""
    from test_redis import import_accounts

    from securechat.client import ChatClient, KnownHosts
    from securechat.protocol import Chat
    from securechat.protocol import Room as RoomMessage

    import_accounts(users_file, redis_server.url)
    server = make_server(backend=redis_server.url)
    backend = server.hub.backend
    alice = ChatClient(
        *server.address, server_fingerprint=server.fingerprint, known_hosts=KnownHosts(tmp_path / "kh"), timeout=10
    )
    try:
        alice.login("alice", password_of("alice"))
        alice.join("#r")
        wait_for(alice, lambda event: isinstance(event, RoomMessage) and event.room == "#r" and event.joined)
        # The node's reader is slow to hand over #r for a moment (busy, or a line of another node
        # just landed): carol's line, said on another node, is read but not handed over yet.
        held, release = threading.Event(), threading.Event()
        deliver_room = backend._deliver_room

        def slow(room, entries):
            if room == "#r" and not release.is_set():
                held.set()
                release.wait(TIMEOUT)
            deliver_room(room, entries)

        backend._deliver_room = slow
        carols_node = other_process(redis_server.url, tmp_path / "data")
        try:
            carols_node.publish_room("#r", Chat(sender="carol", text="from another node", sent_at=0.0))
        finally:
            carols_node.close()
        assert held.wait(TIMEOUT)
        alice.say("said before leaving", "#r")
        alice.part("#r")
        threading.Timer(0.5, release.set).start()  # the reader goes on a moment later, as a busy one does
        wait_for(alice, lambda event: isinstance(event, RoomMessage) and event.room == "#r" and not event.joined)
        started = time.monotonic()
        alice.leave()
        took = time.monotonic() - started
        with alice.pending_lock:
            unconfirmed = [text for _, text in alice.pending.values()]
        assert unconfirmed == [], f"counted as not sent (the /quit waited {took:.1f} s): {unconfirmed}"
    finally:
        alice.close()


def test_the_presence_refresher_outlives_a_bug_in_one_round(redis_server, monkeypatch):
    """If one refresh raised (a bug, not Redis), the thread ended: the node's roster entries and
    sessions then lapsed, and the other nodes told every room its users had left."""
    import securechat.redis_backend as redis_backend
    from securechat.redis_backend import NODES_KEY, RedisBackend

    monkeypatch.setattr(redis_backend, "SESSION_REFRESH", 0.2)

    class Buggy(RedisBackend):
        rounds = 0

        def _sweep_rosters(self):
            self.rounds += 1
            if self.rounds == 1:
                raise RuntimeError("a bug in one round")
            super()._sweep_rosters()

    hub, _ = hub_on(Buggy(redis_server.url, b"k" * 32), "alice")
    try:
        wait_until(lambda: hub.backend.rounds >= 3)  # type: ignore[attr-defined]
        with redis.Redis.from_url(redis_server.url) as store:
            assert store.zscore(NODES_KEY, hub.backend.node) is not None  # type: ignore[attr-defined]
    finally:
        hub.close()


def test_a_server_ban_made_on_another_node_gives_up_the_sessions_tokens(cluster, tmp_path):
    """/gban revoked the tokens of the sessions on the admin's node only: a device on another node was
    cut off, and once the ban was lifted it resumed with its old token, as no ended session may."""
    from securechat.client import LoginRefused

    assert server_command("role", "alice", "admin", "--backend", cluster.redis_url).returncode == 0
    first, second = two_nodes(cluster, tmp_path)
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    token = bob.token
    alice.command("gban", "bob", "spam")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.action == "gban")
    wait_for(bob, lambda event: isinstance(event, Disconnected), timeout=TIMEOUT * 2)
    alice.command("ungban", "bob")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.action == "ungban")
    bob.close()
    bob.connect()
    bob.token = token  # whatever the client kept, the server must refuse it
    with pytest.raises(LoginRefused) as refused:
        bob.resume()
    assert refused.value.code == "token_revoked", refused.value


class DeviceSession:
    """A logged-in session as the hub sees it, keeping what it is handed, with a session id of its own."""

    def __init__(self, name: str, session_id: str = "") -> None:
        self.name = name
        self.session_id = session_id or f"session-{name}"
        self.received: list[object] = []

    def deliver(self, message: object) -> None:
        self.received.append(message)

    def end(self, reason: str) -> None:
        pass

    def entries(self, room: str) -> list[RoomMessage]:
        return [m for m in _flat(list(self.received)) if isinstance(m, RoomMessage) and m.room == room and m.joined]

    def exits(self, room: str) -> list[RoomMessage]:
        return [m for m in _flat(list(self.received)) if isinstance(m, RoomMessage) and m.room == room and not m.joined]


def _flat(messages: list[object]) -> list[object]:
    out: list[object] = []
    for message in messages:
        inner = getattr(message, "messages", None)
        out.extend(_flat(inner) if isinstance(inner, list) else [message])
    return out


class HeldRedisBackend(RedisBackend):
    """The Redis backend, where the test can hold one call on one thread until it lets it go on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold_members_elsewhere_of: str = ""  # a room: the next members_elsewhere of it is held
        self.hold_room_events_of: str = ""  # a room: its events read from Redis wait for the release
        self.inside = threading.Event()
        self.release = threading.Event()

    def members_elsewhere(self, room: str) -> dict[str, int]:
        if room == self.hold_members_elsewhere_of:
            self.hold_members_elsewhere_of = ""
            self.inside.set()
            assert self.release.wait(TIMEOUT)
        return super().members_elsewhere(room)

    def _deliver_room(self, room, entries) -> None:
        if room == self.hold_room_events_of:
            self.inside.set()
            # Held on the reader thread: the control stream is read by another thread here (see
            # the test), as it would be in the same read on a node whose reader got there first.
            assert self.release.wait(TIMEOUT)
        super()._deliver_room(room, entries)


def test_a_login_entering_its_rooms_while_its_account_changes_elsewhere_enters_each_room_once(redis_server):
    """A device logs in and enters its rooms while the account changes on another node (its other
    device's /ignore, /join or /part there): the Redis reader's _follow_rooms finds the room not yet
    listed for the new session (the login's _enter lists it only after its backend reads) and enters
    it too. Both pass _enter's "already in it" check, so the session gets the room's whole entry
    twice (joined, roster, recent lines: shown twice), and a resumed device's catch-up is raced by
    a plain entry. Each room must be entered once."""
    backend = HeldRedisBackend(redis_server.url, b"k" * 32)
    other = RedisBackend(redis_server.url, b"k" * 32)  # another node
    hub = ChatHub(backend)
    try:
        phone = DeviceSession("alice", "phone")
        rooms, _ = hub.open_session(phone, "phone", "127.0.0.1")
        hub.enter_rooms(phone, rooms)
        hub.join(phone, "#r")
        laptop = DeviceSession("alice", "laptop")
        rooms, _ = hub.open_session(laptop, "laptop", "127.0.0.1")
        assert "#r" in rooms
        backend.hold_members_elsewhere_of = "#r"
        login = threading.Thread(target=hub.enter_rooms, args=(laptop, rooms))
        login.start()
        assert backend.inside.wait(TIMEOUT)  # the login is entering #r, not listed in it yet
        other.account_changed("alice")  # say, alice's device on the other node changed her ignore list
        deadline = time.monotonic() + 2.0  # _follow_rooms runs on this node's reader thread
        while time.monotonic() < deadline and not laptop.entries("#r"):
            time.sleep(0.01)
        backend.release.set()
        login.join(TIMEOUT)
        assert not login.is_alive()
        time.sleep(0.3)  # anything the reader still had to do
        assert len(laptop.entries("#r")) == 1, f"#r entered {len(laptop.entries('#r'))} times"
    finally:
        backend.release.set()
        other.close()
        hub.close()


class KickHeldRedisBackend(RedisBackend):
    """The Redis backend, where the next kick notice waits to be published until the test lets it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inside = threading.Event()
        self.release = threading.Event()

    def publish_room(self, room, message, *args, **kwargs):
        if isinstance(message, Notice) and message.event == "moderation" and message.action == "kick":
            self.inside.set()
            assert self.release.wait(TIMEOUT)
        return super().publish_room(room, message, *args, **kwargs)


def test_a_kicked_device_on_another_node_is_told_it_was_kicked_and_why(redis_server):
    """bob (owner of #r) on node A kicks alice, whose session is on node B. The kick takes #r from
    alice's memberships, then publishes its notice. If an account change of alice's (her device
    elsewhere /ignores someone, /joins another room) reaches node B in between, _follow_rooms sees
    #r gone from her memberships and takes her session out with no reason, as if she had parted;
    the kick notice then finds her out already: she is never told she was kicked, nor why (and the
    room on other nodes hears a plain "left"). She must be taken out by the kick, with its reason."""
    node_a = KickHeldRedisBackend(redis_server.url, b"k" * 32)
    node_b = RedisBackend(redis_server.url, b"k" * 32)
    hub_a, hub_b = ChatHub(node_a), ChatHub(node_b)
    kicking = None
    try:
        bob = DeviceSession("bob")
        rooms, _ = hub_a.open_session(bob, "bob", "127.0.0.1")
        hub_a.enter_rooms(bob, rooms)
        hub_a.join(bob, "#r")  # made by bob: he owns it
        alice = DeviceSession("alice")
        rooms, _ = hub_b.open_session(alice, "alice", "127.0.0.1")
        hub_b.enter_rooms(alice, rooms)
        hub_b.join(alice, "#r")
        wait_until(lambda: alice.entries("#r"))
        kicking = threading.Thread(target=hub_a.kick, args=(bob, "#r", "alice", "spamming links"))
        kicking.start()
        assert node_a.inside.wait(TIMEOUT)  # her membership is gone; the notice is on its way
        node_a.account_changed("alice")  # her other device's /ignore, as hub.ignore tells it
        deadline = time.monotonic() + 2.0  # node B's reader handles it
        while time.monotonic() < deadline and not alice.exits("#r"):
            time.sleep(0.01)
        node_a.release.set()
        kicking.join(TIMEOUT)
        wait_until(lambda: alice.exits("#r"))
        time.sleep(0.5)  # node B reads the kick notice
        reasons = [m.reason for m in alice.exits("#r")]
        assert any("spamming links" in reason for reason in reasons), f"taken out with reasons {reasons!r}"
    finally:
        node_a.release.set()
        if kicking is not None:
            kicking.join(TIMEOUT)
        hub_a.close()
        hub_b.close()


# --------------------------------------------------------------------------- a Redis that hangs, or lost its data


def start_server(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], within: float) -> tuple[int | None, str, str, float]:
    """Wait up to ``within`` seconds for ``process`` to end by itself; kill it if it has not.
    Returns (exit status or None when it had to be killed, stdout, stderr, seconds waited)."""
    started = time.monotonic()
    try:
        out, err = process.communicate(timeout=within)
        return process.returncode, out, err, time.monotonic() - started
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return None, out, err, time.monotonic() - started


def _node_whose_redis_loses_its_data(tmp_path, users_file):
    """One node on a Redis without persistence, alice chatting on it; Redis restarts empty, and the node
    says so. Returns (cluster, redis, node, alice)."""
    from conftest import RedisServer

    (tmp_path / "volatile").mkdir()
    volatile = RedisServer(tmp_path / "volatile", durable=False)
    cluster = Cluster(tmp_path, users_file, volatile.url)
    node = cluster.node(tmp_path / "node")
    alice = cluster.log_in("alice", node)
    alice.say("before the loss")
    wait_for(alice, said("before the loss"))
    volatile.restart()  # it comes back empty
    _wait_for_log(node, "Redis came back without its data", TIMEOUT * 2)
    return cluster, volatile, node, alice


def _volatile_cluster_after_data_loss(tmp_path, users_file):
    """The same loss, then the operator does what the node's log says (``import-users``).
    Returns (cluster, redis, node)."""
    cluster, volatile, node, _ = _node_whose_redis_loses_its_data(tmp_path, users_file)
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "import-users", str(users_file), "--backend", volatile.url],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert done.returncode == 0, done.stderr
    time.sleep(1.5)  # the node's copy of an account is read again after a second
    return cluster, volatile, node


def test_a_line_said_while_redis_hangs_is_refused_within_seconds(cluster, tmp_path, redis_server):
    """Redis that accepts connections but does not answer (SIGSTOP here; in life a Redis stuck in a
    long command or a fork, or a network path that drops packets): the docs promise a line sent
    while Redis is away is refused with ``not sent: …``. Instead the sender gets no answer at all
    for more than half a minute (every Redis call retries its connect and health check, 5 s each),
    and another user of the same node waits as long for /who and for every frame (the account check)."""
    first, second = two_nodes(cluster, tmp_path)
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    alice.say("before redis hangs")
    wait_for(bob, said("before redis hangs"))
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        alice.say("while redis hangs")
        outcome = wait_for(
            alice,
            lambda event: isinstance(event, ErrorReply) or said("while redis hangs")(event),
            timeout=15,
        )
        assert isinstance(outcome, ErrorReply) and outcome.message.startswith("not sent"), outcome
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)


def test_a_node_pointed_at_a_port_that_never_answers_says_so_within_seconds(tmp_path, users_file):
    """An operator's typo in the port lands on a service that accepts and never speaks (or a
    firewall that drops): the server prints nothing at all for about a minute (64 s measured)
    before "cannot reach Redis". A rediss:// URL against a plain Redis is reported in 13 s; a wrong
    port should be reported as fast, not look like a hang."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
        status, out, err, waited = finish(start_server(*where, "--backend", url), within=20)
        assert status == 1, f"still silent after {waited:.0f} s; stdout {out!r} stderr {err!r}"
        assert err.startswith("error: cannot reach Redis at ") and len(err.strip().splitlines()) == 1, err
    finally:
        silent.close()


def test_a_node_whose_redis_hangs_keeps_pinging_its_idle_users(cluster, tmp_path, redis_server, monkeypatch):
    """Redis hangs (SIGSTOP) while users sit idle, typing nothing. The node's keepalive thread is
    stuck in a Redis read (``_keepalive_pass`` → ``_current_account_stamps`` → ``HGETALL``), so it
    stops pinging everyone; after the client's 75 s of silence every user of every node is dropped
    ("connection lost (the server stopped answering)"), though the docs promise sessions go on while
    a node has no Redis. Here the client's patience is cut to 20 s so the test is short: the node,
    pinging every 4 s (``--ping-interval 4``), must not fall silent that long."""
    import securechat.client as client_module

    monkeypatch.setattr(client_module, "IDLE_TIMEOUT", 20.0)
    node = cluster.node(tmp_path / "node")
    alice = cluster.log_in("alice", node)
    alice.say("before redis hangs")
    wait_for(alice, said("before redis hangs"))
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 24
        while (left := deadline - time.monotonic()) > 0:
            event = alice.next_event(timeout=left)
            if event is None:
                break
            assert type(event).__name__ != "Disconnected", f"an idle user was dropped: {event}"
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)


def test_after_redis_lost_its_data_and_the_accounts_are_restored_a_login_lands_in_the_default_room(
    tmp_path, users_file
):
    """Redis restarted without its data while a node runs; the operator restores the accounts as
    the node's log says. Every login on the running node is then told "cannot rejoin #lobby: #lobby
    no longer exists" and lands in no room at all ("not sent: you are not in #lobby"), until the
    node is restarted: the default room is not made again in Redis."""
    needs_redis()
    from securechat.protocol import Room

    cluster, volatile, node = _volatile_cluster_after_data_loss(tmp_path, users_file)
    try:
        dave = cluster.log_in("dave", node)
        wait_for(dave, lambda event: isinstance(event, Room) and event.room == "#lobby" and event.joined)
        dave.say("hello again")
        assert isinstance(wait_for(dave, lambda event: isinstance(event, Chat | ErrorReply)), Chat)
    finally:
        cluster.close()
        volatile.stop()


def test_after_redis_lost_its_data_no_user_becomes_the_owner_of_the_default_room(tmp_path, users_file):
    """Same loss: the first ordinary user who types /join #lobby makes the default room anew and
    is its owner (``chat:room:#lobby`` owner, ``role:dave owner``): dave kicks erin out of the room
    everyone lands in, and sets its modes. The default room has no owner otherwise."""
    needs_redis()
    from securechat.protocol import Notice, Room

    cluster, volatile, node = _volatile_cluster_after_data_loss(tmp_path, users_file)
    try:
        dave = cluster.log_in("dave", node)
        dave.join("#lobby")
        wait_for(dave, lambda event: isinstance(event, Room) and event.room == "#lobby" and event.joined)
        erin = cluster.log_in("erin", node)
        wait_for(erin, lambda event: isinstance(event, Room) and event.room == "#lobby" and event.joined)
        dave.command("kick", "#lobby", "erin", "mine now")
        outcome = wait_for(
            dave,
            lambda event: isinstance(event, ErrorReply) or (isinstance(event, Notice) and event.event == "moderation"),
        )
        assert isinstance(outcome, ErrorReply), f"an ordinary user kicked someone out of the default room: {outcome}"
    finally:
        cluster.close()
        volatile.stop()


def test_a_redis_that_lost_its_data_does_not_tell_users_their_account_was_deleted_or_its_password_changed(
    tmp_path, users_file
):
    """Redis restarted without its data while users chat: every connected user is told "this account
    no longer exists" or, as timing goes, "this account's password changed; log in again", and is
    thrown out (the CLI exits). Nobody deleted an account: the operator is
    told in the log to restore them from a backup. The users should be told the truth (the server
    lost its data / try again later), or keep their sessions on the records the node has read, as
    during an outage: not that their account is gone."""
    needs_redis()
    cluster, volatile, _, alice = _node_whose_redis_loses_its_data(tmp_path, users_file)
    try:
        alice.say("after the loss")
        told = []
        deadline = time.monotonic() + TIMEOUT
        while (event := alice.next_event(timeout=max(0.1, deadline - time.monotonic()))) is not None:
            told.append(event)
            if time.monotonic() > deadline or type(event).__name__ == "Disconnected":
                break
        untrue = [e for e in told if isinstance(e, ErrorReply) and e.code in ("account_deleted", "token_revoked")]
        assert not untrue, untrue
    finally:
        cluster.close()
        volatile.stop()


def test_a_full_redis_is_not_reported_as_one_that_cannot_be_reached(cluster, tmp_path, redis_server):
    """Redis at its ``maxmemory`` with ``noeviction`` answers every write with OOM. The user is told
    "not sent: the server cannot reach its message broker just now", and a node started then says
    "error: cannot reach Redis at …": both send the operator looking at the network, when Redis is
    right there and full."""
    node = cluster.node(tmp_path / "node")
    alice = cluster.log_in("alice", node)
    alice.say("before redis is full")
    wait_for(alice, said("before redis is full"))
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            alice.say("into a full redis")
            refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply | Chat))
            assert isinstance(refusal, ErrorReply) and refusal.message.startswith("not sent"), refusal
            assert "cannot reach" not in refusal.message, refusal.message
            where = ["--port", "0", "--users", str(cluster.users_file), "--data-dir", str(tmp_path / "other")]
            status, _, err, _ = finish(start_server(*where, "--backend", redis_server.url), within=TIMEOUT * 4)
            assert status == 1 and err.startswith("error: "), err
            assert "cannot reach" not in err, err
        finally:
            admin.config_set("maxmemory", 0)


def test_a_redis_user_without_the_scripting_permission_is_not_reported_as_unreachable(
    tmp_path, users_file, redis_server
):
    """An ACL user the operator made without ``+@scripting`` (the nodes run Lua scripts): the node
    stops at start with "error: the server cannot reach its message broker just now", a line about
    the network, where Redis answered "this user has no permissions to run the 'evalsha' command"."""
    import_accounts(users_file, redis_server.url)
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.execute_command("ACL", "SETUSER", "chat", "on", ">chat-pass", "~*", "+@all", "-@scripting")
    url = f"redis://chat:chat-pass@127.0.0.1:{redis_server.port}/0"
    where = ["--port", "0", "--users", str(users_file), "--data-dir", str(tmp_path / "data")]
    status, _, err, _ = finish(start_server(*where, "--backend", url), within=TIMEOUT * 4)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert status == 1 and last.startswith("error: "), err
    assert "cannot reach" not in last and "permission" in last.lower(), last


def test_the_last_account_deleted_from_redis_is_logged_out_and_cannot_log_in_again(cluster, tmp_path):
    """deluser of the last account left in Redis empties the accounts hash: the new "Redis holds no
    accounts, it lost its data" guess takes it for a data loss, so the deleted account's session goes
    on and its old password still logs in (from the record cached before the deletion)."""
    node = cluster.node(tmp_path / "node1", "--ping-interval", "2", "--ping-timeout", "20")
    for name in ("bob", "carol", "dave", "erin", "echo"):
        done = server_command("deluser", name, "--backend", cluster.redis_url)
        assert done.returncode == 0, done.stderr
    alice = cluster.log_in("alice", node)
    drain(alice)
    done = server_command("deluser", "alice", "--backend", cluster.redis_url)
    assert done.returncode == 0, done.stderr
    # A deleted account's session ends (the keepalive checks every account each half second here).
    ended = None
    deadline = time.monotonic() + TIMEOUT
    while ended is None and time.monotonic() < deadline:
        event = alice.next_event(timeout=0.2)
        if isinstance(event, Disconnected):
            ended = event
    again = client_of(node, tmp_path / "known_hosts_again")
    cluster.clients.append(again)
    try:
        again.login("alice", password_of("alice"))
        logged_in_again = True
    except LoginRefused:
        logged_in_again = False
    assert ended is not None, "the deleted account's session went on"
    assert not logged_in_again, "the deleted account logged in again with its old password"


def test_a_login_to_a_redis_deployment_with_no_accounts_yet_is_not_told_the_store_cannot_be_read(
    tmp_path, redis_server
):
    """A first start on an empty Redis with no users.json to copy (accounts to be added with adduser
    --backend): Redis answers and holds no account, yet every login is told "the server cannot read its
    user store" (code server_error), which sends the operator after a Redis that works."""
    node = ServerProcess(
        [
            "--port", "0", "--users", str(tmp_path / "users.json"), "--data-dir", str(tmp_path / "data"),
            "--backend", redis_server.url, "--log-level", "WARNING",
        ]
    )  # fmt: skip
    try:
        client = client_of(node, tmp_path / "known_hosts")
        try:
            with pytest.raises(LoginRefused) as refused:
                client.login("alice", password_of("alice"))
        finally:
            client.close()
    finally:
        node.stop()
    assert refused.value.code == "auth_failed", f"{refused.value.code}: {refused.value}"


# --------------------------------------------------------------------------- failing over


def test_a_private_line_during_a_redis_outage_is_not_refused_as_to_a_user_who_does_not_exist(
    cluster, tmp_path, redis_server
):
    """Redis is stopped for a moment. alice's room line is refused, rightly, with "not sent: the
    server cannot reach its message broker just now"; but her /msg to bob, who is online on the
    other node and whom she has not written to yet, is refused with "not sent: there is no user
    bob" (the account directory reads a
    store it cannot reach as "no such account", ``ServerAccounts.canonical``). She is told her
    friend's account is gone; she should be told the line was not sent because of the outage."""
    first, second = two_nodes(cluster, tmp_path)
    alice, bob = cluster.log_in("alice", first), cluster.log_in("bob", second)
    bob.say("before the outage")
    wait_for(alice, said("before the outage"))
    redis_server.stop()
    try:
        alice.private("bob", "during the outage")
        refusal = wait_for(alice, lambda event: isinstance(event, ErrorReply | Chat), timeout=TIMEOUT * 3)
        assert isinstance(refusal, ErrorReply) and refusal.message.startswith("not sent"), refusal
        assert "there is no user" not in refusal.message, refusal.message
    finally:
        redis_server.start()


def alice_in_a_terminal_of_two_nodes(terminals, tmp_path: Path, first, second):
    """``client.py --server FIRST --server SECOND --user alice`` in a pty, her password typed."""
    from conftest import client_env

    servers = [f"--server=127.0.0.1:{first.port}", f"--server=127.0.0.1:{second.port}"]
    argv = [sys.executable, str(ROOT / "client.py"), *servers, "--user", "alice", "--accept-new-host-key"]
    alice = terminals([*argv, "--known-hosts", str(tmp_path / "known_hosts_cli")], env=client_env(tmp_path))
    alice.wait_for_text("Password for alice:", TIMEOUT * 4)
    alice.type(password_of("alice") + "\r")
    return alice


def test_a_client_moving_off_a_dead_node_is_not_stopped_by_a_port_that_accepts_and_hangs_up(cluster, tmp_path):
    """``ChatClient(reconnect=True, other_servers=[...])``: its node dies, and its address still accepts
    TCP for a moment but drops the connection at once (a node in the middle of its shutdown, a
    supervisor re-binding the port, an L4 balancer with no backend). ``connect()`` fails the
    handshake and calls ``close()``, which also sets ``_stop_reconnecting``: the reconnection gives up
    ("Disconnected: closed") instead of going on to the other node, where the session would resume.
    With a plain SIGTERM of the node it happens now and then (a race); here it is made certain."""
    from securechat.client import ChatClient, KnownHosts, Reconnected

    first, second = two_nodes(cluster, tmp_path)
    alice = ChatClient(
        "127.0.0.1",
        first.port,
        server_fingerprint=first.fingerprint,
        known_hosts=KnownHosts(tmp_path / "known_hosts_alice"),
        timeout=TIMEOUT * 2,
        other_servers=[("127.0.0.1", second.port)],
        reconnect=True,
    )
    cluster.clients.append(alice)
    alice.login("alice", password_of("alice"))
    bob = cluster.log_in("bob", second)
    first.process.kill()
    first.process.wait()
    gone = HangsUp(first.port)
    try:
        outcome = wait_for(
            alice,
            lambda event: isinstance(event, Reconnected) or type(event).__name__ == "Disconnected",
            timeout=TIMEOUT * 3,
        )
        assert isinstance(outcome, Reconnected), outcome
        bob.say("alice moved")
        wait_for(alice, said("alice moved"))
    finally:
        gone.close()


def test_the_terminal_client_fails_over_when_the_dead_nodes_address_still_accepts(cluster, tmp_path, terminals):
    """``client.py --server NODE1 --server NODE2``: node 1 is killed, and its address still accepts
    TCP but hangs up at once. The client tries node 1 again and again ("still offline: the server
    closed the connection (connection reset by peer)", backing off to 60 s) and never tries node 2,
    which is up and would resume the session: ``ChatClient._reach_a_server`` moves on only when the
    TCP connect itself fails. (A frozen node, whose kernel still accepts, holds its clients the same
    way, each try waiting out the 60 s login timeout.)"""
    first, second = two_nodes(cluster, tmp_path)
    alice = alice_in_a_terminal_of_two_nodes(terminals, tmp_path, first, second)
    alice.wait_for_text("you are in #lobby", TIMEOUT * 4)
    bob = cluster.log_in("bob", second)
    first.process.kill()
    first.process.wait()
    gone = HangsUp(first.port)
    try:
        alice.wait_for_text("connection lost", TIMEOUT * 2)
        bob.say("while alice moves")
        alice.wait_for_text("reconnected as alice", TIMEOUT * 3)
        alice.wait_for_text("bob: while alice moves", TIMEOUT)
    finally:
        gone.close()


def test_a_full_node_is_passed_over_for_the_next_server(tmp_path, users_file, redis_server, terminals):
    """``client.py --server A --server B`` of a Redis deployment, node A full (--max-clients): A answers
    "server is full; try again later" in place of its hello, and connect() lets a refusal stand, so the
    terminal exits with that error (and a reconnecting client retries A for ever, as it answered last),
    though B has room and would log alice in. A node's own capacity (server_full, too_many_connections)
    says nothing about the other nodes."""
    from test_cli import START, at_prompt

    cluster = Cluster(tmp_path, users_file, redis_server.url)
    try:
        first, second = two_nodes(cluster, tmp_path, "--max-clients", "1")
        cluster.log_in("bob", first)  # A is full
        alice = alice_in_a_terminal_of_two_nodes(terminals, tmp_path, first, second)
        alice.wait_until(at_prompt(), START, "alice's prompt, through node B")
    finally:
        cluster.close()
