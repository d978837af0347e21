"""The client edge over real sockets: which HTTP/1.x requests are served (versions, framing, Host, target
forms, TRACE), a body whose framing breaks after its head, request heads that arrive too slowly, 100 Continue
only for welcome requests, and slow uploads that must not take upstream connections from everyone else."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import socket
from typing import Any
from unittest import mock

import pytest
from aiohttp import HttpVersion, base_protocol, web_protocol
from aiohttp.streams import EMPTY_PAYLOAD as EMPTY
from conftest import MakeGateway, RunningGateway
from test_proxy import envelope, eventually, raw_connection, raw_exchange, read_response, split_response
from upstream_server import UpstreamServer

from gateway.http_edge import EdgeParser, SendWatch


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data` and read until the gateway closes the connection, which it must do within 10 s."""
    return await raw_exchange(port, data, read_timeout=10)


def refused(raw: bytes, status: int, reason: str) -> dict[str, str]:
    """The one response on a connection the gateway then closed: `status` with `reason` in the envelope,
    whose canonical status says whose fault it was (the client's, but for a timeout)."""
    assert raw.count(b"\r\nX-Request-ID: ") == 1, raw  # one response, nothing after it
    got, headers, body = split_response(raw)
    assert (got, headers["content-type"]) == (status, "application/json")
    assert raw.startswith(b"HTTP/1.")
    error = envelope(body)
    assert error["reason"] == reason
    assert error["status"] == ("UNAVAILABLE" if status == 408 else "INVALID_ARGUMENT")
    return headers


def in_flight(gw: RunningGateway) -> int:
    assert gw.server.gateway is not None
    return gw.server.gateway.admission.in_flight


def mock_head() -> Any:
    return mock.Mock(version=(1, 1), chunked=False, path="/", headers={})


@pytest.fixture
async def gw(upstream: UpstreamServer, make_gateway: MakeGateway) -> RunningGateway:
    return await make_gateway(upstream.url)


# --- versions and framing -----------------------------------------------------------------------------------

SMUGGLED = b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED_1_0 = b"POST /echo/x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
CHUNKED_1_0 += b"Connection: keep-alive\r\n\r\n0\r\n\r\n"


async def test_transfer_encoding_in_http_1_0_is_400_and_nothing_is_forwarded(gw, upstream):
    """RFC 9112 §6.1: such a body could carry a second request past the gateway."""
    raw = await exchange(gw.port, CHUNKED_1_0 + SMUGGLED)
    refused(raw, 400, "MALFORMED_REQUEST")
    assert upstream.requests == []


def test_nothing_after_a_refused_head_is_read() -> None:
    """Bytes that come after a refusal, in a later read, are never parsed: they could be a smuggled
    request, and the connection closes once the refusal is answered."""

    class Parser:
        def __init__(self) -> None:
            self.fed: list[bytes] = []

        def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
            self.fed.append(data)
            head = mock.Mock(version=HttpVersion(2, 0), chunked=False, path="/", headers={})
            return [(head, EMPTY)], False, b""

    real = Parser()
    parser = EdgeParser(real, _Protocol(), 10.0, _Timers())  # type: ignore[arg-type]
    [(refusal, _)] = parser.feed_data(b"GET / HTTP/2.0\r\n\r\n")[0]
    assert refusal.status == 505
    assert parser.feed_data(SMUGGLED) == ((), False, b"")
    assert real.fed == [b"GET / HTTP/2.0\r\n\r\n"]


@pytest.mark.parametrize(
    ("request_line", "status", "reason"),
    [
        (b"GET /echo/x\r\n", 400, "MALFORMED_REQUEST"),  # HTTP/0.9: no version, no headers, no Host
        (b"GET /echo/x HTTP/0.9\r\nHost: x\r\n", 400, "MALFORMED_REQUEST"),
        (b"GET /echo/x HTTP/2.0\r\nHost: x\r\n", 505, "HTTP_VERSION_NOT_SUPPORTED"),
        (b"GET /echo/x HTTP/3.0\r\nHost: x\r\n", 505, "HTTP_VERSION_NOT_SUPPORTED"),
        (b"GET /echo/x HTTP/1.2\r\nHost: x\r\n", 505, "HTTP_VERSION_NOT_SUPPORTED"),
    ],
    ids=["0.9-bare", "0.9", "2.0", "3.0", "1.2"],
)
async def test_only_http_1_0_and_1_1_are_served(gw, upstream, request_line, status, reason):
    raw = await exchange(gw.port, request_line + b"\r\n")
    refused(raw, status, reason)
    assert upstream.requests == []


