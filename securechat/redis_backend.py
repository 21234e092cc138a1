"""The room backend on Redis: several server processes (on one machine or many) share rooms.

What each process keeps for itself is only its own sessions and their local delivery
(``securechat.hub``); everything shared lives in Redis:

* every room is a **stream** (``chat:stream:#room``), trimmed to the history bound: it is
  both the live feed and the room's history. Entry ids are the chat's message ids (a
  counter, ``chat:id``), so a stream's order is id order and ``since`` catch-up works
  across processes. A private conversation has a stream per pair of accounts, and its
  lines are also announced on ``chat:privates`` for live delivery.
* one **reader thread** per process reads the streams of the rooms its sessions are in
  (and the private feed) with blocking reads, resuming from the last entry it saw: a
  short Redis outage loses nothing within the bound, and a gap beyond it is told to the
  room's members.
* **presence** is a hash per account of its sessions, each with an expiry its process
  refreshes: the sessions of a process that died vanish within ``SESSION_TTL``.
* **room state** (topic, owner, roles, modes, bans: hashes) and memberships (sorted sets).

Redis never sees a message text: every payload is sealed with AES-256-GCM under the
cluster key, with the stream, the message id and the sender as associated data (and a
key id, so the key can be rotated). Names of rooms and accounts are visible to Redis.

**One cluster key.** A process holds one key and opens only entries whose ``k`` is its id.
The first process to start records its key id in ``chat:cluster_key_id``; a process with
another key refuses to start (else it would see the others in /who and never hear them),
and the running processes record it again if Redis lost its data. There is no rotation
with old keys kept: to change the key, stop every node, give each the new ``cluster_key``
and delete ``chat:cluster_key_id``. What was sealed under the old key is then skipped, and
each skip is logged with the key id it was sealed under.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import Any

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securechat.backend import (
    BackendLimit,
    BackendMismatch,
    BackendUnavailable,
    LineCharge,
    OverBudget,
    RoomEvent,
    SessionInfo,
    Subscriber,
    decode_event,
    encode_event,
)
from securechat.config import hide_password
from securechat.history import RoomRecord, private_stream
from securechat.protocol import Chat, Notice, address_text

log = logging.getLogger("chat.server")

PREFIX = "chat:"
#: Seconds a session stays present without its process refreshing it (a crashed node's users
#: vanish within this); refreshed every SESSION_REFRESH seconds.
SESSION_TTL = 30.0
SESSION_REFRESH = 10.0
#: How long a scope's state (a room's modes, roles, bans and mutes, which every line checks) read
#: from Redis answers here. A change on any process is told to all on the control stream, which
#: drops it at once: this bound only covers a notice missed in an outage.
STATE_CACHE_SECONDS = 1.0
#: The id (``key_id``) of the cluster key every process seals with; see the module's docstring.
CLUSTER_KEY_ID_KEY = f"{PREFIX}cluster_key_id"
#: What the other files every node must share say of themselves (file name -> its id: the server
#: key's fingerprint, a keyed hash of the token secret), as the first node recorded them.
NODE_FILES_KEY = f"{PREFIX}node_files"
#: What to do when a node's files are not the deployment's.
COPY_THE_FILES = "copy server_key.pem, token_secret and cluster_key from a running node's data directory"
#: The processes' heartbeats (a sorted set: process -> when its presence was last refreshed).
NODES_KEY = f"{PREFIX}nodes"
#: How long close() may take (seconds), whatever Redis does: the whole stop is promised within 2 s.
CLOSE_BUDGET = 0.5
#: How long one blocking read waits before looking at the set of rooms again.
READ_BLOCK_MS = 250
#: Seconds a Redis call may wait for its answer (or a connection) before it fails.
REDIS_TIMEOUT = 2.0
#: Entries one read takes at most, per stream.
READ_COUNT = 500
#: The live feed of private lines keeps about this many entries (history is in the pair streams).
PRIVATE_FEED_LENGTH = 10_000
#: How many ids before the newest one a device saw its private catch-up looks (see private_since): a
#: line lands late by the ids the other processes give in one round trip to Redis, far fewer. The
#: lines of this account among them are sent again, and the client drops those it showed.
PRIVATE_LOOK_BACK = 100
NONCE_SIZE = 12
#: Where a Redis URL with no port points.
DEFAULT_REDIS_PORT = 6379
#: The Redis password, when the URL does not carry one (a URL on the command line is seen by ps).
PASSWORD_VARIABLE = "CHAT_REDIS_PASSWORD"
#: A room's stream is its live feed too: with history off (``history_limit`` 0) it still keeps
#: this many entries, so that a process that falls briefly behind loses nothing.
LIVE_FEED_LENGTH = 100
#: A read that returns this long after the one before (seconds) means the reader was held up
#: (the process stopped, a slow machine): the feeds may have been trimmed past where it was.
READER_STALL = 2.0
#: Whether the feeds were trimmed past the reader is looked at least this often (seconds).
GAP_CHECK_INTERVAL = 30.0

# Lua: takes ``cost`` from the token bucket in the hash ``key`` (``rate`` a second, up to ``burst``)
# if it holds that much; true if it did. ``now`` is the caller's time, as text. One account's flood
# budget, whichever process and script takes from it.
TOKEN_BUCKET = """
local function take(key, now, rate, burst, cost)
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(v[1]) or burst, tonumber(v[2]) or tonumber(now)
  tokens = math.min(burst, tokens + math.max(0, tonumber(now) - at) * rate)
  local allowed = tokens >= cost
  if allowed then tokens = tokens - cost end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', now)
  redis.call('EXPIRE', key, math.ceil(burst / rate) + 1)
  return allowed
end
"""

# Numbers and appends a sealed event in one round trip. The caller proposes the id (one above
# the highest it knows of) and seals with it, since the id is part of the sealed data: it is
# taken only if it is above every id issued (the counter) and the stream's last entry, so ids
# stay unique and each stream in id order. Else the script reserves the next id for the caller
# (the counter moves to it) and answers with it: the caller seals again with that id and says it
# is reserved, which only the stream's order can then refuse. So a busy deployment costs a lost
# proposal one more round trip, never a race that can be lost again and again. A line with a
# charge is taken from its sender's flood budget in the same step (only once it is appended).
# KEYS: stream, sequence hash, id counter, sender's flood budget, [private feed, recipient's
# pairs, sender's pairs]. ARGV: id, stream name, history bound, key id, sealed payload, recipient
# ("" for a room), sender, feed bound, "1" if the id is reserved, then now ("" for no charge),
# rate, burst, cost, then the highest sequence number of the stream the caller has seen (if Redis
# lost data, the stream's numbering goes on above it). Returns {sequence number, 0}, {-1, reserved
# id}, or {-2, 0} over the budget.
_APPEND = (
    TOKEN_BUCKET
    + """
local id = tonumber(ARGV[1])
local mine = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-1', ARGV[1] .. '-1')
if #mine > 0 then
  local fields, seq, sealed = mine[1][2], 0, nil
  for i = 1, #fields, 2 do
    if fields[i] == 's' then seq = tonumber(fields[i + 1]) elseif fields[i] == 'p' then sealed = fields[i + 1] end
  end
  -- A retry of a call whose answer was lost: it is there already, once.
  if sealed == ARGV[5] then return {seq, 0} end
end
local counter = tonumber(redis.call('GET', KEYS[3])) or 0
local last_id = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then last_id = tonumber(string.match(last[1][1], '^(%d+)')) end
if last_id >= id or (ARGV[9] ~= '1' and counter >= id) then
  local reserved = math.max(counter, last_id, id) + 1
  redis.call('SET', KEYS[3], reserved)
  return {-1, reserved}
end
if ARGV[10] ~= '' and not take(KEYS[4], ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])) then
  return {-2, 0}
end
if counter < id then redis.call('SET', KEYS[3], ARGV[1]) end
local seq = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
local floor = tonumber(ARGV[14]) or 0
if seq <= floor then
  seq = floor + 1
  redis.call('HSET', KEYS[2], ARGV[2], seq)
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[1] .. '-1', 's', seq, 'k', ARGV[4], 'from', ARGV[7],
           'p', ARGV[5])
if #KEYS > 4 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'id', ARGV[1], 'to', ARGV[6], 'from', ARGV[7],
             'stream', ARGV[2], 'k', ARGV[4], 'p', ARGV[5])
  redis.call('SADD', KEYS[6], ARGV[2])
  redis.call('SADD', KEYS[7], ARGV[2])
