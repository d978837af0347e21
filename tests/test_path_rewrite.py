"""Per-route path rewriting (gateway/path_rewrite.py): strip_prefix and rewrite_prefix on prefix routes.

The pure rewrite on raw targets in every spelling routing accepts, the route keys' validation, and end to
end: what the upstream receives (HTTP and WebSocket, with hide_credentials) and what the access log shows.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from conftest import MakeGateway
from upstream_server import UpstreamServer
from yarl import URL

from gateway import logs
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.path_rewrite import PrefixNotFound, PrefixRewrite, prefix_end
from gateway.routing import RouteTable, compile_routes, routable_path

STRIP_API = PrefixRewrite(len("/api"), "")
API_TO_V1 = PrefixRewrite(len("/api"), "/v1.0")
KELVIN = "\u212a"  # folds onto "k" under re.IGNORECASE, as some upstreams fold it
KELVIN_ENCODED = "%E2%84%AA"


def _table(*routes: dict[str, Any]) -> RouteTable:
    return RouteTable(compile_routes(GatewayConfig.model_validate({"routes": list(routes)})))


# --- the pure rewrite ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "stripped", "rewritten"),
    [
        ("/api/calls?x=1", "/calls?x=1", "/v1.0/calls?x=1"),
        ("/api", "/", "/v1.0"),
        ("/api?x=1", "/?x=1", "/v1.0?x=1"),
        ("/api/", "/", "/v1.0/"),
        ("/api/?x=1", "/?x=1", "/v1.0/?x=1"),
        ("/api/calls", "/calls", "/v1.0/calls"),
        ("/api/calls/", "/calls/", "/v1.0/calls/"),
        # the client's own spelling of the prefix, whatever it is
        ("/%61pi/calls", "/calls", "/v1.0/calls"),
        ("/%61%70%69/calls", "/calls", "/v1.0/calls"),
        ("/API/calls", "/calls", "/v1.0/calls"),
        ("/A%50i/calls", "/calls", "/v1.0/calls"),
        # the rest of the path and the query byte for byte: escapes, case, '/' and '%' in the query
        (
            "/api/Calls/%41%2fb%C3%A9?Q=%2F&a=/x?y",
            "/Calls/%41%2fb%C3%A9?Q=%2F&a=/x?y",
            "/v1.0/Calls/%41%2fb%C3%A9?Q=%2F&a=/x?y",
        ),
        ("/api?", "/?", "/v1.0?"),
        ("/api#frag", "/#frag", "/v1.0#frag"),
    ],
)
def test_prefix_replaced_and_the_rest_byte_exact(target: str, stripped: str, rewritten: str) -> None:
    assert STRIP_API.apply(target) == stripped
    assert API_TO_V1.apply(target) == rewritten


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (f"/{KELVIN}b/x?k=1", "/x?k=1"),  # the raw character, one character
        (f"/{KELVIN_ENCODED}b/x?k=1", "/x?k=1"),  # three escapes, one character
        (f"/{KELVIN_ENCODED.lower()}B", "/"),
        ("/kb/x", "/x"),
    ],
)
def test_a_folded_character_counts_as_the_one_it_matched(target: str, expected: str) -> None:
    assert PrefixRewrite(len("/kb"), "").apply(target) == expected


def test_a_multibyte_prefix_ends_after_its_last_continuation_byte() -> None:
    cafe = PrefixRewrite(len("/caf\u00e9"), "/menu")
    assert cafe.apply("/caf%C3%A9/x") == "/menu/x"
    assert cafe.apply("/CAF%c3%a9") == "/menu"
    assert cafe.apply("/caf\u00e9/%C3%A9") == "/menu/%C3%A9"
    assert prefix_end("/caf%C3%A9/x", len("/caf\u00e9")) == len("/caf%C3%A9")


@pytest.mark.parametrize(
    ("target", "stripped", "rewritten"),
    [
        # The route table read the encoded slash as the boundary; written as "/", every upstream reads the
        # path that way (kept, "%2Fcalls" is no target, and "/v1.0%2Fcalls" one segment to some servers).
        ("/api%2Fcalls?x=%2F", "/calls?x=%2F", "/v1.0/calls?x=%2F"),
        ("/api%2fcalls", "/calls", "/v1.0/calls"),
        ("/api%2F", "/", "/v1.0/"),
        ("/api%2F?x", "/?x", "/v1.0/?x"),
        ("/api%2Fa%2Fb", "/a%2Fb", "/v1.0/a%2Fb"),  # only the boundary's: the rest stays as sent
    ],
)
def test_an_encoded_slash_at_the_boundary_is_written_as_a_slash(
    target: str, stripped: str, rewritten: str
) -> None:
    assert STRIP_API.apply(target) == stripped
    assert API_TO_V1.apply(target) == rewritten


@pytest.mark.parametrize(
    ("target", "rewritten"),
    [("/", "/v1/"), ("/calls?x=1", "/v1/calls?x=1"), ("/%63alls", "/v1/%63alls"), ("/?x", "/v1/?x")],
)
def test_the_root_prefix_puts_the_replacement_before_the_whole_path(target: str, rewritten: str) -> None:
    assert PrefixRewrite(0, "/v1").apply(target) == rewritten
    assert PrefixRewrite(0, "").apply(target) == target  # stripping "/" changes nothing


@pytest.mark.parametrize("target", ["/apix", "/ap", "/ap?i", "/a%70", "/apiX/y"])
def test_a_target_the_prefix_does_not_end_in_is_refused(target: str) -> None:
    with pytest.raises(PrefixNotFound):
        STRIP_API.apply(target)


def _spellings(text: str, rng: random.Random) -> str:
    """`text` with each character in a random letter case, percent-encoded (upper or lower hex) or not."""
    out = []
    for char in text:
        char = char.upper() if rng.random() < 0.5 else char
        if rng.random() < 0.5:
            escaped = "".join(f"%{byte:02X}" for byte in char.encode())
            char = escaped.lower() if rng.random() < 0.5 else escaped
        out.append(char)
    return "".join(out)


def test_every_spelling_routing_takes_is_rewritten_to_what_it_decodes_to() -> None:
    """Random spellings of prefix and rest: the route table takes each, and the rewritten target is the
    replacement followed by the client's own bytes after the prefix."""
    table = _table({"name": "r", "prefix": "/v1.0/caf\u00e9", "auth": "none", "rewrite_prefix": "/menu/"})
    rng = random.Random(20260101)
    for _ in range(500):
        rest = rng.choice(["", "/", "/calls", "/a/b/", "/%C3%A9t%C3%A9"])
        raw_rest = _spellings(unquote(rest), rng) if rest else ""
        query = rng.choice(["", "?x=%2F&Y=1", "?"])
        target = "/" + _spellings("v1.0/caf\u00e9", rng) + raw_rest + query
        route = table.match(routable_path(target), "GET")
        assert route is not None and route.rewrite is not None, target
        upstream_target = route.rewrite.apply(target)
        if raw_rest[:3].upper() == "%2F":  # the boundary's slash is written as one (test above)
            raw_rest = "/" + raw_rest[3:]
        assert upstream_target == "/menu" + raw_rest + query, target


