"""The upstream HTTP/1.1 client (gateway/proxy/client.py) against upstreams that answer in the less common
ways HTTP/1.1 allows: interim responses, bodies ended by the connection's close, HEAD on a kept-alive
connection, bytes out of turn, heads too large or endless; its pool's accounting when requests are cancelled,
responses left unread and upstreams stop reading; request bodies on the wire; identity header values; and
HTTPS with and without verification.

The upstream here is a raw asyncio server that plays a script per request, so each test controls the
bytes on the wire; tests/test_proxy.py covers the common paths against an aiohttp upstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import pytest
from aiohttp import web
from test_access_keys import PEPPER, file_entry, keys_file
from test_auth import self_signed_context
from test_proxy import envelope, eventually

from gateway.auth.access_keys import generate_key
from gateway.proxy.client import (
    READ_HIGH_WATER,
    Origin,
    Outgoing,
    Timeouts,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    _Connection,
)

Reply = Callable[[bytes], bytes]
"""The bytes to answer a request head with (the head is given, e.g. to tell HEAD from GET)."""
Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""Answers one request itself, given its head: reads the body (or not) and writes the response, timing one
against the other as the test needs."""


class ScriptedUpstream:
    """Reads each request (its head, then the body the head announces, kept as received in `bodies`) and
    answers it with `reply(head)`; a reply ending in `CLOSE` is followed by closing the connection. With
    `answer` instead, that coroutine handles each request after its head. Its end drops every connection."""

    def __init__(self, reply: Reply | None = None, *, answer: Answer | None = None) -> None:
        self.reply = reply
        self.answer = answer
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.closed = asyncio.Event()
        """Set when a connection that carried a request is closed."""
        self._server: asyncio.Server | None = None
        self._ending = asyncio.Event()
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._ending.set()
        for writer in self._open.values():
            writer.transport.abort()  # also those with unsent bytes, which close() would wait for
        async with asyncio.timeout(10):
            await asyncio.gather(*self._open)

    async def hang(self) -> NoReturn:
        """For an answer: neither answer nor close until the upstream ends, then drop the connection."""
        await self._ending.wait()
        raise ConnectionAbortedError("the test is over")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not served:  # counted once it carries a request: the readiness probe's carry none
                    self.connections += 1
                served += 1
                self.heads.append(head)
                if self.answer is not None:
                    await self.answer(head, reader, writer)
                    continue
                assert self.reply is not None
                self.bodies.append(await read_body(reader, head))
                reply = self.reply(head)
                writer.write(reply.removesuffix(CLOSE))
                await writer.drain()
                if reply.endswith(CLOSE):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the gateway closed the connection
        finally:
            del self._open[task]
            writer.close()
            if served:
                self.closed.set()


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The request body as it is on the wire: chunked (chunk lines, last-chunk and trailers included), or as
    long as Content-Length says."""
    if b"\r\ntransfer-encoding: chunked\r\n" in head.lower():
        raw = line = await reader.readuntil(b"\r\n")
        while size := int(line.split(b";")[0], 16):
            raw += await reader.readexactly(size + 2)
            raw += (line := await reader.readuntil(b"\r\n"))
        while line != b"\r\n":  # trailers, then the blank line
            raw += (line := await reader.readuntil(b"\r\n"))
        return raw
    length = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head.lower())
    return await reader.readexactly(int(length[1])) if length else b""


CLOSE = b"<close>"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def get(client, url: str, method: str = "GET") -> tuple[int, bytes]:
    async with client.request(method, url) as resp:
        return resp.status, await resp.read()


async def test_interim_responses_are_skipped(make_gateway, client):
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    async with ScriptedUpstream(lambda _: early + OK) as up:
        gw = await make_gateway(up.url)
        assert await get(client, f"{gw.url}/a") == (200, b"ok")
        assert await get(client, f"{gw.url}/b") == (200, b"ok")
        assert up.connections == 1  # and the connection stays usable


async def test_a_body_ended_by_the_connections_close_arrives_whole(make_gateway, client):
    body = b"x" * 200_000
    async with ScriptedUpstream(lambda _: b"HTTP/1.1 200 OK\r\n\r\n" + body + CLOSE) as up:
        gw = await make_gateway(up.url)
        assert await get(client, f"{gw.url}/a") == (200, body)
        assert await get(client, f"{gw.url}/b") == (200, body)
        assert up.connections == 2  # such a connection cannot carry another request


@pytest.mark.parametrize("coding", [b"gzip", b"chunked, gzip"])
async def test_a_transfer_coding_not_ending_in_chunked_means_the_body_ends_with_the_connection(
    make_gateway, client, coding
):
    body = gzip.compress(b"hello " * 20_000, mtime=0)  # passed on as it came: the gateway decodes nothing
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %b\r\n\r\n" % coding
    async with ScriptedUpstream(lambda _: head + body + CLOSE) as up:
        gw = await make_gateway(up.url)
        assert await get(client, f"{gw.url}/a") == (200, body)
        assert await get(client, f"{gw.url}/b") == (200, body)
        assert up.connections == 2


async def test_head_then_get_on_one_kept_alive_connection(make_gateway, client):
    def reply(head: bytes) -> bytes:
        if head.startswith(b"HEAD "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # the length a GET would have, no body
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    async with ScriptedUpstream(reply) as up:
        gw = await make_gateway(up.url)
        async with client.head(f"{gw.url}/a") as resp:
            assert (resp.status, resp.headers["Content-Length"]) == (200, "5")
        assert await get(client, f"{gw.url}/a") == (200, b"hello")
        assert await get(client, f"{gw.url}/a", "HEAD") == (200, b"")
        assert await get(client, f"{gw.url}/a") == (200, b"hello")
        assert up.connections == 1


async def test_an_upstream_asking_to_close_gets_a_new_connection_next_time(make_gateway, client):
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with ScriptedUpstream(lambda _: reply) as up:
        gw = await make_gateway(up.url)
        for _ in range(3):
            assert await get(client, f"{gw.url}/a") == (200, b"ok")
        assert up.connections == 3


async def test_a_response_head_beyond_the_limit_is_502(make_gateway, client):
    huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\nContent-Length: 2\r\n\r\nok"
    async with ScriptedUpstream(lambda _: huge) as up:
        gw = await make_gateway(up.url)
        async with client.get(f"{gw.url}/a") as resp:
            assert resp.status == 502
            assert envelope(await resp.read())["reason"] == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize(
    "endless", [b"HTTP/1.1 200 OK\r\nX-Big: ", b"HTTP/1.1 200 "], ids=["header-line", "status-line"]
)
async def test_a_response_head_that_never_ends_is_502_not_buffered_until_the_timeout(
    make_gateway, client, endless
):
    async def answer(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(endless)
        for _ in range(64):  # 4 MiB without a line end (the limits are 16 KiB a line, 256 KiB a head)
            writer.write(b"a" * 65536)
            await writer.drain()
        await up.hang()

    async with ScriptedUpstream(answer=answer) as up:
        gw = await make_gateway(up.url, upstream={"timeouts": {"response_headers": 30}})
        async with asyncio.timeout(10):  # cut at the limit, long before response_headers
            async with client.get(f"{gw.url}/a") as resp:
                assert resp.status == 502
                assert envelope(await resp.read())["reason"] == "UPSTREAM_UNAVAILABLE"


async def test_bytes_out_of_turn_retire_the_connection_not_the_next_request(make_gateway, client):
    # The first answer carries a second, unasked-for response after it.
    replies = iter([OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\njunk", OK, OK])
    async with ScriptedUpstream(lambda _: next(replies)) as up:
        gw = await make_gateway(up.url)
        assert await get(client, f"{gw.url}/a") == (200, b"ok")  # the junk only retires the connection
        assert await get(client, f"{gw.url}/b") == (200, b"ok")
        assert up.connections == 2


async def test_bytes_after_a_whole_streamed_response_do_not_cut_it(make_gateway, client):
    rest = asyncio.Event()

    async def answer(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await rest.wait()  # the gateway is streaming the response by now
        writer.write(b"6\r\n world\r\n0\r\n\r\n" + OK)  # its end, then a response nobody asked for

    async with ScriptedUpstream(answer=answer) as up:
        gw = await make_gateway(up.url)
        async with client.get(f"{gw.url}/a") as resp:
            first = await resp.content.readany()
            rest.set()
            assert (resp.status, first + await resp.read()) == (200, b"hello world")
        assert await get(client, f"{gw.url}/b") == (200, b"hello world")
        assert up.connections == 2  # what came after it retired the connection


async def test_idle_connections_are_closed_after_keepalive_timeout(make_gateway, client):
    async with ScriptedUpstream(lambda _: OK) as up:
        gw = await make_gateway(up.url, upstream={"pool": {"keepalive_timeout": 0.2}})
        assert await get(client, f"{gw.url}/a") == (200, b"ok")
        async with asyncio.timeout(30):  # generous: closing is due after 0.2 s of idleness
            await up.closed.wait()
        assert await get(client, f"{gw.url}/b") == (200, b"ok")
        assert up.connections == 2


# --- the pool: every connection gives its room back, and room goes to whoever can use it -----------------
# Some of these drive the pool itself (as gateway/proxy/http.py does) to place a hang-up or a stalled loop
# exactly; a pool of one connection shows a leaked one as the next request waiting in vain.

TIMEOUTS = Timeouts(connect=5, response_headers=5, idle_read=5)
GET = b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n"


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(max_connections=1, max_per_origin=0, keepalive_timeout=30)
    yield pool
    await pool.close()


async def send(
    pool: UpstreamPool,
    url: str,
    head: bytes = GET,
    body: AsyncIterator[bytes] | None = None,
    **timeouts: float,
) -> UpstreamResponse:
    """One request; the response once its head is here."""
    timing = dataclasses.replace(TIMEOUTS, **timeouts)
    outgoing = Outgoing(Origin.parse(url), head, timing, chunked=False, head_request=False)
    return await pool.request(outgoing, body)


async def fetch(pool: UpstreamPool, url: str) -> tuple[int, bytes]:
    response = await send(pool, url)
    try:
        body = b""
        while chunk := await response.read():
            body += chunk
        return response.status, body
    finally:
        response.release()


async def test_a_request_cancelled_while_its_connection_opens_gives_the_room_back(pool, monkeypatch):
    # uvloop never reports connection_lost for a transport closed while being opened.
    async with ScriptedUpstream(lambda _: OK) as up:
        request = asyncio.create_task(fetch(pool, up.url))
        connection_made = _Connection.connection_made

        def made(self: _Connection, transport: asyncio.BaseTransport) -> None:
            connection_made(self, transport)
            request.cancel()  # the client hangs up just as the connection is made

        monkeypatch.setattr(_Connection, "connection_made", made)
        with pytest.raises(asyncio.CancelledError):
            await request
        monkeypatch.undo()
        assert await fetch(pool, up.url) == (200, b"ok")


async def test_a_response_released_unread_leaves_no_paused_connection_in_the_pool(pool):
    body = b"b" * (READ_HIGH_WATER + 16384)  # past the read-ahead limit: reading the upstream pauses
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    async with ScriptedUpstream(lambda _: reply) as up:
        first = await send(pool, up.url)
        # Usually the body arrives in the read that pauses reading, so the response is complete and paused;
        # either way its connection must not be handed out with the body in it or its reading paused.
        await eventually(lambda: first.complete or first._connection._reading_paused)
        first.release()  # unread: the proxy's handler was cancelled (its client hung up) before it got there
        assert await fetch(pool, up.url) == (200, body)


async def test_a_connection_idle_past_keepalive_timeout_is_not_reused(pool):
    pool.keepalive_timeout = 0.2
    async with ScriptedUpstream(lambda _: OK) as up:
        assert await fetch(pool, up.url) == (200, b"ok")
        # The loop stands still (the point): the sweep that closes idle connections has no chance to run.
        time.sleep(0.3)  # noqa: ASYNC251
        assert await fetch(pool, up.url) == (200, b"ok")
        assert up.connections == 2


UPLOAD_SIZE = 32 << 20
"""Far beyond what socket buffers hold: with an upstream that reads none of it, the writes back up."""
UPLOAD = b"POST / HTTP/1.1\r\nHost: upstream\r\nContent-Length: %d\r\n\r\n" % UPLOAD_SIZE


async def upload(handed: asyncio.Event) -> AsyncIterator[bytes]:
    """The whole body in one chunk; `handed` is set as it goes to the connection, which writes it before
    anything else runs."""
    handed.set()
    yield b"x" * UPLOAD_SIZE


async def test_an_upstream_that_answered_and_stopped_reading_the_body_gets_its_room_back(pool):
    # Its connection still has body to write: closing it must not wait for that to be taken.
    written = asyncio.Event()

    async def answer(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if head.startswith(b"POST"):
            await written.wait()
            writer.write(OK)
            await up.hang()  # reads nothing more, and never closes
        writer.write(OK)

    async with ScriptedUpstream(answer=answer) as up:
        response = await send(pool, up.url, UPLOAD, upload(written))
        assert (response.status, await response.read(), await response.read()) == (200, b"ok", b"")
        response.release()
        assert await fetch(pool, up.url) == (200, b"ok")


async def test_an_upstream_that_takes_none_of_the_body_fails_the_request_after_idle_read(pool):
    async def answer(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if head.startswith(b"POST"):
            await up.hang()  # reads nothing past the head, answers nothing
        writer.write(OK)

    async with ScriptedUpstream(answer=answer) as up:
        async with asyncio.timeout(10):  # due 0.2 s after the upstream took its last byte
            with pytest.raises(UpstreamTimeout, match="took none of the request body"):
                await send(pool, up.url, UPLOAD, upload(asyncio.Event()), idle_read=0.2, response_headers=60)
        assert await fetch(pool, up.url) == (200, b"ok")


def two_upstreams(a: ScriptedUpstream, b: ScriptedUpstream) -> list[dict[str, str]]:
    """Routes: /a/... to one upstream, /b/... to the other."""
    return [
        {"name": "a", "prefix": "/a", "auth": "none", "upstream": a.url},
        {"name": "b", "prefix": "/b", "auth": "none", "upstream": b.url},
    ]


async def test_idle_connections_to_one_upstream_make_room_for_another(make_gateway, client):
    async with ScriptedUpstream(lambda _: OK) as a, ScriptedUpstream(lambda _: OK) as b:
        gw = await make_gateway(
            a.url,
            routes=two_upstreams(a, b),
            upstream={"pool": {"max_connections": 1, "keepalive_timeout": 30}},
        )
        assert await get(client, f"{gw.url}/b/1") == (200, b"ok")
        assert await get(client, f"{gw.url}/a/1") == (200, b"ok")  # not a wait for b's idle connection
        async with asyncio.timeout(10):
            await b.closed.wait()  # closed to make the room


async def test_room_freed_at_one_upstream_reaches_its_waiter_behind_another_upstreams(make_gateway, client):
    go_a, go_b = asyncio.Event(), asyncio.Event()

    def answer_on(go: asyncio.Event, reply: bytes) -> Answer:
        async def answer(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await go.wait()
            writer.write(reply)

        return answer

    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with (
        ScriptedUpstream(answer=answer_on(go_a, OK)) as a,
        ScriptedUpstream(answer=answer_on(go_b, closing)) as b,
    ):
        gw = await make_gateway(
            a.url, routes=two_upstreams(a, b), upstream={"pool": {"max_connections_per_host": 1}}
        )
        assert gw.server.gateway is not None
        waiters = gw.server.gateway.upstream_pool._waiters  # who waits shows nowhere else
        a1 = asyncio.create_task(get(client, f"{gw.url}/a/1"))
        b1 = asyncio.create_task(get(client, f"{gw.url}/b/1"))
        await eventually(lambda: len(a.heads) == len(b.heads) == 1)
        a2 = asyncio.create_task(get(client, f"{gw.url}/a/2"))
        await eventually(lambda: len(waiters) == 1)
        b2 = asyncio.create_task(get(client, f"{gw.url}/b/2"))
        await eventually(lambda: len(waiters) == 2)  # b2 waits behind a2
        go_b.set()  # b1 ends with its connection: room at b, none yet at a
        async with asyncio.timeout(10):
            assert await b1 == (200, b"ok")
            assert await b2 == (200, b"ok")
        go_a.set()
        assert (await a1, await a2) == ((200, b"ok"), (200, b"ok"))


# --- request bodies --------------------------------------------------------------------------------------


async def test_an_empty_chunked_upload_reaches_the_upstream_with_one_last_chunk(make_gateway, client):
    async def nothing() -> AsyncIterator[bytes]:
        return
        yield

    async with ScriptedUpstream(lambda _: OK) as up:
        gw = await make_gateway(up.url)
        async with client.post(f"{gw.url}/x", data=nothing()) as resp:
            assert (resp.status, await resp.read()) == (200, b"ok")
        assert await get(client, f"{gw.url}/y") == (200, b"ok")
        # A second last-chunk would be a request of its own to the upstream.
        assert [head.partition(b"\r\n")[0] for head in up.heads] == [b"POST /x HTTP/1.1", b"GET /y HTTP/1.1"]
        assert b"\r\nTransfer-Encoding: chunked\r\n" in up.heads[0]
        assert up.bodies == [b"0\r\n\r\n", b""]
        assert up.connections == 1


async def test_an_upload_ending_after_the_response_began_does_not_restart_the_head_timeout(
    make_gateway, client
):
    answered = asyncio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield b"a" * 4096
        await answered.wait()
        yield b"b" * 4096

    async def answer(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        answered.set()
        await read_body(reader, head)  # the upload ends now, after the response began
        await asyncio.sleep(0.6)  # past response_headers: only idle_read applies to a response under way
        writer.write(b"1\r\ny\r\n0\r\n\r\n")

    async with ScriptedUpstream(answer=answer) as up:
        gw = await make_gateway(
            up.url,
            upstream={"timeouts": {"response_headers": 0.2, "idle_read": 10}},
            routes=[{"name": "all", "prefix": "/", "auth": "none", "request_buffer_bytes": 1024}],
        )
        async with client.post(f"{gw.url}/up", data=upload()) as resp:
            assert (resp.status, await resp.read()) == (200, b"xy")


# --- identity headers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["id", "customer_id", "team_id"])
async def test_an_access_key_record_with_a_line_break_in_an_identifier_is_401(
    make_gateway, client, tmp_path, monkeypatch, field
):
    # Its identifiers become header values toward the upstream, where a line break would end the line.
    good, bad = generate_key("vbgw_"), generate_key("vbgw_")
    injected = "c1\r\nX-Gateway-Customer-Id: admin"
    keys = keys_file(
        tmp_path / "keys.yaml", [file_entry(good), file_entry(bad, "file2", **{field: injected})]
    )
    monkeypatch.setenv("TEST_PEPPER", PEPPER.decode())
    async with ScriptedUpstream(lambda _: OK) as up:
        gw = await make_gateway(
            up.url,
            routes=[{"name": "all", "prefix": "/", "auth": "required"}],
            auth={"access_keys": {"stores": ["file"], "pepper_env": "TEST_PEPPER", "file": str(keys)}},
        )
        async with client.get(f"{gw.url}/a", params={"accesskey": bad}) as resp:
            assert resp.status == 401
            assert envelope(await resp.read())["reason"] == "INVALID_CREDENTIALS"
        assert up.heads == []
        async with client.get(f"{gw.url}/a", params={"accesskey": good}) as resp:
            assert resp.status == 200  # the setup itself is sound
        assert b"\r\nX-Gateway-Customer-Id: cust-file\r\n" in up.heads[0]


# --- HTTPS -----------------------------------------------------------------------------------------------


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"over {request.scheme}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed_context(tmp_path)).start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_https_upstream_certificates_are_verified(tls_upstream, make_gateway, client):
    gw = await make_gateway(tls_upstream)
    async with client.get(f"{gw.url}/a") as resp:
        assert resp.status == 502  # nobody trusts that certificate
        assert envelope(await resp.read())["reason"] == "UPSTREAM_UNAVAILABLE"


async def test_https_upstream_without_verification_when_configured(tls_upstream, make_gateway, client):
    gw = await make_gateway(tls_upstream, upstream={"tls_verify": False})
    for _ in range(2):
        assert await get(client, f"{gw.url}/a") == (200, b"over https")
