"""Faults a deployment on Redis meets: a node that falls behind the streams, a race between nodes,
data forged in Redis, a node killed outright. The nodes are real server processes
(``test_redis.Cluster``) or, where a moment must be held still to make a race deterministic, a hub
on a ``RedisBackend`` in this process beside them, as ``test_redis.py`` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from conftest import TIMEOUT, assert_a_notice_said_while_offline_is_not_counted_as_lost, drain, password_of, wait_for
from test_redis import Cluster, client_of, entered, said, two_nodes

from securechat.client import Disconnected
from securechat.protocol import Chat, Notice


@pytest.fixture
def cluster(tmp_path, users_file, redis_server):
    cluster = Cluster(tmp_path, users_file, redis_server.url)
    yield cluster
    cluster.close()


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

    from conftest import process_state, wait_until

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
    from test_redis import Session, wait_until

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

    from test_redis import hub_on, wait_until

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
        told = [m.text for m in alice.received if isinstance(m, Notice) and m.event == "moderation"]
        assert any("+i" in text for text in told) and any("+m" in text for text in told), told
        wait_until(lambda: set(hub_a.room_state("#r").modes) >= {"m"})
        with pytest.raises(HubError, match="invite-only"):
            hub_a.join(carol, "#r")
    finally:
        second.release.set()
        if changing is not None:
            changing.join(TIMEOUT)
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


def test_a_redis_that_comes_back_without_its_data_is_said_to_have_lost_it(cluster, tmp_path, redis_server):
    """Redis restarted without persistence (or flushed): every session ends, and the right password is
    refused as a wrong one. The running nodes must say why, once, in their log."""
    node = cluster.node(tmp_path / "node")
    cluster.log_in("alice", node)
    with redis.Redis.from_url(redis_server.url) as store:
        store.flushall()
        store.client_kill_filter(_type="normal", skipme=True)  # as a restart does: every link drops
    _wait_for_log(node, "Redis came back without its data", TIMEOUT * 2)


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


def test_someone_joining_on_another_node_as_one_enters_is_heard_of(redis_server):
    """Alice's node reads who is in the room on the other nodes, then puts her in it: bob joining on
    his node in between (after that read, his notice handed over before she was in) was neither in
    her roster nor told to her, and her client never listed him."""
    import threading

    from test_redis import hub_on, wait_until

    from securechat.redis_backend import RedisBackend

    key = b"k" * 32
    heard = threading.Event()

    class BobComesMeanwhile(RedisBackend):
        armed = False

        def members_elsewhere(self, room):
            found = super().members_elsewhere(room)
            if self.armed and room == "#r":
                self.armed = False
                hub_b.join(bob, "#r")  # his node announces him: nobody from there is in #r yet
                assert heard.wait(TIMEOUT)  # and alice's node has handed the notice over
            return found

    first, second = BobComesMeanwhile(redis_server.url, key), RedisBackend(redis_server.url, key)
    hub_a, (alice, carol) = hub_on(first, "alice", "carol")
    hub_b, (bob,) = hub_on(second, "bob")
    on_presence = hub_a.on_presence

    def presence(room, notice) -> None:
        on_presence(room, notice)
        if room == "#r" and notice.name == "bob":
            heard.set()

    hub_a.on_presence = presence  # type: ignore[method-assign]
    try:
        hub_a.join(carol, "#r")  # the room is read on alice's node already
        first.armed = True
        hub_a.join(alice, "#r")
        wait_until(lambda: heard.is_set())
        told = [
            message
            for item in alice.received
            for message in (item.messages if hasattr(item, "messages") else [item])
            if isinstance(message, Notice) and message.room == "#r" and message.name == "bob"
        ]
        assert [notice.event for notice in told] == ["joined"], alice.received
    finally:
        hub_a.close()
        hub_b.close()


def test_a_member_swept_away_while_its_node_could_not_refresh_is_heard_of_again(redis_server):
    """A node cut off from Redis for longer than its roster entries last keeps its sessions; another
    node takes the lapsed entries for a dead node's and tells the room they left. They have not: the
    room must hear they are back."""
    from test_redis import hub_on, wait_until

    from securechat.redis_backend import RedisBackend

    key = b"k" * 32
    first, second = RedisBackend(redis_server.url, key), RedisBackend(redis_server.url, key)
    hub_a, (alice,) = hub_on(first, "alice")
    hub_b, _ = hub_on(second, "bob")
    try:
        with redis.Redis.from_url(redis_server.url) as store:
            _age(store, "chat:roster:#lobby", "bob")  # what 30 s without a refresh leaves
        first._sweep_rosters()  # what alice's node does every 10 s

        def heard() -> list[str]:
            return [
                message.event
                for item in alice.received
                for message in (item.messages if hasattr(item, "messages") else [item])
                if isinstance(message, Notice) and message.name == "bob" and message.room == "#lobby"
            ]

        wait_until(lambda: heard()[-1:] == ["joined"] and "left" in heard())
    finally:
        hub_a.close()
        hub_b.close()
