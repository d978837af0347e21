"""Where credentials come from: one per request, conflicts refused, sources switchable, values no token or
key can have refused before any verifier; and forwarding without them."""

from __future__ import annotations

import pytest

from gateway.auth.credentials import (
    Credential,
    MalformedCredential,
    cookie_without_credentials,
    extract,
    query_without_credentials,
)
from gateway.auth.identity import InvalidCredential
from gateway.config import CredentialSources

ALL = CredentialSources()
LIMIT = 8192


def one(
    auth: list[str] = (), query: str = "", cookies: list[str] = (), sources=ALL, max_bytes: int = LIMIT
) -> Credential | None:
    return extract(list(auth), query, list(cookies), sources, max_bytes=max_bytes)


@pytest.mark.parametrize(
    ("auth", "query", "cookies", "expected"),
    [
        (["Bearer abc"], "", [], Credential("jwt", "abc", "authorization_header")),
        (["bearer abc"], "", [], Credential("jwt", "abc", "authorization_header")),
        (["BEARER   abc  "], "", [], Credential("jwt", "abc", "authorization_header")),
        ([], "accesskey=k1", [], Credential("accesskey", "k1", "query_accesskey")),
        ([], "a=1&token=t1&b=2", [], Credential("jwt", "t1", "query_token")),
        ([], "", ["token=t2"], Credential("jwt", "t2", "cookie_token")),
        ([], "", ["theme=dark; accesskey=k2"], Credential("accesskey", "k2", "cookie_accesskey")),
        ([], "accesskey=k%2B1", [], Credential("accesskey", "k+1", "query_accesskey")),
        ([], "accesskey=same&accesskey=same", [], Credential("accesskey", "same", "query_accesskey")),
        (["Bearer t"], "token=t", ["token=t"], Credential("jwt", "t", "authorization_header")),
        ([], "tokens=x&accesskeyx=y&q=token", [], None),
        ([], "", [], None),
    ],
)
def test_the_one_credential_is_found(auth, query, cookies, expected):
    assert one(auth, query, cookies) == expected


@pytest.mark.parametrize(
    ("auth", "query", "cookies", "check"),
    [
        (["Bearer a", "Bearer b"], "", [], "conflicting_credentials"),
        (["Bearer a", "Bearer a"], "", [], "conflicting_credentials"),
        (["Bearer a"], "accesskey=k", [], "conflicting_credentials"),
        ([], "accesskey=k1&accesskey=k2", [], "conflicting_credentials"),
        ([], "token=t", ["accesskey=k"], "conflicting_credentials"),
        (["Bearer t1"], "token=t2", [], "conflicting_credentials"),
        (["Bearer"], "", [], "empty_authorization_header"),
        (["Bearer   "], "", [], "empty_authorization_header"),
        ([], "accesskey=", [], "empty_query_accesskey"),
        (["Basic dXNlcjpwYXNz"], "", [], "unsupported_scheme"),
        # a second credential hidden from a naive parser is still a second credential
        (["Bearer mine"], "%74oken=victim", [], "conflicting_credentials"),
        (["Bearer mine"], "", ["a b=1; token=other"], "conflicting_credentials"),
        ([], "", ["token=first; token=second"], "conflicting_credentials"),
    ],
)
def test_ambiguous_or_empty_credentials_are_refused(auth, query, cookies, check):
    with pytest.raises(InvalidCredential) as info:
        one(auth, query, cookies)
    assert info.value.check == check


@pytest.mark.parametrize(
    ("auth", "query", "cookies", "source"),
    [
        # control characters that would split the introspection request's header line or query
        ([], "token=a.b.c%0D%0AX-Injected:%201", [], "query_token"),
        ([], "token=a%00b", [], "query_token"),
        ([], "accesskey=k%09ey", [], "query_accesskey"),
        # non-ASCII: aiohttp hands raw header bytes over as surrogate escapes, the query as U+FFFD
        (["Bearer a.b\udcfc.c"], "", [], "authorization_header"),
        ([], "", ["accesskey=ab\udcfccd"], "cookie_accesskey"),
        ([], "accesskey=%C3%BC", [], "query_accesskey"),
        ([], "accesskey=%FC", [], "query_accesskey"),
        # whitespace inside: "+" is a space in a query, and a token has none
        ([], "accesskey=a+b", [], "query_accesskey"),
        (["Bearer a.b c"], "", [], "authorization_header"),
        ([], "", ['token="a b"'], "cookie_token"),
    ],
)
def test_values_no_credential_can_have_are_malformed(auth, query, cookies, source):
    with pytest.raises(MalformedCredential) as info:
        one(auth, query, cookies)
    assert (info.value.check, info.value.source) == ("malformed", source)


@pytest.mark.parametrize(
    ("auth", "query", "cookies"),
    [(["Bearer " + "a" * 65], "", []), ([], "token=" + "a" * 65, []), ([], "", ["accesskey=" + "k" * 65])],
)
def test_every_credential_is_held_to_the_size_limit(auth, query, cookies):
    assert one(auth, query, cookies, max_bytes=65) is not None  # exactly the limit: still accepted
    with pytest.raises(MalformedCredential) as info:
        one(auth, query, cookies, max_bytes=64)
    assert info.value.check == "too_large"


def test_the_size_limit_comes_before_any_other_look():
    with pytest.raises(MalformedCredential) as info:
        one(["Bearer " + "\x00" * 100], max_bytes=64)
    assert info.value.check == "too_large"


def test_every_visible_ascii_character_is_allowed():
    visible = "".join(map(chr, range(0x21, 0x7F)))
    assert one(["Bearer " + visible]) == Credential("jwt", visible, "authorization_header")


@pytest.mark.parametrize(
    ("switched_off", "auth", "query", "cookies"),
    [
        ("authorization_header", ["Bearer t"], "", []),
        ("query_token", [], "token=t", []),
        ("query_accesskey", [], "accesskey=k", []),
        ("cookie_token", [], "", ["token=t"]),
        ("cookie_accesskey", [], "", ["accesskey=k"]),
    ],
)
def test_each_source_can_be_switched_off(switched_off, auth, query, cookies):
    assert one(auth, query, cookies) is not None
    sources = CredentialSources(**{switched_off: False})
    assert one(auth, query, cookies, sources=sources) is None


def test_switched_off_source_cannot_cause_a_conflict():
    sources = CredentialSources(query_accesskey=False)
    assert one(["Bearer t"], "accesskey=k", sources=sources) == Credential("jwt", "t", "authorization_header")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("accesskey=k&a=%2F&b=1+2", "a=%2F&b=1+2"),
        ("a=1&token=t&accesskey=k&z=", "a=1&z="),
        ("token=t", ""),
        ("x=%E2%9C%93&flag", "x=%E2%9C%93&flag"),
        ("acc%65sskey=k&a=1", "a=1"),
    ],
)
def test_query_without_credentials_keeps_the_rest_byte_exact(raw, expected):
    assert query_without_credentials(raw) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["theme=dark; token=t; lang=en"], "theme=dark; lang=en"),
        (["accesskey=k"], None),
        (["a=1", "token=t; b=2"], "a=1; b=2"),
    ],
)
def test_cookie_without_credentials(headers, expected):
    assert cookie_without_credentials(headers) == expected
