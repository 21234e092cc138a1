"""The admin command line: account management (adduser, deluser, passwd, users) and the server's options."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securechat import crypto_utils
from securechat.accounts import (
    UserStore,
    UserStoreError,
)
from securechat.config import DEFAULT_DATA_DIR, DEFAULT_USERS, ServerConfig, default_send_workers
from securechat.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    validate_username,
)

log = logging.getLogger("chat.server")


# --------------------------------------------------------------------------- command line


def read_new_password(name: str) -> str:
    """Read a password: twice, hidden, on a terminal; one line of stdin otherwise."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"New password for {name}: ")
        second = getpass.getpass("Repeat it: ")
        if first != second:
            raise ValueError("the passwords do not match")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValueError("the password is empty")
    return password


def add_common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Callable[[Any], Any] = (lambda _: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument(
        "--users",
        type=Path,
        default=default(DEFAULT_USERS),
        metavar="FILE",
        help="the user store (default: users.json beside server.py)",
    )
    parser.add_argument(
        "--log-level",
        default=default("INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: INFO",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Secure terminal group chat server.",
        epilog="Accounts: server.py adduser NAME | deluser NAME | passwd NAME | users",
    )
    add_common_options(parser, suppress=False)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}; 0 picks a free port")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help="where the server key and token secret live (default: server-data/ beside server.py)",
    )
    parser.add_argument(
        "--key-size",
        type=int,
        default=crypto_utils.DEFAULT_KEY_SIZE,
        choices=crypto_utils.ALLOWED_KEY_SIZES,
        help="RSA size of a new server key (default: 2048)",
    )
    parser.add_argument(
        "--allow-demo-accounts",
        action="store_true",
        help="let demo accounts log in even on a non-loopback address",
    )
    parser.add_argument("--max-clients", type=int, default=ServerConfig.max_clients)
    parser.add_argument(
        "--max-per-address",
        type=int,
        default=ServerConfig.max_connections_per_address,
        help="connections allowed from one address",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=ServerConfig.connect_rate,
        metavar="PER_S",
        help="new connections per second from one address, after a burst of 30; 0 disables (default: 5)",
    )
    parser.add_argument("--handshake-timeout", type=float, default=ServerConfig.handshake_timeout, metavar="SECONDS")
    parser.add_argument(
        "--flood-burst",
        type=int,
        default=ServerConfig.flood_burst,
        metavar="LINES",
        help="lines one user may send at once (default: 20)",
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=ServerConfig.flood_rate,
        metavar="LINES_PER_S",
        help="sustained lines per second per user; 0 disables (default: 2)",
    )
    parser.add_argument(
        "--send-queue",
        type=int,
        default=ServerConfig.send_queue_size,
        metavar="MESSAGES",
        help="messages queued for a slow client before it is dropped (default: 512)",
    )
    parser.add_argument("--ping-interval", type=float, default=ServerConfig.ping_interval, metavar="SECONDS")
    parser.add_argument("--ping-timeout", type=float, default=ServerConfig.ping_timeout, metavar="SECONDS")
    parser.add_argument("--token-ttl", type=int, default=ServerConfig.token_ttl, metavar="SECONDS")
    parser.add_argument("--hash-workers", type=int, default=ServerConfig.hash_workers)
    parser.add_argument(
        "--send-workers",
        type=int,
        default=default_send_workers(),
        help="threads that seal and send for all clients (default: CPUs - 1, at most 2: %(default)s here)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, help_text in (
        ("adduser", "create an account (password read hidden, or one line of stdin)"),
        ("deluser", "delete an account"),
        ("passwd", "change an account's password"),
        ("users", "list the accounts"),
    ):
        sub = commands.add_parser(command, help=help_text)
        add_common_options(sub, suppress=True)
        if command != "users":
            sub.add_argument("name")
    return parser


def run_admin_command(args: argparse.Namespace) -> int:
    store = UserStore(args.users)
    try:
        if args.command == "users":
            for record in store.load().values():
                print(f"{record.name}{'  (demo)' if record.demo else ''}")
            return 0
        name = args.name
        if args.command == "adduser":
            validate_username(name)
            if store.get(name) is not None:
                raise ValueError(f"user {name!r} already exists")
            store.add(name, read_new_password(name))
            print(f"added {name}")
        elif args.command == "deluser":
            store.delete(name)
            print(f"deleted {name}")
        elif args.command == "passwd":
            if store.get(name) is None:
                raise KeyError(name)
            store.set_password(name, read_new_password(name))
            print(f"password changed for {name}")
    except KeyError as exc:
        print(f"error: no user {exc.args[0]!r} in {args.users}", file=sys.stderr)
        return 1
    except (ValueError, UserStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\ncancelled", file=sys.stderr)
        return 130
    return 0


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        users_path=args.users,
        data_dir=args.data_dir,
        key_size=args.key_size,
        allow_demo_accounts=args.allow_demo_accounts,
        handshake_timeout=args.handshake_timeout,
        max_clients=args.max_clients,
        max_connections_per_address=args.max_per_address,
        connect_rate=args.connect_rate,
        send_queue_size=args.send_queue,
        flood_burst=args.flood_burst,
        flood_rate=args.flood_rate,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        token_ttl=args.token_ttl,
        hash_workers=args.hash_workers,
        send_workers=args.send_workers,
    )
