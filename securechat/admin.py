"""The admin command line: account management (adduser, deluser, passwd, users) and the server's options."""

from __future__ import annotations

import argparse
import getpass
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securechat.accounts import (
    MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
    SERVER_ROLES,
    AccountBan,
    AccountStore,
    UserStore,
    UserStoreError,
    password_problem,
)
from securechat.commands import split_duration
from securechat.config import (
    ACCOUNTS_IN_REDIS_FILE,
    DEFAULT_USERS,
    LOG_LEVELS,
    add_options,
    check_backend,
    hide_password,
    make_default_users_folder,
    read_config_file,
)
from securechat.protocol import (
    validate_username,
)

log = logging.getLogger("chat.server")


# --------------------------------------------------------------------------- command line


def read_new_password(name: str, min_length: int = MIN_PASSWORD_CHARS) -> str:
    """Read a new password for ``name``: twice, hidden, on a terminal; one line of stdin otherwise.

    Raises ``ValueError`` saying why in one line if it breaks the password policy
    (``password_problem``) or the two entries differ. On a terminal the policy is
    checked before asking to repeat it.
    """
    if sys.stdin.isatty():
        password = getpass.getpass(f"New password for {name}: ")
        if problem := password_problem(password, name, min_length=min_length):
            raise ValueError(problem)
        if getpass.getpass("Repeat it: ") != password:
            raise ValueError("the passwords do not match")
        return password
    password = sys.stdin.readline().rstrip("\r\n")
    if problem := password_problem(password, name, min_length=min_length):
        raise ValueError(problem)
    return password


def password_length(text: str) -> int:
    """An argparse type: a minimum password length, from NIST's 8 up to the longest password allowed."""
    try:
        length = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not MIN_PASSWORD_CHARS <= length <= MAX_PASSWORD_CHARS:
        raise argparse.ArgumentTypeError(f"must be from {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS}")
    return length


def add_common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Callable[[Any], Any] = (lambda _: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument(
        "--users",
        type=Path,
        default=default(DEFAULT_USERS),
        metavar="FILE",
        help=f"the user store (default: {DEFAULT_USERS})",
    )
    parser.add_argument("--log-level", default=default("INFO"), choices=LOG_LEVELS, help="default: INFO")
    parser.add_argument(
        "--backend",
        default=default("memory"),
        metavar="URL",
        help="redis://HOST:PORT/DB: the accounts of a Redis deployment, instead of --users",
    )


def program_name() -> str:
    """The server program as the operator runs it: ``server.py`` in a checkout, ``chat-server`` installed."""
    program = Path(sys.argv[0]).name
    return program if program in ("server.py", "chat-server") else "server.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Secure terminal group chat server.",
        epilog=f"Accounts: {program_name()} adduser NAME | deluser NAME | passwd NAME | users | role NAME admin|user"
        " | ban NAME [DURATION] [REASON] | unban NAME",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read the options from this TOML file (see chat.toml); the command line overrides it",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the options in effect, as TOML for --config, and exit"
    )
    add_options(parser)  # every server option, from the configuration's fields
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, help_text in (
        ("adduser", "create an account (password read hidden, or one line of stdin)"),
        ("deluser", "delete an account"),
        ("passwd", "change an account's password"),
        ("users", "list the accounts, with their roles and bans"),
        ("role", "make an account a server admin, or a plain user again"),
        ("ban", "refuse an account's logins (ends its sessions on a running server)"),
        ("unban", "lift an account's server-wide ban"),
        ("import-users", "copy the accounts of a users.json into the Redis store of --backend"),
    ):
        sub = commands.add_parser(command, help=help_text)
        add_common_options(sub, suppress=True)
        if command == "import-users":
            sub.add_argument("file", type=Path, help="the users.json to copy in (left as it is)")
        elif command != "users":
            sub.add_argument("name")
        if command == "role":
            sub.add_argument("role", choices=SERVER_ROLES)
        if command == "ban":
            sub.add_argument("reason", nargs="*", help="a duration first (10m, 2h, 7d; none: until lifted), then why")
        if command in ("adduser", "passwd"):
            sub.add_argument(
                "--min-password-length",
                type=password_length,
                default=MIN_PASSWORD_CHARS,
                metavar="CHARS",
                help=f"refuse shorter new passwords (default and least: {MIN_PASSWORD_CHARS})",
            )
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line over the options of the ``--config`` file, if it names one.

    The file's values become the parser's defaults and the command line is parsed again,
    so what the command line says wins, and the defaults fill what neither says. Exits
    as ``argparse`` does on a bad command line; raises ``ConfigFileError`` for a bad file.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_config and args.command:
        parser.error(f"--print-config prints the server's options; it takes no command ({args.command})")
    if args.config is None:
        return args
    parser.set_defaults(**read_config_file(args.config))
    return parser.parse_args(argv)