# --- configuration ------------------------------------------------------------------------------------------


def test_routes_resolve_their_rewrite_once() -> None:
    config = GatewayConfig.model_validate(
        {
            "routes": [
                {"name": "plain", "prefix": "/plain", "auth": "none"},
                {"name": "strip", "prefix": "/api/", "auth": "none", "strip_prefix": True},
                {
                    "name": "both",
                    "prefix": "/b",
                    "auth": "none",
                    "strip_prefix": True,
                    "rewrite_prefix": "/c/",
                },
                {"name": "to-root", "prefix": "/r", "auth": "none", "rewrite_prefix": "/"},
                {"name": "path", "path": "/p/{id}", "auth": "none"},
            ]
        }
    )
    routes = {route.name: route.rewrite for route in compile_routes(config)}
    assert routes == {
        "plain": None,  # nothing to do per request
        "strip": PrefixRewrite(4, ""),
        "both": PrefixRewrite(2, "/c"),  # rewrite_prefix replaces on its own; strip_prefix adds nothing
        "to-root": PrefixRewrite(2, ""),  # "/" is a strip
        "path": None,
    }
    assert all(route.rewrite is None for route in compile_routes(GatewayConfig()))


def _problems(tmp_path: Path, routes: str) -> list[str]:
    path = tmp_path / "gw.yaml"
    path.write_text("routes:\n" + routes, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return [line.strip() for line in str(info.value).splitlines()[1:]]


def test_prefix_rewrites_on_a_path_route_are_refused_at_their_key(tmp_path: Path) -> None:
    found = _problems(
        tmp_path,
        "  - {name: a, path: '/a/{id}', auth: none, strip_prefix: true, rewrite_prefix: /b}\n"
        "  - {name: b, path: /b, auth: none, strip_prefix: false}\n",
    )
    why = "only for a route with a prefix: a path route has no prefix to replace; "
    assert found == [
        f"routes[0].strip_prefix = True: {why}allowed: unset here, or prefix instead of path",
        f"routes[0].rewrite_prefix = '/b': {why}allowed: unset here, or prefix instead of path",
    ]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("v1", "must start with '/'"),
        ("/v1?x=1", "must be a plain path"),
        ("/v1#x", "must be a plain path"),
        ("/v%31", "must be a plain path"),
        ("/v1;x", "must be a plain path"),
        ("/a//b", "must be a plain path"),
        ("//", "must be a plain path"),
        ("/a b", "must be a plain path"),
        ("/a\\b", "must be a plain path"),
        ("/a\tb", "must be a plain path"),
        ("/caf\u00e9", "must be a plain path"),
        ("/a/./b", "must not contain '.' or '..' segments"),
        ("/a/..", "must not contain '.' or '..' segments"),
    ],
)
def test_rewrite_prefix_must_be_a_plain_path(tmp_path: Path, value: str, why: str) -> None:
    [line] = _problems(
        tmp_path, f"  - {{name: a, prefix: /a, auth: none, rewrite_prefix: {json.dumps(value)}}}\n"
    )
    assert line.startswith(f"routes[0].rewrite_prefix = {value!r}: Value error, {why}")


