"""Event streams through the gateway with an independent client library (`websockets`), over real sockets:
message size limits, compression, the stop and reload, a full pool, a vanishing client, and what a stream's
access-log line and metrics say."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import logging
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import WSMsgType, web
from test_lifecycle import (  # the subprocess gateway machinery, fixtures included
    Spawn,
    fetch,
    poll,
    session,  # noqa: F401
    slow_requests,
    spawn,  # noqa: F401
    write_config,
)
from test_observability import growth, scrape, value
from test_reload import changed
from test_tls import Authority
from test_upstream_pools import AccessLog, eventually
from upstream_server import UpstreamServer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.config import ConfigError, load_config
from gateway.proxy import ws_relay

KIB = 1024
MIB = 1024 * KIB
ROUTE = "events"


class StreamUpstream:
    """A WebSocket upstream on loopback that records what reaches it: each message's size, the extensions
    offered, and the close frame each stream got ((1006, "") when its connection ended without one).

    Text commands: `push:<n>` sends an n-byte binary message, `flood` pushes 64 KiB messages until the
    stream ends, `close:<code>` closes with that code; anything else is echoed. /refuse answers the upgrade
    with a 403 and a JSON body."""

    def __init__(self) -> None:
        self.url = ""
        self.closes: list[tuple[int, str]] = []
        self.sizes: list[int] = []
        self.offers: list[str | None] = []
        self.flooding = asyncio.Event()
        self.held = asyncio.Event()
        """Set when a /held handshake arrived; it is answered once `release` is set."""
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> StreamUpstream:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/other/ws", self._ws)
        app.router.add_get("/held", self._held)
        app.router.add_get("/refuse", self._refuse)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _refuse(self, request: web.Request) -> web.Response:
        body = {"message": "This customer may not follow calls.", "reason": "EVENTS_NOT_ENABLED"}
        return web.json_response(body, status=403, headers={"WWW-Authenticate": 'Bearer realm="events"'})

    async def _held(self, request: web.Request) -> web.StreamResponse:
        self.held.set()
        await self.release.wait()
        return await self._ws(request)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.offers.append(request.headers.get("Sec-WebSocket-Extensions"))
        ws = web.WebSocketResponse(
            autoping=False,
            autoclose=False,
            max_msg_size=0,
        )
        ws.headers.update({"X-Upstream-Session": "s-1", "Set-Cookie": "sid=1; HttpOnly"})
        await ws.prepare(request)
        flood: asyncio.Task[None] | None = None
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.CLOSE:
                    self.closes.append((msg.data, msg.extra or ""))
                    await ws.close(code=msg.data)
                    break
                if msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR, WSMsgType.CLOSING):
                    self.closes.append((1006, ""))
                    break
                self.sizes.append(len(msg.data))
                if msg.type is WSMsgType.TEXT and msg.data.startswith("push:"):
                    await ws.send_bytes(b"u" * int(msg.data.removeprefix("push:")))
                elif msg.type is WSMsgType.TEXT and msg.data == "flood":
                    flood = asyncio.create_task(self._flood(ws))
                elif msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data.removeprefix("close:")), message=b"upstream done")
                    self.closes.append((ws.close_code or 0, "sent"))
                    break
                elif msg.type is WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            if flood is not None:
                flood.cancel()
                await asyncio.gather(flood, return_exceptions=True)
        return ws

    async def _flood(self, ws: web.WebSocketResponse) -> None:
        chunk = b"e" * (64 * KIB)
        self.flooding.set()
        while not ws.closed:
            await ws.send_bytes(chunk)


class SlowToCloseUpstream:
    """Speaks just enough WebSocket to answer a close frame late: after the gateway's close frame it waits up
    to a second for the gateway to drop the connection, then answers. `cut_before_answer` says whether the
    gateway dropped it first, i.e. did not wait for the answer. `deaf`: it reads nothing after the
    handshake, ever."""

    def __init__(self, *, deaf: bool = False) -> None:
        self.deaf = deaf
        self.url = ""
        self.close_code: int | None = None
        self.cut_before_answer: bool | None = None
        self.done = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SlowToCloseUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:  # the gateway's health probe: connects, sends nothing
            writer.close()
            return
        self._writers.append(writer)
        try:
            key = re.search(rb"(?im)^sec-websocket-key: *(\S+)", head)
            assert key is not None
            accept = base64.b64encode(hashlib.sha1(key.group(1) + _WS_GUID).digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            if self.deaf:
                await asyncio.Event().wait()  # until the server closes
            first, second = await reader.readexactly(2)
            assert first & 0x0F == 0x8, "expected the gateway's close frame"
            length = second & 0x7F  # a close frame's payload is at most 125 bytes
            mask = await reader.readexactly(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(length)))
            self.close_code = int.from_bytes(payload[:2], "big")
            try:
                self.cut_before_answer = await asyncio.wait_for(reader.read(1), timeout=1.0) == b""
            except TimeoutError:
                self.cut_before_answer = False
                writer.write(bytes([0x88, 2]) + payload[:2])
                await writer.drain()
                await asyncio.wait_for(reader.read(), timeout=10)
        finally:
            self.done.set()
            writer.close()


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture
async def streams() -> AsyncIterator[StreamUpstream]:
    async with StreamUpstream() as up:
        yield up


def events_route(**extra: Any) -> list[dict[str, Any]]:
    return [{"name": ROUTE, "path": "/ws", "websocket": True, "auth": "none", **extra}]


def ws_url(gw: Any, path: str = "/ws") -> str:
    return gw.url.replace("http://", "ws://") + path


def stream(gw: Any, path: str = "/ws", **options: Any) -> Any:
    """A `websockets` client: no compression unless asked, no keepalive pings, no size limit of its own."""
    settings: dict[str, Any] = {
        "compression": None,
        "ping_interval": None,
        "max_size": None,
        "open_timeout": 10,
    }
    return connect(ws_url(gw, path), **(settings | options))


async def closed(ws: ClientConnection) -> tuple[int, str]:
    """Wait for the gateway to close the stream; the code and reason the client received."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None, "the connection ended without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


