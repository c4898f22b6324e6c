"""The HTTP API: recorded senders as JSON under ``/api/v1/``, exports, ``/metrics``.

Built on aiohttp (already a dependency): it runs on the sink's own event loop
(uvloop) in the same process, streams responses (an export of a million senders is
written chunk by chunk), and needs no second server. Every store call runs in a
small thread pool, so a slow query never holds up an SMTP session on the loop.

Contract:

* Every route in :data:`ROUTES` is what ``/api/v1/openapi.json`` documents; a test
  checks the two agree. Unknown or bad query parameters get ``400`` with
  ``{"error": ..., "parameter": NAME}``.
* With a token, every request needs ``Authorization: Bearer TOKEN`` (``401``
  otherwise). ``DELETE`` always needs it: without a configured token it is ``403``.
* :func:`check_exposure` refuses a non-loopback address without a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sink import __version__
from sink.export import (
    CONTENT_TYPES,
    FORMATS,
    family_rows,
    query_comment,
    render,
    sender_item,
)
from sink.metrics import exposition
from sink.query import (
    BadParameter,
    decode_cursor,
    encode_cursor,
    ip_query,
    iso,
    parse_choice,
    parse_count,
    parse_ip,
    session_filter,
)
from sink.record import Flag
from sink.store import IP_COLUMNS, SORTS, SQLiteReader, StoreError

log = logging.getLogger("spamsink.api")

PREFIX = "/api/v1"
MAX_LIMIT = 10_000

_FLAG_NAMES = [f.name.lower() for f in Flag if f.name]
_TIME = ("Unix seconds, ISO 8601 (2026-11-26T10:00:00Z) or an age before now "
         "(30m, 24h, 7d)")
#: Every query parameter of the API: its OpenAPI schema and meaning.
PARAMETERS: dict[str, tuple[dict[str, Any], str]] = {
    "since": ({"type": "string"}, f"only senders seen at or after this time; {_TIME}"),
    "until": ({"type": "string"}, f"only senders first seen before this time; {_TIME}"),
    "min_messages": ({"type": "integer", "minimum": 0}, "only senders with at least this "
                     "many messages"),
    "flag": ({"type": "array", "items": {"type": "string", "enum": _FLAG_NAMES}},
             "only senders/sessions with every one of these bot signals (repeat or "
             "comma-separate)"),
    "family": ({"type": "string", "enum": ["4", "6"]}, "only IPv4 or only IPv6 senders"),
    "sort": ({"type": "string", "enum": list(SORTS), "default": "last_seen"},
             "last_seen: latest first; volume: most messages first"),
    "limit": ({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
              "items per page"),
    "cursor": ({"type": "string"}, "next_cursor of the previous page"),
    "format": ({"type": "string", "enum": list(FORMATS), "default": "txt"},
               "txt: one address per line; csv; json; rbldnsd: ip4set; nft: nft -f script"),
    "ip": ({"type": "string"}, "only sessions from this address"),
    "sessions": ({"type": "integer", "minimum": 0, "maximum": 1000, "default": 20},
                 "how many recent sessions to include"),
    "top": ({"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
            "how many top senders to list"),
}
_IP_FILTERS = ("since", "until", "min_messages", "flag", "family", "sort")
#: Descriptions that differ on ``/sessions``: its times are when a session ended.
_SESSION_PARAMETERS = {
    "since": f"only sessions that ended at or after this time; {_TIME}",
    "until": f"only sessions that ended before this time; {_TIME}",
}
#: The media types of the export, one per format.
_EXPORT_MEDIA = tuple(dict.fromkeys(t.split(";")[0] for t in CONTENT_TYPES.values()))


@dataclass(frozen=True, slots=True)
class Route:
    """One documented route: method, path (under the root), handler name, parameters
    (names in :data:`PARAMETERS`; ``described`` overrides their descriptions here),
    and the media types a ``200`` can have."""

    method: str
    path: str
    handler: str
    summary: str
    params: tuple[str, ...] = ()
    content: tuple[str, ...] = ("application/json",)
    described: dict[str, str] = field(default_factory=dict)


ROUTES = (
    Route("GET", f"{PREFIX}/ips", "list_ips", "senders with their aggregates",
          (*_IP_FILTERS, "limit", "cursor")),
    Route("GET", PREFIX + "/ips/{ip}", "get_ip",
          "one sender: aggregate, local addresses hit, recent sessions, netdrop counts",
          ("sessions",)),
    Route("DELETE", PREFIX + "/ips/{ip}", "delete_ip",
          "forget a sender (aggregate and sessions); always needs the token"),
    Route("GET", f"{PREFIX}/sessions", "list_sessions", "recorded sessions, latest first",
          ("ip", "since", "until", "flag", "limit", "cursor"), described=_SESSION_PARAMETERS),
    Route("GET", f"{PREFIX}/stats", "stats", "totals, rates over 1m/1h/24h, top senders",
          ("top",)),
    Route("GET", f"{PREFIX}/export", "export", "every matching sender, streamed",
          (*_IP_FILTERS, "format"), _EXPORT_MEDIA),
    Route("GET", f"{PREFIX}/openapi.json", "describe", "this description"),
    Route("GET", "/healthz", "healthz", "liveness: the store answers"),
    Route("GET", "/metrics", "metrics", "Prometheus metrics (no IP labels)", (),
          ("text/plain",)),
)


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of :data:`ROUTES`; every GET also answers HEAD."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        params = [{"name": name, "in": "query", "required": False,
                   "schema": PARAMETERS[name][0],
                   "description": route.described.get(name, PARAMETERS[name][1]),
                   **({"style": "form", "explode": True} if name == "flag" else {})}
                  for name in route.params]
        if "{ip}" in route.path:
            params.insert(0, {"name": "ip", "in": "path", "required": True,
                              "schema": {"type": "string"}, "description": "IPv4 or IPv6"})
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {media: {} for media in route.content}},
            "400": {"description": "a bad parameter; the body names it"},
            "401": {"description": "missing or wrong token"},
        }
        if "{ip}" in route.path:
            responses["404"] = {"description": "unknown sender"}
        if route.method == "DELETE":
            responses["403"] = {"description": "the API runs without a token"}
        paths.setdefault(route.path, {})[route.method.lower()] = {
            "summary": route.summary, "operationId": route.handler,
            "parameters": params, "responses": responses,
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "spamsink", "version": __version__,
                 "description": "Senders recorded by the spamsink SMTP sink. Every GET "
                 "route also answers HEAD."},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}, {}],
        "paths": paths,
    }


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) reaches only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, port: int, token: str | None) -> None:
    """Raise ``ValueError`` when the API would listen beyond this machine unprotected."""
    if token or is_loopback(host):
        return
    shown = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
    raise ValueError(f"the API on {shown} would be reachable from other machines without a "
                     f"token (anyone could read the records and delete senders): set "
                     f"--api-token or --api-token-file, or listen on 127.0.0.1")


def token_matches(header: str, token: str) -> bool:
    """True when the ``Authorization`` value ``header`` is ``Bearer TOKEN``: the scheme in
    any case (RFC 7235), the token compared in constant time. Never raises: a value
    that was not UTF-8 (aiohttp hands its bytes over as lone surrogates) is encoded
    with ``surrogatepass``, which no UTF-8 token can equal."""
    scheme, _, credentials = header.partition(" ")
    given = credentials.strip(" ").encode("utf-8", "surrogatepass")
    same = hmac.compare_digest(given, token.encode())
    return same and scheme.lower() == "bearer"


def _error(status: int, message: str, parameter: str | None = None) -> web.Response:
    body: dict[str, str] = {"error": message}
    if parameter is not None:
        body["parameter"] = parameter
    return web.json_response(body, status=status)


def _session_item(item: dict[str, object]) -> dict[str, object]:
    item["start"] = iso(item["start"])  # type: ignore[arg-type]
    item["end"] = iso(item["end"])  # type: ignore[arg-type]
    item["flags"] = Flag.names(item["flags"])  # type: ignore[arg-type]
    return item


@dataclass
class Api:
    """The API's state: where to read, the token, and ``scrape`` making /metrics."""

    reader: SQLiteReader
    token: str | None = None
    scrape: Callable[[], tuple[bytes, str]] = field(default=lambda: exposition(None))
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="spamsink-api"))

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- middleware -----------------------------------------------------------------

    @web.middleware
    async def guard(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    ) -> web.StreamResponse:
        """Token check, unknown parameters, and JSON errors for every route."""
        if self.token is not None:
            if not token_matches(request.headers.get("Authorization", ""), self.token):
                return _error(401, "this API needs 'Authorization: Bearer <token>'",
                              "Authorization")
        elif request.method == "DELETE":
            return _error(403, "deletes need the API to run with --api-token")
        route = request.match_info.route.resource
        method = "GET" if request.method == "HEAD" else request.method
        allowed = _ROUTE_PARAMS.get((method, route.canonical if route else ""))
        if allowed is not None:
            for name in request.query:
                if name not in allowed:
                    return _error(400, f"unknown parameter {name!r}; this route takes: "
                                  f"{', '.join(allowed) or 'none'}", name)
        try:
            return await handler(request)
        except BadParameter as exc:
            return _error(400, str(exc), exc.name)
        except StoreError as exc:
            return _error(503, str(exc))
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, exc.reason)
            raise

    # -- handlers -------------------------------------------------------------------

    async def list_ips(self, request: web.Request) -> web.Response:
        get = _multi(request)
        query = ip_query(get)
        limit = _limit(get)
        after = None
        if "cursor" in get:
            after = _ips_cursor(get["cursor"][-1], query.sort)
        rows = await self._run(self.reader.ips, query.filter, query.sort, limit + 1, after)
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            key = last[IP_COLUMNS.index("last_seen" if query.sort == "last_seen"
                                        else "messages")]
            next_cursor = encode_cursor(query.sort, key, last[0])
        return web.json_response({"items": [sender_item(r) for r in rows],
                                  "next_cursor": next_cursor})

    async def get_ip(self, request: web.Request) -> web.Response:
        ip = parse_ip("ip", request.match_info["ip"])
        get = _multi(request)
        sessions = (parse_count("sessions", get["sessions"][-1], high=1000)
                    if "sessions" in get else 20)
        found = await self._run(self.reader.ip, ip, sessions)
        netdrop = await self._run(self.reader.netdrop_counts, ip)
        if found is None and netdrop is None:
            return _error(404, f"no sender {ip} recorded")
        body: dict[str, object] = {"ip": ip, "sender": None, "local_ips": [],
                                   "recent_sessions": [], "netdrop": netdrop}
        if found is not None:
            body["sender"] = sender_item(found["row"])
            body["cost"] = found["cost"]
            body["local_ips"] = found["local_ips"]
            body["recent_sessions"] = [_session_item(s) for s in found["recent_sessions"]]
        return web.json_response(body)

    async def delete_ip(self, request: web.Request) -> web.Response:
        ip = parse_ip("ip", request.match_info["ip"])
        if not await self._run(self.reader.delete_ip, ip):
            return _error(404, f"no sender {ip} recorded")
        log.info("API: forgot sender %s", ip)
        return web.json_response({"deleted": ip})

    async def list_sessions(self, request: web.Request) -> web.Response:
        get = _multi(request)
        flt = session_filter(get)
        limit = _limit(get)
        before = None
        if "cursor" in get:
            (before,) = decode_cursor("cursor", get["cursor"][-1], (int,))
        items = await self._run(self.reader.sessions, flt, limit + 1, before)
        next_cursor = None
        if len(items) > limit:
            items = items[:limit]
            next_cursor = encode_cursor(items[-1]["id"])
        return web.json_response({"items": [_session_item(s) for s in items],
                                  "next_cursor": next_cursor})

    async def stats(self, request: web.Request) -> web.Response:
        get = _multi(request)
        top = parse_count("top", get["top"][-1], low=1, high=100) if "top" in get else 10
        now = time.time()
        body = await self._run(self.reader.stats, now, top)
        body["top_senders"] = [sender_item(r) for r in body["top_senders"]]
        body["time"] = iso(now)
        return web.json_response(body)

    async def export(self, request: web.Request) -> web.StreamResponse:
        get = _multi(request)
        query = ip_query(get)
        fmt = parse_choice("format", get["format"][-1], FORMATS) if "format" in get else "txt"
        reader = self.reader

        def rows(family: int | None) -> Iterator[list[tuple]]:
            return family_rows(reader, query, family)

        header = [f"spamsink {__version__} export at {iso(time.time())}",
                  query_comment(request.query.items())]
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[fmt]})
        await response.prepare(request)
        if request.method == "HEAD":  # the headers only: no reason to read the store
            await response.write_eof()
            return response
        chunks = render(fmt, rows, header, query.filter.family)
        try:
            while (chunk := await self._run(next, chunks, None)) is not None:
                await response.write(chunk.encode())
            await response.write_eof()
        finally:
            await self._run(chunks.close)
        return response

    async def describe(self, request: web.Request) -> web.Response:
        return web.json_response(openapi())

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self._run(self.reader.ping)
        except Exception as exc:
            return web.json_response({"status": "failing", "error": str(exc)}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = await self._run(self.scrape)
        return web.Response(body=body, headers={"Content-Type": content_type})

    def app(self) -> web.Application:
        """The aiohttp application serving :data:`ROUTES`."""
        app = web.Application(middlewares=[self.guard])
        for route in ROUTES:
            if route.method == "GET":  # and HEAD
                app.router.add_get(route.path, getattr(self, route.handler), allow_head=True)
            else:
                app.router.add_route(route.method, route.path, getattr(self, route.handler))
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, app: web.Application) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


