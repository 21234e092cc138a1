"""The server's hello signatures: every hello waiting at once covered by one RSA signature."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from securechat.protocol import (
    MAX_HELLO_BATCH,
    server_hello_signed_data,
)

log = logging.getLogger("chat.server")


@dataclass
class _PendingHello:
    """One hello waiting for the server's signature (see ``HelloSigner``)."""

    digest: bytes
    #: Set once: with the batch and signature filled in, or with ``leads`` set.
    ready: threading.Event = field(default_factory=threading.Event)
    #: True when it is this hello's turn to sign, for itself and whoever is waiting.
    leads: bool = False
    batch: bytes = b""
    signature: bytes | None = None
    #: Why this hello's batch could not be signed (the signature is then None).
    failure: BaseException | None = None


class HelloSigningError(Exception):
    """The server could not sign a hello (its own fault, never the client's)."""


class HelloSigner:
    """Signs the server's hellos: all those waiting at once with one RSA signature.

    A signature costs about 0.25 ms of CPU (twice that with the other core busy), one
    per connection. When hundreds of clients connect at once (the server restarted, a
    network came back, a login storm), the hellos that arrive while one signature is
    being made are covered by the next: it signs the digests of up to
    ``MAX_HELLO_BATCH`` hellos, and each client finds its own digest among them. A hello
    that arrives alone is signed at once, as before.

    No thread of its own (group commit): a caller who finds nobody signing signs a batch,
    itself first, then hands the turn to the oldest hello still waiting. Waiting has no
    deadline, so ``sign`` must not block: it signs with the key in this process.
    """

    def __init__(self, sign: Callable[[bytes], bytes]) -> None:
        self._sign = sign
        # Guards _waiting and _signing: whether some caller has the turn to sign.
        self._turn_lock = threading.Lock()
        self._waiting: deque[_PendingHello] = deque()
        self._signing = False

    def sign(self, digest: bytes) -> tuple[bytes, bytes]:
        """(batch, signature) for one hello's digest: the batch holds it, perhaps among others."""
        pending = _PendingHello(digest)
        with self._turn_lock:
            if self._signing:
                self._waiting.append(pending)
            else:
                self._signing = True
                pending.leads = True
        if not pending.leads:
            pending.ready.wait()  # whoever has the turn always sets it, signing or not
        if pending.leads:
            self._sign_batch(pending)
        if pending.signature is None:
            raise HelloSigningError("could not sign the server's hello") from pending.failure
        return pending.batch, pending.signature

    def _sign_batch(self, leader: _PendingHello) -> None:
        with self._turn_lock:
            members = [leader]
            while self._waiting and len(members) < MAX_HELLO_BATCH:
                members.append(self._waiting.popleft())
        batch = b"".join(member.digest for member in members)
        signature, failure = None, None
        try:
            signature = self._sign(server_hello_signed_data(batch))
        except Exception as exc:
            log.exception("could not sign a batch of %d hello(s)", len(members))  # once, not per member
            failure = exc
        finally:
            # Even if signing failed: the members then raise, and the turn still passes on.
            for member in members:
                member.batch, member.signature, member.failure = batch, signature, failure
                if member is not leader:
                    member.ready.set()
            with self._turn_lock:
                if self._waiting:
                    successor = self._waiting.popleft()
                    successor.leads = True
                    successor.ready.set()
                else:
                    self._signing = False
