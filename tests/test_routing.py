"""gateway/routing.py (route table, path hygiene), gateway/forwarding.py (headers, client IP) and
gateway/request_id.py."""

from __future__ import annotations

import re
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import GatewayConfig
from gateway.forwarding import TrustedProxies, forward_headers, strip_hop_by_hop
from gateway.request_id import MAX_LENGTH, accept_or_new, new_request_id
from gateway.routing import BadPath, RouteTable, compile_routes, routable_path


def _table(*routes: dict[str, Any], **config: Any) -> RouteTable:
    return RouteTable(compile_routes(GatewayConfig.model_validate({"routes": list(routes), **config})))


def _name(table: RouteTable, path: str, method: str = "GET") -> str | None:
    route = table.match(path, method)
    return None if route is None else route.name


# --- matching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/auth", "/auth", True),
        ("/auth", "/auth/", True),
        ("/auth", "/auth/login", True),
        ("/auth", "/auth/a/b/c", True),
        ("/auth", "/authz", False),
        ("/auth", "/authz/login", False),
        ("/auth", "/au", False),
        ("/auth", "/", False),
        ("/auth", "/x/auth", False),
        ("/auth", "/Auth/login", True),  # letter case is ignored unless a route is case_sensitive
        ("/auth/", "/auth", True),
        ("/auth/", "/auth/login", True),
        ("/auth/", "/authz", False),
        ("/v1.0", "/v1.0/calls", True),
        ("/v1.0", "/v1x0/calls", False),  # the dot is literal
        ("/v1.0", "/v1.00", False),
        ("/", "/", True),
        ("/", "/anything/at/all", True),
        ("/", "/a\nb", True),
        ("/a+b", "/a+b/c", True),
        ("/a+b", "/aab/c", False),
    ],
)
def test_prefix_is_segment_aware(prefix: str, path: str, matches: bool) -> None:
    table = _table({"name": "r", "prefix": prefix})
    assert (_name(table, path) == "r") is matches


@pytest.mark.parametrize(
    ("template", "path", "matches"),
    [
        ("/v1.0/calls/{id}", "/v1.0/calls/abc-123", True),
        ("/v1.0/calls/{id}", "/v1.0/calls/", False),
        ("/v1.0/calls/{id}", "/v1.0/calls", False),
        ("/v1.0/calls/{id}", "/v1.0/calls/a/b", False),
        ("/v1.0/calls/{id}", "/v1.0/calls/a/", False),
        ("/v1.0/calls/{id}/hangup", "/v1.0/calls/1/hangup", True),
        ("/v1.0/calls/{id}/hangup", "/v1.0/calls/1/2/hangup", False),
        ("/v1.0/calls/{id}/hangup", "/v1.0/calls//hangup", False),
        ("/v1.0/{kind}/{id}", "/v1.0/calls/1", True),
        ("/v1.0/{kind}/{id}", "/v1.0/calls", False),
        ("/v1.0/ws", "/v1.0/ws", True),
        ("/v1.0/ws", "/v1.0/ws/", False),
        ("/v1.0/ws", "/v1.0/wss", False),
        ("/v1.0/ws", "/v1x0/ws", False),
    ],
)
def test_path_templates_match_exactly(template: str, path: str, matches: bool) -> None:
    table = _table({"name": "r", "path": template})
    assert (_name(table, path) == "r") is matches


def test_methods_filter_and_first_match_wins() -> None:
    table = _table(
        {"name": "reads", "prefix": "/v1.0/calls", "methods": ["get", "HEAD"]},
        {"name": "one-call", "path": "/v1.0/calls/{id}"},
        {"name": "api", "prefix": "/v1.0"},
        {"name": "late", "prefix": "/v1.0/calls"},
    )
    assert _name(table, "/v1.0/calls/1", "GET") == "reads"
    assert _name(table, "/v1.0/calls/1", "HEAD") == "reads"
    assert _name(table, "/v1.0/calls/1", "DELETE") == "one-call"
    assert _name(table, "/v1.0/calls/1/x", "POST") == "api"
    assert _name(table, "/v1.0/calls", "POST") == "api"  # "late" is shadowed
    assert _name(table, "/auth/login", "GET") is None


