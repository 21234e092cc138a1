"""The accounts in Redis, for several server processes: ``adduser`` on one node lets the user in on all.

One hash, ``chat:users``: a field per account holding exactly the JSON entry that
``users.json`` holds for it (the Argon2id hash, never a password). Every change is an
optimistic transaction on that hash (WATCH, read, MULTI, write; retried if another
change came between), so two admin commands at once never lose each other's change.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis

from securechat.accounts import AccountEdits, UserRecord, UserStoreError, entry_of, record_from_entry
from securechat.config import hide_password
from securechat.redis_backend import PREFIX, redis_client

USERS_KEY = f"{PREFIX}users"
T = TypeVar("T")


class RedisUserStore(AccountEdits):
    """``AccountStore`` on a Redis hash. Raises ``UserStoreError`` when Redis cannot be reached."""

    def __init__(self, url: str) -> None:
        self.where = f"Redis at {hide_password(url)}"
        self.redis = redis_client(url)
        # The last record read of each account: a session, whose every frame checks its account,
        # keeps going through a short Redis outage on it (nothing can change the account while
        # Redis is down). An account never read here cannot log in until Redis is back.
        # Guarded by _cache_lock.
        self._cache_lock = threading.Lock()
        self._last_read: dict[str, UserRecord | None] = {}

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
            raise UserStoreError(f"cannot reach {self.where}: {exc}") from None
        records = [self._parse(name, value) for name, value in entries.items()]
        return {record.name: record for record in sorted(records, key=lambda record: record.name)}

    def get(self, name: str) -> UserRecord | None:
        try:
            value = self.redis.hget(USERS_KEY, name)
        except redis.exceptions.RedisError as exc:
            with self._cache_lock:
                if name in self._last_read:
                    return self._last_read[name]
            raise UserStoreError(f"cannot reach {self.where}: {exc}") from None
        record = self._parse(name, value) if value is not None else None
        with self._cache_lock:
            if len(self._last_read) > 100_000:  # a bound: the next reads fill it again
                self._last_read.clear()
            self._last_read[name] = record
        return record

    def names(self) -> list[str]:
        return sorted(self.load())

    def remove_orphaned_copies(self) -> int:
        return 0  # a transaction leaves no copies behind

    def _update(self, edit: Callable[[dict[str, UserRecord]], T]) -> T:
        def attempt(pipe: Any) -> T:
            records = [self._parse(name, value) for name, value in pipe.hgetall(USERS_KEY).items()]
            before = {record.name: record for record in records}
            users = dict(before)
            result = edit(users)
            pipe.multi()
            for name in before.keys() - users.keys():
                pipe.hdel(USERS_KEY, name)
            for name, record in users.items():
                if before.get(name) != record:
                    pipe.hset(USERS_KEY, name, json.dumps(entry_of(record)))
            return result

        try:
            outcome = cast(T, self.redis.transaction(attempt, USERS_KEY, value_from_callable=True))  # type: ignore[arg-type]
        except redis.exceptions.RedisError as exc:
            raise UserStoreError(f"cannot reach {self.where}: {exc}; nothing was changed") from None
        return outcome
