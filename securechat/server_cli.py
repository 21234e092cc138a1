"""``python server.py``: parse the options, start the server, stop it on Ctrl-C or SIGTERM."""

from __future__ import annotations

import gc
import logging
import signal
import sys

from securechat.accounts import (
    UserStoreError,
)
from securechat.admin import build_parser, config_from_args, run_admin_command
from securechat.crypto_utils import CryptoError
from securechat.listener import ChatServer

log = logging.getLogger("chat.server")


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.command:
        return run_admin_command(args)
    config = config_from_args(args)
    try:
        server = ChatServer(config)
    except (CryptoError, UserStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    demo_names = [record.name for record in server.users.load().values() if record.demo]
    if demo_names:
        if config.is_loopback or config.allow_demo_accounts:
            log.warning(
                "demo accounts are enabled (%s): remove them with 'server.py deluser NAME'",
                ", ".join(demo_names),
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
    print(f"Listening on {host}:{port}", flush=True)
    tune_garbage_collector()
    try:
        server.serve_forever()
    finally:
        log.info("shutting down")
        server.server_close()
    return 0