async def closed_upstream(streams: StreamUpstream, count: int = 1) -> list[tuple[int, str]]:
    await eventually(lambda: len(streams.closes) >= count, "the upstream to see the stream end")
    return streams.closes


# --- message size ------------------------------------------------------------------------------------------


async def test_messages_past_aiohttps_default_limit_go_through_both_ways(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route())
    async with stream(gw) as ws:
        await ws.send(b"c" * (5 * MIB))
        assert len(await ws.recv()) == 5 * MIB  # echoed
        await ws.send(f"push:{5 * MIB}")
        assert len(await ws.recv()) == 5 * MIB
    assert streams.sizes[0] == 5 * MIB


async def test_a_message_over_the_limit_from_the_client_ends_the_stream_with_1009_on_both_sides(
    streams, make_gateway, capsys
):
    access = AccessLog(capsys)
    gw = await make_gateway(streams.url, routes=events_route(max_message_bytes="64KiB"))
    async with stream(gw) as ws:
        await ws.send(b"s" * (64 * KIB))  # at the limit: relayed
        assert len(await ws.recv()) == 64 * KIB
        await ws.send(b"b" * (64 * KIB + 1))
        assert await closed(ws) == (1009, "message too big")
        request_id = ws.response.headers["X-Request-ID"]
    assert await closed_upstream(streams) == [(1009, "message too big")]
    assert streams.sizes == [64 * KIB]  # the upstream never saw the big one
    line = await access.line(request_id)
    assert (line["status"], line["ws_closed_by"], line["ws_close_code"]) == (101, "gateway", 1009)
    assert line["ws_close_reason"] == "message_too_big"
    assert (line["ws_messages_in"], line["bytes_in"]) == (1, 64 * KIB)