end
return {seq, 0}
"""
)

# After Redis lost data (restarted with no append-only file, or an old one), its counters may be
# below what a process has seen: this raises them back. Then no id or sequence number is given twice,
# and no new line lands below where the processes' readers are. KEYS: the id counter, the sequence
# numbers. ARGV: the highest id the process knows of, then (stream, last sequence number) pairs.
_RAISE_FLOORS = """
if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
for i = 2, #ARGV, 2 do
  if (tonumber(redis.call('HGET', KEYS[2], ARGV[i])) or 0) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# Registers a session unless the account has `limit` live ones. KEYS: the account's sessions.
# ARGV: session id, its JSON, now, limit. Returns the count, or -1 past the limit.
_ADD_SESSION = """
local live = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local ok, info = pcall(cjson.decode, entries[i + 1])
  if not ok or type(info) ~= 'table' or type(info.expires) ~= 'number' or info.expires < tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], entries[i])  -- lapsed, or damaged
  elseif entries[i] ~= ARGV[1] then
    live = live + 1
  end
end
if tonumber(ARGV[4]) > 0 and live >= tonumber(ARGV[4]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return live + 1
"""

# Creates a room unless it exists or `limit` rooms do. KEYS: the room's hash, the set of rooms.
# ARGV: name, topic, owner, created_at, limit. Returns 1 (created), 0 (exists), -1 (limit).
_CREATE_ROOM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if tonumber(ARGV[5]) > 0 and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[5]) then return -1 end
redis.call('HSET', KEYS[1], 'topic', ARGV[2], 'owner', ARGV[3], 'created_at', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""


# Revokes a session once, whichever process asks first, and tells every process. KEYS: the
# revocations, the control stream, this revocation's marker. ARGV: session id, until (seconds),
# control stream bound, a nonce of this call (a retry whose first answer was lost is told 1 again).
_REVOKE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('GET', KEYS[3]) == ARGV[4] then return 1 end
  return 0
end
redis.call('SET', KEYS[3], ARGV[4], 'EX', 60)
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'revoked', ARGV[1], 'until', ARGV[2])
return 1
"""
# Sets (or with an empty value, removes) one key of a scope's state only if it holds what the caller
# read, and tells every process. KEYS: the state hash, the control stream. ARGV: key, expected (""
# for absent), value, control stream bound, scope. Returns 1, or 0 if it held something else.
_REPLACE_STATE = """
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'state', ARGV[5])
return 1
"""

# Takes the lapsed entries (a node that died without a word) out of a room's roster, in one step, so
# that one process alone tells the room who left; and only if no process swept the room in the last
# ARGV[2] seconds (a room is read by every node with members in it: one sweep a period is enough).
# KEYS: the roster, the room's "swept lately" mark. ARGV: now, the period, how long after lapsing an
# entry is too old to tell of (nobody in the room then saw it). Returns the accounts that had lapsed
# entries and have no live one left. A damaged entry goes too.
_SWEEP_ROSTER = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return {} end
local now, gone, live = tonumber(ARGV[1]), {}, {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local ok, info = pcall(cjson.decode, entries[i + 1])
  if not ok or type(info) ~= 'table' or type(info.account) ~= 'string' or type(info.expires) ~= 'number' then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif info.expires < now then
    redis.call('HDEL', KEYS[1], entries[i])
    if info.expires >= now - tonumber(ARGV[3]) then gone[info.account] = true end
  else
    live[info.account] = true
  end
end
local left = {}
for account in pairs(gone) do
  if not live[account] then table.insert(left, account) end
end
return left
"""
# A session leaves a room's roster, and whether its account is still in the room through another
# process is read in the same step: of two processes whose last sessions of an account leave at once
# (both read the same kick), exactly one finds none left, and it alone tells the room. KEYS: the
# roster. ARGV: the session id, its account, this process's node id, now. Returns 1 or 0.
_LEAVE_ROOM = """
redis.call('HDEL', KEYS[1], ARGV[1])
local now = tonumber(ARGV[4])
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  local ok, info = pcall(cjson.decode, value)
  if ok and type(info) == 'table' and info.account == ARGV[2] and info.node ~= ARGV[3]
      and type(info.expires) == 'number' and info.expires >= now then
    return 1
  end
end
return 0
"""
#: The control stream: revocations, and which account or scope changed (every process reads it).
CONTROL_KEY = f"{PREFIX}control"
CONTROL_STREAM_LENGTH = 10_000
#: Joins and leaves kept per room for the processes that read them (news, not history).
PRESENCE_STREAM_LENGTH = 1000


def redis_client(url: str, on_connect: Callable[[], None] | None = None) -> redis.Redis:
    """A client for ``url`` that retries a short outage with backoff before it gives up.

    The password may come from ``CHAT_REDIS_PASSWORD`` instead of the URL (a command line is
    seen by everyone on the machine). Each connection is named ``securechat-PID`` in Redis's
    ``CLIENT LIST``, so an operator can tell which process it belongs to. ``on_connect`` is called
    (it must not call Redis) each time a connection is made, the first time and after an outage.
    """
    extra: dict[str, Any] = {}
    if on_connect is not None:

        def connected(connection: redis.connection.Connection) -> None:
            # What the library does when it is given no function of its own. Not on_connect(): it
            # checks the connection's health (a PING) before it authenticates, and a Redis that wants
            # a password fails that PING, which reconnects, which calls this again: a RecursionError
            # instead of the error that says a password is needed.
            set_up = getattr(connection, "on_connect_check_health", None)
            if set_up is not None:
                set_up(check_health=False)
            else:  # redis-py before 5.1
                connection.on_connect()
            on_connect()

        extra["redis_connect_func"] = connected
    if os.environ.get(PASSWORD_VARIABLE) and not _url_password(url):
        extra["password"] = os.environ[PASSWORD_VARIABLE]  # also beside a user the URL names (an ACL user)
    return redis.Redis.from_url(
        url,
        **extra,
        client_name=f"securechat-{os.getpid()}",
        # A healthy Redis answers in milliseconds, and the longest read asked of it blocks READ_BLOCK_MS.
        # One that hangs (stuck, stopped, a path that drops packets) must be given up in seconds: every
        # call of a user's line, and the keepalive's, waits for it. A refused or reset connection is
        # tried again (a restart); a timeout is not, as each try would wait as long again.
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        health_check_interval=10,
        retry=redis.retry.Retry(
            redis.backoff.ExponentialBackoff(cap=1.0, base=0.05),
            3,
            supported_errors=(redis.exceptions.ConnectionError,),
        ),
        retry_on_error=[redis.exceptions.ConnectionError],
    )


#: What Redis answers when it wants a password, or refused the one given (redis-py raises most of
#: these as AuthenticationError, but a server may say them in a plain error reply too).
_LOGIN_REFUSALS = ("NOAUTH", "WRONGPASS", "HELLO must be called with the client already authenticated")


def _what_redis_refused(exc: redis.exceptions.RedisError) -> str:
    """What Redis did when it answered with a refusal ("is full ..."); "" if it did not answer. A full
    Redis and a user without a permission were said to be unreachable: the operator looked at the network."""
    text = str(exc)
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in text:
        return "is full (its maxmemory) and refuses writes"
    if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in text or "no permissions" in text:
        return "refused a command: its user lacks a permission the server needs (it runs scripts: +@scripting)"
    return ""


def describe_redis_error(url: str, exc: redis.exceptions.RedisError) -> str:
    """One line for an operator saying why Redis at ``url`` could not be used, never with its password.

    A refused login says whether a password is missing or wrong (Redis's own words name the
    protocol, not the remedy); anything else is ``cannot reach Redis at URL: reason``.
    """
    text = str(exc)
    if isinstance(exc, redis.exceptions.AuthenticationError) or text.startswith(_LOGIN_REFUSALS):
        place = _place(url)
        if _password_given(url):
            return f"Redis at {place} refused the password (or the user name) it was given"
        return f"Redis at {place} needs a password (give it in the URL or in {PASSWORD_VARIABLE})"
    refused = _what_redis_refused(exc)
    if refused:
        return f"Redis at {_place(url)} {refused}"
    return f"cannot reach Redis at {_shown_url(url)}: {text}"


def _password_given(url: str) -> bool:
    """Whether ``redis_client(url)`` sends a password: the URL's (before the host or in its query),
    else CHAT_REDIS_PASSWORD's."""
    return _url_password(url) or bool(os.environ.get(PASSWORD_VARIABLE))


def _url_password(url: str) -> bool:
    """Whether ``url`` itself holds a password (before the host, or in its query)."""
    parts = urllib.parse.urlsplit(url)
    try:
        return bool(parts.password) or any(urllib.parse.parse_qs(parts.query).get("password", []))
    except ValueError:  # a malformed URL: check_backend says so
        return "@" in url


