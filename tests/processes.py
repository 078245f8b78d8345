"""Helpers for fault tests that start and kill real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def run_script(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one of the project's scripts (``enqueue.py ...``, ``worker.py ...``) to its end, output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cli(pipeline: Any, *args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    """``python enqueue.py ARGS`` with a test pipeline's settings (``pipeline.env``) in its environment."""
    return run_script(["enqueue.py", *args], pipeline.env(**extra_env), timeout)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll an observable condition (a Redis or SQL count) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process, its children and their process groups: a machine losing the worker at once."""
    pids = [process.pid, *children(process.pid)]
    pids += [g for p in list(pids) for g in children(p)]
    for pid in pids:
        for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
            try:
                kill(pid)
            except (ProcessLookupError, PermissionError):
                pass
    process.wait(timeout=10)


def redis_servers_in(directory: Path) -> list[int]:
    """redis-server processes working in ``directory`` (redis chdirs to its data dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and "redis-server" in (proc / "cmdline").read_text()
                and (proc / "cwd").resolve() == directory.resolve()
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found
