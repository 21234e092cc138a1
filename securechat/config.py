"""The server's configuration: every option an operator can tune, with its one default."""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import logging
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable
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
    normalize_room,
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
#: Seals what the Redis backend stores; every node sharing a Redis needs the same one.
CLUSTER_KEY_FILE = "cluster_key"
#: Says that this directory's users.json was handed to Redis (or found there): it is never copied in again.
ACCOUNTS_IN_REDIS_FILE = "accounts_in_redis"


def make_default_users_folder(users: Path) -> None:
    """Installed, the default store's folder (0700) is made by whichever comes first: the server's start
    or the first account command. Any other store's folder is the operator's to make."""
    if Path(users).absolute() == DEFAULT_USERS.absolute():
        DEFAULT_USERS.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def default_send_workers() -> int:
    """One sealing thread per core but one, and at most two.

    Sealing is mostly Python under the GIL (the RSA wrap, which releases it, comes once per
    connection per 5 s). Even when every frame had a wrap of its own, two sealing threads on
    2 cores spent 9 to 37 % more CPU per delivery than one in alternating runs, with 0.75 to
    1.02 context switches per delivery instead of 0.04 to 0.18 (``git log -p BENCHMARKS.md``).
    The core left over reads what clients send, hashes passwords and runs the kernel's TCP work.
    """
    try:
        usable = len(os.sched_getaffinity(0))  # what this process may run on (containers, taskset)
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, min(2, usable - 1))


#: The highest TCP port number.
MAX_PORT = 65535

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def option(
    default: Any,
    help: str,
    *,
    flag: str = "",
    dest: str = "",
    metavar: str | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    check: Callable[[Any], object] | None = None,
    number_as_text: bool = False,
    **extra: Any,
) -> Any:
    """A configuration field that is also a command-line option (its one default lives here).

    ``flag`` overrides the option's name (by default ``--field-name``); ``extra`` goes to
    ``argparse`` (``choices``, for example). A ``default`` that is a callable is a factory.
    ``at_least``, ``above`` and ``at_most`` bound a number; ``check`` raises ``ValueError``
    saying what is wrong with a value. ``option_problem`` applies them all, to values from
    the command line and from a configuration file alike. ``number_as_text``: a text option a file
    may give as a number, as the command line does (``workers = 2``, or ``"auto"``).
    """
    metadata = {
        "help": help,
        "flag": flag,
        "dest": dest,
        "metavar": metavar,
        "extra": extra,
        "at_least": at_least,
        "above": above,
        "at_most": at_most,
        "check": check,
        "number_as_text": number_as_text,
    }
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_backend(backend: str) -> None:
    """``memory`` (this process alone), or a Redis URL shared by several server processes.

    Raises ``ValueError`` saying what is wrong, in words that never repeat the URL (it may hold
    a password). The Redis client reads a DB it cannot parse as 0, and a bad port only when it
    first connects, with a traceback: both are refused here instead.
    """
    if backend == "memory":
        return
    if not backend.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be memory, or a Redis URL: redis://HOST:PORT/DB, rediss://… (TLS) or unix://PATH")
    before_host = backend.partition("://")[2].rpartition("@")[0]
    if any(delimiter in before_host for delimiter in "/?#"):
        raise ValueError(
            "the password holds / ? or #, which end a URL's address: percent-encode them "
            "(%2F, %3F, %23), or give the password in CHAT_REDIS_PASSWORD instead"
        )
    parts = urllib.parse.urlsplit(backend)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path: unix:///run/redis/redis.sock")
    else:
        if not parts.hostname:
            raise ValueError("the URL names no host: redis://HOST:PORT/DB")
        try:
            port = parts.port
        except ValueError:  # not a number, or past 65535
            raise ValueError(f"the port must be a number from 1 to {MAX_PORT}") from None
        if port == 0:
            raise ValueError(f"the port must be a number from 1 to {MAX_PORT}")
        database = urllib.parse.unquote(parts.path).strip("/")  # as the Redis client reads it
        if database and not _is_count(database):
            raise ValueError("the DB (after the last /) must be a number, 0 or more: redis://HOST:PORT/0")
    for database in urllib.parse.parse_qs(parts.query).get("db", []):
        if not _is_count(database):
            raise ValueError("db= must be a number, 0 or more")
    if parts.query:
        _check_url_options(backend)


