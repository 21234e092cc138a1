"""Accounts: password hashing, the user store on disk, login throttling and tokens.

Argon2id is deliberately slow (~35 ms a hash), so these tests hash only where
hashing is the point; the rest reuse one hash made per module.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import multiprocessing
import os
import re
import stat
import threading
import time
import types

import jwt
import pytest
from conftest import TIMEOUT
from hypothesis import given, settings
from hypothesis import strategies as st

from securechat import accounts
from securechat.accounts import (
    DeviceTokens,
    LoginThrottle,
    TokenAuthority,
    TokenError,
    UserStore,
    UserStoreError,
    hash_password,
    verify_password,
)
from securechat.crypto_utils import InsecureFileError

PHC_PATTERN = re.compile(r"\$argon2id\$v=19\$m=19456,t=2,p=1\$([A-Za-z0-9+/]{22})\$([A-Za-z0-9+/]{43})")


@pytest.fixture(scope="module")
def known_hash():
    return hash_password("correct horse battery staple")


# --------------------------------------------------------------------------- passwords


def test_hash_password_gives_an_owasp_argon2id_phc_string_with_a_fresh_salt():
    first = hash_password("same password")
    second = hash_password("same password")
    first_match, second_match = PHC_PATTERN.fullmatch(first), PHC_PATTERN.fullmatch(second)
    assert first_match and second_match, (first, second)
    assert first_match.group(1) != second_match.group(1)  # salt
    assert first_match.group(2) != second_match.group(2)  # hash


def test_hash_password_refuses_empty_and_oversized_passwords():
    with pytest.raises(ValueError):
        hash_password("")
    with pytest.raises(ValueError):
        hash_password("x" * (accounts.MAX_PASSWORD_CHARS + 1))


def test_verify_password_accepts_the_right_password_only(known_hash):
    assert verify_password("correct horse battery staple", known_hash) is True
    assert verify_password("correct horse battery stapl", known_hash) is False
    assert verify_password("Correct horse battery staple", known_hash) is False
    assert verify_password("", known_hash) is False


def test_verify_password_handles_unicode_passwords():
    phc = hash_password("pässwörd 密码 🔑")
    assert verify_password("pässwörd 密码 🔑", phc) is True
    assert verify_password("passwort 密码 🔑", phc) is False


def with_params(phc: str, params: str) -> str:
    parts = phc.split("$")
    parts[3] = params
    return "$".join(parts)


@pytest.mark.parametrize(
    "params",
    [
        "m=99999999999,t=2,p=1",  # asks for ~93 TiB: must be refused, not attempted
        f"m={accounts.MAX_HASH_MEMORY_KIB + 1},t=2,p=1",
        "m=-5,t=2,p=1",
        "m=0,t=2,p=1",
        "m=abc,t=2,p=1",
        "t=2,p=1",
        "m=19456,t=0,p=1",
        "m=19456,t=2,p=0",
        "m=19456,t=2,p=9999999",
    ],
)
def test_verify_password_with_hostile_parameters_returns_false(known_hash, params):
    assert verify_password("correct horse battery staple", with_params(known_hash, params)) is False


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "$argon2id$",
        "$argon2id$v=19$m=19456,t=2,p=1$$",
        "$argon2id$v=19$m=19456,t=2,p=1$!!!$!!!",
        "$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA",
        "$2b$12$abcdefghijklmnopqrstuuJ5nVQd6vA1H0fCk6dl.7rfXW4ZQdPZu",  # bcrypt
        "pbkdf2_sha256$600000$salt$hash",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA$extra",
    ],
)
def test_verify_password_with_garbage_hashes_returns_false(garbage):
    assert verify_password("anything", garbage) is False


@settings(deadline=None, max_examples=150)
@given(
    password=st.text(max_size=40), phc=st.text(max_size=80) | st.from_regex(r"\$argon2id\$[^$]*\$[^$]*\$[^$]*\$[^$]*")
)
def test_verify_password_never_raises(password, phc):
    # A random string is never a valid hash, so no Argon2 work is done here.
    assert verify_password(password, phc) is False


def test_verify_password_of_an_oversized_or_unencodable_password_is_false(known_hash):
    assert verify_password("x" * (accounts.MAX_PASSWORD_CHARS + 1), known_hash) is False
    assert verify_password("\ud800", known_hash) is False


# --------------------------------------------------------------------------- the user store


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "users.json"


@pytest.fixture
def store(store_path):
    return UserStore(store_path)


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_absent_store_is_empty(store):
    assert store.names() == []
    assert store.get("alice") is None


def test_add_delete_set_password_and_names(store):
    store.add("bob", "bob-password")
    store.add("alice", "alice-password", demo=True)
    assert store.names() == ["alice", "bob"]
    alice = store.get("alice")
    assert alice.demo is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", alice.created)
    assert verify_password("alice-password", alice.password_hash)

    store.set_password("alice", "new-password")
    changed = store.get("alice")
    assert verify_password("new-password", changed.password_hash)
    assert not verify_password("alice-password", changed.password_hash)
    assert changed.demo is False  # a real password clears the demo mark
    assert changed.created == alice.created

    store.delete("bob")
    assert store.names() == ["alice"]
    assert UserStore(store.path).names() == ["alice"]  # on disk, not only cached


def test_unknown_names_raise_key_error(store):
    store.add("alice", "pw")
    with pytest.raises(KeyError):
        store.delete("nobody")
    with pytest.raises(KeyError):
        store.set_password("nobody", "pw")
    with pytest.raises(KeyError):
        store.delete("ALICE")  # lookups are exact
    assert store.names() == ["alice"]


def test_a_taken_name_is_refused_whatever_its_case(store):
    store.add("Alice", "pw")
    before = store.path.read_bytes()
    for name in ("Alice", "alice", "ALICE"):
        with pytest.raises(ValueError, match="already exists"):
            store.add(name, "other")
    assert store.path.read_bytes() == before


@pytest.mark.parametrize(
    "name", ["", " ", "a" * 33, "has space", "-dash", ".dot", "semi;colon", "ünï", "a/b", "\x1b[2J", "alice\n"]
)
def test_invalid_user_names_are_refused(store, name):
    with pytest.raises(ValueError):
        store.add(name, "pw")
    assert not store.path.exists()


def test_the_file_is_0600_json_without_the_password_and_no_temp_files_remain(store, tmp_path):
    store.add("alice", "a-very-secret-password")
    store.add("bob", "another-secret")
    store.delete("bob")
    assert mode_of(store.path) == 0o600
    text = store.path.read_text()
    assert "a-very-secret-password" not in text and "another-secret" not in text
    document = json.loads(text)
    assert document["format"] == 1
    assert PHC_PATTERN.fullmatch(document["users"]["alice"]["password_hash"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".users.json.lock", "users.json"]


def test_rewriting_tightens_a_loose_file_mode(store):
    store.add("alice", "pw")
    store.path.chmod(0o644)
    store.delete("alice")
    assert mode_of(store.path) == 0o600


def test_another_writer_s_change_is_seen_without_restarting(store):
    assert store.names() == []
    UserStore(store.path).add("carol", "pw")
    assert store.names() == ["carol"]


def fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fdopen_whose_writes_fail(real_fdopen):
    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        handle.write = fail_with_enospc
        return handle

    return fdopen


@pytest.mark.parametrize("failing_call", ["write", "fsync", "replace"])
def test_a_full_disk_leaves_the_old_store_intact(store, tmp_path, monkeypatch, known_hash, failing_call):
    store.add("alice", "pw")
    before = store.path.read_bytes()
    monkeypatch.setattr(accounts, "hash_password", lambda password: known_hash)
    if failing_call == "write":
        monkeypatch.setattr(accounts.os, "fdopen", fdopen_whose_writes_fail(os.fdopen))
    else:
        monkeypatch.setattr(accounts.os, failing_call, fail_with_enospc)
    with pytest.raises(UserStoreError) as refused:
        store.add("bob", "pw2")
    monkeypatch.undo()
    message = str(refused.value)
    assert "\n" not in message
    assert str(store.path) in message
    assert "No space left on device" in message
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".users.json.lock", "users.json"]
    assert UserStore(store.path).names() == ["alice"]


CORRUPT_STORES = {
    "not-json": b"{bad",
    "truncated": b'{"format": 1, "users": {"alice": {"password_hash": "$argon2id',
    "not-utf8": b"\xff\xfe\x00{",
    "a-list": b"[]",
    "users-a-list": b'{"format": 1, "users": []}',
    "entry-a-string": b'{"format": 1, "users": {"alice": "hash"}}',
    "hash-missing": b'{"format": 1, "users": {"alice": {"demo": true}}}',
    "hash-a-number": b'{"format": 1, "users": {"alice": {"password_hash": 5}}}',
    "bad-name": b'{"format": 1, "users": {"bad name": {"password_hash": "x"}}}',
    "future-format": b'{"format": 2, "users": {}}',
    "huge-number": b'{"format": 1, "users": {}, "x": ' + b"9" * 5000 + b"}",
    "deep-nesting": b'{"format": 1, "users": {}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("content", CORRUPT_STORES.values(), ids=CORRUPT_STORES.keys())
def test_a_corrupt_store_raises_one_line_naming_the_file_and_is_never_overwritten(store, content):
    store.path.write_bytes(content)
    for action in (store.load, store.names, lambda: store.add("alice", "pw"), lambda: store.delete("x")):
        with pytest.raises(UserStoreError) as refused:
            action()
        assert str(store.path) in str(refused.value)
        assert "\n" not in str(refused.value)
    assert store.path.read_bytes() == content


def test_an_unreadable_store_path_raises_user_store_error(tmp_path):
    directory = tmp_path / "users.json"
    directory.mkdir()
    with pytest.raises(UserStoreError, match=re.escape(str(directory))):
        UserStore(directory).load()


def add_users_in_a_child(path, names, password_hash):
    # Patch the slow hash out so the processes collide on the file, not on Argon2.
    accounts.hash_password = lambda password: password_hash
    store = UserStore(path)
    for name in names:
        store.add(name, "pw")


def test_concurrent_adds_from_several_processes_lose_no_account(store_path, known_hash):
    context = multiprocessing.get_context("fork")
    batches = [[f"user{worker}x{index}" for index in range(8)] for worker in range(6)]
    workers = [context.Process(target=add_users_in_a_child, args=(store_path, batch, known_hash)) for batch in batches]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=TIMEOUT * 4)
    exit_codes = [worker.exitcode for worker in workers]
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert exit_codes == [0] * len(workers)
    assert UserStore(store_path).names() == sorted(name for batch in batches for name in batch)
    assert not [p for p in store_path.parent.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- login throttling


class FakeClock:
    """Stands in for the ``time`` module inside ``accounts``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(accounts, "time", types.SimpleNamespace(monotonic=fake.monotonic, time=fake.time))
    return fake


