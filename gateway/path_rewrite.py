"""A prefix route's rewrite of the request target (Kong's `strip_path`, Envoy's `prefix_rewrite`).

Pure: the raw target in, the upstream's target out. Routes match the decoded path in any letter case
(routing.routable_path), so the client may have spelled the matched prefix `/%61pi`, `/API` or with a
character that folds onto an ASCII one (the Kelvin sign onto `k`). Python's regular expressions fold one
character onto one character, so the matched prefix is always as many decoded characters as the route's
prefix has: the raw target is read character by character until that many were decoded, and that raw
spelling is replaced. Everything after it (the rest of the path and the query) stays byte-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

_HEX = frozenset("0123456789abcdefABCDEF")
_ENCODED_SLASHES = ("%2F", "%2f")


class PrefixNotFound(ValueError):
    """The target's path does not begin with the prefix's number of characters then a segment's end: the
    caller handed over a target its route did not match."""


@dataclass(frozen=True, slots=True)
class PrefixRewrite:
    """Replaces a matched prefix of `prefix_chars` decoded characters with `replacement`."""

    prefix_chars: int
    """Characters of the route's prefix without its trailing slash (0 for the root prefix `/`)."""
    replacement: str
    """What takes its place: "" strips it; never ends with "/", so no slash is ever doubled."""

    def apply(self, target: str) -> str:
        """The upstream's target for a raw target this route matched."""
        end = prefix_end(target, self.prefix_chars)
        rest = target[end:]
        if rest.startswith(_ENCODED_SLASHES):
            # The route table read this slash as the segment boundary; written as one, the upstream reads
            # the path as the route table did, whether or not it decodes %2F (kept encoded, "/v1.0%2Fcalls"
            # is one segment to a server that does not; stripped, "%2Fcalls" is no target at all).
            rest = "/" + rest[3:]
        if not rest or rest[0] in "?#":
            return (self.replacement or "/") + rest
        if rest[0] != "/":
            raise PrefixNotFound(f"the prefix ends inside a segment of {target[:200]!r}")
        return self.replacement + rest


def prefix_end(target: str, chars: int) -> int:
    """Where in the raw target the first `chars` characters of its decoded path end.

    A percent-escape is one byte: an ASCII byte or a UTF-8 lead byte begins a character, a continuation
    byte (0x80-0xBF) belongs to the character before it. Anything else in the raw target is a character of
    its own. The target must be one routing accepted (routable_path checked its escapes are UTF-8).
    """
    index, seen, size = 0, 0, len(target)
    while index < size:
        char = target[index]
        if char in "?#":
            break
        step = 1
        if char == "%" and target[index + 1 : index + 2] in _HEX and target[index + 2 : index + 3] in _HEX:
            step = 3
            if 0x80 <= int(target[index + 1 : index + 3], 16) < 0xC0:
                index += step
                continue
        if seen == chars:
            return index
        seen += 1
        index += step
    if seen < chars:
        raise PrefixNotFound(f"{target[:200]!r} has fewer than {chars} characters in its path")
    return index
