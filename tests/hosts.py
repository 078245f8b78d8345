"""Several machines on one: network namespaces joined by veth pairs to a bridge, made and removed by a test.

The first host is the hub: it holds the bridge (and, in the tests, Redis, PostgreSQL and the provider); every
other host, and the test itself in the root namespace, gets a veth pair whose other end is on that bridge. Names
carry the test process's pid, so parallel runs do not clash, and namespaces a killed run left behind (its pid
gone) are removed by the next one. Needs root and iproute2.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "plh-"
ROOT = Path(__file__).resolve().parent.parent


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, no kernel support)."""


def ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    except FileNotFoundError as exc:
        raise NetnsUnavailable("iproute2's ip command is not installed") from exc
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    name: str  # the namespace
    address: str  # its IPv4 address on the bridge
    network: Network

    def popen(
        self, command: list[str], *, env: dict[str, str] | None = None, log: Path | None = None, user: str | None = None
    ) -> subprocess.Popen:
        """Start a command inside this host; stdout and stderr go to ``log`` (never a pipe nobody reads)."""
        prefix = ["ip", "netns", "exec", self.name] + (["runuser", "-u", user, "--"] if user else [])
        out = log.open("ab") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(
                prefix + command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if log:
                out.close()

    def python(self, args: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
        return self.popen([sys.executable, *args], env=env, log=log)

    def cut_off(self) -> None:
        """Its link goes down: its processes live on, but reach nothing and nobody reaches them."""
        ip("-n", self.name, "link", "set", "eth0", "down")


@dataclass
class Network:
    tag: str
    subnet: str  # first three octets, "10.a.b"
    hosts: dict[str, Host] = field(default_factory=dict)
    root_link: str | None = None

    @property
    def hub(self) -> Host:
        return next(iter(self.hosts.values()))

    def add_host(self, role: str) -> Host:
        name = f"{PREFIX}{self.tag}-{role}"
        address = f"{self.subnet}.{len(self.hosts) + 1}"
        ip("netns", "add", name)
        host = Host(name, address, self)
        self.hosts[role] = host
        ip("-n", name, "link", "set", "lo", "up")
        if len(self.hosts) == 1:  # the hub: a bridge that every other link plugs into
            ip("-n", name, "link", "add", "br0", "type", "bridge")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "br0")
            ip("-n", name, "link", "set", "br0", "up")
            return host
        ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"to-{role}"[:15], "netns", self.hub.name)
        self._plug(f"to-{role}"[:15])
        ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        return host

    def join_from_root(self) -> str:
        """A link from the test's own (root) namespace, so the test reaches every host directly."""
        self.root_link = f"plh{self.tag}"[:15]
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", "to-root", "netns", self.hub.name)
        self._plug("to-root")
        address = f"{self.subnet}.254"
        ip("addr", "add", f"{address}/24", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")
        return address

    def _plug(self, link: str) -> None:
        ip("-n", self.hub.name, "link", "set", link, "master", "br0")
        ip("-n", self.hub.name, "link", "set", link, "up")

    def remove(self) -> None:
        """Kill every process of every host, then remove the namespaces (their links go with them)."""
        for host in self.hosts.values():
            _kill_namespace(host.name)
        if self.root_link:
            subprocess.run(["ip", "link", "del", self.root_link], capture_output=True, check=False)


def _kill_namespace(name: str) -> None:
    for _ in range(50):
        done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
        pids = [int(p) for p in done.stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def remove_leftovers() -> None:
    """Namespaces of earlier runs whose test process is gone (killed before its cleanup ran)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX) :].split("x", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _kill_namespace(name)


def _free_subnet() -> str:
    taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
    for _ in range(100):
        subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if f" {subnet}." not in taken:
            return subnet
    raise NetnsUnavailable("no free 10.x.y.0/24 subnet")


def make_network() -> Network:
    """An empty network; the first ``add_host`` is its hub (``add_host`` raises NetnsUnavailable when namespaces
    cannot be made). Call ``remove`` in a ``finally``: it removes whatever was made."""
    remove_leftovers()
    return Network(tag=f"{os.getpid()}x{secrets.token_hex(2)}", subnet=_free_subnet())
