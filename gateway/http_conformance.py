"""Which parsed request heads the gateway serves (RFC 9112), decided before the filter chain sees them.

Pure: one head from aiohttp's parser (llhttp) in; the head to serve, or a refusal, out. llhttp is lenient
where an edge proxy must not be: it parses HTTP/0.9 and HTTP/2.0 request lines, Transfer-Encoding on
HTTP/1.0 (whose chunked body can smuggle a second request past the gateway), codings it does not decode,
and any bytes in Host. The absolute-form target (`GET http://host/path`) it accepts but leaves absolute;
the gateway routes and forwards its origin form.
"""

from __future__ import annotations

import re
from dataclasses import replace

from aiohttp import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.envelope import ErrorInfo, gateway_error

# RFC 3986 §3.2.2-3.2.3: IP-literal, or IPv4address / reg-name, then an optional port. Of reg-name, only the
# unreserved characters that host names use: a sub-delim such as "," would make X-Forwarded-Host a list.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]*)(?::[0-9]{0,5})?")
_ABSOLUTE_FORM = re.compile(r"(?i:https?)://(?P<authority>[^/?#]*)(?P<rest>[^#]*)")


class Refused(BadHttpMessage):
    """A head the gateway will not serve; answered with `error`, and the connection is closed."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.code = error.http_status
        self.error = error


def _refused(http_status: int, reason: str, message: str) -> Refused:
    # The client's mistake, whatever the class of the status code RFC 9112 asks for.
    return Refused(replace(gateway_error(http_status, reason, message), status="INVALID_ARGUMENT"))


def conform(message: RawRequestMessage) -> RawRequestMessage:
    """The head to serve (in origin form), or Refused."""
    version = message.version
    if version != HttpVersion11:
        if version == HttpVersion10:
            if message.headers.get("Transfer-Encoding") is not None:
                # RFC 9112 §6.1: a faulty framing; the body could hold a second request.
                raise _refused(
                    400, "MALFORMED_REQUEST", "Transfer-Encoding is not allowed in an HTTP/1.0 request."
                )
        elif version.major == 0:
            raise _refused(400, "MALFORMED_REQUEST", "HTTP/0.9 requests are not served.")
        else:
            raise unsupported_version()
    if message.chunked and _codings(message) != ["chunked"]:
        # The body would go upstream still in a coding nothing along the way decodes.
        raise _refused(
            501, "UNSUPPORTED_TRANSFER_CODING", "Only the chunked transfer coding is accepted in requests."
        )
    if message.path[:1] != "/":
        message = _origin_form(message)
    host = message.headers.get("Host")
    if host is not None and not _HOST.fullmatch(host):
        raise _refused(400, "MALFORMED_REQUEST", "The Host header is not a valid host[:port].")
    return message


def _codings(message: RawRequestMessage) -> list[str]:
    lines = message.headers.getall("Transfer-Encoding", ())
    return [coding.strip().lower() for line in lines for coding in line.split(",")]


def expects_continue(request: BaseRequest) -> bool:
    """The client waits for 100 Continue before it sends its body (RFC 9110 §10.1.1; HTTP/1.1 only)."""
    return request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


def unsupported_version() -> Refused:
    return _refused(505, "HTTP_VERSION_NOT_SUPPORTED", "Only HTTP/1.0 and HTTP/1.1 are served.")


def _origin_form(message: RawRequestMessage) -> RawRequestMessage:
    """An absolute-form target as origin form; its authority replaces Host (RFC 9112 §3.2.2). The
    asterisk-form (`OPTIONS *`) and anything else are left for routing to answer."""
    match = _ABSOLUTE_FORM.fullmatch(message.path)
    if match is None:
        if message.path == "*" and message.method != "OPTIONS":
            raise _refused(400, "MALFORMED_REQUEST", "The asterisk-form target is only for OPTIONS.")
        return message
    authority, rest = match["authority"], match["rest"]
    if not authority or "@" in authority:
        raise _refused(400, "MALFORMED_REQUEST", "The request target's authority is not a valid host[:port].")
    path = rest if rest.startswith("/") else "/" + rest
    headers = CIMultiDict(message.headers)
    headers["Host"] = authority
    raw_headers = tuple((n, v) for n, v in message.raw_headers if n.lower() != b"host")
    return message._replace(
        path=path,
        url=URL(path, encoded=True),
        headers=CIMultiDictProxy(headers),
        raw_headers=((b"Host", authority.encode("latin-1")), *raw_headers),
    )
