"""``python server.py``: parse the options, start the server, stop it on Ctrl-C or SIGTERM."""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import platform
import shlex
import signal
import socket
import sys
from pathlib import Path

from securechat.accounts import (
    UserStoreError,
)
from securechat.admin import parse_arguments, program_name, run_admin_command
from securechat.backend import BackendMismatch, BackendUnavailable
from securechat.client import IDLE_TIMEOUT
from securechat.config import (
    DEFAULT_USERS,
    ConfigFileError,
    ServerConfig,
    config_from_args,
    config_to_toml,
    hide_password,
    make_default_users_folder,
    option_fields,
    option_flag,
    option_problem,
)
from securechat.crypto_utils import CryptoError, forbid_core_dumps
from securechat.history import StoreError
from securechat.listener import ChatServer
from securechat.protocol import address_text, normalize_room
from securechat.workers import end_with_supervisor, run_workers, worker_count, worker_number

log = logging.getLogger("chat.server")


#: The exit status for a configuration that cannot be used, from the command line or a file
#: (argparse's own for a bad command line; the systemd unit does not restart on it).
EXIT_BAD_CONFIG = 2

#: Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Shorten the pauses of CPython's cycle collector, which stop every thread.

    A line in flight lives long enough (until the last recipient's copy is sealed)
    to be promoted at the default thresholds, and full collections then scan it all:
    one took 44 ms in the middle of a fan-out run. Rarer young collections let most
    of it die young (that full collection took 7.8 ms instead), and freezing what
    exists at start-up (modules, the server's keys) keeps it out of every collection.
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    gc.collect()  # so that no start-up garbage is frozen with the rest
    gc.freeze()


#: glibc's mallopt() parameter for the most malloc arenas (M_ARENA_MAX in malloc.h).
M_ARENA_MAX = -8
#: Malloc arenas the server lets glibc keep, unless MALLOC_ARENA_MAX says otherwise. glibc gives
#: threads that allocate at the same time arenas of their own, up to 8 a core, and an arena
#: seldom gives memory back: with a thread per connection, six rounds of 100 slow clients left
#: the RSS at 175 MiB, against 95 MiB with one arena (125 to 144 with two; BENCHMARKS.md). The GIL
#: lets one thread run Python at a time, so threads seldom wait for the one arena: the fan-out
#: benchmark's CPU a delivery did not rise.
MALLOC_ARENAS = 1


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> str:
    """Have glibc's malloc use at most ``arenas`` arenas, unless ``MALLOC_ARENA_MAX`` is set.

    Call it before threads start: arenas already made stay. Returns what was done, for the log.
    """
    chosen = os.environ.get("MALLOC_ARENA_MAX")
    if chosen is not None:
        return f"malloc arenas: MALLOC_ARENA_MAX={chosen[:20]!r} from the environment"
    if platform.libc_ver()[0] != "glibc":
        return "malloc arenas: left to the C library (not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "malloc arenas: left to the C library (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_ARENA_MAX, arenas) != 1:
        return "malloc arenas: left to the C library (mallopt refused)"
    return f"malloc arenas: at most {arenas} (set MALLOC_ARENA_MAX to choose another limit)"


def describe_start_error(exc: OSError, config: ServerConfig) -> str:
    """Say in one line what an ``OSError`` raised while starting the server means.

    Opening the data directory and binding the socket both raise ``OSError``; a
    file name in the error tells the first, and its errno says what went wrong.
    """
    # socket.create_server appends the address to strerror; the errno alone says it plainly.
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
    if exc.filename is not None:
        path = Path(os.fsdecode(exc.filename))
        data_dir = Path(config.data_dir)
        if path != data_dir and path not in data_dir.parents and data_dir not in path.parents:
            return f"{path}: {reason}"
        if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
            return f"the data directory {data_dir} is not a directory"
        if exc.errno == errno.ENOTDIR:
            return f"cannot create the data directory {data_dir}: part of that path is not a directory"
        if not os.path.isdir(data_dir):
            return f"cannot create the data directory {data_dir}: {reason}"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"cannot read the data directory {data_dir}: {reason}"
        return f"the data directory {data_dir}: {reason} ({path})"
    host, port = config.host, config.port
    if isinstance(exc, socket.gaierror) or (exc.errno is not None and exc.errno < 0):  # getaddrinfo's codes
        return f"bad host address {host!r}: not an IP address or a name this machine can resolve"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: it is not an address of this machine"
    if exc.errno in (errno.EACCES, errno.EPERM):
        hint = " (ports below 1024 need privileges)" if 0 < port < 1024 else ""
        return f"cannot listen on port {port}: {reason}{hint}"
    return f"cannot listen on {address_text(host, port)}: {reason}"


def _account_command(config: ServerConfig, command: str) -> str:
    """The account command that reaches this server's accounts, as the operator would type it: the
    program as it was started, and the store it reads where that is not the default (never the
    backend's password)."""
    program = program_name()
    if config.backend != "memory":
        where = f" --backend {shlex.quote(hide_password(config.backend))}"
    elif Path(config.users_path).absolute() != DEFAULT_USERS.absolute():
        where = f" --users {shlex.quote(str(config.users_path))}"
    else:
        where = ""
    return f"{program} {command} NAME{where}"


def _users_folder_problem(config: ServerConfig) -> str:
    """Why the user store's folder cannot be used ("" if it can). A mistyped ``--users`` folder started an
    empty store, whose suggested ``adduser`` then failed; installed, the default store's folder is made."""
    if config.backend != "memory":
        return ""
    users = Path(config.users_path)
    make_default_users_folder(users)
    if not users.parent.is_dir():
        return f"{users.parent}: no such folder, to keep {users.name} in (--users)"
    return ""


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
    except ConfigFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    forbid_core_dumps()  # before any key, secret or password is read: admin commands too
    worker = worker_number()
    tag = f"worker {worker} " if worker else ""  # which process of --workers said it
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {tag}%(levelname)s %(message)s", stream=sys.stderr)
    if args.command:
        return run_admin_command(args)
    # Before the server's threads start; said once it has started (a start-up error is one line).
    arenas = limit_malloc_arenas()
    config = config_from_args(args)
    # A file's values were checked as it was read: what is left to check came from the command line.
    for spec in option_fields():
        value = getattr(config, spec.name)
        if problem := option_problem(spec, value):
            shown = hide_password(value) if spec.name == "backend" else str(value)
            print(f"error: {option_flag(spec)} {shlex.quote(shown)}: {problem}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    if config.ping_interval >= IDLE_TIMEOUT:  # else every idle client takes the server for gone, and reconnects
        print(
            f"error: --ping-interval {config.ping_interval:g} must be under {IDLE_TIMEOUT:g}: clients take a server"
            f" silent that long for gone",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    if config.ping_timeout <= config.ping_interval:  # else every idle client is dropped before its ping
        print(
            f"error: --ping-timeout {config.ping_timeout:g} must be longer than --ping-interval "
            f"{config.ping_interval:g}: a silent client is pinged after the interval, and dropped at the timeout",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    config.default_room = normalize_room(config.default_room)  # "Lobby" is #lobby: printed as it is used
    workers = 1 if worker else worker_count(config.workers)
    if workers > 1 and config.backend == "memory":  # (before --print-config: what it prints must start)
        print("error: --workers needs rooms the processes share: add --backend redis://HOST:PORT/DB", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.print_config:
        print(config_to_toml(config), end="")
        return 0
    if workers > 1:
        try:
            return run_workers(config, workers, list(sys.argv[1:] if argv is None else argv))
        except (CryptoError, OSError) as exc:  # its data directory, its keys, its port
            message = describe_start_error(exc, config) if isinstance(exc, OSError) else str(exc)
            print(f"error: {message}", file=sys.stderr)
            return 1
    if worker:
        end_with_supervisor()
    config.reuse_port = bool(worker)
    if problem := _users_folder_problem(config):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        server = ChatServer(config)
    except (CryptoError, UserStoreError, StoreError, BackendUnavailable, BackendMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {describe_start_error(exc, config)}", file=sys.stderr)
        return 1
    log.debug("%s", arenas)  # for whoever looks into memory (--log-level DEBUG); noise for everyone else
    try:
        server.users.remove_orphaned_copies()
    except UserStoreError as exc:
        log.warning("%s", exc)
    accounts = server.users.load()
    if not accounts and config.backend == "memory":  # Redis's accounts have their own checks (listener)
        # A mistyped --users path starts an empty store: every login would fail with no word why.
        log.warning(
            "there are no accounts in %s: add one with '%s'", config.users_path, _account_command(config, "adduser")
        )
    demo_names = [record.name for record in accounts.values() if record.demo]
    if demo_names:
        if config.is_loopback or config.allow_demo_accounts:
            log.warning(
                "demo accounts are enabled (%s): remove them with '%s'",
                ", ".join(demo_names),
                _account_command(config, "deluser"),
            )
        else:
            log.warning(
                "demo accounts (%s) are refused on %s; pass --allow-demo-accounts to allow them",
                ", ".join(demo_names),
                config.host,
            )

    def on_signal(signum: int, _frame: object) -> None:
        server.request_shutdown()

    # Before announcing the address: a supervisor may send SIGTERM as soon as it reads it.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    host, port = server.address
    key_bits = server.private_key.key_size
    print(f"Server key fingerprint: {key_bits} {server.fingerprint} (RSA)", flush=True)
    if config.backend != "memory":
        print(f"Rooms shared through {hide_password(config.backend)}", flush=True)
    print(f"Listening on {address_text(host, port)}", flush=True)
    tune_garbage_collector()
    try:
        server.serve_forever()
    finally:
        log.info("shutting down")
        server.server_close()
    return 0


if __name__ == "__main__":  # how --workers starts each worker: python -m securechat.server_cli
    sys.exit(main())
