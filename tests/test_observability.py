"""Metrics at /metrics and the access log, against a running in-process gateway."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from upstream_server import refused_url
from yarl import URL

from gateway.observability.redact import redact_target

SECRET = "observability-secret-of-32-bytes-or-more!"


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    families = text_string_to_metric_families(text)
    return [(s.name, s.labels, s.value) for family in families for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for n, found, v in samples(text) if n == name and labels.items() <= found.items())


def growth(before: str, after: str, name: str, **labels: str) -> float:
    """How much a metric (summed over the matching series) grew between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


async def scrape(client, gw) -> str:
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


@pytest.fixture
async def gw(upstream, make_gateway, monkeypatch):
    monkeypatch.setenv("OBS_SECRET", SECRET)
    return await make_gateway(
        upstream.url,
        auth={
            "jwt": {"keys": [{"algorithms": ["HS256"], "secret_env": "OBS_SECRET"}]},
            "introspect": {"jwt": False},
            "access_keys": {"stores": []},
        },
        rate_limit={"policies": {"obs-ip": {"key": ["ip"], "rate": 1, "period": 3600, "burst": 2}}},
        metrics={"per_team": True, "team_cap": 2},
        routes=[
            {"name": "limited", "prefix": "/echo/limited", "auth": "none", "rate_limit": ["obs-ip"]},
            {"name": "private", "prefix": "/echo/private"},
            {"name": "open", "prefix": "/", "auth": "none"},
        ],
    )


def bearer(**claims: Any) -> dict[str, str]:
    body = {"type": "agent", "customer_id": "c", "exp": 4102444800, **claims}
    return {"Authorization": f"Bearer {jwt.encode(body, SECRET, 'HS256')}"}


async def test_requests_are_counted_by_route_method_and_code_never_by_path(gw, client):
    before = await scrape(client, gw)
    for i in range(5):
        async with client.get(f"{gw.url}/echo/open/{i}") as resp:
            assert resp.status == 200
    async with client.post(f"{gw.url}/sink", data=b"x" * 1000) as resp:
        assert resp.status == 200
    async with client.request("PROPFIND", f"{gw.url}/echo/dav") as resp:
        await resp.read()
    after = await scrape(client, gw)

    assert growth(before, after, "gateway_requests_total", route="open", method="GET", code="200") == 5
    assert growth(before, after, "gateway_requests_total", route="open", method="OTHER") == 1
    assert (
        growth(
            before,
            after,
            "gateway_request_duration_seconds_count",
            route="open",
            method="GET",
            code_class="2xx",
        )
        == 5
    )
    assert growth(before, after, "gateway_upstream_duration_seconds_count", route="open") == 7
    assert growth(before, after, "gateway_request_bytes_total", route="open") == 1000
    assert growth(before, after, "gateway_response_bytes_total", route="open") > 0
    paths = {labels.get("route") for _, labels, _ in samples(after) if "route" in labels}
    assert not any(p and p.startswith("/") for p in paths)


async def test_unmatched_auth_ratelimit_and_upstream_errors(upstream, make_gateway, gw, client):
    before = await scrape(client, gw)
    async with client.get(f"{gw.url}/echo/private/x") as resp:
        assert resp.status == 401
    async with client.get(f"{gw.url}/echo/private/x", headers=bearer(team_id="t1")) as resp:
        assert resp.status == 200
    forged = {
        "Authorization": "Bearer "
        + jwt.encode({"exp": 4102444800}, "not-the-secret-but-also-32-bytes-long!", "HS256")
    }
    async with client.get(f"{gw.url}/echo/private/x", headers=forged) as resp:
        assert resp.status == 401
    oversized = {"Cookie": "accesskey=" + "k" * 9000}  # over the credential size cap
    async with client.get(f"{gw.url}/echo/private/x", headers=oversized) as resp:
        assert resp.status == 401
    for _ in range(3):
        async with client.get(f"{gw.url}/echo/limited/x") as resp:
            await resp.read()
    after = await scrape(client, gw)

    assert (
        growth(
            before,
            after,
            "gateway_auth_total",
            result="failure",
            reason="no_credential",
            credential_type="none",
        )
        == 1
    )
    assert growth(before, after, "gateway_auth_total", result="success", credential_type="agent") == 1
    # Failed, so no identity: the label says what kind of credential was refused.
    assert growth(before, after, "gateway_auth_total", result="failure", credential_type="jwt") == 1
    assert growth(before, after, "gateway_auth_total", reason="too_large", credential_type="accesskey") == 1
    assert (
        growth(before, after, "gateway_ratelimit_decisions_total", policy="obs-ip", decision="allowed") == 2
    )
    assert (
        growth(before, after, "gateway_ratelimit_decisions_total", policy="obs-ip", decision="limited") == 1
    )
    assert growth(before, after, "gateway_requests_total", route="limited", code="429") == 1
    assert growth(before, after, "gateway_team_requests_total", team="t1") == 1

    broken = await make_gateway(await refused_url(), routes=[{"name": "gone", "prefix": "/", "auth": "none"}])
    async with client.get(f"{broken.url}/x") as resp:
        assert resp.status == 502
    text = await scrape(client, broken)
    assert value(text, "gateway_upstream_errors_total", route="gone", kind="connect") >= 1