ADDRESS = ("address", "203.0.113.9")
ACCOUNT = ("user", "alice")


def test_throttle_allows_free_failures_then_doubles_the_delay_up_to_a_cap(clock):
    throttle = LoginThrottle(free_failures=3, base_delay=1.0, max_delay=10.0)
    keys = [ADDRESS, ACCOUNT]
    delays = []
    for _ in range(8):
        throttle.record_failure(keys)
        delays.append(throttle.retry_after(keys))
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_throttle_delay_runs_out_with_time(clock):
    throttle = LoginThrottle(free_failures=1, base_delay=4.0)
    throttle.record_failure([ADDRESS])
    assert throttle.retry_after([ADDRESS]) == 4.0
    clock.now += 3.0
    assert throttle.retry_after([ADDRESS]) == pytest.approx(1.0)
    clock.now += 1.5
    assert throttle.retry_after([ADDRESS]) == 0.0


def test_throttle_success_clears_the_record(clock):
    throttle = LoginThrottle(free_failures=1, base_delay=1.0)
    for _ in range(5):
        throttle.record_failure([ADDRESS, ACCOUNT])
    assert throttle.retry_after([ADDRESS, ACCOUNT]) > 0
    throttle.record_success([ADDRESS, ACCOUNT])
    assert throttle.retry_after([ADDRESS, ACCOUNT]) == 0.0
    throttle.record_failure([ADDRESS, ACCOUNT])
    assert throttle.retry_after([ADDRESS, ACCOUNT]) == 1.0  # counting starts again


