"""``--workers N``: several server processes on one port, sharing rooms through the backend.

One process holds one core (its RSA work runs under one GIL), and the server's cost is
per recipient: each process encrypts only for the clients connected to it. So the
supervisor here starts N ordinary server processes that each listen on the same port
with ``SO_REUSEPORT`` (the kernel spreads new connections among them) and share rooms
through Redis. It makes the data directory's keys first (so the workers do not race to
create them), restarts a worker that dies, and stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import securechat
from securechat import crypto_utils
from securechat.config import (
    CLUSTER_KEY_FILE,
    SERVER_KEY_FILE,
    TOKEN_SECRET_FILE,
    ServerConfig,
    hide_password,
)
from securechat.listener import check_private_directory
from securechat.protocol import address_text

log = logging.getLogger("chat.server")

#: Set in a worker's environment: its number (1, 2, ...). A worker listens with SO_REUSEPORT.
WORKER_VARIABLE = "CHAT_WORKER"
#: Set in a worker's environment: its supervisor's process id (a worker ends with its supervisor).
SUPERVISOR_VARIABLE = "CHAT_SUPERVISOR"
#: prctl(2)'s option that has the kernel signal a process when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: How long a worker has to start (load its key, reach Redis, listen).
START_TIMEOUT = 30.0
#: A worker that died is started again after this long (longer if it keeps dying at once).
RESTART_DELAY = 1.0
#: How long the workers have to stop before they are killed (the whole stop stays within 2 s).
STOP_TIMEOUT = 1.8


def worker_count(text: str) -> int:
    """``auto`` (one per core this process may use) or a number of workers."""
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return int(text)


def worker_number() -> int:
    """This process's worker number, or 0 when it is not a worker."""
    value = os.environ.get(WORKER_VARIABLE, "")
    return int(value) if value.isdigit() else 0


def end_with_supervisor() -> None:
    """In a worker: be stopped (SIGTERM) when the supervisor dies, however it dies.

    A supervisor killed with SIGKILL (or by the out-of-memory killer) cannot stop its workers:
    they went on serving the port as orphans, that nobody restarts or stops, and the next
    deployment on that port shared it with them. The kernel tells a process of its parent's
    death where it is asked to (Linux); one whose supervisor died before it asked stops at once.
    """
    supervisor = os.environ.get(SUPERVISOR_VARIABLE, "")
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: not Linux; the supervisor's own stop still reaches it
        log.debug("worker: no prctl, so it cannot follow its supervisor's death")
    if supervisor.isdigit() and os.getppid() != int(supervisor):
        log.error("worker: its supervisor (process %s) is gone; stopping", supervisor)
        raise SystemExit(1)


