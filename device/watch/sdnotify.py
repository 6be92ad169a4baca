"""systemd's notify protocol (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``), one datagram each.

``sd_notify(3)`` is a datagram of ``KEY=VALUE`` lines sent to the unix socket named in
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). That is all it is, so no
dependency: outside systemd the variable is unset and every call does nothing.
``$WATCHDOG_USEC`` says how often systemd expects ``WATCHDOG=1``; we ping at half that.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages if systemd asked for them. Construct once at start-up: the
    environment is read here and nowhere else."""

    def __init__(self, environ: dict | None = None):
        environ = os.environ if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET") or None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        valid = usec.isdigit() and int(usec) > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid()))
        self.watchdog_seconds = int(usec) / 1e6 if valid else None
        self._socket = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def ping_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the configured timeout), or None."""
        return self.watchdog_seconds / 2 if self.watchdog_seconds else None

    def notify(self, **fields) -> bool:
        """Send ``KEY=VALUE`` lines (``ready=1`` becomes ``READY=1``) as one datagram."""
        if not self.address:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, address)
            return True
        except OSError as error:  # systemd gone or socket misconfigured: never fatal
            log.warning("sd_notify to %s failed: %s", self.address, error)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify(ready=1, status=status) if status else self.notify(ready=1)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def stopping(self) -> bool:
        return self.notify(stopping=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