def test_throttle_keys_are_independent_and_any_throttled_key_blocks(clock):
    throttle = LoginThrottle(free_failures=1, base_delay=2.0)
    throttle.record_failure([ACCOUNT])
    assert throttle.retry_after([ADDRESS]) == 0.0
    assert throttle.retry_after([("user", "bob")]) == 0.0
    assert throttle.retry_after([ADDRESS, ACCOUNT]) == 2.0


def test_parallel_attempts_are_throttled_like_sequential_ones(clock):
    # Each attempt is counted when it starts, so guesses fired together (before any of them
    # has failed) still run out of free attempts.
    throttle = LoginThrottle(free_failures=3, base_delay=1.0)
    started = [throttle.begin_attempt([ADDRESS, ACCOUNT], reserve=[ACCOUNT]) for _ in range(5)]
    assert started == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert throttle.retry_after([ADDRESS]) == 0.0  # the address is not blamed for attempts in flight
    throttle.record_success([ADDRESS, ACCOUNT])  # one of them had the right password
    assert throttle.begin_attempt([ADDRESS, ACCOUNT], reserve=[ACCOUNT]) == 0.0


def test_concurrent_attempts_from_many_threads_reserve_exactly_the_free_ones():
    throttle = LoginThrottle(free_failures=3, base_delay=60.0)
    barrier = threading.Barrier(16)
    results = []

    def attempt():
        barrier.wait()
        results.append(throttle.begin_attempt([ACCOUNT], reserve=[ACCOUNT]))

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results).count(0.0) == 3