def _place(url: str) -> str:
    """Where a Redis URL points, as HOST:PORT (or the socket's path), without any credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:  # check_backend refuses such a URL before it gets here
        port = DEFAULT_REDIS_PORT
    host = parts.hostname or "localhost"
    return address_text(host, port)


def flood_key(account: str) -> str:
    """The hash of an account's flood budget (``TOKEN_BUCKET``)."""
    return f"{PREFIX}flood:{account}"


def key_id(key: bytes) -> str:
    """A short public name for a cluster key (so a rotated key can be told apart)."""
    return hashlib.sha256(b"chat cluster key id\0" + key).hexdigest()[:8]


def _entry_id(message_id: int) -> str:
    return f"{message_id}-1"


def _message_id(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0])


def _stream_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as what orders it: "5-1" -> (5, 1)."""
    first, _, second = _text(entry_id).partition("-")
    return int(first), int(second or 0)


def _session_data(account: str, session_id: str) -> bytes:
    """What a sealed session record is bound to (AES-GCM associated data)."""
    return b"chat-session\0" + account.encode() + b"\0" + session_id.encode()


def _whole(value: object) -> int:
    """A count or number read back from Redis: 0 if it is none (a forged or damaged value), never past
    64 bits (where SQLite and the wire stop)."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0
    return number if 0 <= number < 2**63 else 0


def _feed_message_id(fields: dict[Any, Any]) -> int:
    """The message id a private feed entry names (0 if it names none: a forged entry)."""
    return _whole(fields.get(b"id", 0))


def _seq_of(fields: dict[Any, Any]) -> int:
    """A stream entry's sequence number in its room (0 if it has none)."""
    return _whole(fields.get(b"s", 0))


def _trimmed_past(oldest: list[Any], position: str) -> bool:
    """Whether a feed whose oldest entry is ``oldest`` (XRANGE - + COUNT 1) lost entries after ``position``."""
    if not oldest or position == "$":
        return False
    # (Also when only ``position`` itself was trimmed: then the catching up finds nothing to do.)
    return _stream_order(oldest[0][0]) > _stream_order(position)


