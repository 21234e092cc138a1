"""The server's outbound path: the per-connection queue, and over real sockets the outbox, the flusher
and the send pool that drains them, then the whole path end to end."""

import logging
import socket
import threading
import time

import pytest
from conftest import TIMEOUT, password_of, wait_for, wait_until
from test_hostile import RawPeer, spare_key
from test_rooms import left_room, room_entered

from securechat.client import Chat, Notice
from securechat.connection import PING_FRAME, REQUESTS_WAIT_ABOVE
from securechat.outbound import OUTBOX_HIGH_WATER, SEAL_AHEAD, OutboundQueue, Outbox, SealedRun, SendPool
from securechat.protocol import MAX_FRAME_SIZE, Batch, Command, ErrorReply

# --------------------------------------------------------------------------- the queue


def test_a_batch_takes_what_is_queued_in_order_up_to_the_cap():
    queue = OutboundQueue(max_size=10)
    for number in range(5):
        assert queue.put(number)
    assert queue.take_batch(3) == ([0, 1, 2], True)
    assert queue.take_batch(3) == ([3, 4], False)
    assert queue.take_batch(3) == ([], False)


def test_urgent_items_jump_the_backlog():
    queue = OutboundQueue(max_size=10)
    for line in ("one", "two", "three"):
        queue.put(line)
    assert queue.put_urgent(PING_FRAME)
    assert queue.take_batch(10) == ([PING_FRAME, "one", "two", "three"], False)


def test_urgent_items_still_respect_the_limit_and_a_closed_queue():
    queue = OutboundQueue(max_size=2)
    queue.put("one")
    queue.put("two")
    assert not queue.put_urgent(PING_FRAME)
    assert not queue.put("three")
    queue.finish("goodbye")
    assert queue.put_urgent(PING_FRAME)  # dropped silently once closing, like put()
    assert queue.take_batch(10) == (["one", "two", "goodbye", OutboundQueue.CLOSE_AFTER_FLUSH], False)
    assert queue.take_batch(10) == ([], False)


def test_the_sender_is_told_only_when_an_empty_queue_gets_something():
    calls = []
    queue = OutboundQueue(max_size=10, on_ready=lambda: calls.append(len(queue)))
    queue.put("one")
    queue.put("two")
    queue.put_urgent(PING_FRAME)
    assert calls == [1]
    queue.take_batch(10)
    queue.put_urgent(PING_FRAME)
    assert calls == [1, 1]
    queue.take_batch(10)
    queue.finish("goodbye")  # the sign to close must be seen even with nothing else queued
    assert calls == [1, 1, 2]
    queue.close()
    queue.put("late")
    assert calls == [1, 1, 2]


# --------------------------------------------------------------------------- the outbox, the flusher, the pool


class Events:
    """What an outbox told its owner, and a way to wait for it."""

    def __init__(self):
        self.changed = threading.Condition()
        self.room = 0
        self.closed = 0
        self.errors = []

    def note(self, field, value=None):
        with self.changed:
            if field == "errors":
                self.errors.append(value)
            else:
                setattr(self, field, getattr(self, field) + 1)
            self.changed.notify_all()

    def wait(self, predicate):
        with self.changed:
            assert self.changed.wait_for(predicate, timeout=TIMEOUT), "the outbox never said so"


@pytest.fixture
def pool():
    pool = SendPool(workers=2)
    pool.start()
    yield pool
    pool.stop()
    assert not any(thread.name in ("send-0", "send-1", "flush") for thread in threading.enumerate())


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):  # small buffers, so the kernel refuses writes early
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield ours, theirs
    ours.close()
    theirs.close()


def make_outbox(sock, pool, events):
    return Outbox(
        sock,
        pool.flusher,
        on_room=lambda: events.note("room"),
        on_flushed_close=lambda: events.note("closed"),
        on_error=lambda reason: events.note("errors", reason),
    )


def read_exactly(sock, size):
    received = bytearray()
    sock.settimeout(TIMEOUT)
    while len(received) < size:
        chunk = sock.recv(65536)
        assert chunk, "closed early"
        received += chunk
    return bytes(received)


def test_what_the_socket_cannot_take_now_arrives_later_and_in_order(pool, pair):
    ours, theirs = pair
    events = Events()
    outbox = make_outbox(ours, pool, events)
    chunks = [bytes([number]) * 50_000 for number in range(8)]  # far beyond the socket buffers
    started = time.monotonic()
    for chunk in chunks:
        outbox.write(chunk)
    assert time.monotonic() - started < TIMEOUT / 2, "write blocked on a peer that is not reading"
    assert not outbox.has_room(), "400 kB cannot all be in the kernel already"
    assert read_exactly(theirs, sum(map(len, chunks))) == b"".join(chunks)
    events.wait(lambda: events.room == 1)  # the flusher drained it, so sealing may go on
    assert outbox.has_room()
    assert events.errors == [] and events.closed == 0


