"""Builds the authenticator the configuration asks for; a key or secret that cannot be loaded is a
configuration error at start, naming the key."""

from __future__ import annotations

import aiohttp
import redis.asyncio

from gateway.auth.authenticator import Authenticator
from gateway.auth.introspect import Introspector
from gateway.auth.jwks import jwks_session
from gateway.auth.jwt_verifier import JwtVerifier
from gateway.auth.key_stores import AccessKeyVerifier, FileKeyStore, KeyStore, RedisKeyStore, load_pepper
from gateway.config import ConfigError, GatewayConfig
from gateway.tls import check_files as check_tls_files


def build_authenticator(
    config: GatewayConfig, upstream_session: aiohttp.ClientSession, redis_client: redis.asyncio.Redis | None
) -> Authenticator:
    """Introspection calls the upstream with `upstream_session`; JWKS get a session of their own, owned
    (and closed) by the authenticator."""
    auth = config.auth
    keys = auth.access_keys
    own_session = jwks_session() if auth.jwt.keys else None
    try:
        jwt = JwtVerifier(auth.jwt, own_session) if own_session is not None else None
        stores: list[KeyStore] = []
        pepper = load_pepper(keys) if {"redis", "file"} & set(keys.stores) else b""
        for name in keys.stores:
            if name == "redis" and redis_client is not None:  # None only in preflight: nothing to load
                stores.append(RedisKeyStore(redis_client, pepper, prefix=keys.prefix))
            elif name == "file":
                assert keys.file is not None
                stores.append(FileKeyStore(keys.file))
    except ValueError as exc:
        if own_session is not None:
            own_session.detach()  # never used: marks it closed without awaiting close() in this sync code
        raise ConfigError(f"invalid configuration: {exc}") from None
    verifier = (
        AccessKeyVerifier(stores, keys.prefix, keys.cache_ttl, keys.cache_size, pepper=pepper)
        if stores
        else None
    )
    introspect_keys = "introspect" in keys.stores
    introspector = None
    if introspect_keys or auth.introspect.jwt:
        introspector = Introspector(
            auth.introspect,
            upstream_url=config.upstream.url,
            token_claims=auth.jwt.claims,
            session=upstream_session,
        )
    return Authenticator(
        jwt=jwt,
        access_keys=verifier,
        introspector=introspector,
        introspect_jwt=auth.introspect.jwt,
        introspect_keys=introspect_keys,
        own_key_prefix=keys.prefix,
        jwks_session=own_session,
    )


async def preflight(config: GatewayConfig) -> None:
    """Load every secret, key and key file now, TLS certificates included, so `check-config`, start-up and
    a reload report them as configuration errors (ConfigError) instead of a worker failing later."""
    check_tls_files(config)
    async with aiohttp.ClientSession() as session:
        await build_authenticator(config, session, None).close()
