"""The UI password: salted scrypt hash in a 0600 file, constant-time check, login throttle."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from device.web.auth import (
    AuthError,
    LoginThrottle,
    hash_password,
    read_password_hash,
    verify_password,
    write_password,
)


class Clock:
    """Time that moves only when the test says so (the throttle takes a clock)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_password_is_stored_only_as_a_salted_hash(tmp_path):
    path = write_password(tmp_path / "cfg" / "ui-password", "s3cret-enough")
    text = path.read_text()
    assert "s3cret-enough" not in text
    stored = read_password_hash(path)
    assert stored.startswith("scrypt$")
    assert verify_password("s3cret-enough", stored)
    assert not verify_password("s3cret-enougH", stored)
    assert hash_password("s3cret-enough") != hash_password("s3cret-enough")  # fresh salt each time


def test_password_file_is_private(tmp_path):
    path = write_password(tmp_path / "new" / "ui-password", "private-password")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_unset_password_reads_as_none_and_damaged_file_is_an_error(tmp_path):
    assert read_password_hash(tmp_path / "missing") is None
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    assert read_password_hash(empty) is None
    damaged = tmp_path / "damaged"
    damaged.write_text("hunter2\n")
    with pytest.raises(AuthError, match="ctpi passwd"):
        read_password_hash(damaged)
    truncated = tmp_path / "truncated"
    truncated.write_text(hash_password("long-enough-pw")[:-30].rsplit("$", 1)[0] + "$@@@\n")
    with pytest.raises(AuthError):
        read_password_hash(truncated)


def test_short_or_padded_passwords_are_refused(tmp_path):
    with pytest.raises(AuthError, match="too short"):
        write_password(tmp_path / "pw", "short")
    with pytest.raises(AuthError, match="white space"):
        write_password(tmp_path / "pw", " padded-password ")
    assert not (tmp_path / "pw").exists()


def test_wrong_passwords_lock_a_client_out_for_a_while():
    clock = Clock()
    throttle = LoginThrottle(max_attempts=3, lockout_seconds=30, clock=clock)
    stored = hash_password("the-right-one")
    assert throttle.attempt("10.0.0.5", "nope-1", stored).attempts_left == 2
    assert throttle.attempt("10.0.0.5", "nope-2", stored).attempts_left == 1
    locked = throttle.attempt("10.0.0.5", "nope-3", stored)
    assert not locked.ok and locked.retry_after_s == 30
    refused = throttle.attempt("10.0.0.5", "the-right-one", stored)  # not even checked while locked
    assert not refused.ok and refused.retry_after_s > 0
    assert throttle.attempt("10.0.0.6", "the-right-one", stored).ok  # other clients are not affected
    clock.now += 31
    assert throttle.attempt("10.0.0.5", "the-right-one", stored).ok


def test_a_right_password_resets_the_count():
    throttle = LoginThrottle(max_attempts=2, lockout_seconds=30, clock=Clock())
    stored = hash_password("the-right-one")
    throttle.attempt("client", "wrong-pass", stored)
    assert throttle.attempt("client", "the-right-one", stored).ok
    assert throttle.attempt("client", "wrong-pass", stored).attempts_left == 1


def test_ctpi_passwd_writes_a_hash_from_stdin(tmp_path):
    path = tmp_path / "conf" / "ui-password"
    done = subprocess.run(
        [sys.executable, "-m", "device.cli", "passwd", "--password-file", str(path), "--stdin"],
        input="from stdin 123\n", capture_output=True, text=True, env=dict(os.environ, HOME=str(tmp_path)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert verify_password("from stdin 123", read_password_hash(path))
    refused = subprocess.run(
        [sys.executable, "-m", "device.cli", "passwd", "--password-file", str(path), "--stdin"],
        input="short\n", capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "too short" in refused.stderr
    assert verify_password("from stdin 123", read_password_hash(path))  # the old one is kept
