"""systemd readiness notification (``Type=notify``) without a dependency.

Sends ``READY=1`` and friends to ``$NOTIFY_SOCKET`` when systemd set it; does nothing otherwise.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send one sd_notify state line; True when a notification socket was there."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True
