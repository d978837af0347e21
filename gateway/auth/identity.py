"""Who the caller is, once a credential checked out; and the failures on the way there."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ClaimMap

# Printable ASCII: identifiers become upstream header values, log fields and rate-limit keys, where a control
# character would split a header line (aiohttp then raises instead of sending) and other text may not encode.
_IDENTIFIER_TEXT = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class Identity:
    credential_type: str
    """agent, direct, delegate (the API's token types), accesskey, or what the claims say."""
    customer_id: str | None = None
    team_id: str | None = None
    credential_id: str | None = None
    plan: str | None = None
    expires_at: float | None = None
    """Unix time after which the credential is no longer valid (caches drop it then)."""
    claims: Mapping[str, Any] = field(default_factory=dict)


class InvalidCredential(Exception):
    """The credential is bad, expired, revoked or conflicting: 401 INVALID_CREDENTIALS.

    `check` names the check that failed, for the log; it never contains the credential.
    """

    def __init__(self, check: str) -> None:
        super().__init__(check)
        self.check = check


class VerifierUnavailable(Exception):
    """The credential could not be checked (JWKS or introspection endpoint down, key store unreachable)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dot path ("agent.customer_id"), or None."""
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def first_claim(claims: Mapping[str, Any], paths: tuple[str, ...]) -> str | None:
    """The first present value among `paths`, as text; objects and lists are never an identifier."""
    for path in paths:
        value = claim(claims, path)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def identity_paths(mapping: ClaimMap) -> tuple[str, ...]:
    """Every dot path `mapping` reads, each once."""
    return tuple({path: None for paths in mapping.model_dump().values() for path in paths})


def is_identifier_text(value: str) -> bool:
    """Printable ASCII only: identifiers go into headers to the upstream, logs and metric labels."""
    return _IDENTIFIER_TEXT.fullmatch(value) is not None


def unusable_identifier(claims: Mapping[str, Any], paths: tuple[str, ...]) -> bool:
    """Whether a path holds something that is neither absent nor an identifier: first_claim() would skip
    an object and fall through to the next path, so callers refuse such claims instead."""
    for path in paths:
        value = claim(claims, path)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            continue
        if not isinstance(value, str) or not is_identifier_text(value):
            return True
    return False


def numeric_date(value: Any) -> float | None:
    """A NumericDate as a finite float, or None: never a bool or a string, and not NaN, an infinity or an
    integer too large for a float (json.loads accepts all three)."""
    if type(value) is not int and type(value) is not float:
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def identity_from_claims(
    claims: Mapping[str, Any],
    mapping: ClaimMap,
    *,
    default_type: str,
    expires_at: float | None,
) -> Identity:
    return Identity(
        credential_type=first_claim(claims, mapping.credential_type) or default_type,
        customer_id=first_claim(claims, mapping.customer_id),
        team_id=first_claim(claims, mapping.team_id),
        credential_id=first_claim(claims, mapping.credential_id),
        plan=first_claim(claims, mapping.plan),
        expires_at=expires_at,
        claims=claims,
    )
