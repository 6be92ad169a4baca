"""The process ``ctpi ui`` execs: Streamlit's own command line (``python -m device.web.serve run
streamlit_app.py ...`` takes exactly what ``python -m streamlit run ...`` takes), with one
setting Streamlit offers no flag for, so that ``systemctl stop ctpi-ui`` is prompt.

On SIGTERM Streamlit's server (uvicorn on asyncio) closes every idle keep-alive connection and
waits until each has gone before the process exits. Over TLS, closing a connection sends
close_notify and waits for the peer's own, which an idle client (a browser tab's spare
connection, a health probe) never sends: asyncio gives up only after ``SSL_SHUTDOWN_TIMEOUT``,
30 s, longer than the kill that follows SIGTERM (systemd's stop timeout, 15 s in the tests).
A peer that answers does so within milliseconds on a LAN, so the page waits
:data:`TLS_CLOSE_WAIT_S` and then drops the connection; nothing is lost, since an idle
connection has no response in flight. Only the server's own sockets use TLS in this process.
The setting holds for asyncio's own event loop, the one Streamlit runs on unless uvloop is
installed (ctpi does not install it); tests/test_ui_tls.py checks the exit either way.
"""

from __future__ import annotations

import asyncio.constants

TLS_CLOSE_WAIT_S = 0.5


def main() -> None:
    # asyncio reads the constant each time it wraps a connection, so setting it before the
    # server starts covers every connection; uvicorn passes no timeout of its own to override it.
    asyncio.constants.SSL_SHUTDOWN_TIMEOUT = TLS_CLOSE_WAIT_S
    from streamlit.web.cli import main as streamlit_main

    streamlit_main(prog_name="streamlit")  # what `python -m streamlit` runs, with sys.argv[1:]


if __name__ == "__main__":
    main()