async def test_a_message_over_the_limit_from_the_upstream_ends_the_stream_with_1009_on_both_sides(
    streams, make_gateway, capsys
):
    access = AccessLog(capsys)
    gw = await make_gateway(streams.url, routes=events_route(), websocket={"max_message_bytes": "1MiB"})
    async with stream(gw) as ws:
        await ws.send(f"push:{MIB + 1}")
        assert await closed(ws) == (1009, "message too big")
        request_id = ws.response.headers["X-Request-ID"]
    assert await closed_upstream(streams) == [(1009, "message too big")]
    line = await access.line(request_id)
    assert (line["ws_closed_by"], line["ws_close_code"], line["ws_close_reason"]) == (
        "gateway",
        1009,
        "message_too_big",
    )
    assert line["ws_messages_out"] == 0


# --- compression -------------------------------------------------------------------------------------------


async def test_compression_is_off_unless_configured(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route())
    async with stream(gw, compression="deflate") as ws:  # the client offers permessage-deflate
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send("hello")
        assert await ws.recv() == "hello"
    assert streams.offers == [None]  # the upstream is offered nothing either


async def test_compression_with_clients_when_configured(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route(), websocket={"compression": True})
    async with stream(gw, compression="deflate") as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        event = json.dumps({"type": "call_updated", "call": {"id": "c-1", "status": "progressing"}})
        await ws.send(event * 50)
        assert await ws.recv() == event * 50
    assert streams.sizes == [len(event) * 50]  # inflated before the upstream, which was offered nothing
    assert streams.offers == [None]


async def test_the_message_limit_holds_to_the_byte_with_compression(streams, make_gateway):
    gw = await make_gateway(
        streams.url, routes=events_route(max_message_bytes="64KiB"), websocket={"compression": True}
    )
    async with stream(gw, compression="deflate") as ws:
        await ws.send(b"z" * (64 * KIB))  # compresses to almost nothing: the limit is on the inflated size
        assert len(await ws.recv()) == 64 * KIB
        await ws.send(b"z" * (64 * KIB + 1))
        assert await closed(ws) == (1009, "message too big")
    assert await closed_upstream(streams) == [(1009, "message too big")]
    assert streams.sizes == [64 * KIB]


# --- the stop and reload -----------------------------------------------------------------------------------


async def test_a_stop_sends_1001_to_both_sides_and_finishes_within_the_drain(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route(), server={"drain_timeout": 30})
    async with stream(gw) as one, stream(gw) as two:
        for ws in (one, two):
            await ws.send("open")
            assert await ws.recv() == "open"
        stopping = asyncio.create_task(gw.server.stop())
        for ws in (one, two):
            assert await closed(ws) == (1001, "gateway shutting down")
        # Far inside the 30 s drain: the streams' handlers are done once both sides answered.
        await asyncio.wait_for(stopping, timeout=15)
    assert await closed_upstream(streams, 2) == [(1001, "gateway shutting down")] * 2


async def test_an_upgrade_under_way_at_the_stop_is_refused_once_the_upstream_answers(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route(path="/held"), server={"drain_timeout": 30})
    opening = asyncio.create_task(stream(gw, "/held").__aenter__())
    await asyncio.wait_for(streams.held.wait(), timeout=10)
    stopping = asyncio.create_task(gw.server.stop())
    proxy = gw.server.gateway._websocket
    await eventually(lambda: proxy._ending is not None, "the stop to end the streams it has")
    streams.release.set()
    with pytest.raises(InvalidStatus) as info:
        await asyncio.wait_for(opening, timeout=10)
    response = info.value.response
    assert response.status_code == 503  # not a 101 followed at once by a close
    assert json.loads(response.body)["error"]["message"] == "The gateway is shutting down."
    await asyncio.wait_for(stopping, timeout=15)  # not the 30 s drain
    assert await closed_upstream(streams) == [(1001, "gateway shutting down")]


