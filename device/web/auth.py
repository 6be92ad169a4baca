"""The UI's password: a salted scrypt hash in a file outside the repository, and a login throttle.

The page is served on a hospital LAN, so it is never open by default: until ``ctpi passwd``
has written a hash, the page only says how to set one. The file holds one line
``scrypt$N$r$p$salt$hash`` (base64 parts), is written atomically with mode 0600, and the
password itself is never stored or logged. Comparison is constant-time
(:func:`hmac.compare_digest`); after a few wrong passwords from one client, further tries
are refused for a while, so guessing over the network is slow.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PASSWORD_FILE = Path("~/.config/ctpi/ui-password")
SCHEME = "scrypt"
# 2**14 x 8 x 128 bytes = 16 MiB per check and about 0.1 s on a Raspberry Pi 4: slow for a
# guesser, invisible for a person, and well inside a 1 GB Pi's memory.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_LENGTH = 8


class AuthError(Exception):
    """The password file cannot be used (unreadable, malformed) or a new password is refused."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=HASH_BYTES)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The stored form of ``password``: ``scrypt$N$r$p$salt$hash`` with a fresh random salt."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.strip().split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise AuthError("the password file does not hold a ctpi password hash; write a new one with `ctpi passwd`")
    try:
        n, r, p = (int(value) for value in parts[1:4])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise AuthError("the password hash is damaged; write a new one with `ctpi passwd`") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or not salt or not digest:
        raise AuthError("the password hash has impossible parameters; write a new one with `ctpi passwd`")
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the stored hash; the comparison takes the same time
    whatever the inputs, so response time leaks nothing about the hash."""
    n, r, p, salt, expected = _parse(encoded)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


def read_password_hash(path: str | Path) -> str | None:
    """The stored hash, or ``None`` when no password is set yet (no file, or an empty one)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise AuthError(f"password file {path} cannot be read ({error}); check its owner and mode") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return None
    _parse(lines[0])
    return lines[0]


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
    if password != password.strip():
        raise AuthError("the password starts or ends with white space; that is almost always a typing accident")


def write_password(path: str | Path, password: str) -> Path:
    """Hash ``password`` into ``path`` (created with mode 0600, parent folder 0700 if new),
    replacing any previous one atomically. Returns the expanded path."""
    check_new_password(password)
    path = Path(path).expanduser()
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        text = f"# ctpi UI password hash, written by `ctpi passwd`; delete this file to disable the UI\n{hash_password(password)}\n"
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".ui-password-", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except OSError as error:
        raise AuthError(f"cannot write the password file {path}: {error}") from None
    log.info("UI password hash written to %s", path)
    return path


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    retry_after_s: float = 0.0  # > 0: refused without checking, try again after this long
    attempts_left: int = 0


class LoginThrottle:
    """Counts consecutive wrong passwords per client; after ``max_attempts`` of them the
    client is refused for ``lockout_seconds`` without the password being checked.

    One instance is shared by every session of the UI process (Streamlit runs sessions in
    threads, hence the lock), so opening a new browser tab does not reset the count."""

    def __init__(self, max_attempts: int = 5, lockout_seconds: float = 30.0, clock=time.monotonic):
        if max_attempts < 1 or lockout_seconds < 0:
            raise ValueError("max_attempts must be >= 1 and lockout_seconds >= 0")
        self.max_attempts = max_attempts
        self.lockout_seconds = lockout_seconds
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        with self._lock:
            return max(0.0, self._locked_until.get(client, 0.0) - self._clock())

    def attempt(self, client: str, password: str, encoded: str) -> LoginResult:
        """Check ``password`` for ``client`` unless it is locked out; update the count."""
        wait = self.retry_after(client)
        if wait > 0:
            return LoginResult(ok=False, retry_after_s=wait)
        ok = verify_password(password, encoded)
        with self._lock:
            if ok:
                self._failures.pop(client, None)
                return LoginResult(ok=True, attempts_left=self.max_attempts)
            failures = self._failures.get(client, 0) + 1
            if failures >= self.max_attempts:
                self._failures.pop(client, None)
                self._locked_until[client] = self._clock() + self.lockout_seconds
                log.warning("UI login: %d wrong passwords from %s, locked for %.0f s", failures, client, self.lockout_seconds)
                return LoginResult(ok=False, retry_after_s=self.lockout_seconds)
            self._failures[client] = failures
            return LoginResult(ok=False, attempts_left=self.max_attempts - failures)
