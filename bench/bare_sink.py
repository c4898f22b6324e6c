"""The floor: a minimal SMTP discard sink as a bare ``asyncio.Protocol`` on uvloop.

No persona, limits, pacing or recording: a greeting, 250 to every command, 354 to
DATA, 250 after ``CRLF.CRLF``, 221 and close on QUIT. ``bench_sink.py`` runs it as the
``bare-uvloop`` server, the lower bound for any Python engine on this loop (the
figure ``../shared/facts.md`` quotes as 0.9x of smtp-sink). Never use it as a sink.

    python bench/bare_sink.py PORT
"""

import asyncio
import sys

import uvloop


class BareSink(asyncio.Protocol):
    """One connection: line commands, then DATA until CRLF.CRLF."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport
        self.data = False
        self.buffer = b""
        transport.write(b"220 bare ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        out = []
        while buffer:
            if self.data:
                end = buffer.find(b"\r\n.\r\n")
                if end < 0:
                    buffer = buffer[-4:]
                    break
                buffer = buffer[end + 5:]
                self.data = False
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                break
            verb, buffer = buffer[:4].upper(), buffer[end + 2:]
            if verb == b"DATA":
                self.data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                buffer = b"\r\n" + buffer  # so a body that is just "." still ends
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        self.buffer = buffer
        if out:
            self.transport.write(b"".join(out))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareSink, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1])))
