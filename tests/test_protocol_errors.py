"""gateway.server.protocol_error: aiohttp's HTTP-parser rejections answered in the envelope."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from unittest import mock

import orjson
import pytest
from aiohttp import http_parser
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)

from gateway.envelope import render
from gateway.http_edge import parser_limits, protocol_error

MALFORMED_MESSAGE = "The request is not valid HTTP."
SECRET = "Bearer s3cr3t-token-value"
URI_LIMIT = 8192  # the parser's max_line_size in the unit tests


def test_a_target_over_the_parsers_line_limit_is_414() -> None:
    info = protocol_error(400, LineTooLong(b"/v1.0/calls?x=aaaa", URI_LIMIT), URI_LIMIT)
    got = (info.http_status, info.reason, info.canonical_status())
    assert got == (414, "URI_TOO_LONG", "INVALID_ARGUMENT")
    assert info.message == "The request URI is too long."


@pytest.mark.parametrize(("uri", "header"), [(8192, 16384), (16384, 16384), (300, 256)])
def test_parser_limits_always_tell_a_long_uri_from_a_long_header(uri: int, header: int) -> None:
    line, field = parser_limits(uri, header)
    assert line == uri and field in (header, header + 1) and line != field


@pytest.mark.parametrize(
    "exc",
    [
        LineTooLong(b"X-Long: aaaa", URI_LIMIT + 1),
        LineTooLong(f"Authorization: {SECRET}".encode(), 100, "200"),
        BadHttpMessage("Too many headers received"),
    ],
    ids=["line-too-long", "line-too-long-with-credential", "too-many-headers"],
)
def test_header_limits_are_431(exc: BaseException) -> None:
    info = protocol_error(400, exc, URI_LIMIT)
    got = (info.http_status, info.reason, info.canonical_status())
    assert got == (431, "HEADERS_TOO_LARGE", "INVALID_ARGUMENT")
    assert info.message == "The request headers are too large."


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, BadHttpMessage("Missing 'Host' header in request.")),
        (400, BadHttpMessage("Too many trailers received")),
        (400, BadStatusLine("GARBAGE")),
        (400, BadHttpMethod("G@T")),
        (400, BadHttpMethod("\x16\x03\x01")),
        (400, InvalidHeader(b"Bad Header")),
        (400, TransferEncodingError("zz")),
        (400, None),
        (405, HttpProcessingError(code=405, message="nope")),
        (413, HttpProcessingError(code=413, message="too big")),
        (414, None),
        (499, None),
    ],
)
def test_other_client_errors_keep_their_status_as_malformed_request(
    status: int, exc: BaseException | None
) -> None:
    info = protocol_error(status, exc, URI_LIMIT)
    assert (info.http_status, info.reason, info.message) == (status, "MALFORMED_REQUEST", MALFORMED_MESSAGE)
    assert info.canonical_status() == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("status", "exc"),
    [(500, RuntimeError("boom")), (500, None), (503, None), (502, BadHttpMessage("x"))],
)
def test_server_side_failures_are_500_internal(status: int, exc: BaseException | None) -> None:
    info = protocol_error(status, exc, URI_LIMIT)
    assert (info.http_status, info.reason, info.canonical_status()) == (500, "INTERNAL", "INTERNAL")


@pytest.mark.parametrize("fmt", ["canonical", "flat"])
@pytest.mark.parametrize(
    "exc",
    [
        LineTooLong(f"Authorization: {SECRET}".encode(), 100),
        LineTooLong(f"/v1.0/calls?accesskey={SECRET}".encode(), URI_LIMIT),
        InvalidHeader(f"Cookie {SECRET}".encode()),
    ],
)
def test_rendered_body_never_quotes_the_offending_bytes(exc: BaseException, fmt: str) -> None:
    body = render(protocol_error(400, exc, URI_LIMIT), "req_1", fmt)  # type: ignore[arg-type]
    assert b"s3cr3t" not in body
    parsed = orjson.loads(body)
    inner = parsed["error"] if fmt == "canonical" else parsed
    assert inner["request_id"] == "req_1"


# The exceptions the real parsers raise (pure-Python and, when built, the C one): the "Too many headers" test
# above depends on aiohttp's wording, so it is checked against what aiohttp actually produces.
PARSERS = [http_parser.HttpRequestParserPy]
if hasattr(http_parser, "HttpRequestParserC"):
    PARSERS.append(http_parser.HttpRequestParserC)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


LINE, FIELD = parser_limits(100, 100)  # equal, as configured: the field limit becomes 101


def _parse_error(parser_cls: type, loop: asyncio.AbstractEventLoop, data: bytes) -> BaseException:
    parser = parser_cls(mock.Mock(), loop, 2**16, max_line_size=LINE, max_headers=10, max_field_size=FIELD)
    with pytest.raises(BadHttpMessage) as info:
        parser.feed_data(data)
    return info.value


HEAD = b"GET / HTTP/1.1\r\nHost: gw\r\n"


@pytest.mark.parametrize("parser_cls", PARSERS, ids=lambda c: c.__module__.rsplit(".", 1)[-1])
@pytest.mark.parametrize(
    ("data", "http_status", "reason"),
    [
        (HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + b"\r\n", 431, "HEADERS_TOO_LARGE"),
        (HEAD + b"X-Long: " + b"a" * 200 + b"\r\n\r\n", 431, "HEADERS_TOO_LARGE"),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", 414, "URI_TOO_LONG"),
        (b"GET /?" + b"a" * 300 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414, "URI_TOO_LONG"),
        (b"G@T / HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "MALFORMED_REQUEST"),
        (HEAD + b"Bad Header: x\r\n\r\n", 400, "MALFORMED_REQUEST"),
        (HEAD + b"Content-Length: x\r\n\r\n", 400, "MALFORMED_REQUEST"),
    ],
    ids=[
        "too-many-headers",
        "long-header",
        "long-path",
        "long-query",
        "bad-method",
        "bad-header",
        "bad-length",
    ],
)
def test_real_parser_exceptions(
    parser_cls: type, loop: asyncio.AbstractEventLoop, data: bytes, http_status: int, reason: str
) -> None:
    exc = _parse_error(parser_cls, loop, data)
    # aiohttp's request handler reports every parse error with status 400.
    info = protocol_error(400, exc, LINE)
    assert (info.http_status, info.reason) == (http_status, reason)