async def test_a_stop_cuts_a_side_that_never_answers_the_close(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route(), server={"drain_timeout": 1})
    # A raw client that completes the handshake and then never reads or answers again.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert head.startswith(b"HTTP/1.1 101")
    try:
        await asyncio.wait_for(gw.server.stop(), timeout=10)  # each side gets drain_timeout / 2
        rest = await asyncio.wait_for(reader.read(), timeout=10)  # then the connection is cut: EOF
        reason = b"gateway shutting down"
        assert rest == bytes([0x88, 2 + len(reason)]) + (1001).to_bytes(2, "big") + reason  # a close frame
    finally:
        writer.close()
    assert await closed_upstream(streams) == [(1001, "gateway shutting down")]


async def test_the_whole_stop_keeps_to_the_drain_time(make_gateway, upstream, client):
    """A request that never ends and a stream whose upstream never answers its close: neither holds the
    stop past drain_timeout and aiohttp's short grace (before: twice the drain, and more for the stream)."""
    drain = 2.0
    async with SlowToCloseUpstream(deaf=True) as deaf:
        routes = [
            {**events_route()[0], "upstream": deaf.url},
            {"name": "all", "prefix": "/", "auth": "none", "upstream": upstream.url},
        ]
        gw = await make_gateway(upstream.url, routes=routes, server={"drain_timeout": drain})
        hanging = asyncio.create_task(client.get(f"{gw.url}/hang"))
        await eventually(lambda: any(s.raw_path == "/hang" for s in upstream.requests), "the hanging request")
        async with stream(gw):
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(gw.server.stop(), timeout=30)
            took = loop.time() - started
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)
    assert took < drain + 3, took  # the drain, aiohttp's 2 x 1 s grace, and room for a busy machine


@pytest.mark.parametrize("ending", ["client-close", "stop"])
async def test_the_upstream_is_given_time_to_answer_the_close(make_gateway, ending):
    async with SlowToCloseUpstream() as slow:
        gw = await make_gateway(slow.url, routes=events_route(), server={"drain_timeout": 30})
        async with stream(gw) as ws:
            if ending == "stop":
                stopping = asyncio.create_task(gw.server.stop())
                assert await closed(ws) == (1001, "gateway shutting down")
                await asyncio.wait_for(stopping, timeout=15)
        await asyncio.wait_for(slow.done.wait(), timeout=15)
    assert slow.close_code == (1001 if ending == "stop" else 1000)
    assert slow.cut_before_answer is False


async def test_a_reload_ends_the_streams_of_a_changed_route_and_keeps_the_others(streams, make_gateway):
    routes = [*events_route(), {"name": "other", "path": "/other/ws", "websocket": True, "auth": "none"}]
    gw = await make_gateway(streams.url, routes=routes)
    async with stream(gw) as kept, stream(gw, "/other/ws") as rerouted:
        for ws in (kept, rerouted):
            await ws.send("before")
            assert await ws.recv() == "before"
        # Settings an open stream no longer meets (body limits, timeouts) change nothing for it.
        http_only = {"limits": {"max_body_bytes": "1MiB"}, "upstream": {"timeouts": {"idle_read": 5}}}
        assert await gw.server.reload(changed(gw, **http_only))
        for ws in (kept, rerouted):
            await ws.send("between")
            assert await ws.recv() == "between"
        # Another message limit changes "other".
        rerouting = [routes[0], {**routes[1], "max_message_bytes": "1MiB"}]
        assert await gw.server.reload(changed(gw, routes=rerouting))
        assert await closed(rerouted) == (1001, "route reconfigured")
        await kept.send("after")
        assert await kept.recv() == "after"


# --- a full pool -------------------------------------------------------------------------------------------


