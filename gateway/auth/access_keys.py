"""Access keys the gateway issues itself: format, checksum, peppered hash and the stored record. No I/O.

A key is `<prefix><32 random base62 chars><6 base62 chars of CRC32(prefix + random)>`. The checksum is not a
secret: it lets the gateway reject typos and other credentials (the API's own access keys) without a
lookup, and lets secret scanners recognise a leaked key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

from gateway.auth.identity import Identity, InvalidCredential, is_identifier_text

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS = 32  # ~190 bits: no pepper or rate limit is needed to make guessing hopeless
CHECKSUM_CHARS = 6  # 62**6 > 2**32, so any CRC32 fits
ID_CHARS = 12
CREDENTIAL_TYPE = "accesskey"

_BODY = re.compile(f"[0-9A-Za-z]{{{RANDOM_CHARS + CHECKSUM_CHARS}}}")
_DURATION = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _random_base62(length: int) -> str:
    out: list[str] = []
    while len(out) < length:
        for byte in secrets.token_bytes(length):
            # 248 = 4 * 62: bytes above it are dropped so every character is equally likely.
            if byte < 248 and len(out) < length:
                out.append(ALPHABET[byte % 62])
    return "".join(out)


def _checksum(text: str) -> str:
    value = zlib.crc32(text.encode("ascii"))
    digits = []
    for _ in range(CHECKSUM_CHARS):
        value, digit = divmod(value, 62)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def generate_key(prefix: str) -> str:
    head = prefix + _random_base62(RANDOM_CHARS)
    return head + _checksum(head)


def generate_id() -> str:
    """A short public id for a key: safe to log, list and type into `keys revoke`."""
    return _random_base62(ID_CHARS)


def well_formed(key: str, prefix: str) -> bool:
    """Prefix, charset, length and checksum; False for anything that cannot be one of our keys."""
    if len(key) != len(prefix) + RANDOM_CHARS + CHECKSUM_CHARS or not key.startswith(prefix):
        return False
    body = key[len(prefix) :]
    if not _BODY.fullmatch(body):
        return False
    head, check = key[:-CHECKSUM_CHARS], key[-CHECKSUM_CHARS:]
    return hmac.compare_digest(_checksum(head), check)


def key_hash(key: str, pepper: bytes) -> str:
    """The only form of a key that is stored or looked up. The pepper lives outside the store, so a copy of
    Redis or of the keys file alone cannot even confirm a guessed key."""
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What a store knows about one key; times are Unix epoch seconds."""

    id: str
    customer_id: str
    team_id: str | None
    name: str | None
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    plan: str | None = None
    """Names the plan whose values rate-limit policies apply (`plans:`), as a plan claim does for a JWT."""

    def check(self, now: float) -> None:
        # Any revocation time counts, even one slightly ahead of this host's clock.
        if self.revoked_at is not None:
            raise InvalidCredential("revoked")
        if self.expires_at is not None and now >= self.expires_at:
            raise InvalidCredential("expired")

    def to_identity(self, now: float) -> Identity:
        self.check(now)
        # A record edited by hand (or in Redis) could hold a line break, which would end a header line
        # toward the upstream: refused like a JWT whose identity claims are not identifiers.
        if not all(is_identifier_text(v) for v in (self.id, self.customer_id, self.team_id or "")):
            raise InvalidCredential("record_identifiers")
        return Identity(
            credential_type=CREDENTIAL_TYPE,
            customer_id=self.customer_id,
            team_id=self.team_id,
            credential_id=self.id,
            plan=self.plan,
            expires_at=self.expires_at,
        )


def parse_duration(text: str) -> float:
    """Seconds in "30d", "12h", "15m" or "3600s"."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(
            f"invalid duration {text!r}: use a positive whole number followed by one unit, "
            "s (seconds), m (minutes), h (hours) or d (days), for example 30d, 12h, 15m or 3600s"
        )
    return float(int(match[1]) * _UNITS[match[2]])
