"""Where the gateway's own access keys live (Redis, a YAML file) and the verifier that asks them in order.

Stores hold only HMAC-SHA256(pepper, key) and the record; the plaintext key is shown once, at creation.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio
import yaml
from cachetools import TLRUCache
from redis.exceptions import RedisError

from gateway.auth.access_keys import KeyRecord, generate_id, generate_key, key_hash, well_formed
from gateway.auth.identity import Identity, InvalidCredential, VerifierUnavailable
from gateway.config import AccessKeysConfig

# One hash tag for every key, so they share a Cluster slot and MULTI/pipelines work there too.
REDIS_PREFIX = "gw:ak:{gw}:"
REDIS_IDS = REDIS_PREFIX + "ids"
STORE_ERRORS = (RedisError, OSError)  # redis-py's ConnectionError/TimeoutError are not OSErrors

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_FIELDS = (
    "id",
    "hash",
    "customer_id",
    "team_id",
    "name",
    "plan",
    "created_at",
    "expires_at",
    "revoked_at",
)


class NotOurs(InvalidCredential):
    """Without the prefix of the keys this gateway issues; the caller may still ask introspection about it."""

    def __init__(self) -> None:
        super().__init__("unknown_format")


class KeyStore(Protocol):
    async def lookup(self, digest: str) -> KeyRecord | None: ...


def _redis_hash(digest: str) -> str:
    return f"{REDIS_PREFIX}h:{digest}"


def _redis_id(key_id: str) -> str:
    return f"{REDIS_PREFIX}id:{key_id}"


def _to_fields(record: KeyRecord) -> dict[str, str]:
    # None is stored as an absent field: a Redis hash has no null.
    values: dict[str, str | float | None] = {
        "id": record.id,
        "customer_id": record.customer_id,
        "team_id": record.team_id,
        "name": record.name,
        "plan": record.plan,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
    }
    return {name: repr(v) if isinstance(v, float) else v for name, v in values.items() if v is not None}


def _from_fields(fields: Mapping[str, str]) -> KeyRecord:
    def epoch(name: str) -> float | None:
        value = fields.get(name)
        return None if value is None else float(value)

    return KeyRecord(
        id=fields["id"],
        customer_id=fields["customer_id"],
        team_id=fields.get("team_id"),
        name=fields.get("name"),
        created_at=float(fields["created_at"]),
        expires_at=epoch("expires_at"),
        revoked_at=epoch("revoked_at"),
        plan=fields.get("plan"),
    )


class RedisKeyStore:
    """Keys created with `voipbin-gateway keys create`, shared by every gateway instance.

    Layout: `gw:ak:{gw}:h:<hash>` (a hash with the record), `gw:ak:{gw}:id:<id>` → hash, and the set
    `gw:ak:{gw}:ids`. Records are kept after expiry and revocation so `keys list` can still show them.
    The pepper is only needed by create(); listing and revoking work without it.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        pepper: bytes | None,
        *,
        prefix: str = "vbgw_",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._pepper = pepper
        self._prefix = prefix
        self._clock = clock

    async def create(
        self,
        customer_id: str,
        team_id: str | None = None,
        name: str | None = None,
        expires_in: float | None = None,
        plan: str | None = None,
    ) -> tuple[str, KeyRecord]:
        if not self._pepper:
            raise ValueError("creating a key needs the pepper")
        if not customer_id:
            raise ValueError("a key needs a customer id")
        now = self._clock()
        key = generate_key(self._prefix)
        digest = key_hash(key, self._pepper)
        record = KeyRecord(
            id=generate_id(),
            customer_id=customer_id,
            team_id=team_id or None,
            name=name or None,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
            plan=plan or None,
        )
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(_redis_hash(digest), mapping=_to_fields(record))
            pipe.set(_redis_id(record.id), digest)
            pipe.sadd(REDIS_IDS, record.id)
            await pipe.execute()
        return key, record

    async def lookup(self, digest: str) -> KeyRecord | None:
        fields = await self._client.hgetall(_redis_hash(digest))
        return _from_fields(fields) if fields else None

    async def list(self) -> list[KeyRecord]:
        ids = list(await self._client.smembers(REDIS_IDS))
        async with self._client.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.get(_redis_id(key_id))
            digests = await pipe.execute()
        async with self._client.pipeline(transaction=False) as pipe:
            for digest in digests:
                if digest:
                    pipe.hgetall(_redis_hash(digest))
            rows = await pipe.execute()
        return sorted((_from_fields(row) for row in rows if row), key=lambda r: (r.created_at, r.id))

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Revoked from now on; revoking again keeps the first revocation time. None for an unknown id."""
        digest = await self._client.get(_redis_id(key_id))
        if not digest or not await self._client.exists(_redis_hash(digest)):
            return None
        await self._client.hsetnx(_redis_hash(digest), "revoked_at", repr(self._clock()))
        return await self.lookup(digest)


class FileKeyStore:
    """Keys listed in a YAML file (entries printed by `voipbin-gateway keys hash`), read once at start."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._records = _load_keys_file(self.path)

    def __len__(self) -> int:
        return len(self._records)

    async def lookup(self, digest: str) -> KeyRecord | None:
        return self._records.get(digest)