async def test_a_full_websocket_pool_answers_503_at_once_and_counts_it(streams, make_gateway, client):
    gw = await make_gateway(
        streams.url,
        routes=events_route(),
        # Long enough that waiting for a slot, as before, would fail the test's own timeout.
        upstream={"pool": {"max_websockets": 1}, "timeouts": {"connect": 60}},
    )
    before = await scrape(client, gw)
    async with stream(gw) as first:
        with pytest.raises(InvalidStatus) as info:
            async with asyncio.timeout(10), stream(gw):
                pass
        response = info.value.response
        assert response.status_code == 503
        assert json.loads(response.body)["error"]["reason"] == "SERVICE_UNAVAILABLE"
        await first.send("still open")
        assert await first.recv() == "still open"
    after = await scrape(client, gw)
    assert growth(before, after, "gateway_upstream_errors_total", route=ROUTE, kind="pool_full") == 1
    async with stream(gw) as again:  # the slot is back once the first stream ended
        await again.send("x")
        assert await again.recv() == "x"


# --- a vanishing client ------------------------------------------------------------------------------------


async def test_a_client_that_vanishes_mid_push_ends_the_upstream_with_1001_and_logs_no_error(
    streams, make_gateway, caplog
):
    gw = await make_gateway(streams.url, routes=events_route())
    with structlog.testing.capture_logs() as logged, caplog.at_level(logging.ERROR):
        async with stream(gw) as ws:
            await ws.send("flood")
            await streams.flooding.wait()
            for _ in range(3):
                await ws.recv()
            ws.transport.abort()  # gone without a close frame, while the upstream pushes
        assert await closed_upstream(streams) == [(1001, "")]
        await eventually(lambda: not gw.server.gateway._websocket._streams, "the relay to finish")
        gc.collect()  # an unretrieved task exception is reported when the task is collected
        await asyncio.sleep(0)
    assert [e for e in logged if e["log_level"] in ("error", "critical")] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- what a stream says ------------------------------------------------------------------------------------


async def test_an_upstream_that_takes_nothing_is_cut_after_the_send_timeout(make_gateway, client, capsys):
    # The client sends more than the sockets hold and vanishes; the gateway, no longer reading from it,
    # does not see that, and its relay waits to write to the upstream, which reads nothing.
    access = AccessLog(capsys)
    async with SlowToCloseUpstream(deaf=True) as deaf:
        gw = await make_gateway(
            deaf.url,
            routes=events_route(),
            upstream={"pool": {"max_websockets": 1}},
            server={"send_timeout": 0.5, "drain_timeout": 2},
        )
        proxy = gw.server.gateway._websocket
        async with stream(gw) as ws:
            request_id = ws.response.headers["X-Request-ID"]
            with contextlib.suppress(ConnectionClosed):  # the gateway may give up on the upstream first
                for _ in range(12):
                    await ws.send(b"x" * MIB)  # more than the sockets' buffers hold
            ws.transport.abort()
        await eventually(lambda: not proxy._streams, "the relay to end")
        line = await access.line(request_id)
        assert (line["status"], line["ws_closed_by"], line["ws_close_code"]) == (101, "gateway", 1011)
        assert line["ws_close_reason"] == "send_timeout"
        text = await scrape(client, gw)
        assert value(text, "gateway_websocket_connections", route=ROUTE) == 0
        assert gw.server.gateway.resources.websocket_pool.open == 0
        async with stream(gw) as again:  # the pool's one slot is free: not a 503
            assert again.response.status_code == 101
        await asyncio.wait_for(gw.server.stop(), timeout=15)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_what_a_slow_upstream_takes_is_seen_past_the_kernels_queue(tmp_path, tls):
    """What _SendWatch looks at: a count that grows whenever the upstream takes bytes, though megabytes wait
    in the kernel's queue (and, with TLS, in a transport the gateway does not see) and the transport's own
    buffer does not move, so that an upstream that reads slowly is not taken for one that reads nothing."""
    server_tls = client_tls = None
    if tls:
        issued = Authority(tmp_path, "upstreams").issue("upstream")
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(issued.cert, issued.key)
        client_tls = ssl.create_default_context()
        client_tls.check_hostname, client_tls.verify_mode = False, ssl.CERT_NONE
    accepted: list[asyncio.StreamReader] = []
    done = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)
        await done.wait()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=server_tls)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
        transport = writer.transport
        transport.write(b"q" * (16 * MIB))  # far more than the peer's buffers take: it waits to be sent
        await eventually(lambda: accepted, "the connection accepted")
        seen: list[int] = []

        def filled() -> bool:  # what fits in the peer's buffers has gone: the count stands still
            seen.append(ws_relay._taken(transport))
            return len(seen) > 1 and seen[-1] == seen[-2]

        await eventually(filled, "the peer's buffers to fill")
        before = seen[-1]
        await accepted[0].readexactly(2 * MIB)  # the peer takes some

        def progressed() -> bool:
            return ws_relay._taken(transport) > before

        await eventually(progressed, "the bytes the peer took to be seen")
        done.set()
        transport.abort()
    finally:
        server.close()