def _just_before(entry_id: bytes | str) -> str:
    """The stream id right before ``entry_id``: reading after it starts at that entry."""
    milliseconds, sequence = _stream_order(entry_id)
    return f"{milliseconds}-{sequence - 1}" if sequence else f"{milliseconds - 1}-{2**64 - 1}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBackend:
    """Rooms shared through Redis (see the module's docstring).

    ``_watch_lock`` guards ``_watched`` (room -> last entry id read), ``_watching``,
    ``_generations`` and ``_presence_from``; ``_local_lock``
    guards ``_local_sessions`` (the sessions this process refreshes). Neither is held
    over a Redis call. ``node`` is this process's random identity, never stored.
    """

    shared = True
    charges_lines = True  # a line's flood budget is taken in the script that appends it

    def __init__(
        self,
        url: str,
        cluster_key: bytes,
        *,
        history_limit: int = 1000,
        history_max_age: float = 30 * 86400,
        clock: Callable[[], float] = time.time,
        shared_files: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self._aead = AESGCM(cluster_key)
        self._key_id = key_id(cluster_key)
        self.history_limit = history_limit
        self.history_max_age = history_max_age
        self._clock = clock
        self.node = uuid.uuid4().hex[:12]
        # Set when a connection to Redis is made: the reader then puts back the counters' floors
        # (_RAISE_FLOORS), in case it was a Redis that restarted with less than it had.
        self._reconnected = threading.Event()
        self.redis = redis_client(url, on_connect=self._reconnected.set)
        try:
            self.redis.ping()
        except redis.exceptions.RedisError as exc:
            raise BackendUnavailable(describe_redis_error(url, exc)) from None
        #: The other files every node must share, as this node has them (see NODE_FILES_KEY).
        self._shared_files = dict(shared_files or {})
        self._claim_cluster_key()
        self._append = self.redis.register_script(_APPEND)
        self._add_session = self.redis.register_script(_ADD_SESSION)
        self._create_room = self.redis.register_script(_CREATE_ROOM)
        self._revoke = self.redis.register_script(_REVOKE)
        self._raise_floors = self.redis.register_script(_RAISE_FLOORS)
        self._sweep_roster = self.redis.register_script(_SWEEP_ROSTER)
        self._replace_state = self.redis.register_script(_REPLACE_STATE)
        self._leave_room = self.redis.register_script(_LEAVE_ROOM)
        # The highest message id this process has issued or read: it proposes the next one above it.
        # If Redis came back with less than it had, ids go on from here, never under lines already
        # delivered. And room -> the highest sequence number of it this process has seen (kept when
        # the room is no longer read here): a room's numbering goes on above it. Guarded by _id_lock.
        self._id_lock = threading.Lock()
        self._highest_id = 0
        self._seq_floor: dict[str, int] = {}
        self._on_revoked: Callable[[str, int], None] | None = None
        self._control_from = "$"
        self._subscriber: Subscriber | None = None
        self._watch_lock = threading.Lock()
        self._watched: dict[str, str] = {}
        # room -> the generation (the hub's making of the room) being read; and the newest generation
        # of it told to watch or unwatch (see watch).
        self._watching: dict[str, int] = {}
        self._generations: dict[str, int] = {}
        # room -> the sequence number and the id of the last event handed to the subscriber: a gap
        # after an outage is told, and an event already handed over is not handed over again. The
        # reader and the publishing threads (their own lines, at once) both deliver, and in one order
        # per room, so _delivery_lock guards these and is held over handing a line over, which only
        # queues it for the sessions here (no I/O, no RSA).
        self._delivery_lock = threading.Lock()
        self._last_seq: dict[str, int] = {}
        self._delivered_id: dict[str, int] = {}
        # scope -> (when read, its state): what every line checks, read from Redis at most once a
        # STATE_CACHE_SECONDS; a change anywhere drops it (the control stream). Guarded by _state_lock,
        # with _state_generation counting the drops, so a read that raced a drop is not kept.
        self._state_lock = threading.Lock()
        self._state_cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._state_generation = 0
        self._private_feed_from = "$"
        # The message id of the last private line read from the feed (the reader's, as the positions
        # are): after a gap, what came between it and the feed's oldest entry is read from history.
        self._private_feed_last_id = 0
        # When the reader last looked for gaps in the feeds, and when its last read returned (monotonic).
        self._gaps_checked = self._last_read = 0.0
        self._local_lock = threading.Lock()
        self._local_sessions: dict[tuple[str, str], SessionInfo] = {}
        #: (room, session id) -> account, for the sessions of this process in each room (refreshed).
        self._local_rooms: dict[tuple[str, str], str] = {}
        # room -> the last entry read of its presence stream (guarded by _watch_lock).
        self._presence_from: dict[str, str] = {}
        self._stopping = threading.Event()
        self._problem = ""
        # When Redis was last said to have lost its data (monotonic; see _say_redis_lost_its_data).
        self._loss_told_at = -math.inf
        # The other cluster key id Redis was last seen to name ("" while it names this one's).
        self._foreign_key_id = ""
        self._reader = threading.Thread(target=self._read_loop, name="redis-reader", daemon=True)
        self._refresher = threading.Thread(target=self._refresh_loop, name="redis-presence", daemon=True)

    def _claim_cluster_key(self) -> None:
        """Record this process's key id as the cluster's unless one is recorded; ``BackendMismatch``
        if another is (this process could open none of the others' lines, nor they its own)."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                self._record_node_files(pipe)
                pipe.get(CLUSTER_KEY_ID_KEY)
                pipe.hgetall(NODE_FILES_KEY)
                *_, recorded, files = pipe.execute()
        except redis.exceptions.RedisError as exc:
            self.redis.close()
            raise BackendUnavailable(describe_redis_error(self.url, exc)) from None
        if recorded is not None and _text(recorded) != self._key_id:
            self.redis.close()
            raise BackendMismatch(
                f"this node's cluster_key (id {self._key_id}) is not the one the other nodes use"
                f" (id {_shown_key_id(recorded)}): {COPY_THE_FILES}"
            )
        for name, mine in self._shared_files.items():
            theirs = _text(files.get(name.encode(), mine.encode()))
            if theirs != mine:
                self.redis.close()
                raise BackendMismatch(
                    f"this node's {name} ({mine}) is not the one the other nodes use ({theirs[:60]}): {COPY_THE_FILES}"
                )

    def _record_node_files(self, client: redis.Redis | redis.client.Pipeline) -> None:
        """Record this node's cluster key id and shared files' ids where none are recorded yet."""
        client.set(CLUSTER_KEY_ID_KEY, self._key_id, nx=True)
        for name, mine in self._shared_files.items():
            client.hsetnx(NODE_FILES_KEY, name, mine)

    # ------------------------------------------------------------------ lifecycle

    def start(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber
        newest: Any = self.redis.xrevrange(f"{PREFIX}privates", "+", "-", count=1)
        self._private_feed_from = _text(newest[0][0]) if newest else "0-0"
        # With an empty feed, the ids given so far: a private line of a later gap has a higher one.
        self._private_feed_last_id = _feed_message_id(newest[0][1]) if newest else _whole(self.redis.get(f"{PREFIX}id"))
        newest = self.redis.xrevrange(CONTROL_KEY, "+", "-", count=1)
        self._control_from = _text(newest[0][0]) if newest else "0-0"
        self.redis.zadd(NODES_KEY, {self.node: self._clock()})  # live: its connections count on every node
        self._reader.start()
        self._refresher.start()

    def close(self) -> None:
        """Stop reading and refreshing, and take this process's sessions out of Redis: all within
        ``CLOSE_BUDGET`` seconds. A Redis that does not answer meanwhile is left to expire them."""
        give_up = time.monotonic() + CLOSE_BUDGET
        self._stopping.set()
        for thread in (self._reader, self._refresher):
            if thread.ident is not None:
                thread.join(timeout=max(0.0, give_up - time.monotonic()) / 2)
        with self._local_lock:
            local = list(self._local_sessions.values())
            self._local_sessions.clear()
            rooms = list(self._local_rooms)
            self._local_rooms.clear()

        def forget_this_process() -> None:  # its sessions go at once, not after SESSION_TTL
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for info in local:
                        pipe.hdel(self._sessions_key(info.account), info.session_id)
                    for room, session_id in rooms:
                        pipe.hdel(self._roster_key(room), session_id)
                    pipe.zrem(NODES_KEY, self.node)
                    pipe.execute()
            except redis.exceptions.RedisError:
                pass

        # On a thread of its own, so that a Redis that hangs (its socket timeout, then retries) cannot
        # hold up the stop: a daemon, left behind if it is still waiting when the budget is spent.
        forgetting = threading.Thread(target=forget_this_process, name="redis-goodbye", daemon=True)
        forgetting.start()
        forgetting.join(timeout=max(0.1, give_up - time.monotonic()))
        if not forgetting.is_alive():
            self.redis.close()

    def health(self) -> str:
        return self._problem or "ok"

    # ------------------------------------------------------------------ sealing

    def _associated_data(self, stream: str, message_id: int, sender: str) -> bytes:
        return b"chat-redis\0" + stream.encode() + b"\0" + str(message_id).encode() + b"\0" + sender.encode()

    def _seal(self, stream: str, message: RoomEvent, origin_session: str, ref: str) -> bytes:
        body = json.dumps(
            {"event": base64.b64encode(encode_event(message)).decode(), "origin": origin_session, "ref": ref}
        ).encode()
        return self._seal_bytes(body, self._associated_data(stream, message.id, _sender(message)))

    def _seal_bytes(self, plain: bytes, associated: bytes) -> bytes:
        """``plain`` sealed under the cluster key and bound to ``associated``: a fresh nonce, then AES-GCM's output."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plain, associated)

    def _open_bytes(self, sealed: bytes, associated: bytes) -> bytes:
        """What ``_seal_bytes`` sealed; ``InvalidTag`` if it was changed or bound to other data."""
        return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated)

    def _open(self, stream: str, message_id: int, fields: dict[Any, Any]) -> tuple[RoomEvent, str, str] | None:
        """The event, origin session and ref of an entry; None (logged) if it fails to open or its
        content is not what its place says (another id, stream or sender: a replayed or moved entry)."""
        if (why := self._not_ours(_text(fields.get(b"k", b"")))) is not None:
            log.warning("skipped a message in %s that failed to open (id %d): %s", stream, message_id, why)
            return None
        try:
            sender = _text(fields[b"from"])
            sealed = fields[b"p"]
            associated = self._associated_data(stream, message_id, sender)
            body = json.loads(self._open_bytes(sealed, associated))
            event = decode_event(base64.b64decode(body["event"]))
        except (KeyError, ValueError, TypeError, InvalidTag) as exc:
            why = _why_unopened(exc)
            log.warning("skipped a message in %s that failed to open (id %d): %s", stream, message_id, why)
            return None
        if event is None or event.id != message_id or _sender(event) != sender:
            log.warning("skipped a message in %s whose content does not match its place (id %d)", stream, message_id)
            return None
        return event, str(body.get("origin", "")), str(body.get("ref", ""))

    def _not_ours(self, entry_key_id: str) -> str | None:
        """Why something sealed under the key ``entry_key_id`` names cannot be opened with this
        process's key, if it names another; else None."""
        if entry_key_id == self._key_id:
            return None
        return (
            f"sealed under cluster key id {_shown_key_id(entry_key_id)}, which this node does not have"
            f" (its own is id {self._key_id})"
        )

    # ------------------------------------------------------------------ publishing

    def _propose_id(self) -> int:
        """An id for the next line: one above any this process knows of."""
        with self._id_lock:
            self._highest_id += 1
            return self._highest_id

    def _note_id(self, message_id: int, stream: str = "", seq: int = 0) -> None:
        with self._id_lock:
            self._highest_id = max(self._highest_id, message_id)
            if seq > self._seq_floor.get(stream, 0):
                self._seq_floor[stream] = seq

    def _seq_floor_of(self, stream: str) -> int:
        with self._id_lock:
            return self._seq_floor.get(stream, 0)

    def _publish(
        self,
        stream: str,
        message: RoomEvent,
        origin_session: str,
        ref: str,
        charge: LineCharge | None,
        private_to: str = "",
    ) -> RoomEvent:
        sender = _sender(message)
        budget = flood_key(charge.account if charge else sender)  # not touched without a charge
        keys = [self._stream_key(stream), f"{PREFIX}seq", f"{PREFIX}id", budget]
        if private_to:
            keys += [f"{PREFIX}privates", f"{PREFIX}pairs:{private_to}", f"{PREFIX}pairs:{sender}"]
        bound = max(self.history_limit, LIVE_FEED_LENGTH)
        message_id, reserved = self._propose_id(), False
        for _attempt in range(20):
            numbered = replace(message, id=message_id, sent_at=self._clock())
            sealed = self._seal(stream, numbered, origin_session, ref)
            args: list[Any] = [numbered.id, stream, bound, self._key_id, sealed]
            args += [private_to, sender, PRIVATE_FEED_LENGTH, "1" if reserved else "0"]
            args += [repr(self._clock()), charge.rate, charge.burst, charge.cost] if charge else ["", 0, 0, 0]
            args.append(0 if private_to else self._seq_floor_of(stream))
            try:
                seq, answer = (int(value) for value in self._append(keys=keys, args=args))
            except redis.exceptions.RedisError as exc:
                raise self._unavailable(exc) from None
            if seq == -2:  # the charge was more than the budget held: nothing was stored
                raise OverBudget(sender)
            if seq < 0:  # another process took that id, or numbered a later line of this stream first
                message_id, reserved = answer, True  # the id the script set aside for this line
                self._note_id(answer)
                continue
            if not private_to:
                self._note_id(message_id, stream, seq)
            return numbered if private_to else replace(numbered, seq=seq)
        raise BackendUnavailable("the line could not be numbered (too many at once); try again")

    def publish_room(
        self, room: str, message: RoomEvent, origin_session: str = "", ref: str = "", charge: LineCharge | None = None
    ) -> RoomEvent:
        """Number and append a room event; every process reading the room delivers it (this one too).
        ``OverBudget`` if ``charge`` is more than its account's flood budget holds (nothing is stored)."""
        numbered = self._publish(room, replace(message, room=room), origin_session, ref, charge)
        if isinstance(numbered, Chat):
            self._deliver_at_once(room, numbered, origin_session, ref)
        return numbered

    def _deliver_at_once(self, room: str, line: Chat, origin_session: str, ref: str) -> None:
        """Hand this process's own line to its sessions now, not after the reader reads it back (a
        round trip to Redis and a thread's wake-up later); only when every earlier event of the room
        was handed over already, so that every member still sees the room in one order. Else the
        reader delivers it, in its turn."""
        subscriber = self._subscriber
        if subscriber is None:
            return
        with self._delivery_lock:
            if self._last_seq.get(room) != line.seq - 1:
                return
            self._last_seq[room] = line.seq
            self._delivered_id[room] = line.id
            with _guarded(f"a line of {room}"):
                subscriber.on_room_event(room, line, origin_session, ref)

    def publish_private(
        self, message: Chat, origin_session: str = "", ref: str = "", charge: LineCharge | None = None
    ) -> Chat:
        stream = private_stream(message.sender, message.recipient)
        private = replace(message, private=True, room="", seq=0)
        numbered = self._publish(stream, private, origin_session, ref, charge, private_to=message.recipient)
        assert isinstance(numbered, Chat)
        return numbered

    # ------------------------------------------------------------------ reading

    def watch(self, room: str, after_id: int, generation: int) -> None:
        """Deliver ``room``'s events after ``after_id`` (and every later one) to the subscriber.

        A newer ``generation`` of a room already watched starts it afresh from ``after_id``: the hub
        made a new local room, which has what came before. An older one than any seen is ignored.
        """
        key = self._stream_key(room)
        start = f"{after_id}-1" if after_id else "0-0"
        if not after_id and self.history_limit <= 0:  # no history: what the stream holds is not news
            newest = self._call(self.redis.xrevrange, key, "+", "-", count=1)
            start = _text(newest[0][0]) if newest else "0-0"
        # The room's place where reading starts: lines trimmed past it before they are read show as a
        # gap in the numbering (a kick may be among them). Unknown if it starts at old lines.
        if start == "0-0":
            first_seq = None if self._call(self.redis.exists, key) else 0
        else:
            at_start = self._call(self.redis.xrange, key, start, start)
            first_seq = _seq_of(at_start[0][1]) or None if at_start else None
        newest_news = self._call(self.redis.xrevrange, self._presence_key(room), "+", "-", count=1)
        with self._watch_lock:
            if generation <= self._generations.get(room, 0):
                return  # a later making of the room was watched or retired already
            self._generations[room] = self._watching[room] = generation
            self._watched[room] = start
            self._presence_from[room] = _text(newest_news[0][0]) if newest_news else "0-0"
        with self._delivery_lock:  # what an earlier watch of the room handed over is not this one's
            self._delivered_id[room] = after_id
            if first_seq is None:
                self._last_seq.pop(room, None)
            else:
                self._last_seq[room] = first_seq

    def unwatch(self, room: str, generation: int) -> None:
        """Stop reading ``room`` (nobody here is in it any more), unless a later making of it is read."""
        with self._watch_lock:
            self._generations[room] = max(self._generations.get(room, 0), generation)
            if self._watching.get(room) != generation:
                return
            del self._watching[room]
            self._watched.pop(room, None)
            self._presence_from.pop(room, None)
        with self._delivery_lock:
            self._delivered_id.pop(room, None)
            self._last_seq.pop(room, None)

    def _read_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._read_until_stopped()
            except Exception:  # a bug, not Redis: logged, and reading goes on after a pause
                if self._stopping.is_set():
                    # close() gave up waiting for a read and closed the connections under it: the Redis
                    # client then fails in its own ways (an AttributeError on a buffer it dropped).
                    return
                log.exception("the Redis reader failed; it starts again")
                self._stopping.wait(1.0)

    def _read_until_stopped(self) -> None:
        delay = 0.0
        while not self._stopping.is_set():
            if self._reconnected.is_set():  # a new connection: the Redis behind it may have lost data
                self._reconnected.clear()
                try:
                    if not self.redis.exists(CLUSTER_KEY_ID_KEY):  # before anything puts it back
                        self._say_redis_lost_its_data()
                except redis.exceptions.RedisError as exc:
                    self._note_problem(exc)
                self._restore_floors(self.redis)
            with self._watch_lock:
                streams: dict[str, str] = {self._stream_key(room): last for room, last in self._watched.items()}
                streams.update((self._presence_key(room), last) for room, last in self._presence_from.items())
            streams[f"{PREFIX}privates"] = self._private_feed_from
            streams[CONTROL_KEY] = self._control_from
            try:
                replies: Any = self.redis.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS)  # type: ignore[arg-type]
            except redis.exceptions.RedisError as exc:
                self._note_problem(exc)
                delay = min(2.0, max(0.1, delay * 2))
                self._stopping.wait(delay * random.uniform(0.5, 1.0))  # backoff with jitter
                continue
            now = time.monotonic()
            # Before this read is handed over, from where the reader was: held up, back from an
            # outage, behind by a full read, or a while since it last looked.
            look_for_gaps = bool(delay) or now - self._last_read > READER_STALL + READ_BLOCK_MS / 1000
            look_for_gaps = look_for_gaps or now - self._gaps_checked > GAP_CHECK_INTERVAL
            look_for_gaps = look_for_gaps or any(len(entries) >= READ_COUNT for _, entries in replies or [])
            self._last_read = now
            if delay:
                log.info("the link to Redis is back")
                self._problem, delay = "", 0.0
            if look_for_gaps:
                try:
                    self._catch_up_on_feed_gaps()
                except redis.exceptions.RedisError as exc:
                    self._note_problem(exc)  # looked at again after the next read
            for key, entries in replies or []:
                key_text = _text(key)
                if key_text == f"{PREFIX}privates":
                    self._deliver_privates(entries)
                elif key_text == CONTROL_KEY:
                    self._apply_control(entries)
                elif key_text.startswith(f"{PREFIX}presence:"):
                    self._deliver_presence(key_text[len(f"{PREFIX}presence:") :], entries)
                else:
                    self._deliver_room(key_text[len(f"{PREFIX}stream:") :], entries)

    def _catch_up_on_feed_gaps(self) -> None:
        """If the control stream or the private feed was trimmed past where the reader is, make up for
        what it never read: revocations and accounts are read again, private lines from history.

        A room's gap shows in its sequence numbers (``_deliver_room_entry``); these feeds have none,
        but are trimmed only from their oldest end: an oldest entry newer than the last one read says
        entries were lost in between (or, at worst, that the last one read is gone: then nothing was).
        Run by the reader, which owns the positions.
        """
        self._gaps_checked = time.monotonic()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(CONTROL_KEY, "-", "+", count=1)
            pipe.xrange(f"{PREFIX}privates", "-", "+", count=1)
            control_oldest, privates_oldest = pipe.execute()
        subscriber = self._subscriber
        if _trimmed_past(control_oldest, self._control_from):
            log.warning("this process fell behind the control stream: reading revocations and accounts again")
            self._control_from = _just_before(control_oldest[0][0])
            self._forget_state(None)
            if self._on_revoked is not None:
                for session_id, until in self.live().items():
                    self._on_revoked(session_id, until)
            if subscriber is not None:
                with _guarded("catching up on the control stream"):
                    subscriber.on_control_missed()
        if _trimmed_past(privates_oldest, self._private_feed_from):
            before_id = _feed_message_id(privates_oldest[0][1])
            log.warning("this process fell behind the private lines' feed: reading them from history")
            self._private_feed_from = _just_before(privates_oldest[0][0])
            if subscriber is not None:
                with _guarded("catching up on private lines"):
                    subscriber.on_privates_missed(self._private_feed_last_id, before_id)

    def _deliver_room(self, room: str, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            with self._watch_lock:
                position = self._watched.get(room)
                if position is None or _stream_order(entry_id) <= _stream_order(position):
                    return  # unwatched, or watched afresh from a later entry, while this was read
                self._watched[room] = _text(entry_id)
            with _guarded(f"a line of {room}"):
                self._deliver_room_entry(room, _message_id(entry_id), fields)

    def _deliver_room_entry(self, room: str, message_id: int, fields: dict[Any, Any]) -> None:
        subscriber = self._subscriber
        with self._delivery_lock:
            if subscriber is None or message_id <= self._delivered_id.get(room, 0):
                return  # handed over at once by the thread that published it
        opened = self._open(room, message_id, fields)
        if opened is None:
            return
        seq = _seq_of(fields)
        self._note_id(message_id, room, seq)  # once it opened: a forged entry may not raise the floors
        event, origin, ref = opened
        if event.sent_at < self._clock() - self.history_max_age:
            return  # older than history keeps: not news either
        event = replace(event, seq=seq)
        with self._delivery_lock:
            if message_id <= self._delivered_id.get(room, 0):
                return  # its publisher handed it over meanwhile
            last = self._last_seq.get(room)
            # (A publisher hands nothing over past a gap: its line is not the next after the last.)
            missed = seq - last - 1 if last is not None and seq > last + 1 else 0
        if missed:
            log.warning("%d lines of %s were trimmed before this process could read them", missed, room)
            # Outside the lock: the hub asks the backend who is still in the room (a kick may be lost).
            with _guarded(f"the lines {room} lost"):
                subscriber.on_room_gap(room, missed)
        with self._delivery_lock:
            if message_id <= self._delivered_id.get(room, 0):
                return  # its publisher handed it over meanwhile
            self._delivered_id[room] = message_id
            if isinstance(event, Chat):
                self._last_seq[room] = seq
                subscriber.on_room_event(room, event, origin, ref)
                return
            self._last_seq[room] = seq - 1  # not yet: nothing after it may be handed over before it
        # A notice may do more than queue (a kick removes sessions, with Redis calls): handed over
        # with no lock held. Until it is counted as delivered, the publishers' lines wait for the
        # reader, so the order holds.
        try:
            subscriber.on_room_event(room, event, origin, ref)
        finally:  # handed over even if the hub failed on it: else the next line would look like a gap
            with self._delivery_lock:  # nothing else moved it meanwhile: it waited for this
                self._last_seq[room] = seq

    def _deliver_privates(self, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            if _stream_order(entry_id) <= _stream_order(self._private_feed_from):
                continue  # read from history already, after a gap (_catch_up_on_feed_gaps)
            self._private_feed_from = _text(entry_id)
            self._private_feed_last_id = _feed_message_id(fields) or self._private_feed_last_id
            with _guarded("a private line"):
                self._deliver_private_entry(fields)

    def _deliver_private_entry(self, fields: dict[Any, Any]) -> None:
        subscriber = self._subscriber
        if subscriber is None:
            return
        message_id = _feed_message_id(fields)
        if not message_id or b"stream" not in fields:
            return
        opened = self._open(_text(fields[b"stream"]), message_id, fields)
        if opened is None:
            return
        self._note_id(message_id)  # once it opened: a forged entry may not raise the floor of the ids
        message, origin, ref = opened
        if not isinstance(message, Chat):
            return
        subscriber.on_private(message.recipient, message, origin, ref)
        if message.sender != message.recipient:
            subscriber.on_private(message.sender, message, origin, ref)

    def _deliver_presence(self, room: str, entries: list[Any]) -> None:
        subscriber = self._subscriber
        for entry_id, fields in entries:
            with self._watch_lock:
                position = self._presence_from.get(room)
                if position is None or _stream_order(entry_id) <= _stream_order(position):
                    return  # unwatched, or watched afresh, while this was read
                self._presence_from[room] = _text(entry_id)
            node = _text(fields.get(b"node", b""))
            if node == self.node or subscriber is None:
                continue  # this process told its own members already
            with _guarded(f"news of {room}"):
                notice = self._open_presence(room, node, fields)
                if notice is not None:
                    subscriber.on_presence(room, notice)

    def _apply_control(self, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            self._control_from = _text(entry_id)
            with _guarded("a control message"):
                if b"revoked" in fields and self._on_revoked is not None:
                    self._on_revoked(_text(fields[b"revoked"]), _whole(fields.get(b"until", 0)))
                elif b"account" in fields and self._subscriber is not None:
                    self._subscriber.on_account_changed(_text(fields[b"account"]))
                elif b"told" in fields and self._subscriber is not None:
                    account = _text(fields[b"told"])
                    notice = self._open_told(account, fields)
                    if notice is not None:
                        self._subscriber.on_account_notice(account, notice)
                elif b"state" in fields:
                    self._forget_state(_text(fields[b"state"]))

    # ------------------------------------------------------------------ rooms on other processes

    def _presence_key(self, room: str) -> str:
        return f"{PREFIX}presence:{room}"

    def _roster_key(self, room: str) -> str:
        return f"{PREFIX}roster:{room}"

    def _roster_entry(self, account: str) -> str:
        return json.dumps({"account": account, "node": self.node, "expires": self._clock() + SESSION_TTL})

    def enter_room(self, room: str, account: str, session_id: str) -> None:
        with self._local_lock:
            self._local_rooms[(room, session_id)] = account
        self._call(self.redis.hset, self._roster_key(room), session_id, self._roster_entry(account))

    def leave_room(self, room: str, account: str, session_id: str) -> bool:
        with self._local_lock:
            self._local_rooms.pop((room, session_id), None)
        try:
            args: list[str | float] = [session_id, account, self.node, self._clock()]
            return bool(self._leave_room(keys=[self._roster_key(room)], args=args))
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)  # it expires by itself within SESSION_TTL
            return False

    def members_elsewhere(self, room: str) -> dict[str, int]:
        """Accounts in ``room`` through other processes, with how many sessions each (live ones only)."""
        try:
            entries = self.redis.hgetall(self._roster_key(room))
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)
            return {}
        now = self._clock()
        counts: dict[str, int] = {}
        for value in entries.values():
            try:
                data = json.loads(value)
                account, node, expires = data["account"], data.get("node"), float(data.get("expires", 0))
            except (ValueError, TypeError, KeyError):
                continue  # damaged: the next sweep takes it out
            if isinstance(account, str) and node != self.node and expires >= now:
                counts[account] = counts.get(account, 0) + 1
        return counts

    def announce(self, room: str, notice: Notice) -> None:
        """Tell the other processes' members of ``room`` that someone joined or left (sealed: a
        parting reason is the user's text)."""
        sealed = self._seal_bytes(encode_event(notice), self._associated_data(f"presence:{room}", 0, self.node))
        fields: dict[str | bytes, str | bytes] = {"node": self.node, "k": self._key_id, "p": sealed}
        try:
            self.redis.xadd(
                self._presence_key(room),
                fields,  # type: ignore[arg-type]
                maxlen=PRESENCE_STREAM_LENGTH,
                approximate=True,
            )
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)  # presence news is lost, not the presence: /who still tells

    def _open_presence(self, room: str, node: str, fields: dict[Any, Any]) -> Notice | None:
        if (why := self._not_ours(_text(fields.get(b"k", b"")))) is not None:
            log.warning("skipped presence news of %s that failed to open: %s", room, why)
            return None
        try:
            sealed = fields[b"p"]
            associated = self._associated_data(f"presence:{room}", 0, node)
            event = decode_event(self._open_bytes(sealed, associated))
        except (KeyError, ValueError, InvalidTag) as exc:
            log.warning("skipped presence news of %s that failed to open: %s", room, _why_unopened(exc))
            return None
        if not isinstance(event, Notice) or event.event not in ("joined", "left") or event.room != room:
            return None
        return event

    # ------------------------------------------------------------------ shared revocations

    def revoke(self, session_id: str, until: int) -> bool:
        """Revoke a session for every process; False if one already had. ``OSError`` if Redis cannot say."""
        try:
            keys = [f"{PREFIX}revoked", CONTROL_KEY, f"{PREFIX}revoker:{session_id}"]
            nonce = uuid.uuid4().hex
            return bool(self._revoke(keys=keys, args=[session_id, until, CONTROL_STREAM_LENGTH, nonce]))
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)
            raise OSError(f"Redis: {exc}") from None

    def live(self) -> dict[str, int]:
        entries = self._call(self.redis.zrangebyscore, f"{PREFIX}revoked", int(self._clock()), "+inf", withscores=True)
        return {_text(session_id): int(until) for session_id, until in entries}

    def subscribe(self, on_revoked: Callable[[str, int], None]) -> None:
        self._on_revoked = on_revoked

    def account_changed(self, account: str) -> None:
        """Tell every process (this one too) to reload ``account``'s own state."""
        fields: Any = {"account": account}
        self._call(self.redis.xadd, CONTROL_KEY, fields, maxlen=CONTROL_STREAM_LENGTH, approximate=True)

    def tell_account(self, account: str, notice: Notice) -> None:
        """Hand ``notice`` to ``account``'s sessions on every process (this one too), sealed: it names
        a room and who acted, and may one day carry the user's words."""
        sealed = self._seal_bytes(encode_event(notice), self._associated_data(f"told:{account}", 0, ""))
        fields: Any = {"told": account, "k": self._key_id, "p": sealed}
        self._call(self.redis.xadd, CONTROL_KEY, fields, maxlen=CONTROL_STREAM_LENGTH, approximate=True)

    def claim(self, key: str, seconds: float) -> bool:
        """True if no process claimed ``key`` within ``seconds``; ``BackendUnavailable`` if Redis cannot say."""
        claimed = self._call(self.redis.set, f"{PREFIX}claim:{key}", "1", nx=True, px=max(1, int(seconds * 1000)))
        return bool(claimed)

    def _open_told(self, account: str, fields: dict[Any, Any]) -> Notice | None:
        why = self._not_ours(_text(fields.get(b"k", b"")))
        if why is None:
            try:
                event = decode_event(self._open_bytes(fields[b"p"], self._associated_data(f"told:{account}", 0, "")))
            except (KeyError, ValueError, InvalidTag) as exc:
                why = _why_unopened(exc)
            else:
                return event if isinstance(event, Notice) else None
        log.warning("skipped a notice for %s that failed to open: %s", account, why)
        return None

    # ------------------------------------------------------------------ presence

    def _sessions_key(self, account: str) -> str:
        return f"{PREFIX}sessions:{account}"

    def _session_json(self, info: SessionInfo) -> str:
        """A session's record in Redis: when it expires in clear (the add script drops expired ones),
        the rest sealed under the cluster key, for the device's address and away message are the
        user's, not Redis's. Bound to its account and session id: it cannot be moved to another."""
        body = json.dumps({**asdict(info), "node": self.node}).encode()
        sealed = self._seal_bytes(body, _session_data(info.account, info.session_id))
        return json.dumps(
            {"expires": self._clock() + SESSION_TTL, "k": self._key_id, "sealed": base64.b64encode(sealed).decode()}
        )

    def _session_from_json(self, account: str, session_id: str, value: bytes | str) -> SessionInfo | None:
        """A live session's record, opened; None if it expired or does not open (logged)."""
        try:
            record = json.loads(value)
            if float(record["expires"]) < self._clock():
                return None
            if (why := self._not_ours(str(record.get("k", "")))) is not None:
                log.warning("skipped a session record of %s that failed to open: %s", account, why)
                return None
            body = json.loads(self._open_bytes(base64.b64decode(record["sealed"]), _session_data(account, session_id)))
            body.pop("node", None)
            return SessionInfo(**body)
        except (KeyError, ValueError, TypeError, AttributeError, InvalidTag) as exc:
            log.warning("skipped a session record of %s that failed to open: %s", account, _why_unopened(exc))
            return None

    def add_session(self, info: SessionInfo, limit: int) -> int:
        try:
            count = int(
                self._add_session(
                    keys=[self._sessions_key(info.account)],
                    args=[info.session_id, self._session_json(info), self._clock(), limit],
                )
            )
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None
        if count < 0:
            raise BackendLimit(f"{info.account} already has {limit} sessions, the most allowed")
        with self._local_lock:
            self._local_sessions[(info.account, info.session_id)] = info
        return count

    def remove_session(self, account: str, session_id: str) -> int:
        with self._local_lock:
            self._local_sessions.pop((account, session_id), None)
        try:
            self.redis.hdel(self._sessions_key(account), session_id)
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)  # it expires by itself within SESSION_TTL
        return len(self.sessions(account))

    def sessions(self, account: str) -> list[SessionInfo]:
        try:
            entries = self.redis.hgetall(self._sessions_key(account))
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)
            with self._local_lock:  # what this process knows of
                return [info for (name, _), info in self._local_sessions.items() if name == account]
        infos = [self._session_from_json(account, _text(session_id), value) for session_id, value in entries.items()]
        return sorted((info for info in infos if info is not None), key=lambda info: info.since)

    def update_session(self, account: str, session_id: str, **changes: object) -> None:
        with self._local_lock:
            info = self._local_sessions.get((account, session_id))
            if info is None:
                return
            info = self._local_sessions[(account, session_id)] = replace(info, **changes)  # type: ignore[arg-type]
        if set(changes) == {"active"}:
            return  # idle time is refreshed with the presence, not written for every line
        try:
            self.redis.hset(self._sessions_key(account), session_id, self._session_json(info))
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)

    def _refresh_loop(self) -> None:
        while not self._stopping.wait(SESSION_REFRESH):
            try:
                self._refresh()
            except Exception:  # a bug, not Redis: this thread must go on, or this node's users lapse
                log.exception("refreshing this process's presence in Redis failed; it goes on")

    def _refresh(self) -> None:
        """Keep this process's sessions, roster entries and heartbeat alive; sweep what lapsed."""
        with self._local_lock:
            local = list(self._local_sessions.values())
            rooms = list(self._local_rooms.items())
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(CLUSTER_KEY_ID_KEY)  # first: what is put back below is gone only if Redis lost it
                for info in local:
                    pipe.hset(self._sessions_key(info.account), info.session_id, self._session_json(info))
                for (room, session_id), account in rooms:
                    pipe.hset(self._roster_key(room), session_id, self._roster_entry(account))
                pipe.zremrangebyscore(f"{PREFIX}revoked", "-inf", int(self._clock()))  # expired ones
                pipe.zadd(NODES_KEY, {self.node: self._clock()})
                pipe.zremrangebyscore(NODES_KEY, "-inf", self._clock() - 10 * SESSION_TTL)  # long dead
                self._restore_floors(pipe)
                pipe.get(CLUSTER_KEY_ID_KEY)  # after _restore_floors put it back if it was lost
                answers = pipe.execute()
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)
            return
        if not answers[0]:
            self._say_redis_lost_its_data()
        self._check_recorded_key(answers[-1])
        self._sweep_rosters()

    def _sweep_rosters(self) -> None:
        """Tell the rooms read here who left with a node that died (kill -9, a lost machine): its
        roster entries lapse, but nobody said "left" for them. Run by the refresher thread."""
        with self._watch_lock:
            rooms = list(self._watched)
        subscriber = self._subscriber
        if not rooms or subscriber is None:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:  # one round trip, however many rooms
                for room in rooms:
                    keys = [self._roster_key(room), f"{PREFIX}swept:{room}"]
                    self._sweep_roster(
                        keys=keys, args=[self._clock(), max(1, round(SESSION_REFRESH)), 2 * SESSION_TTL], client=pipe
                    )
                answers = pipe.execute()
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)
            return
        for room, gone in zip(rooms, answers, strict=True):
            if gone:
                with _guarded(f"who left {room}"):
                    subscriber.on_members_gone(room, [_text(account) for account in gone])

    def _check_recorded_key(self, recorded: bytes | None) -> None:
        """Say loudly if Redis names another cluster key than this process's. After Redis lost its
        data, a node with another key may have started in the moment before this one recorded its
        own again: the two hear nothing of each other's users, and only this can tell. Run by the
        refresher thread alone (it owns ``_foreign_key_id``)."""
        if recorded is None or _text(recorded) == self._key_id:
            self._foreign_key_id = ""
            return
        shown = _shown_key_id(recorded)
        if shown != self._foreign_key_id:  # once, not every refresh
            log.error(
                "Redis names cluster key id %s, not this node's cluster_key (id %s): the nodes holding"
                " the other key do not hear this node's users, nor it theirs; give every node the same"
                " cluster_key and restart the others",
                shown,
                self._key_id,
            )
        self._foreign_key_id = shown

    def _say_redis_lost_its_data(self) -> None:
        """Log that Redis holds none of what every node records (the cluster key's id): it restarted
        without its data, or was flushed. The reader (on a new connection) and the refresher both
        look; one of them puts the record back, so this is said once a loss, or twice at worst."""
        now = time.monotonic()
        if now - self._loss_told_at > SESSION_TTL:
            self._loss_told_at = now
            log.error(
                "Redis came back without its data (restarted without persistence, or flushed): history,"
                " rooms and sessions are gone, and accounts kept there too (nobody can log in); restore"
                " Redis from a backup, or the accounts with: python server.py import-users FILE --backend URL"
            )

    def _restore_floors(self, client: redis.Redis | redis.client.Pipeline) -> None:
        """Raise Redis's message counter and the sequence numbers of the rooms this process has seen
        to at least what it has seen of them (``_RAISE_FLOORS``): they are lower only if Redis lost
        data. (A line this process appends meanwhile is numbered above them by the append script.)
        The cluster key's id, lost with them, is recorded again too."""
        with self._id_lock:
            args: list[Any] = [self._highest_id]
            for room, seq in self._seq_floor.items():
                args += [room, seq]
        try:
            # Lost with the rest: put back, so that a process with another key is still refused.
            self._record_node_files(client)
            self._raise_floors(keys=[f"{PREFIX}id", f"{PREFIX}seq"], args=args, client=client)
        except redis.exceptions.RedisError as exc:
            self._note_problem(exc)  # the refresher tries again within SESSION_REFRESH

    # ------------------------------------------------------------------ room state

    def room(self, name: str) -> RoomRecord | None:
        values = self._call(self.redis.hgetall, f"{PREFIX}room:{name}")
        return _record(name, values) if values else None

    def rooms(self) -> list[RoomRecord]:
        names = sorted(_text(name) for name in self._call(self.redis.smembers, f"{PREFIX}rooms"))
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(f"{PREFIX}room:{name}")
            values = self._call(pipe.execute)
        return [_record(name, value) for name, value in zip(names, values, strict=True) if value]

    def create_room(self, record: RoomRecord, limit: int) -> bool:
        created = int(
            self._call(
                self._create_room,
                keys=[f"{PREFIX}room:{record.name}", f"{PREFIX}rooms"],
                args=[record.name, record.topic, record.owner, record.created_at, limit],
            )
        )
        if created < 0:
            raise BackendLimit(f"the server has {limit} rooms, the most allowed")
        return created == 1

    def set_topic(self, name: str, topic: str) -> None:
        if self._call(self.redis.exists, f"{PREFIX}room:{name}"):
            self._call(self.redis.hset, f"{PREFIX}room:{name}", "topic", topic)

    def memberships(self, account: str) -> list[str]:
        return [_text(room) for room in self._call(self.redis.zrange, f"{PREFIX}memberships:{account}", 0, -1)]

    def add_membership(self, account: str, room: str) -> None:
        self._call(self.redis.zadd, f"{PREFIX}memberships:{account}", {room: self._clock()}, nx=True)

    def remove_membership(self, account: str, room: str) -> None:
        self._call(self.redis.zrem, f"{PREFIX}memberships:{account}", room)

    def state(self, scope: str) -> dict[str, str]:
        now = time.monotonic()
        with self._state_lock:
            cached = self._state_cache.get(scope)
            if cached is not None and now - cached[0] < STATE_CACHE_SECONDS:
                return dict(cached[1])
            generation = self._state_generation
        values = self._call(self.redis.hgetall, f"{PREFIX}state:{scope}")
        state = {_text(key): _text(value) for key, value in values.items()}
        with self._state_lock:
            if generation == self._state_generation:  # no change was told while it was read
                if len(self._state_cache) > 10_000:  # a bound: the next reads fill it again
                    self._state_cache.clear()
                self._state_cache[scope] = (now, state)
        return dict(state)

    def set_state(self, scope: str, key: str, value: str | None) -> None:
        """Change one key of a scope's state; every process (this one too) drops what it cached of it."""
        fields: Any = {"state": scope}
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                if value is None:
                    pipe.hdel(f"{PREFIX}state:{scope}", key)
                else:
                    pipe.hset(f"{PREFIX}state:{scope}", key, value)
                pipe.xadd(CONTROL_KEY, fields, maxlen=CONTROL_STREAM_LENGTH, approximate=True)
                pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None
        finally:
            self._forget_state(scope)

    def replace_state(self, scope: str, key: str, expected: str | None, value: str | None) -> bool:
        keys = [f"{PREFIX}state:{scope}", CONTROL_KEY]
        try:
            args: list[str | int] = [key, expected or "", value or "", CONTROL_STREAM_LENGTH, scope]
            return bool(self._replace_state(keys=keys, args=args))
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None
        finally:
            self._forget_state(scope)  # changed, or not what was read: read again either way

    def _forget_state(self, scope: str | None) -> None:
        """Drop what is cached of ``scope``'s state (None: of every scope's)."""
        with self._state_lock:
            if scope is None:
                self._state_cache.clear()
            else:
                self._state_cache.pop(scope, None)
            self._state_generation += 1

    # ------------------------------------------------------------------ history

    def _stream_key(self, stream: str) -> str:
        return f"{PREFIX}stream:{stream}"

    def _events(self, stream: str, entries: list[Any]) -> list[RoomEvent]:
        if self.history_limit <= 0:
            return []  # history is off: the streams are only the live feed
        oldest = self._clock() - self.history_max_age
        events: list[RoomEvent] = []
        for entry_id, fields in entries:
            opened = self._open(stream, _message_id(entry_id), fields)
            if opened is None:
                continue
            event, seq = opened[0], _seq_of(fields)
            private = isinstance(event, Chat) and event.private
            # What a user was shown counts as seen: after a loss of Redis's data, it is not numbered again.
            self._note_id(event.id, "" if private else stream, 0 if private else seq)
            if event.sent_at < oldest:
                continue
            if not private:
                event = replace(event, seq=seq)
            events.append(event)
        return events

    def recent(self, room: str, limit: int) -> list[RoomEvent]:
        if limit <= 0:
            return []
        entries = self._call(self.redis.xrevrange, self._stream_key(room), "+", "-", count=limit)
        return self._events(room, list(reversed(entries)))

    def history_before(self, room: str, before_id: int, limit: int) -> list[RoomEvent]:
        entries = self._call(self.redis.xrevrange, self._stream_key(room), f"{before_id}-0", "-", count=limit)
        return self._events(room, list(reversed(entries)))

    def history_since(
        self, room: str, after_id: int, limit: int, after_seq: int | None = None
    ) -> tuple[list[RoomEvent], int]:
        key = self._stream_key(room)
        if after_seq is not None:
            # By the room's own numbering: an id is taken before its line is appended, so a lower
            # id may land in this room after a higher one elsewhere that the device already saw.
            # Sequence numbers rise with the stream; the lines after after_seq are its newest.
            newest = self._call(self.redis.xrevrange, key, "+", "-", count=max(limit, 0))
            after = [entry for entry in newest if _seq_of(entry[1]) > after_seq]
            return self._events(room, list(reversed(after))), 0  # what is beyond: the seq gap tells
        newer = self._call(self.redis.xrevrange, key, "+", f"{after_id + 1}-0", count=max(limit, 0))
        over = 0
        if len(newer) >= limit and newer:
            oldest_returned = _message_id(newer[-1][0])
            over = len(self._call(self.redis.xrange, key, f"{after_id + 1}-0", f"{oldest_returned}-0"))
        return self._events(room, list(reversed(newer))), over

    def private_since(self, account: str, after_id: int, limit: int) -> list[Chat]:
        """The account's private lines numbered after ``after_id``, and those a little before it.

        An id is taken before its line is appended, and when a process's proposal loses it appends
        with an id set aside for it: a private line can land after a higher one was read (a room's
        catch-up goes by its sequence numbers instead). So this looks ``PRIVATE_LOOK_BACK`` ids
        further back; the client shows no private line twice.
        """
        lower = max(0, after_id - PRIVATE_LOOK_BACK) if after_id else 0
        pairs = sorted(_text(stream) for stream in self._call(self.redis.smembers, f"{PREFIX}pairs:{account}"))
        found: list[RoomEvent] = []
        for stream in pairs:
            entries = self._call(
                self.redis.xrevrange, self._stream_key(stream), "+", f"{lower + 1}-0", count=max(limit, 0)
            )
            found += self._events(stream, list(reversed(entries)))
        chats = sorted((event for event in found if isinstance(event, Chat)), key=lambda event: event.id)
        return chats[-limit:] if limit > 0 else []

    def private_recent(self, account: str, limit: int) -> list[Chat]:
        return self.private_since(account, 0, limit)

    # ------------------------------------------------------------------ errors

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: redis.exceptions.RedisError) -> BackendUnavailable:
        """What a user (or the start) is told of a Redis call that failed, once it is logged: that the broker
        cannot be reached, unless Redis answered and refused (it is full, or its user may not run a command)."""
        self._note_problem(exc)
        refused = _what_redis_refused(exc)
        if refused:
            return BackendUnavailable(f"the server's message broker (Redis) {refused}: tell the server's operator")
        return BackendUnavailable("the server cannot reach its message broker just now")

    def _note_problem(self, exc: Exception) -> None:
        problem = f"Redis: {type(exc).__name__}: {exc}"
        if problem != self._problem:
            log.error("%s", problem)  # once per kind of failure, not once per line
        self._problem = problem


