"""Upload a large dataset to the web API (gunicorn, as the Procfile runs it) and compare with the CLI's submit.

    python bench/web_upload.py [--rows 1000000]

Both validate every row and enqueue every chunk through ``runs.submit``; the web process first receives the
multipart body (curl streams it from disk) into DATA_DIR/uploads. Printed: the file's size, the time from the
first byte sent to the 201, the gunicorn worker's peak RSS (VmHWM) before and after the upload, and beside
them the CLI's ``enqueue.py submit`` of the same file in the same run (time and peak RSS). A web process that
read the body into memory would show it in the worker's peak. Uses (and flushes) ``BENCH_REDIS_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BENCH_REDIS_URL, ROOT, run_with_peak_rss

TEMPLATE = "Classify: {{ text }}"
PASSWORD = "bench password"


def write_csv(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("id,text\n")
        for i in range(rows):
            handle.write(f"r{i:08d},benchmark row number {i} with some words to make it a review\n")
    return path


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/readyz", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the web process did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    redis.Redis.from_url(BENCH_REDIS_URL).flushdb()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        tmp_path = Path(tmp)
        dataset = write_csv(tmp_path / "reviews.csv", args.rows)
        size_mb = dataset.stat().st_size / 1e6
        env = {
            **os.environ,
            "REDIS_URL": BENCH_REDIS_URL,
            "DATA_DIR": str(tmp_path / "data"),
            "WEB_SECRET_KEY": "b" * 40,
            "WEB_PORT": "18555",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            "WEB_MAX_UPLOAD_BYTES": str(1 << 34),
        }
        created = subprocess.run(
            [sys.executable, "enqueue.py", "create-user", "bench", "--password-stdin"],
            cwd=ROOT,
            env=env,
            input=PASSWORD + "\n",
            text=True,
            capture_output=True,
        )
        assert created.returncode == 0, created.stderr
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "web/gunicorn_conf.py", "web.wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = "http://127.0.0.1:18555"
            wait_ready(url)
            login = urllib.request.Request(
                f"{url}/api/v1/auth/login",
                method="POST",
                data=json.dumps({"username": "bench", "password": PASSWORD}).encode(),
                headers={"Content-Type": "application/json"},
            )
            token = json.loads(urllib.request.urlopen(login, timeout=30).read())["access_token"]
            worker = worker_pid(web.pid)
            idle = peak_rss_mb(worker)
            started = time.perf_counter()
            upload = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-H",
                    f"Authorization: Bearer {token}",
                    "-F",
                    f"file=@{dataset}",
                    "-F",
                    f"template={TEMPLATE}",
                    "-F",
                    "id_column=id",
                    "-F",
                    "chunk_size=1000",
                    f"{url}/api/v1/runs",
                ],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            web_seconds = time.perf_counter() - started
            answer = json.loads(upload.stdout)
            assert answer.get("rows") == args.rows, upload.stdout[:500]
            web_peak = peak_rss_mb(worker)
        finally:
            web.terminate()
            web.wait(30)
        started = time.perf_counter()
        cli_peak, code, _, err = run_with_peak_rss(
            [
                "enqueue.py",
                "submit",
                str(dataset),
                "--template",
                TEMPLATE,
                "--id-column",
                "id",
                "--chunk-size",
                "1000",
                "--json",
            ],
            env,
        )
        cli_seconds = time.perf_counter() - started
        assert code == 0, err
    print(f"dataset: {args.rows} rows, {size_mb:.1f} MB CSV; load average {os.getloadavg()[0]:.2f}")
    print(
        f"web upload + submit : {web_seconds:6.1f} s, gunicorn worker peak RSS {web_peak:.0f} MB "
        f"(idle after login {idle:.0f} MB, +{web_peak - idle:.0f} MB)"
    )
    print(f"CLI submit (ref.)   : {cli_seconds:6.1f} s, peak RSS {cli_peak:.0f} MB (process start included)")


if __name__ == "__main__":
    main()