def test_close_when_empty_waits_for_the_last_byte(pool, pair):
    ours, theirs = pair
    events = Events()
    outbox = make_outbox(ours, pool, events)
    outbox.write(b"a" * 200_000)
    outbox.write(b"goodbye", close_when_empty=True)
    assert events.closed == 0  # the peer has not read yet: closing now would lose the goodbye
    data = read_exactly(theirs, 200_007)
    assert data.endswith(b"goodbye")
    events.wait(lambda: events.closed == 1)


def test_a_vanished_peer_is_one_error_and_nothing_more(pool, pair):
    ours, theirs = pair
    events = Events()
    outbox = make_outbox(ours, pool, events)
    outbox.write(b"a" * 200_000)  # some of it waits for the flusher
    theirs.close()
    events.wait(lambda: len(events.errors) == 1)
    assert events.errors[0].startswith("send failed")
    outbox.write(b"more")
    assert outbox.flush()
    assert len(events.errors) == 1


def test_the_high_water_mark_holds_sealing_back_until_the_flusher_makes_room(pool, pair):
    ours, theirs = pair
    events = Events()
    outbox = make_outbox(ours, pool, events)
    while outbox.has_room():
        outbox.write(b"x" * 16_384)
    assert events.room == 0
    total = 0
    theirs.settimeout(TIMEOUT)
    while events.room == 0:
        total += len(theirs.recv(65536))
    assert total > OUTBOX_HIGH_WATER // 2


def test_each_connection_is_pumped_by_one_worker_in_turn(pool):
    class Job:
        def __init__(self, batches):
            self.batches = batches
            self.pumps = 0
            self.threads = set()
            self.done = threading.Event()

        def seal_queued(self):
            self.threads.add(threading.current_thread().name)
            self.pumps += 1
            self.batches -= 1
            return SealedRun(b"", False, self.batches > 0)

        def write_sealed(self, sealed):
            if not sealed.more:
                self.done.set()
            return sealed.more

    jobs = [Job(batches=5) for _ in range(6)]
    schedules = [pool.assign() for _ in jobs]
    for job, schedule in zip(jobs, schedules, strict=True):
        schedule(job)
        schedule(job)  # twice while queued: still one place in the line
    for job in jobs:
        assert job.done.wait(TIMEOUT)
        assert len(job.threads) == 1
    assert len({name for job in jobs for name in job.threads}) == 2  # both workers took a share
    barriers = [Job(batches=1) for _ in range(2)]
    for barrier, schedule in zip(barriers, schedules, strict=False):  # one behind each worker's line
        schedule(barrier)
        assert barrier.done.wait(TIMEOUT)
    assert [job.pumps for job in jobs] == [5] * len(jobs)  # a job scheduled twice was run once per turn


@pytest.mark.parametrize("failing", ["seal_queued", "write_sealed"])
def test_a_connection_whose_sealing_or_writing_fails_is_closed_and_the_worker_goes_on(pool, caplog, failing):
    class Broken:
        def __init__(self):
            self.closed = threading.Event()
            self.reason = ""

        def seal_queued(self):
            if failing == "seal_queued":
                raise RuntimeError("a bug in sealing")
            return SealedRun(b"", False, False)

        def write_sealed(self, sealed):
            raise RuntimeError("a bug in writing")

        def close(self, reason):
            self.reason = reason
            self.closed.set()

    class Fine:
        def __init__(self):
            self.pumped = threading.Event()

        def seal_queued(self):
            return SealedRun(b"", False, False)

        def write_sealed(self, sealed):
            self.pumped.set()
            return False

    schedule = pool.assign()
    broken, fine = Broken(), Fine()
    schedule(broken)
    schedule(fine)
    assert broken.closed.wait(TIMEOUT)
    assert broken.reason == "internal error while sending"  # left open, its queue would never drain
    assert fine.pumped.wait(TIMEOUT)
    if failing == "seal_queued":
        assert "a bug in sealing" in caplog.text
        assert "a bug in writing" not in caplog.text  # a connection whose seal failed is not written to
    else:
        assert "a bug in writing" in caplog.text