def open_account_store(backend: str, users: Path) -> AccountStore:
    """The accounts: ``users.json``, or the Redis store all nodes of a Redis deployment share."""
    if backend == "memory":
        return UserStore(users)
    from securechat.redis_accounts import RedisUserStore  # only a shared deployment needs redis

    return RedisUserStore(backend)


#: The exit status for an option that cannot be used (argparse's own, and the server's).
EXIT_BAD_OPTION = 2


def _accounts(count: int) -> str:
    return "1 account" if count == 1 else f"{count} accounts"


def run_admin_command(args: argparse.Namespace) -> int:
    backend = getattr(args, "backend", "memory")
    try:
        check_backend(backend)
    except ValueError as exc:  # the server checks its own options; a command's --backend is checked here
        print(f"error: --backend {shlex.quote(hide_password(backend))}: {exc}", file=sys.stderr)
        return EXIT_BAD_OPTION
    store = open_account_store(backend, args.users)
    try:
        if args.command == "import-users":
            if backend == "memory":
                print("error: import-users copies users.json into Redis: give --backend redis://…", file=sys.stderr)
                return EXIT_BAD_OPTION
            if not args.file.is_file():  # a store that does not exist yet reads as empty: not here
                print(f"error: {args.file}: no such file", file=sys.stderr)
                return 1
            records = UserStore(args.file).load()
            added = [record.name for record in records.values() if store.put(record)]
            kept = len(records) - len(added)
            were = "1 was there already and was kept" if kept == 1 else f"{kept} were there already and were kept"
            print(f"imported {_accounts(len(added))}" + (f"; {were}" if kept else ""))
            return 0
        # A node on Redis leaves a marker in its data directory, where users.json may lie too (systemd's
        # /var/lib/securechat): a change made to that users.json would count nowhere.
        marked = [
            place
            for place in (Path(args.data_dir), Path(args.users).parent)
            if (place / ACCOUNTS_IN_REDIS_FILE).exists()
        ]
        if backend == "memory" and marked:
            said = f"the server of {marked[0]} keeps its accounts in Redis, not in {args.users}"
            if args.command != "users":
                print(f"error: {said}: give --backend redis://… (or --config) to change them there", file=sys.stderr)
                return 1
            print(f"warning: {said}: give --backend redis://… (or --config) to list those", file=sys.stderr)
        if args.command == "users":
            for record in store.load().values():
                notes = [note for note in ("admin" if record.is_admin else "", "demo" if record.demo else "") if note]
                ban = record.active_ban()
                if ban is not None:
                    notes.append(ban.describe())
                print(record.name + (f"  ({'; '.join(notes)})" if notes else ""))
            return 0
        name = args.name
        if args.command == "adduser":
            validate_username(name)
            if backend == "memory":
                make_default_users_folder(Path(args.users))  # the first account may come before any start
            UserStore.check_name_free(name, store.load())  # before asking for a password
            store.add(name, read_new_password(name, args.min_password_length))
            print(f"added {name}")
        elif args.command == "deluser":
            deleted = store.get(name)
            store.delete(name)
            print(f"deleted {name}")
            if deleted is not None and deleted.is_admin and not any(user.is_admin for user in store.load().values()):
                print("note: no admin is left: make one with 'server.py role NAME admin'", file=sys.stderr)
        elif args.command == "passwd":
            if store.get(name) is None:
                raise KeyError(name)
            store.set_password(name, read_new_password(name, args.min_password_length))
            print(f"password changed for {name}")
        elif args.command == "role":
            store.set_role(name, args.role)
            print(f"{name} is now {'an admin' if args.role == 'admin' else 'a plain user'}")
        elif args.command == "ban":
            seconds, reason = split_duration(" ".join(args.reason))
            ban = AccountBan(time.time() + seconds if seconds else 0.0, reason[:200], by="(admin command line)")
            store.ban(name, ban)
            log.info("account banned user=%s by the admin command line", name)
            print(f"{name} is {ban.describe()}")
        elif args.command == "unban":
            print(f"{name} is no longer banned" if store.unban(name) else f"{name} was not banned")
    except KeyError as exc:
        where = args.users if backend == "memory" else f"the accounts in Redis ({hide_password(backend)})"
        print(f"error: no user {exc.args[0]!r} in {where}", file=sys.stderr)
        return 1
    except (ValueError, UserStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\ncancelled", file=sys.stderr)
        return 130
    return 0
