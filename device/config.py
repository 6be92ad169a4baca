"""The appliance's settings: one dataclass per TOML section, defaults here, flags on top.

A config file is TOML (``tomllib``; ``tomli`` before Python 3.11) with one table per
section, ``[watch]`` for the daemon (and later ``[ui]``). Every field has a default and a
docstring; unknown sections, unknown keys and values of the wrong type are errors naming the
file and key, so a typo never silently falls back to a default. Command-line flags override
the file (:func:`override`). Without ``--config`` the first existing file of
:data:`DEFAULT_PATHS` is read; with none, the defaults apply.

Adding a section: write a dataclass whose fields all have defaults and add it as a field of
:class:`Config`; :func:`load_config` finds sections from :class:`Config`'s fields.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PATHS = (Path("/etc/ctpi/ctpi.toml"),)
CONFIG_ENV = "CTPI_CONFIG"  # a config file to read first (the units set it)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class LogFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True)
class WatchConfig:
    """``[watch]``: the watch-folder daemon (``ctpi watch``)."""

    inbox: Path = Path("var/inbox")
    """Folder that slices are dropped into; each subfolder is a study."""
    state: Path = Path("var/state")
    """Folder the daemon owns: ``journal.sqlite`` and the ``done/`` and ``rejected/`` files."""
    model: Path = Path("models/mobilenetv2")
    """Model bundle folder."""
    bundle_sha256: str = ""
    """The identity (``bundle_sha256``) ``model`` must have; the deploy pins it in the units'
    command lines, so a bundle changed on the Pi after the deploy is refused. Empty: any
    bundle whose manifest matches its own seal."""
    format: str | None = None
    """Model format inside the bundle (``int8``, ``float32``, ...); default: the bundle's own."""
    threads: int | None = None
    """Inference threads; default: cores, at most 4."""
    settle_seconds: float = 1.0
    """A file is read only after its size and mtime stayed unchanged this long: copies over
    SMB or from a PACS arrive in pieces, and close-write alone is not proof of completeness
    (some writers close and reopen)."""
    rescan_seconds: float = 30.0
    """Full inbox rescan interval, the safety net for missed file-system events."""
    batch_size: int = 16
    """Results committed per SQLite transaction (one fsync per group, not per slice)."""
    batch_seconds: float = 0.5
    """A partial group is committed after this long, so results appear promptly."""
    queue_size: int = 4
    """Decoded slices waiting for inference (bounds memory: each holds one model input)."""
    max_attempts: int = 3
    """A file that was being decoded when the daemon died this many times is rejected
    (``crashed-daemon``) instead of being read again: no restart loop on one poison file."""
    heartbeat_seconds: float = 5.0
    """Interval of the heartbeat row that ``ctpi status`` and the UI read."""
    retry_seconds: float = 10.0
    """After a storage error (full disk, read-only state) the daemon retries this often."""
    min_free_mb: float = 50.0
    """Stop taking files while the state folder's file system has less free space than this."""
    keep_done_days: float = 0.0
    """Delete a triaged image from ``STATE/done/`` this many days after it got there; its
    journal record (result, sha256, study verdict) stays. 0 keeps every image, and a full
    disk then stops intake at ``min_free_mb``. Rejected files are never deleted: someone
    has to look at them. On a Pi's SD card, a busy site fills gigabytes a day."""
    ignore: tuple[str, ...] = (".*", "*.part", "*.tmp", "*.crdownload")
    """Name patterns (fnmatch, case-insensitive) of files that are still being written or not
    slices; folders starting with a dot are skipped too."""
    log_format: LogFormat = LogFormat.TEXT
    """``text`` for people, ``json`` (one object per line) for log collectors."""
    study_heatmaps: bool = True
    """When idle, make the occlusion heatmap of each study's top slice (``[ui] heatmap_grid``
    patches a side) and keep it in the journal, for the DICOM node's Secondary Capture: the
    daemon that scored the slice already holds the model, so the node needs none. Off: the
    node sends its Secondary Capture without a heatmap."""


