"""Every response leaves with ``server: rpxy``, replacing the origin's Server field.

Hiding the origin's software banner is what rpxy does, and tells clients which
hop answered.
"""

from __future__ import annotations

__all__ = ["SERVER", "SERVER_HEADER"]

SERVER = b"server"
SERVER_HEADER: tuple[bytes, bytes] = (SERVER, b"rpxy")
