"""Keys, fingerprints and hybrid encryption, on the ``cryptography`` package.

Bytes in, bytes out: no sockets, no protocol state. RSA-OAEP (SHA-256) wraps an
AES-256-GCM key for one recipient (the server's serves that recipient's frames for a few
seconds: ``RecipientSealer``); RSA-PSS signs the server's handshake.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import resource
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALLOWED_KEY_SIZES = (2048, 3072, 4096)
DEFAULT_KEY_SIZE = 2048
PUBLIC_EXPONENT = 65537
AES_KEY_SIZE = 32
NONCE_SIZE = 12
SESSION_KEY_SIZE = 32

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)

PrivateKey = rsa.RSAPrivateKey
PublicKey = rsa.RSAPublicKey


class CryptoError(Exception):
    """Decryption, verification or key loading failed. Says what, never the secret."""


class InsecureFileError(CryptoError):
    """A secret file is readable or writable by someone other than its owner."""


# --------------------------------------------------------------------------- keys


def generate_private_key(key_size: int = DEFAULT_KEY_SIZE) -> PrivateKey:
    """Generate an RSA key pair of an allowed size."""
    if key_size not in ALLOWED_KEY_SIZES:
        raise ValueError(f"key size must be one of {ALLOWED_KEY_SIZES}, not {key_size}")
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=key_size)


def public_key_bytes(public_key: PublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo encoding: what goes on the wire and into fingerprints."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(der: bytes) -> PublicKey:
    """Load a peer's public key, accepting only RSA of an allowed size with e = 65537."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # e.g. an EC key on an unknown curve
        raise CryptoError("not a valid DER public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CryptoError("public key is not RSA")
    if key.key_size not in ALLOWED_KEY_SIZES:
        raise CryptoError(f"RSA key size {key.key_size} not in {ALLOWED_KEY_SIZES}")
    if key.public_numbers().e != PUBLIC_EXPONENT:
        raise CryptoError("RSA public exponent must be 65537")
    return key


def fingerprint(public_key: PublicKey) -> str:
    """SHA-256 fingerprint of the DER public key, written as ``ssh-keygen -l`` does."""
    digest = hashlib.sha256(public_key_bytes(public_key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def jwk_thumbprint(public_key: PublicKey) -> str:
    """RFC 7638 JWK SHA-256 thumbprint: the ``jkt`` of an RFC 7800 ``cnf`` claim."""
    numbers = public_key.public_numbers()
    canonical = json.dumps(
        {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


# --------------------------------------------------------------------------- hybrid encryption


class RandomPool:
    """Bytes from ``os.urandom``, fetched a block at a time per thread and handed out once each.

    Every ``os.urandom`` call drops and retakes the GIL; with a writer thread per client,
    each drop wakes another thread, and those hand-offs cost the server more than the
    bytes. Fetching a block per thread makes it one call per ``block_size`` bytes. Each
    byte is given out once, and a forked child starts with empty pools, so a child can
    never reuse its parent's keys or nonces.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._per_thread = threading.local()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._per_thread = threading.local()

    def take(self, size: int) -> bytes:
        """``size`` fresh random bytes (at most ``block_size``), never handed out before."""
        if size > self.block_size:
            return os.urandom(size)
        state = self._per_thread
        block: bytes = getattr(state, "block", b"")
        start: int = getattr(state, "used", 0)
        if start + size > len(block):
            block = state.block = os.urandom(self.block_size)
            start = 0
        state.used = start + size
        return block[start : start + size]


#: The AES keys and nonces of ``seal``: 46 messages' worth per fetch, 2 KiB per sending thread.
_message_randomness = RandomPool(block_size=2048)


def wrap_key(recipient_public_key: PublicKey, key: bytes) -> bytes:
    """Encrypt a symmetric key for one recipient with RSA-OAEP (SHA-256)."""
    return recipient_public_key.encrypt(key, _OAEP)


#: How long one message key serves a recipient's frames (seconds), and for how many at most.
#: See ``RecipientSealer``: the RSA wrap, most of what a delivery costs, is paid once per key.
MESSAGE_KEY_LIFETIME = 5.0
MESSAGE_KEY_USES = 1024


class RecipientSealer:
    """``seal`` for one recipient, with each AES key and its RSA wrap serving a few seconds of frames.

    The RSA-OAEP wrap is most of what a delivery costs the server, and a recipient in a busy
    room gets many frames a second. So a fresh AES-256-GCM key, wrapped for the recipient's
    RSA key, seals that recipient's frames for up to ``MESSAGE_KEY_LIFETIME`` seconds and
    ``MESSAGE_KEY_USES`` frames, each frame with its own random nonce and carrying the same
    wrap. Every frame is still readable only with the recipient's private key, and opens on
    its own. A key is never shared between recipients or connections.

    Not thread-safe: its one owner (the connection's send worker) seals.
    """

    def __init__(
        self,
        recipient_public_key: PublicKey,
        *,
        key_lifetime: float = MESSAGE_KEY_LIFETIME,
        key_uses: int = MESSAGE_KEY_USES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recipient_public_key = recipient_public_key
        self._key_lifetime = key_lifetime
        self._key_uses = key_uses
        self._clock = clock
        self._cipher: AESGCM | None = None
        self._wrapped = b""
        self._expires = 0.0
        self._uses_left = 0

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        """Encrypt for the recipient: (wrapped AES key, nonce, ciphertext with tag), the key a recent one."""
        now = self._clock()
        if self._cipher is None or self._uses_left <= 0 or now >= self._expires:
            message_key = _message_randomness.take(AES_KEY_SIZE)
            self._cipher = AESGCM(message_key)
            self._wrapped = wrap_key(self.recipient_public_key, message_key)
            self._expires = now + self._key_lifetime
            self._uses_left = self._key_uses
        self._uses_left -= 1
        nonce = _message_randomness.take(NONCE_SIZE)
        return self._wrapped, nonce, self._cipher.encrypt(nonce, plaintext, aad)


def seal(recipient_public_key: PublicKey, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
    """Encrypt once for one recipient, under a key of its own: (wrapped AES key, nonce, ciphertext with tag)."""
    return RecipientSealer(recipient_public_key).seal(plaintext, aad)


class SealedOpener:
    """``open_sealed`` under one private key, unwrapping a wrapped key once while frames repeat it.

    Frames from a ``RecipientSealer`` carry the same wrap for seconds at a time; the RSA
    decryption of the last one is kept, by its exact bytes, so the rest cost an AES-GCM
    decryption. Not thread-safe: its one owner (a connection's reader) opens.
    """

    def __init__(self, private_key: PrivateKey) -> None:
        self.private_key = private_key
        self._last_wrapped = b""
        self._last_cipher: AESGCM | None = None

    def open(self, wrapped_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """As ``open_sealed``; raises ``CryptoError`` if anything was altered or misdirected."""
        if self._last_cipher is None or wrapped_key != self._last_wrapped:
            self._last_cipher = _unwrapped_cipher(self.private_key, wrapped_key)
            self._last_wrapped = wrapped_key
        return _open_with(self._last_cipher, nonce, ciphertext, aad)


def _unwrapped_cipher(private_key: PrivateKey, wrapped_key: bytes) -> AESGCM:
    try:
        message_key = private_key.decrypt(wrapped_key, _OAEP)
    except ValueError as exc:
        raise CryptoError("cannot unwrap message key") from exc
    if len(message_key) != AES_KEY_SIZE:
        raise CryptoError("bad message key or nonce size")
    return AESGCM(message_key)


def _open_with(cipher: AESGCM, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise CryptoError("bad message key or nonce size")
    try:
        return cipher.decrypt(nonce, ciphertext, aad)
    except InvalidTag as exc:
        raise CryptoError("message failed authentication") from exc


def open_sealed(private_key: PrivateKey, wrapped_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Reverse ``seal``; raises ``CryptoError`` if anything was altered or misdirected."""
    return _open_with(_unwrapped_cipher(private_key, wrapped_key), nonce, ciphertext, aad)


def sign(private_key: PrivateKey, data: bytes) -> bytes:
    """RSA-PSS (SHA-256) signature."""
    return private_key.sign(data, _PSS, hashes.SHA256())


def verify_signature(public_key: PublicKey, signature: bytes, data: bytes) -> None:
    """Raise ``CryptoError`` unless ``signature`` is the key owner's over ``data``."""
    try:
        public_key.verify(signature, data, _PSS, hashes.SHA256())
    except InvalidSignature as exc:
        raise CryptoError("signature does not verify") from exc


class SessionCipher:
    """AES-256-GCM under a key derived from the session key, for one direction of one connection.

    A client's frames after its login need no RSA: the server alone knows the session
    key (it came inside the RSA-wrapped login), so a key derived from it keeps those
    frames as secret as a per-frame RSA wrap would, and saves the server an RSA
    decryption (about 0.7 ms) for every line it is sent. What the server sends each
    recipient is still wrapped for that recipient's RSA key.
    """

    def __init__(self, session_key: bytes, direction: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=AES_KEY_SIZE, salt=None, info=b"chat cipher\0" + direction)
        self._aead = AESGCM(key.derive(session_key))

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt: returns (nonce, ciphertext with tag). Nonces are random: 96 bits, one key per connection."""
        nonce = _message_randomness.take(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Reverse ``seal``; raises ``CryptoError`` if anything was altered."""
        if len(nonce) != NONCE_SIZE:
            raise CryptoError("bad nonce size")
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag as exc:
            raise CryptoError("message failed authentication") from exc


def session_mac_key(session_key: bytes) -> bytes:
    """The MAC key of a session: HKDF of the session key with its own label, so that no key
    serves two jobs (the cipher's key is another derivation, ``SessionCipher``)."""
    return HKDF(algorithm=hashes.SHA256(), length=AES_KEY_SIZE, salt=None, info=b"chat mac").derive(session_key)


def session_mac(session_key: bytes, direction: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 under the session's MAC key (see ``session_mac_key``), labelled by direction."""
    # hmac.digest is the one-shot C path: same MAC as hmac.new(...).digest(), less Python.
    return hmac.digest(session_mac_key(session_key), direction + b"\0" + data, "sha256")


class SessionMac:
    """``session_mac`` under one fixed key and direction, for the many frames of one connection.

    The keyed HMAC state is computed once and copied per frame: the same MAC for
    about half the cost, which the server pays once per delivery.
    """

    def __init__(self, session_key: bytes, direction: bytes) -> None:
        self._keyed = hmac.new(session_mac_key(session_key), direction + b"\0", hashlib.sha256)

    def digest(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data``: equal to ``session_mac(session_key, direction, data)``."""
        mac = self._keyed.copy()
        mac.update(data)
        return mac.digest()


def macs_equal(expected: bytes, received: bytes) -> bool:
    return hmac.compare_digest(expected, received)


# --------------------------------------------------------------------------- secrets on disk


def forbid_core_dumps() -> None:
    """Keep this process's memory off the disk if it crashes: no core dump.

    A server's memory holds its private key, the token secret, the history and cluster keys and
    the lines being sealed; a client's, its private key, its password as typed and the chat. A
    core file would put them on disk in clear, readable by whoever reads the crash. The hard
    limit is lowered too, so that nothing this process starts may raise it again. Where the
    kernel pipes core dumps to a handler (systemd-coredump, apport), the handler honours it.
    """
    with contextlib.suppress(ValueError, OSError):  # a platform without the limit keeps its own
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def check_owner_only(path: Path) -> None:
    """Raise ``InsecureFileError`` if group or others have any access to ``path``."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureFileError(
            f"{path} is accessible by other users (mode {stat.filemode(mode)}); fix it with: chmod 600 {path}"
        )


def check_not_writable_by_others(path: Path, info: os.stat_result) -> None:
    """Raise ``InsecureFileError`` if another user may write ``path`` (whose ``os.stat`` is ``info``):
    its mode lets group or others write it, or another user owns it (an owner may always write).
    Root may own it: root may write anything anyway."""
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InsecureFileError(
            f"{path} is writable by other users (mode {stat.filemode(info.st_mode)}); fix it with: chmod 600 {path}"
        )
    if hasattr(os, "geteuid") and info.st_uid not in (os.geteuid(), 0):
        raise InsecureFileError(
            f"{path} belongs to another user (uid {info.st_uid}), who may rewrite it; it must be yours or root's"
        )


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 holding all of ``data``; never overwrites an existing file.

    The bytes go to a new temporary file beside it (created exclusively, mode 0600),
    reach the disk, and only then get the final name, as a hard link: a crash leaves
    no half-written secret under that name, and of two processes creating it at once
    one wins and the other gets ``FileExistsError``, its own file discarded. The
    temporary name is gone on return, whatever happened. Raises ``OSError``.
    """
    directory = path.parent
    # mkstemp opens with O_EXCL and O_NOFOLLOW, mode 0600.
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            remaining = memoryview(data)
            while remaining:
                remaining = remaining[os.write(fd, remaining) :]
            os.fsync(fd)
        except OSError as exc:  # a full disk, say: name the file, which os.write's error does not
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        finally:
            os.close(fd)
        # Unlike a rename, a link refuses to replace an existing file.
        os.link(temp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create_private_key(path: Path, key_size: int = DEFAULT_KEY_SIZE) -> PrivateKey:
    """Load the server's persistent key, generating it (mode 0600) on first run."""
    if not path.exists():
        key = generate_private_key(key_size)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with contextlib.suppress(FileExistsError):  # another process starting at once made it first
            write_secret_file(path, pem)
            return key
    check_owner_only(path)
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"{path} does not hold a readable private key") from exc
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise CryptoError(f"{path} does not hold an RSA private key")
    return loaded


def load_or_create_secret(path: Path, size: int = 32) -> bytes:
    """Load a random secret, generating ``size`` bytes (mode 0600) on first run."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process starting at once made it first
            write_secret_file(path, os.urandom(size).hex().encode("ascii"))
    check_owner_only(path)
    try:
        secret = bytes.fromhex(path.read_text("ascii").strip())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CryptoError(f"{path} does not hold a hex secret") from exc
    if len(secret) < size:
        raise CryptoError(f"{path} holds fewer than {size} bytes of secret")
    return secret