async def test_404_is_labelled_unmatched(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, routes=[{"name": "only", "prefix": "/echo", "auth": "none"}])
    before = await scrape(client, gw)
    for path in ("/a", "/b/c", "/d?e=f"):
        async with client.get(gw.url + path) as resp:
            assert resp.status == 404
    after = await scrape(client, gw)
    assert growth(before, after, "gateway_requests_total", route="unmatched", code="404") == 3


async def test_per_team_counter_is_capped(gw, client):
    before = await scrape(client, gw)
    # A real team may be called "other": it is counted as itself, apart from the teams past the cap.
    for team in ("other", "a", "c", "d", "other"):
        async with client.get(f"{gw.url}/echo/private/x", headers=bearer(team_id=team)) as resp:
            assert resp.status == 200
    after = await scrape(client, gw)

    def teams(text: str) -> set[str]:
        return {labels["team"] for name, labels, _ in samples(text) if name == "gateway_team_requests_total"}

    assert teams(after) - teams(before) <= {"a", "other"}  # the cap: c and d are not counted per team
    assert growth(before, after, "gateway_team_requests_total", team="other") == 2
    assert growth(before, after, "gateway_team_requests_total", team="a") == 1
    assert growth(before, after, "gateway_team_requests_total") == 3
    assert growth(before, after, "gateway_team_requests_overflow_total") == 2


async def test_build_and_config_info(gw, client):
    text = await scrape(client, gw)
    from gateway import __version__

    assert value(text, "gateway_build_info", version=__version__) == 1
    hashes = [labels["hash"] for name, labels, _ in samples(text) if name == "gateway_config_info"]
    assert hashes and all(len(h) == 16 for h in hashes)


async def test_one_access_log_line_per_request_with_secrets_redacted(capsys, gw, client):
    # capsys first: the gateway's access log then writes into the captured stdout
    capsys.readouterr()
    target = "/echo/private/x?accesskey=zz-secret-1&page=2&TOKEN=zz-secret-2"
    async with client.get(URL(gw.url + target, encoded=True), headers=bearer(team_id="t9")) as resp:
        assert resp.status == 401  # two credentials (token + access key): refused
        rid = resp.headers["X-Request-ID"]
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if '"request"' in line]
    [entry] = [e for e in lines if e.get("request_id") == rid]
    assert entry["event"] == "request" and entry["logger"] == "gateway.access"
    assert entry["path"] == "/echo/private/x?accesskey=[redacted]&page=2&TOKEN=[redacted]"
    assert entry["status"] == 401 and entry["reason"] == "INVALID_CREDENTIALS"
    assert entry["auth"] == "failure" and entry["auth_check"] == "conflicting_credentials"
    assert entry["route"] == "private" and entry["method"] == "GET"
    expected_keys = (
        "timestamp",
        "duration_ms",
        "upstream_ms",
        "bytes_in",
        "bytes_out",
        "client_ip",
        "customer_id",
    )
    assert set(expected_keys) <= set(entry)
    assert "zz-secret" not in out

    async with client.get(f"{gw.url}/echo/private/y", headers=bearer(team_id="t9", customer_id="c9")) as resp:
        assert resp.status == 200
        rid = resp.headers["X-Request-ID"]
    out = capsys.readouterr().out
    [entry] = [json.loads(line) for line in out.splitlines() if rid in line and '"request"' in line]
    assert (entry["customer_id"], entry["team_id"], entry["credential_type"]) == ("c9", "t9", "agent")
    assert entry["upstream_ms"] is not None and entry["bytes_out"] > 0
    assert "Bearer" not in out and "Authorization" not in out


def access_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if '"event":"request"' in line]


