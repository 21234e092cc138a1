"""The server's configuration: every option an operator can tune, with its one default."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from securechat import crypto_utils
from securechat.accounts import (
    DEFAULT_TOKEN_TTL,
    LoginThrottle,
)
from securechat.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_FRAME_SIZE,
    encode_control,
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
WRONG_CREDENTIALS = "wrong user name or password"
#: Most queued messages a send worker seals for one connection, and writes with one
#: system call, before it turns to the next connection.
SEND_BATCH_SIZE = 64
PING_FRAME = encode_control("ping")
PONG_FRAME = encode_control("pong")
#: Seconds a closing connection may take to flush its last messages before it is cut off.
FINISH_GRACE = 5.0
#: Addresses whose connection rate is remembered before idle ones are forgotten.
MAX_TRACKED_ADDRESSES = 10_000


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


@dataclass
class ServerConfig:
    """Everything an operator can tune. Defaults are what ``python server.py`` uses."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    users_path: Path = DEFAULT_USERS
    data_dir: Path = DEFAULT_DATA_DIR
    key_size: int = crypto_utils.DEFAULT_KEY_SIZE
    allow_demo_accounts: bool = False
    #: Seconds a new connection has to say hello and send its login.
    handshake_timeout: float = 10.0
    max_clients: int = 1000
    max_connections_per_address: int = 20
    #: New connections one address may open: a burst, then this many per second (0: no limit).
    #: Each costs the server an RSA signature before the peer proves anything.
    connect_burst: int = 30
    connect_rate: float = 5.0
    #: Messages waiting for one slow recipient before it is dropped ("SendQ exceeded").
    send_queue_size: int = 512
    #: Flood control: a burst of this many lines, then this many lines per second.
    flood_burst: int = 20
    flood_rate: float = 2.0
    #: Keepalive: ping a connection silent this long; drop it after ping_timeout.
    ping_interval: float = 20.0
    ping_timeout: float = 50.0
    token_ttl: int = DEFAULT_TOKEN_TTL
    #: Password hashes run at once (each takes 19 MiB and a few tens of ms).
    hash_workers: int = 2
    #: How long a login waits for a free hashing slot before "server busy".
    hash_wait: float = 30.0
    #: Threads that seal and send for every client (see default_send_workers).
    send_workers: int = field(default_factory=default_send_workers)
    max_frame_size: int = MAX_FRAME_SIZE
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"
