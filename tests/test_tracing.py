"""Tracing end to end: a gateway exporting to a real OTLP/HTTP receiver on loopback, whose protobuf payloads
are decoded with the OpenTelemetry proto package; the upstream is a real server that records the
traceparent it was sent."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from typing import Any

import jwt
import pytest
from jwt_keys import mint, rsa_key
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from otlp_receiver import OtlpReceiver, Span
from test_auth import KEY, introspection  # noqa: F401
from test_auth_jwt import jwks_server  # noqa: F401
from test_lifecycle import fetch, poll, session, spawn, write_config  # noqa: F401
from test_observability import growth, scrape
from test_reload import changed
from test_upstream_pools import AccessLog
from upstream_server import refused_url

from gateway.observability.tracing import _HashedOnce

SECRET = "tracing-secret-of-32-bytes-or-more-for-hs256"
ACCESS_KEY = "ak-never-on-a-span-7f3c2a"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


def tracing(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "endpoint": endpoint, "schedule_delay": 0.05, **extra}


def token(**claims: Any) -> str:
    body = {"type": "agent", "customer_id": "cust-1", "team_id": "team-9", "exp": 4102444800, **claims}
    return jwt.encode(body, SECRET, "HS256")


@pytest.fixture
async def otlp():
    async with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture
async def gw(upstream, make_gateway, otlp, redis_url, monkeypatch):
    monkeypatch.setenv("TRACE_SECRET", SECRET)
    return await make_gateway(
        upstream.url,
        redis={"url": redis_url},
        tracing=tracing(otlp.endpoint),
        auth={
            "jwt": {"keys": [{"algorithms": ["HS256"], "secret_env": "TRACE_SECRET"}]},
            "introspect": {"jwt": False},
            "access_keys": {"stores": []},
        },
        rate_limit={
            "policies": {
                "per-ip": {"key": ["ip"], "rate": 1000, "period": 60, "burst": 1000},
                "per-customer": {"key": ["customer"], "rate": 1000, "period": 60, "burst": 1000},
            }
        },
        routes=[
            {"name": "calls", "prefix": "/echo/calls", "rate_limit": ["per-ip", "per-customer"]},
            {"name": "open", "prefix": "/", "auth": "none"},
        ],
    )


def sent_traceparent(upstream, index: int = -1) -> tuple[str, str, str]:
    value = upstream.requests[index].header("traceparent")
    assert value is not None, "the upstream got no traceparent"
    match = _TRACEPARENT.fullmatch(value)
    assert match, value
    return match.group(1), match.group(2), match.group(3)


def server_span(spans: list[Span], trace_id: str) -> Span:
    (found,) = [s for s in spans if s.trace_id == trace_id and s.kind == "SERVER"]
    return found


def has_server_span(trace_id: str):
    return lambda spans: any(s.trace_id == trace_id and s.kind == "SERVER" for s in spans)


async def test_a_request_is_one_server_span_with_auth_redis_and_upstream_beneath(
    gw, upstream, otlp, client, capsys
):
    access = AccessLog(capsys)
    headers = {"Authorization": f"Bearer {token()}", "X-Request-ID": "req-trace-1"}
    async with client.get(f"{gw.url}/echo/calls/42?page=2", headers=headers) as resp:
        assert resp.status == 200
    trace_id, upstream_parent, flags = sent_traceparent(upstream)
    assert flags == "01"

    await otlp.wait_for(has_server_span(trace_id))
    spans = otlp.trace(trace_id)
    root = server_span(spans, trace_id)
    assert root.parent_id == ""
    assert root.name == "GET /echo/calls"
    assert root.attributes["http.request.method"] == "GET"
    assert root.attributes["http.route"] == "/echo/calls"
    assert root.attributes["gateway.route"] == "calls"
    assert root.attributes["url.path"] == "/echo/calls/42"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["client.address"] == "127.0.0.1"
    assert root.attributes["gateway.request_id"] == "req-trace-1"
    assert root.attributes["gateway.customer_id"] == "cust-1"
    assert root.attributes["gateway.team_id"] == "team-9"
    assert root.attributes["gateway.auth.result"] == "success"
    assert root.attributes["gateway.ratelimit.decision"] == "allowed"
    assert root.attributes["gateway.ratelimit.policy"] in {"per-ip", "per-customer"}
    assert root.attributes["gateway.ratelimit.fallback"] is False
    assert not root.error
    assert root.resource["service.name"] == "voipbin-gateway"

    children = {s.name: s for s in spans if s.parent_id == root.span_id}
    assert set(children) >= {"auth", "redis ratelimit", "upstream"}
    assert children["auth"].attributes["gateway.credential.kind"] == "jwt"
    redis_spans = [s for s in spans if s.name == "redis ratelimit"]
    # One round trip for both policies: the shared ip policy rides in the identity stage's script call.
    assert len(redis_spans) == 1
    assert all(s.kind == "CLIENT" and s.attributes["db.system.name"] == "redis" for s in redis_spans)
    call = children["upstream"]
    assert call.kind == "CLIENT"
    # The upstream is told that the gateway's call to it is its parent.
    assert upstream_parent == call.span_id
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["server.port"] == upstream.port
    assert [name for name, _ in call.events] == ["response_headers"]
    # The first request to this upstream opened a connection, beneath the call.
    (connect,) = [s for s in spans if s.name == "connect"]
    assert connect.parent_id == call.span_id
    assert root.start_ns <= call.start_ns <= call.end_ns <= root.end_ns

    line = await access.line("req-trace-1")
    assert line["trace_id"] == trace_id
    assert line["span_id"] == root.span_id


async def test_an_inbound_traceparent_is_continued_with_its_tracestate(gw, upstream, otlp, client):
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "congo=t61rcWkgMzE, rojo=00f0"}
    async with client.get(f"{gw.url}/echo/x", headers=headers) as resp:
        assert resp.status == 200
    trace_id, parent, flags = sent_traceparent(upstream)
    assert (trace_id, flags) == (TRACE_ID, "01")
    assert parent != PARENT_ID
    assert upstream.last.header("tracestate") == "congo=t61rcWkgMzE,rojo=00f0"

    spans = await otlp.wait_for(has_server_span(TRACE_ID))
    root = server_span(spans, TRACE_ID)
    assert root.parent_id == PARENT_ID
    call = next(s for s in otlp.trace(TRACE_ID) if s.name == "upstream")
    assert call.parent_id == root.span_id and call.span_id == parent


async def test_a_caller_that_did_not_sample_is_followed_and_nothing_is_exported(gw, upstream, otlp, client):
    unsampled = "0af7651916cd43dd8448eb211c80319c"
    async with client.get(
        f"{gw.url}/echo/x", headers={"traceparent": f"00-{unsampled}-{PARENT_ID}-00"}
    ) as resp:
        assert resp.status == 200
    assert sent_traceparent(upstream)[::2] == (unsampled, "00")
    # A sampled request after it: once its span is here, the unsampled one would have been too.
    async with client.get(f"{gw.url}/echo/x", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}):
        pass
    await otlp.wait_for(has_server_span(TRACE_ID))
    assert otlp.trace(unsampled) == []


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper case
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # the forbidden version
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has nothing after the flags
        f"00-{TRACE_ID}-{PARENT_ID}",
        "garbage",
    ],
)
async def test_an_invalid_traceparent_starts_a_new_trace_without_the_tracestate(
    gw, upstream, client, traceparent
):
    headers = {"traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE"}
    async with client.get(f"{gw.url}/echo/x", headers=headers) as resp:
        assert resp.status == 200
    trace_id, _, _ = sent_traceparent(upstream)
    assert trace_id != TRACE_ID
    assert upstream.last.header("tracestate") is None


async def test_a_later_version_is_read_by_version_00_rules(gw, upstream, client):
    headers = {"traceparent": f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds"}
    async with client.get(f"{gw.url}/echo/x", headers=headers) as resp:
        assert resp.status == 200
    assert sent_traceparent(upstream)[::2] == (TRACE_ID, "01")


async def test_no_credential_reaches_a_span(gw, upstream, otlp, client):
    bearer = token(customer_id="cust-secret-check")
    async with client.get(f"{gw.url}/echo/calls/1", headers={"Authorization": f"Bearer {bearer}"}) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/echo/calls/2?accesskey={ACCESS_KEY}") as resp:
        assert resp.status == 401
    async with client.get(f"{gw.url}/echo/open?accesskey={ACCESS_KEY}&token={ACCESS_KEY}") as resp:
        assert resp.status == 200
    spans = await otlp.wait_for(lambda spans: sum(s.kind == "SERVER" for s in spans) >= 3)
    everything = json.dumps([[s.attributes, s.events, s.resource, s.name] for s in spans], default=str)
    for secret in (ACCESS_KEY, bearer, SECRET, bearer.split(".")[2]):
        assert secret not in everything
    refused = next(s for s in spans if s.kind == "SERVER" and s.attributes["url.path"] == "/echo/calls/2")
    assert refused.attributes["http.response.status_code"] == 401
    assert refused.attributes["gateway.auth.result"] == "failure"
    assert not refused.error  # a client's mistake is not the server's error


async def test_the_sample_ratio_decides_new_traces_and_the_upstream_learns_each_decision(
    upstream, make_gateway, otlp, client
):
    gw = await make_gateway(upstream.url, tracing=tracing(otlp.endpoint, sample_ratio=0.25))
    flags = []
    for _ in range(400):
        async with client.get(f"{gw.url}/echo/r") as resp:
            assert resp.status == 200
        flags.append(sent_traceparent(upstream))
    sampled = {trace_id for trace_id, _, flag in flags if flag == "01"}
    # Binomial(400, 0.25): 100 expected, 50..150 is over eight standard deviations either way.
    assert 50 <= len(sampled) <= 150
    # Decided on the trace id's low 64 bits, as OpenTelemetry's TraceIdRatioBased does, so a service
    # sampling by the same ratio downstream agrees on every trace (the SDK keeps the gateway's ids).
    bound = TraceIdRatioBased.get_bound_for_rate(0.25)
    assert all((int(trace_id[16:], 16) < bound) is (flag == "01") for trace_id, _, flag in flags)
    spans = await otlp.wait_for(lambda spans: sum(s.kind == "SERVER" for s in spans) >= len(sampled))
    assert {s.trace_id for s in spans if s.kind == "SERVER"} == sampled


async def test_an_unreachable_collector_fails_no_request_and_its_losses_are_counted(
    upstream, make_gateway, client
):
    gw = await make_gateway(
        upstream.url,
        tracing=tracing(await refused_url() + "/v1/traces", export_timeout=0.5, max_queue_size=8),
    )
    before = await scrape(client, gw)
    for i in range(60):
        async with client.get(f"{gw.url}/echo/{i}") as resp:
            assert resp.status == 200

    async def dropped() -> float:
        after = await scrape(client, gw)
        return growth(before, after, "gateway_tracing_spans_dropped_total")

    async def all_lost() -> bool:  # at least one span per request is lost, one way or the other
        return await dropped() >= 60

    await poll(all_lost, within=30, what="every request's spans counted as dropped", interval=0.1)
    after = await scrape(client, gw)
    # Mostly export_failed: a refused connection fails an export at once, so the queue seldom fills (the
    # stalled collector below fills it).
    assert growth(before, after, "gateway_tracing_spans_dropped_total", reason="export_failed") > 0
    assert growth(before, after, "gateway_tracing_spans_exported_total") == 0


async def test_a_collector_that_never_answers_does_not_hold_up_requests_or_the_stop(
    upstream, make_gateway, client
):
    async with OtlpReceiver(hang=True) as stuck:
        gw = await make_gateway(
            upstream.url, tracing=tracing(stuck.endpoint, export_timeout=20, max_queue_size=4)
        )
        before = await scrape(client, gw)
        for i in range(20):
            async with client.get(f"{gw.url}/echo/{i}") as resp:
                assert resp.status == 200
        after = await scrape(client, gw)
        # The first batch is stuck on its way out; the queue behind it is full, and the rest is dropped.
        assert growth(before, after, "gateway_tracing_spans_dropped_total", reason="queue_full") > 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        await gw.server.stop()
        # The stop flushes for at most FLUSH_AT_STOP (3 s), not the export's 20 s: a generous bound.
        assert loop.time() - started < 15


async def test_duration_histograms_carry_the_trace_as_an_exemplar_for_openmetrics(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/exemplar") as resp:
        assert resp.status == 200
    trace_id = sent_traceparent(upstream)[0]
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with client.get(f"{gw.admin_url}/metrics", headers=openmetrics) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await resp.text()
    for metric in ("gateway_request_duration_seconds_bucket", "gateway_upstream_duration_seconds_bucket"):
        lines = [line for line in text.splitlines() if line.startswith(metric) and 'route="open"' in line]
        assert any(f'# {{trace_id="{trace_id}"}}' in line for line in lines), metric
    plain = await scrape(client, gw)
    assert "trace_id" not in plain


async def test_with_tracing_off_the_trace_context_still_travels(upstream, make_gateway, client, capsys):
    access = AccessLog(capsys)
    gw = await make_gateway(upstream.url)
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": "req-off"}
    async with client.get(f"{gw.url}/echo/x", headers=headers) as resp:
        assert resp.status == 200
    trace_id, parent, flags = sent_traceparent(upstream)
    assert (trace_id, flags) == (TRACE_ID, "01")
    line = await access.line("req-off")
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, parent)  # the upstream's parent: the gateway

    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 200
    new_trace, _, flags = sent_traceparent(upstream)
    assert new_trace != TRACE_ID and flags == "01"  # sample_ratio 1.0 by default


async def test_propagation_off_leaves_trace_headers_alone(upstream, make_gateway, client, capsys):
    access = AccessLog(capsys)
    gw = await make_gateway(upstream.url, tracing={"propagate": False})
    inbound = f"00-{TRACE_ID}-{PARENT_ID}-01"
    async with client.get(f"{gw.url}/echo/x", headers={"traceparent": inbound, "X-Request-ID": "r-p"}):
        pass
    assert upstream.last.header("traceparent") == inbound
    async with client.get(f"{gw.url}/echo/x"):
        pass
    assert upstream.last.header("traceparent") is None
    line = await access.line("r-p")
    assert line["trace_id"] is None


async def test_an_edge_that_trusts_no_caller_starts_its_own_traces(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, tracing={"trust_inbound": False, "sample_ratio": 0.0})
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "congo=t61rcWkgMzE"}
    async with client.get(f"{gw.url}/echo/x", headers=headers) as resp:
        assert resp.status == 200
    trace_id, _, flags = sent_traceparent(upstream)
    assert trace_id != TRACE_ID
    assert flags == "00"  # its own decision (ratio 0), not the caller's
    assert upstream.last.header("tracestate") is None


async def test_every_worker_exports_and_the_stop_sends_what_is_queued(
    tmp_path,
    upstream,
    otlp,
    spawn,  # noqa: F811
    session,  # noqa: F811
):
    # Nothing is sent before the stop (schedule_delay), so the stop's flush must deliver every span.
    config = write_config(
        tmp_path, tracing={"enabled": True, "endpoint": otlp.endpoint, "schedule_delay": 600}
    )
    gw = await spawn(config, upstream.url, "--workers", "2")
    started = await gw.wait_event("worker_started", count=2)
    workers = {e["worker_pid"] for e in started}
    for pid in workers:
        await gw.wait_event("gateway_started", pid=pid)
    await gw.wait_healthy(session)
    # Fresh connections in parallel, so the kernel hands them to both workers (SO_REUSEPORT).
    results = await asyncio.gather(*(fetch(session, f"{gw.url}/echo/w{i}") for i in range(40)))
    assert [status for status, _, _ in results] == [200] * 40
    sent = {sent_traceparent(upstream, i)[0] for i in range(-40, 0)}
    assert otlp.requests == 0

    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(30) == 0, gw.output()
    servers = [
        s for s in otlp.spans if s.kind == "SERVER" and s.attributes.get("url.path", "").startswith("/echo/w")
    ]
    assert {s.trace_id for s in servers} == sent
    assert {s.resource["process.pid"] for s in servers} == workers


async def test_a_jwks_fetch_and_an_introspection_call_show_beneath_the_auth_span(
    upstream,
    otlp,
    make_gateway,
    client,
    jwks_server,  # noqa: F811
    introspection,  # noqa: F811
):
    gw = await make_gateway(
        upstream.url,
        tracing=tracing(otlp.endpoint),
        auth={
            "jwt": {"keys": [{"algorithms": ["RS256"], "jwks_url": jwks_server.url}]},
            "introspect": {"url": introspection.url, "jwt": False},
        },
        routes=[{"name": "api", "prefix": "/"}],
    )
    claims = {"type": "agent", "customer_id": "c", "exp": 4102444800}
    signed = mint(claims, rsa_key(), "RS256", kid="k1")
    async with client.get(f"{gw.url}/echo/jwt", headers={"Authorization": f"Bearer {signed}"}) as resp:
        assert resp.status == 200
    by_jwt = sent_traceparent(upstream)[0]
    async with client.get(f"{gw.url}/echo/key?accesskey={KEY}") as resp:
        assert resp.status == 200
    by_key = sent_traceparent(upstream)[0]
    await otlp.wait_for(lambda spans: has_server_span(by_jwt)(spans) and has_server_span(by_key)(spans))

    for trace_id, call in ((by_jwt, "jwks fetch"), (by_key, "introspection")):
        spans = otlp.trace(trace_id)
        (auth,) = [s for s in spans if s.name == "auth"]
        (fetch_span,) = [s for s in spans if s.name == call]
        assert fetch_span.parent_id == auth.span_id and fetch_span.kind == "CLIENT"
        assert auth.parent_id == server_span(spans, trace_id).span_id
    (asked,) = [s for s in otlp.trace(by_key) if s.name == "introspection"]
    assert asked.attributes["url.path"] == "/v1.0/me"
    assert asked.attributes["http.response.status_code"] == 200
    assert KEY not in json.dumps([s.attributes for s in otlp.spans])


async def test_a_reload_keeps_the_exporter_unless_tracing_changed_and_can_turn_it_on_and_off(
    upstream, otlp, make_gateway, client
):
    gw = await make_gateway(upstream.url)  # tracing off: nothing exported
    async with client.get(f"{gw.url}/echo/off") as resp:
        assert resp.status == 200
    first = gw.server.gateway.resources.tracer
    assert first is None

    assert await gw.server.reload(changed(gw, tracing=tracing(otlp.endpoint)))
    tracer = gw.server.gateway.resources.tracer
    assert tracer is not None
    async with client.get(f"{gw.url}/echo/on") as resp:
        assert resp.status == 200
    await otlp.wait_for(has_server_span(sent_traceparent(upstream)[0]))

    # Another setting: the same exporter and queue go on.
    assert await gw.server.reload(changed(gw, server={"server_header": "reloaded"}))
    assert gw.server.gateway.resources.tracer is tracer

    async with OtlpReceiver() as other:
        assert await gw.server.reload(changed(gw, tracing={"endpoint": other.endpoint}))
        assert gw.server.gateway.resources.tracer is not tracer
        async with client.get(f"{gw.url}/echo/moved") as resp:
            assert resp.status == 200
        await other.wait_for(has_server_span(sent_traceparent(upstream)[0]))

    assert await gw.server.reload(changed(gw, tracing={"enabled": False}))
    assert gw.server.gateway.resources.tracer is None


async def test_a_failed_upstream_marks_the_call_and_the_request_as_errors(make_gateway, otlp, client):
    gw = await make_gateway(await refused_url(), tracing=tracing(otlp.endpoint))
    async with client.get(f"{gw.url}/nowhere", headers={"X-Request-ID": "req-502"}) as resp:
        assert resp.status == 502
    spans = await otlp.wait_for(lambda spans: any(s.kind == "SERVER" for s in spans))
    (root,) = [s for s in spans if s.kind == "SERVER"]
    assert root.error and root.attributes["error.type"] == "connect"
    assert root.attributes["http.response.status_code"] == 502
    (call,) = [s for s in spans if s.name == "upstream"]
    assert call.error and call.attributes["error.type"] == "connect"
    # The first try and its retry each tried to connect.
    connects = [s for s in spans if s.name == "connect"]
    assert len(connects) == 2
    assert all(s.error and s.parent_id == call.span_id for s in connects)
    assert [name for name, _ in call.events] == ["retry"]


async def test_a_websocket_stream_is_one_server_span_with_its_handshake(upstream, make_gateway, otlp, client):
    gw = await make_gateway(upstream.url, tracing=tracing(otlp.endpoint))
    async with client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
    trace_id = next(h for h in upstream.ws_headers if h[0].lower() == "traceparent")[1].split("-")[1]
    spans = await otlp.wait_for(has_server_span(trace_id))
    root = server_span(spans, trace_id)
    assert root.attributes["http.response.status_code"] == 101
    (handshake,) = [s for s in otlp.trace(trace_id) if s.name == "upstream handshake"]
    assert handshake.parent_id == root.span_id
    assert handshake.attributes["http.response.status_code"] == 101


async def test_the_collector_gets_the_configured_headers(upstream, make_gateway, otlp, client, capsys):
    gw = await make_gateway(
        upstream.url, tracing=tracing(otlp.endpoint, headers={"x-api-key": "collector-key-1", "X-Tenant": 42})
    )
    async with client.get(f"{gw.url}/echo/h") as resp:
        assert resp.status == 200
    await otlp.wait_for(has_server_span(sent_traceparent(upstream)[0]))
    assert otlp.headers_seen[0]["x-api-key"] == "collector-key-1"
    assert otlp.headers_seen[0]["x-tenant"] == "42"
    assert "collector-key-1" not in capsys.readouterr().out


async def test_a_malformed_accept_gets_the_text_format(gw, client):
    bad = {"Accept": "application/openmetrics-text; version=abc"}
    async with client.get(f"{gw.admin_url}/metrics", headers=bad) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")


async def test_an_unknown_method_names_no_span_after_itself(gw, upstream, otlp, client):
    async with client.request("PROPFIND", f"{gw.url}/echo/dav") as resp:
        assert resp.status == 200
    spans = await otlp.wait_for(has_server_span(sent_traceparent(upstream)[0]))
    root = next(s for s in spans if s.kind == "SERVER")
    assert root.name == "HTTP /"
    assert root.attributes["http.request.method"] == "_OTHER"
    assert root.attributes["http.request.method_original"] == "PROPFIND"


async def test_the_upstream_call_names_the_path_as_sent_below_the_upstream_base_path(
    upstream, make_gateway, otlp, client
):
    gw = await make_gateway(f"{upstream.url}/echo/base%2Fpath", tracing=tracing(otlp.endpoint))
    async with client.get(f"{gw.url}/x?accesskey={ACCESS_KEY}") as resp:
        assert resp.status == 200
    assert upstream.last.raw_path.startswith("/echo/base%2Fpath/x")
    spans = await otlp.wait_for(has_server_span(sent_traceparent(upstream)[0]))
    (call,) = [s for s in spans if s.name == "upstream"]
    assert call.attributes["url.path"] == "/echo/base%2Fpath/x"


async def test_an_sdk_switched_off_by_its_environment_sends_a_valid_traceparent(
    upstream, make_gateway, otlp, client, capsys, monkeypatch
):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    access = AccessLog(capsys)
    gw = await make_gateway(upstream.url, tracing=tracing(otlp.endpoint))
    async with client.get(f"{gw.url}/echo/off", headers={"X-Request-ID": "req-sdk-off"}) as resp:
        assert resp.status == 200
    trace_id, parent, flags = sent_traceparent(upstream)
    assert parent != "0" * 16 and flags == "01"
    line = await access.line("req-sdk-off")
    assert (line["trace_id"], line["span_id"]) == (trace_id, parent)
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with client.get(f"{gw.admin_url}/metrics", headers=openmetrics) as resp:
        assert trace_id not in await resp.text()  # no exemplar for a trace nobody exported


def test_the_resource_hashed_once_is_still_the_sdks_resource():
    # The OTLP encoder groups spans by resource in a dict: the cached hash must agree with the SDK's
    # equality, or a batch would be split into one resource per span.
    created = Resource.create({"service.name": "voipbin-gateway", "process.pid": 7})
    hashed = _HashedOnce(created)
    assert hashed == created and hash(hashed) == hash(created)
    assert dict(hashed.attributes) == dict(created.attributes)
    assert hashed.schema_url == created.schema_url
    assert len({hashed: 1, _HashedOnce(created): 2}) == 1