def test_an_attempt_that_ended_neither_right_nor_wrong_is_given_back(clock):
    # "Server busy" is not the user's fault: it must not count towards their lock-out.
    throttle = LoginThrottle(free_failures=1, base_delay=60.0)
    for _ in range(5):
        assert throttle.begin_attempt([ACCOUNT], reserve=[ACCOUNT]) == 0.0
        throttle.cancel_attempt([ACCOUNT])
    assert throttle.retry_after([ACCOUNT]) == 0.0


def test_throttle_memory_is_bounded(clock):
    throttle = LoginThrottle(free_failures=1, base_delay=1.0, max_entries=100, forget_after=60.0)
    for index in range(1000):
        throttle.record_failure([("address", f"10.0.{index // 256}.{index % 256}")])
    assert len(throttle._failures) <= 100


# --------------------------------------------------------------------------- tokens

SECRET = b"s" * 32
THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.fixture
def authority():
    return TokenAuthority(SECRET)


def b64url_json(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode("ascii")


def claims_now(**overrides):
    now = int(time.time())
    claims = {
        "iss": accounts.TOKEN_ISSUER,
        "sub": "alice",
        "iat": now,
        "exp": now + 600,
        "jti": "token-1",
        "sid": "session-1",
        "cnf": {"jkt": THUMBPRINT},
        "acct": "stamp",
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def refused_code(authority, token, thumbprint=THUMBPRINT, username="alice") -> str:
    with pytest.raises(TokenError) as refused:
        authority.verify(token, thumbprint, username)
    return refused.value.code


def test_a_valid_token_verifies(authority):
    token, expires_at = authority.issue("alice", THUMBPRINT)
    claims = authority.verify(token, THUMBPRINT, "alice")
    assert (claims.username, claims.key_thumbprint, claims.expires_at) == ("alice", THUMBPRINT, expires_at)
    assert claims.expires_at - claims.issued_at == accounts.DEFAULT_TOKEN_TTL
    assert authority.verify(token, THUMBPRINT).username == "alice"  # no user given: any


def test_a_token_carries_the_account_stamp(authority):
    token, _ = authority.issue("alice", THUMBPRINT, "0123456789abcdef")
    assert authority.verify(token, THUMBPRINT, "alice").account_stamp == "0123456789abcdef"


def test_the_account_stamp_changes_with_the_password(known_hash):
    record = accounts.UserRecord("alice", known_hash)
    stamp = accounts.account_stamp(record)
    assert re.fullmatch(r"[0-9a-f]{16}", stamp)
    assert accounts.account_stamp(accounts.UserRecord("alice", known_hash, demo=True)) == stamp
    assert accounts.account_stamp(accounts.UserRecord("alice", hash_password("other"))) != stamp


def test_each_token_has_its_own_id(authority):
    first, _ = authority.issue("alice", THUMBPRINT)
    second, _ = authority.issue("alice", THUMBPRINT)
    ids = {authority.verify(token, THUMBPRINT).token_id for token in (first, second)}
    assert len(ids) == 2


def test_an_expired_token_is_refused():
    authority = TokenAuthority(SECRET, ttl=-1)
    token, _ = authority.issue("alice", THUMBPRINT)
    assert refused_code(authority, token) == "token_expired"


def test_an_expired_token_crafted_with_pyjwt_is_refused(authority):
    now = int(time.time())
    token = jwt.encode(claims_now(iat=now - 700, exp=now - 100), SECRET, algorithm="HS256")
    assert refused_code(authority, token) == "token_expired"


def test_a_token_signed_with_another_secret_is_refused(authority):
    forged, _ = TokenAuthority(b"x" * 32).issue("alice", THUMBPRINT)
    assert refused_code(authority, forged) == "token_invalid"


def test_a_token_with_a_flipped_signature_is_refused(authority):
    token, _ = authority.issue("alice", THUMBPRINT)
    head, body, signature = token.split(".")
    altered = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert refused_code(authority, f"{head}.{body}.{altered}") == "token_invalid"


def test_an_alg_none_token_is_refused(authority):
    header = b64url_json({"alg": "none", "typ": "JWT"})
    unsigned = f"{header}.{b64url_json(claims_now())}."
    assert refused_code(authority, unsigned) == "token_invalid"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_a_token_with_another_hmac_algorithm_is_refused(authority, algorithm):
    token = jwt.encode(claims_now(), SECRET, algorithm=algorithm)
    assert refused_code(authority, token) == "token_invalid"


def test_a_payload_swapped_under_a_valid_signature_is_refused(authority):
    token, _ = authority.issue("alice", THUMBPRINT)
    head, _, signature = token.split(".")
    swapped = f"{head}.{b64url_json(claims_now(sub='bob'))}.{signature}"
    assert refused_code(authority, swapped, username="bob") == "token_invalid"


@pytest.mark.parametrize("claim", accounts.TOKEN_CLAIMS)
def test_a_token_missing_a_required_claim_is_refused(authority, claim):
    token = jwt.encode(claims_now(**{claim: None}), SECRET, algorithm="HS256")
    assert refused_code(authority, token) == "token_invalid"


def test_a_token_from_another_issuer_is_refused(authority):
    token = jwt.encode(claims_now(iss="someone-else"), SECRET, algorithm="HS256")
    assert refused_code(authority, token) == "token_invalid"


def test_a_token_bound_to_another_key_is_refused(authority):
    token, _ = authority.issue("alice", "another-thumbprint")
    assert refused_code(authority, token) == "token_wrong_key"


@pytest.mark.parametrize("confirmation", ["NzbL", {"x5t#S256": THUMBPRINT}, {}, [THUMBPRINT]])
def test_a_token_with_a_malformed_key_binding_is_refused(authority, confirmation):
    token = jwt.encode(claims_now(cnf=confirmation), SECRET, algorithm="HS256")
    assert refused_code(authority, token) == "token_wrong_key"


def test_a_token_for_another_user_is_refused(authority):
    token, _ = authority.issue("bob", THUMBPRINT)
    assert refused_code(authority, token, username="alice") == "token_invalid"


def test_a_revoked_token_is_refused(authority):
    token, _ = authority.issue("alice", THUMBPRINT)
    claims = authority.verify(token, THUMBPRINT, "alice")
    authority.revoke(claims)
    assert refused_code(authority, token) == "token_revoked"
    fresh, _ = authority.issue("alice", THUMBPRINT)
    assert authority.verify(fresh, THUMBPRINT, "alice").username == "alice"


def test_revoking_a_session_refuses_every_token_it_was_issued(authority):
    first, _ = authority.issue("alice", THUMBPRINT, session_id="s1")
    refreshed, _ = authority.issue("alice", THUMBPRINT, session_id="s1")
    other, _ = authority.issue("alice", THUMBPRINT)
    authority.revoke(authority.verify(refreshed, THUMBPRINT, "alice"))
    assert refused_code(authority, first) == "token_revoked"
    assert refused_code(authority, refreshed) == "token_revoked"
    assert authority.verify(other, THUMBPRINT, "alice").username == "alice"


def test_revoked_sessions_survive_a_restart_and_the_file_is_owner_only(tmp_path):
    path = tmp_path / "revoked.json"
    authority = TokenAuthority(SECRET, revoked_path=path)
    token, _ = authority.issue("alice", THUMBPRINT)
    authority.revoke(authority.verify(token, THUMBPRINT, "alice"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert refused_code(TokenAuthority(SECRET, revoked_path=path), token) == "token_revoked"


def test_the_revocation_journal_is_appended_to_and_compacted_as_sessions_expire(tmp_path, clock):
    path = tmp_path / "revoked"
    authority = TokenAuthority(SECRET, ttl=60, revoked_path=path)

    def revoke(session_id):
        authority.revoke(accounts.TokenClaims("alice", 0, 1, "t", THUMBPRINT, "", session_id))

    for index in range(accounts.MIN_JOURNAL_LINES):
        revoke(f"old-{index}")
    entries = [line for line in path.read_text().splitlines() if line]
    assert len(entries) == accounts.MIN_JOURNAL_LINES  # one line each, no rewrite
    clock.now += 3600  # every one of them has expired
    revoke("new-0")  # the journal passes its limit: rewritten with what is still live
    assert path.read_text().split() == ["new-0", str(int(clock.now) + 61)]
    assert authority.is_revoked("new-0") and not authority.is_revoked("old-0")
    reloaded = TokenAuthority(SECRET, ttl=60, revoked_path=path)
    assert reloaded.is_revoked("new-0")


def test_a_torn_journal_line_costs_only_itself(tmp_path):
    # A crash or a full disk mid-append leaves a partial line; the next append goes on after it.
    path = tmp_path / "revoked"
    authority = TokenAuthority(SECRET, revoked_path=path)
    first, _ = authority.issue("alice", THUMBPRINT)
    authority.revoke(authority.verify(first, THUMBPRINT, "alice"))
    with path.open("a") as journal:
        journal.write("torn-sess")  # no expiry, no newline
    second, _ = authority.issue("bob", THUMBPRINT)
    authority.revoke(authority.verify(second, THUMBPRINT, "bob"))
    reloaded = TokenAuthority(SECRET, revoked_path=path)
    assert refused_code(reloaded, first) == "token_revoked"
    assert refused_code(reloaded, second, username="bob") == "token_revoked"


def test_a_revocation_file_others_can_write_is_refused(tmp_path):
    path = tmp_path / "revoked.json"
    path.write_text("{}")
    path.chmod(0o666)
    with pytest.raises(InsecureFileError, match="chmod 600"):
        TokenAuthority(SECRET, revoked_path=path)


def test_recheck_passes_a_live_token_and_refuses_a_revoked_or_expired_one(authority):
    token, _ = authority.issue("alice", THUMBPRINT)
    claims = authority.verify(token, THUMBPRINT, "alice")
    authority.recheck(claims)  # nothing changed: no error
    authority.revoke(claims)
    with pytest.raises(TokenError) as revoked:
        authority.recheck(claims)
    assert revoked.value.code == "token_revoked"
    lapsed = dataclasses.replace(claims, session_id="another", expires_at=int(time.time()))
    with pytest.raises(TokenError) as expired:
        authority.recheck(lapsed)
    assert expired.value.code == "token_expired"


@pytest.mark.parametrize("token", [None, "", 42, b"bytes", ["a.b.c"]])
def test_a_missing_token_is_refused(authority, token):
    assert refused_code(authority, token) == "token_missing"


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "a.b", "....", "eyJ.eyJ.eyJ"])
def test_a_malformed_token_is_refused(authority, token):
    assert refused_code(authority, token) == "token_invalid"


def test_the_token_secret_must_be_at_least_32_bytes():
    with pytest.raises(ValueError, match="32"):
        TokenAuthority(b"s" * 31)
    TokenAuthority(b"s" * 32)


def test_needs_refresh_after_half_the_lifetime(clock):
    authority = TokenAuthority(SECRET, ttl=100)
    claims = accounts.TokenClaims("alice", issued_at=1000, expires_at=1100, token_id="t", key_thumbprint="k")
    clock.now = 1049.0
    assert not authority.needs_refresh(claims)
    clock.now = 1050.0
    assert authority.needs_refresh(claims)


# --------------------------------------------------------------------------- device tokens


def test_a_device_token_vouches_only_for_its_account_as_it_is_now():
    devices = DeviceTokens(SECRET)
    token = devices.issue("alice", "stamp-1")
    assert devices.check(token, "alice", "stamp-1")  # its id, for throttling
    assert devices.check(token, "bob", "stamp-1") is None  # another account
    assert devices.check(token, "alice", "stamp-2") is None  # the password changed since
    assert DeviceTokens(b"another secret, just as long....").check(token, "alice", "stamp-1") is None
    assert devices.check("not a token", "alice", "stamp-1") is None
    expired = DeviceTokens(SECRET, ttl=-1).issue("alice", "stamp-1")
    assert devices.check(expired, "alice", "stamp-1") is None


def test_device_tokens_and_session_tokens_never_pass_for_each_other():
    devices, sessions = DeviceTokens(SECRET), TokenAuthority(SECRET)
    session_token, _ = sessions.issue("alice", THUMBPRINT, "stamp-1")
    assert devices.check(session_token, "alice", "stamp-1") is None
    assert refused_code(sessions, devices.issue("alice", "stamp-1")) == "token_invalid"
