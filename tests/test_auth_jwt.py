"""JWT verification: the attacks it must refuse, the API's own token shapes, JWKS caching, the verified cache.

Time is a fake clock; the JWKS is a real aiohttp server on a loopback port that counts every request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import structlog
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt_keys import (
    HMAC_SECRET,
    b64,
    ec_key,
    ed_key,
    hmac_signer,
    mint,
    raw_token,
    rsa_key,
)

from gateway.auth import jwt_verifier
from gateway.auth.identity import Identity, InvalidCredential, VerifierUnavailable
from gateway.auth.jwt_verifier import JwtVerifier, NoMatchingKey
from gateway.config import JwtConfig

NOW = 1_800_000_000.0
SECRET_ENV = "JWT_TEST_SECRET"
HS = {"algorithms": ["HS256"], "secret_env": SECRET_ENV}
API = {"expiry_claim": "expire"}
DROP = object()


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingServer:
    """Answers every path; `mode` switches it between a good JWKS and the ways an endpoint goes wrong."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.mode = "ok"
        self.paths: list[str] = []
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)

    @property
    def requests(self) -> int:
        return len(self.paths)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/jwks"

    async def stop(self) -> None:
        self._release.set()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path_qs)
        if self.mode == "fail":
            return web.Response(status=500, text="internal secret stack trace")
        if self.mode == "hang":
            await self._release.wait()
        if self.mode == "garbage":
            return web.Response(body=b"<html>not a key set</html>", content_type="text/html")
        if self.mode == "no_keys":
            return web.json_response({"keys": []})
        if self.mode == "redirect" and request.path == "/jwks":  # the keys are one hop away: not followed
            return web.Response(status=302, headers={"Location": "/moved"})
        if self.mode == "huge":
            response = web.StreamResponse()  # chunked: no Content-Length to refuse it early
            response.content_type = "application/json"
            await response.prepare(request)
            # A valid key set, padded past the size cap: only the cap refuses it.
            await response.write(json.dumps({"keys": self.keys}).encode()[:-1])
            for _ in range(20):
                await response.write(b" " * 65536)
            await response.write(b"}")
            return response
        if self.mode == "slow":
            await asyncio.sleep(0.05)
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def jwks_server() -> AsyncIterator[CountingServer]:
    server = CountingServer()
    server.keys = [rsa_key().jwk("k1", "RS256")]
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def other_server() -> AsyncIterator[CountingServer]:
    server = CountingServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pems")
    out = {}
    for name, pair in {"rsa": rsa_key(), "rsa_b": rsa_key("b"), "ec": ec_key(), "ed": ed_key()}.items():
        path = folder / f"{name}.pem"
        path.write_bytes(pair.public_pem)
        out[name] = str(path)
    return out


MakeVerifier = Callable[..., JwtVerifier]