async def test_shadow_and_unavailable_verdicts_in_metrics_and_log(capsys, upstream, make_gateway, client):
    free = (await refused_url()).rsplit(":", 1)[1]  # Redis refuses at once: no budget wait
    gw = await make_gateway(
        upstream.url,
        redis={"url": f"redis://127.0.0.1:{free}"},
        rate_limit={
            "policies": {
                "watch": {
                    "key": ["ip"],
                    "scope": "local",
                    "rate": 1,
                    "period": 3600,
                    "burst": 1,
                    "shadow": True,
                },
                "strict": {"key": ["ip"], "rate": 1, "period": 3600, "burst": 9, "on_redis_error": "closed"},
                "trial": {
                    **{"key": ["ip"], "rate": 1, "period": 3600, "burst": 9},
                    **{"on_redis_error": "closed", "shadow": True},
                },
            }
        },
        routes=[
            {"name": "watched", "prefix": "/echo/w", "auth": "none", "rate_limit": ["watch"]},
            {"name": "strict", "prefix": "/echo/s", "auth": "none", "rate_limit": ["strict"]},
            {"name": "trial", "prefix": "/echo/t", "auth": "none", "rate_limit": ["trial"]},
        ],
    )
    before = await scrape(client, gw)
    capsys.readouterr()
    for expected in (200, 200):  # the second is over the shadow limit: served, logged, counted
        async with client.get(f"{gw.url}/echo/w") as resp:
            assert resp.status == expected
    async with client.get(f"{gw.url}/echo/s") as resp:
        assert resp.status == 503  # Redis down and the policy is closed: not a 429
    async with client.get(f"{gw.url}/echo/t") as resp:
        assert resp.status == 200  # the same, in shadow: served, and said so
    logged = access_lines(capsys.readouterr().out)
    after = await scrape(client, gw)

    verdicts = [(e["route"], e["ratelimit"], e["ratelimit_policy"]) for e in logged]
    assert verdicts == [
        ("watched", "allowed", None),
        ("watched", "shadow_limited", "watch"),
        ("strict", "unavailable", "strict"),
        ("trial", "shadow_limited", "trial"),
    ]
    decisions = "gateway_ratelimit_decisions_total"
    assert growth(before, after, decisions, policy="watch", decision="shadow_limited") == 1
    assert growth(before, after, decisions, policy="strict", decision="fallback") == 1
    assert growth(before, after, decisions, policy="strict", decision="limited") == 0


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a?accesskey=k&b=1", "/a?accesskey=[redacted]&b=1"),
        ("/a?b=1&token=t", "/a?b=1&token=[redacted]"),
        ("/a?AccessKey=k", "/a?AccessKey=[redacted]"),
        ("/a?access%6Bey=k", "/a?access%6Bey=[redacted]"),
        ("/a?tokens=x&mytoken=y", "/a?tokens=x&mytoken=y"),
        ("/a?token", "/a?token"),
        ("/a?x=1;token=t", "/a?x=1;token=[redacted]"),
        ("/plain", "/plain"),
    ],
)
def test_redact_target(target, expected):
    assert redact_target(target, frozenset({"accesskey", "token"})) == expected


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_logged_tracebacks_never_carry_frame_locals(fmt):
    """A traceback is useful; the locals of its frames (raw queries, headers, credentials) are not logged."""
    import subprocess
    import sys

    program = f"""
import structlog
from gateway import logs
logs.configure("info", "{fmt}")
def handler():
    raw_query = "accesskey=planted-secret-in-a-local"
    raise RuntimeError("boom")
try:
    handler()
except RuntimeError:
    structlog.get_logger("gateway.errors").exception("unhandled_error", request_id="req_1")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "RuntimeError" in done.stdout and "handler" in done.stdout  # the traceback is there
    assert "planted-secret" not in done.stdout + done.stderr


async def test_credential_parameters_are_redacted_even_if_the_config_list_is_empty(
    capsys, upstream, make_gateway, client
):
    gw = await make_gateway(upstream.url, logging={"redact_query_params": []})
    capsys.readouterr()
    async with client.get(f"{gw.url}/echo/x?accesskey=zz-planted&token=zz-planted2") as resp:
        await resp.read()
    out = capsys.readouterr().out
    assert '"event":"request"' in out and "zz-planted" not in out


async def test_a_client_leaving_mid_download_is_not_an_upstream_error(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, routes=[{"name": "dl", "prefix": "/", "auth": "none"}])
    before = await scrape(client, gw)
    with capture_logs() as logged:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await reader.readexactly(65536)  # part of the body, then hang up
        writer.transport.abort()
        for _ in range(200):  # the gateway notices on its next write
            after = await scrape(client, gw)
            if growth(before, after, "gateway_requests_total", route="dl"):
                break
            await asyncio.sleep(0.01)
    assert growth(before, after, "gateway_requests_total", route="dl", code="499") == 1
    assert growth(before, after, "gateway_upstream_errors_total", route="dl") == 0
    assert not [e for e in logged if e["event"] in ("bad_http_request", "unhandled_error")]


async def test_a_request_the_parser_refuses_gets_an_access_log_line(capsys, upstream, make_gateway, client):
    gw = await make_gateway(upstream.url)
    before = await scrape(client, gw)
    capsys.readouterr()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"G@T /x?accesskey=zz-planted HTTP/1.1\r\nHost: x\r\n\r\n")
    head = (await reader.read(-1)).split(b"\r\n\r\n")[0].decode()
    writer.close()
    rid = next(line.split(": ")[1] for line in head.split("\r\n") if line.startswith("X-Request-ID"))
    out = capsys.readouterr().out
    [entry] = [e for e in access_lines(out) if e["request_id"] == rid]
    assert (entry["status"], entry["reason"], entry["route"]) == (400, "MALFORMED_REQUEST", "unmatched")
    assert entry["method"] is None and entry["path"] is None  # nothing of an unparsed request is guessed
    assert entry["client_ip"] == "127.0.0.1" and "zz-planted" not in out
    after = await scrape(client, gw)
    assert growth(before, after, "gateway_requests_total", route="unmatched", method="OTHER", code="400") == 1