async def test_http_1_0_is_still_served(gw, upstream):
    raw = await exchange(gw.port, b"GET /echo/old HTTP/1.0\r\n\r\n")
    assert split_response(raw)[0] == 200 and upstream.last.raw_path == "/echo/old"


@pytest.mark.parametrize(
    "host",
    [
        b"gw test",
        b"gw\ttest",
        b"a/b",
        b"a@b",
        b"[::1",
        b"a:b:c",
        b"a:123456",
        b"caf\xc3\xa9.example",
        b"a\\b",
        b"evil.example,api.example",  # RFC 3986 sub-delims and escapes, which no host name has
        b"a%2Fb",
        b"a;b",
    ],
)
async def test_a_host_that_is_not_host_port_is_400(gw, upstream, host):
    raw = await exchange(gw.port, b"GET /echo/x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    refused(raw, 400, "MALFORMED_REQUEST")
    assert upstream.requests == []


@pytest.mark.parametrize(
    "host", ["gw", "gw.example:8080", "[::1]:8080", "127.0.0.1", "xn--bcher-kva.example", "a_b.internal"]
)
async def test_valid_hosts_pass_and_reach_x_forwarded_host(gw, upstream, client, host):
    async with client.get(f"{gw.url}/echo/x", headers={"Host": host}) as resp:
        assert resp.status == 200
    assert upstream.last.header("X-Forwarded-Host") == host


async def test_a_coding_other_than_chunked_is_501(gw, upstream):
    raw = await exchange(
        gw.port, b"POST /echo/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    )
    refused(raw, 501, "UNSUPPORTED_TRANSFER_CODING")
    assert upstream.requests == []


async def test_a_refused_request_does_not_take_the_ones_before_it_in_the_same_packet(gw, upstream):
    """A pipelined good request is answered; the bad one after it is refused and ends the connection."""
    raw = await exchange(gw.port, b"GET /echo/first HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/x HTTP/2.0\r\n\r\n")
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"505 " in rest
    assert [seen.raw_path for seen in upstream.requests] == ["/echo/first"]


# --- target forms and TRACE ---------------------------------------------------------------------------------


async def test_an_absolute_form_target_is_routed_and_forwarded_by_its_path(upstream, make_gateway):
    gw = await make_gateway(
        upstream.url,
        routes=[{"name": "open", "prefix": "/echo", "auth": "none"}, {"name": "locked", "prefix": "/"}],
    )
    raw = await exchange(
        gw.port,
        b"GET http://api.example:8080/echo/abs?x=%2F HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n",
    )
    assert split_response(raw)[0] == 200
    assert upstream.last.raw_path == "/echo/abs?x=%2F"
    assert upstream.last.header("X-Forwarded-Host") == "api.example:8080"  # the target's authority wins
    for target, status in ((b"HTTP://api.example/private", 401), (b"http://api.example", 401)):
        raw = await exchange(gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert split_response(raw)[0] == status, target  # routed by its path: the locked route
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("target", [b"http://user:pw@api.example/echo/x", b"http:///echo/x", b"http://a b/x"])
async def test_a_bad_absolute_form_target_is_400(gw, upstream, target):
    raw = await exchange(gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert split_response(raw)[0] == 400
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("routes", "allow"),
    [
        (
            [
                {"name": "reads", "prefix": "/a", "methods": ["GET"]},
                {"name": "all", "prefix": "/", "auth": "none"},
            ],
            "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT",
        ),
        ([{"name": "diag", "prefix": "/", "methods": ["GET", "TRACE"], "auth": "none"}], "GET, HEAD, TRACE"),
    ],
)
async def test_options_asterisk_is_answered_by_the_gateway(upstream, make_gateway, routes, allow):
    gw = await make_gateway(upstream.url, routes=routes)
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (status, headers["allow"], body) == (200, allow, b"")
        writer.write(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")  # the asterisk is for OPTIONS only
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    refused(raw, 400, "MALFORMED_REQUEST")
    assert upstream.requests == []


async def test_trace_is_405_unless_a_route_lists_it(upstream, make_gateway):
    gw = await make_gateway(
        upstream.url,
        routes=[
            {"name": "diag", "prefix": "/echo/diag", "methods": ["TRACE"], "auth": "none"},
            {"name": "all", "prefix": "/", "auth": "none"},
        ],
    )
    secret = b"Authorization: Bearer trace-me-if-you-can\r\n"
    raw = await exchange(
        gw.port, b"TRACE /echo/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + secret + b"\r\n"
    )
    status, headers, body = split_response(raw)
    assert (status, envelope(body)["reason"]) == (405, "METHOD_NOT_ALLOWED")
    assert headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
    assert b"trace-me" not in raw
    assert upstream.requests == []
    raw = await exchange(gw.port, b"TRACE /echo/diag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert split_response(raw)[0] == 200 and upstream.last.method == "TRACE"


# --- a body whose framing breaks after its head -------------------------------------------------------------

CHUNKED_HEAD = b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


async def test_a_bad_chunk_while_streaming_is_400_at_once_and_frees_the_upstream(
    upstream, make_gateway, client
):
    gw = await make_gateway(
        upstream.url,
        upstream={
            "pool": {"max_connections": 1},
            "request_buffer_bytes": 0,  # the upload streams: the upstream already has the request
            "timeouts": {"request_body_idle": 60, "connect": 5},
        },
    )
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(CHUNKED_HEAD)
        await eventually(lambda: len(upstream.requests) == 1)
        writer.write(b"zz\r\n")
        async with asyncio.timeout(10):  # request_body_idle is 60 s: only the broken framing answers now
            raw = await reader.read(-1)
    headers = refused(raw, 400, "MALFORMED_REQUEST")
    assert headers["connection"] == "close"
    assert upstream.requests[0].body_size is None  # aborted upstream, never completed
    async with client.get(f"{gw.url}/echo/after") as resp:  # the pool's one connection is free again
        assert resp.status == 200


async def test_a_bad_chunk_while_buffering_is_400_before_the_upstream(gw, upstream):
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(CHUNKED_HEAD)
        await eventually(lambda: in_flight(gw) == 1)  # the head was parsed: the next bytes are body bytes
        writer.write(b"zz\r\n")
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    refused(raw, 400, "MALFORMED_REQUEST")
    assert upstream.requests == []


async def test_a_bad_chunk_in_an_unread_body_closes_quietly(upstream, make_gateway, caplog):
    gw = await make_gateway(upstream.url, routes=[{"name": "locked", "prefix": "/"}])
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(CHUNKED_HEAD)
        status, _, _ = await read_response(reader)  # refused before its body was read
        assert status == 401
        writer.write(b"zz\r\n")
        async with asyncio.timeout(10):
            assert await reader.read(-1) == b""
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert upstream.requests == []


# --- slow request heads -------------------------------------------------------------------------------------


async def test_a_head_that_stops_short_is_408_after_header_timeout_and_closed(upstream, make_gateway):
    gw = await make_gateway(upstream.url, server={"header_timeout": 0.5, "keepalive_timeout": 75})
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        async with asyncio.timeout(10):  # keepalive_timeout (75 s) would be all before header_timeout
            raw = await reader.read(-1)
    refused(raw, 408, "REQUEST_TIMEOUT")
    assert upstream.requests == []


async def test_a_silent_new_connection_is_closed_after_header_timeout(upstream, make_gateway):
    gw = await make_gateway(upstream.url, server={"header_timeout": 0.3, "keepalive_timeout": 75})
    async with raw_connection(gw.port) as (reader, _):
        async with asyncio.timeout(10):
            assert await reader.read(-1) == b""  # closed, with nothing to answer


async def test_a_pipelined_head_that_stops_short_is_408_after_the_answer_before_it(upstream, make_gateway):
    gw = await make_gateway(upstream.url, server={"header_timeout": 2, "keepalive_timeout": 75})
    raw = await exchange(gw.port, b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/y HTTP/1.1\r\nX-Slow: ")
    first, _, second = raw.partition(b"HTTP/1.0 408 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b"REQUEST_TIMEOUT" in second
    assert [seen.raw_path for seen in upstream.requests] == ["/echo/x"]


async def test_a_head_that_stops_short_behind_a_body_is_408(upstream, make_gateway):
    gw = await make_gateway(upstream.url, server={"header_timeout": 2, "keepalive_timeout": 75})
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        await eventually(lambda: in_flight(gw) == 1)
        writer.write(b"hello" + b"GET /echo/y HTTP/1.1\r\nX-Slow: ")  # the body's end, a head's start
        async with asyncio.timeout(15):  # keepalive_timeout (75 s) would be all before header_timeout
            raw = await reader.read(-1)
    first, _, second = raw.partition(b"HTTP/1.0 408 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b"REQUEST_TIMEOUT" in second
    assert [(seen.raw_path, seen.body_size) for seen in upstream.requests] == [("/echo/x", 5)]


async def test_a_bad_head_behind_a_body_does_not_fail_that_body(upstream, make_gateway):
    gw = await make_gateway(upstream.url)
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        await eventually(lambda: in_flight(gw) == 1)
        writer.write(b"hello" + b"GARBAGE\r\n\r\n")
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    first, _, second = raw.partition(b"HTTP/1.0 400 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b"MALFORMED_REQUEST" in second
    assert [(seen.raw_path, seen.body_size) for seen in upstream.requests] == [("/echo/x", 5)]


class _Timer:
    def __init__(self, callback: Any) -> None:
        self.fire = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Timers:
    """A loop stand-in for EdgeParser: records the head timers it starts, which a test fires by hand."""

    def __init__(self) -> None:
        self.started: list[_Timer] = []

    def call_later(self, _delay: float, callback: Any) -> _Timer:
        self.started.append(_Timer(callback))
        return self.started[-1]


class _Parser:
    """Stands in for llhttp: a head is whole once b"\r\n\r\n" has arrived."""

    def __init__(self) -> None:
        self.seen = b""

    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        self.seen += data
        if b"\r\n\r\n" not in self.seen:
            return [], False, b""
        self.seen = self.seen.partition(b"\r\n\r\n")[2]
        return [(mock_head(), EMPTY)], False, b""


class _Protocol:
    def __init__(self) -> None:
        self.parser: EdgeParser | None = None
        self.queued: list[Any] = []
        self.closed = False

    def data_received(self, data: bytes) -> None:
        assert self.parser is not None
        self.queued += self.parser.feed_data(data)[0]

    def force_close(self) -> None:
        self.closed = True


def test_head_bytes_never_buy_more_time() -> None:
    """The head timer runs from the first byte (from the connect for a connection's first request), and
    bytes that do not finish the head do not restart it: a dribbling client is 408 on time."""
    timers, protocol = _Timers(), _Protocol()
    parser = protocol.parser = EdgeParser(_Parser(), protocol, 10.0, timers)  # type: ignore[arg-type]
    for byte in b"GET / HTTP/1.1\r\nHost":
        assert parser.feed_data(bytes([byte]))[0] == []
    [timer] = timers.started  # one timer for all of those bytes
    timer.fire()
    [(refusal, _)] = protocol.queued
    assert (refusal.status, refusal.exc.error.reason) == (408, "REQUEST_TIMEOUT")
    assert parser.feed_data(b": x\r\n\r\n") == ((), False, b"")  # nothing is read after a refusal


def test_a_whole_head_stops_the_timer_and_an_idle_connection_closes_quietly() -> None:
    timers, protocol = _Timers(), _Protocol()
    parser = protocol.parser = EdgeParser(_Parser(), protocol, 10.0, timers)  # type: ignore[arg-type]
    parser.await_head()  # a new connection
    parser.feed_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert timers.started[0].cancelled
    idle = _Protocol()
    idle.parser = EdgeParser(_Parser(), idle, 10.0, timers)  # type: ignore[arg-type]
    idle.parser.await_head()
    timers.started[-1].fire()
    assert idle.closed and idle.queued == []


def test_an_idle_kept_alive_connection_starts_no_head_timer() -> None:
    """Between requests keepalive_timeout governs: a whole head, or empty lines after one (which old
    clients send after a body), start no head timer."""
    timers, protocol = _Timers(), _Protocol()
    parser = protocol.parser = EdgeParser(_Parser(), protocol, 10.0, timers)  # type: ignore[arg-type]
    parser.feed_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    parser.feed_data(b"\r\n")
    assert timers.started == []


def test_every_parser_method_aiohttp_calls_is_screened() -> None:
    """EdgeParser stands in for aiohttp's parser: an aiohttp upgrade that calls another method of it would
    fall through to __getattr__ unscreened, so this reads aiohttp's source for the calls it makes."""
    source = inspect.getsource(web_protocol) + inspect.getsource(base_protocol)
    called = set(re.findall(r"self\._parser\.(\w+)\(", source))
    assert called and called <= set(EdgeParser.__dict__), called - set(EdgeParser.__dict__)


# --- 100 Continue -------------------------------------------------------------------------------------------

EXPECT = b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"


async def test_100_continue_comes_only_after_authentication(upstream, make_gateway):
    gw = await make_gateway(upstream.url, routes=[{"name": "locked", "prefix": "/"}])
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(EXPECT)  # no credential
        status, headers, body = await read_response(reader)  # the first answer is the refusal, not 100
    assert (status, envelope(body)["reason"]) == (401, "AUTHENTICATION_REQUIRED")
    assert headers["connection"] == "close"  # the body it held back must not be read as a next request
    assert upstream.requests == []


async def test_100_continue_comes_only_within_the_rate_limits(upstream, make_gateway):
    gw = await make_gateway(
        upstream.url,
        rate_limit={"policies": {"one": {"key": ["ip"], "rate": 0.001, "burst": 1, "scope": "local"}}},
        routes=[{"name": "all", "prefix": "/", "auth": "none", "rate_limit": ["one"]}],
    )
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(EXPECT)
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        assert (await read_response(reader))[0] == 200
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(EXPECT)
        status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (429, "close")
    assert upstream.last.body_size == 5 and len(upstream.requests) == 1


# --- slow uploads -------------------------------------------------------------------------------------------


async def _trickle(port: int, size: int, pause: float, stop: asyncio.Event) -> tuple[int, str] | None:
    """Upload a `size`-byte body, the first byte at once, then one per `pause`, until the gateway answers:
    (status, reason), or None if `stop` came first. Nothing is written once the answer is in, so it cannot
    be lost to a reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(read_response(reader, read_timeout=3600))
    try:
        writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nx" % size)
        for _ in range(size - 1):
            await asyncio.wait([answer], timeout=pause)
            if answer.done() or stop.is_set():
                break
            writer.write(b"x")
        if not answer.done():
            return None
        status, _, body = answer.result()
        return status, envelope(body)["reason"]
    finally:
        answer.cancel()
        writer.close()


@pytest.mark.parametrize(("buffer", "normal"), [(65536, 200), (0, 504)], ids=["buffered", "streamed"])
async def test_slow_small_uploads_take_no_upstream_connection(upstream, make_gateway, client, buffer, normal):
    """nginx's proxy_request_buffering: a body within request_buffer_bytes is read before an upstream
    connection is taken, so slow clients cannot starve everyone else of the pool. Streamed from the first
    byte (the control), the same slow uploads hold the pool and every other request times out waiting."""
    gw = await make_gateway(
        upstream.url,
        upstream={"pool": {"max_connections": 2}, "timeouts": {"connect": 1}, "request_buffer_bytes": buffer},
        limits={"min_body_rate": 0},  # buffering alone protects here
    )
    stop = asyncio.Event()
    slow = [asyncio.create_task(_trickle(gw.port, 1000, 0.2, stop)) for _ in range(4)]
    try:
        await eventually(lambda: in_flight(gw) == 4)
        if not buffer:
            await eventually(lambda: len(upstream.requests) == 2)  # the pool's connections are theirs
        for index in range(10 if buffer else 2):
            async with client.post(f"{gw.url}/echo/normal", data=b'{"small": "json"}') as resp:
                assert resp.status == normal, index
    finally:
        stop.set()
        answers = await asyncio.gather(*slow)
    if buffer:
        assert answers == [None] * 4  # still uploading, never answered, never forwarded
        assert {seen.raw_path for seen in upstream.requests} == {"/echo/normal"}


async def test_an_upload_slower_than_min_body_rate_is_408_and_frees_its_connection(
    upstream, make_gateway, client
):
    gw = await make_gateway(
        upstream.url,
        upstream={"pool": {"max_connections": 1}, "request_buffer_bytes": 0, "timeouts": {"connect": 5}},
        limits={"min_body_rate": 1000, "min_body_rate_grace": 0.2},
    )
    answer = await asyncio.wait_for(_trickle(gw.port, 100_000, 0.05, asyncio.Event()), 30)
    assert answer == (408, "REQUEST_TIMEOUT")
    assert upstream.requests[0].body_size is None  # its upstream request was aborted
    async with client.get(f"{gw.url}/echo/after") as resp:  # and the pool's one connection given back
        assert resp.status == 200


# --- clients that do not read, CONNECT --------------------------------------------------------------------


async def test_a_client_that_reads_nothing_is_cut_after_send_timeout_and_frees_the_upstream(
    upstream, make_gateway, client
):
    gw = await make_gateway(
        upstream.url,
        server={"send_timeout": 0.5},
        upstream={"pool": {"max_connections": 1}, "timeouts": {"connect": 5, "idle_read": 60}},
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    try:
        sock.send(b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n")  # 64 MiB, and never a byte read
        await eventually(lambda: len(upstream.requests) == 1)
        async with client.get(f"{gw.url}/echo/after") as resp:  # waits for the pool's one connection
            assert resp.status == 200
    finally:
        sock.close()


@pytest.mark.parametrize("target", [b"/auth/login", b"api.example:443"])
async def test_connect_is_405_whatever_its_target_and_nothing_after_it_is_read(gw, upstream, target):
    tunnel = b"GET /echo/tunnelled HTTP/1.1\r\nHost: x\r\n\r\n"  # what a tunnel's first bytes could say
    raw = await exchange(gw.port, b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n" + tunnel)
    headers = refused(raw, 405, "METHOD_NOT_ALLOWED")
    assert "CONNECT" not in headers["allow"] and headers["connection"] == "close"
    assert upstream.requests == []


class _Transport:
    """What SendWatch sees of a transport: its write buffer, and whether it was aborted."""

    def __init__(self) -> None:
        self.buffered = 0
        self.limits: dict[str, int] = {}
        self.aborted = False

    def set_write_buffer_limits(self, **limits: int) -> None:
        self.limits = limits

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: None = None) -> tuple[str, int] | None:
        return ("192.0.2.7", 5555) if name == "peername" else default  # plain TCP: no "sslcontext"

    def abort(self) -> None:
        self.aborted = True


def test_the_send_watch_cuts_a_stalled_client_and_spares_a_slow_one() -> None:
    """Any byte left waiting pauses writing (limits of zero), also after close(), which would otherwise
    wait for ever to flush; a client that took some bytes within send_timeout gets another."""
    transport, timers = _Transport(), _Timers()
    watch = SendWatch(transport, 60.0, timers)  # type: ignore[arg-type]
    assert transport.limits == {"high": 0}
    transport.buffered = 30_000
    watch.paused()
    transport.buffered = 29_000  # the client read 1000 bytes in the meantime
    timers.started[-1].fire()
    assert not transport.aborted and len(timers.started) == 2
    timers.started[-1].fire()  # and then nothing more
    assert transport.aborted