@pytest.fixture
def make_verifier(session: aiohttp.ClientSession, clock: FakeClock) -> MakeVerifier:
    def make(*keys: dict[str, Any], secrets: dict[str, str] | None = None, **settings: Any) -> JwtVerifier:
        settings.setdefault("jwks", {"fetch_timeout": 0.3})
        config = JwtConfig.model_validate({"keys": list(keys), **settings})
        env = {SECRET_ENV: HMAC_SECRET} if secrets is None else secrets
        return JwtVerifier(config, session, clock=clock, jwks_clock=clock, secrets=env)

    return make


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"exp": int(NOW) + 3600, "iat": int(NOW) - 10, "sub": "user-1"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def api_time(when: float) -> str:
    """The API's timestamp format: UTC, no zone, microseconds."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def pem_key(path: str, *algorithms: str, **extra: Any) -> dict[str, Any]:
    return {"algorithms": list(algorithms), "public_key_file": path, **extra}


def jwks_key(url: str, *algorithms: str, **extra: Any) -> dict[str, Any]:
    return {"algorithms": list(algorithms), "jwks_url": url, **extra}


async def rejected(verifier: JwtVerifier, token: str, check: str) -> InvalidCredential:
    with pytest.raises(InvalidCredential) as info:
        await verifier.verify(token)
    exc = info.value
    assert exc.check == check
    shown = f"{exc} {exc!r} {exc.args}"
    assert token not in shown
    assert not any(len(part) >= 8 and part in shown for part in token.split("."))
    return exc


# --- the API's own tokens ---


async def test_api_agent_token_maps_to_identity(make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(HS, **API)
    agent_id, customer_id = str(uuid.uuid4()), str(uuid.uuid4())
    token = mint(
        {
            "type": "agent",
            "agent": {"id": agent_id, "customer_id": customer_id},
            "expire": api_time(NOW + 7 * 86400),
        },
        HMAC_SECRET,
        "HS256",
    )
    identity = await verifier.verify(token)
    assert identity == Identity(
        credential_type="agent",
        customer_id=customer_id,
        credential_id=agent_id,
        expires_at=NOW + 7 * 86400,
        claims=identity.claims,
    )
    assert identity.claims["agent"]["customer_id"] == customer_id


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("direct", {}), ("delegate", {"aud": "voipbin-api"})],
)
async def test_api_direct_and_delegate_tokens(
    make_verifier: MakeVerifier, kind: str, extra: dict[str, Any]
) -> None:
    verifier = make_verifier(HS, **API)
    token = mint(
        {"type": kind, "customer_id": "cust-9", "expire": api_time(NOW + 4 * 3600), **extra},
        HMAC_SECRET,
        "HS256",
    )
    identity = await verifier.verify(token)
    assert (identity.credential_type, identity.customer_id) == (kind, "cust-9")


@pytest.mark.parametrize(
    "expire",
    [
        api_time(NOW + 3600),
        "2027-01-15T09:00:00Z",
        "2027-01-15T09:00:00+00:00",
        "2027-01-15T18:00:00+09:00",
        "2027-01-15 09:00:00",
        NOW + 3600,
        int(NOW) + 3600,
    ],
)
async def test_expire_claim_formats(make_verifier: MakeVerifier, expire: Any) -> None:
    assert datetime.fromtimestamp(NOW, UTC).isoformat() == "2027-01-15T08:00:00+00:00"
    verifier = make_verifier(HS, **API)
    identity = await verifier.verify(mint({"type": "direct", "expire": expire}, HMAC_SECRET, "HS256"))
    assert identity.expires_at == NOW + 3600


async def test_expire_without_zone_is_utc_whatever_the_local_zone(
    make_verifier: MakeVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        verifier = make_verifier(HS, **API)
        token = mint({"type": "agent", "expire": "2027-01-15 09:00:00.000000"}, HMAC_SECRET, "HS256")
        assert (await verifier.verify(token)).expires_at == NOW + 3600
    finally:
        monkeypatch.undo()
        time.tzset()


async def test_expire_claim_is_utc_and_leeway_applies(make_verifier: MakeVerifier, clock: FakeClock) -> None:
    verifier = make_verifier(HS, leeway=30, cache_size=0, **API)
    token = mint({"type": "agent", "expire": api_time(NOW)}, HMAC_SECRET, "HS256")
    clock.now = NOW + 29.9
    assert (await verifier.verify(token)).expires_at == NOW
    clock.now = NOW + 30
    await rejected(verifier, token, "expired")


@pytest.mark.parametrize(
    ("expire", "check"),
    [
        ("next tuesday", "claim_types"),
        ({"at": 1}, "claim_types"),
        (True, "claim_types"),
        (DROP, "missing_expiry"),
    ],
)
async def test_bad_or_missing_expire_claim(make_verifier: MakeVerifier, expire: Any, check: str) -> None:
    verifier = make_verifier(HS, **API)
    await rejected(verifier, mint(claims(exp=DROP, expire=expire), HMAC_SECRET, "HS256"), check)


async def test_expire_configured_and_standard_exp_also_honoured(make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(HS, **API)
    token = mint(claims(exp=int(NOW) - 3600, expire=api_time(NOW + 3600)), HMAC_SECRET, "HS256")
    await rejected(verifier, token, "expired")


# --- algorithm and key confusion ---


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_alg_none_rejected(make_verifier: MakeVerifier, alg: str) -> None:
    verifier = make_verifier(HS)
    await rejected(
        verifier, raw_token({"alg": alg, "typ": "JWT"}, claims(), b"not-a-signature"), "alg_not_allowed"
    )


async def test_empty_signature_rejected(make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(HS)
    for header in ({"alg": "none"}, {"alg": "HS256"}):
        await rejected(verifier, raw_token(header, claims()), "empty_signature")


async def test_hs256_signed_with_the_rsa_public_pem_is_refused(
    make_verifier: MakeVerifier, pems: dict[str, str]
) -> None:
    forged = raw_token({"alg": "HS256", "typ": "JWT"}, claims(), hmac_signer(rsa_key().public_pem))
    await rejected(make_verifier(pem_key(pems["rsa"], "RS256")), forged, "no_matching_key")
    # With an HS256 secret configured as well, the forgery meets the secret, never the public key.
    await rejected(make_verifier(pem_key(pems["rsa"], "RS256"), HS), forged, "bad_signature")


async def test_public_key_as_hmac_secret_refused_at_construction(make_verifier: MakeVerifier) -> None:
    pem = rsa_key().public_pem.decode()
    with pytest.raises(ValueError, match=r"keys\[0\].*cannot verify HS256") as info:
        make_verifier(HS, secrets={SECRET_ENV: pem})
    assert "BEGIN" not in str(info.value)


async def test_hs512_refused_when_only_hs256_allowed(make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(HS)
    exc = await rejected(verifier, mint(claims(), HMAC_SECRET, "HS512"), "no_matching_key")
    assert isinstance(exc, NoMatchingKey)


async def test_unknown_algorithm_rejected(make_verifier: MakeVerifier) -> None:
    for alg in ("HS1", "ES256K", ["HS256"], {"a": 1}):
        await rejected(make_verifier(HS), raw_token({"alg": alg}, claims(), b"sig"), "alg_not_allowed")


@pytest.mark.parametrize("signer", ["hs256", "rs256", "es256", "eddsa"])
async def test_edited_payload_keeps_old_signature(
    make_verifier: MakeVerifier, pems: dict[str, str], signer: str
) -> None:
    key, alg, config = {
        "hs256": (HMAC_SECRET, "HS256", HS),
        "rs256": (rsa_key(), "RS256", pem_key(pems["rsa"], "RS256")),
        "es256": (ec_key(), "ES256", pem_key(pems["ec"], "ES256")),
        "eddsa": (ed_key(), "EdDSA", pem_key(pems["ed"], "EdDSA")),
    }[signer]
    verifier = make_verifier(config)
    token = mint(claims(customer_id="mine"), key, alg)
    assert (await verifier.verify(token)).customer_id == "mine"
    header, _, signature = token.split(".")
    edited = f"{header}.{b64(json.dumps(claims(customer_id='yours')).encode())}.{signature}"
    await rejected(verifier, edited, "bad_signature")


async def test_each_key_verifies_only_its_algorithms(
    make_verifier: MakeVerifier, pems: dict[str, str]
) -> None:
    verifier = make_verifier(
        pem_key(pems["rsa"], "RS256", "PS256"), pem_key(pems["ec"], "ES256"), pem_key(pems["ed"], "EdDSA")
    )
    for key, alg in ((rsa_key(), "RS256"), (rsa_key(), "PS256"), (ec_key(), "ES256"), (ed_key(), "EdDSA")):
        assert (await verifier.verify(mint(claims(jti=alg), key, alg))).credential_id == alg
    await rejected(verifier, mint(claims(), rsa_key(), "RS512"), "no_matching_key")


async def test_public_key_of_the_wrong_kind_refused_at_construction(
    make_verifier: MakeVerifier, pems: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="cannot verify RS256"):
        make_verifier(pem_key(pems["ec"], "RS256"))
    with pytest.raises(ValueError, match="cannot verify ES384"):
        make_verifier(pem_key(pems["ec"], "ES384"))  # a P-256 key on a P-384 algorithm


async def test_several_keys_for_one_alg_are_all_tried(
    make_verifier: MakeVerifier, pems: dict[str, str]
) -> None:
    verifier = make_verifier(pem_key(pems["rsa"], "RS256"), pem_key(pems["rsa_b"], "RS256"))
    assert await verifier.verify(mint(claims(), rsa_key("b"), "RS256"))


async def test_configured_kid_must_match(make_verifier: MakeVerifier, pems: dict[str, str]) -> None:
    verifier = make_verifier(pem_key(pems["rsa"], "RS256", kid="main"))
    assert await verifier.verify(mint(claims(), rsa_key(), "RS256", kid="main"))
    await rejected(verifier, mint(claims(), rsa_key(), "RS256", kid="other"), "no_matching_key")
    await rejected(verifier, mint(claims(), rsa_key(), "RS256"), "no_matching_key")


async def test_no_keys_at_all_is_no_matching_key(make_verifier: MakeVerifier) -> None:
    await rejected(make_verifier(), mint(claims(), HMAC_SECRET, "HS256"), "no_matching_key")


# --- header attacks ---


@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["http://example.com/ext"], "exp", []])
async def test_any_crit_header_rejected(make_verifier: MakeVerifier, crit: Any) -> None:
    token = mint(claims(), HMAC_SECRET, "HS256", crit=crit, exp=1)
    await rejected(make_verifier(HS), token, "unsupported_crit")


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_key_carrying_headers_rejected_and_never_fetched(
    make_verifier: MakeVerifier, jwks_server: CountingServer, other_server: CountingServer, header: str
) -> None:
    attacker = rsa_key("attacker")
    value: Any = {
        "jku": other_server.url,
        "x5u": other_server.url.replace("/jwks", "/cert.pem"),
        "jwk": attacker.jwk("k1", "RS256"),
        "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
    }[header]
    other_server.keys = [attacker.jwk("k1", "RS256")]
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256"))
    await rejected(
        verifier, mint(claims(), attacker, "RS256", kid="k1", **{header: value}), "forbidden_header"
    )
    assert (jwks_server.requests, other_server.requests) == (0, 0)


async def test_path_traversal_kid_is_just_an_unknown_key(
    make_verifier: MakeVerifier, jwks_server: CountingServer
) -> None:
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256"))
    await rejected(verifier, mint(claims(), rsa_key(), "RS256", kid="../../etc/passwd"), "no_matching_key")
    assert set(jwks_server.paths) == {"/jwks"}
    assert jwks_server.requests <= 2


async def test_oversized_kid(make_verifier: MakeVerifier) -> None:
    # Within auth.max_credential_bytes a kid can still be far longer than any key id.
    token = mint(claims(), HMAC_SECRET, "HS256", kid="k" * 5_000)
    await rejected(make_verifier(HS), token, "kid_too_long")


async def test_kid_must_be_text(make_verifier: MakeVerifier) -> None:
    for kid in (None, 7, ["k1"]):
        await rejected(
            make_verifier(HS), raw_token({"alg": "HS256", "kid": kid}, claims(), b"s" * 32), "malformed"
        )


async def test_random_kids_do_not_hammer_the_jwks(
    make_verifier: MakeVerifier, jwks_server: CountingServer, clock: FakeClock
) -> None:
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256"))
    for i in range(1000):
        clock.now = NOW + i / 1000  # 1000 tokens within one simulated second
        token = raw_token({"alg": "RS256", "kid": uuid.uuid4().hex}, claims(), b"s" * 256)
        await rejected(verifier, token, "no_matching_key")
    assert jwks_server.requests <= 2
    before = jwks_server.requests
    clock.now = NOW + 31  # past refetch_interval: one more fetch for the next unknown kid, then quiet again
    for _ in range(100):
        await rejected(
            verifier, raw_token({"alg": "RS256", "kid": uuid.uuid4().hex}, claims(), b"s"), "no_matching_key"
        )
    assert jwks_server.requests == before + 1


# --- malformed input ---


@pytest.mark.parametrize(
    "token",
    [
        "." * 50_000,
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        "eyJhbGciOiJIUzI1NiJ9.e30.c2ln\u00e9",
        "eyJhbGciOiJIUzI1NiJ9.e30.\udcff",
        "eyJhbGciOiJIUzI1NiJ9.e30.c2ln!!",
        "eyJhbGciOiJIUzI1NiJ9.e30.c2ln c2ln",
        "eyJhbGciOiJIUzI1NiJ9..c2ln",
        "bm90IGpzb24.e30.c2ln",
        b64(b"[1, 2]") + ".e30.c2ln",
        b64(b'"HS256"') + ".e30.c2ln",
        b64(b"[" * 10_000) + ".e30.c2ln",
        "A.e30.c2ln",
    ],
    ids=lambda token: ascii(token[:30]),
)
async def test_malformed_tokens(make_verifier: MakeVerifier, token: str) -> None:
    await rejected(make_verifier(HS), token, "malformed")


async def test_signed_payload_that_is_not_a_json_object(make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(HS)
    for payload in (b"not json", b"[1,2,3]", b'"text"', b"\xff\xfe"):
        await rejected(verifier, raw_token({"alg": "HS256"}, payload, hmac_signer(HMAC_SECRET)), "malformed")


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"exp": str(int(NOW) + 3600)}, "claim_types"),  # PyJWT's own check would take int("1800003600")
        ({"exp": True}, "claim_types"),
        ({"exp": None}, "claim_types"),
        ({"exp": float("nan")}, "claim_types"),  # NaN compares false with everything: "never expires"
        ({"exp": float("inf")}, "claim_types"),
        ({"exp": 10**400}, "claim_types"),
        ({"nbf": "0"}, "claim_types"),
        ({"iat": [1]}, "claim_types"),
        ({"customer_id": {"id": "c-1"}}, "claim_types"),
        ({"agent": {"customer_id": ["c-1"]}, "customer_id": "c-2"}, "claim_types"),
        ({"type": {"agent": True}}, "claim_types"),
        ({"jti": 1.5}, "claim_types"),
        ({"sub": 12}, "claim_types"),
    ],
)
async def test_claims_of_the_wrong_type(
    make_verifier: MakeVerifier, changes: dict[str, Any], check: str
) -> None:
    token = raw_token({"alg": "HS256"}, json.dumps(claims(**changes)).encode(), hmac_signer(HMAC_SECRET))
    await rejected(make_verifier(HS), token, check)


@given(
    token=st.text(max_size=300)
    | st.from_regex(r"[A-Za-z0-9_=-]{0,40}(\.[A-Za-z0-9_=-]{0,40}){0,4}", fullmatch=True)
)
@settings(max_examples=200, deadline=None)
async def test_arbitrary_text_is_only_ever_invalid(token: str) -> None:
    verifier = _offline_verifier()
    try:
        await verifier.verify(token)
    except InvalidCredential as exc:
        assert len(token) < 8 or token not in str(exc)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_claim_names = st.sampled_from(
    ["exp", "nbf", "iat", "iss", "aud", "sub", "jti", "type", "agent", "customer_id", "expire"]
)


@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "b64", "cty", "zip"]), _json, max_size=3),
    payload=st.dictionaries(_claim_names | st.text(max_size=8), _json, max_size=6),
    strict=st.booleans(),
)
@settings(max_examples=200, deadline=None)
async def test_validly_signed_garbage_claims_are_only_ever_invalid(
    header: dict[str, Any], payload: dict[str, Any], strict: bool
) -> None:
    header.setdefault("alg", "HS256")
    token = raw_token(header, payload, hmac_signer(HMAC_SECRET))
    verifier = (
        _offline_verifier(issuer="https://issuer.example", audience=["gw"], max_age=60, **API)
        if strict
        else _offline_verifier(**API)
    )
    try:
        identity = await verifier.verify(token)
    except InvalidCredential:
        return
    assert isinstance(identity, Identity)


def _offline_verifier(**settings: Any) -> JwtVerifier:
    # No JWKS key, so the session is never used.
    config = JwtConfig.model_validate({"keys": [HS], **settings})
    return JwtVerifier(
        config, cast(aiohttp.ClientSession, None), clock=FakeClock(), secrets={SECRET_ENV: HMAC_SECRET}
    )


# --- time ---


@pytest.mark.parametrize(
    ("changes", "now", "check"),
    [
        ({"exp": int(NOW) - 31}, NOW, "expired"),
        ({"exp": int(NOW) - 30}, NOW, "expired"),
        ({"exp": int(NOW) - 29}, NOW, None),
        ({"exp": int(NOW)}, NOW + 29.999, None),
        ({"nbf": int(NOW) + 31}, NOW, "not_yet_valid"),
        ({"nbf": int(NOW) + 30}, NOW, None),
        ({"iat": int(NOW) + 31}, NOW, "not_yet_valid"),
        ({"iat": int(NOW) + 30}, NOW, None),
        ({"exp": DROP}, NOW, "missing_expiry"),
    ],
)
async def test_time_claims_with_leeway(
    make_verifier: MakeVerifier, clock: FakeClock, changes: dict[str, Any], now: float, check: str | None
) -> None:
    verifier = make_verifier(HS, leeway=30)
    clock.now = now
    token = mint(claims(**changes), HMAC_SECRET, "HS256")
    if check is None:
        assert await verifier.verify(token)
    else:
        await rejected(verifier, token, check)


async def test_expiry_optional_when_not_required(make_verifier: MakeVerifier) -> None:
    identity = await make_verifier(HS, require_expiry=False).verify(
        mint(claims(exp=DROP), HMAC_SECRET, "HS256")
    )
    assert identity.expires_at is None


async def test_max_age(make_verifier: MakeVerifier, clock: FakeClock) -> None:
    verifier = make_verifier(HS, max_age=60, cache_size=0)
    token = mint(claims(iat=int(NOW)), HMAC_SECRET, "HS256")
    clock.now = NOW + 60
    assert (await verifier.verify(token)).expires_at == NOW + 60
    clock.now = NOW + 60.5
    await rejected(verifier, token, "too_old")
    await rejected(verifier, mint(claims(iat=DROP), HMAC_SECRET, "HS256"), "missing_iat")


# --- issuer and audience ---


ISSUER = "https://issuer.example"


@pytest.mark.parametrize(
    "iss",
    [
        "https://issuer.example.evil",
        "https://issuer.example/",
        "evil.https://issuer.example",
        "https://issuer.exam",
        "HTTPS://ISSUER.EXAMPLE",
        "",
        [ISSUER],
        {"iss": ISSUER},
        DROP,
    ],
)
async def test_issuer_must_match_exactly(make_verifier: MakeVerifier, iss: Any) -> None:
    verifier = make_verifier(HS, issuer=ISSUER)
    assert await verifier.verify(mint(claims(iss=ISSUER), HMAC_SECRET, "HS256"))
    token = raw_token({"alg": "HS256"}, claims(iss=iss), hmac_signer(HMAC_SECRET))
    await rejected(verifier, token, "issuer")


@pytest.mark.parametrize(
    "aud", ["other", "gatewayx", "gat", ["other"], [], {"aud": "gateway"}, [["gateway"]], DROP]
)
async def test_wrong_audience(make_verifier: MakeVerifier, aud: Any) -> None:
    verifier = make_verifier(HS, audience=["gateway", "admin"])
    token = raw_token({"alg": "HS256"}, claims(aud=aud), hmac_signer(HMAC_SECRET))
    await rejected(verifier, token, "audience")


@pytest.mark.parametrize("aud", ["gateway", ["other", "admin"]])
async def test_right_audience(make_verifier: MakeVerifier, aud: Any) -> None:
    verifier = make_verifier(HS, audience=["gateway", "admin"])
    assert await verifier.verify(mint(claims(aud=aud), HMAC_SECRET, "HS256"))


# --- JWKS ---


async def test_jwks_key_types_and_jwks_without_alg(
    make_verifier: MakeVerifier, jwks_server: CountingServer
) -> None:
    jwks_server.keys = [
        rsa_key().jwk("rsa"),  # no alg: PyJWT alone would bind it to RS256 and refuse PS256
        ec_key().jwk("ec", "ES256"),
        ed_key().jwk("ed", "EdDSA"),
    ]
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256", "PS256", "ES256", "EdDSA"))
    for key, alg, kid in (
        (rsa_key(), "RS256", "rsa"),
        (rsa_key(), "PS256", "rsa"),
        (ec_key(), "ES256", "ec"),
        (ed_key(), "EdDSA", "ed"),
    ):
        assert (await verifier.verify(mint(claims(jti=alg), key, alg, kid=kid))).credential_id == alg
    assert jwks_server.requests == 1


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # signing with the weak key
async def test_jwks_unusable_keys_are_skipped_not_fatal(
    make_verifier: MakeVerifier, jwks_server: CountingServer
) -> None:
    private = rsa_key("priv")
    from jwt.algorithms import RSAAlgorithm

    jwks_server.keys = [
        "junk",
        {"kty": "XYZ", "kid": "odd"},
        {"kty": "oct", "kid": "sym", "k": b64(HMAC_SECRET.encode()), "alg": "HS256"},
        {**RSAAlgorithm.to_jwk(private.private, as_dict=True), "kid": "priv"},
        rsa_key("enc").jwk("enc", "RS256", use="enc"),
        rsa_key("weak", 1024).jwk("weak", "RS256"),
        ec_key().jwk("p256-as-es384", "ES384"),
        rsa_key().jwk("k1", "RS256"),
    ]
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256", "ES384"))
    assert await verifier.verify(mint(claims(), rsa_key(), "RS256", kid="k1"))
    await rejected(verifier, mint(claims(), HMAC_SECRET, "HS256", kid="sym"), "no_matching_key")
    for pair, kid in ((private, "priv"), (rsa_key("enc"), "enc"), (rsa_key("weak", 1024), "weak")):
        await rejected(verifier, mint(claims(), pair, "RS256", kid=kid), "no_matching_key")


async def test_jwks_rotation_one_refetch(
    make_verifier: MakeVerifier, jwks_server: CountingServer, clock: FakeClock
) -> None:
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256"))
    assert await verifier.verify(mint(claims(), rsa_key(), "RS256", kid="k1"))
    assert jwks_server.requests == 1
    jwks_server.keys = [rsa_key().jwk("k1", "RS256"), rsa_key("b").jwk("k2", "RS256")]
    clock.advance(30)
    assert await verifier.verify(mint(claims(), rsa_key("b"), "RS256", kid="k2"))
    assert await verifier.verify(mint(claims(jti="again"), rsa_key("b"), "RS256", kid="k2"))
    assert jwks_server.requests == 2


async def test_jwks_down_keeps_cached_keys(
    make_verifier: MakeVerifier, jwks_server: CountingServer, clock: FakeClock
) -> None:
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256"))
    assert await verifier.verify(mint(claims(jti="1"), rsa_key(), "RS256", kid="k1"))
    for mode in ("fail", "garbage", "no_keys", "huge", "hang"):
        jwks_server.mode = mode
        clock.advance(301)  # past cache_ttl: the next token triggers a fetch, which fails
        with structlog.testing.capture_logs() as logs:
            assert await verifier.verify(mint(claims(jti=mode), rsa_key(), "RS256", kid="k1"))
        assert [(e["event"], e["url"]) for e in logs] == [("jwks_fetch_failed", jwks_server.url)]
        assert "secret" not in str(logs) and "html" not in str(logs)
    count = jwks_server.requests
    assert await verifier.verify(mint(claims(jti="soon after"), rsa_key(), "RS256", kid="k1"))
    assert jwks_server.requests == count  # failures are retried once a second, not per request


@pytest.mark.parametrize("mode", ["fail", "garbage", "no_keys", "huge", "hang", "redirect"])
async def test_jwks_down_with_nothing_cached_is_unavailable(
    make_verifier: MakeVerifier, jwks_server: CountingServer, clock: FakeClock, mode: str
) -> None:
    jwks_server.mode = mode
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256"))
    token = mint(claims(), rsa_key(), "RS256", kid="k1")
    with pytest.raises(VerifierUnavailable) as info:
        await verifier.verify(token)
    assert info.value.what == "jwks"
    jwks_server.mode = "ok"
    clock.advance(1)
    assert await verifier.verify(token)


async def test_jwks_one_fetch_for_concurrent_callers(
    make_verifier: MakeVerifier, jwks_server: CountingServer
) -> None:
    jwks_server.mode = "slow"
    verifier = make_verifier(jwks_key(jwks_server.url, "RS256"))
    tokens = [mint(claims(jti=str(i)), rsa_key(), "RS256", kid="k1") for i in range(20)]
    identities = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert len(identities) == 20
    assert jwks_server.requests == 1


# --- the verified-token cache ---


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = jwt_verifier._decoder.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt_verifier._decoder, "decode", counting)
    return calls


async def test_cache_hit_skips_verification_until_expiry(
    make_verifier: MakeVerifier, clock: FakeClock, decodes: list[int]
) -> None:
    verifier = make_verifier(HS, leeway=30)
    token = mint(claims(exp=int(NOW) + 100), HMAC_SECRET, "HS256")
    first = await verifier.verify(token)
    clock.now = NOW + 129.9
    assert await verifier.verify(token) is first
    assert len(decodes) == 1
    clock.now = NOW + 130
    await rejected(verifier, token, "expired")
    assert len(decodes) == 2


async def test_cache_entries_are_rechecked_after_a_bound(
    make_verifier: MakeVerifier, clock: FakeClock, decodes: list[int]
) -> None:
    verifier = make_verifier(HS, require_expiry=False)
    for token in (mint(claims(), HMAC_SECRET, "HS256"), mint(claims(exp=DROP), HMAC_SECRET, "HS256")):
        decodes.clear()
        clock.now = NOW
        await verifier.verify(token)
        clock.now = NOW + 299
        await verifier.verify(token)
        assert len(decodes) == 1
        clock.now = NOW + 300
        await verifier.verify(token)
        assert len(decodes) == 2


async def test_failures_are_not_cached_and_cache_can_be_disabled(
    make_verifier: MakeVerifier, decodes: list[int]
) -> None:
    bad = mint(claims(), "another-secret-of-enough-length-000", "HS256")
    verifier = make_verifier(HS)
    for _ in range(3):
        await rejected(verifier, bad, "bad_signature")
    assert len(decodes) == 3
    decodes.clear()
    good = mint(claims(), HMAC_SECRET, "HS256")
    uncached = make_verifier(HS, cache_size=0)
    for _ in range(3):
        await uncached.verify(good)
    assert len(decodes) == 3


# --- configuration errors ---


async def test_missing_secret_env(make_verifier: MakeVerifier) -> None:
    with pytest.raises(ValueError, match=rf"keys\[0\]\.secret_env: .*{SECRET_ENV}"):
        make_verifier(HS, secrets={})


async def test_secret_file(make_verifier: MakeVerifier, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(HMAC_SECRET + "\n")
    verifier = make_verifier({"algorithms": ["HS256"], "secret_file": str(path)})
    assert await verifier.verify(mint(claims(), HMAC_SECRET, "HS256"))
    with pytest.raises(ValueError, match=r"keys\[0\]\.secret_file: cannot read") as info:
        make_verifier({"algorithms": ["HS256"], "secret_file": str(tmp_path / "missing")})
    assert HMAC_SECRET not in str(info.value)


async def test_public_key_file_errors(make_verifier: MakeVerifier, tmp_path: Path) -> None:
    garbage = tmp_path / "key.pem"
    garbage.write_text("not a key")
    with pytest.raises(ValueError, match=r"keys\[0\]\.public_key_file: .* is not a PEM public key"):
        make_verifier(pem_key(str(garbage), "RS256"))
    with pytest.raises(ValueError, match=r"keys\[0\]\.public_key_file: cannot read"):
        make_verifier(pem_key(str(tmp_path / "missing.pem"), "RS256"))


# --- one spelling per token (RFC 7515 §2: base64url without padding) ---

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _same_bytes_other_spelling(segment: str) -> str:
    """The segment with its last character's unused low bits set: it decodes to the same bytes."""
    unused = {2: 15, 3: 3}[len(segment) % 4]
    last = _ALPHABET.index(segment[-1])
    return segment[:-1] + _ALPHABET[last | unused]


@pytest.mark.parametrize("alg", ["HS256", "RS256"])
async def test_a_token_is_accepted_in_its_canonical_spelling_only(
    make_verifier: MakeVerifier, pems: dict[str, str], alg: str
) -> None:
    if alg == "HS256":
        verifier, token = make_verifier(HS), mint(claims(), HMAC_SECRET, alg)
    else:
        verifier, token = make_verifier(pem_key(pems["rsa"], alg)), mint(claims(), rsa_key(), alg)
    assert (await verifier.verify(token)).credential_id == "user-1"
    head, body, signature = token.split(".")
    assert len(signature) % 4 in (2, 3)  # both algorithms leave unused bits in the last character
    respelt = [
        token + "=",
        token + "==",
        f"{head}.{body}.{signature}=",
        f"{head}==.{body}.{signature}",
        f"{head}.{body}.{_same_bytes_other_spelling(signature)}",
    ]
    for other in respelt:
        await rejected(verifier, other, "malformed")
    assert (await verifier.verify(token)).credential_id == "user-1"  # the cache still has the real one