class Worker:
    """One server process and what the supervisor knows of it."""

    def __init__(self, number: int, command: list[str]) -> None:
        self.number = number
        self.command = command
        self.process: subprocess.Popen[str] | None = None
        self.started_at = 0.0
        self.restart_delay = RESTART_DELAY

    def start(self) -> None:
        env = {**os.environ, WORKER_VARIABLE: str(self.number), SUPERVISOR_VARIABLE: str(os.getpid())}
        package_home = str(Path(securechat.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_home, env.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
        )
        self.started_at = time.monotonic()
        self.listening = threading.Event()
        assert self.process.stdout is not None
        # Ends when the worker does (its output closes).
        threading.Thread(
            target=_watch_output, args=(self.process.stdout, self.listening), name=f"worker {self.number}", daemon=True
        ).start()

    def wait_listening(self, stopping: threading.Event) -> bool:
        """Wait until the worker says it listens; False if it exited, took too long, or we are stopping."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not stopping.is_set():
            if self.listening.wait(0.1):
                return True
            if self.process.poll() is not None:
                return False
        return False


def _watch_output(stream: IO[str], listening: threading.Event) -> None:
    """Read a worker's output: it says when it listens, and it must never block on a full pipe."""
    for line in stream:
        if line.startswith("Listening on"):
            listening.set()


def run_workers(config: ServerConfig, count: int, argv: list[str]) -> int:
    """Start ``count`` workers on one port and supervise them until Ctrl-C or SIGTERM; returns the exit status."""
    data_dir = Path(config.data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_directory(data_dir)
    # Made here, once: N workers starting together must not each make a different key.
    private_key = crypto_utils.load_or_create_private_key(data_dir / SERVER_KEY_FILE, config.key_size)
    crypto_utils.load_or_create_secret(data_dir / TOKEN_SECRET_FILE)
    crypto_utils.load_or_create_secret(data_dir / CLUSTER_KEY_FILE)
    # Holds the port (bound, never listening: the kernel routes no connection to it) while
    # workers come and go; with --port 0 it is also how the workers learn which port.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    _check_port_free(family, config.host, config.port)
    claim = _claim_port(config.port)
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind((config.host, config.port))
    port = reservation.getsockname()[1]
    given = _without_options(argv, ("--workers", "--port"))
    command = [sys.executable, "-m", "securechat.server_cli", *given, "--workers", "1", "--port", str(port)]
    workers = [Worker(number, command) for number in range(1, count + 1)]
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        # The first alone: a start that fails (Redis unreachable, a wrong key) says why once, in its
        # own one line, not once per worker; the others start once it listens.
        for group in (workers[:1], workers[1:]):
            for worker in group:
                worker.start()
            for worker in group:
                if not worker.wait_listening(stopping):
                    if stopping.is_set():
                        return 0  # told to stop while starting
                    if worker.number > 1:  # (the first one's error is the whole story)
                        log.error("worker %d could not start (its error is above)", worker.number)
                    return 1
        fingerprint = crypto_utils.fingerprint(private_key.public_key())
        print(f"Server key fingerprint: {private_key.key_size} {fingerprint} (RSA)")
        print(f"Rooms shared through {hide_password(config.backend)}")
        print(f"Listening on {address_text(config.host, port)} ({count} worker processes)", flush=True)
        while not stopping.wait(0.2):
            for worker in workers:
                _restart_if_dead(worker, stopping)
        return 0
    finally:
        _stop_all(workers)
        reservation.close()
        if claim is not None:
            claim.close()


def _check_port_free(family: socket.AddressFamily, host: str, port: int) -> None:
    """Raise ``OSError`` (EADDRINUSE) if something listens on ``host:port`` already.

    The workers bind with ``SO_REUSEPORT``, which lets any process of the same user share a port: a
    second deployment started on a port another one serves would have shared it with it, the kernel
    handing new clients to either (and to a server key they never pinned). A bind without it fails
    while anything listens there, as the one-process server's does.
    """
    if port == 0:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of an earlier run may linger
        probe.bind((host, port))


def _claim_port(port: int) -> socket.socket | None:
    """Hold a name that says a ``--workers`` supervisor serves ``port`` on this machine; ``OSError``
    (EADDRINUSE) if another one does.

    While another deployment restarts its workers, nothing listens on its port: only its reservation
    is bound, which a probe with SO_REUSEADDR binds beside. The name is an abstract Unix socket
    (Linux): no file to clean up, gone with the process however it ends.
    """
    if port == 0 or not sys.platform.startswith("linux"):
        return None
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0securechat-workers-port-{port}")
    except OSError as exc:
        claim.close()
        raise OSError(exc.errno, os.strerror(exc.errno or 0)) from None
    return claim


def _without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` less the options ``names`` and their values, which the supervisor sets for each worker.

    The last one given wins anyway; this only keeps ``ps`` from showing ``--workers 2 ... --workers 1``.
    """
    kept: list[str] = []
    skip_value = False
    for argument in argv:
        if skip_value:
            skip_value = False
        elif argument in names:
            skip_value = True
        elif not argument.startswith(tuple(f"{name}=" for name in names)):
            kept.append(argument)
    return kept


def _restart_if_dead(worker: Worker, stopping: threading.Event) -> None:
    process = worker.process
    if process is None or process.poll() is None:
        return
    lived = time.monotonic() - worker.started_at
    log.warning("worker %d exited with status %s; starting it again", worker.number, process.returncode)
    # One that dies at once (a bad disk, Redis gone) is restarted ever more slowly, not in a tight loop.
    worker.restart_delay = RESTART_DELAY if lived > 30 else min(30.0, worker.restart_delay * 2)
    if stopping.wait(worker.restart_delay):
        return
    worker.start()
    if not worker.wait_listening(stopping):
        log.error("worker %d could not start again", worker.number)


def _stop_all(workers: list[Worker]) -> None:
    running = [worker.process for worker in workers if worker.process is not None and worker.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in running:
        try:
            process.wait(timeout=max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
