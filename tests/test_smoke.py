from conftest import drain, wait_for

from securechat.client import Chat


def test_two_people_chat(connect):
    alice = connect("alice")
    bob = connect("bob")
    wait_for(alice, lambda e: getattr(e, "event", "") == "joined" and e.name == "bob")
    alice.say("hello bob")
    message = wait_for(bob, lambda e: isinstance(e, Chat))
    assert (message.sender, message.text) == ("alice", "hello bob")
    # alice hears only her own line back: the server's echo of it, carrying her ref
    assert [(e.sender, e.text, bool(e.ref)) for e in drain(alice) if isinstance(e, Chat)] == [
        ("alice", "hello bob", True)
    ]
