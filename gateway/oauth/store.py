"""The token store: one encrypted file per user in ``[oauth2] token_dir``.

What a file holds (all of it inside AES-256-GCM under the server key, ``token_key``): the
user name, the refresh token, the scrypt hash of the device password, the last access token
with its expiry (so replicas share it), and when the grant was made and last refreshed. The
file name is an HMAC of the user name under the same key, and the name is bound to the content
as GCM associated data, so a copy of ``token_dir`` without the key reveals nothing, not even
who has a grant, and a file renamed to another user's name does not decrypt.

Writes are atomic (a temporary file, fsync, rename, fsync of the directory). Changes of one
user's file happen under an exclusive ``flock`` of ``NAME.lock`` in the same directory, held
across the refresh call, so replicas sharing the directory refresh one at a time and each reads
the other's rotated token (docs/oauth2.md, "Replicas").

Blocking I/O and scrypt: the server calls this in threads.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import secret_files
from gateway.config import OAuth2Settings

__all__ = [
    "KEY_FILE",
    "SCRYPT",
    "GrantRecord",
    "PasswordHash",
    "StoreError",
    "TokenStore",
    "load_token_key",
]

log = logging.getLogger(__name__)

KEY_FILE = "token.key"
SUFFIX = ".grant"
LOCK_SUFFIX = ".lock"
_MAGIC = b"popgate-oauth-grant/1\n"
_NONCE = 12
MAX_FILE = 256 * 1024  # a record is a few KiB; anything larger is not ours


class StoreError(Exception):
    """The store cannot be used: unreadable key, a file that does not decrypt, a lock that
    stays busy. The message never holds a secret."""


# ---------------------------------------------------------------------------------- key
def parse_key(text: str) -> bytes:
    try:
        return secret_files.parse_key(text)
    except secret_files.InvalidKey as e:
        raise StoreError(f"the token key {e}") from None


def load_token_key(settings: OAuth2Settings, *, create: bool) -> bytes | None:
    """``token_key`` (or what ``token_key_file`` held), else ``token_dir/token.key``, generated
    (32 random bytes, base64, mode 0600) when ``create`` and missing. None: no key yet."""
    path = settings.token_dir / KEY_FILE
    try:
        return secret_files.load_key(
            settings.token_key, path, create=create, what="OAuth token key"
        )
    except secret_files.InvalidKey as e:
        raise StoreError(f"the token key {e}") from None


# ---------------------------------------------------------------------------------- passwords
# scrypt (RFC 7914) from hashlib: memory-hard, in the standard library (no new dependency, unlike
# argon2-cffi), and OpenSSL's implementation. N = 2**15, r = 8, p = 1 uses 32 MiB and about
# 50-200 ms of one core per check (docs/oauth2.md has the measurement); the parameters are stored
# with each hash so they can be raised later without invalidating existing ones.
SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_SCRYPT_MAXMEM = 128 * 1024 * 1024
_SALT = 16
_DKLEN = 32


@dataclass(frozen=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: str  # base64
    hash: str = field(repr=False)  # base64

    @classmethod
    def create(cls, password: str) -> PasswordHash:
        salt = secrets.token_bytes(_SALT)
        digest = _scrypt(password, salt, SCRYPT["n"], SCRYPT["r"], SCRYPT["p"])
        return cls(
            **SCRYPT,
            salt=base64.b64encode(salt).decode(),
            hash=base64.b64encode(digest).decode(),
        )

    def matches(self, password: str) -> bool:
        digest = _scrypt(password, base64.b64decode(self.salt), self.n, self.r, self.p)
        return hmac.compare_digest(digest, base64.b64decode(self.hash))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=_DKLEN
    )


# A hash of a random password, checked for users without a grant: the same work as a real
# check, so timing does not tell which users exist.
_DUMMY: PasswordHash | None = None


def dummy_check(password: str) -> bool:
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = PasswordHash.create(secrets.token_urlsafe(16))
    _DUMMY.matches(password)
    return False


# ---------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class GrantRecord:
    """One user's grant. Times are seconds since the epoch."""

    user: str
    refresh_token: str = field(repr=False)
    password: PasswordHash
    created: float
    refreshed: float | None = None
    access_token: str = field(default="", repr=False)
    access_expires: float = 0.0
    scope: str = ""

    def with_tokens(
        self, access_token: str, expires_at: float, refresh_token: str, now: float
    ) -> GrantRecord:
        return replace(
            self,
            access_token=access_token,
            access_expires=expires_at,
            refresh_token=refresh_token or self.refresh_token,
            refreshed=now,
        )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> GrantRecord:
        raw: dict[str, Any] = json.loads(data)
        raw["password"] = PasswordHash(**raw["password"])
        return cls(**raw)