_ROUTE_PARAMS = {(r.method, r.path): r.params for r in ROUTES}


def _multi(request: web.Request) -> dict[str, list[str]]:
    return {name: request.query.getall(name) for name in request.query}


def _ips_cursor(text: str, sort: str) -> tuple[int | float, str]:
    """The (sort key, address) a ``/ips`` cursor continues after; ``BadParameter`` when
    it was made for the other sort (volume keys are message counts, last_seen keys
    times: one read as the other would skip or repeat senders)."""
    made_for, key, ip = decode_cursor("cursor", text, (str, (int, float), str))
    if made_for != sort:
        raise BadParameter("cursor", f"this cursor continues sort={made_for}, not sort={sort}")
    if sort == "volume" and not isinstance(key, int):
        raise BadParameter("cursor", "not a cursor this API returned")
    return key, ip


def _limit(get: dict[str, list[str]]) -> int:
    return parse_count("limit", get["limit"][-1], low=1, high=MAX_LIMIT) if "limit" in get else 100


class ApiServer:
    """The API listening on one address, on the running event loop."""

    def __init__(self, api: Api, host: str, port: int) -> None:
        self.api, self.host, self.port = api, host, port
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; ``OSError`` when the address cannot be bound."""
        self.runner = web.AppRunner(self.api.app(), access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host or None, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self.runner.cleanup()
            self.runner = None
            raise
        log.info("API listening on http://%s:%d%s/",
                 f"[{self.host}]" if ":" in self.host else self.host or "*", self.port, PREFIX)

    async def stop(self) -> None:
        """Stop listening and finish open requests."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class ApiThread:
    """The API on its own event loop in a thread (the ``--workers`` supervisor, which
    has no event loop of its own)."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="spamsink-api", daemon=True)

    def start(self) -> None:
        """Start serving; raises what binding raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The API token from ``--api-token`` or the first line of ``--api-token-file``;
    ``ValueError`` with the reason when the file is unreadable or empty, or the token
    is not printable ASCII without spaces (it travels in an HTTP header)."""
    option = "--api-token"
    if token_file:
        option = f"--api-token-file {token_file}"
        try:
            with open(token_file, "rb") as handle:
                token = handle.readline().decode("ascii", "surrogateescape").strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-token-file {token_file}: "
                             f"{exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"--api-token-file {token_file} is empty")
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise ValueError("--api-token is empty")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(f"{option}: the token must be printable ASCII without spaces "
                         f"(it travels in an HTTP header)")
    return token

