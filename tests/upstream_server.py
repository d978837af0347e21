"""Real, deliberately misbehaving HTTP upstreams on loopback for the gateway's end-to-end tests.

`UpstreamServer` is an aiohttp app whose endpoints cover the awkward cases (hangs, resets, short bodies,
odd error shapes, hop-by-hop headers, stale keep-alive connections, WebSockets). `MalformedUpstream` speaks
broken HTTP that aiohttp itself would never produce. `refused_url()` points at a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn, Self

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024
HUGE_SIZE = 8 * 1024 * 1024
HEAD_LEN = 12345
WS_PROTOCOLS = ("v1.events", "v2.events")
WS_PING_PAYLOAD = b"from-upstream"

_PATTERN = bytes(range(256))

FLAT_ERROR: dict[str, str] = {"error": "CALL_NOT_FOUND", "message": "The call was not found."}
GZIP_JSON: dict[str, Any] = {"compressed": True, "items": list(range(50))}
# mtime=0 keeps the compressed bytes stable, so tests can compare them byte for byte.
GZIP_BODY = gzip.compress(json.dumps(GZIP_JSON).encode(), mtime=0)
_GZIP_FLAT = gzip.compress(json.dumps(FLAT_ERROR).encode(), mtime=0)
# An RFC 9457 validation problem with field-level errors in an extension member.
PROBLEM_ERRORS: dict[str, Any] = {
    "type": "https://example.net/validation-error",
    "title": "Your request is not valid.",
    "errors": [
        {"detail": "must be a positive integer", "pointer": "#/age"},
        {"detail": "must be 'green', 'red' or 'blue'", "pointer": "#/profile/color"},
        "a string item",
    ],
}

# Deliberately independent of gateway.envelope: a fake that reuses the code under test proves nothing.
_CANONICAL_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "PAYMENT_REQUIRED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}

Shape = Literal[
    "empty", "html", "text", "problem", "canonical", "canonical-noid", "flat", "lowercode",
    "detail", "code", "longmessage", "gzip", "huge", "badjson", "problem-errors", "status-list",
]  # fmt: skip


def pattern_bytes(offset: int, size: int) -> bytes:
    """`size` bytes of the endless bytes(range(256)) stream, starting at `offset`."""
    start = offset % 256
    return (_PATTERN * ((start + size) // 256 + 1))[start : start + size]


def pattern_sha256(size: int) -> str:
    """sha256 of the first `size` pattern bytes, computed in chunks (sizes may be gigabytes)."""
    digest = hashlib.sha256()
    for offset in range(0, size, CHUNK):
        digest.update(pattern_bytes(offset, min(CHUNK, size - offset)))
    return digest.hexdigest()


@dataclass(slots=True)
class Seen:
    """One request as the upstream received it. Body fields stay None unless the endpoint read the body."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_size: int | None = None
    body_sha256: str | None = None

    def header(self, name: str) -> str | None:
        """First value of `name` (case-insensitive), or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


_SEEN = web.RequestKey("seen", Seen)


def _raw_headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]


async def _digest_body(request: web.BaseRequest) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(CHUNK):
        size += len(chunk)
        digest.update(chunk)
    return size, digest.hexdigest()


def _add_extra_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    for extra in request.query.getall("header", []):
        name, _, value = extra.partition(":")
        response.headers.add(name.strip(), value.strip())


async def _forever() -> NoReturn:
    # Only cancellation ends this: the client going away (handler_cancellation=True) or server shutdown.
    while True:
        await asyncio.Event().wait()


def _transport(request: web.BaseRequest) -> asyncio.Transport:
    transport = request.transport
    assert transport is not None, "connection already gone"
    return transport


class UpstreamServer:
    """`async with UpstreamServer() as up:` — an aiohttp upstream on 127.0.0.1:<random port>."""

    def __init__(self, keepalive_timeout: float = 75.0, shutdown_timeout: float = 0.25) -> None:
        self.keepalive_timeout = keepalive_timeout
        # Short on purpose: /hang handlers still open at exit would otherwise hold up teardown for 60 s.
        self.shutdown_timeout = shutdown_timeout
        self.port = 0
        self.url = ""
        self.host_header = ""
        self.requests: list[Seen] = []
        self.connections_opened = 0
        self.ws_pongs: list[bytes] = []
        self.ws_close_codes: list[int | None] = []
        self.ws_headers: list[tuple[str, str]] = []
        self._answered_connections: set[object] = set()  # strong references: ids would be reused
        self._runner: web.AppRunner | None = None

    @property
    def last(self) -> Seen:
        """The most recent request received."""
        return self.requests[-1]

    async def __aenter__(self) -> Self:
        app = web.Application(middlewares=[self._record])
        routes = app.router
        routes.add_route("*", "/echo{tail:.*}", self._echo)
        routes.add_get("/bytes/{n:\\d+}", self._bytes)
        routes.add_post("/sink", self._sink)
        routes.add_put("/sink", self._sink)
        routes.add_route("*", "/status/{code:\\d{3}}", self._status)
        routes.add_route("*", "/slow", self._slow)
        routes.add_route("*", "/hang", self._hang)
        routes.add_route("*", "/hang-body", self._partial_body)
        routes.add_route("*", "/close-early", self._partial_body)
        routes.add_route("*", "/reset", self._reset)
        routes.add_route("*", "/stale{tail:.*}", self._stale)
        routes.add_route("*", "/redirect", self._redirect)
        routes.add_route("*", "/set-cookie", self._set_cookie)
        routes.add_route("*", "/cookies", self._cookies)
        routes.add_route("*", "/gzip", self._gzip)
        routes.add_get("/head-len", self._head_len)  # allow_head=True by default
        routes.add_route("*", "/no-content", self._no_content)
        routes.add_route("*", "/hop", self._hop)
        routes.add_get("/ws", self._ws)

        # These kwargs travel AppRunner -> web.Server -> RequestHandler. handler_cancellation makes a
        # client disconnect cancel /hang-style handlers instead of leaving them parked until shutdown.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            auto_decompress=False,
            keepalive_timeout=self.keepalive_timeout,
            handler_cancellation=True,
            shutdown_timeout=self.shutdown_timeout,
        )
        try:
            await self._runner.setup()
            server = self._runner.server
            assert server is not None
            # web.Server.connection_made runs once per accepted TCP connection; aiohttp has no public hook.
            count_and_track = server.connection_made

            def connection_made(handler: Any, transport: asyncio.Transport) -> None:
                self.connections_opened += 1
                count_and_track(handler, transport)

            server.connection_made = connection_made  # type: ignore[method-assign]

            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.host_header = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host_header}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # Recorded on arrival, so requests that never get an answer (/hang, /reset) still count.
        seen = Seen(request.method, request.raw_path, _raw_headers(request))
        self.requests.append(seen)
        request[_SEEN] = seen
        response: web.StreamResponse = await handler(request)
        return response

    async def _consume(self, request: web.Request) -> Seen:
        seen = request[_SEEN]
        seen.body_size, seen.body_sha256 = await _digest_body(request)
        return seen

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        seen = await self._consume(request)
        return web.json_response(
            {
                "method": seen.method,
                "raw_path": seen.raw_path,
                "headers": [list(h) for h in seen.headers],
                "body_size": seen.body_size,
                "body_sha256": seen.body_sha256,
            }
        )

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = n
        await response.prepare(request)
        for offset in range(0, n, CHUNK):
            await response.write(pattern_bytes(offset, min(CHUNK, n - offset)))
        await response.write_eof()
        return response

    async def _sink(self, request: web.Request) -> web.StreamResponse:
        seen = await self._consume(request)
        return web.json_response({"size": seen.body_size, "sha256": seen.body_sha256})

    async def _status(self, request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        shape = request.query.get("shape", "empty")
        response = await self._shaped(request, code, shape)
        if not response.prepared:  # a streamed shape has already sent its headers, extras included
            _add_extra_headers(request, response)
        return response

    async def _shaped(self, request: web.Request, code: int, shape: str) -> web.StreamResponse:
        canonical_status = _CANONICAL_STATUS.get(code, "INTERNAL" if code >= 500 else "INVALID_ARGUMENT")
        canonical = {
            "status": canonical_status,
            "reason": "BILLING_ACCESS_DENIED",
            "message": "Billing access denied.",
            "request_id": "req_upstream",
        }
        bodies: dict[str, Any] = {
            "problem": {"type": "about:blank", "title": "Upstream", "status": code, "detail": "Nope."},
            "canonical": {"error": canonical},
            "canonical-noid": {"error": {k: v for k, v in canonical.items() if k != "request_id"}},
            "flat": FLAT_ERROR,
            "lowercode": {"error": "invalid_request", "message": "The request was invalid."},
            "detail": {"detail": "Some detail"},
            "code": {"code": "QUOTA_EXCEEDED", "message": "The quota was exceeded."},
            "longmessage": {"message": "x" * 5000},
            "problem-errors": PROBLEM_ERRORS,
            # A canonical-looking envelope whose status is no string: JSON the gateway must not trip on.
            "status-list": {"error": {**canonical, "status": [canonical_status]}},
        }
        if shape in bodies:
            ctype = "application/problem+json" if shape.startswith("problem") else "application/json"
            return web.Response(status=code, body=json.dumps(bodies[shape]).encode(), content_type=ctype)
        if shape == "empty":
            return web.Response(status=code)
        if shape == "html":
            html = f"<html><body><h1>{code} Upstream Error</h1></body></html>"
            return web.Response(status=code, text=html, content_type="text/html")
        if shape == "text":
            return web.Response(status=code, text="upstream says no", content_type="text/plain")
        if shape == "badjson":
            return web.Response(status=code, body=b"{not json", content_type="application/json")
        if shape == "gzip":
            return web.Response(
                status=code,
                body=_GZIP_FLAT,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        if shape == "huge":
            return await self._huge(request, code)
        raise web.HTTPBadRequest(text=f"unknown shape {shape!r}")

    async def _huge(self, request: web.Request, code: int) -> web.StreamResponse:
        head, tail = b'{"error":"HUGE","message":"', b'"}'
        response = web.StreamResponse(status=code, headers={"Content-Type": "application/json"})
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = HUGE_SIZE
        _add_extra_headers(request, response)
        await response.prepare(request)
        await response.write(head)
        filler = HUGE_SIZE - len(head) - len(tail)
        block = b"x" * CHUNK
        for offset in range(0, filler, CHUNK):
            await response.write(block[: min(CHUNK, filler - offset)])
        await response.write(tail)
        await response.write_eof()
        return response

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text="ok")

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        await _forever()

    async def _partial_body(self, request: web.Request) -> web.StreamResponse:
        # Both promise more body than they send: /hang-body then stalls, /close-early hangs up (FIN).
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 100 if request.path == "/hang-body" else 1000
        await response.prepare(request)
        await response.write(pattern_bytes(0, 10))
        if request.path == "/close-early":
            _transport(request).close()
        await _forever()

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        transport = _transport(request)
        # Linger 0 turns the close into an RST rather than a clean FIN.
        transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        transport.abort()
        await _forever()

    async def _stale(self, request: web.Request) -> web.StreamResponse:
        # Echoes the first request on a connection and drops the connection, unanswered, when the next one
        # arrives: an upstream whose keep-alive timer fires just as the client reuses the connection.
        if request.protocol in self._answered_connections:
            _transport(request).close()
            await _forever()
        self._answered_connections.add(request.protocol)
        return await self._echo(request)

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/echo/redirected"})

    async def _set_cookie(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="cookie set", headers={"Set-Cookie": "session=abc; Path=/"})

    async def _cookies(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"cookie": request.headers.get("Cookie")})

    async def _gzip(self, request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return web.Response(body=GZIP_BODY, headers=headers)

    async def _head_len(self, request: web.Request) -> web.StreamResponse:
        # aiohttp keeps Content-Length on HEAD and drops the body itself.
        return web.Response(body=pattern_bytes(0, HEAD_LEN), content_type="application/octet-stream")

    async def _no_content(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def _hop(self, request: web.Request) -> web.StreamResponse:
        headers = {
            "Connection": "keep-alive, X-Hop-Secret",
            "X-Hop-Secret": "hop-secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "Trailer": "X-T",
            "Upgrade": "h2c",
        }
        return web.Response(text="hop", headers=headers)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.ws_headers = _raw_headers(request)
        # autoping=True would make receive() swallow PONG frames, so pings are answered by hand below.
        ws = web.WebSocketResponse(autoping=False, protocols=WS_PROTOCOLS)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                self.ws_pongs.append(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data.removeprefix("close:")))
                elif msg.data == "ping-me":
                    await ws.ping(WS_PING_PAYLOAD)
                else:
                    await ws.send_str(msg.data)
        self.ws_close_codes.append(ws.close_code)
        return ws


MalformedMode = Literal["garbage", "bad-status", "bad-header", "close"]

_MALFORMED_REPLIES: dict[str, bytes] = {
    "garbage": b"HELLO WORLD\r\n\r\n",
    "bad-status": b"HTTP/1.1 abc OK\r\n\r\n",
    # No colon: even aiohttp's lenient response parser rejects this line.
    "bad-header": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nThis is not a header\r\n\r\nok",
    "close": b"",
}


class MalformedUpstream:
    """`async with MalformedUpstream("garbage") as bad:` — reads a request head, replies broken HTTP."""

    def __init__(self, mode: MalformedMode) -> None:
        if mode not in _MALFORMED_REPLIES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.port = 0
        self.url = ""
        self.connections_opened = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            # Closing the writers wakes handlers still waiting for a request head that will never come.
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_opened += 1
        self._writers.add(writer)
        try:
            # Only the head is read; a request body left unread may turn our close into an RST.
            await reader.readuntil(b"\r\n\r\n")
            reply = _MALFORMED_REPLIES[self.mode]
            if reply:
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def refused_url() -> str:
    """A loopback URL whose port was just free: connecting to it is refused (barring a rare reuse race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
