"""The server's outbound path: the per-connection queue, the outbox, and the send pool that drains them."""

import logging

from conftest import wait_for

from client import Chat, Notice
from outbound import OutboundQueue
from protocol import MAX_FRAME_SIZE
from server import PING_FRAME

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


# --------------------------------------------------------------------------- the send pool, end to end


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
