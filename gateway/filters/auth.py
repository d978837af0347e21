"""Authentication on the request path: one credential per request, verified, turned into identity headers
the upstream can trust. Inbound identity headers are removed on every route, whatever its auth mode."""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.auth.authenticator import Authenticator, meets
from gateway.auth.credentials import (
    Credential,
    MalformedCredential,
    cookie_without_credentials,
    extract,
    query_without_credentials,
)
from gateway.auth.identity import Identity, InvalidCredential, VerifierUnavailable
from gateway.config import AuthConfig
from gateway.context import RequestContext
from gateway.envelope import gateway_error
from gateway.filters.errors import GatewayError
from gateway.observability import spans
from gateway.pipeline import Next

log = structlog.get_logger("gateway.auth")


class AuthFilter:
    def __init__(self, authenticator: Authenticator, config: AuthConfig) -> None:
        self._authenticator = authenticator
        self._sources = config.sources
        self._max_credential_bytes = int(config.max_credential_bytes)
        self._headers = config.headers
        self._fail_open = config.on_unavailable == "open"
        self._cleared: dict[str, str | None] = dict.fromkeys(
            (
                config.headers.customer_id,
                config.headers.team_id,
                config.headers.credential_type,
                config.headers.credential_id,
            )
        )
        realm = config.realm.replace('"', "")
        self._challenge = f'Bearer realm="{realm}"'
        self._invalid = f'Bearer realm="{realm}", error="invalid_token"'
        self._bad_request = f'Bearer realm="{realm}", error="invalid_request"'
        self._forbidden = f'Bearer realm="{realm}", error="insufficient_scope"'

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        route = ctx.route
        assert route is not None
        ctx.upstream_header_overrides.update(self._cleared)
        if route.hide_credentials:
            self._hide(request, ctx)
        if route.auth == "none":
            return await call_next(request, ctx)

        headers = request.headers
        raw_query = request.raw_path.partition("?")[2]  # query_string is already decoded
        try:
            credential = extract(
                headers.getall("Authorization", []),
                raw_query,
                headers.getall("Cookie", []),
                self._sources,
                max_bytes=self._max_credential_bytes,
            )
        except MalformedCredential as exc:  # RFC 6750: a malformed token is invalid_token
            ctx.credential_kind = exc.kind
            raise self._rejected(ctx, exc.check, exc.source, self._invalid) from None
        except InvalidCredential as exc:
            raise self._rejected(ctx, exc.check, "request", self._bad_request) from None
        if credential is None:
            if route.auth == "optional":
                ctx.auth = ("anonymous", "no_credential")
                return await call_next(request, ctx)
            ctx.auth = ("failure", "no_credential")
            log.info("auth_failed", request_id=ctx.request_id, route=route.name, check="no_credential")
            raise GatewayError(
                gateway_error(401, "AUTHENTICATION_REQUIRED", headers={"WWW-Authenticate": self._challenge})
            )

        ctx.credential_kind = credential.kind
        try:
            identity = await self._verify(credential, ctx)
        except InvalidCredential as exc:
            raise self._rejected(ctx, exc.check, credential.source, self._invalid) from None
        except VerifierUnavailable as exc:
            ctx.auth = ("unavailable", exc.what)
            log.warning("auth_unavailable", request_id=ctx.request_id, route=route.name, verifier=exc.what)
            if not self._fail_open:
                raise GatewayError(
                    gateway_error(503, "SERVICE_UNAVAILABLE", "The credential cannot be checked right now.")
                ) from None
            return await call_next(request, ctx)

        if not meets(identity, route.require):
            ctx.auth = ("forbidden", "requirements")
            log.info(
                "auth_forbidden",
                request_id=ctx.request_id,
                route=route.name,
                credential_type=identity.credential_type,
            )
            raise GatewayError(
                gateway_error(403, "PERMISSION_DENIED", headers={"WWW-Authenticate": self._forbidden})
            )
        ctx.identity = identity
        ctx.auth = ("success", "ok")
        names = self._headers
        for name, value in (
            (names.customer_id, identity.customer_id),
            (names.team_id, identity.team_id),
            (names.credential_type, identity.credential_type),
            (names.credential_id, identity.credential_id),
        ):
            ctx.upstream_header_overrides[name] = value
        return await call_next(request, ctx)

    async def _verify(self, credential: Credential, ctx: RequestContext) -> Identity:
        """The credential's identity, under a span of its own when the request is traced (a JWKS fetch or an
        introspection call it waits for shows beneath it)."""
        with spans.span("auth") as span:
            if span is not None:
                span.set_attribute("gateway.credential.kind", credential.kind)
            try:
                return await self._authenticator.authenticate(credential, ctx.request_id)
            except InvalidCredential as exc:
                if span is not None:
                    span.set_attribute("gateway.auth.reason", exc.check)
                raise
            except VerifierUnavailable as exc:
                if span is not None:
                    span.set_attribute("gateway.auth.reason", exc.what)
                raise

    def _rejected(self, ctx: RequestContext, check: str, source: str, challenge: str) -> GatewayError:
        # The check's name and the credential's source only: never the credential.
        route = ctx.route.name if ctx.route else None
        ctx.auth = ("failure", check)
        log.info("auth_failed", request_id=ctx.request_id, route=route, check=check, source=source)
        return GatewayError(
            gateway_error(401, "INVALID_CREDENTIALS", headers={"WWW-Authenticate": challenge})
        )

    def _hide(self, request: web.BaseRequest, ctx: RequestContext) -> None:
        """Forward without any credential: the header, the query parameters and the cookies."""
        ctx.upstream_header_overrides["Authorization"] = None
        cookies = request.headers.getall("Cookie", [])
        if cookies:
            ctx.upstream_header_overrides["Cookie"] = cookie_without_credentials(cookies)
        path, _, raw_query = ctx.target.partition("?")
        if raw_query:
            query = query_without_credentials(raw_query)
            ctx.target = f"{path}?{query}" if query else path
