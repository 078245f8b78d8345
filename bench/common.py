"""Helpers shared by the benchmarks: the fake provider as its own process, generated datasets, the bench Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")


def start_fake_provider(
    latency: float, rpm: float | None = None, extra: list[str] | tuple[str, ...] = (), **popen: Any
) -> tuple[subprocess.Popen, str]:
    """``python -m tests.fakeprovider`` with a 1 s bucket (unless ``extra`` says otherwise); returns it and its URL."""
    args = [sys.executable, "-m", "tests.fakeprovider", "--latency", str(latency), "--burst-seconds", "1", *extra]
    if rpm:
        args += ["--rpm", str(rpm)]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, **popen)
    url = process.stdout.readline().strip()
    if not url:
        process.wait(timeout=10)
        raise RuntimeError(f"the fake provider did not start (exit code {process.returncode})")
    return process, url


def fake_provider_stats(url: str) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(f"{url}/_stats", timeout=30).read())


def reset_fake_provider(url: str) -> None:
    """Zero its counters and refill its limits."""
    urllib.request.urlopen(urllib.request.Request(f"{url}/_reset", data=b"{}", method="POST"), timeout=30).read()


def row_text(i: int, width: int = 0) -> str:
    return f"benchmark row number {i:0{width}d}" if width else f"benchmark row number {i}"


def write_dataset(path: Path, rows: int, width: int = 0) -> Path:
    """JSONL rows ``{"id": "r0000042", "text": "benchmark row number 42"}``; ``width`` zero-pads the number, so
    every prompt has the same length (and the same token count)."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"r{i:07d}", "text": row_text(i, width)}) + "\n")
    return path


def run_with_peak_rss(argv: list[str], env: dict[str, str], interval: float = 0.02) -> tuple[float, int, str, str]:
    """Run ``python ARGV``; return its peak RSS in MB (VmHWM, sampled until it exits), exit code, stdout, stderr."""
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    output: list[tuple[str, str]] = []
    reader = threading.Thread(target=lambda: output.append(process.communicate()))
    reader.start()
    peak_kb = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass
        time.sleep(interval)
    reader.join()
    return peak_kb / 1024, process.returncode, *output[0]