@pytest.mark.parametrize("value", ["/", "/v1.0", "/v1.0/", "/a-b/c_d/~e/f.g:h@i"])
def test_plain_rewrite_prefixes_are_taken(value: str) -> None:
    route = {"name": "a", "prefix": "/a", "auth": "none", "rewrite_prefix": value}
    assert GatewayConfig.model_validate({"routes": [route]}).routes[0].rewrite_prefix == value


# --- end to end ---------------------------------------------------------------------------------------------


async def _raw_get(port: int, target: str, headers: str = "") -> int:
    """Sends `target` exactly as given (no client re-quoting) and returns the response status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: gw\r\n{headers}Connection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            response = await reader.read(-1)
    finally:
        writer.close()
    return int(response.split(b" ", 2)[1])


REWRITING_ROUTES = [
    {"name": "strip", "prefix": "/api", "auth": "none", "strip_prefix": True},
    {"name": "rewrite", "prefix": "/old/", "auth": "none", "rewrite_prefix": "/echo/v1.0/"},
    {"name": "events", "prefix": "/events", "auth": "none", "rewrite_prefix": "/ws", "websocket": True},
    {"name": "hidden", "prefix": "/hidden", "auth": "none", "strip_prefix": True, "hide_credentials": True},
    {"name": "kb", "prefix": "/kb", "auth": "none", "strip_prefix": True},
    {"name": "plain", "prefix": "/", "auth": "none"},
]


@pytest.mark.parametrize(
    ("target", "received"),
    [
        ("/api/echo/calls?x=%41&y=%2F", "/echo/calls?x=%41&y=%2F"),
        ("/%41PI/echo/Calls/%C3%A9?Q=1", "/echo/Calls/%C3%A9?Q=1"),
        ("/api%2Fecho/a?b", "/echo/a?b"),
        (f"/old/{KELVIN_ENCODED}/x/?z=%7E", f"/echo/v1.0/{KELVIN_ENCODED}/x/?z=%7E"),
        ("/OLD?z", "/echo/v1.0?z"),
        (f"/{KELVIN_ENCODED}B/echo/k", "/echo/k"),  # the HTTP parser refuses the raw sign: 400
        ("/echo/untouched/%61?q=%2F", "/echo/untouched/%61?q=%2F"),  # a route without a rewrite
    ],
)
async def test_the_upstream_receives_the_rewritten_target(
    upstream: UpstreamServer, make_gateway: MakeGateway, target: str, received: str
) -> None:
    gw = await make_gateway(upstream.url, routes=REWRITING_ROUTES)
    assert await _raw_get(gw.port, target) == 200
    assert upstream.last.raw_path == received


async def test_stripped_to_the_root(upstream: UpstreamServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream.url, routes=REWRITING_ROUTES)
    await _raw_get(gw.port, "/api?x=1")  # the upstream has no "/": only what it was asked matters here
    assert upstream.last.raw_path == "/?x=1"


async def test_hide_credentials_still_edits_the_rewritten_query(
    upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(upstream.url, routes=REWRITING_ROUTES)
    status = await _raw_get(
        gw.port, "/Hidden/echo/x?a=%2F&accesskey=zz-key&b=2", headers="Authorization: Bearer zz-token\r\n"
    )
    assert status == 200
    assert upstream.last.raw_path == "/echo/x?a=%2F&b=2"
    assert upstream.last.header("Authorization") is None
    await _raw_get(gw.port, "/hidden/echo/y?token=zz-token")
    assert upstream.last.raw_path == "/echo/y"


async def test_a_websocket_route_connects_to_the_rewritten_target(
    upstream: UpstreamServer, make_gateway: MakeGateway, client: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(upstream.url, routes=REWRITING_ROUTES)
    async with client.ws_connect(URL(f"{gw.url}/EVENTS?since=%41", encoded=True)) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=10)).data == "hello"
    assert upstream.last.raw_path == "/ws?since=%41"


async def test_the_access_log_shows_the_clients_target(
    capsys: pytest.CaptureFixture[str], upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(upstream.url, routes=REWRITING_ROUTES)
    capsys.readouterr()
    assert await _raw_get(gw.port, "/%61pi/echo/x?accesskey=zz-key&n=1") == 200
    assert upstream.last.raw_path == "/echo/x?accesskey=zz-key&n=1"  # not hidden on this route
    lines: list[dict[str, Any]] = []
    for _ in range(200):  # the line is written at the end of the gateway's loop tick: wait for it, bounded
        logs.flush_access_log()
        out = capsys.readouterr().out
        lines += [json.loads(line) for line in out.splitlines() if '"event":"request"' in line]
        if lines:
            break
        await asyncio.sleep(0.01)
    [entry] = lines
    assert (entry["route"], entry["path"]) == ("strip", "/%61pi/echo/x?accesskey=[redacted]&n=1")
