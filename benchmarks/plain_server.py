"""The plaintext baseline: a minimal thread-per-client broadcast server, with no cryptography.

It has the shape of ``server.py`` where shape costs CPU: a reader thread and a
writer thread per connection, a bounded queue between them, and the same
framing (a 4-byte big-endian length, then the payload). Every frame a client
sends is forwarded byte for byte to every other client; nothing is parsed,
sealed or logged. What this costs per delivery is the floor of "Python threads
and sockets" that the benchmark sets beside the cryptographic floor.

    python benchmarks/plain_server.py --port 0     # prints "Listening on HOST:PORT"

A client is told it has joined by one frame holding the single byte 0x01.
SIGTERM or SIGINT closes every connection, joins every thread and exits.
Standard library only.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import struct
import sys
import threading
from collections import deque

FRAME_HEADER = struct.Struct("!I")
MAX_FRAME_SIZE = 64 * 1024
#: Frames waiting for one slow recipient before it is dropped.
SEND_QUEUE_SIZE = 100_000
WELCOME_FRAME = FRAME_HEADER.pack(1) + b"\x01"
#: How long shutdown waits for each connection's threads.
JOIN_TIMEOUT = 2.0


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes; raises ``EOFError`` at the end of the stream."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise EOFError("connection closed")
        received += count
    return bytes(buffer)


class Connection:
    """One client: its socket, its queue of frames to send, its reader and writer threads."""

    def __init__(self, server: PlainServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        # Guards _frames and _closed; the writer waits on it for new frames.
        self._frames_ready = threading.Condition(threading.Lock())
        self._frames: deque[bytes] = deque()
        self._closed = False
        self.reader = threading.Thread(target=self._run_reader, name="plain-read", daemon=True)
        self.writer = threading.Thread(target=self._run_writer, name="plain-write", daemon=True)

    def deliver(self, frame: bytes) -> None:
        """Queue ``frame``; a full queue drops this (too slow) client. Never blocks."""
        with self._frames_ready:
            if self._closed:
                return
            if len(self._frames) < SEND_QUEUE_SIZE:
                self._frames.append(frame)
                self._frames_ready.notify()
                return
        self.close()

    def close(self) -> None:
        """Drop what is queued, wake the writer, and wake the reader. Idempotent."""
        with self._frames_ready:
            self._closed = True
            self._frames.clear()
            self._frames_ready.notify()
        try:
            # shutdown() is what wakes a thread blocked in recv() on Linux.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _run_reader(self) -> None:
        try:
            while True:
                header = recv_exact(self.sock, FRAME_HEADER.size)
                (size,) = FRAME_HEADER.unpack(header)
                if size == 0 or size > MAX_FRAME_SIZE:
                    return
                self.server.broadcast(self, header + recv_exact(self.sock, size))
        except (OSError, EOFError):
            pass
        finally:
            self.server.remove(self)
            self.close()

    def _run_writer(self) -> None:
        while True:
            with self._frames_ready:
                while not self._frames and not self._closed:
                    self._frames_ready.wait()
                if self._closed:
                    return
                frame = self._frames.popleft()
            try:
                self.sock.sendall(frame)
            except OSError:
                self.close()
                return


class PlainServer:
    """Accepts clients and forwards every frame to every other client."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server((host, port), backlog=512)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        # Guards members (who receives a broadcast) and every_connection (who to join at the end).
        self.members_lock = threading.Lock()
        self.members: list[Connection] = []
        self.every_connection: list[Connection] = []
        self.stopping = threading.Event()
        self._wakeup_read, self._wakeup_write = socket.socketpair()

    def broadcast(self, sender: Connection, frame: bytes) -> None:
        with self.members_lock:
            recipients = [member for member in self.members if member is not sender]
        for recipient in recipients:
            recipient.deliver(frame)

    def remove(self, connection: Connection) -> None:
        with self.members_lock:
            if connection in self.members:
                self.members.remove(connection)

    def serve_forever(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(self._wakeup_read, selectors.EVENT_READ)
            while not self.stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self.listener:
                        self._accept()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = Connection(self, sock)
        # Queued before it joins, so the welcome is the first frame it receives.
        connection.deliver(WELCOME_FRAME)
        with self.members_lock:
            self.members.append(connection)
            self.every_connection.append(connection)
        connection.writer.start()
        connection.reader.start()

    def request_shutdown(self) -> None:
        """Make ``serve_forever`` return. Safe from a signal handler."""
        self.stopping.set()
        try:
            self._wakeup_write.send(b"x")
        except OSError:
            pass

    def server_close(self) -> None:
        """Close every connection and join every thread."""
        with self.members_lock:
            connections = list(self.every_connection)
        for connection in connections:
            connection.close()
        for connection in connections:
            connection.writer.join(timeout=JOIN_TIMEOUT)
            connection.reader.join(timeout=JOIN_TIMEOUT)
            connection.sock.close()
        self.listener.close()
        self._wakeup_read.close()
        self._wakeup_write.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plaintext broadcast baseline for the benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = PlainServer(args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: server.request_shutdown())
    signal.signal(signal.SIGINT, lambda *_: server.request_shutdown())
    host, port = server.address
    print(f"Listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
