"""``ctpi run``: the whole appliance in one command (what ``make run`` starts).

Supervises two child processes, ``ctpi watch`` (the daemon) and ``ctpi ui`` (the page), with
the same inbox, state folder and model, and a third, ``ctpi dicom`` (the DICOM node), when a
DICOM port is configured: ``port`` in the config file's ``[dicom]`` section, or
``--dicom-port``. Without one (``make run``) no port is opened for DICOM. It creates the inbox
and state folders on first use, asks for a UI password at a terminal when none is set
(elsewhere it says how to set one and serves the closed page), stops every child with SIGTERM
on Ctrl-C or SIGTERM, and stops the others when one of them dies, so a half-running appliance
never looks healthy. On the Pi the systemd units do this job instead.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from device.config import find_config
from device.core.bundle import load_bundle
from device.web.auth import AuthError, read_password_hash
from device.web.ui import add_ui_arguments, config_from_args, no_password_message, set_password

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 20.0  # the daemon finishes its current slice first


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="the appliance in one command: watch daemon + web page (+ DICOM node) (make run)")
    add_ui_arguments(parser)
    parser.add_argument("--dicom-port", type=int, default=None, metavar="PORT",
                        help="also run the DICOM node on this port (default: only if the config's [dicom] names a port)")
    parser.set_defaults(handler=run)


def dicom_port(args, config) -> int | None:
    """The DICOM node's port if ``ctpi run`` should start it: ``--dicom-port``, else ``port``
    written in the config file's ``[dicom]`` section (the section's defaults alone do not open
    a port: a node on the LAN is a decision), else None."""
    if getattr(args, "dicom_port", None) is not None:
        if not 0 < args.dicom_port < 65536:
            raise ValueError("--dicom-port must be between 1 and 65535")
        return args.dicom_port
    path = Path(args.config) if args.config else find_config()
    if path is None:
        return None
    import tomllib

    section = tomllib.loads(path.read_text(encoding="utf-8")).get("dicom", {})  # already validated by load_config
    return config.dicom.port if "port" in section else None


def child_commands(args, config, node_port: int | None = None) -> dict[str, list[str]]:
    """The command lines; each gets the resolved paths, and the config file if one was given.
    The DICOM node is one of them when ``node_port`` is set (:func:`dicom_port`)."""
    ctpi = [sys.executable, "-m", "device.cli"]
    shared = ["--config", str(args.config)] if args.config else []
    watch, ui = config.watch, config.ui
    commands = {
        "watch daemon": [*ctpi, "watch", *shared, "--inbox", str(watch.inbox), "--state", str(watch.state), "--model", str(watch.model)],
        "web page": [
            *ctpi, "ui", *shared, "--host", ui.host, "--port", str(ui.port), "--models", str(ui.models_dir),
            "--model", str(watch.model), "--state", str(watch.state), "--inbox", str(watch.inbox),
            "--password-file", str(ui.password_file), "--max-upload-mb", str(ui.max_upload_mb),
        ],
    }  # fmt: skip
    if node_port is not None:  # the rest of [dicom] (allow, send_to, ...) comes from the config file
        commands["DICOM node"] = [*ctpi, "dicom", *shared, "--port", str(node_port), "--inbox", str(watch.inbox),
                                  "--state", str(watch.state), "--model", str(watch.model)]
    return commands


def ensure_password(path: Path) -> int:
    """First run: ask for a password at a terminal; elsewhere say how to set one. 0 to go on."""
    from device.cli import EXIT_OK

    try:
        if read_password_hash(path) is not None:
            return EXIT_OK
    except AuthError as error:
        print(f"ctpi run: {error}", file=sys.stderr)
        return 2
    if sys.stdin is not None and sys.stdin.isatty():
        print(f"ctpi run: first start: choose the password for the web page (stored as a salted hash in {path}).", file=sys.stderr)
        return set_password(path)
    print(f"ctpi run: {no_password_message(path)}", file=sys.stderr)
    return EXIT_OK


def stop(children: dict[str, subprocess.Popen]) -> None:
    for process in children.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for name, process in children.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"ctpi run: the {name} did not stop within {STOP_TIMEOUT_SECONDS:.0f} s; killing it", file=sys.stderr)
            process.kill()
            process.wait()


def run(args) -> int:
    from device.cli import EXIT_OK

    config = config_from_args(args)
    node_port = dicom_port(args, config)
    load_bundle(config.watch.model)  # a missing or damaged model is refused before anything starts
    for folder in (config.watch.inbox, config.watch.state):
        Path(folder).mkdir(parents=True, exist_ok=True)
    status = ensure_password(config.ui.password_file)
    if status != EXIT_OK:
        return status

    stopping = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stopping.set()) for number in (signal.SIGINT, signal.SIGTERM)}
    children: dict[str, subprocess.Popen] = {}
    try:
        for name, command in child_commands(args, config, node_port).items():
            # own session: Ctrl-C reaches only this supervisor, which stops the children in order
            children[name] = subprocess.Popen(command, start_new_session=True)
        node = children.get("DICOM node")
        print(
            f"ctpi run: watch daemon (pid {children['watch daemon'].pid}) triages slices dropped into {config.watch.inbox}/ "
            f"into {config.watch.state}/;\n"
            + (f"ctpi run: DICOM node (pid {node.pid}) {config.dicom.aet} on {config.dicom.host}:{node_port} stores "
               f"received studies into {config.watch.inbox}/;\n" if node else "")
            + f"ctpi run: web page (pid {children['web page'].pid}) on http://{config.ui.host}:{config.ui.port}/ ; "
            + ("Ctrl-C stops all three." if node else "Ctrl-C stops both."),
            file=sys.stderr,
            flush=True,
        )
        while not stopping.wait(0.5):
            for name, process in children.items():
                if process.poll() is not None:
                    others = "the others" if len(children) > 2 else "the other"
                    print(f"ctpi run: the {name} exited with status {process.returncode}; stopping {others}", file=sys.stderr)
                    return 1
        names = list(children)
        print(f"ctpi run: stopping the {', the '.join(names[:-1])} and the {names[-1]}", file=sys.stderr, flush=True)
        return EXIT_OK
    finally:
        stop(children)
        for number, handler in previous.items():
            signal.signal(number, handler)