@contextlib.contextmanager
def _guarded(what: str) -> Iterator[None]:
    """Whatever one entry does wrong is logged and skipped: the reader thread must never die, or
    this process would stop hearing every room, revocation and ban."""
    try:
        yield
    except Exception:
        log.exception("the Redis reader skipped %s it could not handle", what)


def _why_unopened(exc: Exception) -> str:
    """Why an entry under this process's key failed to open, in words that hold nothing of it (an
    exception's own text might quote the payload)."""
    if isinstance(exc, InvalidTag):
        return "its seal does not verify (changed, or moved from another stream, id or sender)"
    if isinstance(exc, KeyError):
        return "a field is missing"
    return f"its content is malformed ({type(exc).__name__})"


def _shown_key_id(value: bytes | str) -> str:
    """A key id read from Redis, fit for a log line: a key id is 8 hex digits; anything else is not shown."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if not text:
        return "(none)"
    return text if len(text) <= 16 and all(c in "0123456789abcdef" for c in text) else "(not a key id)"


def _sender(message: RoomEvent) -> str:
    return message.sender if isinstance(message, Chat) else message.name


def _record(name: str, values: dict[Any, Any]) -> RoomRecord:
    try:
        created_at = float(values.get(b"created_at", 0))
    except ValueError:  # damaged: a room made at an unknown time
        created_at = 0.0
    return RoomRecord(
        name,
        topic=_text(values.get(b"topic", b"")),
        owner=_text(values.get(b"owner", b"")),
        created_at=created_at if math.isfinite(created_at) else 0.0,
    )


def _shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return hide_password(url)
