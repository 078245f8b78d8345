"""Loopback ports for the servers tests start, and whether something answers on one."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_below_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range, for a server a test kills and may start again: while it
    is down, no port-0 server and no outgoing connection can be given its port (an outgoing connect to a dead
    ephemeral port can even connect to itself), so its address stays dead. A sentinel that reached something
    there kept the dead primary's replica out of the failover (its link had been down too long), and the run
    never failed over."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10_000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}")
