"""Limits counted across every server process of a Redis deployment.

An attacker must not get N times the budget by spreading over N nodes: failed-login
delays (``SharedLoginThrottle``, the same rules as ``accounts.LoginThrottle``), each
account's flood budget (``SharedFloodBudget``, a token bucket) and the connections from
each address (``SharedConnectionCount``) are counted in Redis, each check one atomic
script. If Redis cannot answer, each process falls back to counting on its own
(logged): slower to throttle, never open to a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any

import redis

from securechat.accounts import LoginThrottle
from securechat.redis_backend import NODES_KEY, PREFIX, SESSION_TTL, TOKEN_BUCKET, flood_key

log = logging.getLogger("chat.server")

# Checks every key (KEYS[1..n]) and, if none is delaying, counts one failure on the rest.
# ARGV: n, now, free failures, base delay, max delay, seconds a record is kept. Returns the
# seconds to wait (as text: a Lua number would be cut to an integer), "0" if reserved.
_BEGIN = """
local n, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local free, base, most = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local wait = 0
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'count', 'last')
  local count = tonumber(v[1]) or 0
  if count >= free then
    local w = tonumber(v[2]) + math.min(most, base * 2 ^ (count - free)) - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return tostring(wait) end
for i = n + 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'count', 1)
  redis.call('HSET', KEYS[i], 'last', ARGV[2])
  redis.call('EXPIRE', KEYS[i], ARGV[6])
end
return '0'
"""

_CANCEL = """
for i = 1, #KEYS do
  if (tonumber(redis.call('HGET', KEYS[i], 'count')) or 0) <= 1 then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HINCRBY', KEYS[i], 'count', -1)
  end
end
return 0
"""

# Takes from an account's flood budget: KEYS[1]; ARGV: now, rate per second, burst, cost. Returns 1
# if allowed. (A line's cost is taken by the append script, in the same step.)
_TAKE = (
    TOKEN_BUCKET
    + """
if take(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])) then return 1 end
return 0
"""
)


# Records how many connections from an address this process holds now, and returns how many the
# address has on every live process. Each process writes its whole count, never a change, so a
# write lost while Redis was away is put right by the next one; a version orders the writes of one
# process (a late one never overwrites a newer). KEYS: the address's hash (a field per process:
# "version count"), the processes' heartbeats (process -> when last seen). ARGV: process, its
# count, its version, now, seconds a process counts as live after its last heartbeat. A dead
# process's share is dropped.
_COUNT = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
local version = held and tonumber(string.match(held, '^(%d+)')) or -1
if tonumber(ARGV[3]) > version then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ' ' .. ARGV[2]) end
local total, entries = 0, redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local seen = tonumber(redis.call('ZSCORE', KEYS[2], entries[i]))
  if entries[i] == ARGV[1] or (seen and seen >= tonumber(ARGV[4]) - tonumber(ARGV[5])) then
    total = total + (tonumber(string.match(entries[i + 1], ' (%d+)$')) or 0)
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
-- Kept while connections are held (a week at most); an address with none left goes a minute on,
-- long enough for a late write of a process not to come back as a newer one.
redis.call('EXPIRE', KEYS[1], total > 0 and 7 * 86400 or 60)
return total
"""


class SharedConnectionCount:
    """The connections from each address, on every process: the per-address limit holds across nodes.

    Redis sees a keyed hash of the address, never the address. A process's share lives
    as long as its heartbeat (``RedisBackend`` refreshes it), so a crashed node's
    connections stop counting within ``SESSION_TTL`` seconds.
    """

    def __init__(self, client: redis.Redis, node: str, secret: bytes) -> None:
        self.redis = client
        self.node = node
        self._secret = secret
        self._count = client.register_script(_COUNT)
        self._failed_over = False

    def _key(self, address: str) -> str:
        digest = hmac.new(self._secret, f"connections\0{address}".encode(), hashlib.sha256)
        return f"{PREFIX}connections:{digest.hexdigest()[:32]}"

    def share(self, address: str, count: int, version: int) -> int | None:
        """Record that this process holds ``count`` connections from ``address`` (as of ``version``,
        which rises with every change here): how many it has on every node now, this one included,
        or None if Redis cannot say (this process's own count stands)."""
        keys = [self._key(address), NODES_KEY]
        args: list[Any] = [self.node, count, version, time.time(), SESSION_TTL]
        try:
            total = int(self._count(keys=keys, args=args))
        except redis.exceptions.RedisError as exc:
            if not self._failed_over:  # once, not once per connection
                log.error("Redis: %s; connections are counted by this process alone until it is back", exc)
            self._failed_over = True
            return None
        self._failed_over = False
        return total


