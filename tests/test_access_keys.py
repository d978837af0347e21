"""The gateway's own access keys: format and checksum, peppered hashes, the Redis and file stores, and the
verifier's order, caching, revocation, expiry and outages. Redis is always a real redis-server."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import yaml
from redis.crc import key_slot
from redis_server import RedisProcess

from gateway import redis_client
from gateway.auth import access_keys
from gateway.auth.access_keys import (
    ALPHABET,
    KeyRecord,
    generate_key,
    key_hash,
    parse_duration,
    well_formed,
)
from gateway.auth.identity import Identity, InvalidCredential, VerifierUnavailable
from gateway.auth.key_stores import (
    AccessKeyVerifier,
    FileKeyStore,
    KeyStore,
    NotOurs,
    RedisKeyStore,
    load_pepper,
)
from gateway.config import AccessKeysConfig

PEPPER = b"pepper-for-tests"
PREFIX = "vbgw_"
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingStore:
    """A store in memory that remembers every lookup, or fails every one of them."""

    def __init__(self, records: dict[str, KeyRecord] | None = None, fail: Exception | None = None) -> None:
        self.records = records or {}
        self.fail = fail
        self.lookups: list[str] = []

    async def lookup(self, digest: str) -> KeyRecord | None:
        self.lookups.append(digest)
        if self.fail is not None:
            raise self.fail
        return self.records.get(digest)


def record(key_id: str = "id1", customer: str = "cust-1", **extra: Any) -> KeyRecord:
    fields: dict[str, Any] = {"team_id": None, "name": None, "created_at": T0, **extra}
    return KeyRecord(id=key_id, customer_id=customer, **fields)


def verifier(
    stores: list[KeyStore], clock: Clock, *, cache_ttl: float = 30.0, cache_size: int = 100
) -> AccessKeyVerifier:
    return AccessKeyVerifier(stores, PREFIX, cache_ttl, cache_size, pepper=PEPPER, clock=clock)


def keys_file(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False), encoding="utf-8")
    return path


def file_entry(key: str, key_id: str = "file1", customer: str = "cust-file", **extra: Any) -> dict[str, Any]:
    return {
        "id": key_id,
        "hash": key_hash(key, PEPPER),
        "customer_id": customer,
        "team_id": None,
        "name": None,
        "created_at": T0,
        "expires_at": None,
        "revoked_at": None,
        **extra,
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def rds(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis_client.connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def store(rds: redis.asyncio.Redis, clock: Clock) -> RedisKeyStore:
    return RedisKeyStore(rds, PEPPER, prefix=PREFIX, clock=clock)


# ------------------------------------------------------------------------------------------------ format


def test_generated_keys_are_well_formed_and_distinct() -> None:
    keys = {generate_key(PREFIX) for _ in range(500)}
    assert len(keys) == 500
    for key in keys:
        assert key.startswith(PREFIX) and len(key) == len(PREFIX) + 38
        assert set(key[len(PREFIX) :]) <= set(ALPHABET)
        assert well_formed(key, PREFIX)
    # All 62 characters turn up in the random part: it is base62, not hex or a narrower set.
    assert set("".join(k[len(PREFIX) : -6] for k in keys)) == set(ALPHABET)
    assert well_formed(generate_key("other_"), "other_")


def test_random_characters_are_uniform() -> None:
    # byte % 62 without dropping bytes >= 248 would make "0".."7" 25% more likely than the rest.
    counts = Counter(access_keys._random_base62(62 * 2000))
    low = sum(counts[c] for c in ALPHABET[:8]) / 8
    rest = sum(counts[c] for c in ALPHABET[8:]) / 54
    assert 0.92 < low / rest < 1.08


def test_every_single_character_change_is_caught_by_the_checksum() -> None:
    key = generate_key(PREFIX)
    for position in range(len(PREFIX), len(key)):
        for replacement in ("0", "z", "Q"):
            if key[position] != replacement:
                changed = key[:position] + replacement + key[position + 1 :]
                assert not well_formed(changed, PREFIX), (position, replacement)


def test_wrong_prefix_length_checksum_or_charset_is_not_well_formed() -> None:
    key = generate_key(PREFIX)
    body = key[len(PREFIX) :]
    assert not well_formed(generate_key("other_"), PREFIX)
    assert not well_formed("vbgx_" + body, PREFIX)
    assert not well_formed(key[:-1], PREFIX)
    assert not well_formed(key + "0", PREFIX)
    assert not well_formed("", PREFIX)
    bad_sum = "000000" if key[-6:] != "000000" else "000001"
    assert not well_formed(key[:-6] + bad_sum, PREFIX)
    # A valid checksum over characters outside base62 is still rejected.
    for odd in ("-", " ", "_", "é"):
        head = PREFIX + odd * 32
        forged = head + access_keys._checksum(head) if odd.isascii() else head + "000000"
        assert len(forged) == len(key)
        assert not well_formed(forged, PREFIX)


def test_key_hash_is_hmac_sha256_with_the_pepper() -> None:
    key = generate_key(PREFIX)
    expected = hmac.new(PEPPER, key.encode(), hashlib.sha256).hexdigest()
    assert key_hash(key, PEPPER) == expected
    assert key_hash(key, b"another pepper") != expected
    assert key_hash(key, PEPPER) != hashlib.sha256(key.encode()).hexdigest()


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("15m", 900), ("3600s", 3600), ("1d", 86400)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "1w", "", "-5m", "0s", "1.5h", "5 m", "d", "10D"])
def test_parse_duration_rejects_with_the_allowed_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"s \(seconds\), m \(minutes\), h \(hours\) or d \(days\)"):
        parse_duration(text)


def test_record_checks_revocation_then_expiry() -> None:
    active = record(expires_at=T0 + 10)
    assert active.to_identity(T0 + 9.9) == Identity(
        credential_type="accesskey", customer_id="cust-1", credential_id="id1", expires_at=T0 + 10
    )
    with pytest.raises(InvalidCredential) as exc:
        active.check(T0 + 10)
    assert exc.value.check == "expired"
    with pytest.raises(InvalidCredential) as exc:
        record(expires_at=T0 + 10, revoked_at=T0 + 5).to_identity(T0 + 20)
    assert exc.value.check == "revoked"


def test_a_keys_plan_is_the_identitys_plan() -> None:
    """Plan-dependent policy values (`plans:`) apply to access keys as to tokens with a plan claim."""
    assert record(plan="pro").to_identity(T0).plan == "pro"
    assert record().to_identity(T0).plan is None


# ------------------------------------------------------------------------------------------------- pepper


def test_load_pepper_from_env_and_file(tmp_path: Path) -> None:
    assert load_pepper(AccessKeysConfig(pepper_env="P"), {"P": "s3cret"}) == b"s3cret"
    (tmp_path / "pepper").write_bytes(b"from-file\n")
    assert load_pepper(AccessKeysConfig(pepper_file=str(tmp_path / "pepper")), {}) == b"from-file"


@pytest.mark.parametrize(
    ("settings", "environ", "names"),
    [
        ({"pepper_env": "P"}, {}, "pepper_env: environment variable P"),
        ({"pepper_env": "P"}, {"P": ""}, "pepper_env: environment variable P"),
        ({"pepper_file": "EMPTY"}, {}, "pepper_file"),
        ({"pepper_file": "MISSING"}, {}, "pepper_file: cannot read"),
        ({}, {}, "pepper_env or auth.access_keys.pepper_file"),
        ({"pepper_env": "P", "pepper_file": "EMPTY"}, {"P": "x"}, "not both"),
    ],
)
def test_load_pepper_errors_name_the_setting(
    tmp_path: Path, settings: dict[str, str], environ: dict[str, str], names: str
) -> None:
    (tmp_path / "EMPTY").write_bytes(b"\n")
    resolved = {k: str(tmp_path / v) if k == "pepper_file" else v for k, v in settings.items()}
    with pytest.raises(ValueError, match=names):
        load_pepper(AccessKeysConfig(**resolved), environ)


# ------------------------------------------------------------------------------------------------- redis


async def test_create_then_verify_gives_the_identity(store: RedisKeyStore, clock: Clock) -> None:
    key, created = await store.create("cust-1", "team-1", "billing", expires_in=3600)
    assert well_formed(key, PREFIX)
    assert created.created_at == T0 and created.expires_at == T0 + 3600 and created.revoked_at is None
    assert await store.lookup(key_hash(key, PEPPER)) == created
    assert await store.list() == [created]

    identity = await verifier([store], clock).verify(key)
    assert identity == Identity(
        credential_type="accesskey",
        customer_id="cust-1",
        team_id="team-1",
        credential_id=created.id,
        expires_at=T0 + 3600,
    )


async def test_redis_holds_no_plaintext_key(store: RedisKeyStore, redis_url: str) -> None:
    keys = [(await store.create(f"cust-{i}", "team", f"name-{i}"))[0] for i in range(3)]
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        dump: list[str] = []
        for name in sync.scan_iter("*"):
            dump.append(name)
            kind = sync.type(name)
            if kind == "hash":
                dump += [f"{k}={v}" for k, v in sync.hgetall(name).items()]
            elif kind == "string":
                dump.append(sync.get(name))
            elif kind == "set":
                dump += sync.smembers(name)
            else:
                raise AssertionError(f"unexpected {kind} at {name}")
    finally:
        sync.close()
    everything = "\n".join(dump)
    for key in keys:
        assert key_hash(key, PEPPER) in everything  # the check below looks in the right place
        assert key not in everything
        assert key[len(PREFIX) : -6] not in everything
        assert key_hash(key, b"") not in everything


async def test_every_redis_key_uses_the_gw_hash_tag(store: RedisKeyStore, redis_url: str) -> None:
    _, created = await store.create("cust-1")
    await store.revoke(created.id)
    sync = redis.Redis.from_url(redis_url)
    try:
        names = list(sync.scan_iter("*"))
    finally:
        sync.close()
    assert len(names) == 3  # hash, id index, id set
    for name in names:
        assert name.startswith(b"gw:ak:{gw}:")
        assert key_slot(name) == key_slot(b"{gw}")


async def test_revocation_applies_within_the_cache_ttl(store: RedisKeyStore, clock: Clock) -> None:
    key, created = await store.create("cust-1")
    cached = verifier([store], clock, cache_ttl=30)
    await cached.verify(key)

    revoked = await store.revoke(created.id)
    assert revoked is not None and revoked.revoked_at == T0
    clock.advance(29)
    assert (await cached.verify(key)).credential_id == created.id  # still cached: no lookup yet
    clock.advance(2)
    with pytest.raises(InvalidCredential) as exc:
        await cached.verify(key)
    assert exc.value.check == "revoked"

    # Revoking again keeps the first time; an unknown id is None.
    again = await store.revoke(created.id)
    assert again is not None and again.revoked_at == T0
    assert await store.revoke("no-such-id") is None
    assert [r.revoked_at for r in await store.list()] == [T0]


async def test_without_a_cache_revocation_is_immediate(store: RedisKeyStore, clock: Clock) -> None:
    key, created = await store.create("cust-1")
    uncached = verifier([store], clock, cache_size=0)
    await uncached.verify(key)
    await store.revoke(created.id)
    with pytest.raises(InvalidCredential, match="revoked"):
        await uncached.verify(key)


async def test_expiry_applies_at_expires_at_even_when_cached(store: RedisKeyStore, clock: Clock) -> None:
    key, _ = await store.create("cust-1", expires_in=100)
    cached = verifier([store], clock, cache_ttl=1000)
    await cached.verify(key)
    clock.advance(99.9)
    await cached.verify(key)
    clock.advance(0.1)
    with pytest.raises(InvalidCredential) as exc:
        await cached.verify(key)
    assert exc.value.check == "expired"


async def test_cache_entries_live_no_longer_than_the_key(clock: Clock) -> None:
    key = generate_key(PREFIX)
    store = RecordingStore({key_hash(key, PEPPER): record(expires_at=T0 + 10)})
    cached = verifier([store], clock, cache_ttl=30)
    await cached.verify(key)
    clock.advance(5)
    await cached.verify(key)
    assert len(store.lookups) == 1
    clock.advance(6)
    with pytest.raises(InvalidCredential, match="expired"):
        await cached.verify(key)
    assert len(store.lookups) == 2  # the entry went at expires_at, not after cache_ttl


async def test_unknown_keys_are_cached_for_the_ttl(clock: Clock) -> None:
    store = RecordingStore()
    cached = verifier([store], clock, cache_ttl=30)
    key = generate_key(PREFIX)
    for _ in range(3):
        with pytest.raises(InvalidCredential) as exc:
            await cached.verify(key)
        assert exc.value.check == "unknown_key" and not isinstance(exc.value, NotOurs)
    assert store.lookups == [key_hash(key, PEPPER)]
    clock.advance(30)
    with pytest.raises(InvalidCredential):
        await cached.verify(key)
    assert len(store.lookups) == 2


async def test_malformed_keys_are_refused_without_a_lookup(clock: Clock) -> None:
    store = RecordingStore()
    check = verifier([store], clock)
    good = generate_key(PREFIX)
    near_copies = [good[:-1] + ("0" if good[-1] != "0" else "1"), good[:-1], good + "x", PREFIX]
    for key in near_copies:  # our prefix: ours to decide, and never another verifier's
        with pytest.raises(InvalidCredential) as exc:
            await check.verify(key)
        assert exc.value.check == "malformed_key" and not isinstance(exc.value, NotOurs)
    for key in [generate_key("other_"), "eyJhbGciOiJIUzI1NiJ9.e30.sig", ""]:
        with pytest.raises(NotOurs) as exc:
            await check.verify(key)
        assert exc.value.check == "unknown_format" and isinstance(exc.value, InvalidCredential)
    assert store.lookups == []
    with pytest.raises(InvalidCredential, match="unknown_key"):
        await check.verify(good)
    assert store.lookups == [key_hash(good, PEPPER)]  # the recorder does see lookups


# -------------------------------------------------------------------------------------------------- file


async def test_file_store_loads_and_verifies(tmp_path: Path, clock: Clock) -> None:
    active, revoked, expired = generate_key(PREFIX), generate_key(PREFIX), generate_key(PREFIX)
    path = keys_file(
        tmp_path / "keys.yaml",
        [
            file_entry(active, "a", team_id="team-a", name="ci", expires_at=T0 + 60),
            file_entry(revoked, "r", revoked_at=T0 - 1),
            file_entry(expired, "e", expires_at=T0 - 1),
        ],
    )
    store = FileKeyStore(path)
    assert len(store) == 3
    assert await store.lookup(key_hash(active, PEPPER)) == KeyRecord(
        id="a", customer_id="cust-file", team_id="team-a", name="ci", created_at=T0, expires_at=T0 + 60
    )
    check = verifier([store], clock)
    identity = await check.verify(active)
    assert (identity.customer_id, identity.team_id, identity.credential_id) == ("cust-file", "team-a", "a")
    for key, reason in ((revoked, "revoked"), (expired, "expired"), (generate_key(PREFIX), "unknown_key")):
        with pytest.raises(InvalidCredential) as exc:
            await check.verify(key)
        assert exc.value.check == reason


async def test_a_plan_is_kept_by_both_stores(tmp_path: Path, store: RedisKeyStore, clock: Clock) -> None:
    key = generate_key(PREFIX)
    path = keys_file(tmp_path / "keys.yaml", [file_entry(key, "a", plan="pro")])
    assert (await verifier([FileKeyStore(path)], clock).verify(key)).plan == "pro"
    key, _ = await store.create("cust-1", plan="pro")
    assert (await verifier([store], clock).verify(key)).plan == "pro"


def test_file_store_accepts_an_empty_list(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("keys:\n", encoding="utf-8")
    assert len(FileKeyStore(tmp_path / "keys.yaml")) == 0


GOOD = file_entry(generate_key(PREFIX), "k1")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{**GOOD, "hash": "abc"}], r"keys\[0\] \(id 'k1'\): field 'hash': must be 64 lowercase hex"),
        ([{**GOOD, "hash": GOOD["hash"].upper()}], r"keys\[0\] \(id 'k1'\): field 'hash'"),
        ([{k: v for k, v in GOOD.items() if k != "hash"}], r"keys\[0\] \(id 'k1'\): field 'hash'"),
        ([{**GOOD, "customer_id": 42}], r"keys\[0\] \(id 'k1'\): field 'customer_id': must be a non-empty"),
        ([{**GOOD, "id": ""}], r"keys\[0\]: field 'id'"),
        ([{**GOOD, "created_at": "yesterday"}], r"field 'created_at': must be seconds since the Unix epoch"),
        ([{**GOOD, "expires_at": True}], r"field 'expires_at'"),
        ([{**GOOD, "expire_at": 1}], r"keys\[0\] \(id 'k1'\): unknown field 'expire_at'"),
        ([GOOD, {**GOOD, "hash": "0" * 64}], r"keys\[1\] \(id 'k1'\): field 'id': used twice"),
        ([GOOD, {**GOOD, "id": "k2"}], r"keys\[1\] \(id 'k2'\): field 'hash': used twice"),
        (["just a string"], r"keys\[0\]: must be a mapping"),
    ],
)
def test_bad_keys_file_names_the_entry_and_field(tmp_path: Path, entries: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FileKeyStore(keys_file(tmp_path / "keys.yaml", entries))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- id: x\n", "single key `keys:`"),
        ("keys: {id: x}\n", "must be a list"),
        ("keys: [\n", "not valid YAML"),
        (None, "cannot be read"),
    ],
)
def test_bad_keys_file_shape(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "keys.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"keys file {path}: .*{message}"):
        FileKeyStore(path)


# --------------------------------------------------------------------------------------------- the chain


async def test_the_first_store_that_knows_a_key_decides(
    store: RedisKeyStore, tmp_path: Path, clock: Clock
) -> None:
    shared, _ = await store.create("cust-redis")
    only_redis, _ = await store.create("cust-redis-only")
    revoked_in_file = (await store.create("cust-redis-active"))[0]
    files = FileKeyStore(
        keys_file(
            tmp_path / "keys.yaml",
            [file_entry(shared, "f1"), file_entry(revoked_in_file, "f2", revoked_at=T0)],
        )
    )

    file_first = verifier([files, store], clock)
    assert (await file_first.verify(shared)).customer_id == "cust-file"
    assert (await file_first.verify(only_redis)).customer_id == "cust-redis-only"
    with pytest.raises(InvalidCredential, match="revoked"):
        await file_first.verify(revoked_in_file)  # a later store's "active" does not overrule

    redis_first = verifier([store, files], clock)
    assert (await redis_first.verify(shared)).customer_id == "cust-redis"
    assert (await redis_first.verify(revoked_in_file)).customer_id == "cust-redis-active"


@pytest.mark.parametrize("error", [redis.exceptions.ConnectionError("down"), OSError("unreachable")])
async def test_a_failing_store_makes_unknown_keys_unavailable(clock: Clock, error: Exception) -> None:
    key = generate_key(PREFIX)
    known = RecordingStore({key_hash(key, PEPPER): record()})
    broken, empty = RecordingStore(fail=error), RecordingStore()

    assert (await verifier([broken, known], clock).verify(key)).customer_id == "cust-1"
    for stores in ([broken, empty], [empty, broken], [broken]):
        with pytest.raises(VerifierUnavailable) as exc:
            await verifier(stores, clock).verify(key)
        assert exc.value.what == "key_store"
    assert not issubclass(VerifierUnavailable, InvalidCredential)


async def test_redis_killed_cached_keys_work_unknown_keys_unavailable(tmp_path: Path, clock: Clock) -> None:
    own = RedisProcess().start()
    client = redis_client.connect(own.url)
    try:
        store = RedisKeyStore(client, PEPPER, prefix=PREFIX, clock=clock)
        cached_key, _ = await store.create("cust-cached")
        in_file = generate_key(PREFIX)
        files = FileKeyStore(keys_file(tmp_path / "keys.yaml", [file_entry(in_file)]))
        check = verifier([store, files], clock, cache_ttl=30)
        await check.verify(cached_key)

        own.kill()
        started = time.monotonic()
        assert (await check.verify(cached_key)).customer_id == "cust-cached"
        with pytest.raises(VerifierUnavailable):
            await check.verify(generate_key(PREFIX))
        assert (await check.verify(in_file)).customer_id == "cust-file"  # a later store still answers
        clock.advance(31)
        with pytest.raises(VerifierUnavailable):
            await check.verify(cached_key)  # the cache does not outlive its TTL because Redis is down
        assert time.monotonic() - started < 2

        own.start()  # same port, but empty (no persistence): the client reconnects on its own
        with pytest.raises(InvalidCredential, match="unknown_key"):
            await check.verify(generate_key(PREFIX))
    finally:
        await client.aclose()
        own.stop()


async def test_a_stalled_redis_fails_within_the_socket_timeouts(clock: Clock) -> None:
    own = RedisProcess().start()
    client = redis_client.connect(own.url)
    try:
        check = verifier([RedisKeyStore(client, PEPPER, clock=clock)], clock)
        with pytest.raises(InvalidCredential, match="unknown_key"):
            await check.verify(generate_key(PREFIX))
        own.pause()
        started = time.monotonic()
        with pytest.raises(VerifierUnavailable):
            await check.verify(generate_key(PREFIX))
        # 1 s socket timeout, one retry: far below redis-py's 5 s default.
        assert 1 <= time.monotonic() - started < 3.5
    finally:
        own.resume()
        await client.aclose()
        own.stop()


async def test_connect_handles_unix_sockets() -> None:
    own = RedisProcess()
    socket_path = f"{own.workdir}/redis.sock"
    own.extra_args = ("--unixsocket", socket_path)
    own.start()
    client = redis_client.connect(f"unix://{socket_path}")
    try:
        assert await client.ping()
        await client.set("k", "v")
        assert await client.get("k") == "v"  # decoded to str
    finally:
        await client.aclose()
        own.stop()
