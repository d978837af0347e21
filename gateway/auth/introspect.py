"""Ask the upstream who a credential belongs to (by default `GET /v1.0/me`), for credentials the gateway
cannot verify itself: the real API's access keys and JWTs signed with a secret only the API holds.

The call goes to the upstream, so it uses the upstream's connection pool and its `upstream.tls_verify`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import orjson
import structlog
from cachetools import TLRUCache
from opentelemetry.trace import SpanKind
from yarl import URL

from gateway.auth.credentials import Credential
from gateway.auth.identity import (
    Identity,
    InvalidCredential,
    VerifierUnavailable,
    first_claim,
    identity_paths,
    numeric_date,
    unusable_identifier,
)
from gateway.config import ClaimMap, IntrospectConfig
from gateway.observability import spans
from gateway.proxy.upstream import send

log = structlog.get_logger("gateway.auth")

_MAX_ANSWER_BYTES = 256 * 1024
# What /me answers for a credential it does not accept (400 for one it cannot even parse). Any other
# failure (404 from a wrong path, a redirect, 429, 5xx) says nothing about the credential: unavailable.
_REFUSED = frozenset({400, 401, 403})
Answer = Identity | InvalidCredential


class Introspector:
    def __init__(
        self,
        config: IntrospectConfig,
        *,
        upstream_url: str,
        token_claims: ClaimMap,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = URL(config.url or upstream_url.rstrip("/") + config.path)
        self._config = config
        self._token_claims = token_claims
        self._answer_paths = identity_paths(config.claims)
        self._token_paths = identity_paths(token_claims)
        self._session = session
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._cache: TLRUCache[bytes, tuple[Answer, float]] = TLRUCache(
            maxsize=max(config.cache_size, 1), ttu=lambda _key, value, _now: value[1], timer=clock
        )
        self._in_flight: dict[bytes, asyncio.Task[Answer]] = {}

    async def introspect(self, credential: Credential, request_id: str) -> Identity:
        key = hashlib.sha256(f"{credential.kind}:{credential.value}".encode()).digest()
        cached = self._cache.get(key)
        if cached is not None:
            return _unwrap(cached[0])
        task = self._in_flight.get(key)
        if task is None:
            # One call per credential at a time, in its own task: a burst of requests with a new key costs
            # one round trip, and the first client hanging up does not fail the others.
            task = asyncio.create_task(self._ask_and_remember(key, credential, request_id))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return _unwrap(await asyncio.shield(task))

    def _finished(self, key: bytes, task: asyncio.Task[Answer]) -> None:
        self._in_flight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved even when every waiter left, so asyncio does not warn

    async def _ask_and_remember(self, key: bytes, credential: Credential, request_id: str) -> Answer:
        answer = await self._ask(credential, request_id)
        if self._config.cache_size:
            self._cache[key] = (answer, self._expiry(answer))
        return answer

    def _expiry(self, answer: Answer) -> float:
        now = self._clock()
        if isinstance(answer, InvalidCredential):
            return now + self._config.negative_ttl
        until = now + self._config.positive_ttl
        return min(until, answer.expires_at) if answer.expires_at is not None else until

    async def _ask(self, credential: Credential, request_id: str) -> Answer:
        headers = {"Accept": "application/json", "X-Request-ID": request_id}
        url = self._url
        if credential.kind == "jwt":
            headers["Authorization"] = f"Bearer {credential.value}"
        else:
            url = url.update_query(accesskey=credential.value)
        try:
            # A GET on the upstream's pool: sent again only if it met a pooled connection the upstream had
            # just closed (the caller is waiting). Redirects are not followed: the credential goes to the
            # configured endpoint and nowhere else.
            # url.path only: the access key travels in the query.
            with spans.span("introspection", SpanKind.CLIENT, spans.endpoint(str(self._url))) as span:
                resp = await send(
                    lambda: self._session.get(
                        url, headers=headers, timeout=self._timeout, allow_redirects=False
                    ),
                    retries=0,
                    idempotent=True,
                )
                if span is not None:
                    span.set_attribute("http.response.status_code", resp.status)
            async with resp:
                status = resp.status
                if status in _REFUSED:
                    return InvalidCredential("introspection_rejected")
                body = await _capped_body(resp) if 200 <= status < 300 else b""
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("introspection_failed", url=str(self._url), error=type(exc).__name__)
            raise VerifierUnavailable("introspection") from None
        answer = _json_object(body) if 200 <= status < 300 and len(body) <= _MAX_ANSWER_BYTES else None
        if answer is None:
            log.warning("introspection_failed", url=str(self._url), status=status)
            raise VerifierUnavailable("introspection")
        return self._identity(credential, answer)

    def _identity(self, credential: Credential, answer: dict[str, Any]) -> Identity:
        mapping, token_mapping = self._config.claims, self._token_claims
        token: dict[str, Any] = {}
        if credential.kind == "jwt":
            # The upstream accepted this token, so its claims are authentic even though the gateway cannot
            # check the signature: they tell the token's type (agent / direct / delegate) and expiry.
            try:
                token = jwt.decode(credential.value, options={"verify_signature": False})
            except jwt.PyJWTError:
                token = {}
        if unusable_identifier(answer, self._answer_paths) or unusable_identifier(token, self._token_paths):
            # An identifier that cannot become a header value (an object, a control character) makes the
            # answer unusable, like one that is not JSON; skipping it could drop the customer from limits.
            log.warning("introspection_failed", url=str(self._url), reason="identifier_types")
            raise VerifierUnavailable("introspection")
        claims = {**token, **answer}
        if self._config.answer_claim and self._config.answer_claim not in answer:
            claims[self._config.answer_claim] = answer
        return Identity(
            credential_type=first_claim(answer, mapping.credential_type)
            or first_claim(token, token_mapping.credential_type)
            or credential.kind,
            customer_id=first_claim(answer, mapping.customer_id)
            or first_claim(token, token_mapping.customer_id),
            team_id=first_claim(answer, mapping.team_id) or first_claim(token, token_mapping.team_id),
            credential_id=first_claim(answer, mapping.credential_id),
            plan=first_claim(answer, mapping.plan) or first_claim(token, token_mapping.plan),
            # The upstream has just accepted the credential and positive_ttl bounds how long that is
            # trusted; `exp` only ends the cached answer sooner. One that is no usable instant (a
            # 400-digit integer, NaN, text) therefore means no earlier end, rather than refusing a
            # credential the authority accepted.
            expires_at=numeric_date(token.get("exp")),
            claims=claims,
        )


def _unwrap(answer: Answer) -> Identity:
    if isinstance(answer, InvalidCredential):
        raise InvalidCredential(answer.check)
    return answer


async def _capped_body(resp: aiohttp.ClientResponse) -> bytes:
    """The body, or its first bytes past _MAX_ANSWER_BYTES (the caller refuses that length)."""
    body = b""
    async for chunk in resp.content.iter_any():  # read() returns only what has arrived
        body += chunk
        if len(body) > _MAX_ANSWER_BYTES:
            break
    return body


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
