"""`voipbin-gateway quota show|reset|set|unset` against a real Redis and a gateway that enforces it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from gateway.cli import main

SECRET = "quota-cli-tests-secret-of-32-bytes-or-more"


def token(team: str, **claims: Any) -> dict[str, str]:
    payload = {"type": "agent", "customer_id": "c1", "team_id": team, "exp": 4102444800, **claims}
    return {"Authorization": f"Bearer {jwt.encode(payload, SECRET, 'HS256')}"}


@pytest.fixture
def settings(redis_url: str, monkeypatch) -> dict[str, Any]:
    monkeypatch.setenv("QUOTA_TEST_SECRET", SECRET)
    return {
        "redis": {"url": redis_url},
        "auth": {
            "jwt": {"keys": [{"algorithms": ["HS256"], "secret_env": "QUOTA_TEST_SECRET"}]},
            "introspect": {"jwt": False},
            "access_keys": {"stores": []},
        },
        "rate_limit": {
            "policies": {
                "team-monthly": {"key": ["team"], "algorithm": "quota", "window": "month", "limit": 5},
                "team-rate": {"key": ["team"], "rate": 1, "period": 3600, "burst": 10},
                "per-ip": {"key": ["ip"], "rate": 1, "period": 3600, "burst": 100},
                "team-route": {"key": ["route", "team"], "rate": 1, "period": 3600, "burst": 100},
                "customer-team": {"key": ["customer", "team"], "rate": 1, "period": 3600, "burst": 100},
            }
        },
        "routes": [
            {
                "name": "api",
                "prefix": "/",
                "rate_limit": ["team-monthly", "team-rate", "team-route", "customer-team"],
            }
        ],
    }


@pytest.fixture
def config_file(tmp_path: Path, settings: dict[str, Any]) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


async def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def spend(client, gw, n: int, team: str) -> list[int]:
    out = []
    for _ in range(n):
        async with client.get(f"{gw.url}/echo/x", headers=token(team)) as resp:
            out.append(resp.status)
    return out


def row(out: str, policy: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(policy + " "))


async def test_show_reports_usage_of_every_team_policy(
    upstream, make_gateway, client, settings, config_file, capsys
):
    gw = await make_gateway(upstream.url, **settings)
    assert await spend(client, gw, 3, "t1") == [200] * 3
    code, out, _ = await cli(capsys, "quota", "show", "--config", config_file, "--team", "t1")
    assert code == 0
    assert row(out, "team-monthly")[2:4] == ["5", "2"]
    assert row(out, "team-rate")[2:4] == ["10", "7"]
    assert "per-ip" not in out  # not counted by the team


async def test_set_overrides_a_teams_limit_live_and_unset_restores(
    upstream, make_gateway, client, settings, config_file, capsys
):
    gw = await make_gateway(upstream.url, **settings)
    code, out, _ = await cli(
        capsys,
        "quota",
        "set",
        "--config",
        config_file,
        "--team",
        "t2",
        "--policy",
        "team-monthly",
        "--limit",
        "2",
    )
    assert code == 0, out
    assert await spend(client, gw, 3, "t2") == [200, 200, 429]
    assert await spend(client, gw, 3, "t3") == [200, 200, 200]  # other teams keep the configured 5
    code, out, _ = await cli(capsys, "quota", "show", "--config", config_file, "--team", "t2")
    assert row(out, "team-monthly")[-1] == "limit=2"
    await cli(capsys, "quota", "unset", "--config", config_file, "--team", "t2", "--policy", "team-monthly")
    assert await spend(client, gw, 1, "t2") == [200]


async def test_reset_starts_counting_anew(upstream, make_gateway, client, settings, config_file, capsys):
    gw = await make_gateway(upstream.url, **settings)
    assert await spend(client, gw, 6, "t4") == [200] * 5 + [429]
    code, out, _ = await cli(
        capsys, "quota", "reset", "--config", config_file, "--team", "t4", "--policy", "team-monthly"
    )
    assert code == 0 and "reset 1 bucket" in out
    assert await spend(client, gw, 1, "t4") == [200]


async def test_set_refuses_a_policy_a_team_override_cannot_reach(config_file, capsys):
    """[customer, team] counts live with the customer (its hash tag), where the team's override hash is not
    read: accepting the override would print success and change nothing."""
    argv = ["--team", "t", "--policy", "customer-team", "--limit", "1"]
    code, out, err = await cli(capsys, "quota", "set", "--config", config_file, *argv)
    assert code == 1 and out == ""
    assert "'customer-team' is keyed by [customer, team]" in err
    assert "team-monthly, team-rate, team-route" in err  # the policies it does apply to
    assert len(err.strip().splitlines()) == 1


async def test_an_override_of_a_team_and_route_policy_applies_and_show_lists_it(
    upstream, make_gateway, client, settings, config_file, capsys
):
    gw = await make_gateway(upstream.url, **settings)
    argv = ["--team", "t6", "--policy", "team-route", "--limit", "1"]
    code, out, _ = await cli(capsys, "quota", "set", "--config", config_file, *argv)
    assert code == 0, out
    assert await spend(client, gw, 2, "t6") == [200, 429]
    code, out, _ = await cli(capsys, "quota", "show", "--config", config_file, "--team", "t6")
    assert row(out, "team-route") == ["team-route", "per", "route", "-", "-", "-", "limit=1"]
    assert "customer-team" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set", "--team", "t", "--policy", "per-ip", "--limit", "1"], "not a team policy"),
        (["set", "--team", "t", "--policy", "nope", "--limit", "1"], "not a team policy"),
        (["set", "--team", "t", "--policy", "team-monthly", "--rate", "3"], "is a quota"),
        (["reset", "--team", "t", "--policy", "nope"], "no policy 'nope'"),
    ],
)
async def test_mistakes_are_one_clear_line(config_file, capsys, argv, message):
    code, _, err = await cli(capsys, "quota", argv[0], "--config", config_file, *argv[1:])
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_quota_needs_redis(tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text("{}\n")
    code, _, err = await cli(capsys, "quota", "show", "--config", str(path), "--team", "t")
    assert code == 1 and "redis.url is not set" in err
