"""Verify a JWT against the configured keys (shared secrets, PEM public keys, JWKS URLs) into an Identity.

The token's header is parsed and screened here before PyJWT sees it: the header only ever *selects* among keys
the configuration allows for its `alg`; it never supplies a key, a URL or an extension. PyJWT then checks the
signature, issuer and audience. Time claims are checked here, against the injected clock: PyJWT reads the
system clock itself and coerces `"exp": "123"` or `true` to integers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import aiohttp
import jwt
import structlog
from cachetools import TLRUCache
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.exceptions import (
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidJTIError,
    InvalidKeyError,
    InvalidSignatureError,
    InvalidSubjectError,
    MissingRequiredClaimError,
    PyJWTError,
)

from gateway.auth.identity import (
    Identity,
    InvalidCredential,
    claim,
    identity_from_claims,
    identity_paths,
    numeric_date,
    unusable_identifier,
)
from gateway.auth.jwks import JwksCache
from gateway.config import JwtAlgorithm, JwtConfig, JwtKey

log = structlog.get_logger("gateway.auth")

MAX_KID_LENGTH = 256
MAX_CACHE_SECONDS = 300.0
"""A verified token is re-verified at least this often, so a key removed from a JWKS stops working."""

_KNOWN_ALGORITHMS = frozenset(get_args(JwtAlgorithm))
_HMAC = frozenset({"HS256", "HS384", "HS512"})
# Headers that would let the token name its own key or a URL to fetch one from.
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")
# RFC 7515 §2: base64url without padding. Only the canonical spelling is accepted: padding, and the unused
# low bits of a segment's last character, would give one token several spellings (and cache entries, log
# correlations, blocklist misses).
_SHAPE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Characters that may end a segment of length 4n+2 (4 unused bits) and 4n+3 (2 unused bits).
_LAST = {2: frozenset(_B64URL[::16]), 3: frozenset(_B64URL[::4])}
_decoder = jwt.PyJWT()


class NoMatchingKey(InvalidCredential):
    """No configured key applies to this token: the caller may still ask the introspection endpoint."""

    def __init__(self) -> None:
        super().__init__("no_matching_key")


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    algorithms: tuple[str, ...]
    material: Any
    """The HMAC secret or the public key object; None for a JWKS key."""
    jwks: JwksCache | None


class JwtVerifier:
    def __init__(
        self,
        config: JwtConfig,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        jwks_clock: Callable[[], float] = time.monotonic,
        secrets: Mapping[str, str] = os.environ,
    ) -> None:
        """Loads every key now; a missing secret or unreadable key file raises ValueError naming the key."""
        self._clock = clock
        self._leeway = config.leeway
        self._require_expiry = config.require_expiry
        self._expiry_path = config.expiry_claim
        self._max_age = config.max_age
        self._claim_map = config.claims
        self._identity_paths = identity_paths(config.claims)
        self._issuer = config.issuer
        self._audience = list(config.audience) or None
        self._options: Any = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            # PyJWT rejects any token carrying `aud` when no audience is given; the API's delegate tokens do.
            "verify_aud": self._audience is not None,
            "verify_iss": self._issuer is not None,
        }
        self._cache: TLRUCache[bytes, tuple[Identity, float]] | None = (
            TLRUCache(maxsize=config.cache_size, ttu=_cached_until, timer=clock)
            if config.cache_size
            else None
        )

        jwks_algorithms: dict[str, list[str]] = {}
        for key in config.keys:
            if key.jwks_url:
                jwks_algorithms.setdefault(key.jwks_url, []).extend(key.algorithms)
        self._jwks = {
            url: JwksCache(url, session, config.jwks, algorithms=algs, clock=jwks_clock)
            for url, algs in jwks_algorithms.items()
        }
        by_alg: dict[str, list[_Key]] = {}
        for index, key in enumerate(config.keys):
            entry = self._load(key, f"auth.jwt.keys[{index}]", secrets)
            for alg in key.algorithms:
                by_alg.setdefault(alg, []).append(entry)
        self._keys_by_alg = {alg: tuple(entries) for alg, entries in by_alg.items()}

    def _load(self, key: JwtKey, name: str, secrets: Mapping[str, str]) -> _Key:
        if key.jwks_url:
            return _Key(key.kid, key.algorithms, None, self._jwks[key.jwks_url])
        material = _read_material(key, name, secrets)
        for alg in key.algorithms:
            algorithm = jwt.get_algorithm_by_name(alg)
            try:
                # The same check PyJWT makes per token, made once: it refuses a PEM, DER or JWK as an HMAC
                # secret and an EC key on the wrong curve, so a key can only ever verify its own kind.
                prepared = algorithm.prepare_key(material)
            except (InvalidKeyError, TypeError, ValueError):
                what = "the secret" if alg in _HMAC else f"a {type(material).__name__}"
                raise ValueError(f"{name}: {what} cannot verify {alg}") from None
            if algorithm.check_key_length(prepared):
                log.warning("jwt_key_weak", key=name, alg=alg)
        return _Key(key.kid, key.algorithms, material, None)

    async def verify(self, token: str) -> Identity:
        """The identity in a valid token. Any text is only ever invalid here, though the gateway's own
        callers pass only what auth.credentials.extract screened (size, visible ASCII).

        Raises InvalidCredential (NoMatchingKey when no configured key applies) or VerifierUnavailable.
        """
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidCredential("malformed") from None
        cache = self._cache
        if cache is None:
            return (await self._verify(raw))[0]
        digest = hashlib.sha256(raw).digest()
        try:
            return cache[digest][0]
        except KeyError:
            pass
        verified = await self._verify(raw)
        cache[digest] = verified
        return verified[0]

    async def _verify(self, raw: bytes) -> tuple[Identity, float]:
        if raw.count(b".") != 2:
            raise InvalidCredential("malformed")
        if raw.endswith(b"."):
            raise InvalidCredential("empty_signature")
        if not canonical_jws(raw):
            raise InvalidCredential("malformed")
        header = _segment_json(raw[: raw.index(b".")])
        if not isinstance(header, dict):
            raise InvalidCredential("malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in _KNOWN_ALGORITHMS:
            raise InvalidCredential("alg_not_allowed")  # "none", "None", "", and anything unheard of
        if any(name in header for name in _FORBIDDEN_HEADERS):
            raise InvalidCredential("forbidden_header")
        if "crit" in header:
            raise InvalidCredential("unsupported_crit")  # we implement no extension, so none can be critical
        kid = header.get("kid")
        if "kid" in header and not isinstance(kid, str):
            raise InvalidCredential("malformed")
        if kid is not None and len(kid) > MAX_KID_LENGTH:
            raise InvalidCredential("kid_too_long")
        claims = await self._decode(raw, alg, kid)
        return self._identity(claims)

    async def _decode(self, raw: bytes, alg: str, kid: str | None) -> dict[str, Any]:
        tried = False
        for key in self._keys_by_alg.get(alg, ()):
            if key.kid is not None and key.kid != kid:
                continue
            materials: list[PyJWK] | tuple[Any, ...] = (
                (key.material,) if key.jwks is None else await key.jwks.keys(kid, alg)
            )
            for material in materials:
                tried = True
                try:
                    return _decoder.decode(
                        raw,
                        material,
                        algorithms=key.algorithms,
                        options=self._options,
                        audience=self._audience,
                        issuer=self._issuer,
                    )
                except (InvalidSignatureError, InvalidKeyError):
                    continue  # another key for this alg and kid may have signed it
                except (PyJWTError, TypeError, ValueError, RecursionError) as exc:
                    raise InvalidCredential(_check_name(exc)) from None
        if tried:
            raise InvalidCredential("bad_signature")
        raise NoMatchingKey()

    def _identity(self, claims: dict[str, Any]) -> tuple[Identity, float]:
        now = self._clock()
        leeway = self._leeway
        expiries: list[float] = []
        if "exp" in claims:
            expiries.append(_number(claims["exp"]))  # honoured even when another claim is configured
        if self._expiry_path != "exp":
            value = claim(claims, self._expiry_path)
            if value is not None:
                expiries.append(_instant(value))
        if not expiries and self._require_expiry:
            raise InvalidCredential("missing_expiry")
        valid_until = min(expiries) + leeway if expiries else math.inf
        if now >= valid_until:
            raise InvalidCredential("expired")
        if "nbf" in claims and _number(claims["nbf"]) > now + leeway:
            raise InvalidCredential("not_yet_valid")
        iat = _number(claims["iat"]) if "iat" in claims else None
        if iat is not None and iat > now + leeway:
            raise InvalidCredential("not_yet_valid")
        if self._max_age is not None:
            if iat is None:
                raise InvalidCredential("missing_iat")
            if now - iat > self._max_age:
                raise InvalidCredential("too_old")
            expiries.append(iat + self._max_age)
            valid_until = min(valid_until, iat + self._max_age)
        if unusable_identifier(claims, self._identity_paths):
            raise InvalidCredential("claim_types")
        identity = identity_from_claims(
            claims, self._claim_map, default_type="jwt", expires_at=min(expiries) if expiries else None
        )
        return identity, min(valid_until, now + MAX_CACHE_SECONDS)


def _cached_until(_key: bytes, value: tuple[Identity, float], _now: float) -> float:
    return value[1]


def _read_material(key: JwtKey, name: str, secrets: Mapping[str, str]) -> Any:
    if key.secret_env:
        value = secrets.get(key.secret_env)
        if not value:
            raise ValueError(f"{name}.secret_env: environment variable {key.secret_env} is not set or empty")
        return value.encode("utf-8", "surrogateescape")
    path = key.secret_file or key.public_key_file
    source = "secret_file" if key.secret_file else "public_key_file"
    assert path is not None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(
            f"{name}.{source}: cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    if key.secret_file:
        # A trailing newline left by `echo` or an editor is not part of the secret.
        data = data.rstrip(b"\r\n")
        if not data:
            raise ValueError(f"{name}.secret_file: {path} is empty")
        return data
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{name}.public_key_file: {path} is not a PEM public key") from None


def canonical_jws(raw: bytes) -> bool:
    """Three base64url segments, each in its one canonical spelling (see _SHAPE)."""
    return _SHAPE.fullmatch(raw) is not None and all(map(_canonical, raw.split(b".")))


def _canonical(segment: bytes) -> bool:
    tail = len(segment) % 4
    return tail == 0 or (tail != 1 and segment[-1] in _LAST[tail])


def _segment_json(segment: bytes) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidCredential("malformed") from None


def _number(value: Any) -> float:
    number = numeric_date(value)
    if number is None:
        raise InvalidCredential("claim_types")
    return number


def _instant(value: Any) -> float:
    """A NumericDate or a timestamp string ("2026-11-22 10:00:00.000000", "2026-11-22T10:00:00Z")."""
    if not isinstance(value, str):
        return _number(value)
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # the API's timestamps are UTC without a zone
        return moment.timestamp()
    except (ValueError, OverflowError):
        raise InvalidCredential("claim_types") from None


def _check_name(exc: Exception) -> str:
    if isinstance(exc, MissingRequiredClaimError):
        return {"iss": "issuer", "aud": "audience"}.get(exc.claim, "missing_claim")
    if isinstance(exc, InvalidIssuerError):
        return "issuer"
    if isinstance(exc, InvalidAudienceError):
        return "audience"
    if isinstance(exc, InvalidSubjectError | InvalidJTIError):
        return "claim_types"
    if isinstance(exc, InvalidAlgorithmError):
        return "alg_not_allowed"
    return "malformed"