def _check_url_options(backend: str) -> None:
    """Refuse options after ``?`` that the Redis client does not know or cannot read (it raised them as a
    traceback when it first connected). The client reads them as it would connect, but connects nowhere."""
    import redis  # only a Redis deployment needs it

    try:
        redis.ConnectionPool.from_url(backend).make_connection()
    except TypeError as exc:  # "...__init__() got an unexpected keyword argument 'foo'"
        unknown = re.search(r"argument '(\w+)'", str(exc))
        raise ValueError(
            f"the URL's option {unknown.group(1) if unknown else ''} (after ?) is not one Redis knows"
        ) from None
    except ValueError as exc:  # "Invalid value for 'socket_timeout' in connection URL."
        named = re.search(r"'(\w+)'", str(exc))
        raise ValueError(
            f"the URL's option {named.group(1) if named else ''} (after ?) has a value it cannot take"
        ) from None


def _is_count(text: str) -> bool:
    """Whether ``text`` is a whole number, 0 or more, in ASCII digits (``"²".isdigit()`` is true)."""
    return text.isascii() and text.isdigit()


def hide_password(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``, and ``?password=secret`` ->
    ``?password=***`` (the Redis client takes a password from either): a URL fit for logs and output."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    scheme, _, rest = url.partition("://")
    credentials, at, place = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{place}"


def check_workers(text: str) -> None:
    """``auto`` (one per core) or a number of server processes from 1 to 64."""
    if text != "auto" and (not text.isdigit() or not 1 <= int(text) <= 64):
        raise ValueError("must be auto (one per core) or a number from 1 to 64")


def check_host(host: str) -> None:
    """Refuse an empty host, which would listen on every interface without saying so."""
    if not host:
        raise ValueError("must not be empty (0.0.0.0 listens on every interface)")


@dataclass
class ServerConfig:
    """Everything an operator can tune. Defaults are what ``python server.py`` uses.

    Every field made with ``option()`` is also a command-line option (``add_options``)
    and a key of the configuration file (``read_config_file``).
    """

    host: str = option(DEFAULT_HOST, "address to listen on (0.0.0.0 for every interface)", check=check_host)
    # Bounded here: bind() would raise OverflowError past 65535, not an OSError that start-up explains.
    port: int = option(DEFAULT_PORT, "port to listen on; 0 picks a free one", at_least=0, at_most=MAX_PORT)
    users_path: Path = option(DEFAULT_USERS, "the user store", flag="--users", dest="users", metavar="FILE")
    data_dir: Path = option(
        DEFAULT_DATA_DIR,
        "server key, token secret, revoked sessions, history (created 0700/0600 on first run)",
        metavar="DIR",
    )
    key_size: int = option(
        crypto_utils.DEFAULT_KEY_SIZE, "RSA size of a new server key", choices=crypto_utils.ALLOWED_KEY_SIZES
    )
    log_level: str = option("INFO", "how much the server logs", choices=LOG_LEVELS)
    allow_demo_accounts: bool = option(False, "let demo accounts log in even on a non-loopback address")
    handshake_timeout: float = option(
        10.0, "seconds a new connection has to say hello and log in", metavar="SECONDS", above=0
    )
    max_clients: int = option(1000, "connections held at once", at_least=1)
    max_connections_per_address: int = option(20, "connections from one address", flag="--max-per-address", at_least=1)
    max_startups: int = option(
        100,
        "connections still logging in held at once (at most half of --max-clients); past it the oldest goes",
        at_least=1,
    )
    #: New connections one address may open: a burst, then this many per second (0: no limit).
    #: Each costs the server an RSA signature before the peer proves anything.
    connect_burst: int = 30
    connect_rate: float = option(
        5.0,
        "new connections per second from one address, after a burst of 30; 0: no limit",
        metavar="PER_S",
        at_least=0,
    )
    send_queue_size: int = option(
        512,
        "messages queued for a slow client before it is dropped",
        flag="--send-queue",
        metavar="MESSAGES",
        at_least=1,
    )
    flood_burst: int = option(20, "lines one account may send at once", metavar="LINES", at_least=1)
    flood_rate: float = option(
        2.0, "sustained lines per second per account; 0: no limit", metavar="LINES_PER_S", at_least=0
    )
    ping_interval: float = option(20.0, "ping a connection silent this long", metavar="SECONDS", above=0)
    ping_timeout: float = option(50.0, "drop a connection silent this long", metavar="SECONDS", above=0)
    token_ttl: int = option(
        DEFAULT_TOKEN_TTL, "session token lifetime (refreshed while in use)", metavar="SECONDS", at_least=1
    )
    hash_workers: int = option(2, "password hashes run at once (each takes 19 MiB)", at_least=1)
    #: How long a login waits for a free hashing slot before "server busy".
    hash_wait: float = 30.0
    send_workers: int = option(
        default_send_workers, "threads that seal and send for every client: CPUs - 1, at most 2", at_least=1
    )
    default_room: str = option(
        DEFAULT_ROOM, "the room everyone lands in at login", metavar="#ROOM", check=normalize_room
    )
    max_rooms: int = option(1000, "rooms the server holds", at_least=1)
    max_rooms_per_account: int = option(
        50, "rooms one account may join, and may make (admins: any number)", flag="--max-rooms-per-user", at_least=1
    )
    max_sessions: int = option(5, "sessions (devices) one account may have at once", at_least=1)
    backend: str = option(
        "memory",
        "where rooms live: memory (this process), or redis://[USER:PASSWORD@]HOST:PORT/DB to share them",
        metavar="URL",
        check=check_backend,
    )
    workers: str = option(
        "1",
        "server processes on this port, sharing rooms through --backend redis://… (auto: one per core)",
        metavar="N",
        check=check_workers,
        number_as_text=True,
    )
    #: Set in a worker of --workers: listen with SO_REUSEPORT beside the others.
    reuse_port: bool = False
    history_limit: int = option(
        1000, "lines kept per room and per private conversation; 0 turns history off", at_least=0
    )
    history_days: float = option(30.0, "days a line is kept", metavar="DAYS", above=0)
    join_history: int = option(50, "recent lines shown to whoever joins a room", metavar="LINES", at_least=0)
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


def option_key(spec: Field[Any]) -> str:
    """The option's key in a configuration file: its long option without the dashes (``max-clients``)."""
    return option_flag(spec).removeprefix("--")


def option_dest(spec: Field[Any]) -> str:
    return spec.metadata["dest"] or spec.name


def option_default(spec: Field[Any]) -> Any:
    return spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[operator]


def option_type(spec: Field[Any]) -> type:
    """The type of the option's values: ``bool``, ``int``, ``float``, ``str`` or ``Path``."""
    kind = type(option_default(spec))
    return Path if issubclass(kind, Path) else kind


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per configuration field made with ``option()``, with its default and help."""
    for spec in option_fields():
        kind = option_type(spec)
        if kind is bool:
            # --no-... as well, so that the command line can turn off what a configuration file turned on.
            parser.add_argument(
                option_flag(spec),
                dest=option_dest(spec),
                action=argparse.BooleanOptionalAction,
                default=option_default(spec),
                help=spec.metadata["help"],
            )
            continue
        shown = "%(default)s"
        parser.add_argument(
            option_flag(spec),
            dest=option_dest(spec),
            type=kind,
            default=option_default(spec),
            metavar=spec.metadata["metavar"] or ("N" if kind in (int, float) else None),
            help=f"{spec.metadata['help']} (default: {shown})",
            **spec.metadata["extra"],
        )


def option_problem(spec: Field[Any], value: Any) -> str | None:
    """What is wrong with ``value`` for this option, in a few words; ``None`` if it will do.

    The one check of an option's value, whether it came from the command line or a file.
    """
    meta = spec.metadata
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    choices = meta["extra"].get("choices")
    if choices is not None and value not in choices:
        return "must be one of " + ", ".join(str(choice) for choice in choices)
    at_least, above, at_most = meta["at_least"], meta["above"], meta["at_most"]
    if at_least is not None and at_most is not None and not at_least <= value <= at_most:
        return f"must be from {at_least} to {at_most}"
    if at_least is not None and value < at_least:
        return f"must be at least {at_least}"
    if above is not None and value <= above:
        return f"must be more than {above}"
    if meta["check"] is not None:
        try:
            meta["check"](value)
        except ValueError as exc:
            return str(exc)
    return None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The configuration the parsed options describe."""
    return ServerConfig(**{spec.name: getattr(args, option_dest(spec)) for spec in option_fields()})


# --------------------------------------------------------------------------- the configuration file


class ConfigFileError(Exception):
    """A configuration file that cannot be used. The message is one line naming the file (and the key)."""


#: How a file's value of each option type is described in an error ("expected a whole number").
EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", Path: "a path (a string)"}


def toml_type_name(value: object) -> str:
    """The TOML name of a value parsed by ``tomllib``: an integer, a string, a table..."""
    names: tuple[tuple[type, str], ...] = (
        (bool, "a boolean"),  # before int: a bool is an int to isinstance
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    )
    return next((name for kind, name in names if isinstance(value, kind)), "a date or time")


def takes(kind: type, value: object) -> bool:
    """Whether an option of type ``kind`` takes this TOML value (an integer will do for a float)."""
    if isinstance(value, bool):  # a bool is an int to isinstance
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, str if kind is Path else kind)


