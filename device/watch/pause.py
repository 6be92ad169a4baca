"""Crash tests' pause points: where the watch daemon may stop itself (SIGSTOP) so a test can kill it there."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

# Crash tests only: a named point where the daemon stops itself (SIGSTOP) so that a test can
# SIGKILL it exactly there, e.g. between "journal committed" and "file moved". The crash is a
# real kill -9; this only makes its timing deterministic. Read once, here; unset in production.
PAUSE_ENVIRONMENT = "CTPI_TEST_PAUSE_AT"  # "committed" or "decoding:<inbox-relative path>"
_PAUSE_AT = os.environ.get(PAUSE_ENVIRONMENT, "")


def pause_point(name: str, subject: str = "") -> None:
    """Stop this process at ``name`` when a crash test asked for it; otherwise nothing."""
    if _PAUSE_AT and _PAUSE_AT in (name, f"{name}:{subject}"):
        log.warning("stopped at %s %s for a crash test", name, subject, extra={"event": "paused", "point": name})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
