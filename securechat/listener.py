"""The listening server: accepts connections, keeps their books, authenticates, and stops cleanly."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import selectors
import socket
import sqlite3
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from securechat import crypto_utils
from securechat.accounts import (
    AccountBan,
    AccountStore,
    DeviceTokens,
    LoginThrottle,
    RevocationNotSaved,
    TokenAuthority,
    TokenClaims,
    TokenError,
    UserRecord,
    UserStore,
    UserStoreError,
    account_stamp,
    hash_password,
    verify_password,
)
from securechat.admin import open_account_store
from securechat.backend import BackendUnavailable, MemoryBackend, RoomBackend
from securechat.config import (
    ACCOUNTS_IN_REDIS_FILE,
    CLUSTER_KEY_FILE,
    HISTORY_FILE,
    HISTORY_KEY_FILE,
    MOTD_FILE,
    REVOKED_SESSIONS_FILE,
    SERVER_KEY_FILE,
    TOKEN_SECRET_FILE,
    ServerConfig,
)
from securechat.connection import (
    FINISH_GRACE,
    PING_FRAME,
    AuthenticationFailed,
    ClientConnection,
)
from securechat.hello_signer import HelloSigner
from securechat.history import ChatStore, load_or_create_history_key
from securechat.hub import AccountIdentity, ChatHub, HubConfig, HubError
from securechat.outbound import SendPool
from securechat.protocol import (
    ControlError,
    ErrorReply,
    Goodbye,
    Login,
    Resume,
    TokenRefresh,
    normalize_room,
)
from securechat.ratelimit import FloodControl, address_bucket

if TYPE_CHECKING:
    from securechat.redis_accounts import RedisUserStore
    from securechat.redis_limits import SharedConnectionCount, SharedFloodBudget

log = logging.getLogger("chat.server")

WRONG_CREDENTIALS = "wrong user name or password"
#: Passwords hashed at once for one address (its guesses in parallel wait their turn at this): as
#: many as its free failures (``LoginThrottle``), so a burst of guesses fired at once gets no more
#: checked than the same guesses one after another. An address with a wrong password lately gets one.
MAX_HASHING_PER_ADDRESS = 3
#: Addresses whose connection rate is remembered before idle ones are forgotten.
MAX_TRACKED_ADDRESSES = 10_000


#: Seconds a name not spelled as stored is looked up among the names read before, rather than
#: reading them all again: a new account typed in another case waits this long at most.
SPELLINGS_MAX_AGE = 2.0


class StoreDirectory:
    """The user store as the hub sees it: who exists, who is an admin, and server-wide bans.

    A store that cannot be read counts as "not an admin" (and is logged): refusing is the
    safe side. A name looked up in it then is refused as unavailable, not as no account.
    """

    def __init__(self, users: AccountStore) -> None:
        self.users = users
        # Guards _spellings and _spellings_read_at: each stored name by its casefold, read at most once a
        # SPELLINGS_MAX_AGE for a name not spelled as stored (with accounts in Redis, a read of them all).
        self._spellings_lock = threading.Lock()
        self._spellings: dict[str, str] = {}
        self._spellings_read_at = -SPELLINGS_MAX_AGE

    def _record(self, name: str) -> UserRecord | None:
        try:
            return self.users.get(name)
        except UserStoreError as exc:
            log.error("%s", exc)
            return None

    def is_admin(self, name: str) -> bool:
        record = self._record(name)
        return record is not None and record.is_admin

    def ban(self, name: str, ban: AccountBan) -> None:
        try:
            self.users.ban(name, ban)
        except UserStoreError as exc:
            log.error("%s", exc)
            raise HubError("server_error", "the ban could not be saved: tell the server's operator") from None

    def unban(self, name: str) -> bool:
        try:
            return self.users.unban(name)
        except KeyError:
            return False
        except UserStoreError as exc:
            log.error("%s", exc)
            raise HubError("server_error", "the ban could not be lifted: tell the server's operator") from None

    def forget(self, name: str) -> None:
        self.users.forget(name)

    def canonical(self, name: str) -> str | None:
        if self._record(name) is not None:
            return name
        # Not spelled as stored: a name typed in another case, or no account at all (a guesser's, at
        # every login attempt, before any throttle). The names are read again only once they are old.
        folded = name.casefold()
        with self._spellings_lock:
            stored = self._spellings.get(folded)
            fresh = time.monotonic() - self._spellings_read_at < SPELLINGS_MAX_AGE
        if stored is not None or fresh:
            return stored
        try:
            names = self.users.load()
        except UserStoreError as exc:
            log.error("%s", exc)
            # Not "there is no user bob": bob may be online on another node, or log in a minute later.
            raise HubError(
                "unavailable", "the server cannot read its accounts just now; try again in a moment"
            ) from None
        spellings = {stored.casefold(): stored for stored in names}
        with self._spellings_lock:
            self._spellings, self._spellings_read_at = spellings, time.monotonic()
        return spellings.get(folded)

    def identity(self, name: str) -> AccountIdentity | None:
        record = self._record(name)
        return AccountIdentity(record.account_id, record.created, record.created_at) if record is not None else None


class ChatServer:
    """Accepts connections and runs the room. Same verbs as ``socketserver``.

    ``serve_forever()`` accepts until ``shutdown()``; ``server_close()`` tells
    every client the server is going down, closes them and joins every thread.
    The listening socket is bound in the constructor, so ``address`` is known
    (use port 0 for an ephemeral port).
    """

    #: The chat rules' class (tests put a hostile one here).
    hub_class: type[ChatHub] = ChatHub

    def __init__(self, config: ServerConfig, backend: RoomBackend | None = None) -> None:
        self.config = config
        data_dir = Path(config.data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_directory(data_dir)
        self.private_key = crypto_utils.load_or_create_private_key(data_dir / SERVER_KEY_FILE, config.key_size)
        self.public_key_der = crypto_utils.public_key_bytes(self.private_key.public_key())
        self.fingerprint = crypto_utils.fingerprint(self.private_key.public_key())
        self.hello_signer = HelloSigner(lambda data: crypto_utils.sign(self.private_key, data))
        token_secret = crypto_utils.load_or_create_secret(data_dir / TOKEN_SECRET_FILE)
        self.tokens = TokenAuthority(token_secret, config.token_ttl, revoked_path=data_dir / REVOKED_SESSIONS_FILE)
        self.device_tokens = DeviceTokens(token_secret)
        # With a shared backend the accounts are shared too: adduser on one node lets the user in on all.
        self.users: AccountStore = open_account_store(config.backend, config.users_path)
        holds_accounts = bool(self.users.load())  # also: a corrupt store is reported now
        # Hashed for unknown user names, so they cost the same work as a wrong password.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16))
        # The only threads that hash passwords. A pool rather than a semaphore: each thread
        # that runs Argon2 keeps its own 19 MiB malloc arena, so hashing on every connection's
        # thread would grow memory with the number of clients who ever logged in.
        self.hash_pool = concurrent.futures.ThreadPoolExecutor(
            config.hash_workers, thread_name_prefix="hash", initializer=lower_thread_priority
        )
        # Seals and sends for every logged-in connection (see outbound.py).
        self.send_pool = SendPool(config.send_workers)
        # Guards connections, connections_per_address, _connections_shared, _connections_unshared and
        # _logging_in.
        self.connections_lock = threading.Lock()
        self.connections: set[ClientConnection] = set()
        self.connections_per_address: Counter[str] = Counter()
        # How many times this node told Redis its count of an address: each telling's version; and the
        # addresses whose last telling failed (Redis away), told again by the keepalive.
        self._connections_shared = 0
        self._connections_unshared: set[str] = set()
        # Connections that have not sent their login yet, oldest first (a dict keeps the order).
        self._logging_in: dict[ClientConnection, None] = {}
        # Idle connections may take at most half the server, and half of one address's share.
        self._startup_budget = max(1, min(config.max_startups, config.max_clients // 2))
        self._startups_per_address = max(1, config.max_connections_per_address // 2)
        self._connect_buckets: dict[str, FloodControl] = {}
        # Guards _hashing_per_address (passwords being hashed for each address) and _wrong_at (when
        # each address last gave a wrong password), and is notified when one is done (see _hashing_slot).
        self.hashing_slot_freed = threading.Condition()
        # Guards _attempting, the (account, address) pairs whose login is being checked here, and is
        # notified when one ends (see _one_attempt_at_a_time).
        self.login_attempt_ended = threading.Condition()
        self._attempting: set[str] = set()
        self._hashing_per_address: Counter[str] = Counter()
        self._wrong_at: dict[str, float] = {}
        self.stopping = threading.Event()
        self._serving = threading.Event()
        self._wakeup_read, self._wakeup_write = socket.socketpair()
        self.listener = socket.create_server(
            (config.host, config.port),
            family=socket.AF_INET6 if ":" in config.host else socket.AF_INET,
            backlog=512,
            reuse_port=config.reuse_port,
        )
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.login_throttle: LoginThrottle = config.login_throttle
        self.account_throttle: LoginThrottle = config.account_throttle
        flood_budget: SharedFloodBudget | None = None
        #: The connections from each address on every node (a Redis deployment); None: this node's count alone.
        self.shared_connections: SharedConnectionCount | None = None
        try:
            if backend is None and config.backend != "memory":
                from securechat.redis_backend import RedisBackend  # only a shared deployment needs redis
                from securechat.redis_limits import SharedConnectionCount, SharedFloodBudget, SharedLoginThrottle

                cluster_key = crypto_utils.load_or_create_secret(data_dir / CLUSTER_KEY_FILE)
                # Every node shows clients one key and accepts the others' tokens: a node started with a
                # directory that lacks either is refused, as one with another cluster key is.
                token_secret_id = hmac.new(token_secret, b"chat token secret id", hashlib.sha256).hexdigest()[:16]
                shared = RedisBackend(
                    config.backend,
                    cluster_key,
                    history_limit=config.history_limit,
                    history_max_age=config.history_days * 86400,
                    shared_files={SERVER_KEY_FILE: self.fingerprint, TOKEN_SECRET_FILE: token_secret_id},
                )
                # A /quit, /logout or resume on one node holds on every node, at once; and an attacker
                # spreading over the nodes gets no more guesses, nor lines, than on one.
                self.tokens.share_revocations(shared)
                throttle_key = hashlib.sha256(b"chat throttle keys\0" + cluster_key).digest()
                self.login_throttle = SharedLoginThrottle(shared.redis, "login", config.login_throttle, throttle_key)
                self.account_throttle = SharedLoginThrottle(
                    shared.redis, "account", config.account_throttle, throttle_key
                )
                flood_budget = SharedFloodBudget(shared.redis)
                self.shared_connections = SharedConnectionCount(shared.redis, shared.node, throttle_key)
                backend = shared
                _say_what_redis_leaves_behind(data_dir / HISTORY_FILE)
            if backend is None:
                store = ChatStore(
                    data_dir / HISTORY_FILE,
                    load_or_create_history_key(data_dir / HISTORY_KEY_FILE, data_dir / HISTORY_FILE),
                    history_limit=config.history_limit,
                    history_max_age=config.history_days * 86400,
                )
                backend = MemoryBackend(store)
            if config.backend != "memory":  # once the backend has accepted this node (its cluster key)
                from securechat.redis_accounts import RedisUserStore

                if isinstance(self.users, RedisUserStore):
                    self._hand_accounts_to_redis(self.users, holds_accounts, config.users_path, data_dir)
            self.hub = self.hub_class(
                backend,
                HubConfig(
                    default_room=normalize_room(config.default_room),
                    max_rooms=config.max_rooms,
                    max_rooms_per_account=config.max_rooms_per_account,
                    max_sessions=config.max_sessions,
                    join_history=min(config.join_history, config.history_limit),
                    flood_burst=config.flood_burst,
                    flood_rate=config.flood_rate,
                    keeps_history=config.history_limit > 0,
                ),
                accounts=StoreDirectory(self.users),
                motd_path=data_dir / MOTD_FILE,
                revoke_session=self.tokens.revoke_session,
                flood_budget=flood_budget,
            )
        except BaseException:
            if backend is not None and not hasattr(self, "hub"):  # started (its threads), never handed over
                with contextlib.suppress(Exception):
                    backend.close()
            self.listener.close()
            self._wakeup_read.close()
            self._wakeup_write.close()
            raise
        self.keepalive = threading.Thread(target=self._run_keepalive, name="keepalive", daemon=True)
        self._serve_thread: threading.Thread | None = None

    def _hand_accounts_to_redis(
        self, store: RedisUserStore, holds_accounts: bool, users_path: Path, data_dir: Path
    ) -> None:
        """A Redis deployment's first start copies users.json into its empty account store; no later one does.

        What ``import-users`` does, so that the demo accounts (or yours) work on every node at once.
        But the account commands with ``--backend`` never write users.json: copied into a Redis that
        lost its data, it would bring back deleted accounts and old passwords. So once Redis has held
        accounts, both Redis and this data directory (which outlives Redis's data, and is copied to
        the other nodes) record it, and a Redis found without accounts after that is an error to
        repair from a backup. Raises ``UserStoreError`` if Redis cannot be reached.
        """
        marker = data_dir / ACCOUNTS_IN_REDIS_FILE
        store.held_before = marker.exists()  # (copied with the data directory to every node)
        held_before = False
        if not holds_accounts:
            held_before = store.held_before or store.held_accounts_before()
            # Read again, after: another process of this deployment (a worker starting beside this
            # one) may have copied them in and said so since this one first looked.
            holds_accounts = bool(store.load())
        if not holds_accounts:
            if held_before:
                log.error(
                    "%s holds no accounts, though it held them before: nobody can log in. %s is not copied"
                    " in again (it misses every change made with --backend); restore the accounts from a"
                    " backup: python server.py import-users FILE --backend URL",
                    store.where,
                    users_path,
                )
                return
            try:
                records = UserStore(users_path).load()
            except UserStoreError as exc:
                log.warning("no accounts in Redis yet, and %s", exc)
                return
            # In one change: a copy cut short by a failing Redis must not look like a finished one.
            added = store.put_all(list(records.values()))
            if not added:
                return
            log.warning("Redis held no accounts: copied %d from %s (%s)", len(added), users_path, ", ".join(added))
        store.note_accounts_held()
        store.held_before = True
        if not marker.exists():
            note = f"The accounts of this deployment live in {store.where}: users.json is not copied there again.\n"
            with contextlib.suppress(FileExistsError):  # another process starting at once wrote it first
                crypto_utils.write_secret_file(marker, note.encode())

    # ------------------------------------------------------------------ lifecycle

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown()`` (or ``request_shutdown()``)."""
        self.keepalive.start()
        self.send_pool.start()
        self._serving.set()
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        selector.register(self._wakeup_read, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self.listener:
                        try:
                            self._accept()
                        except Exception:  # one bad connection never stops the server accepting
                            log.exception("error while accepting a connection")
        finally:
            selector.close()
            self._serving.clear()

    def start(self) -> ChatServer:
        """Serve in a background thread (handy for tests and benchmarks)."""
        self._serve_thread = threading.Thread(target=self.serve_forever, name="accept", daemon=True)
        self._serve_thread.start()
        self._serving.wait(timeout=10.0)  # so that every thread of the server exists once this returns
        return self

    def request_shutdown(self) -> None:
        """Ask ``serve_forever`` to return. Safe from a signal handler."""
        self.stopping.set()
        try:
            self._wakeup_write.send(b"x")
        except OSError:
            pass

    def shutdown(self) -> None:
        """Stop accepting and wait until ``serve_forever`` has returned."""
        self.request_shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join()

    def server_close(self, grace: float = 1.0) -> None:
        """Tell every client the server is going down, close them, join every thread.

        Everything waits on one deadline, not a timeout per thread, so a thousand
        connections cannot add up to a slow exit.
        """
        self.request_shutdown()
        # Logins waiting for a hashing slot are refused now rather than at the end of their wait.
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            if connection.in_room:
                # Ahead of whatever a slow reader still has queued: it must hear why the link ends.
                goodbye = Goodbye(reason="server shutting down", may_reconnect=True)
                connection.finish("server shutting down", goodbye, urgent=True)
            else:
                connection.close("server shutting down")
        give_up = time.monotonic() + grace
        for connection in connections:
            # A finishing connection closes itself once its goodbye is out (or its peer fails).
            connection.closed.wait(timeout=max(0.0, give_up - time.monotonic()))
            connection.close("server shutting down")
        for connection in connections:
            connection.reader.join(timeout=max(0.0, give_up + 0.5 - time.monotonic()))
            connection.outbox.close_socket()
        if self.keepalive.is_alive():
            self.keepalive.join(timeout=1.0)
        self.hub.close()
        self.send_pool.stop()
        self.hash_pool.shutdown(wait=True)  # a hash already running takes a few tens of ms
        self.listener.close()
        self._wakeup_read.close()
        self._wakeup_write.close()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        try:
            sock, peer = self.listener.accept()
        except OSError:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = address_bucket(peer[0])  # an IPv6 peer counts by its /64
        with self.connections_lock:
            refusal = None
            # A connection still logging in makes room for this one when a limit is reached: an
            # honest client logs in within milliseconds, so the oldest of them is the idle one.
            victim = None
            if not self._connect_allowed(address):
                refusal = ("too_many_connections", "too many new connections from your address; slow down")
            elif len(self.connections) >= self.config.max_clients:
                victim = self._oldest_logging_in()
                if victim is None:
                    refusal = ("server_full", "server is full; try again later")
            elif self.connections_per_address[address] >= self.config.max_connections_per_address:
                victim = self._oldest_logging_in(address)
                if victim is None:
                    refusal = ("too_many_connections", "too many connections from your address")
            elif len(self._logging_in) >= self._startup_budget:
                victim = self._oldest_logging_in()
            elif sum(1 for other in self._logging_in if other.address_bucket == address) >= self._startups_per_address:
                victim = self._oldest_logging_in(address)
            if victim is not None:
                del self._logging_in[victim]  # chosen once: its reader forgets it as it closes
            if refusal is None:
                try:
                    connection = ClientConnection(self, sock, peer)
                except BaseException:
                    sock.close()
                    raise
                # Registered before its thread starts, so server_close() cannot miss it.
                self.connections.add(connection)
                self.connections_per_address[address] += 1
                self._logging_in[connection] = None
        if refusal is not None:
            log.info("refused %s:%s: %s", peer[0], peer[1], refusal[1])
            try:
                sock.settimeout(0.5)
                sock.sendall(ControlError(code=refusal[0], message=refusal[1]).encode())
            except OSError:
                pass
            sock.close()
            return
        if victim is not None:
            log.info("dropped %s: still logging in when a new connection needed room", victim.peer)
            victim.close("dropped: too many connections still logging in")
        log.info("connect %s", connection.peer)
        try:
            connection.reader.start()
        except Exception:  # a thread that cannot be started, say: this connection alone is lost
            log.exception("%s: cannot start its reader; closing it", connection.peer)
            # Unregistered first: once closed, its peer may already be back with a new connection.
            self.forget(connection)
            connection.close("internal error")

    def _oldest_logging_in(self, address: str | None = None) -> ClientConnection | None:
        """The connection (of ``address``, if given) logging in the longest; call under ``connections_lock``."""
        return next((c for c in self._logging_in if address is None or c.address_bucket == address), None)

    def logged_in(self, connection: ClientConnection) -> None:
        """The connection sent its login: it no longer counts against the budget of those logging in."""
        with self.connections_lock:
            self._logging_in.pop(connection, None)

    def _connect_allowed(self, address: str) -> bool:
        """Per-address rate of new connections. Only the accepting thread touches the buckets."""
        if self.config.connect_rate <= 0:
            return True
        bucket = self._connect_buckets.get(address)
        if bucket is None:
            if len(self._connect_buckets) >= MAX_TRACKED_ADDRESSES:
                self._connect_buckets = {key: b for key, b in self._connect_buckets.items() if not b.is_full()}
            bucket = self._connect_buckets[address] = FloodControl(self.config.connect_rate, self.config.connect_burst)
        return bucket.allow()

    def count_across_nodes(self, connection: ClientConnection) -> None:
        """Count a new connection in for its address on every node (reader thread, as it starts: the
        accepting thread never waits for Redis). Raises ``AuthenticationFailed`` past the limit."""
        total = self._share_connections(connection.address_bucket)
        if total is None:
            return  # Redis cannot say: this node's own count, checked as it accepted, stands
        if total > self.config.max_connections_per_address:
            raise AuthenticationFailed("too_many_connections", "too many connections from your address")

    def _share_connections(self, address: str) -> int | None:
        """Tell the other nodes how many connections from ``address`` this one holds now: how many it
        has on every node, or None if there are no others or Redis cannot say."""
        shared = self.shared_connections
        if shared is None:
            return None
        with self.connections_lock:
            count = self.connections_per_address[address]
            self._connections_shared += 1
            version = self._connections_shared
        total = shared.share(address, count, version)
        with self.connections_lock:
            if total is None:  # told again once Redis is back (the keepalive), wherever the address goes
                if len(self._connections_unshared) < MAX_TRACKED_ADDRESSES:
                    self._connections_unshared.add(address)
            else:
                self._connections_unshared.discard(address)
        return total

    def _share_again(self) -> None:
        """Tell Redis the counts of the addresses whose last telling failed (keepalive thread): a
        connection that closed meanwhile must stop counting on the other nodes too."""
        with self.connections_lock:
            unshared = list(self._connections_unshared)
        for address in unshared:
            if self._share_connections(address) is None:
                return  # Redis is still away

    def forget(self, connection: ClientConnection) -> None:
        """Drop a finished connection from the books (called by its reader thread)."""
        with self.connections_lock:
            self._logging_in.pop(connection, None)
            if connection in self.connections:
                self.connections.discard(connection)
                self.connections_per_address[connection.address_bucket] -= 1
                if self.connections_per_address[connection.address_bucket] <= 0:
                    del self.connections_per_address[connection.address_bucket]
        self._share_connections(connection.address_bucket)
        if not self.stopping.is_set():
            connection.outbox.close_socket()  # never under a send in flight on the pool's threads

    def _run_keepalive(self) -> None:
        """Ping quiet clients; drop those that stay silent (vanished peers, no ghosts)."""
        check_every = max(0.05, min(5.0, self.config.ping_interval / 4))
        while not self.stopping.wait(check_every):
            try:
                self._keepalive_pass()
            except Exception:  # this thread must outlive any one bad pass, or ghosts stay forever
                log.exception("keepalive pass failed")

    def _keepalive_pass(self) -> None:
        self.hub.forget_idle_flood_buckets()  # accounts quiet long enough have nothing to remember
        self.tokens.forget_expired()
        self._share_again()
        now = time.monotonic()
        with self.connections_lock:
            connections = [c for c in self.connections if c.in_room]
        stamps = self._current_account_stamps()
        for connection in connections:
            self._keep_alive(connection, now, stamps)

    def _keep_alive(self, connection: ClientConnection, now: float, stamps: dict[str, str] | None) -> None:
        """One connection's turn: end it if it must go, refresh its token, ping it if quiet."""
        if connection.close_reason:  # already on its way out, but a stuck flush must not hold it
            if connection.finishing_since and now - connection.finishing_since > FINISH_GRACE:
                connection.close(connection.close_reason)
            return
        claims = connection.claims
        if claims is None:
            return
        if stamps is not None and stamps.get(claims.username) != claims.account_stamp:
            # A listener sends nothing for the per-frame check to catch: a password
            # change or a deleted account must still end its session. Before the revocation's
            # check: the ban that revoked it (another device's turn, maybe) is the reason to give.
            log.info("closing %s user=%s: account changed or banned", connection.peer, connection.name)
            reason = self._why_account_changed(claims.username)
            connection.finish("account changed", reason)
            if reason.code == "banned":
                self._revoke_sessions_of_banned_account(claims)
            return
        if self.tokens.is_revoked(claims.session_id):
            # Ended from another server process (a /logout there): a listener sends nothing to be refused.
            connection.finish(
                "session ended elsewhere",
                ErrorReply(code="token_revoked", message="this session was ended; log in again", fatal=True),
            )
            return
        if claims.expires_at <= time.time():
            # Only a listener gets here (a speaker's frames are refused): end it the same way.
            connection.finish(
                "token expired", ErrorReply(code="token_expired", message="token expired; log in again", fatal=True)
            )
            return
        if self.tokens.needs_refresh(claims):  # a listener needs its token kept fresh too
            try:
                token, expires_at = self.issue_token(connection, claims.account_stamp)
            except TokenError:  # its session was revoked meanwhile (by a leave racing this pass, say)
                if not connection.close_reason:
                    connection.close("session revoked")
                return
            connection.deliver(TokenRefresh(token=token, expires_at=expires_at))
        silent = now - connection.last_inbound
        if silent > self.config.ping_timeout:
            ping_sent = connection.ping_sent_at > connection.last_inbound
            # How long a client has to answer a ping that has actually been sent.
            reply_window = max(0.0, self.config.ping_timeout - self.config.ping_interval)
            # Unsent after all this time means we could not get a frame onto the
            # socket: the peer has stopped reading, which is as dead as not answering.
            if not ping_sent or now - connection.ping_sent_at > reply_window:
                connection.close("no reply to keepalive (connection lost)")
                return
        if silent > self.config.ping_interval and now - connection.last_ping > self.config.ping_interval:
            connection.last_ping = now
            # Ahead of any backlog, so a busy client hears it at once.
            connection.send_queue.put_urgent(PING_FRAME)

    # ------------------------------------------------------------------ authentication

    def authenticate_password(self, connection: ClientConnection, login: Login) -> str:
        """Check a password login; returns the user name or raises ``AuthenticationFailed``.

        Failures are throttled as OWASP advises against lockout: strictly per (account,
        address) and per address, and only gently per account, so a guesser elsewhere
        cannot keep the real user out. A login carrying a valid device token (one an
        earlier login from that device was given) skips the account-wide delay; its own
        failures count against the token instead. Guesses are counted when they start; one
        (account, address) has one login checked at a time on each process; an address has at
        most ``MAX_HASHING_PER_ADDRESS`` passwords hashed at once (one once it has given a wrong
        one), each checked against the address's delay as its turn comes. A successful login
        is given a new device token (``connection.device_token``).
        """
        # Names are unique in any case, so "Alice" typed at the prompt is alice: the session,
        # its token and every room see the name as stored.
        try:
            stored = self.hub.accounts.canonical(login.username)
        except HubError:  # the store cannot be read: the password check says so
            stored = None
        login = dataclasses.replace(login, username=stored or login.username)
        name = login.username
        account = name.casefold()[:64]
        pair_key = ("user at address", f"{account} {connection.address_bucket}")
        address_key, account_key = ("address", connection.address_bucket), ("user", account)
        strict, gentle = self.login_throttle, self.account_throttle
        device_id = self._known_device(login)
        # The keys this attempt is counted on until it succeeds: the account's own ceiling,
        # or the device token's in its place.
        own_keys = [pair_key] if device_id is None else [pair_key, ("device", device_id)]
        # One at a time per (account, address) on this process: each attempt is counted as a failure
        # until it succeeds, so six devices or bots of one account logging in at once from one machine
        # found the free failures used up by each other, and the fourth was refused.
        with self._one_attempt_at_a_time(pair_key[1]):
            wait = strict.retry_after([address_key])
            if device_id is None:
                wait = max(wait, gentle.retry_after([account_key]))
            if wait <= 0:
                # Counted as failures until they succeed, so guesses fired in parallel are throttled
                # like the same guesses one after another.
                wait = strict.begin_attempt(own_keys, reserve=own_keys)
            if (
                wait <= 0
                and device_id is None
                and (wait := gentle.begin_attempt([account_key], reserve=[account_key])) > 0
            ):
                strict.cancel_attempt(own_keys)
            if wait > 0:
                raise _throttled(connection, wait)
            outcome = "error"  # until _check_password returns: busy, shutting down, store unreadable...
            try:
                with self._hashing_slot(connection.address_bucket):
                    # Again once its turn has come: the address is counted only once a guess has failed
                    # (honest logins behind one address must not hold each other up), so the guesses it
                    # waited behind may have made it wait since.
                    wait = strict.retry_after([address_key])
                    if wait > 0:
                        raise _throttled(connection, wait)
                    accepted = self._check_password(connection, login)
                    outcome = "accepted" if accepted else "wrong"
                    if not accepted:  # before the slot is free: the guess waiting for it must see this
                        strict.record_failure([address_key])  # the others were counted as it began
                        self._note_wrong_password(connection.address_bucket)
            finally:
                if outcome == "accepted":
                    # Never the address: owning one account must not reset the guesses made at others.
                    strict.record_success(own_keys)
                    gentle.record_success([account_key])
                elif outcome != "wrong":  # not the user's fault (or refused before any check): give them back
                    strict.cancel_attempt(own_keys)
                    if device_id is None:
                        gentle.cancel_attempt([account_key])
        if not accepted:
            raise AuthenticationFailed("auth_failed", WRONG_CREDENTIALS)
        connection.device_token = self.device_tokens.issue(name, connection.verified_stamp)
        return name

    @contextlib.contextmanager
    def _one_attempt_at_a_time(self, pair: str) -> Iterator[None]:
        """Hold a login of ``pair`` (account and address) until no other of the same pair is being checked
        here; ``AuthenticationFailed`` (busy) if none ends within ``hash_wait``."""
        with self.login_attempt_ended:
            if not self.login_attempt_ended.wait_for(lambda: pair not in self._attempting, self.config.hash_wait):
                raise AuthenticationFailed("busy", "too many logins at once for this account; try again in a moment")
            self._attempting.add(pair)
        try:
            yield
        finally:
            with self.login_attempt_ended:
                self._attempting.discard(pair)
                self.login_attempt_ended.notify_all()

    def _known_device(self, login: Login) -> str | None:
        """The id of the login's device token if it is valid for this account as it is now, else None."""
        if not login.device_token:
            return None
        try:
            record = self.users.get(login.username)
        except UserStoreError:  # the password check will say so
            return None
        if record is None:
            return None
        return self.device_tokens.check(login.device_token, record.name, account_stamp(record))

    @contextlib.contextmanager
    def _hashing_slot(self, address: str) -> Iterator[None]:
        """Wait for one of an address's hashing slots (its logins past them queue here, not in the pool);
        ``AuthenticationFailed`` (busy) if none frees up within ``hash_wait``."""
        forget_after = self.login_throttle.forget_after
        with self.hashing_slot_freed:

            def slot_free() -> bool:
                lately_wrong = time.monotonic() - self._wrong_at.get(address, -forget_after) < forget_after
                return self._hashing_per_address[address] < (1 if lately_wrong else MAX_HASHING_PER_ADDRESS)

            got_one = self.hashing_slot_freed.wait_for(slot_free, self.config.hash_wait)
            if not got_one:
                raise AuthenticationFailed("busy", "too many logins at once from your address; try again in a moment")
            self._hashing_per_address[address] += 1
        try:
            yield
        finally:
            with self.hashing_slot_freed:
                self._hashing_per_address[address] -= 1
                if self._hashing_per_address[address] <= 0:
                    del self._hashing_per_address[address]
                self.hashing_slot_freed.notify_all()

    def _note_wrong_password(self, address: str) -> None:
        """From now on ``address`` has one hashing slot, until its failures are forgotten."""
        now = time.monotonic()
        with self.hashing_slot_freed:
            if len(self._wrong_at) >= MAX_TRACKED_ADDRESSES:
                forget_after = self.login_throttle.forget_after
                self._wrong_at = {key: at for key, at in self._wrong_at.items() if now - at < forget_after}
                if len(self._wrong_at) >= MAX_TRACKED_ADDRESSES:  # all recent: the oldest half goes
                    kept = sorted(self._wrong_at.items(), key=lambda item: item[1])[MAX_TRACKED_ADDRESSES // 2 :]
                    self._wrong_at = dict(kept)
            self._wrong_at[address] = now

    def _check_password(self, connection: ClientConnection, login: Login) -> bool:
        """True if the password is right, False if not; raises for anything else."""
        name = login.username
        try:
            record = self.users.get(name)
        except UserStoreError as exc:
            log.error("%s", exc)
            raise AuthenticationFailed("server_error", "the server cannot read its user store") from None
        stored_hash = record.password_hash if record is not None else self._decoy_hash
        try:
            check = self.hash_pool.submit(verify_password, login.password, stored_hash)
            password_ok = check.result(timeout=self.config.hash_wait)
        except concurrent.futures.TimeoutError:
            check.cancel()
            raise AuthenticationFailed("busy", "server busy; try again in a moment") from None
        except (concurrent.futures.CancelledError, RuntimeError):  # the pool was shut down under us
            raise AuthenticationFailed("shutting_down", "server shutting down") from None
        if record is None or not password_ok:
            # Only a known name is logged: an unknown one may be a password typed in the wrong box.
            who = f"user={name}" if record is not None else "unknown user"
            log.info("login failed %s %s: wrong password", connection.peer, who)
            return False
        self._refuse_demo_account(connection, record)
        self._refuse_banned_account(connection, record)
        connection.verified_stamp = account_stamp(record)
        return True

    def _refuse_banned_account(self, connection: ClientConnection, record: UserRecord) -> None:
        ban = record.active_ban()
        if ban is not None:
            log.info("login refused %s user=%s: banned", connection.peer, record.name)
            raise AuthenticationFailed("banned", f"this account is {ban.describe()}")

    def _refuse_demo_account(self, connection: ClientConnection, record: UserRecord) -> None:
        # Both the address we listen on and the peer's: a server on loopback can still be reached
        # from afar through a tunnel or a proxy that connects from another address.
        local_only = self.config.is_loopback and is_loopback_address(connection.address)
        if record.demo and not self.config.allow_demo_accounts and not local_only:
            log.warning("login refused %s user=%s: demo account on a public address", connection.peer, record.name)
            raise AuthenticationFailed("demo_disabled", "demo accounts are disabled on this server")

    def _current_account_stamps(self) -> dict[str, str] | None:
        """Every account's stamp, or None if the store cannot be read just now (keep everyone).

        A banned account has none: a ban set by the admin command line ends its sessions too.
        """
        try:
            records = self.users.load()
        except UserStoreError as exc:
            log.error("%s", exc)
            return None
        if not records and self.users.lost_its_accounts():
            # Every account is missing, none was deleted (the log says Redis lost its data). Sessions go
            # on, as through an outage, until the accounts are restored.
            return None
        return {name: account_stamp(record) for name, record in records.items() if record.active_ban() is None}

    def _revoke_sessions_of_banned_account(self, claims: TokenClaims) -> None:
        """An account banned from the admin command line keeps its password, so its tokens would be
        good again once the ban is lifted: revoke its sessions, as /gban does. Only for a ban: a new
        password or a deleted account refuses every earlier token for good already, and a session
        opened since with the new password must live on."""
        try:
            self.tokens.revoke(claims)
            not_saved = self.hub.revoke_sessions_of(claims.username, besides={claims.session_id})
        except RevocationNotSaved as exc:
            not_saved = exc
        except BackendUnavailable as exc:  # this session is revoked; the others, at their own turn
            log.warning("the sessions of user=%s were not all revoked: %s", claims.username, exc)
            return
        if not_saved is not None:
            log.error("a session of user=%s may resume after a restart: %s", claims.username, not_saved)

    def _why_account_changed(self, name: str) -> ErrorReply:
        """What a session is told when its account changed under it: banned (with until when and
        why: no password would help), deleted, or given a new password."""
        try:
            record = self.users.get(name)
        except UserStoreError:
            record = None
        ban = record.active_ban() if record is not None else None
        if ban is not None:
            return ErrorReply(code="banned", message=f"this account is {ban.describe()}", fatal=True)
        if record is None:
            return ErrorReply(code="account_deleted", message="this account no longer exists", fatal=True)
        return ErrorReply(code="token_revoked", message="this account's password changed; log in again", fatal=True)

    def _account_stamp(self, name: str) -> str:
        """The current stamp of an account; raises ``TokenError`` if it is gone."""
        try:
            record = self.users.get(name)
        except UserStoreError as exc:
            log.error("%s", exc)
            raise AuthenticationFailed("server_error", "the server cannot read its user store") from None
        if record is None:
            raise TokenError("account_deleted", "this account no longer exists")
        ban = record.active_ban()
        if ban is not None:
            raise TokenError("banned", f"this account is {ban.describe()}")
        return account_stamp(record)

    def issue_token(self, connection: ClientConnection, stamp: str) -> tuple[str, int]:
        """A fresh token for an authenticated connection's session; also becomes its current claims.

        ``stamp`` is the account stamp that was *checked* (of the record whose password was
        verified, or of the token being renewed), never re-read here: a password changed
        meanwhile must make the new token fail its next check, not inherit the new stamp.
        """
        token, expires_at = self.tokens.issue(connection.name, connection.key_thumbprint, stamp, connection.session_id)
        connection.set_claims(self.tokens.verify(token, connection.key_thumbprint, connection.name))
        return token, expires_at

    def verify_token(self, connection: ClientConnection, token: object, username: str | None = None) -> TokenClaims:
        """Verify a token for this connection, including that its account is unchanged.

        The token last verified on this connection is only re-checked for what can change
        (expiry, revocation, the account); any other token string is verified in full.
        Raises ``TokenError``.
        """
        expected_user = username or connection.name
        verified = connection.verified_token
        # Comparing with == leaks nothing: the client sent this string, and we hold it only
        # because the same client sent it before on this authenticated connection.
        try:
            if verified is not None and isinstance(token, str) and token == verified[0]:
                claims = verified[1]
                if claims.username != expected_user:
                    raise TokenError("token_invalid", "token is for another user")
                self.tokens.recheck(claims)
            else:
                claims = self.tokens.verify(token, connection.key_thumbprint, expected_user)
        except TokenError as exc:
            if exc.code == "token_revoked" and expected_user:
                self._account_stamp(expected_user)  # revoked by a ban or a deletion: that is the reason to give
            raise
        try:
            stamp = self._account_stamp(claims.username)
        except TokenError as exc:
            if exc.code == "banned":  # its next frame can come before the keepalive looks
                self._revoke_sessions_of_banned_account(claims)
            raise
        if claims.account_stamp != stamp:
            raise TokenError("token_revoked", "the account's password changed; log in again")
        if isinstance(token, str):  # always, once verify() accepted it
            connection.verified_token = (token, claims)
        return claims

    def authenticate_token(self, connection: ClientConnection, resume: Resume) -> str:
        """Check a resume request; returns the user name or raises ``TokenError``."""
        claims = self.tokens.verify(resume.token, connection.key_thumbprint)
        connection.name = claims.username
        claims = self.verify_token(connection, resume.token)
        try:
            record = self.users.get(claims.username)
        except UserStoreError as exc:
            log.error("%s", exc)
            raise AuthenticationFailed("server_error", "the server cannot read its user store") from None
        if record is not None:  # None only if deleted this instant; the next frame's check ends it
            self._refuse_demo_account(connection, record)
            self._refuse_banned_account(connection, record)
        # The old session is spent, every token of it: the new connection starts a new one. Only
        # one resume may spend it: a second one racing this one finds it already revoked.
        try:
            spent = self.tokens.spend(claims)
        except RevocationNotSaved as exc:  # unrecorded, it is not spent: the resume may be tried again
            log.error("%s", exc)
            raise AuthenticationFailed(
                "server_error", "the server cannot record sessions just now; try again"
            ) from None
        if not spent:
            raise TokenError("token_revoked", "token was given up; log in again")
        # Its old connection, if the server still holds it (a link that died without a word), goes:
        # this device is back on a new one. Other sessions of the account are not touched.
        with self.connections_lock:
            stale = [other for other in self.connections if other.session_id == claims.session_id]
        for other in stale:
            other.close("resumed on a new connection")
        # Its place among the account's sessions is this connection's now, before the old reader
        # gets round to closing: a resume must never be refused as one session too many.
        self.hub.backend.remove_session(claims.username, claims.session_id)
        connection.verified_stamp = claims.account_stamp
        return claims.username


def is_loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


#: How much lower than the rest of the server a password-hashing thread runs (a nice value).
HASHING_NICENESS = 10
MAX_NICENESS = 19


def lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to the server's other threads (Linux only).

    A login storm can keep every core hashing for seconds: at equal priority the
    room's own work (sealing and sending lines) would queue behind it. Lowered, the
    hashing uses whatever the room leaves, so the room keeps its pace and logins
    take the rest. On Linux a thread is a task with its own nice value; elsewhere
    this would reprioritise the whole process, so it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    thread_id = threading.get_native_id()
    try:
        niceness = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(MAX_NICENESS, niceness + HASHING_NICENESS))
    except OSError as exc:  # a sandbox may forbid it; hashing still works, just at full priority
        log.debug("cannot lower the hashing threads' priority: %s", exc)


def _say_what_redis_leaves_behind(history: Path) -> None:
    """A node that ran alone keeps its rooms and history in ``history``, which a node on Redis does not
    read: said at each start, for as long as the file is there, so that nobody thinks them moved."""
    if not history.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{history.resolve().as_uri()}?mode=ro", uri=True)) as database:
            lines = database.execute("SELECT count(*) FROM messages").fetchone()[0]
            rooms = database.execute("SELECT count(*) FROM rooms").fetchone()[0]
    except sqlite3.Error:
        return
    if lines or rooms:
        log.warning(
            "%s holds %d lines and %d rooms (with their roles and bans) from before this node used Redis;"
            " a node on Redis does not read them: move the file away once you no longer need it",
            history,
            lines,
            rooms,
        )


def check_private_directory(path: Path) -> None:
    """Refuse a data directory others could write to: they could swap the key or the secret."""
    info = path.stat()
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise crypto_utils.InsecureFileError(
            f"{path} is writable by other users (mode {stat.filemode(info.st_mode)}); fix it with: chmod 700 {path}"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise crypto_utils.InsecureFileError(f"{path} belongs to another user; the server's data must be its own")


def _throttled(connection: ClientConnection, wait: float) -> AuthenticationFailed:
    """The refusal of a login that must wait ``wait`` seconds (logged without the name tried)."""
    log.info("login throttled from %s", connection.peer)
    return AuthenticationFailed("rate_limited", f"too many failed logins; try again in {math.ceil(wait)} s")