def test_a_worker_seals_a_run_of_connections_before_it_writes_any_and_writes_in_that_order():
    """Sealing a run, then sending it, keeps the seals' caches warm; each connection's own frames
    still go out in the order they were sealed, and a run is at most SEAL_AHEAD connections."""
    pool = SendPool(workers=1)
    pool.start()
    events = []
    release = threading.Event()
    written = threading.Semaphore(0)

    class Job:
        def __init__(self, name):
            self.name = name

        def seal_queued(self):
            events.append(("seal", self.name))
            if self.name == "gate":
                release.wait(TIMEOUT)  # holds the worker while the others are queued
            return SealedRun(self.name.encode(), False, False)

        def write_sealed(self, sealed):
            events.append(("write", sealed.data.decode()))
            written.release()
            return False

    try:
        schedule = pool.assign()
        schedule(Job("gate"))
        names = [f"job{number}" for number in range(SEAL_AHEAD + 2)]
        wait_until(lambda: events == [("seal", "gate")])
        for name in names:
            schedule(Job(name))
        release.set()
        for _ in range(len(names) + 1):
            assert written.acquire(timeout=TIMEOUT)
    finally:
        pool.stop()
    first_run, second_run = names[:SEAL_AHEAD], names[SEAL_AHEAD:]
    assert events[2:] == (
        [("seal", name) for name in first_run]
        + [("write", name) for name in first_run]
        + [("seal", name) for name in second_run]
        + [("write", name) for name in second_run]
    )


def test_a_failing_flush_costs_only_its_own_connection(pool, pair, monkeypatch):
    ours, theirs = pair
    other_ours, other_theirs = socket.socketpair()
    for sock in (other_ours, other_theirs):  # small, so the fine connection needs the flusher too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        broken_events, fine_events = Events(), Events()
        broken = make_outbox(ours, pool, broken_events)
        fine = make_outbox(other_ours, pool, fine_events)

        def explode():
            raise RuntimeError("a bug in flushing")

        broken.write(b"a" * 200_000)  # waits for the flusher
        monkeypatch.setattr(broken, "flush", explode)
        theirs.recv(65536)  # room appears, the flusher calls the broken flush
        broken_events.wait(lambda: broken_events.errors == ["internal error while sending"])
        fine.write(b"b" * 200_000, close_when_empty=True)
        assert read_exactly(other_theirs, 200_000) == b"b" * 200_000  # the flusher thread lives on
        fine_events.wait(lambda: fine_events.closed == 1)
    finally:
        other_ours.close()
        other_theirs.close()


# --------------------------------------------------------------------------- end to end


def test_a_message_too_large_to_send_is_skipped_and_the_connection_lives_on(server, connect, caplog):
    alice, bob = connect("alice"), connect("bob")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "joined" and event.name == "bob")
    secret_text = "unsendable " * (MAX_FRAME_SIZE // 10)
    with caplog.at_level(logging.INFO, logger="chat.server"):
        server.hub.announce(secret_text)
        alice.say("still here?")
        heard = wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "still here?")
    assert heard.sender == "alice"
    bob.say("yes")
    wait_for(alice, lambda event: isinstance(event, Chat) and event.text == "yes")
    assert "NOTICE message not sent" in caplog.text
    assert "unsendable" not in caplog.text
    assert "disconnect" not in caplog.text


def test_a_goodbye_finished_urgently_goes_out_next_however_much_is_queued():
    queue = OutboundQueue(max_size=10)
    for number in range(10):
        assert queue.put(f"line {number}")
    queue.finish("goodbye", drop_queued=True)
    batch, more = queue.take_batch(64)
    assert batch == ["goodbye", OutboundQueue.CLOSE_AFTER_FLUSH] and not more


def test_a_queue_keeps_what_its_items_weigh():
    queue = OutboundQueue(max_size=100, size_of=len)
    assert queue.put("123456") and queue.put("12345678")
    assert queue.waiting_bytes == 14
    assert queue.take_batch(1) == (["123456"], True)
    assert queue.waiting_bytes == 14  # what the worker is sealing still waits to be sent
    queue.release_taken()
    assert queue.waiting_bytes == 8
    assert queue.take_batch(1) == (["12345678"], False)
    queue.put_back(["abc"])  # what a worker could not send weighs again, in the queue
    queue.release_taken()
    assert queue.put_urgent(b"ping")
    assert queue.waiting_bytes == 7
    queue.finish("bye", drop_queued=True)  # the urgent frame stays
    assert queue.waiting_bytes == 7
    assert queue.take_batch(10) == ([b"ping", "bye", OutboundQueue.CLOSE_AFTER_FLUSH], False)
    assert queue.waiting_bytes == 7
    queue.release_taken()
    assert queue.waiting_bytes == 0
    assert OutboundQueue(max_size=1).waiting_bytes == 0  # nothing weighed without size_of


