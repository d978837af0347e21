"""Which verifier checks a credential, and whether an identity meets a route's requirements."""

from __future__ import annotations

import aiohttp

from gateway.auth.credentials import Credential
from gateway.auth.identity import Identity, InvalidCredential, claim
from gateway.auth.introspect import Introspector
from gateway.auth.jwt_verifier import JwtVerifier, NoMatchingKey, canonical_jws
from gateway.auth.key_stores import AccessKeyVerifier, NotOurs
from gateway.config import RouteRequirements

_Path = tuple[JwtVerifier | AccessKeyVerifier | None, type[InvalidCredential], bool]


class Authenticator:
    """JWTs: the configured keys, else introspection. Access keys: the gateway's own stores for keys in its
    format, else introspection (the real API's keys). A credential that starts with the gateway's key prefix
    is decided by the gateway alone, however it is presented: introspection would send a near-copy of one of
    its keys (a typo, a bad checksum) to the upstream. Every failure is InvalidCredential or
    VerifierUnavailable. Owns the JWKS client session, closed by close()."""

    def __init__(
        self,
        *,
        jwt: JwtVerifier | None,
        access_keys: AccessKeyVerifier | None,
        introspector: Introspector | None,
        introspect_jwt: bool,
        introspect_keys: bool,
        own_key_prefix: str,
        jwks_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._own_key_prefix = own_key_prefix
        self._introspector = introspector
        self._jwks_session = jwks_session
        # kind → (local verifier, its "not mine" failure, whether introspection may answer instead)
        self._paths: dict[str, _Path] = {
            "jwt": (jwt, NoMatchingKey, introspect_jwt and introspector is not None),
            "accesskey": (access_keys, NotOurs, introspect_keys and introspector is not None),
        }

    async def authenticate(self, credential: Credential, request_id: str) -> Identity:
        local, not_mine, may_introspect = self._paths[credential.kind]
        if credential.value.startswith(self._own_key_prefix):
            may_introspect = False
        if local is not None:
            try:
                return await local.verify(credential.value)
            except not_mine:
                if not may_introspect:
                    raise
        if not may_introspect:
            raise InvalidCredential(f"no_{credential.kind}_verifier")
        value = credential.value
        if credential.kind == "jwt" and value.count(".") == 2 and not canonical_jws(value.encode("ascii")):
            # One token, one spelling, for the upstream too (and for the introspection cache's keys).
            raise InvalidCredential("malformed")
        assert self._introspector is not None
        return await self._introspector.introspect(credential, request_id)

    async def close(self) -> None:
        if self._jwks_session is not None:
            await self._jwks_session.close()


def meets(identity: Identity, requirements: RouteRequirements) -> bool:
    if requirements.credential_types and identity.credential_type not in requirements.credential_types:
        return False
    for path, wanted in requirements.claims.items():
        value = claim(identity.claims, path)
        allowed = (wanted,) if isinstance(wanted, str) else wanted
        if value is None or str(value) not in allowed:
            return False
    return True
