"""The accounts in Redis, for several server processes: ``adduser`` on one node lets the user in on all.

One hash, ``chat:users``: a field per account holding exactly the JSON entry that
``users.json`` holds for it (the Argon2id hash, never a password). Every change is an
optimistic transaction on that hash (WATCH, read, MULTI, write; retried if another
change came between), so two admin commands at once never lose each other's change.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis

from securechat.accounts import AccountEdits, UserRecord, UserStoreError, entry_of, record_from_entry
from securechat.config import hide_password
from securechat.redis_backend import CONTROL_KEY, CONTROL_STREAM_LENGTH, PREFIX, describe_redis_error, redis_client

USERS_KEY = f"{PREFIX}users"
#: Set once Redis has held accounts: a node finding none then does not copy its users.json in (the
#: account commands with --backend never write users.json, so it misses every change since).
ACCOUNTS_HELD_KEY = f"{PREFIX}accounts_held"
#: How long a record read from Redis answers for its account. Every frame of a session checks
#: its account (password stamp, ban): a round trip for each would cost more than the rest of a
#: line. Every change is told to all server processes on the control stream, in the same
#: transaction, and they drop their copy at once: this bound only covers a notice missed in an outage.
ACCOUNT_CACHE_SECONDS = 1.0
T = TypeVar("T")


def _now_stamp() -> str:
    """When the accounts were first held (ACCOUNTS_HELD_KEY's value), for an operator reading Redis."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RedisUserStore(AccountEdits):
    """``AccountStore`` on a Redis hash. Raises ``UserStoreError`` when Redis cannot be reached."""

    def __init__(self, url: str) -> None:
        self.where = f"Redis at {hide_password(url)}"
        self._url = url  # for describe_redis_error, which never shows its password
        self.redis = redis_client(url)
        # The last record read of each account, and when (time.monotonic(); 0 once a change was
        # told): it answers for ACCOUNT_CACHE_SECONDS, and a session keeps going on it through a
        # short Redis outage (nothing can change the account while Redis is down). An account
        # never read here cannot log in until Redis is back. Guarded by _cache_lock, with
        # _generation counting the changes told, so that a read racing one is not kept as fresh.
        self._cache_lock = threading.Lock()
        self._last_read: dict[str, tuple[float, UserRecord | None]] = {}
        self._generation = 0
        #: Whether this deployment's accounts have lived in Redis (its data directory says so, see
        #: ``ChatServer._hand_accounts_to_redis``): set once, at start.
        self.held_before = False

    def _parse(self, name: Any, value: Any) -> UserRecord:
        text_name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            entry = json.loads(value)
        except ValueError:
            raise UserStoreError(f"{self.where}: user {text_name!r} is not valid JSON") from None
        return record_from_entry(self.where, text_name, entry)

    def load(self) -> dict[str, UserRecord]:
        try:
            entries = self.redis.hgetall(USERS_KEY)
        except redis.exceptions.RedisError as exc:
            raise UserStoreError(describe_redis_error(self._url, exc)) from None
        records = [self._parse(name, value) for name, value in entries.items()]
        return {record.name: record for record in sorted(records, key=lambda record: record.name)}

    def get(self, name: str) -> UserRecord | None:
        now = time.monotonic()
        with self._cache_lock:
            read_at, record = self._last_read.get(name, (0.0, None))
            if read_at and now - read_at < ACCOUNT_CACHE_SECONDS:
                return record
            generation = self._generation
        try:
            value = self.redis.hget(USERS_KEY, name)
        except redis.exceptions.RedisError as exc:
            with self._cache_lock:
                if name in self._last_read:
                    return self._last_read[name][1]
            raise UserStoreError(describe_redis_error(self._url, exc)) from None
        record = self._parse(name, value) if value is not None else None
        if record is None and self.lost_its_accounts():
            # Not "this account no longer exists": Redis lost every account with its data. Sessions go on
            # on the records read before, as through an outage, until the accounts are restored.
            with self._cache_lock:
                if name in self._last_read:
                    return self._last_read[name][1]
            raise UserStoreError(f"{self.where} lost its accounts with its data: they must be restored")
        with self._cache_lock:
            if len(self._last_read) > 100_000:  # a bound: the next reads fill it again
                self._last_read.clear()
            self._last_read[name] = (now if generation == self._generation else 0.0, record)
        return record

    def lost_its_accounts(self) -> bool:
        """Whether Redis lost this deployment's accounts: they lived there (``held_before``), and Redis holds
        neither an account nor the record that it held some, which every write of an account sets and
        deleting them all leaves. An empty Redis that never held them has not lost them. False if it
        cannot say."""
        if not self.held_before:
            return False
        try:
            return self.redis.exists(USERS_KEY, ACCOUNTS_HELD_KEY) == 0
        except redis.exceptions.RedisError:
            return False

    def forget(self, name: str) -> None:
        """``name`` changed (told on the control stream): its next ``get`` reads Redis."""
        with self._cache_lock:
            if name in self._last_read:
                self._last_read[name] = (0.0, self._last_read[name][1])
            self._generation += 1

    def note_accounts_held(self) -> None:
        """Record in Redis that it holds the deployment's accounts (kept until Redis loses its data)."""
        try:
            self.redis.set(ACCOUNTS_HELD_KEY, _now_stamp(), nx=True)
        except redis.exceptions.RedisError as exc:
            raise UserStoreError(describe_redis_error(self._url, exc)) from None

    def held_accounts_before(self) -> bool:
        """Whether Redis recorded holding accounts (``note_accounts_held``), whatever it holds now."""
        try:
            return bool(self.redis.exists(ACCOUNTS_HELD_KEY))
        except redis.exceptions.RedisError as exc:
            raise UserStoreError(describe_redis_error(self._url, exc)) from None

    def names(self) -> list[str]:
        return sorted(self.load())

    def remove_orphaned_copies(self) -> int:
        return 0  # a transaction leaves no copies behind

    def _update(self, edit: Callable[[dict[str, UserRecord]], T]) -> T:
        changed: set[str] = set()

        def attempt(pipe: Any) -> T:
            records = [self._parse(name, value) for name, value in pipe.hgetall(USERS_KEY).items()]
            before = {record.name: record for record in records}
            users = dict(before)
            result = edit(users)
            changed.clear()
            changed.update(name for name in before.keys() | users.keys() if before.get(name) != users.get(name))
            pipe.multi()
            if any(name in users for name in changed):  # lost with Redis's data; kept when all are deleted
                pipe.set(ACCOUNTS_HELD_KEY, _now_stamp(), nx=True)
            for name in sorted(changed):
                if name in users:
                    pipe.hset(USERS_KEY, name, json.dumps(entry_of(users[name])))
                else:
                    pipe.hdel(USERS_KEY, name)
                # Every server process drops its copy of the account (``Hub.on_account_changed``).
                fields: Any = {"account": name}
                pipe.xadd(CONTROL_KEY, fields, maxlen=CONTROL_STREAM_LENGTH, approximate=True)
            return result

        try:
            outcome = cast(T, self.redis.transaction(attempt, USERS_KEY, value_from_callable=True))  # type: ignore[arg-type]
        except redis.exceptions.RedisError as exc:
            raise UserStoreError(f"{describe_redis_error(self._url, exc)}; nothing was changed") from None
        finally:
            for name in changed:
                self.forget(name)
        return outcome