def test_a_client_that_stops_reading_is_held_to_the_mark_and_one_frame(make_server, connect):
    # The mark was checked once per batch of 64, so each non-reading listener held up to 855 KiB.
    server = make_server(send_queue_size=100_000, flood_rate=0)
    talker = connect("alice", to=server)
    lazy = RawPeer(server, private_key=spare_key("lazy"), receive_buffer=4096)
    try:
        lazy.login("bob", password_of("bob"))  # and then never reads again
        wait_until(lambda: any(c.name == "bob" and c.in_room for c in server.connections))
        connection = next(c for c in server.connections if c.name == "bob")
        # 12 MB: more than the kernel's socket buffers take, so the rest must wait in the server.
        for _ in range(400):
            talker.say("x" * 30_000)
        wait_until(lambda: not talker.pending, timeout=TIMEOUT * 4)  # every line was taken by the server
        wait_until(lambda: len(connection.send_queue) > 0)  # what did not fit waits unsealed
        assert len(connection.outbox._pending) <= OUTBOX_HIGH_WATER + MAX_FRAME_SIZE
    finally:
        lazy.close()


def test_a_client_that_asks_for_history_and_never_reads_is_refused_more_before_the_pages_pile_up(make_server, connect):
    # A /history page is one queued item of up to 500 lines of 32 KiB. Counted in items alone, a
    # client that asked page after page and never read made the server hold 100 MB or more for it
    # (its requests kept the keepalive content) before 512 items were queued.
    server = make_server(flood_rate=0)
    alice = connect("alice", to=server)
    padding = "x" * 30_000
    for number in range(100):
        alice.say(f"{number} {padding}")
    wait_for(alice, lambda event: isinstance(event, Chat) and event.text == f"99 {padding}", timeout=60)
    carol = RawPeer(server, private_key=spare_key("sluggard"), receive_buffer=4096)
    held: list[int] = []
    try:
        carol.login("carol", password_of("carol"))  # and then does not read for a while
        connection = next(c for c in server.connections if c.name == "carol")
        for _ in range(30):  # 3 MB a page
            carol.send_message(Command(token=carol.token, name="history", args=["#lobby", "100"]))
            time.sleep(0.05)
            held.append(_queued_chat_text(connection))
        time.sleep(0.5)
        held.append(_queued_chat_text(connection))
        refusal = carol.receive_reply()  # she reads at last: past the pages sent, the refusals
        assert isinstance(refusal, ErrorReply) and refusal.code == "backlog", refusal
        assert refusal.message.startswith("/history must wait: "), refusal.message
    finally:
        carol.close()
    assert max(held) <= REQUESTS_WAIT_ABOVE + 4 * 2**20, (
        f"held {max(held) / 2**20:.0f} MiB for a client that did not read"
    )


def test_a_device_that_does_not_read_is_not_made_to_hold_join_answers_past_the_backlog_limit(make_server, connect):
    """A /join enters the room on every device of the account: one device, reading, joins and parts a
    room of long lines again and again, while another does not read. Its catch-ups must not pile up
    past the backlog limit (the queue's item count alone allows 512 of up to 50 long lines each)."""
    server = make_server(flood_rate=0.0)
    filler = connect("bob", to=server)
    filler.join("#big")
    wait_for(filler, room_entered("#big"))
    long_line = "x" * 30_000
    for number in range(50):
        filler.say(f"{number} {long_line}", room="#big")
    wait_for(filler, lambda event: isinstance(event, Chat) and event.text.startswith("49 "), timeout=TIMEOUT * 4)
    reader = connect("alice", to=server, device="laptop")
    stalled = connect("alice", to=server, device="phone")
    release = threading.Event()
    put_event = stalled._put_event

    def stuck(event) -> None:  # its reader stops reading the socket: a device that does not read
        release.wait()
        put_event(event)

    stalled._put_event = stuck
    try:
        refused = []
        for _ in range(20):
            reader.join("#big")
            answer = wait_for(reader, lambda event: isinstance(event, ErrorReply) or room_entered("#big")(event))
            if isinstance(answer, ErrorReply):
                refused.append(answer)
                break
            reader.part("#big")
            wait_for(reader, left_room("#big"))
        (held,) = [c for c in server.connections if c.name == "alice" and c.device == "phone"]
        waiting = held.send_queue.waiting_bytes
        assert refused, f"{waiting / 2**20:.0f} MiB of join answers held for a device that does not read"
        assert waiting <= REQUESTS_WAIT_ABOVE + 2 * 2**20, f"{waiting / 2**20:.0f} MiB held"
        assert refused[0].code == "backlog" and "sent to another of your devices" in refused[0].message
    finally:
        release.set()


def _queued_chat_text(connection) -> int:
    """Bytes of chat text waiting in a server connection's send queue."""
    queue = connection.send_queue
    with queue._items_lock:
        items = list(queue._items)
    messages = [part for item in items for part in (item.messages if isinstance(item, Batch) else [item])]
    return sum(len(message.text.encode()) for message in messages if isinstance(message, Chat))
