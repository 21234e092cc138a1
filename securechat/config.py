"""The server's configuration: every option an operator can tune, with its one default."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from securechat import crypto_utils
from securechat.accounts import (
    DEFAULT_TOKEN_TTL,
    LoginThrottle,
)
from securechat.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_ROOM,
    MAX_FRAME_SIZE,
)

log = logging.getLogger("chat.server")


def default_home() -> Path:
    """Where the user store and the data directory live unless an option says otherwise.

    In a checkout, beside ``server.py`` (so ``python server.py`` finds the demo accounts);
    once installed (``chat-server``), ``$XDG_DATA_HOME/securechat`` (``~/.local/share/securechat``).
    """
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "server.py").is_file() and (checkout / "securechat").is_dir():
        return checkout
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "securechat"


HOME = default_home()
DEFAULT_USERS = HOME / "users.json"
DEFAULT_DATA_DIR = HOME / "server-data"
SERVER_KEY_FILE = "server_key.pem"
TOKEN_SECRET_FILE = "token_secret"
REVOKED_SESSIONS_FILE = "revoked_sessions"
HISTORY_FILE = "history.sqlite3"
#: The message of the day, shown at every login: edit it, or set it with /motd TEXT as an admin.
MOTD_FILE = "motd.txt"
HISTORY_KEY_FILE = "history_key"


def default_send_workers() -> int:
    """One sealing thread per core but one, and at most two.

    RSA releases the GIL, but every wrap takes it back: on 2 cores, in alternating
    runs, two sealing threads spent 9 to 37 % more CPU per delivery than one, with
    0.75 to 1.02 context switches per delivery instead of 0.04 to 0.18
    (BENCHMARKS.md). The core left over reads what clients send, hashes
    passwords and runs the kernel's TCP work.
    """
    try:
        usable = len(os.sched_getaffinity(0))  # what this process may run on (containers, taskset)
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, min(2, usable - 1))


def option(default: Any, help: str, *, flag: str = "", dest: str = "", metavar: str | None = None, **extra: Any) -> Any:
    """A configuration field that is also a command-line option (its one default lives here).

    ``flag`` overrides the option's name (by default ``--field-name``); ``extra`` goes to
    ``argparse`` (``choices``, for example). A ``default`` that is a callable is a factory.
    """
    metadata = {"help": help, "flag": flag, "dest": dest, "metavar": metavar, "extra": extra}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ServerConfig:
    """Everything an operator can tune. Defaults are what ``python server.py`` uses.

    Every field made with ``option()`` is also a command-line option (``add_options``).
    """

    host: str = option(DEFAULT_HOST, "address to listen on (0.0.0.0 for every interface)")
    port: int = option(DEFAULT_PORT, "port to listen on; 0 picks a free one")
    users_path: Path = option(DEFAULT_USERS, "the user store", flag="--users", dest="users", metavar="FILE")
    data_dir: Path = option(
        DEFAULT_DATA_DIR,
        "server key, token secret, revoked sessions, history (created 0700/0600 on first run)",
        metavar="DIR",
    )
    key_size: int = option(
        crypto_utils.DEFAULT_KEY_SIZE, "RSA size of a new server key", choices=crypto_utils.ALLOWED_KEY_SIZES
    )
    allow_demo_accounts: bool = option(False, "let demo accounts log in even on a non-loopback address")
    handshake_timeout: float = option(10.0, "seconds a new connection has to say hello and log in", metavar="SECONDS")
    max_clients: int = option(1000, "connections held at once")
    max_connections_per_address: int = option(20, "connections from one address", flag="--max-per-address")
    max_startups: int = option(
        100, "connections still logging in held at once (at most half of --max-clients); past it the oldest goes"
    )
    #: New connections one address may open: a burst, then this many per second (0: no limit).
    #: Each costs the server an RSA signature before the peer proves anything.
    connect_burst: int = 30
    connect_rate: float = option(
        5.0, "new connections per second from one address, after a burst of 30; 0: no limit", metavar="PER_S"
    )
    send_queue_size: int = option(
        512, "messages queued for a slow client before it is dropped", flag="--send-queue", metavar="MESSAGES"
    )
    flood_burst: int = option(20, "lines one account may send at once", metavar="LINES")
    flood_rate: float = option(2.0, "sustained lines per second per account; 0: no limit", metavar="LINES_PER_S")
    ping_interval: float = option(20.0, "ping a connection silent this long", metavar="SECONDS")
    ping_timeout: float = option(50.0, "drop a connection silent this long", metavar="SECONDS")
    token_ttl: int = option(DEFAULT_TOKEN_TTL, "session token lifetime (refreshed while in use)", metavar="SECONDS")
    hash_workers: int = option(2, "password hashes run at once (each takes 19 MiB)")
    #: How long a login waits for a free hashing slot before "server busy".
    hash_wait: float = 30.0
    send_workers: int = option(default_send_workers, "threads that seal and send for every client: CPUs - 1, at most 2")
    default_room: str = option(DEFAULT_ROOM, "the room everyone lands in at login", metavar="#ROOM")
    max_rooms: int = option(1000, "rooms the server holds")
    max_rooms_per_account: int = option(50, "rooms one account may join", flag="--max-rooms-per-user")
    max_sessions: int = option(5, "sessions (devices) one account may have at once")
    history_limit: int = option(1000, "lines kept per room and per private conversation; 0 turns history off")
    history_days: float = option(30.0, "days a line is kept", metavar="DAYS")
    join_history: int = option(50, "recent lines shown to whoever joins a room", metavar="LINES")
    max_frame_size: int = MAX_FRAME_SIZE
    #: Failed logins per (account, address) and per address: a few free, then doubling delays.
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    #: Failed logins per account from anywhere: a much gentler ceiling, so that guesses from
    #: elsewhere cannot lock the real user out (OWASP: lockout as denial of service).
    account_throttle: LoginThrottle = field(default_factory=lambda: LoginThrottle(free_failures=100, max_delay=10.0))

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def option_fields() -> list[Field[Any]]:
    """The configuration fields that are command-line options, in order."""
    return [spec for spec in fields(ServerConfig) if "help" in spec.metadata]


def option_flag(spec: Field[Any]) -> str:
    return spec.metadata["flag"] or "--" + spec.name.replace("_", "-")


def option_dest(spec: Field[Any]) -> str:
    return spec.metadata["dest"] or spec.name


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per configuration field made with ``option()``, with its default and help."""
    for spec in option_fields():
        default = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[operator]
        kind = type(default)
        if kind is bool:
            parser.add_argument(
                option_flag(spec), dest=option_dest(spec), action="store_true", help=spec.metadata["help"]
            )
            continue
        shown = "%(default)s"
        parser.add_argument(
            option_flag(spec),
            dest=option_dest(spec),
            type=kind,
            default=default,
            metavar=spec.metadata["metavar"] or ("N" if kind in (int, float) else None),
            help=f"{spec.metadata['help']} (default: {shown})",
            **spec.metadata["extra"],
        )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The configuration the parsed options describe."""
    return ServerConfig(**{spec.name: getattr(args, option_dest(spec)) for spec in option_fields()})