def test_default_routes() -> None:
    table = RouteTable(compile_routes(GatewayConfig()))
    assert _name(table, "/auth/login", "POST") == "auth"
    assert _name(table, "/v1.0/ws") == "events"
    assert _name(table, "/v1.0/ws/x") == "api"
    assert _name(table, "/v1.0/calls") == "api"
    assert _name(table, "/v2/calls") is None
    assert _name(table, "/") is None
    routes = {r.name: r for r in compile_routes(GatewayConfig())}
    assert routes["events"].websocket and not routes["api"].websocket


def test_route_settings_inherited_and_overridden() -> None:
    config = GatewayConfig.model_validate(
        {
            "upstream": {
                "url": "https://default.example",
                "preserve_host": True,
                "retries": 2,
                "timeouts": {"connect": 1.5, "response_headers": 20, "idle_read": 30, "request_body_idle": 9},
            },
            "limits": {"max_body_bytes": "2MiB"},
            "routes": [
                {"name": "inherit", "prefix": "/a"},
                {
                    "name": "own",
                    "prefix": "/b",
                    "methods": ["post"],
                    "upstream": "http://own.example:9000/",
                    "preserve_host": False,
                    "timeouts": {"response_headers": 300, "request_body_idle": 2},
                    "max_body_bytes": "100MiB",
                    "websocket": True,
                },
            ],
        }
    )
    inherit, own = compile_routes(config)
    assert (inherit.name, own.name) == ("inherit", "own")
    assert inherit.upstream == "https://default.example"
    assert inherit.preserve_host is True
    timeouts = (
        inherit.connect_timeout,
        inherit.response_headers_timeout,
        inherit.idle_read_timeout,
        inherit.request_body_idle_timeout,
    )
    assert timeouts == (1.5, 20, 30, 9)
    assert inherit.max_body_bytes == 2 * 1024 * 1024
    assert inherit.methods is None and inherit.allows("PATCH")
    assert inherit.retries == 2 and inherit.websocket is False

    assert own.upstream == "http://own.example:9000"
    assert own.preserve_host is False  # an explicit False beats the upstream's True
    assert (own.connect_timeout, own.response_headers_timeout, own.idle_read_timeout) == (1.5, 300, 30)
    assert own.request_body_idle_timeout == 2
    assert own.max_body_bytes == 100 * 1024 * 1024
    assert own.methods == frozenset({"POST"})
    assert own.allows("POST") and not own.allows("GET")
    assert own.retries == 2 and own.websocket is True


def test_route_preserve_host_true_beats_upstream_false() -> None:
    config = GatewayConfig.model_validate({"routes": [{"name": "r", "prefix": "/", "preserve_host": True}]})
    assert compile_routes(config)[0].preserve_host is True


# --- routable_path ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("/", "/"),
        ("/v1.0/calls", "/v1.0/calls"),
        ("/v1.0/calls/abc?x=1&y=/../", "/v1.0/calls/abc"),
        ("/a..b", "/a..b"),
        ("/a/..b/c.", "/a/..b/c."),
        ("/a/.../b", "/a/.../b"),
        ("/.well-known/x", "/.well-known/x"),
        ("/file.json", "/file.json"),
        ("/a%20b", "/a b"),
        ("/v1%2E0/calls", "/v1.0/calls"),
        ("/%61uth/login", "/auth/login"),
        ("/a%2Fb", "/a/b"),
        ("/a%252e%252e/b", "/a%2e%2e/b"),  # decoded once, as the upstream will
        ("/caf%C3%A9", "/caf\u00e9"),
        ("/bad%zz", "/bad%zz"),
    ],
)
def test_routable_path_accepts(raw: str, decoded: str) -> None:
    assert routable_path(raw) == decoded


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "*",
        "auth/login",
        "http://evil.example/auth",
        # dot segments, plain
        "/.",
        "/..",
        "/a/./b",
        "/a/../b",
        "/a/b/..",
        "/a/b/.",
        "/a/..?x=1",
        # dot segments, encoded (any case, mixed)
        "/a/%2e%2e/b",
        "/a/%2E%2E/b",
        "/a/%2e./b",
        "/a/.%2E/b",
        "/a/%2e/b",
        "/%2e%2e",
        "/v1.0/%2e%2e/admin",
        # encoded slashes that make dot segments after decoding
        "/a%2F..%2Fb",
        "/a%2f..",
        "/a/..%2fb",
        "/a%2F.%2Fb",
        "/a%3F/../b",
        # backslashes
        "/a\\b",
        "/a%5Cb",
        "/a%5cb",
        "/..%5c..%5cetc",
        # control characters
        "/a%00",
        "/a%00b",
        "/a%0a",
        "/a%0D%0AX-Injected:%201",
        "/a%09b",
        "/a%7F",
        "/a\x01b",
    ],
)
def test_routable_path_rejects(raw: str) -> None:
    with pytest.raises(BadPath):
        routable_path(raw)


