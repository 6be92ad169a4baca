"""The page's TLS certificate: the hospital's own, or a self-signed pair made at first start.

On anything but loopback the page serves HTTPS only (its password and the CT images must not
cross the LAN in clear text). Without a certificate the hospital provides (``[ui] tls_cert`` and
``tls_key``), ``ctpi ui`` makes a self-signed one once, owner-only, in ``STATE/tls/``, and prints
its SHA-256 fingerprint, which ``ctpi status`` and the deploy's health check print too: staff
compare it with what the browser shows before typing the password. Made with the ``openssl``
command (Raspberry Pi OS has it), so the device needs no extra Python package.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import socket
import subprocess
from pathlib import Path

CERT_NAME, KEY_NAME = "cert.pem", "key.pem"
VALID_DAYS = 3650


class TlsError(RuntimeError):
    """No usable certificate; the message says what to do."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fingerprint(cert: Path) -> str:
    """SHA-256 of the certificate's DER bytes as browsers show it (``AB:CD:...``)."""
    text = Path(cert).read_text(encoding="ascii")
    try:
        body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    except IndexError:
        raise TlsError(f"{cert} is not a PEM certificate") from None
    digest = hashlib.sha256(base64.b64decode("".join(body.split()))).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def ensure_self_signed(folder: Path, host: str) -> tuple[Path, Path]:
    """``folder/cert.pem`` and ``folder/key.pem``, made once (EC P-256, owner-only key);
    the names it is valid for are this machine's name, localhost, 127.0.0.1 and ``host``."""
    folder = Path(folder)
    cert, key = folder / CERT_NAME, folder / KEY_NAME
    if cert.is_file() and key.is_file():
        return cert, key
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = {f"DNS:{socket.gethostname()}", "DNS:localhost", "IP:127.0.0.1"}
    try:
        ipaddress.ip_address(host)
        if host not in ("0.0.0.0", "::"):
            names.add(f"IP:{host}")
    except ValueError:
        names.add(f"DNS:{host}")
    partial_cert, partial_key = folder / f".{CERT_NAME}.tmp", folder / f".{KEY_NAME}.tmp"
    old_umask = os.umask(0o077)
    try:
        done = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(partial_key), "-out", str(partial_cert), "-days", str(VALID_DAYS),
             "-subj", f"/CN={socket.gethostname()}/O=ctpi appliance (self-signed)",
             "-addext", "subjectAltName=" + ",".join(sorted(names))],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except FileNotFoundError:
        raise TlsError("the openssl command is missing (apt install openssl), or set [ui] tls_cert and tls_key") from None
    finally:
        os.umask(old_umask)
    if done.returncode != 0:
        raise TlsError(f"openssl could not make a certificate: {done.stderr.strip()}")
    os.replace(partial_key, key)
    os.replace(partial_cert, cert)
    return cert, key


def certificate_for(host: str, cert: Path | None, key: Path | None, state: Path) -> tuple[Path, Path] | None:
    """The pair the page serves with: the configured one, else a self-signed one in
    ``STATE/tls`` when ``host`` is not loopback, else None (plain HTTP on loopback)."""
    if cert or key:
        if not (cert and key and Path(cert).is_file() and Path(key).is_file()):
            raise TlsError(f"[ui] tls_cert and tls_key must both name existing files (got {cert}, {key})")
        return Path(cert), Path(key)
    if is_loopback(host):
        return None
    return ensure_self_signed(Path(state) / "tls", host)
