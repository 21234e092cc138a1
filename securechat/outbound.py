"""The server's outbound path: what each connection still has to send, and the few threads that send it.

A sending thread per client costs a thread switch per delivery, and with hundreds of
them the GIL changes hands so often that a broadcast queues behind its own hand-offs.
So sending is done by a handful of threads, whatever the number of clients:

- Each connection keeps an ``OutboundQueue`` of messages (bounded: a client too slow
  to keep up is dropped) and an ``Outbox`` of sealed bytes the kernel has not taken yet.
- A ``SendPool`` of one or two workers seals queued messages and writes them without
  ever blocking. A connection always goes to the same worker, so its frames are sealed
  in sequence order; and each worker takes one batch per connection in turn, a run of
  up to ``SEAL_AHEAD`` connections at a time: it seals the run's batches, then writes
  them. Alternating one seal and one ``send()`` cost more: each ``send()`` runs the
  kernel's TCP path (on loopback the receiver's too) between two seals, which then ran
  with cold caches. In three alternating pairs at N = 200 a paced delivery cost 10 to
  41 % less CPU, and saturation carried 8 to 18 % more deliveries (BENCHMARKS.md).
- One ``Flusher`` thread waits (``poll``) on the sockets whose outbox is not empty and
  writes the rest when they can take it.

Nothing here knows about chat or cryptography: a connection is a ``Pumpable``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("chat.server")

#: Sealed bytes an outbox may hold before its worker stops sealing more for it, checked per
#: frame: at most one frame (64 KiB) past it. The kernel's socket buffer holds more; a client
#: this far behind is left to its message queue (unsealed messages, mostly shared with the
#: other recipients), whose limit drops it. So a client that stops reading costs the server
#: at most this, one frame, and its socket's send buffer in sealed bytes.
OUTBOX_HIGH_WATER = 128 * 1024
#: Once the flusher has brought an outbox down to this, its worker seals again.
OUTBOX_LOW_WATER = 32 * 1024
#: How often (seconds) the flusher looks at its sockets even when nothing wakes it.
FLUSHER_SWEEP_INTERVAL = 1.0
#: Connections a send worker seals for before it writes what it sealed: the first of a
#: broadcast's recipients waits for up to this many seals (about 10 us each) before its send.
SEAL_AHEAD = 32


class OutboundQueue:
    """A bounded FIFO of what one connection still has to send.

    ``put`` never blocks: when the queue is full it refuses, and the caller drops
    the slow recipient. ``close`` drops what is queued; ``finish`` lets the queue
    be sent first. Whoever drains it is told by ``on_ready``, called (outside the
    lock) whenever a put makes an empty queue non-empty. With ``size_of`` it also
    keeps what its items weigh (``waiting_bytes``): one item may be a page of history
    as large as many lines. What the worker has taken still weighs until it hands the
    rest back or says it is done (``put_back``, ``release_taken``): else a page being
    sealed weighed nothing, and a request that came just then passed the bound.
    """

    CLOSE_AFTER_FLUSH = object()

    def __init__(
        self,
        max_size: int,
        on_ready: Callable[[], None] | None = None,
        size_of: Callable[[Any], int] | None = None,
    ) -> None:
        self.max_size = max_size
        #: Called when there is something to take; set once, before anything is queued.
        self.on_ready = on_ready
        self._size_of = size_of or _weightless
        # Guards _items, _urgent, _bytes, _in_hand, _closed and _discarded.
        self._items_lock = threading.Lock()
        self._items: deque[Any] = deque()
        # Keepalive frames: they go out before _items.
        self._urgent: deque[bytes] = deque()
        # What _items and _urgent weigh by _size_of (weighed outside the lock where it can be).
        self._bytes = 0
        # What the last take_batch took, less what was put back: being sealed, not yet written.
        self._in_hand = 0
        # _closed: nothing more may be put (finish() or close()); _discarded: close() dropped it all.
        self._closed = False
        self._discarded = False

    def put(self, item: Any) -> bool:
        """Queue ``item``; False if the queue is full. A closed queue drops silently."""
        return self._add(self._items, item)

    def put_urgent(self, frame: bytes) -> bool:
        """Queue a control ``frame`` ahead of everything waiting (keepalive): False if full.

        A ping queued behind a backlog of chat would reach a busy client late and get
        it dropped as silent; control frames carry no sequence number, so they may jump.
        """
        return self._add(self._urgent, frame)

    def finish(self, *last_items: Any, drop_queued: bool = False) -> None:
        """Queue ``last_items`` past the limit, then the sign to close once they are sent.

        With ``drop_queued`` what is still queued is dropped first, so the last items go out
        next however far behind the reader is (the server's goodbye when it shuts down).
        """
        weight = sum(map(self._size_of, last_items))
        with self._items_lock:
            if self._closed:
                return
            if drop_queued:
                self._items.clear()
                self._bytes = sum(map(self._size_of, self._urgent))
            was_empty = not self._items and not self._urgent
            self._bytes += weight
            self._items.extend(last_items)
            self._items.append(self.CLOSE_AFTER_FLUSH)
            self._closed = True
        if was_empty:
            self._ready()

    def put_back(self, items: list[Any]) -> None:
        """Return items taken but not sent to the front of the queue, in their order (the send worker,
        when the outbox is full). They were already counted, so no bound is checked; a closed queue drops them."""
        weight = sum(map(self._size_of, items))
        with self._items_lock:
            self._in_hand = max(0, self._in_hand - weight)
            if self._discarded:
                return
            self._bytes += weight
            self._items.extendleft(reversed(items))

    def release_taken(self) -> None:
        """The worker is done with what it took: written to the outbox, or dropped."""
        with self._items_lock:
            self._in_hand = 0

    def close(self) -> None:
        """Drop whatever is queued; later puts are dropped too."""
        with self._items_lock:
            self._closed = self._discarded = True
            self._items.clear()
            self._urgent.clear()
            self._bytes = self._in_hand = 0

    def take_batch(self, max_items: int) -> tuple[list[Any], bool]:
        """Take up to ``max_items`` in order, keepalive frames first and beyond the cap.

        Returns the batch and whether more is left. Never waits.
        """
        with self._items_lock:
            batch: list[Any] = list(self._urgent)
            self._urgent.clear()
            items = self._items
            more = len(items) > max_items
            if more:
                batch.extend(items.popleft() for _ in range(max_items))
                self._in_hand = sum(map(self._size_of, batch))
                self._bytes -= self._in_hand
            else:
                batch.extend(items)
                items.clear()
                self._in_hand, self._bytes = self._bytes, 0
            return batch, more

    def __len__(self) -> int:
        return len(self._items) + len(self._urgent)

    @property
    def waiting_bytes(self) -> int:
        """What the items waiting weigh, those the worker has in hand included (0 without ``size_of``)."""
        return self._bytes + self._in_hand

    def _add(self, line: deque[Any], item: Any) -> bool:
        """Append to ``line`` (_items or _urgent) within the shared bound; see ``put``."""
        weight = self._size_of(item)
        with self._items_lock:
            if self._closed:
                return True
            queued = len(self._items) + len(self._urgent)
            if queued >= self.max_size:
                return False
            self._bytes += weight
            line.append(item)
        if queued == 0:  # else whoever drains the queue has been told already and will look
            self._ready()
        return True

    def _ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready()


def _weightless(_item: object) -> int:
    return 0


@dataclass(frozen=True, slots=True)
class SealedRun:
    """What one turn of a connection's send worker sealed, to write next: the bytes, whether the
    connection closes once they are out, and whether more is still queued."""

    data: bytes
    close_after: bool
    more: bool


class Pumpable(Protocol):
    """What a ``SendPool`` worker drives: one connection's outbound side."""

    def seal_queued(self) -> SealedRun | None:
        """Seal one batch of what is queued, without writing it; None if nothing may be sealed now."""

    def write_sealed(self, sealed: SealedRun | None) -> bool:
        """Write what ``seal_queued`` returned, without blocking; True if more is waiting."""

    def close(self, reason: str) -> None:
        """Close at once; called when sealing or writing failed, as a queue nobody drains would strand the client."""


class _SendWorker:
    """One thread and the connections waiting for it, served in turn."""

    def __init__(self, name: str) -> None:
        # Guards _ready, _waiting and _stopping; the worker waits on it for work.
        self._work_ready = threading.Condition(threading.Lock())
        self._ready: deque[Pumpable] = deque()
        # The members of _ready: a connection is queued at most once.
        self._waiting: set[Pumpable] = set()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def schedule(self, job: Pumpable) -> None:
        with self._work_ready:
            if job in self._waiting or self._stopping:
                return
            self._waiting.add(job)
            self._ready.append(job)
            if len(self._ready) == 1:  # the worker may be waiting; else it will look
                self._work_ready.notify()

    def stop(self) -> None:
        with self._work_ready:
            self._stopping = True
            self._ready.clear()
            self._waiting.clear()
            self._work_ready.notify()

    def _run(self) -> None:
        while True:
            with self._work_ready:
                while not self._ready and not self._stopping:
                    self._work_ready.wait()
                if self._stopping:
                    return
                jobs = [self._ready.popleft() for _ in range(min(len(self._ready), SEAL_AHEAD))]
                # Out of the set before they run: anything queued from now on schedules them again.
                self._waiting.difference_update(jobs)
            sealed: list[tuple[Pumpable, SealedRun | None]] = []
            for job in jobs:  # every seal of the run, then every send
                try:
                    sealed.append((job, job.seal_queued()))
                except Exception:  # closed, and not written to: its queue is dropped with it
                    log.exception("%s: sending failed", job)
                    job.close("internal error while sending")
            for job, run in sealed:
                try:
                    more = job.write_sealed(run)
                except Exception:  # one connection's bug must not stop the sending for all the others
                    log.exception("%s: sending failed", job)
                    job.close("internal error while sending")
                    more = False
                if more:  # to the back of the line: one batch per connection per turn
                    self.schedule(job)


class SendPool:
    """The threads that seal and send for every connection (``workers`` of them)."""

    def __init__(self, workers: int) -> None:
        self._workers = [_SendWorker(f"send-{number}") for number in range(max(1, workers))]
        self._assigned = itertools.count()
        self.flusher = Flusher()

    def start(self) -> None:
        for worker in self._workers:
            worker.thread.start()
        self.flusher.thread.start()

    def stop(self) -> None:
        """Stop every thread and wait for them; what is still queued is not sent."""
        for worker in self._workers:
            worker.stop()
        self.flusher.stop()
        for thread in [worker.thread for worker in self._workers] + [self.flusher.thread]:
            if thread.ident is not None:
                thread.join(timeout=2.0)
        self.flusher.close()

    def assign(self) -> Callable[[Pumpable], None]:
        """A connection's lifelong ``schedule`` function: always the same worker, so frames stay in order."""
        return self._workers[next(self._assigned) % len(self._workers)].schedule


class Outbox:
    """Sealed bytes for one socket that the kernel has not taken yet.

    ``write`` sends at once what the socket accepts without blocking and keeps the
    rest for the flusher. The socket stays in blocking mode for its reader thread:
    every send here passes ``MSG_DONTWAIT`` instead.
    """

    def __init__(
        self,
        sock: socket.socket,
        flusher: Flusher,
        *,
        on_room: Callable[[], None],
        on_flushed_close: Callable[[], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.sock = sock
        self.flusher = flusher
        self.on_room = on_room
        self.on_flushed_close = on_flushed_close
        self.on_error = on_error
        # Guards _pending, _close_when_empty, _starved and _failed (never held across a blocking call).
        self._pending_lock = threading.Lock()
        self._pending = bytearray()
        self._close_when_empty = False
        # Whether the worker stopped sealing for us at the high-water mark and waits to hear of room.
        self._starved = False
        self._failed = False

    def room(self) -> int:
        """Bytes the worker may seal now, up to the high-water mark; if none, ``on_room`` is called
        once there is room again."""
        with self._pending_lock:
            left = OUTBOX_HIGH_WATER - len(self._pending)
            if left <= 0:
                self._starved = True
            return left

    def has_room(self) -> bool:
        """Whether the worker may seal more now; if not, ``on_room`` is called once there is room."""
        return self.room() > 0

    def write(self, data: bytes, close_when_empty: bool = False) -> None:
        """Send ``data`` after whatever is pending; with ``close_when_empty``, close once all is out."""
        with self._pending_lock:
            if self._failed:
                return
            self._close_when_empty = self._close_when_empty or close_when_empty
            if self._pending:  # the flusher is watching this socket and will send it in order
                self._pending += data
                return
            error = self._send_some(data)
            watch = not error and bool(self._pending)
            closing = not error and not self._pending and self._close_when_empty
        self._after(error, watch, closing)

    def flush(self) -> bool:
        """Send what the socket takes now (flusher only); True when nothing is left to watch for."""
        with self._pending_lock:
            if self._failed:
                return True
            error = self._send_pending() if self._pending else ""
            done = error != "" or not self._pending
            closing = not error and not self._pending and self._close_when_empty
            room = not error and self._starved and len(self._pending) <= OUTBOX_LOW_WATER
            if room:
                self._starved = False
        self._after(error, False, closing)
        if room:
            self.on_room()
        return done

    def fileno(self) -> int:
        return self.sock.fileno()

    def close_socket(self) -> None:
        """Close the socket once no send is using it; later writes are dropped.

        Every send happens under the same lock, so a worker or the flusher can never
        be inside ``send`` on a descriptor number that ``accept`` is handing to a new client.
        """
        with self._pending_lock:
            self._failed = True
            self._pending.clear()
            self.sock.close()

    def _send_some(self, data: bytes) -> str:
        """Send what the kernel takes of ``data`` now and keep the rest (lock held); an error reason or ""."""
        sent, error = self._send(data)
        if sent < len(data):
            self._pending += memoryview(data)[sent:]
        return error

    def _send_pending(self) -> str:
        """Send what the kernel takes of the pending bytes now (lock held); an error reason or ""."""
        sent, error = self._send(self._pending)
        del self._pending[:sent]
        return error

    def _send(self, data: bytes | bytearray) -> tuple[int, str]:
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT), ""
        except (BlockingIOError, InterruptedError):
            return 0, ""
        except OSError as exc:
            self._failed = True
            self._pending.clear()
            return len(data), f"send failed: {exc.strerror or exc}"

    def _after(self, error: str, watch: bool, closing: bool) -> None:
        """Act on what ``write`` or ``flush`` found, with the lock released."""
        if error:
            self.on_error(error)
        elif watch:
            self.flusher.watch(self)
        elif closing:
            self.on_flushed_close()


class Flusher:
    """One thread that finishes the writes the kernel could not take at once."""

    def __init__(self) -> None:
        # Guards _incoming and _stopping.
        self._incoming_lock = threading.Lock()
        self._incoming: list[Outbox] = []
        self._stopping = False
        # A byte on this pair wakes the thread from poll(): new sockets to watch, or stop.
        self._wakeup_read, self._wakeup_write = socket.socketpair()
        self._wakeup_read.setblocking(False)
        self._wakeup_write.setblocking(False)
        self.thread = threading.Thread(target=self._run, name="flush", daemon=True)

    def watch(self, outbox: Outbox) -> None:
        """Have the flusher send ``outbox``'s pending bytes as its socket takes them."""
        with self._incoming_lock:
            if self._stopping:
                return
            self._incoming.append(outbox)
        self._wake()

    def stop(self) -> None:
        with self._incoming_lock:
            self._stopping = True
        self._wake()

    def close(self) -> None:
        """Release the wake-up sockets, once the thread has stopped (or never started)."""
        self._wakeup_read.close()
        self._wakeup_write.close()

    def _wake(self) -> None:
        try:
            self._wakeup_write.send(b"\0")
        except (BlockingIOError, OSError):  # full: a wake-up is already pending; closed: stopping
            pass

    def _run(self) -> None:
        poller = select.poll()
        wakeup_fd = self._wakeup_read.fileno()
        poller.register(wakeup_fd, select.POLLIN)
        # fd -> the outbox waiting on it. A closed socket's number can be reused by a new
        # one: the newer registration replaces the older, whose connection is gone.
        watched: dict[int, Outbox] = {}
        while True:
            events = poller.poll(FLUSHER_SWEEP_INTERVAL * 1000)
            ready = [fd for fd, _ in events if fd != wakeup_fd]
            if len(ready) < len(events):
                # Before taking _incoming: a watch() after the take must leave its byte unread.
                self._drain_wakeups()
            with self._incoming_lock:
                if self._stopping:
                    return
                incoming, self._incoming = self._incoming, []
            for outbox in incoming:
                fd = outbox.fileno()
                if fd >= 0:
                    watched[fd] = outbox
                    poller.register(fd, select.POLLOUT)
            if not events:  # a quiet second: look at everything, in case a socket was missed
                ready = list(watched)
            for fd in ready:
                ready_outbox = watched.get(fd)
                if ready_outbox is not None and self._flush(ready_outbox):
                    del watched[fd]
                    poller.unregister(fd)

    @staticmethod
    def _flush(outbox: Outbox) -> bool:
        """``outbox.flush()``; an unexpected error costs that connection, never this thread."""
        try:
            return outbox.flush()
        except Exception:
            log.exception("flushing a connection failed")
            outbox.on_error("internal error while sending")
            return True

    def _drain_wakeups(self) -> None:
        try:
            while self._wakeup_read.recv(4096):
                pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
