"""Where a request's credential comes from, and how to forward the request without it.

Pure: headers, the raw query string and the Cookie header in; one `Credential`, none, or a refusal out.
Every credential is screened here, once, before any verifier, key store or introspection call sees it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus

from gateway.auth.identity import InvalidCredential
from gateway.config import CredentialSources

CredentialKind = Literal["jwt", "accesskey"]
QUERY_NAMES: dict[str, CredentialKind] = {"token": "jwt", "accesskey": "accesskey"}

# Visible ASCII (RFC 5234 VCHAR) holds every JWT and access key. Anything else (a control character, a space,
# a non-ASCII byte) cannot be a credential, and could split the header line or fail to encode on the way to
# a verifier or the introspection endpoint.
_CREDENTIAL_TEXT = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class Credential:
    kind: CredentialKind
    value: str
    source: str
    """authorization_header, query_token, cookie_token, query_accesskey or cookie_accesskey (for logs)."""


class MalformedCredential(InvalidCredential):
    """A value that cannot be any token or key: larger than the limit, or characters no credential has."""

    def __init__(self, check: str, credential: Credential) -> None:
        super().__init__(check)
        self.source = credential.source
        self.kind = credential.kind


def extract(
    authorization: list[str],
    raw_query: str,
    cookie_headers: list[str],
    sources: CredentialSources,
    *,
    max_bytes: int,
) -> Credential | None:
    """The request's one credential. Two different ones (a token and a key, two Authorization headers,
    repeated parameters with different values) are refused: "first one wins" would let a proxy in between
    and the upstream disagree on who is calling. Raises MalformedCredential for a value no verifier should
    see, InvalidCredential for a request that does not carry one credential properly."""
    found: list[Credential] = []
    if sources.authorization_header and authorization:
        found.append(_bearer(authorization))
    if (sources.query_token or sources.query_accesskey) and raw_query:
        found += _from_query(raw_query, sources)
    if (sources.cookie_token or sources.cookie_accesskey) and cookie_headers:
        found += _from_cookies(cookie_headers, sources)
    for credential in found:
        _screen(credential, max_bytes)
    if len(found) > 1 and len({(c.kind, c.value) for c in found}) > 1:
        raise InvalidCredential("conflicting_credentials")
    return found[0] if found else None


def _screen(credential: Credential, max_bytes: int) -> None:
    value = credential.value
    if not value:
        raise InvalidCredential(f"empty_{credential.source}")
    if len(value) > max_bytes:  # before anything looks inside: checked in characters, each at least a byte
        raise MalformedCredential("too_large", credential)
    if not _CREDENTIAL_TEXT.fullmatch(value):
        raise MalformedCredential("malformed", credential)


def _bearer(values: list[str]) -> Credential:
    if len(values) > 1:
        raise InvalidCredential("conflicting_credentials")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise InvalidCredential("unsupported_scheme")
    return Credential("jwt", token.strip(), "authorization_header")


def _query_pairs(raw_query: str) -> Iterable[tuple[str, str, str]]:
    """(decoded name, decoded value, raw pair) for every pair of the query string."""
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        yield unquote_plus(name), unquote_plus(value), pair


def _from_query(raw_query: str, sources: CredentialSources) -> list[Credential]:
    # The common case costs a scan; with any %-escape the names must be decoded (%74oken is "token").
    if "%" not in raw_query and "token" not in raw_query and "accesskey" not in raw_query:
        return []
    return _switched_on(_query_pairs(raw_query), "query", sources)


def _cookie_pairs(cookie_headers: list[str]) -> Iterable[tuple[str, str, str]]:
    """(name, value, raw pair) for every pair, split the lenient way servers do: a malformed neighbour or a
    repeated name must not hide a cookie from us that the upstream would still read."""
    for header in cookie_headers:
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            yield name.strip(), value.strip().strip('"'), part.strip()


def _from_cookies(cookie_headers: list[str], sources: CredentialSources) -> list[Credential]:
    if not any("token" in h or "accesskey" in h for h in cookie_headers):
        return []
    return _switched_on(_cookie_pairs(cookie_headers), "cookie", sources)


def _switched_on(
    pairs: Iterable[tuple[str, str, str]], place: str, sources: CredentialSources
) -> list[Credential]:
    """The credentials among one place's (name, value, raw) pairs whose source (`query_token`,
    `cookie_accesskey`, ...) is switched on."""
    return [
        Credential(QUERY_NAMES[name], value, f"{place}_{name}")
        for name, value, _ in pairs
        if name in QUERY_NAMES and getattr(sources, f"{place}_{name}")
    ]


def query_without_credentials(raw_query: str) -> str:
    """The raw query with `token` and `accesskey` pairs removed; every other pair stays byte-exact."""
    return "&".join(pair for name, _, pair in _query_pairs(raw_query) if name not in QUERY_NAMES)


def cookie_without_credentials(cookie_headers: list[str]) -> str | None:
    """The Cookie header without the credential cookies, or None when nothing else is left."""
    kept = [raw for name, _, raw in _cookie_pairs(cookie_headers) if raw and name not in QUERY_NAMES]
    return "; ".join(kept) or None
