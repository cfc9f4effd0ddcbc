"""A local S3 API server: moto's standalone server (``moto_server``, the dev extra) as its own
process on a free port. The tests start it with IAM enforced (tests/helpers/s3.py); ``make bench``
without a store of its own measures an S3 save against it (the network cost of a real store is
not in that number: it is the protocol's cost, uploads and manifest last, beside a local save)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
REGION = "us-east-1"


def available() -> bool:
    return MOTO_SERVER.exists()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_moto(log: Path, host: str = "127.0.0.1", env: dict | None = None) -> tuple[str, subprocess.Popen]:
    """(endpoint URL, process) of a moto server that answers; raises RuntimeError with its log if not."""
    port = _free_port(host)
    endpoint = f"http://{host}:{port}"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(MOTO_SERVER), "-H", host, "-p", str(port)], env={**os.environ, **(env or {})},
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return endpoint, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
