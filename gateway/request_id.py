"""X-Request-ID: keep a sane inbound value, otherwise mint one."""

from __future__ import annotations

import os
import re

HEADER = "X-Request-ID"
MAX_LENGTH = 128
# Restrictive on purpose: the id lands in logs, JSON bodies and upstream headers unescaped.
_SANE = re.compile(rf"[A-Za-z0-9._:@/+=-]{{1,{MAX_LENGTH}}}")


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


def is_sane(value: str) -> bool:
    return _SANE.fullmatch(value) is not None


def accept_or_new(inbound: str | None) -> str:
    if inbound is not None and is_sane(inbound):
        return inbound
    return new_request_id()