def test_routing_uses_the_decoded_path() -> None:
    table = _table(
        {"name": "admin", "prefix": "/v1.0/admin", "methods": ["GET"]},
        {"name": "api", "prefix": "/"},
    )
    assert _name(table, routable_path("/v1.0/%61dmin/x"), "POST") == "api"
    assert _name(table, routable_path("/v1.0/%61dmin/x"), "GET") == "admin"


# --- hop-by-hop headers -------------------------------------------------------------------------------------


def test_strip_hop_by_hop() -> None:
    headers = CIMultiDict(
        [
            ("Host", "gw.example"),
            ("Connection", "keep-alive, X-Foo"),
            ("connection", " X-BAR ,x-baz"),
            ("X-Foo", "1"),
            ("x-bar", "2"),
            ("X-Baz", "3"),
            ("Set-Cookie", "a=1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("proxy-foo", "y"),
            ("Set-Cookie", "b=2"),
            ("Authorization", "Bearer t"),
            ("X-Proxy-Ok", "kept"),
        ]
    )
    out = strip_hop_by_hop(headers)
    assert list(out.items()) == [
        ("Host", "gw.example"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Authorization", "Bearer t"),
        ("X-Proxy-Ok", "kept"),
    ]
    assert len(headers) == 18  # the input is not modified


@pytest.mark.parametrize(
    "name",
    ["Connection", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Authenticate"],
)
@pytest.mark.parametrize("case", [str.lower, str.upper, lambda s: s])
def test_each_hop_by_hop_header_is_removed(name: str, case: Any) -> None:
    out = strip_hop_by_hop(CIMultiDict([(case(name), "x"), ("X-Keep", "1")]))
    assert list(out.items()) == [("X-Keep", "1")]


def test_no_connection_header_keeps_everything_else() -> None:
    headers = CIMultiDict([("Accept", "a"), ("Accept", "b"), ("Cookie", "c")])
    assert list(strip_hop_by_hop(headers).items()) == list(headers.items())


# --- X-Forwarded-* ------------------------------------------------------------------------------------------

INBOUND = [
    ("X-Forwarded-For", "1.2.3.4"),
    ("X-Forwarded-For", "5.6.7.8"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "public.example"),
    ("Forwarded", "for=1.2.3.4"),
    ("Accept", "*/*"),
]


def add_forwarded(
    headers: CIMultiDict[str], *, peer: str | None, peer_trusted: bool, scheme: str, host: str | None
) -> CIMultiDict[str]:
    """forward_headers' X-Forwarded-* part: the headers it returns, without the request id it adds."""
    if host:
        headers.add("Host", host)
    out, _ = forward_headers(
        CIMultiDictProxy(headers),
        peer=peer,
        peer_trusted=peer_trusted,
        scheme=scheme,
        request_id="r",
        overrides={},
    )
    return CIMultiDict((name, value) for name, value in out if name != "X-Request-ID")


def test_add_forwarded_untrusted_peer_drops_inbound_values() -> None:
    headers = add_forwarded(
        CIMultiDict(INBOUND), peer="9.9.9.9", peer_trusted=False, scheme="http", host="gw.example"
    )
    assert headers.getall("X-Forwarded-For") == ["9.9.9.9"]
    assert headers.getall("X-Forwarded-Proto") == ["http"]
    assert headers.getall("X-Forwarded-Host") == ["gw.example"]
    assert "Forwarded" not in headers
    assert headers["Accept"] == "*/*"


def test_add_forwarded_trusted_peer_appends_and_keeps() -> None:
    headers = add_forwarded(
        CIMultiDict(INBOUND), peer="10.0.0.1", peer_trusted=True, scheme="http", host="gw.example"
    )
    assert headers.getall("X-Forwarded-For") == ["1.2.3.4, 5.6.7.8, 10.0.0.1"]
    assert headers.getall("X-Forwarded-Proto") == ["https"]
    assert headers.getall("X-Forwarded-Host") == ["public.example"]


def test_add_forwarded_trusted_peer_without_inbound_values() -> None:
    headers = add_forwarded(CIMultiDict(), peer="10.0.0.1", peer_trusted=True, scheme="https", host=None)
    assert dict(headers) == {"X-Forwarded-For": "10.0.0.1", "X-Forwarded-Proto": "https"}


@pytest.mark.parametrize(("trusted", "expected"), [(False, None), (True, "1.2.3.4")])
def test_add_forwarded_without_peer(trusted: bool, expected: str | None) -> None:
    headers = add_forwarded(
        CIMultiDict([("X-Forwarded-For", "1.2.3.4")]),
        peer=None,
        peer_trusted=trusted,
        scheme="http",
        host="h",
    )
    assert headers.get("X-Forwarded-For") == expected


def test_forwarded_headers_drop_hop_by_hop_answered_and_overridden_names_in_every_spelling() -> None:
    inbound = CIMultiDict(
        [
            ("Connection", "X-Named"),
            ("X-Named", "1"),
            ("Content_Length", "5"),
            ("Expect", "100-continue"),
            ("X-Request-ID", "theirs"),
            ("X_Gateway_Customer_Id", "forged"),
            ("X-Gateway-Customer-Id", "forged"),
            ("authorization", "Bearer t"),
            ("X-Original-URL", "/admin"),
            ("Accept", "*/*"),
            ("Host", "public.example"),
        ]
    )
    out, host = forward_headers(
        CIMultiDictProxy(inbound),
        peer="10.0.0.1",
        peer_trusted=True,
        scheme="http",
        request_id="ours",
        overrides={"X-Gateway-Customer-Id": "42", "Authorization": None},
    )
    assert host == "public.example"
    assert out == [
        ("Accept", "*/*"),
        ("X-Request-ID", "ours"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "public.example"),
        ("X-Gateway-Customer-Id", "42"),
    ]


# --- client IP ----------------------------------------------------------------------------------------------

PROXIES = TrustedProxies(["10.0.0.0/8", "192.168.1.1", "::1/128", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("9.9.9.9", "1.2.3.4", "9.9.9.9"),  # untrusted peer: XFF ignored
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", "", "10.0.0.1"),
        ("10.0.0.1", "1.2.3.4", "1.2.3.4"),
        ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", "1.2.3.4"),  # rightmost untrusted, not the spoofable left
        ("10.0.0.1", "6.6.6.6,1.2.3.4", "1.2.3.4"),
        ("192.168.1.1", "1.2.3.4, 192.168.1.1", "1.2.3.4"),
        ("10.0.0.1", "10.0.0.3, 10.0.0.2", "10.0.0.3"),  # all trusted → leftmost
        ("10.0.0.1", "garbage, 10.0.0.2", "10.0.0.1"),  # all trusted but leftmost garbage → peer
        ("10.0.0.1", "1.2.3.4, garbage", "10.0.0.1"),  # rightmost untrusted hop is garbage → peer
        ("10.0.0.1", " , ,", "10.0.0.1"),
        ("10.0.0.1", "1.2.3.4:5678", "10.0.0.1"),
        ("::1", "2001:db8::1", "2001:db8::1"),
        ("::1", "2001:db8::1, fd00::5", "2001:db8::1"),
        ("fd00::1", "10.0.0.9, ::1", "10.0.0.9"),
        ("2001:db8::9", "1.2.3.4", "2001:db8::9"),
        (None, "1.2.3.4", None),
        ("not-an-ip", "1.2.3.4", "not-an-ip"),
    ],
)
def test_client_ip(peer: str | None, xff: str | None, expected: str | None) -> None:
    assert PROXIES.client_ip(peer, xff) == expected


def test_no_trusted_proxies_means_peer() -> None:
    none = TrustedProxies([])
    assert not none
    assert bool(PROXIES)
    assert not none.trusts("10.0.0.1")
    assert none.client_ip("10.0.0.1", "1.2.3.4") == "10.0.0.1"


@pytest.mark.parametrize(
    ("address", "trusted"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("192.168.1.1", True),
        ("192.168.1.2", False),
        ("::1", True),
        ("fd12::1", True),
        ("2001:db8::1", False),
        ("", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_trusts(address: str | None, trusted: bool) -> None:
    assert PROXIES.trusts(address) is trusted


def test_trusts_ipv4_mapped_peer_of_a_dual_stack_listener() -> None:
    # With listen: "[::]:8080" (dual-stack), IPv4 peers arrive as ::ffff:a.b.c.d; a trusted IPv4 load balancer
    # must still be trusted, or its X-Forwarded-For is dropped and every client gets the balancer's address.
    assert PROXIES.trusts("::ffff:10.0.0.1") is True
    assert PROXIES.client_ip("::ffff:10.0.0.1", "1.2.3.4") == "1.2.3.4"


# --- request ids --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inbound",
    [
        "abc",
        "req_0123456789abcdef0123456789abcdef",
        "123e4567-e89b-12d3-a456-426614174000",
        "a.b_c:d@e/f+g=h-i",
        "x",
        "a" * MAX_LENGTH,
    ],
)
def test_request_id_kept(inbound: str) -> None:
    assert accept_or_new(inbound) == inbound


@pytest.mark.parametrize(
    "inbound",
    [
        None,
        "",
        "a" * (MAX_LENGTH + 1),
        "has space",
        "line\nbreak",
        "trailing\n",
        "cr\r",
        'quote"',
        "single'",
        "tab\t",
        "caf\u00e9",
        "\u0661\u0662",  # Arabic-Indic digits
        "<script>",
        "a;b",
        "a,b",
        "a\\b",
    ],
)
def test_request_id_replaced(inbound: str | None) -> None:
    out = accept_or_new(inbound)
    assert out != inbound
    assert re.fullmatch(r"req_[0-9a-f]{32}", out)


def test_new_request_ids_are_unique_and_well_formed() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids)
    assert len({accept_or_new(None) for _ in range(100)}) == 100


def test_rate_limit_stages_keep_one_redis_round_trip():
    config = GatewayConfig.model_validate(
        {
            "rate_limit": {
                "policies": {
                    "ip-local": {"key": ["ip"], "rate": 1, "burst": 1, "scope": "local"},
                    "ip-shared": {"key": ["ip"], "rate": 1, "burst": 1},
                    "cust": {"key": ["customer"], "rate": 1, "burst": 1},
                }
            },
            "routes": [
                {"name": "mixed", "prefix": "/a", "rate_limit": ["ip-local", "ip-shared", "cust"]},
                {"name": "anonymous", "prefix": "/b", "rate_limit": ["ip-shared"]},
            ],
        }
    )
    mixed, anonymous = compile_routes(config)
    # in-process IP limits cost nothing before auth; shared ones join the identity stage's one script call
    assert (mixed.rate_limit_before_auth, mixed.rate_limit_after_auth) == (
        ("ip-local",),
        ("ip-shared", "cust"),
    )
    assert (anonymous.rate_limit_before_auth, anonymous.rate_limit_after_auth) == (("ip-shared",), ())
    shipped = {route.name: route for route in compile_routes(GatewayConfig())}
    assert shipped["api"].rate_limit_before_auth == ("ip-api",)
    assert shipped["api"].rate_limit_after_auth == ("customer",)
