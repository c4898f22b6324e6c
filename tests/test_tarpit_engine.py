"""The engine and the tarpit together, in-process on real loopback sockets.

What the records say: flags, seconds held, how long a client waited before giving
up, the kernel's segment count, and the budget given back at close.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from sink.persona import POSTFIX
from sink.record import Flag, SessionRecord
from sink.smtp import Limits, ServerContext, SMTPSession
from sink.tarpit import Pacing, Policy, Tarpit


class Records:
    def __init__(self) -> None:
        self.items: list[SessionRecord] = []

    def submit(self, record: SessionRecord) -> None:
        self.items.append(record)


Client = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run_sessions(tarpit: Tarpit, *clients: Client) -> list[SessionRecord]:
    """Serve each client (one after another) and return the records, in order."""
    records = Records()

    async def main() -> None:
        ctx = ServerContext(persona=POSTFIX, hostname="mx.example.com", limits=Limits(),
                            records=records, tarpit=tarpit, on_close=tarpit.observe)
        server = await asyncio.get_running_loop().create_server(
            lambda: SMTPSession(ctx), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for client in clients:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await client(reader, writer)
            writer.close()
            for _ in range(100):
                if not ctx.sessions:
                    break
                await asyncio.sleep(0.01)
        server.close()

    asyncio.run(main())
    return records.items


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        line = await reader.readline()
        out += line
        if not line or line[3:4] == b" ":
            return out


async def postfix_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Waits for the banner, EHLO, then pipelines MAIL/RCPT/DATA as Postfix's smtp does."""
    banner = await read_reply(reader)
    assert banner.endswith(b"\r\n220 mx.example.com ESMTP Postfix (Debian/GNU)\r\n")
    writer.write(b"EHLO client.example\r\n")
    await read_reply(reader)
    writer.write(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
    for _ in range(3):
        await read_reply(reader)
    writer.write(b"Subject: hi\r\n\r\n" + b"x" * 5000 + b"\r\n.\r\nQUIT\r\n")
    await read_reply(reader)
    await read_reply(reader)


async def early_talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Talks after the teaser, before the banner, then gives up during the held reply."""
    assert await reader.readline() == b"220-mx.example.com ESMTP Postfix (Debian/GNU)\r\n"
    writer.write(b"EHLO bot\r\n")
    assert (await read_reply(reader)).startswith(b"220 ")
    await asyncio.sleep(0.6)  # EHLO reply is held 2 s: give up after 0.6


def test_early_talker_is_tarpitted_and_a_postfix_like_client_is_not() -> None:
    tarpit = Tarpit(Pacing(command_delay=2.0, pregreet_wait=0.2), Policy(who="flagged"),
                    rng=random.Random(1))
    good, bot = run_sessions(tarpit, postfix_like, early_talker)
    assert good.flags == 0 and good.messages == 1
    assert 0.19 < good.held < 0.5  # the teaser wait only
    assert good.segments_in >= 5 and good.waited == 0
    assert bot.flags & Flag.PREGREET and bot.flags & Flag.TARPITTED
    assert bot.last_stage == "helo"
    assert 0.5 < bot.waited < 1.5  # gave up 0.6 s into a 2 s hold
    assert bot.held >= bot.waited + 0.19
    assert bot.segments_in >= 2
    assert tarpit.tarpitted == 0  # the budget slot came back at close
    stats = tarpit.stats()
    assert stats["escalations"] == 1 and stats["sessions"] == 2
    assert tarpit.known_bad(bot.client_ip)  # paced from connect next time


def test_stutter_and_hold_cap() -> None:
    async def greeting_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        banner = await read_reply(reader)
        elapsed = time.monotonic() - started
        assert banner == b"220 mx.example.com ESMTP Postfix (Debian/GNU)\r\n"
        # 47 bytes at 20 bytes/s would take 2.3 s; the 1 s cap compresses the stutter
        assert 0.9 < elapsed < 1.4, elapsed
        writer.write(b"QUIT\r\n")
        assert await read_reply(reader) == b"221 2.0.0 Bye\r\n"  # cap spent: at once

    tarpit = Tarpit(Pacing(stutter_bps=20.0), Policy(who="all", hold_cap=1.0))
    (rec,) = run_sessions(tarpit, greeting_only)
    assert rec.flags == Flag.TARPITTED
    assert 0.9 < rec.held < 1.4
