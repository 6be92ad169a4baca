"""``ctpi ui`` and ``ctpi passwd``: serve the web page safely on a LAN, and set its password.

``ctpi ui`` replaces itself (``exec``) with ``streamlit run streamlit_app.py`` (through
:mod:`device.web.serve`, so that SIGTERM stops it promptly over TLS) and the
settings that make Streamlit fit a hospital LAN: headless, bound to one address, XSRF
protection on, usage statistics off (the appliance sends nothing out), uploads capped, no
file watcher, no tracebacks shown to users. The page's own settings (the ``[ui]`` and
``[watch]`` sections after flags) travel to the page as JSON in one environment variable,
read in one place (:func:`settings_from_environment`): Streamlit gives a script no other way in.
"""

from __future__ import annotations

import dataclasses
import enum
import getpass
import json
import logging
import os
import sys
import typing
from pathlib import Path

from device.config import Config, UiConfig, WatchConfig, build_section, load_config, override
from device.web.auth import AuthError, read_password_hash, write_password
from device.web.tls import TlsError, certificate_for, fingerprint

log = logging.getLogger(__name__)

SETTINGS_ENVIRONMENT = "CTPI_UI_SETTINGS"
APP_PATH = Path(__file__).resolve().parents[2] / "streamlit_app.py"  # device/web/ui.py -> the repository root


