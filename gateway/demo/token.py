"""`voipbin-gateway demo token`: a JWT shaped like the API's agent tokens, signed with the shared secret
the configuration verifies tokens with (config/demo/jwt-secret.txt in the demo)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jwt

from gateway.auth.jwt_verifier import _read_material
from gateway.config import GatewayConfig
from gateway.demo import data


def agent_claims(customer_id: str, team_id: str | None, *, now: float, lifetime: float) -> dict[str, Any]:
    """The claims of an API agent token (`type`, the `agent` object with its `customer_id`), which the
    default auth.jwt.claims map to the identity; a team goes where they look first (`team_id`)."""
    claims: dict[str, Any] = {
        "type": "agent",
        "agent": data.agent(customer_id),
        "iat": int(now),
        "exp": int(now + lifetime),
    }
    if team_id is not None:
        claims["team_id"] = team_id
    return claims


def mint(config: GatewayConfig, claims: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> str:
    """Sign with the first key of auth.jwt.keys that holds a shared secret, read as the gateway reads it."""
    for index, key in enumerate(config.auth.jwt.keys):
        if key.secret_env or key.secret_file:
            secret = _read_material(key, f"auth.jwt.keys[{index}]", environ)
            headers = {"kid": key.kid} if key.kid else None
            # A shared-secret key verifies HS* only (config.JwtKey), so its first algorithm is one of them.
            return jwt.encode(dict(claims), secret, algorithm=key.algorithms[0], headers=headers)
    raise ValueError(
        "auth.jwt.keys has no key with secret_env or secret_file: `demo token` signs with such a key "
        "(config/demo.yaml has one)"
    )
