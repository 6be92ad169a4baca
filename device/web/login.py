"""The password gate: the page shows nothing until a browser session logs in, and one throttle per process slows guessing."""

from __future__ import annotations

import streamlit as st

from device.config import UiConfig
from device.web.auth import AuthError, LoginThrottle, read_password_hash


@st.cache_resource
def get_throttle(attempts: int, lockout_seconds: float) -> LoginThrottle:
    """One throttle per process, so wrong passwords count across every browser session."""
    return LoginThrottle(attempts, lockout_seconds)


def login(settings: UiConfig) -> bool:
    """The password gate; True once this browser session has logged in."""
    if st.session_state.get("authenticated"):
        return True
    st.title("ctpi · CT slice triage")
    try:
        encoded = read_password_hash(settings.password_file)
    except AuthError as error:
        st.error(f"The password file cannot be used: {error}")
        return False
    if encoded is None:
        st.warning(
            "**No password is set yet**, so this page stays closed.\n\n"
            f"On the appliance, run `ctpi passwd --password-file {settings.password_file}` "
            "and reload this page."
        )
        return False
    throttle = get_throttle(settings.login_attempts, settings.lockout_seconds)
    address = st.context.ip_address  # None for a localhost client
    client = address if isinstance(address, str) else "local"
    with st.form("login"):
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in", type="primary")
    if submitted:
        result = throttle.attempt(client, password, encoded)
        if result.ok:
            st.session_state.authenticated = True
            st.rerun()
        elif result.retry_after_s > 0:
            st.error(f"Too many wrong passwords. Try again in {result.retry_after_s:.0f} s.")
        else:
            st.error(f"Wrong password. {result.attempts_left} more tries before a {settings.lockout_seconds:.0f} s pause.")
    st.caption("Decision support for triage, not a diagnostic device.")
    return False
