"""A JSON Web Key Set fetched over HTTP, cached, and refetched sparingly.

PyJWT's own PyJWKClient fetches with urllib, which would block the event loop; this cache fetches with
aiohttp and only uses PyJWT to turn JWK objects into keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import structlog
from jwt import PyJWK
from opentelemetry.trace import SpanKind

from gateway.auth.identity import VerifierUnavailable
from gateway.config import JwksConfig
from gateway.observability import spans

log = structlog.get_logger("gateway.auth")

MAX_JWKS_BYTES = 1024 * 1024
RETRY_AFTER_FAILURE = 1.0
"""Seconds between fetch attempts while the endpoint fails, so an outage is not hammered at request rate."""

_HMAC = frozenset({"HS256", "HS384", "HS512"})


def jwks_session() -> aiohttp.ClientSession:
    """The client for JWKS fetches. A key set comes from an identity provider, not the upstream, and whoever
    can answer in its place can mint tokens: TLS is always verified, whatever `upstream.tls_verify` says."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),  # each fetch runs under jwks.fetch_timeout
        trust_env=False,
    )


class _FetchFailed(Exception):
    """Why a fetch failed, in our own words: logs never carry the endpoint's body."""


class JwksCache:
    """The keys of one JWKS URL, for the asymmetric `algorithms` the configuration allows with it."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        config: JwksConfig,
        *,
        algorithms: Iterable[str],
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        self.url = url
        self._session = session
        self._config = config
        # Symmetric keys never come from a JWKS: a published "oct" key would be a secret anyone can read.
        self._algorithms = tuple(a for a in dict.fromkeys(algorithms) if a not in _HMAC)
        self._clock = clock
        self._max_bytes = max_bytes
        self._keys: list[PyJWK] | None = None
        self._kids: frozenset[str] = frozenset()
        self._fresh_until = float("-inf")
        self._retry_at = float("-inf")
        self._last_fetch = float("-inf")
        self._inflight: asyncio.Task[None] | None = None

    async def keys(self, kid: str | None, alg: str) -> list[PyJWK]:
        """The keys that may verify a token with this `kid` header (None: any key) and `alg`.

        Raises VerifierUnavailable when no key set was ever obtained and the endpoint cannot give one now.
        """
        now = self._clock()
        if (self._keys is None or now >= self._fresh_until) and now >= self._retry_at:
            await self._refresh()
        if self._keys is None:
            raise VerifierUnavailable("jwks")
        found = self._match(kid, alg)
        # An unknown kid may be a freshly rotated key, or an attacker's random one: refetch at most once
        # per refetch_interval, counting every fetch, so random kids cost nothing once the set is fresh.
        if (
            not found
            and kid is not None
            and kid not in self._kids
            and self._clock() - self._last_fetch >= self._config.refetch_interval
        ):
            await self._refresh()
            found = self._match(kid, alg)
        return found

    def _match(self, kid: str | None, alg: str) -> list[PyJWK]:
        assert self._keys is not None
        return [
            k
            for k in self._keys
            if k.algorithm_name == alg and (kid is None or k.key_id is None or k.key_id == kid)
        ]

    async def _refresh(self) -> None:
        # One fetch at a time: concurrent callers await the same one. Shielded, so a caller that goes away
        # (client disconnect) does not cancel the fetch for everyone else.
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch())
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        now = self._last_fetch = self._clock()
        try:
            # Beneath the auth span of the request that asked first (this task began in its context).
            with spans.span("jwks fetch", SpanKind.CLIENT, spans.endpoint(self.url)):
                async with asyncio.timeout(self._config.fetch_timeout):
                    body = await self._download()
            keys = self._parse(body)
        except (_FetchFailed, aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, _FetchFailed) else type(exc).__name__
            log.warning(
                "jwks_fetch_failed", url=self.url, reason=reason, keeping_cached=self._keys is not None
            )
            self._retry_at = now + RETRY_AFTER_FAILURE
        else:
            self._keys = keys
            self._kids = frozenset(k.key_id for k in keys if k.key_id is not None)
            self._fresh_until = now + self._config.cache_ttl
        finally:
            self._inflight = None

    async def _download(self) -> bytes:
        # No redirects: one could lead to plain http, where a key set could be swapped on the way.
        async with self._session.get(
            self.url, headers={"Accept": "application/json"}, allow_redirects=False
        ) as resp:
            spans.answered(resp.status)
            if resp.status != 200:
                raise _FetchFailed(f"status {resp.status}")
            if (resp.content_length or 0) > self._max_bytes:
                raise _FetchFailed("too large")
            body = bytearray()
            # Counted after decompression, so a compressed bomb is cut off too.
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > self._max_bytes:
                    raise _FetchFailed("too large")
            return bytes(body)

    def _parse(self, body: bytes) -> list[PyJWK]:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchFailed("not JSON") from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise _FetchFailed("no keys array")
        keys = [key for entry in entries if isinstance(entry, dict) for key in self._usable(entry)]
        if not keys:
            raise _FetchFailed("no usable keys")
        return keys

    def _usable(self, jwk: dict[str, Any]) -> list[PyJWK]:
        if jwk.get("use", "sig") != "sig" or "d" in jwk or not isinstance(jwk.get("kid", ""), str):
            return []  # an encryption key, a private key, or nonsense: never verifies a signature
        declared = jwk.get("alg")
        # A JWK without `alg` gets PyJWT's guess (RS256 for any RSA key), which would refuse PS256 tokens:
        # instead it is offered for every configured algorithm its key type can serve.
        candidates = (declared,) if declared in self._algorithms else () if declared else self._algorithms
        usable = []
        for alg in candidates:
            try:
                key = PyJWK(jwk, alg)
                prepared = key.Algorithm.prepare_key(key.key)  # checks the curve against the algorithm
                if key.Algorithm.check_key_length(prepared):
                    continue  # e.g. a 1024-bit RSA key
            except Exception:  # any key PyJWT cannot load is skipped, never fatal
                continue
            usable.append(key)
        return usable