async def test_a_streams_access_log_line_and_metrics(streams, make_gateway, client, capsys):
    access = AccessLog(capsys)
    gw = await make_gateway(streams.url, routes=events_route())
    before = await scrape(client, gw)
    async with stream(gw) as ws:
        text = await scrape(client, gw)
        assert value(text, "gateway_websocket_connections", route=ROUTE) == 1
        for size in (10, 1000, 100 * KIB):
            await ws.send(b"m" * size)
            assert len(await ws.recv()) == size
        await ws.send("hi")
        assert await ws.recv() == "hi"
        request_id = ws.response.headers["X-Request-ID"]
        await ws.close(code=4000, reason="bye")
    sent = 10 + 1000 + 100 * KIB + 2
    line = await access.line(request_id)
    assert line["status"] == 101
    assert (line["bytes_in"], line["bytes_out"]) == (sent, sent)
    assert (line["ws_messages_in"], line["ws_messages_out"]) == (4, 4)
    assert (line["ws_closed_by"], line["ws_close_code"], line["ws_close_reason"]) == ("client", 4000, None)
    assert line["duration_ms"] > 0
    assert await closed_upstream(streams) == [(4000, "bye")]
    text = await scrape(client, gw)
    assert value(text, "gateway_websocket_connections", route=ROUTE) == 0

    def grew(name: str, **labels: str) -> float:
        return growth(before, text, name, route=ROUTE, **labels)

    assert grew("gateway_websocket_closes_total", closed_by="client", code="4xxx") == 1
    for direction in ("to_upstream", "to_client"):
        assert grew("gateway_websocket_messages_total", direction=direction) == 4
        assert grew("gateway_websocket_bytes_total", direction=direction) == sent
    assert grew("gateway_websocket_duration_seconds_count") == 1
    assert grew("gateway_requests_total", method="GET", code="101") == 1


async def test_a_bug_in_the_relay_cuts_the_stream_and_is_logged_never_answered_in_http(
    streams, make_gateway, monkeypatch
):
    async def broken(self: Any, outcome: object, *, from_client: bool) -> None:
        raise RuntimeError("relay bug")

    monkeypatch.setattr(ws_relay.Relay, "_ended", broken)
    gw = await make_gateway(streams.url, routes=events_route())
    with structlog.testing.capture_logs() as logged:
        async with stream(gw) as ws:
            await ws.send("close:4100")  # the upstream closes: the relay's _ended runs, and fails
            with pytest.raises(ConnectionClosed) as info:
                async with asyncio.timeout(10):
                    await ws.recv()
        # Cut: no close frame, and no HTTP bytes where frames belong (the client would answer with 1002).
        assert (info.value.rcvd, info.value.sent) == (None, None)
        await eventually(lambda: not gw.server.gateway._websocket._streams, "the relay to end")
    assert [e["event"] for e in logged if e["log_level"] == "error"] == ["websocket_relay_failed"]