@dataclass(frozen=True)
class Listed:
    """One file of ``popgate oauth list``: a record, or why it could not be read."""

    path: Path
    record: GrantRecord | None
    problem: str = ""


Signature = tuple[int, int, int]  # (inode, size, mtime_ns): changes whenever a file is replaced


class TokenStore:
    """The files of one token directory under one key; blocking (threads in the server)."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self.directory = directory
        self._aead = AESGCM(key)
        self._name_key = hmac.new(key, b"popgate oauth file names", hashlib.sha256).digest()

    def prepare(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- names ----------------------------------------------------------------------------
    def stem(self, user: str) -> str:
        return hmac.new(self._name_key, user.encode("utf-8"), hashlib.sha256).hexdigest()[:40]

    def path(self, user: str) -> Path:
        return self.directory / (self.stem(user) + SUFFIX)

    # -- reading --------------------------------------------------------------------------
    def signature(self, user: str) -> Signature | None:
        """Cheap change detection for the server's caches: None when there is no grant."""
        try:
            st = os.stat(self.path(user))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self, user: str) -> GrantRecord | None:
        path = self.path(user)
        try:
            data = _read_bounded(path)
        except FileNotFoundError:
            return None
        record = self._decrypt(path, data)
        if record.user != user:  # an HMAC collision would be needed: treat as damage
            raise StoreError(f"{path} belongs to another user")
        return record

    def _decrypt(self, path: Path, data: bytes) -> GrantRecord:
        stem = path.name.removesuffix(SUFFIX)
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _NONCE + 16:
            raise StoreError(f"{path} is not a popgate grant file")
        body = data[len(_MAGIC) :]
        try:
            plain = self._aead.decrypt(body[:_NONCE], body[_NONCE:], _MAGIC + stem.encode())
        except InvalidTag:
            raise StoreError(
                f"{path} does not decrypt: another token key, or the file was changed"
            ) from None
        try:
            return GrantRecord.from_json(plain)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"{path} holds an unreadable record ({type(exc).__name__})") from None

    def listing(self) -> list[Listed]:
        """Every grant file, decrypted where possible, ordered by user name."""
        found: list[Listed] = []
        try:
            paths = sorted(self.directory.glob("*" + SUFFIX))
        except FileNotFoundError:
            return []
        for path in paths:
            try:
                found.append(Listed(path, self._decrypt(path, _read_bounded(path))))
            except FileNotFoundError:
                continue  # removed meanwhile
            except (StoreError, OSError) as exc:
                found.append(Listed(path, None, str(exc)))
        found.sort(key=lambda item: (item.record is None, item.record.user if item.record else ""))
        return found

    # -- writing (callers hold the user's lock) ------------------------------------------
    def write(self, record: GrantRecord) -> None:
        self.prepare()
        path = self.path(record.user)
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._aead.encrypt(
            nonce, record.to_json(), _MAGIC + self.stem(record.user).encode()
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            secret_files.write_new(tmp, _MAGIC + nonce + sealed)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        secret_files.fsync_dir(self.directory)

    def remove(self, user: str) -> bool:
        try:
            self.path(user).unlink()
        except FileNotFoundError:
            return False
        secret_files.fsync_dir(self.directory)
        return True

    # -- locking --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, user: str, timeout: float) -> Iterator[None]:
        """Hold ``user``'s lock (blocking up to ``timeout`` s, then StoreError)."""
        fd = self.acquire(user, timeout)
        try:
            yield
        finally:
            self.release(fd)

    def acquire(self, user: str, timeout: float) -> int:
        """Take ``user``'s exclusive lock; returns the descriptor to :meth:`release`.

        flock (not fcntl/lockf record locks): it belongs to the open file, so two holders in
        one process exclude each other too, and closing another descriptor of the same file
        does not drop it. On NFS, Linux maps flock to byte-range locks, shared between hosts.
        """
        self.prepare()
        path = self.directory / (self.stem(user) + LOCK_SUFFIX)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        delay = 0.005
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise StoreError(f"the token store lock of a user stayed busy {timeout:g} s")
                time.sleep(delay)  # a thread of the pool, never the reactor
                delay = min(delay * 2, 0.1)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def release(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise StoreError(f"{path} is larger than {MAX_FILE} bytes")
    return data
