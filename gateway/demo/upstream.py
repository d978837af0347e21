"""The stand-in upstream: a few of the VoIPBIN API's paths with canned answers, on loopback.

It checks no credential itself. It knows the caller only from the identity headers the gateway sets (and
removes from every inbound request), as an upstream behind the gateway may: a request without them is a
401, as the API answers a request without a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.config import IdentityHeaders
from gateway.demo import data

_CUSTOMER_HEADER = IdentityHeaders().customer_id  # the demo config keeps auth.headers at their defaults


def app() -> web.Application:
    application = web.Application(middlewares=[_identified])
    application.router.add_get("/v1.0/me", _me)
    application.router.add_get("/v1.0/calls", _calls)
    application.router.add_get("/v1.0/calls/{id}", _call)
    return application


@web.middleware
async def _identified(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.headers.get(_CUSTOMER_HEADER):
        return _error(request, 401, "UNAUTHENTICATED", "AUTHENTICATION_REQUIRED", "A credential is required.")
    return await handler(request)


async def _me(request: web.Request) -> web.Response:
    return web.json_response(data.agent(request.headers[_CUSTOMER_HEADER]))


async def _calls(request: web.Request) -> web.Response:
    customer_id = request.headers[_CUSTOMER_HEADER]
    calls = [{**call, "customer_id": customer_id} for call in data.CALLS.values()]
    return web.json_response({"result": calls, "next_page_token": ""})  # empty: the last page


async def _call(request: web.Request) -> web.Response:
    call = data.CALLS.get(request.match_info["id"])
    if call is None:
        return _error(request, 404, "NOT_FOUND", "CALL_NOT_FOUND", "The call was not found.")
    return web.json_response({**call, "customer_id": request.headers[_CUSTOMER_HEADER]})


def _error(request: web.Request, http_status: int, status: str, reason: str, message: str) -> web.Response:
    error: dict[str, Any] = {"status": status, "reason": reason, "message": message}
    if request_id := request.headers.get("X-Request-ID"):  # the gateway's; it fills the field in otherwise
        error["request_id"] = request_id
    return web.json_response({"error": error}, status=http_status)


@contextlib.contextmanager
def serving(sock: socket.socket) -> Iterator[None]:
    """Serve the stand-in on `sock` while the block runs.

    It runs on an event loop of its own in a thread, so the gateway beside it runs exactly as `serve` runs
    it (its loop, signal handlers and drain in the main thread); it stops once the gateway has drained.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="demo-upstream", daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(_start(sock), loop).result()
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _start(sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app(), access_log=None)  # the gateway logs every request it forwards
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
