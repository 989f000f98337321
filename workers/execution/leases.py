"""The names of lease owners. The leases themselves (acquire, renew, release, give up) are
written by service.db.lifecycle, with every other change of an audit's or a shard's status."""

from __future__ import annotations

import os
import socket
import uuid


def new_owner() -> str:
    """A name unique to one attempt by one process (host, pid, random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