def read_config_file(path: Path) -> dict[str, Any]:
    """The options a TOML file sets, as ``{argparse destination: value}`` (for ``set_defaults``).

    Each key is an option's long name without its dashes (``max-clients = 60`` sets
    ``--max-clients``); a relative path is taken from the file's folder. Each value
    is checked as the same option on the command line is (``option_problem``).
    Raises ``ConfigFileError`` for a file that cannot be read or parsed, an unknown key,
    a value of the wrong type or out of range.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    specs = {option_key(spec): spec for spec in option_fields()}
    folder = Path(path).absolute().parent
    values: dict[str, Any] = {}
    for key, value in document.items():
        spec = specs.get(key)
        if spec is None:
            guess = difflib.get_close_matches(key.replace("_", "-"), specs, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise ConfigFileError(f"{path}: unknown key {key!r}{hint}")
        kind = option_type(spec)
        shown = f"{key} = {toml_value(value)}" if isinstance(value, bool | int | float | str) else key
        if spec.metadata["number_as_text"] and type(value) is int:
            value = str(value)
        if not takes(kind, value):
            raise ConfigFileError(f"{path}: {shown}: expected {EXPECTED[kind]}, not {toml_type_name(value)}")
        if kind is float:
            value = float(value)
        elif kind is Path:
            # An absolute value stays as it is. Resolved as the system would ("link/.." is the link's
            # target's parent), so --print-config shows no "dir/..".
            value = (folder / value).resolve()
        if problem := option_problem(spec, value):
            raise ConfigFileError(f"{path}: {shown}: {problem}")
        values[option_dest(spec)] = value
    return values


def toml_value(value: bool | int | float | str | Path) -> str:
    """``value`` written as TOML (a basic string for text and paths)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # a finite float's repr is a TOML float; inf and nan are refused as options
    escaped = []
    for char in str(value):
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def config_to_toml(config: ServerConfig) -> str:
    """The configuration as a TOML document that ``read_config_file`` reads back to the same options.

    Every option, one ``key = value`` line under its help; paths are absolute, so the
    document means the same wherever it is saved. The one secret an option may hold, a
    password in the ``backend`` URL, is printed as ``***`` (that line no longer reads back).
    """
    lines = []
    for spec in option_fields():
        value = getattr(config, spec.name)
        if option_type(spec) is Path:
            value = Path(value).absolute()
        if spec.name == "backend":
            value = hide_password(value)
        lines += [f"# {spec.metadata['help']}", f"{option_key(spec)} = {toml_value(value)}"]
    return "\n".join(lines) + "\n"
