"""`voipbin-gateway keys ...` run in-process against a real redis-server, plus one real `python -m` run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml
from redis_server import free_port

from gateway.auth.access_keys import key_hash, well_formed
from gateway.auth.identity import Identity, InvalidCredential
from gateway.auth.key_stores import AccessKeyVerifier, FileKeyStore, KeyStore, RedisKeyStore
from gateway.keys_cli import main
from gateway.redis_client import connect

PEPPER_ENV = "GW_TEST_KEYS_PEPPER"
PEPPER = "cli-pepper"
ENVIRON = {PEPPER_ENV: PEPPER}
ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, redis_url: str | None) -> Path:
    raw: dict = {"auth": {"access_keys": {"pepper_env": PEPPER_ENV, "file": str(path.parent / "keys.yaml")}}}
    if redis_url is not None:
        raw["redis"] = {"url": redis_url}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path, redis_url: str) -> str:
    return str(write_config(tmp_path / "gateway.yaml", redis_url))


def cli(
    capsys: pytest.CaptureFixture[str], *argv: str, environ: dict[str, str] = ENVIRON
) -> tuple[int, str, str]:
    code = main(["keys", *argv], environ)
    out, err = capsys.readouterr()
    return code, out, err


def printed(out: str, label: str) -> str:
    values = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"{label}: ")]
    assert len(values) == 1, out
    return values[0]


def verify(key: str, *stores_from: str | Path) -> Identity:
    """A fresh verifier (no cache) over the Redis URL and/or keys files given."""

    async def run() -> Identity:
        clients = [connect(str(s)) for s in stores_from if str(s).startswith("redis://")]
        stores: list[KeyStore] = [RedisKeyStore(c, None) for c in clients]
        stores += [FileKeyStore(s) for s in stores_from if not str(s).startswith("redis://")]
        try:
            return await AccessKeyVerifier(stores, "vbgw_", 30, 0, pepper=PEPPER.encode()).verify(key)
        finally:
            for client in clients:
                await client.aclose()

    return asyncio.run(run())


def test_create_prints_the_key_once_and_stores_only_its_hash(
    capsys: pytest.CaptureFixture[str], config: str, redis_url: str
) -> None:
    code, out, err = cli(capsys, "create", "--config", config, "--customer", "c1", "--team", "t1",
                         "--name", "ci", "--expires", "30d")  # fmt: skip
    assert code == 0, err
    key = printed(out, "key")
    assert well_formed(key, "vbgw_")
    assert out.count(key) == 1 and key not in err
    key_id = printed(out, "id")
    assert printed(out, "expires").endswith("Z")

    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        stored = sync.hgetall(f"gw:ak:{{gw}}:h:{key_hash(key, PEPPER.encode())}")
    finally:
        sync.close()
    assert stored["id"] == key_id and stored["customer_id"] == "c1" and stored["team_id"] == "t1"
    assert float(stored["expires_at"]) - float(stored["created_at"]) == 30 * 86400

    identity = verify(key, redis_url)
    assert (identity.customer_id, identity.team_id, identity.credential_id) == ("c1", "t1", key_id)


def test_list_shows_keys_but_never_keys_or_hashes(capsys: pytest.CaptureFixture[str], config: str) -> None:
    made = []
    for customer, name in (("c1", "first key"), ("c2", None)):
        args = ["create", "--config", config, "--customer", customer] + (["--name", name] if name else [])
        code, out, _ = cli(capsys, *args)
        assert code == 0
        made.append((printed(out, "key"), printed(out, "id")))

    code, out, err = cli(capsys, "list", "--config", config)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "CUSTOMER", "TEAM", "NAME", "PLAN", "CREATED", "EXPIRES", "REVOKED"]
    assert len(lines) == 3
    for key, key_id in made:
        assert key not in out and key_hash(key, PEPPER.encode()) not in out
        assert any(line.startswith(key_id) for line in lines)
    assert "first key" in out and "never" in out
    assert "vbgw_" not in out


def test_revoke_then_verify_fails(capsys: pytest.CaptureFixture[str], config: str, redis_url: str) -> None:
    code, out, _ = cli(capsys, "create", "--config", config, "--customer", "c1")
    key, key_id = printed(out, "key"), printed(out, "id")
    assert verify(key, redis_url).customer_id == "c1"

    code, out, err = cli(capsys, "revoke", key_id, "--config", config)
    assert code == 0 and out.startswith(f"revoked {key_id} at ") and err == ""
    with pytest.raises(InvalidCredential, match="revoked"):
        verify(key, redis_url)

    code, out, _ = cli(capsys, "list", "--config", config)
    assert out.splitlines()[1].split()[-1].endswith("Z")  # the REVOKED column has a time

    code, out, err = cli(capsys, "revoke", key_id, "--config", config)
    assert code == 0  # idempotent
    code, out, err = cli(capsys, "revoke", "no-such-id", "--config", config)
    assert (code, out, err) == (1, "", "error: no key with id 'no-such-id'\n")


def test_hash_prints_a_keys_file_entry_that_verifies(
    capsys: pytest.CaptureFixture[str], config: str, tmp_path: Path, redis_url: str
) -> None:
    code, out, err = cli(capsys, "hash", "--config", config, "--customer", "123", "--team", "t9",
                         "--name", "file key", "--expires", "12h")  # fmt: skip
    assert code == 0, err
    key = printed(out, "key")
    assert well_formed(key, "vbgw_") and out.count(key) == 1
    entry_text = out.split("\n\n", 1)[1]
    assert key not in entry_text  # pasting the entry never pastes the key
    entries = yaml.safe_load(entry_text)
    assert entries[0]["customer_id"] == "123"  # still a string after the YAML round trip
    assert entries[0]["expires_at"] - entries[0]["created_at"] == 12 * 3600

    keys_path = tmp_path / "keys.yaml"
    keys_path.write_text("keys:\n" + entry_text, encoding="utf-8")
    identity = verify(key, keys_path)
    assert (identity.customer_id, identity.team_id, identity.credential_id) == (
        "123",
        "t9",
        printed(out, "id"),
    )

    with pytest.raises(InvalidCredential, match="unknown_key"):
        verify(key, redis_url)  # `hash` never writes to Redis


@pytest.mark.parametrize(
    ("argv", "redis_kind", "environ", "message"),
    [
        (["create", "--customer", "c"], "none", ENVIRON, "redis.url is not set"),
        (["list"], "none", ENVIRON, "redis.url is not set"),
        (["revoke", "x"], "none", ENVIRON, "redis.url is not set"),
        (["create", "--customer", "c"], "real", {}, f"environment variable {PEPPER_ENV} is not set"),
        (["hash", "--customer", "c"], "none", {}, f"environment variable {PEPPER_ENV} is not set"),
        (["create", "--customer", "c"], "down", ENVIRON, "Redis at redis://127.0.0.1:"),
        (["list"], "down", ENVIRON, "Connect"),
        (["revoke", "x"], "down", ENVIRON, "Redis at"),
        (
            ["create", "--customer", "c", "--expires", "2w"],
            "real",
            ENVIRON,
            "--expires: invalid duration '2w'",
        ),
        (["hash", "--customer", "c", "--expires", "0d"], "none", ENVIRON, "--expires: invalid duration"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    redis_url: str,
    argv: list[str],
    redis_kind: str,
    environ: dict[str, str],
    message: str,
) -> None:
    url = {"none": None, "real": redis_url, "down": f"redis://127.0.0.1:{free_port()}/0"}[redis_kind]
    config = write_config(tmp_path / "gateway.yaml", url)
    code, out, err = cli(capsys, *argv, "--config", str(config), environ=environ)
    assert code == 1
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert PEPPER not in err


def test_password_in_redis_url_is_not_printed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", f"redis://user:hunter2@127.0.0.1:{free_port()}/0")
    code, _, err = cli(capsys, "list", "--config", str(config))
    assert code == 1 and "hunter2" not in err and "redis://127.0.0.1:" in err


def test_runs_as_a_module(config: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.keys_cli", "keys", "create", "--config", config, "--customer", "c1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={PEPPER_ENV: PEPPER, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert well_formed(printed(done.stdout, "key"), "vbgw_")


async def test_a_keys_plan_picks_its_rate_limit_values_end_to_end(
    upstream,
    make_gateway,
    client,
    capsys: pytest.CaptureFixture[str],
    config: str,
    redis_url: str,
    monkeypatch,
) -> None:
    """`keys create --plan` stores the plan with the key in Redis; the gateway puts it on the identity, so
    the policy's `plans:` values apply, as for a token with a plan claim."""

    async def create(*extra: str) -> str:
        code, out, err = await asyncio.to_thread(cli, capsys, "create", "--config", config, *extra)
        assert code == 0, err
        return printed(out, "key")

    pro = await create("--customer", "c-pro", "--plan", "pro")
    plain = await create("--customer", "c-plain")
    code, out, _ = await asyncio.to_thread(cli, capsys, "list", "--config", config)
    assert code == 0 and out.splitlines()[0].split()[4] == "PLAN"
    assert sorted(line.split()[4] for line in out.splitlines()[1:]) == ["-", "pro"]

    monkeypatch.setenv(PEPPER_ENV, PEPPER)
    gw = await make_gateway(
        upstream.url,
        redis={"url": redis_url},
        auth={"access_keys": {"stores": ["redis"], "pepper_env": PEPPER_ENV}},
        rate_limit={
            "policies": {
                "cust": {
                    "key": ["customer"],
                    "rate": 1,
                    "period": 3600,
                    "burst": 1,
                    "plans": {"pro": {"burst": 3}},
                }
            }
        },
        routes=[{"name": "api", "prefix": "/", "rate_limit": ["cust"]}],
    )

    async def statuses(key: str, n: int) -> list[int]:
        out = []
        for _ in range(n):
            async with client.get(f"{gw.url}/echo/x", params={"accesskey": key}) as resp:
                out.append(resp.status)
        return out

    assert await statuses(pro, 4) == [200, 200, 200, 429]
    assert await statuses(plain, 2) == [200, 429]
