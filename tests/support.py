"""Helpers shared by the tests: free ports, and the real ``spamsink serve`` as a process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def spamsink_command() -> list[str]:
    """How to run the installed ``spamsink`` program."""
    exe = Path(sys.executable).parent / "spamsink"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "sink.cli"]


class SinkProcess:
    """A real ``spamsink serve`` on a free loopback port, with its own data directory."""

    def __init__(self, data: Path, args: Sequence[str] = (), host: str = "127.0.0.1",
                 env: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = free_port(host)
        self.data = data
        address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        # The HTTP API on its own free port (its default, 8025, would clash between tests).
        self.api_port = free_port("127.0.0.1")
        api = [] if any(a == "--api" or a.startswith("--api=") for a in args) else [
            "--api", f"127.0.0.1:{self.api_port}"]
        self.command = [*spamsink_command(), "serve", "--smtp", address, "--data", str(data),
                        "--hostname", "mx.example.com", *api, *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data / "serve.log"

    def start(self, wait_port: int | None = None) -> SinkProcess:
        self.data.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env)
        try:
            wait_for_port(self.host, wait_port or self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"spamsink did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()
        self.proc = None
        return proc.returncode

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_sink(tmp_path: Path, *args: str, **kwargs: object) -> Iterator[SinkProcess]:
    """Context manager: a started :class:`SinkProcess` that is stopped afterwards."""
    sink = SinkProcess(tmp_path / "data", args, **kwargs)  # type: ignore[arg-type]
    with sink:
        yield sink


def need_tool(name: str) -> str:
    """The path of the outside tool ``name``, or skip the test saying it is missing."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.skip(f"needs the outside tool {name!r} (installed by .ci/run)")
    return path


def need_root() -> None:
    """Skip the test unless it runs as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, NFQUEUE or privileged ports); "
                    ".ci/run runs as root")
