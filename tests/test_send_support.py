"""Helpers for the ``spamsink send`` tests: run the real CLI, and a scriptable SMTP server.

``FakeSMTP`` is a small asyncio SMTP server on a real loopback socket, in its own
thread, whose replies the test chooses per command, to make a real client meet
4xx/5xx replies, dropped connections, silence and garbage. It records every
message text (as received, still dot-stuffed) and every client address.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tests.support import free_port, spamsink_command

#: A reply: bytes to send, CLOSE to drop the connection, SILENT to say nothing.
CLOSE = "close"
SILENT = "silent"
Reply = bytes | str | Callable[[int], bytes | str]

EHLO_LINES = (b"250-fake.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n"
              b"250 8BITMIME\r\n")


def run_send(*args: str, timeout: float = 60.0) -> tuple[int, dict[str, Any], str]:
    """Run ``spamsink send --json ARGS``; (exit status, the JSON summary, stderr)."""
    proc = subprocess.run([*spamsink_command(), "send", "--json", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {proc.stdout!r}\nstderr: {proc.stderr}") from None
    return proc.returncode, data, proc.stderr


@contextmanager
def send_running(*args: str, new_session: bool = False) -> Iterator[subprocess.Popen[str]]:
    """``spamsink send --json ARGS`` running while the test signals it (in a process
    group of its own with ``new_session``); killed if it is still running at the end."""
    proc = subprocess.Popen([*spamsink_command(), "send", "--json", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=new_session)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def interrupted_summary(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON summary of an interrupted ``send_running`` run, which must exit 130
    within ``timeout`` seconds."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 130, stderr
    out = json.loads(stdout)
    assert out["interrupted"] is True
    return out


class _Session(asyncio.Protocol):
    def __init__(self, server: FakeSMTP) -> None:
        self.server = server
        self.buffer = b""
        self.in_data = False
        self.data = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.peers.append(transport.get_extra_info("peername")[0])
        self.server.connections += 1
        self.answer("CONNECT")

    def answer(self, verb: str) -> Reply:
        """Reply to ``verb`` as the test scripted; returns what was chosen."""
        server = self.server
        count = server.counts.get(verb, 0) + 1
        server.counts[verb] = count
        reply = server.replies.get(verb, server.defaults.get(verb, b"250 2.0.0 Ok\r\n"))
        if callable(reply):
            reply = reply(count)
        if reply == CLOSE:
            self.transport.close()
        elif reply != SILENT:
            if server.delay:
                asyncio.get_running_loop().call_later(server.delay, self._write, reply)
            else:
                self._write(reply)
        return reply

    def _write(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            for i in range(0, len(reply), self.server.chunk):
                self.transport.write(reply[i:i + self.server.chunk])

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    text, self.buffer = b"", self.buffer[3:]
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        return
                    text, self.buffer = self.buffer[:end + 2], self.buffer[end + 5:]
                self.server.messages.append(text)
                self.in_data = False
                self.answer(".")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, rest = self.buffer[:end], self.buffer[end + 2:]
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode()
            if verb == "BDAT":
                size = int(line.split()[1])
                if len(rest) < size:
                    return
                self.server.messages.append(rest[:size])
                rest = rest[size:]
            self.buffer = rest
            reply = self.answer(verb)
            if verb == "DATA":
                self.in_data = isinstance(reply, bytes) and reply.startswith(b"354")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class FakeSMTP:
    """A scriptable SMTP server (see the module docstring); use as a context manager."""

    def __init__(self, replies: dict[str, Reply] | None = None, *, delay: float = 0.0,
                 chunk: int = 1 << 20) -> None:
        self.port = free_port()
        self.replies = replies or {}
        self.delay = delay
        self.chunk = chunk
        self.defaults: dict[str, Reply] = {
            "CONNECT": b"220 fake.example ESMTP\r\n", "EHLO": EHLO_LINES,
            "HELO": b"250 fake.example\r\n", "DATA": b"354 go ahead\r\n",
            ".": b"250 2.0.0 Ok: queued\r\n", "QUIT": b"221 2.0.0 Bye\r\n",
        }
        self.counts: dict[str, int] = {}
        self.messages: list[bytes] = []
        self.peers: list[str] = []
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FakeSMTP:
        server = self._loop.run_until_complete(self._loop.create_server(
            lambda: _Session(self), "127.0.0.1", self.port, backlog=1024))
        self._server = server
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
