"""X-Request-ID: keep a sane inbound value, otherwise mint one."""

from __future__ import annotations

import os
import random
import re

HEADER = "X-Request-ID"
MAX_LENGTH = 128
# Restrictive on purpose: the id lands in logs, JSON bodies and upstream headers unescaped.
_SANE = re.compile(rf"[A-Za-z0-9._:@/+=-]{{1,{MAX_LENGTH}}}")

# Minted ids are "req_" and 32 hex digits: 128 bits from a generator seeded with the kernel's randomness once
# per process (and again in a forked child), so minting costs no system call (os.urandom was a getrandom(2)
# per request). Ids correlate log lines; they are not secrets (a client may send its own), only unique across
# requests, processes and restarts, which independently seeded 128-bit draws are.
_generator = random.Random()  # seeded from os.urandom
_draw = _generator.getrandbits
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_generator.seed)  # a forked worker must not repeat its parent's ids


def new_request_id() -> str:
    return "req_" + _draw(128).to_bytes(16, "big").hex()


def is_sane(value: str) -> bool:
    return _SANE.fullmatch(value) is not None


def accept_or_new(inbound: str | None) -> str:
    if inbound is not None and is_sane(inbound):
        return inbound
    return new_request_id()
