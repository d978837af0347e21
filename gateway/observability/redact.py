"""Paths as they may appear in logs: credential-bearing query parameters replaced, everything else kept."""

from __future__ import annotations

import re
from collections.abc import Collection
from urllib.parse import unquote_plus

_SEPARATORS = re.compile(r"([&;])")  # some servers split pairs on ";" as well

REDACTED = "[redacted]"


def redact_target(raw_target: str, secret_params: Collection[str]) -> str:
    """`/calls?accesskey=abc&page=2` → `/calls?accesskey=[redacted]&page=2` (names matched decoded and
    case-insensitively, so `AccessKey` or `access%6Bey` are caught too)."""
    path, sep, query = raw_target.partition("?")
    if not sep:
        return raw_target
    parts = []
    for part in _SEPARATORS.split(query):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}={REDACTED}" if eq and unquote_plus(name).lower() in secret_params else part)
    return f"{path}?{''.join(parts)}"
