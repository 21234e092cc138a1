"""One writer at a time to a file or a socket, and no lock held while it writes (group commit).

Callers ``put`` an item (cheap: call it under whatever lock gives the items their
order), then ``flush``. The first caller to flush while nobody is writing becomes the
writer: it takes everything queued so far and hands it to ``write`` in one call (one
fsync, one ``sendall``), then what was queued meanwhile, until the queue is empty.
The others wait on a condition, not on a lock held over the I/O, and their items go
out in the writer's batches. There is no thread of its own, so nothing to stop.

No sockets or files here: ``write`` is the caller's.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Ticket:
    """What ``put`` returns: whether that item's batch has been written, and if it failed, why."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None


def _reraised(error: BaseException) -> Exception:
    """A new exception saying what ``error`` said, for one waiter to raise (``error`` is shared by its batch)."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror) if error.errno is not None else OSError(str(error))
    return RuntimeError(f"the write failed: {type(error).__name__}")


class GroupWriter(Generic[Item]):
    """Items written in the order they were put, in batches, by whichever caller is free to write.

    ``write(items)`` is called by one thread at a time, with no lock of this object
    held; it raises (an ``OSError``, typically) to fail every item of its batch. A
    failed batch does not stop the next one from being tried.
    """

    def __init__(self, write: Callable[[list[Item]], None]) -> None:
        self._write = write
        # Guards _queued, _writing and _closed, and every Ticket's fields. Held for bookkeeping
        # only, never while write() runs.
        self._state_lock = threading.Lock()
        # Notified when a batch is done and when the writer's place falls free.
        self._batch_done = threading.Condition(self._state_lock)
        self._queued: list[tuple[Item, Ticket]] = []
        # True while one caller is writing: the others wait, or leave their items to it.
        self._writing = False
        # Set by close(): what is queued from then on fails without being written.
        self._closed = False

    def put(self, item: Item) -> Ticket:
        """Queue ``item`` after those put before it; ``flush`` writes it. Never blocks on I/O."""
        ticket = Ticket()
        with self._state_lock:
            self._queued.append((item, ticket))
        return ticket

    def flush(self, ticket: Ticket | None = None, *, wait: bool = True) -> None:
        """Write what is queued, or wait for the caller that is writing it.

        With ``wait`` (the default), returns once ``ticket``'s item (without one:
        everything queued so far) is written, and raises a copy of the error that
        failed its batch (an ``OSError`` as ``write`` raised it). With ``wait=False``,
        returns at once if another caller is writing: that caller writes this item
        too before it stops.
        """
        with self._batch_done:
            while True:
                if ticket is not None and ticket.done:
                    self._raise_if_failed(ticket)
                    return
                if not self._writing:
                    if not self._queued:
                        return
                    self._writing = True  # our turn: we write, for everyone queued
                    break
                if not wait:
                    return
                self._batch_done.wait()
        self._write_until_empty()
        if ticket is not None:
            with self._state_lock:
                # A ticket not done is queued until a writer takes it, and we took all that were.
                assert ticket.done
                self._raise_if_failed(ticket)

    def close(self) -> None:
        """Refuse to write anything more: returns once no write is under way (what is queued fails)."""
        with self._batch_done:
            self._closed = True
            while self._writing:
                self._batch_done.wait()
            failed, self._queued = self._queued, []
            for _, ticket in failed:
                ticket.done, ticket.error = True, OSError(errno.ENOTCONN, "closed")
            self._batch_done.notify_all()

    def _raise_if_failed(self, ticket: Ticket) -> None:
        """Raise for a done ticket whose batch failed. The caller holds ``_state_lock``."""
        if ticket.error is not None:
            raise _reraised(ticket.error) from ticket.error

    def _write_until_empty(self) -> None:
        """Write batches until the queue is empty. The caller has taken the writer's place."""
        batch: list[tuple[Item, Ticket]] = []
        try:
            while True:
                with self._batch_done:
                    batch, self._queued = self._queued, []
                    if not batch:
                        # Given up in the same hold that saw the queue empty: an item put
                        # after this finds no writer, so its own flush writes it.
                        self._writing = False
                        self._batch_done.notify_all()
                        return
                    error: BaseException | None = OSError(errno.ENOTCONN, "closed") if self._closed else None
                if error is None:
                    try:
                        self._write([item for item, _ in batch])
                    except Exception as exc:  # every item of the batch fails with it; the next batch is tried
                        error = exc
                with self._batch_done:
                    for _, ticket in batch:
                        ticket.done, ticket.error = True, error
                    batch = []
                    self._batch_done.notify_all()
        except BaseException as exc:  # interrupted (KeyboardInterrupt, say): nobody may wait for us forever
            with self._batch_done:
                for _, ticket in batch:
                    ticket.done, ticket.error = True, exc
                self._writing = False
                self._batch_done.notify_all()
            raise