def config_to_tables(config: Config) -> dict:
    """``config`` as TOML-shaped tables (what :func:`device.config.load_config` reads)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        return value

    return {
        section.name: {key: plain(value) for key, value in dataclasses.asdict(getattr(config, section.name)).items() if value is not None}
        for section in dataclasses.fields(config)
    }


def settings_to_environment(config: Config) -> str:
    return json.dumps(config_to_tables(config))


def settings_from_environment(environ=None) -> Config:
    """The settings ``ctpi ui`` passed to the page, checked like a config file; the defaults
    when the page is started some other way (``streamlit run streamlit_app.py``)."""
    environ = os.environ if environ is None else environ
    text = environ.get(SETTINGS_ENVIRONMENT)
    if not text:
        return Config()
    tables = json.loads(text)
    hints = typing.get_type_hints(Config)
    return Config(**{name: build_section(hints[name], table, f"{SETTINGS_ENVIRONMENT} [{name}]") for name, table in tables.items()})


def streamlit_command(settings: UiConfig, app: Path = APP_PATH, tls: tuple[Path, Path] | None = None) -> list[str]:
    """The ``streamlit run`` command line for ``settings`` (flags override any
    ``.streamlit/config.toml``, so the safety settings cannot be lost to a stray file);
    with ``tls`` (certificate, key) Streamlit serves HTTPS only."""
    secure = [f"--server.sslCertFile={tls[0]}", f"--server.sslKeyFile={tls[1]}"] if tls else []
    return [
        sys.executable, "-m", "device.web.serve", "run", str(app),
        f"--server.address={settings.host}",
        f"--server.port={settings.port}",
        "--server.headless=true",
        "--server.enableXsrfProtection=true",
        "--server.enableCORS=true",
        f"--server.maxUploadSize={settings.max_upload_mb}",
        "--server.fileWatcherType=none",
        "--server.runOnSave=false",
        "--server.enableStaticServing=false",
        "--browser.gatherUsageStats=false",
        f"--browser.serverAddress={settings.host}",
        "--client.showErrorDetails=type",
        "--client.toolbarMode=viewer",
        "--global.developmentMode=false",
        *secure,
    ]  # fmt: skip


def add_ui_arguments(parser) -> None:
    """The flags ``ctpi ui`` and ``ctpi run`` share; each overrides the config file."""
    ui, watch = UiConfig(), WatchConfig()
    parser.add_argument("--host", default=None, help=f"address to serve on (default {ui.host}; the Pi's LAN address to reach it from other machines)")
    parser.add_argument("--port", type=int, default=None, help=f"TCP port (default {ui.port})")
    parser.add_argument("--models", type=Path, default=None, help=f"folder of bundles for the model selector (default {ui.models_dir})")
    parser.add_argument("--model", type=Path, default=None, help=f"bundle selected first (default {watch.model})")
    parser.add_argument("--bundle-sha256", default=None, help="refuse --model unless its identity is this (the deploy pins it)")
    parser.add_argument("--state", type=Path, default=None, help=f"the watch daemon's state folder: history and status (default {watch.state})")
    parser.add_argument("--inbox", type=Path, default=None, help=f"the watch daemon's inbox, for 'send to inbox' (default {watch.inbox})")
    parser.add_argument("--password-file", type=Path, default=None, help=f"the password hash (default {ui.password_file})")
    parser.add_argument("--max-upload-mb", type=int, default=None, help=f"largest upload accepted (default {ui.max_upload_mb} MB)")
    parser.add_argument("--config", type=Path, default=None, help="TOML config file ([ui] and [watch]; default /etc/ctpi/ctpi.toml if it exists)")


def config_from_args(args) -> Config:
    """The config file (or the defaults) with every flag that was given on top."""
    config = load_config(args.config)
    ui = override(
        config.ui,
        host=args.host,
        port=args.port,
        models_dir=args.models,
        password_file=args.password_file,
        max_upload_mb=args.max_upload_mb,
    )
    watch = override(config.watch, model=args.model, state=args.state, inbox=args.inbox, bundle_sha256=args.bundle_sha256)
    if ui.max_upload_mb < 1 or not 0 < ui.port < 65536:
        raise ValueError("--max-upload-mb must be at least 1 and --port between 1 and 65535")
    return dataclasses.replace(config, ui=ui, watch=watch)


def register(subparsers) -> None:
    parser = subparsers.add_parser("ui", help="serve the web page (password-protected; set it with `ctpi passwd`)")
    add_ui_arguments(parser)
    parser.set_defaults(handler=run_ui)

    passwd = subparsers.add_parser("passwd", help="set the web page's password (stored as a salted scrypt hash)")
    passwd.add_argument("--password-file", type=Path, default=None, help=f"where to write the hash (default {UiConfig().password_file})")
    passwd.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input (scripts)")
    passwd.add_argument("--config", type=Path, default=None, help="TOML config file (its [ui] password_file)")
    passwd.set_defaults(handler=run_passwd)


def no_password_message(path: Path) -> str:
    return f"no UI password is set yet, so the page only says how to set one. Set it with: ctpi passwd --password-file {path}"


def run_ui(args) -> int:
    from device.cli import EXIT_USAGE

    config = config_from_args(args)
    settings = config.ui
    try:
        if read_password_hash(settings.password_file) is None:
            print(f"ctpi ui: {no_password_message(settings.password_file)}", file=sys.stderr)
    except AuthError as error:
        print(f"ctpi ui: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not APP_PATH.is_file():
        print(f"ctpi ui: the page {APP_PATH} is missing; reinstall ctpi from its repository", file=sys.stderr)
        return EXIT_USAGE
    try:
        tls = certificate_for(settings.host, settings.tls_cert, settings.tls_key, config.watch.state)
    except TlsError as error:
        print(f"ctpi ui: {error}", file=sys.stderr)
        return EXIT_USAGE
    command = streamlit_command(settings, tls=tls)
    environment = dict(os.environ, **{SETTINGS_ENVIRONMENT: settings_to_environment(config)})
    if tls is None:
        print(f"ctpi ui: serving on http://{settings.host}:{settings.port} (loopback only)", file=sys.stderr, flush=True)
    else:
        print(f"ctpi ui: serving HTTPS only on https://{settings.host}:{settings.port}; certificate {tls[0]} "
              f"SHA-256 fingerprint {fingerprint(tls[0])} (compare it with the browser's)", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, command, environment)
    return EXIT_USAGE  # pragma: no cover - execve does not return


def ask_new_password(stdin: bool = False) -> str:
    """The new password, typed twice at a terminal (or one line of stdin, for scripts)."""
    if stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("New UI password: ")
    second = getpass.getpass("Repeat it: ")
    if first != second:
        raise AuthError("the two passwords differ; nothing was changed")
    return first


def set_password(path: Path, stdin: bool = False) -> int:
    """Ask for a password and store its hash; the exit code of ``ctpi passwd``."""
    from device.cli import EXIT_OK, EXIT_USAGE

    try:
        written = write_password(path, ask_new_password(stdin))
    except AuthError as error:
        print(f"ctpi passwd: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (EOFError, KeyboardInterrupt):
        print("\nctpi passwd: cancelled; nothing was changed", file=sys.stderr)
        return EXIT_USAGE
    print(f"ctpi passwd: password hash written to {written} (mode 0600); the page asks for it at the next login")
    return EXIT_OK


def run_passwd(args) -> int:
    path = args.password_file or load_config(args.config).ui.password_file
    return set_password(path, args.stdin)
