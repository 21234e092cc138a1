"""Accounts: the user store, password hashing, login throttling and tokens.

No sockets here. The store is a JSON file written atomically under a file lock;
passwords are kept only as Argon2id hashes in PHC form (parameters included);
tokens are HS256 JWTs bound to the client's public key (RFC 7800 ``cnf``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jwt
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securechat.crypto_utils import CryptoError, InsecureFileError, check_not_writable_by_others, check_owner_only
from securechat.group_writer import GroupWriter
from securechat.protocol import validate_username

log = logging.getLogger("chat.accounts")

STORE_FORMAT = 1

# OWASP Password Storage Cheat Sheet, Argon2id: 19 MiB of memory, 2 passes, 1 lane.
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_ITERATIONS = 2
ARGON2_LANES = 1
SALT_SIZE = 16
HASH_SIZE = 32
#: A stored hash asking for more than these is refused rather than run (a tampered store
#: must not be able to stall every login).
MAX_HASH_MEMORY_KIB = 1024 * 1024
MAX_HASH_ITERATIONS = 10
MAX_HASH_LANES = 8
MAX_PASSWORD_CHARS = 1024
#: NIST SP 800-63B (5.1.1.2): a new password has at least 8 characters, and no composition rules.
MIN_PASSWORD_CHARS = 8
#: The zxcvbn score (0 to 4) a new password needs: 2 is "safe from throttled online guessing",
#: below it a common password or a small variation of one.
MIN_PASSWORD_SCORE = 2
#: zxcvbn refuses longer input (its cost grows with length); a longer password is at least as
#: hard to guess as its first characters, so those are what it judges.
MAX_SCORED_PASSWORD_CHARS = 72

TOKEN_ALGORITHM = "HS256"
TOKEN_ISSUER = "chat-server"
TOKEN_CLAIMS = ("sub", "iat", "exp", "jti", "sid", "cnf", "iss", "acct")
DEFAULT_TOKEN_TTL = 12 * 3600
#: How long a device token lets its device skip the account-wide login delay.
DEVICE_TOKEN_TTL = 90 * 24 * 3600
DEVICE_TOKEN_CLAIMS = ("sub", "iat", "exp", "jti", "iss", "acct", "typ")
#: The revocation journal is compacted once it holds this many lines and twice the live ones.
MIN_JOURNAL_LINES = 1000
#: Expired revocations a compaction forgets per hold of the lock that every token check takes.
FORGET_BATCH = 1000


class UserStoreError(Exception):
    """The user store cannot be read or written. The message names the file and why."""


# --------------------------------------------------------------------------- passwords


def hash_password(password: str) -> str:
    """Hash a password with Argon2id at OWASP's parameters; returns the PHC string."""
    if not password:
        raise ValueError("the password is empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"passwords are at most {MAX_PASSWORD_CHARS} characters")
    kdf = Argon2id(
        salt=secrets.token_bytes(SALT_SIZE),
        length=HASH_SIZE,
        iterations=ARGON2_ITERATIONS,
        lanes=ARGON2_LANES,
        memory_cost=ARGON2_MEMORY_KIB,
    )
    return kdf.derive_phc_encoded(password.encode("utf-8"))


def _hash_cost_ok(phc: str) -> bool:
    """True if a PHC string is an Argon2id hash whose parameters are within our caps."""
    parts = phc.split("$")
    if len(parts) != 6 or parts[1] != "argon2id":
        return False
    params = dict(item.split("=", 1) for item in parts[3].split(",") if "=" in item)
    try:
        memory, iterations, lanes = int(params["m"]), int(params["t"]), int(params["p"])
    except (KeyError, ValueError):
        return False
    return 0 < memory <= MAX_HASH_MEMORY_KIB and 0 < iterations <= MAX_HASH_ITERATIONS and 0 < lanes <= MAX_HASH_LANES


def verify_password(password: str, phc: str) -> bool:
    """Constant-time check of ``password`` against a stored hash. Never raises on a mismatch."""
    if not _hash_cost_ok(phc) or len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        Argon2id.verify_phc_encoded(password.encode("utf-8"), phc)
    except (InvalidKey, ValueError):
        return False
    return True


def password_problem(password: str, username: str, *, min_length: int = MIN_PASSWORD_CHARS) -> str | None:
    """Why ``password`` may not become ``username``'s password, in one line; None if it may.

    The rules of NIST SP 800-63B: at least ``min_length`` characters and at most
    ``MAX_PASSWORD_CHARS``, not the user name (alone or followed by digits, in any case),
    and not a commonly used or easily guessed password, as the ``zxcvbn`` estimator (with
    its own dictionaries of leaked passwords, names and words) judges it. No rules on
    which kinds of characters it must hold.
    """
    if not password:
        return "the password is empty"
    if len(password) < min_length:
        return f"the password is too short: it needs at least {min_length} characters"
    if len(password) > MAX_PASSWORD_CHARS:
        return f"the password is too long: at most {MAX_PASSWORD_CHARS} characters"
    folded, name = password.casefold(), username.casefold()
    suffix = folded[len(name) :]
    if folded.startswith(name) and (not suffix or (suffix.isascii() and suffix.isdigit())):
        return "the password may not be the user name, nor the name followed by digits"
    # Imported here: only adduser and passwd need it, and its dictionaries take memory.
    from zxcvbn import zxcvbn

    strength = zxcvbn(password[:MAX_SCORED_PASSWORD_CHARS], user_inputs=[username])
    if strength["score"] >= MIN_PASSWORD_SCORE:
        return None
    suggestions = strength["feedback"]["suggestions"]
    reason = strength["feedback"]["warning"] or (suggestions[0] if suggestions else "it follows a common pattern")
    return f"the password is too easy to guess: {reason[:1].lower()}{reason[1:].rstrip('.')}"


# --------------------------------------------------------------------------- files


def write_file_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (mode 0600): temporary file, fsync, rename, fsync dir.

    A crash or a full disk leaves either the old file or the new one, never a
    mix; the temporary file is removed on failure. Raises ``OSError``.
    """
    directory = path.parent
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    temp_path: Path | None = Path(temp_name)
    try:
        try:
            handle = os.fdopen(fd, "w", encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        with handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
        temp_path = None
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if temp_path is not None:
            with contextlib.suppress(OSError):
                temp_path.unlink()


# --------------------------------------------------------------------------- the user store


#: The server-wide roles an account may have: an admin can act in every room and server-wide.
SERVER_ROLES = ("user", "admin")


@dataclass(frozen=True)
class AccountBan:
    """A server-wide ban: until when (0: until lifted), why, and who set it."""

    until: float = 0.0
    reason: str = ""
    by: str = ""

    def active(self, now: float | None = None) -> bool:
        return not self.until or self.until > (time.time() if now is None else now)

    def describe(self) -> str:
        """ "banned until 2026-12-08 10:00 UTC: spam" (or "until lifted")."""
        when = "until lifted" if not self.until else "until " + format_utc(self.until)
        return f"banned {when}" + (f": {self.reason}" if self.reason else "")


def format_utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class UserRecord:
    name: str
    password_hash: str
    demo: bool = False
    created: str = ""
    role: str = "user"
    ban: AccountBan | None = None
    #: Random, made with the account: a name deleted and given to someone new is another account.
    account_id: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def created_at(self) -> float:
        """When the account was made (seconds since the epoch), or 0 if unknown."""
        try:
            return datetime.fromisoformat(self.created).timestamp() if self.created.endswith("Z") else 0.0
        except ValueError:
            return 0.0

    def active_ban(self, now: float | None = None) -> AccountBan | None:
        return self.ban if self.ban is not None and self.ban.active(now) else None


def _now_text() -> str:
    """Now, in UTC, to the millisecond: "2026-12-07T11:50:10.123Z" (private lines said before an
    account was made are not its: a second would be too coarse for a name deleted and given anew)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_from_entry(where: str, name: str, entry: object) -> UserRecord:
    """An account from its entry in a store (``users.json``, or a Redis hash holding the same JSON).

    Raises ``UserStoreError`` naming ``where`` and the account if the entry is malformed.
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("password_hash"), str):
        raise UserStoreError(f"{where}: user {name!r} has no password_hash")
    try:
        validate_username(name)
    except ValueError:
        raise UserStoreError(f"{where}: invalid user name {name!r}") from None
    role = entry.get("role", "user")
    if role not in SERVER_ROLES:
        raise UserStoreError(f"{where}: user {name!r} has an unknown role {role!r}")
    ban = entry.get("ban")
    if ban is not None and (
        not isinstance(ban, dict)
        or not isinstance(ban.get("until", 0), int | float)
        or not all(isinstance(ban.get(key, ""), str) for key in ("reason", "by"))
    ):
        raise UserStoreError(f"{where}: user {name!r} has a malformed ban")
    return UserRecord(
        name=name,
        password_hash=entry["password_hash"],
        demo=bool(entry.get("demo", False)),
        created=str(entry.get("created", "")),
        role=role,
        ban=AccountBan(float(ban.get("until", 0)), ban.get("reason", ""), ban.get("by", "")) if ban else None,
        account_id=str(entry.get("id", "")),
    )


def entry_of(record: UserRecord) -> dict[str, Any]:
    """An account as its store keeps it: what ``record_from_entry`` reads back."""
    entry: dict[str, Any] = {
        "password_hash": record.password_hash,
        "demo": record.demo,
        "created": record.created,
        "role": record.role,
    }
    if record.ban is not None:
        entry["ban"] = dataclasses.asdict(record.ban)
    if record.account_id:
        entry["id"] = record.account_id
    return entry


class AccountStore(Protocol):
    """Where the accounts live: ``users.json`` (``UserStore``) or, for several server processes,
    Redis (``securechat.redis_accounts.RedisUserStore``). Both raise ``UserStoreError``."""

    def load(self) -> dict[str, UserRecord]: ...
    def get(self, name: str) -> UserRecord | None: ...
    def add(self, name: str, password: str, *, demo: bool = False) -> None: ...
    def put(self, record: UserRecord) -> bool: ...
    def delete(self, name: str) -> None: ...
    def set_password(self, name: str, password: str) -> None: ...
    def set_role(self, name: str, role: str) -> None: ...
    def ban(self, name: str, ban: AccountBan) -> None: ...
    def unban(self, name: str) -> bool: ...
    def remove_orphaned_copies(self) -> int: ...
    def forget(self, name: str) -> None: ...
    def lost_its_accounts(self) -> bool: ...


T = TypeVar("T")


class AccountEdits:
    """The changes an account store makes, each one atomic through the store's own ``_update``
    (``users.json``: a file lock and an atomic rewrite; Redis: an optimistic transaction)."""

    def _update(self, edit: Callable[[dict[str, UserRecord]], T]) -> T:
        raise NotImplementedError

    def forget(self, name: str) -> None:
        """Another process changed ``name``: drop any copy of its record kept here. A store that
        reads its source on every ``get`` (``users.json``, by its stamp) keeps none."""

    def add(self, name: str, password: str, *, demo: bool = False) -> None:
        """Create an account. Raises ``ValueError`` for a bad or taken name."""
        validate_username(name)
        password_hash = hash_password(password)

        def edit(users: dict[str, UserRecord]) -> None:
            UserStore.check_name_free(name, users)
            account_id = secrets.token_hex(8)
            users[name] = UserRecord(name, password_hash, demo=demo, created=_now_text(), account_id=account_id)

        self._update(edit)

    def put(self, record: UserRecord) -> bool:
        """Add an account as it is (``import-users``); False if the name is taken."""

        def edit(users: dict[str, UserRecord]) -> bool:
            try:
                UserStore.check_name_free(record.name, users)
            except ValueError:
                return False
            users[record.name] = record
            return True

        return self._update(edit)

    def put_all(self, records: list[UserRecord]) -> list[str]:
        """Add the accounts whose names are free, all in one change (none if it fails); returns their names."""

        def edit(users: dict[str, UserRecord]) -> list[str]:
            added = []
            for record in records:
                try:
                    UserStore.check_name_free(record.name, users)
                except ValueError:
                    continue
                users[record.name] = record
                added.append(record.name)
            return added

        return self._update(edit)

    def delete(self, name: str) -> None:
        """Remove an account. Raises ``KeyError`` if there is none by that name."""

        def edit(users: dict[str, UserRecord]) -> None:
            if name not in users:
                raise KeyError(name)
            del users[name]

        self._update(edit)

    def _change(self, name: str, change: Callable[[UserRecord, dict[str, UserRecord]], UserRecord]) -> UserRecord:
        """Replace one account's record with ``change(record, users)``, atomically; returns the new one.

        Raises ``KeyError`` if there is no such account, and whatever ``change`` raises.
        """

        def edit(users: dict[str, UserRecord]) -> UserRecord:
            if name not in users:
                raise KeyError(name)
            users[name] = change(users[name], users)
            return users[name]

        return self._update(edit)

    def set_password(self, name: str, password: str) -> None:
        """Replace an account's password (and clear its demo mark)."""
        password_hash = hash_password(password)
        self._change(name, lambda record, _users: dataclasses.replace(record, password_hash=password_hash, demo=False))

    def set_role(self, name: str, role: str) -> None:
        """Make an account an admin or a plain user. ``ValueError`` for an unknown role, or for taking
        the last admin's role (there would be nobody left to act server-wide)."""
        if role not in SERVER_ROLES:
            raise ValueError(f"unknown role {role!r}: choose one of {', '.join(SERVER_ROLES)}")

        def change(record: UserRecord, users: dict[str, UserRecord]) -> UserRecord:
            admins = [other for other in users.values() if other.is_admin]
            if record.is_admin and role != "admin" and len(admins) == 1:
                raise ValueError(f"{name} is the last admin; make another admin first")
            return dataclasses.replace(record, role=role)

        self._change(name, change)

    def ban(self, name: str, ban: AccountBan) -> None:
        """Ban an account server-wide (replacing any ban it has)."""
        self._change(name, lambda record, _users: dataclasses.replace(record, ban=ban))

    def unban(self, name: str) -> bool:
        """Lift an account's server-wide ban; False if it had none."""
        had: list[bool] = []

        def change(record: UserRecord, _users: dict[str, UserRecord]) -> UserRecord:
            had.append(record.ban is not None)
            return dataclasses.replace(record, ban=None)

        self._change(name, change)
        return had[-1]


class UserStore(AccountEdits):
    """The accounts in ``users.json``.

    Reads are cached and refreshed when the file changes, so accounts added
    while the server runs work at once. Every change takes an exclusive lock on
    a lock file beside the store, re-reads, edits and writes a new file
    atomically (temporary file, fsync, rename), so two admin commands run at
    once never lose each other's change and a crash never leaves half a file.

    The file must be its owner's alone: one others can write is refused (they
    could add themselves an account), one others can read is made 0600 (the
    hashes can be attacked offline).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        # Guards _cache and _cache_stamp, shared by every login thread.
        self._cache_lock = threading.Lock()
        self._cache: dict[str, UserRecord] = {}
        self._cache_stamp: tuple[int, int, int, int] | None = None

    # reading ----------------------------------------------------------------

    def _make_private(self, fd: int, mode: int) -> None:
        """Take away the group's and others' access to the open store, with a warning."""
        shown = f"mode {stat.filemode(mode)}"
        try:
            os.fchmod(fd, 0o600)
        except OSError as exc:
            raise UserStoreError(
                f"{self.path} is readable by other users ({shown}) and cannot be made private "
                f"({exc.strerror}); fix it with: chmod 600 {self.path}"
            ) from exc
        log.warning("%s was readable by other users (%s); it is now 0600", self.path, shown)

    def _read(self) -> dict[str, UserRecord]:
        """The accounts in the file. Raises ``UserStoreError`` if it is unreadable, corrupt or others can write it.

        A file others can read is made 0600, once it has proved to be a store.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise UserStoreError(f"{self.path}: cannot read: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                mode = info.st_mode
                try:
                    check_not_writable_by_others(self.path, info)
                except InsecureFileError as exc:
                    raise UserStoreError(str(exc)) from None
                users = self._parse(handle.read())
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    self._make_private(handle.fileno(), mode)
        except OSError as exc:
            raise UserStoreError(f"{self.path}: cannot read: {exc.strerror}") from exc
        return users

    def _parse(self, raw: bytes) -> dict[str, UserRecord]:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5000-digit number, deep nesting
            raise UserStoreError(f"{self.path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
            raise UserStoreError(f'{self.path}: expected an object with a "users" object')
        if data.get("format", STORE_FORMAT) != STORE_FORMAT:
            raise UserStoreError(f"{self.path}: unsupported format {data.get('format')!r}")
        return {name: record_from_entry(str(self.path), name, entry) for name, entry in data["users"].items()}

    def load(self) -> dict[str, UserRecord]:
        """All accounts, re-read if the file changed. Raises ``UserStoreError``."""
        try:
            info = self.path.stat()
            # The mode is part of it so that a chmod is checked too, not only a new file.
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            raise UserStoreError(f"{self.path}: cannot read: {exc.strerror}") from exc
        with self._cache_lock:
            if stamp is not None and stamp == self._cache_stamp:
                return self._cache
        users = self._read()
        with self._cache_lock:
            self._cache, self._cache_stamp = users, stamp
        return users

    def get(self, name: str) -> UserRecord | None:
        return self.load().get(name)

    def names(self) -> list[str]:
        return sorted(self.load())

    @staticmethod
    def check_name_free(name: str, users: dict[str, UserRecord]) -> None:
        """Raise ``ValueError`` if ``name`` is taken, in any case ("Alice" is alice's)."""
        taken = {existing.casefold(): existing for existing in users}
        if name.casefold() in taken:
            raise ValueError(f"user {taken[name.casefold()]!r} already exists")

    # writing ----------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """Hold the store's lock; first removes the copies an interrupted change left (yields how many)."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError as exc:
            raise UserStoreError(f"{self.path.parent}: no such folder, to keep {self.path.name} in") from exc
        except OSError as exc:
            raise UserStoreError(f"{self.lock_path}: cannot lock: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._remove_orphaned_copies()
        finally:
            os.close(fd)  # closing releases the lock

    def _orphaned_copies(self) -> list[Path]:
        """The temporary files of ``write_file_atomically`` beside the store."""
        return list(self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"))

    def _remove_orphaned_copies(self) -> int:
        """Delete the temporary copies of the store a killed writer left; the caller holds the lock.

        Each holds every password hash. They are only written under the lock, so
        with it held none is in use. Returns how many were removed.
        """
        removed = 0
        for orphan in self._orphaned_copies():
            try:
                orphan.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise UserStoreError(f"{orphan}: cannot remove this stale copy of the store: {exc.strerror}") from exc
            log.warning("removed %s, a copy of the store an interrupted change left behind", orphan)
            removed += 1
        return removed

    def lost_its_accounts(self) -> bool:
        """Never: an empty users.json is one whose accounts were deleted (Redis may lose them, with its data)."""
        return False

    def remove_orphaned_copies(self) -> int:
        """Delete the temporary copies of the store that an interrupted change left; returns how many.

        Run at server start. Takes the store's lock only if there are any, so a
        store in a directory the server cannot write costs nothing. Raises
        ``UserStoreError`` if one cannot be removed.
        """
        if not self._orphaned_copies():
            return 0
        with self._locked() as removed:
            return removed

    def _write(self, users: dict[str, UserRecord]) -> None:
        data = {
            "format": STORE_FORMAT,
            "users": {name: entry_of(users[name]) for name in sorted(users)},
        }
        try:
            write_file_atomically(self.path, json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            raise UserStoreError(f"{self.path}: cannot save: {reason}; the store is unchanged") from exc

    def _update(self, edit: Callable[[dict[str, UserRecord]], T]) -> T:
        """Run ``edit`` on every account under the store's lock, then save what it changed."""
        with self._locked():
            users = self._read()
            result = edit(users)
            self._write(users)
            return result


# --------------------------------------------------------------------------- login throttling


class LoginThrottle:
    """Increasing delays after failed logins, per address and per account name.

    The first few failures are free (typos happen); after that each failure
    doubles the wait, up to ``max_delay``. Success clears the record.
    """

    def __init__(
        self,
        free_failures: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        forget_after: float = 900.0,
        max_entries: int = 100_000,
    ) -> None:
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_entries = max_entries
        # Guards _failures: key -> (failure count, time of the last failure).
        self._failures_lock = threading.Lock()
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}

    def _delay(self, count: int) -> float:
        if count < self.free_failures:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** (count - self.free_failures))

    def retry_after(self, keys: list[tuple[str, str]]) -> float:
        """Seconds until a login for any of ``keys`` may be tried; 0 if it may now."""
        now = time.monotonic()
        wait = 0.0
        with self._failures_lock:
            for key in keys:
                count, last = self._failures.get(key, (0, 0.0))
                if count:
                    wait = max(wait, last + self._delay(count) - now)
        return max(0.0, wait)

    def begin_attempt(self, keys: list[tuple[str, str]], reserve: list[tuple[str, str]]) -> float:
        """Check ``keys`` and reserve one attempt on ``reserve``, counted as a failure until
        ``record_success``.

        Returns 0 when the attempt may go ahead, else the seconds to wait (nothing
        reserved). Checking and counting under one lock means a burst of parallel
        guesses is throttled like the same guesses made one after another. Reserve
        only keys that honest parallel logins do not share (an account, not an
        address behind which many people may log in at once).
        """
        now = time.monotonic()
        with self._failures_lock:
            wait = 0.0
            for key in keys:
                count, last = self._failures.get(key, (0, 0.0))
                if count:
                    wait = max(wait, last + self._delay(count) - now)
            if wait > 0:
                return wait
            self._add_failure(reserve, now)
        return 0.0

    def cancel_attempt(self, reserved: list[tuple[str, str]]) -> None:
        """Give back an attempt ``begin_attempt`` reserved that ended neither right nor wrong."""
        with self._failures_lock:
            for key in reserved:
                count, last = self._failures.get(key, (0, 0.0))
                if count <= 1:
                    self._failures.pop(key, None)
                else:
                    self._failures[key] = (count - 1, last)

    def record_failure(self, keys: list[tuple[str, str]]) -> None:
        with self._failures_lock:
            self._add_failure(keys, time.monotonic())

    def _add_failure(self, keys: list[tuple[str, str]], now: float) -> None:
        """Count one failure for each key. The caller holds ``_failures_lock``."""
        if len(self._failures) >= self.max_entries:
            self._forget_old(now)
        for key in keys:
            count, _ = self._failures.get(key, (0, 0.0))
            self._failures[key] = (count + 1, now)

    def record_success(self, keys: list[tuple[str, str]]) -> None:
        with self._failures_lock:
            for key in keys:
                self._failures.pop(key, None)

    def _forget_old(self, now: float) -> None:
        """Make room in a full table. The caller holds ``_failures_lock``.

        Entries older than ``forget_after`` go first. If the table is still full, half
        of it goes, in this order: the entries that delay nobody (failures still free),
        then those whose delay is served, and only then those delaying someone now,
        oldest first each time. So one-off failures from many addresses cannot flush
        the delay that an account under attack has earned.
        """
        stale = [key for key, (_, last) in self._failures.items() if now - last > self.forget_after]
        for key in stale:
            del self._failures[key]
        if len(self._failures) < self.max_entries:
            return

        def eviction_order(key: tuple[str, str]) -> tuple[bool, bool, float]:
            count, last = self._failures[key]
            delaying_now = last + self._delay(count) > now
            return delaying_now, count >= self.free_failures, last

        for key in sorted(self._failures, key=eviction_order)[: len(self._failures) // 2]:
            del self._failures[key]


# --------------------------------------------------------------------------- tokens


class RevocationNotSaved(Exception):
    """A session was revoked in memory, but the journal that keeps it across a restart could not be written."""

    def __init__(self, path: Path | None, cause: OSError) -> None:
        super().__init__(f"{path}: cannot save revoked sessions: {cause.strerror or cause}")


class TokenError(Exception):
    """A token was refused. ``code`` is sent to the client, the message is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def account_stamp(record: UserRecord) -> str:
    """A short digest of an account's password hash, carried in its tokens.

    Changing the password (or deleting and re-adding the user) changes it, so
    every token issued before stops working: a password change logs out everywhere.
    """
    return hashlib.sha256(record.password_hash.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenClaims:
    username: str
    issued_at: int
    expires_at: int
    token_id: str
    key_thumbprint: str
    account_stamp: str = ""
    #: Shared by every token of one login (the first and each refresh): revoking it ends them all.
    session_id: str = ""


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


class SharedRevocations(Protocol):
    """Revocations several server processes share (the Redis backend's): ``revoke`` is the one
    atomic arbiter (a session is spent once, whichever node asks), and every revocation is
    announced to each process's ``on_revoked`` at once."""

    def revoke(self, session_id: str, until: int) -> bool:
        """Record it; False if it already was. Raises ``OSError`` if it cannot be recorded."""

    def live(self) -> dict[str, int]:
        """Every revocation still in force: session id -> until when."""

    def subscribe(self, on_revoked: Callable[[str, int], None]) -> None:
        """Call ``on_revoked(session_id, until)`` for every revocation made anywhere from now on."""


class TokenAuthority:
    """Issues and verifies the server's JWTs. The secret never leaves this object."""

    def __init__(self, secret: bytes, ttl: int = DEFAULT_TOKEN_TTL, revoked_path: Path | None = None) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 bytes")
        self._secret = secret
        self.ttl = ttl
        #: Where revoked token ids are kept across restarts (None: in memory only).
        self.revoked_path = revoked_path
        # Guards _revoked: session id -> when its last token expires at the latest. Sessions
        # are revoked when spent by a resume or given up by a leave. Every frame's verification
        # takes it, so it is held for lookups and single changes only: never over the journal's
        # I/O, and over nothing longer than a copy of the dict (a compaction's snapshot).
        self._revoked_lock = threading.Lock()
        self._revoked: dict[str, int] = self._load_revoked()
        #: Lines in the journal file (live or expired), and how many it had after the last
        #: compaction: it is compacted again once it has doubled. Only the journal's writer
        #: (the one caller at a time that ``_journal`` lets write) touches them.
        self._journal_lines = self._compacted_lines = len(self._revoked)
        # Writes revocations to the journal in batches, one fsync each (group commit): a
        # revoking thread waits for its batch without holding any lock, and whoever finds
        # the journal free writes for everyone waiting. None when there is no journal.
        self._journal: GroupWriter[tuple[str, int]] | None = (
            GroupWriter(self._write_journal) if revoked_path is not None else None
        )
        #: Revocations shared with the other server processes (None: this process alone).
        self._shared: SharedRevocations | None = None
        # When forget_expired last looked (only the keepalive thread calls it).
        self._last_forgotten = 0.0

    def share_revocations(self, shared: SharedRevocations) -> None:
        """From now on revocations go through ``shared`` (the journal file is no longer written:
        processes sharing a data directory must not rewrite one file each)."""
        self._shared = shared
        self._journal = None
        shared.subscribe(self._revoked_elsewhere)
        with self._revoked_lock:
            self._revoked.update(shared.live())

    def forget_expired(self) -> None:
        """Drop revocations whose tokens have all expired (with a shared store there is no journal
        compaction to do it), a batch per hold of the lock: every frame's check waits on it.
        Does the work at most once a minute, however often it is called."""
        now = time.time()
        if now - self._last_forgotten < 60:
            return
        self._last_forgotten = now
        with self._revoked_lock:
            expired = [session_id for session_id, until in self._revoked.items() if until < now]
        for start in range(0, len(expired), FORGET_BATCH):
            with self._revoked_lock:
                for session_id in expired[start : start + FORGET_BATCH]:
                    if self._revoked.get(session_id, now) < now:
                        del self._revoked[session_id]

    def _revoked_elsewhere(self, session_id: str, until: int) -> None:
        with self._revoked_lock:
            self._revoked[session_id] = until

    def _load_revoked(self) -> dict[str, int]:
        """Read the revocation journal (one ``session-id until`` line each), keeping what is live."""
        if self.revoked_path is None or not self.revoked_path.exists():
            return {}
        # Whoever can rewrite this file can bring spent sessions back.
        check_owner_only(self.revoked_path)
        now = time.time()
        revoked: dict[str, int] = {}
        try:
            lines = self.revoked_path.read_bytes().decode("ascii", errors="replace").splitlines()
        except OSError as exc:
            # Starting without the list would let spent sessions resume: refuse instead.
            raise CryptoError(f"{self.revoked_path}: cannot read: {exc.strerror or exc}") from None
        damaged = 0
        for line in lines:
            # Line by line: a line torn by a crash or a full disk must not cost the others.
            try:
                session_id, until = line.split()
                if int(until) >= now:
                    revoked[session_id] = int(until)
            except ValueError:
                damaged += line.strip() != ""
        if damaged:
            log.warning("%s: skipped %d damaged line(s)", self.revoked_path, damaged)
        try:
            self._rewrite_revoked(revoked)  # drop what expired while we were down
        except OSError as exc:  # what was read is still in force; the old file stays
            log.error("%s", RevocationNotSaved(self.revoked_path, exc))
        return revoked

    def _rewrite_revoked(self, revoked: dict[str, int]) -> None:
        """Write the journal anew with ``revoked``. Raises ``OSError``."""
        assert self.revoked_path is not None
        write_file_atomically(self.revoked_path, "".join(f"{sid} {until}\n" for sid, until in revoked.items()))

    def _append_revoked(self, entries: list[tuple[str, int]]) -> None:
        """Append one line per entry to the journal, then fsync once. Raises ``OSError``."""
        assert self.revoked_path is not None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.revoked_path, flags, 0o600)
        try:
            # A leading newline ends any line an earlier crash left torn (empty lines are skipped).
            lines = memoryview(("\n" + "".join(f"{sid} {until}\n" for sid, until in entries)).encode("ascii"))
            while lines:
                lines = lines[os.write(fd, lines) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_journal(self, entries: list[tuple[str, int]]) -> None:
        """Make a batch of revocations durable (``_journal``'s write: one caller at a time, no lock held).

        Appends them, or, once the journal has doubled since it was last compacted,
        rewrites it with every revocation still live: the batch's are in ``_revoked``
        already (revoke() puts them there first), and any revoked after the snapshot
        are in a later batch, appended after this one. Raises ``OSError``.
        """
        if self._journal_lines + len(entries) <= max(MIN_JOURNAL_LINES, 2 * self._compacted_lines):
            self._append_revoked(entries)
            self._journal_lines += len(entries)
            return
        now = time.time()
        with self._revoked_lock:
            snapshot = list(self._revoked.items())  # the only O(N) step under the lock, at C speed
        live = {sid: until for sid, until in snapshot if until >= now}
        self._rewrite_revoked(live)
        self._journal_lines = self._compacted_lines = len(live)
        # Only this writer removes entries, and an entry's time never changes, so these are
        # still the expired ones. A few at a time: lookups go on in between.
        expired = [sid for sid, until in snapshot if until < now]
        for start in range(0, len(expired), FORGET_BATCH):
            with self._revoked_lock:
                for sid in expired[start : start + FORGET_BATCH]:
                    del self._revoked[sid]

    def issue(self, username: str, key_thumbprint: str, account: str = "", session_id: str = "") -> tuple[str, int]:
        """A new token for ``username`` bound to the key with ``key_thumbprint``.

        ``account`` is the account's ``account_stamp``, checked again on every use;
        ``session_id`` ties refreshed tokens to their login (a new one if empty).
        """
        now = int(time.time())
        expires_at = now + self.ttl
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": username,
            "iat": now,
            "exp": expires_at,
            "jti": secrets.token_urlsafe(16),
            "sid": session_id or new_session_id(),
            "cnf": {"jkt": key_thumbprint},
            "acct": account,
        }
        return jwt.encode(claims, self._secret, algorithm=TOKEN_ALGORITHM), expires_at

    def verify(self, token: Any, key_thumbprint: str, username: str | None = None) -> TokenClaims:
        """Check signature, algorithm, claims, expiry, key binding and (optionally) user.

        Raises ``TokenError`` with a code the client can act on.
        """
        if not isinstance(token, str) or not token:
            raise TokenError("token_missing", "no token")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[TOKEN_ALGORITHM],  # pinned: "none" and RS/HS confusion are refused
                issuer=TOKEN_ISSUER,
                options={"require": list(TOKEN_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "token expired; log in again") from None
        except jwt.InvalidTokenError:
            raise TokenError("token_invalid", "token invalid or forged") from None
        confirmation = claims.get("cnf")
        if not isinstance(confirmation, dict) or confirmation.get("jkt") != key_thumbprint:
            raise TokenError("token_wrong_key", "token is bound to another key")
        subject = claims.get("sub")
        if not isinstance(subject, str) or (username is not None and subject != username):
            raise TokenError("token_invalid", "token is for another user")
        session_id = str(claims["sid"])
        if self.is_revoked(session_id):
            raise TokenError("token_revoked", "token was given up; log in again")
        return TokenClaims(
            subject,
            int(claims["iat"]),
            int(claims["exp"]),
            str(claims["jti"]),
            key_thumbprint,
            str(claims["acct"]),
            session_id,
        )

    def recheck(self, claims: TokenClaims) -> None:
        """Re-check what can change after ``verify`` accepted a token: expiry and revocation.

        For a token string already fully verified (signature, issuer, key binding,
        user); raises ``TokenError`` with the same codes as ``verify``.
        """
        # The same rule as PyJWT's: a token is expired from the second of its "exp".
        if claims.expires_at <= time.time():
            raise TokenError("token_expired", "token expired; log in again")
        if self.is_revoked(claims.session_id):
            raise TokenError("token_revoked", "token was given up; log in again")

    def is_revoked(self, session_id: str) -> bool:
        """True if the session was given up (by a leave), spent (by a resume) or pushed out."""
        with self._revoked_lock:
            return session_id in self._revoked

    def needs_refresh(self, claims: TokenClaims) -> bool:
        """True once a token is past half its life."""
        return time.time() >= (claims.issued_at + claims.expires_at) / 2

    def revoke(self, claims: TokenClaims) -> bool:
        """Revoke the session of ``claims``: see ``revoke_session``."""
        return self.revoke_session(claims.session_id)

    def spend(self, claims: TokenClaims) -> bool:
        """Revoke the session of ``claims`` to resume it (see ``revoke_session``), only if that can be
        recorded: on ``RevocationNotSaved`` it is not revoked, so the resume may be tried again."""
        return self.revoke_session(claims.session_id, unless_unsaved=True)

    def revoke_session(self, session_id: str, *, unless_unsaved: bool = False) -> bool:
        """Refuse every token of this session from now on (none can resume it again).

        Returns True if this call revoked it, False if it already was: checking and
        revoking are one step, so of two resumes of one token racing each other only
        one can spend it. Raises ``RevocationNotSaved`` when the journal cannot be written:
        the session is refused from now on (with ``unless_unsaved``, not revoked at all), but
        a restart would forget it, so the caller must say so. Returns once the revocation is
        on disk: revocations made at the same time share one fsync. One line is appended to
        the journal per revocation; it is rewritten without the expired entries only once it
        has doubled since the last rewrite, so the cost per revocation stays constant on
        average however many there are.
        """
        now = time.time()
        # A refresh may have issued a token up to one lifetime from now, never later.
        until = int(now) + self.ttl + 1
        with self._revoked_lock:
            if session_id in self._revoked:
                return False
            self._revoked[session_id] = until
        try:
            if self._shared is not None:  # the shared store decides which of two racing nodes spent it
                try:
                    return self._shared.revoke(session_id, until)
                except OSError as exc:
                    raise RevocationNotSaved(Path("(the shared store)"), exc) from exc
            if self._journal is None:
                return True
            # Refused from now on; the wait below is for the journal only, with no lock held.
            try:
                self._journal.flush(self._journal.put((session_id, until)))
            except OSError as exc:
                raise RevocationNotSaved(self.revoked_path, exc) from exc
            return True
        except RevocationNotSaved:
            if unless_unsaved:
                with self._revoked_lock:
                    if self._revoked.get(session_id) == until:
                        del self._revoked[session_id]
            raise


class DeviceTokens:
    """Device tokens, as OWASP's "device cookies": proof that a device logged in to an account before.

    A successful password login is given one; the device sends it with its next login, and a
    valid one exempts that login from the account-wide delay, never from the per-address ones.
    Each is an HS256 JWT under a key of its own (derived from the token secret with its own
    label, so that neither kind of token passes for the other), names the account, carries its
    stamp (a password change voids them all) and expires after ``ttl``. Its id (``jti``) is
    throttled like an address, so guesses made with a stolen one are delayed all the same.
    """

    def __init__(self, secret: bytes, ttl: int = DEVICE_TOKEN_TTL) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 bytes")
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"chat device tokens").derive(secret)
        self.ttl = ttl

    def issue(self, username: str, account: str) -> str:
        """A new device token for ``username``, whose ``account_stamp`` is ``account``."""
        now = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "typ": "device",
            "sub": username,
            "acct": account,
            "iat": now,
            "exp": now + self.ttl,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self._key, algorithm=TOKEN_ALGORITHM)

    def check(self, token: str, username: str, account: str) -> str | None:
        """The token's id if ``token`` is a live device token of ``username`` at stamp ``account``, else None.

        Never raises for a bad token: a login without a good one is only throttled as any other.
        """
        if not token:
            return None
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[TOKEN_ALGORITHM],
                issuer=TOKEN_ISSUER,
                options={"require": list(DEVICE_TOKEN_CLAIMS)},
            )
        except jwt.InvalidTokenError:
            return None
        if claims["typ"] != "device" or claims["sub"] != username or claims["acct"] != account:
            return None
        return str(claims["jti"])
