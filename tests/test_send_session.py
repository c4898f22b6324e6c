"""The client session's remembered reads: replayed only when the read was whole replies.

Each test drives one real :class:`SenderSession` over a real socket pair: the test plays
the server, handing the session its reads one by one (``data_received``, as the event
loop would), and reads the commands the session wrote from the other end.
"""

from __future__ import annotations

import asyncio
import socket
import time

from sink.cli import build_parser
from sink.send_body import MessageSource
from sink.send_config import config_from_options
from sink.send_pace import CountPool
from sink.send_session import KNOWN_READ_BYTES, KNOWN_READS, SenderSession, SessionContext
from sink.send_stats import MAIL, Stats


async def _session(count: int, per_connection: int, *args: str):
    """A connected session for ``count`` messages, ``per_connection`` on this connection;
    (session, its context, the server's end of the socket pair)."""
    config = config_from_options(build_parser().parse_args(
        ["send", "-n", str(count), "-m", str(per_connection), *args]))
    stats, pool = Stats(), CountPool(count)
    messages = MessageSource(sender=config.sender, recipient=config.recipient,
                             subject=config.subject, body_bytes=10, bodies=None)
    ctx = SessionContext(config, stats, messages, pool, None, None, None)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    taken = pool.reserve(per_connection)
    session = SenderSession(ctx, time.perf_counter(), taken - 1)
    await asyncio.get_running_loop().create_connection(lambda: session, sock=ours)
    return session, ctx, theirs


def _commands(server_end: socket.socket) -> bytes:
    """What the session wrote so far."""
    out = b""
    while True:
        try:
            chunk = server_end.recv(65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


async def _settle() -> None:
    await asyncio.sleep(0.01)  # let the transport's writes reach the socket


def test_a_read_that_completes_a_split_reply_is_not_remembered() -> None:
    async def scenario() -> None:
        session, ctx, server = await _session(1, 1)
        session.data_received(b"220 fake.example ESMTP\r\n")
        session.data_received(b"250-fake.example\r\n250-PIPELINING\r\n")  # part of EHLO's
        assert ctx.known.keys() == {b"220 fake.example ESMTP\r\n"}
        session.data_received(b"250 8BITMIME\r\n")  # completes it: not a reply on its own
        assert b"250 8BITMIME\r\n" not in ctx.known
        await _settle()
        assert _commands(server).endswith(b"MAIL FROM:<smtpsend@localhost>\r\n")
        # The same bytes read whole are one single-line reply, remembered as such.
        session.data_received(b"250 8BITMIME\r\n")
        assert ctx.known[b"250 8BITMIME\r\n"] == [(250, [b"8BITMIME"])]
        assert ctx.stats.latency[MAIL].count == 1
        for reply in (b"250 2.1.5 Ok\r\n", b"354 go ahead\r\n", b"250 2.0.0 Ok: queued\r\n",
                      b"221 2.0.0 Bye\r\n"):
            session.data_received(reply)
        await session.done
        assert (ctx.stats.sent, ctx.stats.failed) == (1, 0)
        server.close()

    asyncio.run(scenario())


def test_remembered_reads_are_replayed_and_bounded() -> None:
    """Replies that differ every time (queue ids) fill the memory up to its bound and
    are still parsed right after that; repeated ones are replayed."""
    count = KNOWN_READS + 200

    async def scenario() -> None:
        session, ctx, server = await _session(count, count)
        session.data_received(b"220 fake.example ESMTP\r\n")
        long_ehlo = b"250-fake.example\r\n" + b"250-X-FILLER\r\n" * 80 + b"250 PIPELINING\r\n"
        assert len(long_ehlo) > KNOWN_READ_BYTES
        session.data_received(long_ehlo)
        assert long_ehlo not in ctx.known  # too long to remember
        for i in range(count):
            session.data_received(b"250 2.1.0 Ok\r\n")
            session.data_received(b"250 2.1.5 Ok\r\n")
            session.data_received(b"354 go ahead\r\n")
            session.data_received(b"250 2.0.0 Ok: queued as %d\r\n" % i)
        assert len(ctx.known) == KNOWN_READS
        assert ctx.stats.sent == count
        session.data_received(b"221 2.0.0 Bye\r\n")
        loop = asyncio.get_running_loop()
        while await loop.sock_recv(server, 1 << 20):  # what it wrote, to its close
            pass
        await session.done
        server.close()

    asyncio.run(scenario())
