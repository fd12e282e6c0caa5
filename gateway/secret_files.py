"""Files that hold secrets: the spool key, the OAuth token key, sealed records.

One place for how they are written (mode 0600 from the start, fsync, then the directory's
fsync, so a crash never leaves a half-written key or a file readable by others) and for the
32-byte base64 keys both stores use.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


class InvalidKey(ValueError):
    """A configured or stored key that is not 32 bytes in base64."""


def parse_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise InvalidKey("must be 32 bytes in base64")
    return key


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600 from the start), write all of ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_key(configured: str, path: Path, *, create: bool, what: str) -> bytes | None:
    """``configured`` when set, else the key in ``path``, generated (32 random bytes, base64,
    mode 0600) when ``create`` and missing. None: no key yet. Raises InvalidKey."""
    if configured:
        return parse_key(configured)
    if create and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = base64.b64encode(secrets.token_bytes(32)) + b"\n"
        with contextlib.suppress(FileExistsError):  # another process was first: use its key
            write_new(path, text)
            fsync_dir(path.parent)
            log.warning("generated the %s %s; keep it: what it sealed needs it", what, path)
    try:
        return parse_key(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidKey(f"{path} cannot be read: {e}") from None
