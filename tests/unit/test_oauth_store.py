"""The token store on disk: encrypted records, scrypt device passwords, atomic writes, locks,
and what a copy of token_dir without the key gives away (nothing)."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from pathlib import Path

import pytest

from gateway.config import OAuth2Settings
from gateway.oauth import store as store_module
from gateway.oauth.login import format_listing
from gateway.oauth.store import (
    KEY_FILE,
    SCRYPT,
    GrantRecord,
    PasswordHash,
    StoreError,
    TokenStore,
    dummy_check,
    load_token_key,
)

USER = "alice@example.org"
REFRESH = "0.AAAA-refresh-token-of-alice-Zm9vYmFy"
ACCESS = "eyJ0eXAiOiJKV1QiLCJhbGciOi.access-token-of-alice"
PASSWORD = "scanner-secret-42"


@pytest.fixture(scope="module")
def password_hash() -> PasswordHash:
    return PasswordHash.create(PASSWORD)  # one scrypt for the module: it is slow on purpose


def record(password_hash: PasswordHash, user: str = USER) -> GrantRecord:
    return GrantRecord(
        user=user,
        refresh_token=REFRESH,
        password=password_hash,
        created=1_700_000_000.0,
        refreshed=1_700_000_500.0,
        access_token=ACCESS,
        access_expires=1_700_003_600.0,
        scope="mail offline_access",
    )


def make_store(tmp_path: Path, key: bytes | None = None) -> TokenStore:
    return TokenStore(tmp_path / "tokens", key or os.urandom(32))


def test_round_trip_and_repr_hides_secrets(tmp_path: Path, password_hash: PasswordHash) -> None:
    store = make_store(tmp_path)
    with store.locked(USER, 5):
        store.write(record(password_hash))
    back = store.read(USER)
    assert back == record(password_hash)
    assert store.read("bob") is None
    for secret in (REFRESH, ACCESS, password_hash.hash):
        assert secret not in repr(back)
    # no temporary file is left behind; the directory is private
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(
        [store.path(USER).name, store.stem(USER) + ".lock"]
    )
    assert stat.S_IMODE(store.path(USER).stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700


def test_device_password_is_a_scrypt_hash(password_hash: PasswordHash) -> None:
    assert (password_hash.n, password_hash.r, password_hash.p) == (
        SCRYPT["n"],
        SCRYPT["r"],
        SCRYPT["p"],
    )
    assert len(base64.b64decode(password_hash.salt)) == 16
    assert password_hash.matches(PASSWORD)
    assert not password_hash.matches(PASSWORD + "x")
    assert not password_hash.matches("")
    assert dummy_check(PASSWORD) is False


def test_a_stolen_token_dir_without_the_key_reveals_nothing(
    tmp_path: Path, password_hash: PasswordHash
) -> None:
    key = os.urandom(32)
    store = make_store(tmp_path, key)
    for user in (USER, "bob"):
        store.write(record(password_hash, user))
    stolen = tmp_path / "stolen"
    shutil.copytree(store.directory, stolen)
    blob = b"".join(p.read_bytes() + p.name.encode() for p in stolen.iterdir())
    for secret in (USER, "alice", "bob", REFRESH, ACCESS, PASSWORD, "offline_access"):
        assert secret.encode() not in blob, secret
    for part in (password_hash.hash, password_hash.salt):  # not even the hash and salt
        assert part.encode() not in blob
        assert base64.b64decode(part) not in blob
    # another key opens nothing, and says so
    thief = TokenStore(stolen, os.urandom(32))
    assert thief.read(USER) is None  # names are keyed: the thief cannot even find the file
    listed = thief.listing()
    assert [item.record for item in listed] == [None, None]
    assert all("does not decrypt" in item.problem for item in listed)


def test_a_file_moved_to_another_users_name_does_not_decrypt(
    tmp_path: Path, password_hash: PasswordHash
) -> None:
    store = make_store(tmp_path)
    store.write(record(password_hash, USER))
    shutil.copy(store.path(USER), store.path("mallory"))
    with pytest.raises(StoreError, match="does not decrypt"):
        store.read("mallory")
    data = bytearray(store.path(USER).read_bytes())
    data[-1] ^= 1
    store.path(USER).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not decrypt"):
        store.read(USER)


def test_a_failed_write_leaves_the_old_record_and_no_temporary_file(
    tmp_path: Path, password_hash: PasswordHash, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    store.write(record(password_hash))
    before = store.path(USER).read_bytes()

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", disk_full)
    rotated = record(password_hash).with_tokens("new-access", 1.0, "new-refresh", 2.0)
    with pytest.raises(OSError):
        store.write(rotated)
    assert store.path(USER).read_bytes() == before
    assert [p.name for p in store.directory.iterdir()] == [store.path(USER).name]


def test_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    other = TokenStore(store.directory, os.urandom(32))  # a second replica's view
    with store.locked(USER, 5):
        with pytest.raises(StoreError, match="stayed busy"):
            store.acquire(USER, 0.05)
        # another user's lock is independent
        with store.locked("bob", 0.05):
            pass
    del other
    with store.locked(USER, 0.05):  # released
        pass


def test_generated_key_is_private_and_stable(tmp_path: Path) -> None:
    settings = OAuth2Settings(token_dir=tmp_path / "t")
    assert load_token_key(settings, create=False) is None
    key = load_token_key(settings, create=True)
    assert key is not None and len(key) == 32
    path = tmp_path / "t" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token_key(settings, create=True) == key
    configured = base64.b64encode(bytes(range(32))).decode()
    own = OAuth2Settings(token_dir=tmp_path / "u", token_key=configured)
    assert load_token_key(own, create=True) == bytes(range(32))
    assert not (tmp_path / "u").exists()  # a configured key writes nothing


def test_listing_shows_state_never_a_token(tmp_path: Path, password_hash: PasswordHash) -> None:
    store = make_store(tmp_path)
    store.write(record(password_hash, "zoe"))
    store.write(record(password_hash, USER))
    (store.directory / ("0" * 40 + ".grant")).write_bytes(b"junk")
    lines = format_listing(store, now=1_700_000_000.0 + 2 * 86400 + 3 * 3600)
    text = "\n".join(lines)
    assert lines[0].split() == [
        "USER",
        "SIGNED",
        "IN",
        "TOKEN",
        "AGE",
        "LAST",
        "REFRESH",
        "ACCESS",
        "TOKEN",
    ]
    assert lines[1].split()[:6] == [USER, "2023-11-14", "22:13:20Z", "2d", "3h", "2d"]
    assert lines[1].endswith("expired")
    assert lines[2].startswith("zoe ")
    assert "unreadable:" in lines[3] and "not a popgate grant file" in lines[3]
    for secret in (REFRESH, ACCESS, password_hash.hash, password_hash.salt):
        assert secret not in text