def _load_keys_file(path: Path) -> dict[str, KeyRecord]:
    where = f"keys file {path}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"keys"}:
        raise ValueError(f"{where}: must be a mapping with the single key `keys:`, a list of entries")
    entries = data["keys"] or []
    if not isinstance(entries, list):
        raise ValueError(f"{where}: `keys:` must be a list of entries")
    records: dict[str, KeyRecord] = {}
    ids: set[str] = set()
    for index, entry in enumerate(entries):
        digest, record = _file_entry(entry, f"{where}: keys[{index}]")
        if digest in records or record.id in ids:
            field = "hash" if digest in records else "id"
            raise ValueError(f"{where}: keys[{index}] (id {record.id!r}): field '{field}': used twice")
        records[digest] = record
        ids.add(record.id)
    return records


def _file_entry(entry: Any, where: str) -> tuple[str, KeyRecord]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a mapping with the fields {', '.join(_FILE_FIELDS)}")
    if isinstance(entry.get("id"), str) and entry["id"]:
        where = f"{where} (id {entry['id']!r})"
    for field in entry:
        if field not in _FILE_FIELDS:
            raise ValueError(f"{where}: unknown field {field!r}; allowed: {', '.join(_FILE_FIELDS)}")

    def text(field: str, *, required: bool) -> str | None:
        value = entry.get(field)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            kind = "a non-empty string (quote numbers)" + ("" if required else " or null")
            raise ValueError(f"{where}: field '{field}': must be {kind}")
        return value

    def epoch(field: str, *, required: bool) -> float | None:
        value = entry.get(field)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            kind = "seconds since the Unix epoch (a number)" + ("" if required else " or null")
            raise ValueError(f"{where}: field '{field}': must be {kind}")
        return float(value)

    digest = text("hash", required=True)
    assert digest is not None
    if not _HEX64.fullmatch(digest):
        raise ValueError(f"{where}: field 'hash': must be 64 lowercase hex characters (HMAC-SHA256)")
    key_id, customer_id = text("id", required=True), text("customer_id", required=True)
    created_at = epoch("created_at", required=True)
    assert key_id is not None and customer_id is not None and created_at is not None
    return digest, KeyRecord(
        id=key_id,
        customer_id=customer_id,
        team_id=text("team_id", required=False),
        name=text("name", required=False),
        created_at=created_at,
        expires_at=epoch("expires_at", required=False),
        revoked_at=epoch("revoked_at", required=False),
        plan=text("plan", required=False),
    )


_MISSING = object()


class AccessKeyVerifier:
    """Key → Identity through the stores in order; the first store that knows the key decides.

    Answers (unknown keys too) are cached for at most `cache_ttl` seconds, which bounds how long a revocation
    takes to apply; expiry is rechecked on every hit, so it applies on time.
    """

    def __init__(
        self,
        stores: Sequence[KeyStore],
        prefix: str,
        cache_ttl: float,
        cache_size: int,
        *,
        pepper: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stores = tuple(stores)
        self._prefix = prefix
        self._pepper = pepper
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._cache: TLRUCache[str, KeyRecord | None] | None = (
            TLRUCache(cache_size, self._expires, timer=clock) if cache_size > 0 else None
        )

    def _expires(self, _digest: str, record: KeyRecord | None, now: float) -> float:
        ttl = self._cache_ttl
        if record is not None and record.expires_at is not None:
            ttl = min(ttl, record.expires_at - now)
        return now + ttl

    async def verify(self, key: str) -> Identity:
        if not key.startswith(self._prefix):
            raise NotOurs()
        if not well_formed(key, self._prefix):  # a typo or a forgery: no store is asked
            raise InvalidCredential("malformed_key")
        digest = key_hash(key, self._pepper)
        found: Any = self._cache.get(digest, _MISSING) if self._cache is not None else _MISSING
        if found is _MISSING:
            found = await self._lookup(digest)
            if self._cache is not None:
                self._cache[digest] = found
        if found is None:
            raise InvalidCredential("unknown_key")
        return found.to_identity(self._clock())

    async def _lookup(self, digest: str) -> KeyRecord | None:
        error: BaseException | None = None
        for store in self._stores:
            try:
                record = await store.lookup(digest)
            except STORE_ERRORS as exc:
                error = exc
                continue
            if record is not None:
                return record
        if error is not None:
            # "Unknown" would be a guess while a store that may know the key is unreachable.
            raise VerifierUnavailable("key_store") from error
        return None


def load_pepper(config: AccessKeysConfig, environ: Mapping[str, str] = os.environ) -> bytes:
    """The HMAC key for key hashes; errors name the setting, never the value."""
    if config.pepper_env and config.pepper_file:
        raise ValueError("auth.access_keys: set pepper_env or pepper_file, not both")
    if config.pepper_env:
        value = environ.get(config.pepper_env, "")
        if not value:
            raise ValueError(
                f"auth.access_keys.pepper_env: environment variable {config.pepper_env} is not set or empty"
            )
        return value.encode("utf-8")
    if config.pepper_file:
        try:
            raw = Path(config.pepper_file).read_bytes()
        except OSError as exc:
            raise ValueError(
                f"auth.access_keys.pepper_file: cannot read {config.pepper_file}: {exc.strerror or exc}"
            ) from None
        # Editors and `echo` end files with a newline that is not part of the secret.
        pepper = raw.rstrip(b"\r\n")
        if not pepper:
            raise ValueError(f"auth.access_keys.pepper_file: {config.pepper_file} is empty")
        return pepper
    raise ValueError("auth.access_keys.pepper_env or auth.access_keys.pepper_file must be set")
