"""The server's outbound path: the per-connection queue and the writer that drains it."""

import logging
import threading

from conftest import wait_for

from client import Chat, Notice
from protocol import MAX_FRAME_SIZE
from server import PING_FRAME, OutboundQueue

# --------------------------------------------------------------------------- the queue


def test_a_batch_takes_what_is_queued_in_order_up_to_the_cap():
    queue = OutboundQueue(max_size=10)
    for number in range(5):
        assert queue.put(number)
    assert queue.get_batch(3) == [0, 1, 2]
    assert queue.get_batch(3) == [3, 4]
    queue.put(5)
    assert queue.get() == 5


def test_urgent_items_jump_the_backlog():
    queue = OutboundQueue(max_size=10)
    for line in ("one", "two", "three"):
        queue.put(line)
    assert queue.put_urgent(PING_FRAME)
    assert queue.get_batch(10) == [PING_FRAME, "one", "two", "three"]


def test_a_ping_queued_while_the_writer_seals_a_batch_can_be_taken_at_once():
    queue = OutboundQueue(max_size=10)
    for line in ("one", "two"):
        queue.put(line)
    batch = queue.get_batch(10)  # the writer is now sealing these
    assert not queue.has_urgent
    queue.put("three")
    queue.put_urgent(PING_FRAME)
    assert queue.has_urgent
    assert queue.take_urgent() == [PING_FRAME]
    assert not queue.has_urgent
    assert batch == ["one", "two"]
    assert queue.get_batch(10) == ["three"]


def test_urgent_items_still_respect_the_limit_and_a_closed_queue():
    queue = OutboundQueue(max_size=2)
    queue.put("one")
    queue.put("two")
    assert not queue.put_urgent(PING_FRAME)
    queue.finish("goodbye")
    assert queue.put_urgent(PING_FRAME)  # dropped silently once closing, like put()
    assert queue.get_batch(10) == ["one", "two", "goodbye", OutboundQueue.CLOSE_AFTER_FLUSH]
    assert queue.get_batch(10) == []


def test_a_waiting_writer_wakes_for_a_batch_and_for_close():
    queue = OutboundQueue(max_size=10)
    batches = []

    def take_one_batch():
        batches.append(queue.get_batch(10))

    for wake_it in (lambda: queue.put("line"), queue.close):
        writer = threading.Thread(target=take_one_batch)
        writer.start()
        wake_it()
        writer.join(timeout=5)
        assert not writer.is_alive()
    assert batches == [["line"], []]


# --------------------------------------------------------------------------- the writer


def test_a_message_too_large_to_send_is_skipped_and_the_connection_lives_on(server, connect, caplog):
    alice, bob = connect("alice"), connect("bob")
    wait_for(alice, lambda event: isinstance(event, Notice) and event.event == "joined" and event.name == "bob")
    secret_text = "unsendable " * (MAX_FRAME_SIZE // 10)
    with caplog.at_level(logging.INFO, logger="chat.server"):
        server.room.announce(secret_text)
        alice.say("still here?")
        heard = wait_for(bob, lambda event: isinstance(event, Chat) and event.text == "still here?")
    assert heard.sender == "alice"
    bob.say("yes")
    wait_for(alice, lambda event: isinstance(event, Chat) and event.text == "yes")
    assert "NOTICE message not sent" in caplog.text
    assert "unsendable" not in caplog.text
    assert "disconnect" not in caplog.text