class SharedLoginThrottle(LoginThrottle):
    """``LoginThrottle`` counted in Redis by every process; ``name`` keeps two throttles apart."""

    def __init__(self, client: redis.Redis, name: str, rules: LoginThrottle, secret: bytes) -> None:
        super().__init__(rules.free_failures, rules.base_delay, rules.max_delay, rules.forget_after, rules.max_entries)
        self.redis = client
        self.name = name
        # What was typed as a user name may be a password typed in the wrong box: Redis sees
        # only a keyed hash of it.
        self._secret = secret
        self._begin = client.register_script(_BEGIN)
        self._cancel = client.register_script(_CANCEL)
        self._failed_over = False

    def _key(self, key: tuple[str, str]) -> str:
        digest = hmac.new(self._secret, f"{self.name}\0{key[0]}\0{key[1]}".encode(), hashlib.sha256)
        return f"{PREFIX}throttle:{digest.hexdigest()[:32]}"

    def _args(self, count: int) -> list[Any]:
        return [count, time.time(), self.free_failures, self.base_delay, self.max_delay, int(self.forget_after)]

    def _fall_back(self, exc: Exception) -> None:
        if not self._failed_over:
            log.error("Redis: %s; failed logins are counted by this process alone until it is back", exc)
        self._failed_over = True

    def _back(self) -> None:
        if self._failed_over:
            log.info("failed logins are counted in Redis again")
        self._failed_over = False

    def retry_after(self, keys: list[tuple[str, str]]) -> float:
        try:
            wait = float(self._begin(keys=[self._key(key) for key in keys], args=self._args(len(keys))))
        except redis.exceptions.RedisError as exc:
            self._fall_back(exc)
            return super().retry_after(keys)
        self._back()
        return max(0.0, wait)

    def begin_attempt(self, keys: list[tuple[str, str]], reserve: list[tuple[str, str]]) -> float:
        names = [self._key(key) for key in keys] + [self._key(key) for key in reserve]
        try:
            wait = float(self._begin(keys=names, args=self._args(len(keys))))
        except redis.exceptions.RedisError as exc:
            self._fall_back(exc)
            return super().begin_attempt(keys, reserve)
        self._back()
        return max(0.0, wait)

    def cancel_attempt(self, reserved: list[tuple[str, str]]) -> None:
        try:
            self._cancel(keys=[self._key(key) for key in reserved])
        except redis.exceptions.RedisError as exc:
            self._fall_back(exc)
            super().cancel_attempt(reserved)

    def record_failure(self, keys: list[tuple[str, str]]) -> None:
        try:
            self._begin(keys=[self._key(key) for key in keys], args=self._args(0))
        except redis.exceptions.RedisError as exc:
            self._fall_back(exc)
            super().record_failure(keys)

    def record_success(self, keys: list[tuple[str, str]]) -> None:
        super().record_success(keys)
        try:
            self.redis.delete(*[self._key(key) for key in keys])
        except redis.exceptions.RedisError as exc:
            self._fall_back(exc)


class SharedFloodBudget:
    """Each account's line budget, one token bucket in Redis for all its devices on every node."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(_TAKE)

    def take(self, account: str, cost: float, rate: float, burst: int) -> bool | None:
        """True if allowed, False if over the budget, None if Redis cannot say (count locally)."""
        try:
            return bool(self._take(keys=[flood_key(account)], args=[repr(time.time()), rate, burst, cost]))
        except redis.exceptions.RedisError:
            return None