@dataclass(frozen=True)
class UiConfig:
    """``[ui]``: the web page (``ctpi ui``). It reads the journal in ``[watch] state``, selects
    ``[watch] model`` first, and copies an upload into ``[watch] inbox`` only when asked."""

    host: str = "127.0.0.1"
    """Address to serve on: 127.0.0.1 on a desktop, the Pi's LAN address on the appliance."""
    port: int = 8501
    """TCP port of the page."""
    tls_cert: Path | None = None
    """PEM certificate the page serves HTTPS with (the hospital's own). Unset, a page on
    anything but loopback makes a self-signed pair once in ``[watch] state``/tls and prints its
    SHA-256 fingerprint; on 127.0.0.1 it serves plain HTTP."""
    tls_key: Path | None = None
    """The private key of ``tls_cert`` (PEM, owner-only)."""
    models_dir: Path = Path("models")
    """Folder whose bundles the model selector offers (besides ``[watch] model``)."""
    password_file: Path = Path("~/.config/ctpi/ui-password")
    """The salted password hash written by ``ctpi passwd``; keep it outside the repository."""
    max_upload_mb: int = 32
    """Largest file the page accepts, in MB."""
    heatmap_grid: int = 7
    """Occlusion heatmap resolution: grid x grid patches, grid**2 extra invokes per slice; the
    watch daemon's study heatmaps (``[watch] study_heatmaps``) use it too (0, which turns the
    page's heatmap off, leaves them at 7)."""
    login_attempts: int = 5
    """Wrong passwords from one client before it has to wait."""
    lockout_seconds: float = 30.0
    """How long that wait is."""
    page_size: int = 50
    """History rows per page (the journal is queried one page at a time)."""
    threads: int | None = None
    """Inference threads for the page's model; default: cores, at most 4."""


@dataclass(frozen=True)
class DicomConfig:
    """``[dicom]``: the DICOM node (``ctpi dicom``). It writes received instances into
    ``[watch] inbox`` and reads verdicts from the journal in ``[watch] state``."""

    aet: str = "CTPI"
    """Our application entity title (what the PACS or scanner calls)."""
    host: str = "127.0.0.1"
    """Address to listen on: the Pi's LAN address on the appliance, 127.0.0.1 for tests."""
    port: int = 11112
    """TCP port of the Storage SCP."""
    allow: tuple[str, ...] = ()
    """Who may send: ``AET`` or ``AET@HOST`` (calling AE title, optionally its source address).
    Empty refuses every association: a node on a hospital LAN must name its peers."""
    send_to: str = ""
    """Where results go, ``AET@HOST:PORT`` (the PACS); empty keeps them in the outbox."""
    stable_seconds: float = 60.0
    """A study is complete when no instance of it arrived for this long (DICOM has no
    end-of-study message; Orthanc's stable-study rule)."""
    max_instance_mb: float = 64.0
    """Larger datasets get a failure status and are never written."""
    retry_seconds: float = 30.0
    """A result the destination did not take is sent again after this long."""
    heatmap: bool = True
    """Burn the occlusion heatmap of the top slice into the Secondary Capture. The watch daemon
    makes it (``[watch] study_heatmaps``) and the node only draws it: the node loads no model."""
    heatmap_wait_seconds: float = 30.0
    """With ``heatmap``, a complete and triaged study waits this long for its top slice's
    heatmap (the watch daemon makes it when idle, so a busy one may be late); past it, or at
    once when the watch daemon's heartbeat says it makes none, the Secondary Capture goes out
    without it and the log says why."""


@dataclass(frozen=True)
class Config:
    """All sections; each field is one ``[section]`` of the file."""

    watch: WatchConfig = field(default_factory=WatchConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)


def _convert(value, annotation, where: str):
    """Check and convert one TOML value to a field's annotated type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _convert(value, options[0], where)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, item, where) for v in value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [m.value for m in annotation]
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return annotation(value)
    if annotation is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int or annotation is bool or annotation is str:
        if type(value) is not annotation:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {annotation!r}")  # pragma: no cover


def build_section(cls, table: dict, where: str):
    """One section dataclass from its TOML table: unknown keys and wrong types are errors."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    values = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in table.items()}
    return cls(**values)


def find_config() -> Path | None:
    """``$CTPI_CONFIG`` when it names an existing file, else the first existing file of
    :data:`DEFAULT_PATHS`, or None. The units set ``CTPI_CONFIG=/etc/ctpi/ctpi.toml`` and a
    deploy rewrites that folder with the rest (``CTPI_CONFIG_DIR``), so a Pi whose settings live
    elsewhere (or a test's loopback Pi) gets its own; the file stays optional, as on a Pi."""
    named = os.environ.get(CONFIG_ENV)
    candidates = ((Path(named),) if named else ()) + DEFAULT_PATHS
    return next((path for path in candidates if path.is_file()), None)


def load_config(path: str | Path | None = None) -> Config:
    """Read ``path`` (or the default location; defaults if there is none)."""
    path = Path(path) if path is not None else find_config()
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(sections)}")
    hints = typing.get_type_hints(Config)
    return Config(**{name: build_section(hints[name], data[name], f"{path} [{name}]") for name in data})


def override(section, **flags):
    """``section`` with every flag that is not None replacing the file's value."""
    return dataclasses.replace(section, **{key: value for key, value in flags.items() if value is not None})