async def test_an_upstream_close_is_logged_as_the_upstreams(streams, make_gateway, capsys):
    access = AccessLog(capsys)
    gw = await make_gateway(streams.url, routes=events_route())
    async with stream(gw) as ws:
        await ws.send("close:4100")
        assert await closed(ws) == (4100, "upstream done")
        request_id = ws.response.headers["X-Request-ID"]
    line = await access.line(request_id)
    assert (line["ws_closed_by"], line["ws_close_code"]) == ("upstream", 4100)


async def test_the_upstreams_101_headers_reach_the_client(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route())
    async with stream(gw) as ws:
        headers = ws.response.headers
        assert headers["X-Upstream-Session"] == "s-1"
        assert headers["Set-Cookie"] == "sid=1; HttpOnly"
        assert headers["Server"] == "voipbin-gateway"  # the gateway's own still win
        assert headers.get_all("Sec-WebSocket-Accept") == [
            headers["Sec-WebSocket-Accept"]
        ]  # one, the gateway's


async def test_an_upstreams_refusal_is_normalized_like_any_upstream_error(streams, make_gateway):
    gw = await make_gateway(streams.url, routes=events_route(path="/refuse"))
    with pytest.raises(InvalidStatus) as info:
        async with stream(gw, "/refuse"):
            pass
    response = info.value.response
    assert response.status_code == 403
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="events"'
    error = json.loads(response.body)["error"]
    assert (error["reason"], error["message"]) == (
        "EVENTS_NOT_ENABLED",
        "This customer may not follow calls.",
    )


async def test_aiohttps_client_sees_the_same_relay(streams, make_gateway, client: aiohttp.ClientSession):
    """The gateway's own tests mostly use aiohttp's client; the relay must not depend on which."""
    gw = await make_gateway(streams.url, routes=events_route())
    async with client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("text stays text")
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "text stays text")


async def test_sigterm_ends_streams_with_1001_and_exits_0_well_within_the_drain(
    tmp_path: Path,
    streams: StreamUpstream,
    upstream: UpstreamServer,
    spawn: Spawn,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    drain_timeout = 10.0  # before: clients saw 1006 after twice this
    routes = [{**events_route()[0], "upstream": streams.url}, {"name": "all", "prefix": "/", "auth": "none"}]
    gw = await spawn(write_config(tmp_path, drain_timeout=drain_timeout, routes=routes), upstream.url)
    await gw.wait_healthy(session)
    path = "/slow?delay=1.0"
    async with stream(gw) as one, stream(gw) as two:
        for ws in (one, two):
            await ws.send("open")
            assert await ws.recv() == "open"
        slow = asyncio.create_task(fetch(session, gw.url + path))
        await poll(lambda: slow_requests(upstream, path) == 1, within=10, what="the slow request upstream")
        gw.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for ws in (one, two):
            assert await closed(ws) == (1001, "gateway shutting down")
        assert (await asyncio.wait_for(slow, timeout=drain_timeout))[:2] == (200, b"ok")  # HTTP still drains
    code = await gw.wait_exit(drain_timeout + 3 - (time.monotonic() - signalled))
    assert code == 0, gw.output()
    assert await closed_upstream(streams, 2) == [(1001, "gateway shutting down")] * 2
    line = next(e for e in gw.events("request") if e.get("route") == ROUTE)
    assert (line["status"], line["ws_closed_by"], line["ws_close_reason"]) == (101, "gateway", "shutdown")


# --- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "problem"),
    [
        (
            "routes:\n  - {name: a, prefix: /a, auth: none, max_message_bytes: 1MiB}\n",
            "routes[0].max_message_bytes = 1048576: only for a WebSocket route (HTTP bodies have "
            "max_body_bytes); allowed: unset here, or websocket: true",
        ),
        ("websocket: {max_message_bytes: lots}\n", "websocket.max_message_bytes = 'lots'"),
        ("websocket: {compression: sometimes}\n", "websocket.compression = 'sometimes'"),
    ],
)
def test_websocket_settings_that_cannot_work_name_their_key(
    tmp_path: Path, yaml_text: str, problem: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert any(line.strip().startswith(problem) for line in str(info.value).splitlines()), str(info.value)
