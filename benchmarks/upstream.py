"""A fast fake VoIPBIN API: `GET /v1.0/calls` answers a small fixed list, so the proxies get measured."""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

# Serialised once: the upstream should cost as little CPU as possible, it shares the cores with everyone.
BODY = orjson.dumps(
    {
        "result": [{"id": "5e7bd0a8-8a38-11ec-9b6b-c3b8a2e5c8f3", "tm_create": "2022-02-10 07:50:26.466149"}],
        "next_page_token": "",
    }
)


async def list_calls(_: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def take_spans(request: web.Request) -> web.Response:
    """An OTLP/HTTP trace collector that reads and drops what it is sent (the tracing scenarios)."""
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


def serve(app: web.Application, port: int) -> None:
    """Loopback only, uvloop when installed; the baseline proxy uses it too, so both run alike."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    # access_log=None: per-request logging would be measured instead of proxying.
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, shutdown_timeout=1.0, loop=loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    app = web.Application()
    app.router.add_get("/v1.0/calls", list_calls)
    app.router.add_post("/v1/traces", take_spans)
    serve(app, parser.parse_args().port)


if __name__ == "__main__":
    main()
