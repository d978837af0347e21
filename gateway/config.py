"""The gateway's configuration: one YAML file, typed and validated, with GATEWAY_* environment overrides.

Every key has a default here; config/gateway.yaml lists the same keys with the same values (a test holds
the two together), so `voipbin-gateway serve` with no file behaves like the shipped file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.cors import ANY, is_header_name, parse_allowed_origin
from gateway.ratelimit.ip_prefix import DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX
from gateway.ratelimit.memory import DEFAULT_MAX_KEYS

ENV_PREFIX = "GATEWAY_"
CONFIG_PATH_ENV = "GATEWAY_CONFIG"
# Kubernetes adds these to every pod when a Service is named "gateway"; they are not settings.
_KUBERNETES_LINK = re.compile(r"GATEWAY_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)")

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
"""What a route may list. Not CONNECT: it asks for a tunnel, which a reverse proxy does not open."""


class ConfigError(Exception):
    """A configuration that cannot run; the message names the key, the bad value and what is allowed."""


def _listen_address(value: str) -> str:
    parse_listen(value)
    return value


def _header_value(value: str) -> str:
    if not re.fullmatch(r"[!-~]([ -~]{0,62}[!-~])?", value):
        raise ValueError("must be 1-64 printable ASCII characters, no leading or trailing space")
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[V6]:PORT" into host and port."""
    match = re.fullmatch(
        r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]]+):(?P<port4>\d+)", value
    )
    if match is None:
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:8080 or [::1]:8080")
    host = match["v6"] or match["host"]
    port = int(match["port"] or match["port4"])
    if not 0 <= port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return host, port


_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")


def _upstream_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", value):
        raise ValueError("must be an http:// or https:// URL without query or fragment")
    if _USERINFO.search(value):
        # These URLs are logged and shown on /readyz; a password in them would be too.
        raise ValueError("must not carry credentials (user:password@host)")
    try:
        port = urlsplit(value).port
    except ValueError:
        port = 0
    if port == 0:  # urlsplit takes "host:" for no port, and refuses what is not a number up to 65535
        raise ValueError("has a port that is not a number from 1 to 65535")
    return value.rstrip("/")


ListenAddress = Annotated[str, AfterValidator(_listen_address)]
UpstreamUrl = Annotated[str, AfterValidator(_upstream_url)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Timeouts(Section):
    connect: PositiveFloat = 5.0
    """Seconds to open a connection to the upstream (including the wait for a free pooled one)."""
    response_headers: PositiveFloat = 60.0
    """Seconds from the request being fully sent to the response headers."""
    idle_read: PositiveFloat = 60.0
    """Seconds without a byte while the response body streams."""
    request_body_idle: PositiveFloat = 30.0
    """Seconds without a byte of the client's request body: then the upstream request is aborted (its
    connection freed) and the client gets 408, or its connection is cut if the response has started."""


class RouteTimeouts(Section):
    connect: PositiveFloat | None = None
    response_headers: PositiveFloat | None = None
    idle_read: PositiveFloat | None = None
    request_body_idle: PositiveFloat | None = None


class Pool(Section):
    max_connections: PositiveInt = 512
    max_connections_per_host: int = Field(default=0, ge=0)
    keepalive_timeout: PositiveFloat = 4.0
    """Below the upstream's idle timeout, so a pooled connection is not reused just as the peer drops it."""
    max_websockets: PositiveInt = 1000
    """Upstream WebSocket connections, a pool apart from max_connections: streams cannot starve requests."""


TLS_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""Mozilla's "intermediate" TLS 1.2 suites without the DHE ones: ECDHE key exchange, AEAD ciphers only."""

FilePath = Annotated[str, Field(min_length=1)]


def _cipher_list(value: str) -> str:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
    except ssl.SSLError:
        raise ValueError(
            "selects no TLS 1.2 cipher suite; allowed: an OpenSSL cipher list such as "
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256 (TLS 1.3 suites cannot be chosen)"
        ) from None
    return value


def _tls_version(value: Any) -> Any:
    return str(value) if isinstance(value, float) else value  # YAML reads an unquoted 1.2 as a number


class TlsConfig(Section):
    """TLS on one listener (`tls`: clients, `admin_tls`: the admin port), on while cert_file is set; cross-key
    rules in config_checks, the files themselves read by gateway/tls.py."""

    cert_file: FilePath | None = None
    """PEM certificate chain: the listener's certificate first, then its intermediates."""
    key_file: FilePath | None = None
    """The certificate's PEM private key, unencrypted."""
    client_ca_file: FilePath | None = None
    """PEM CA bundle that client certificates are verified against."""
    client_auth: Literal["none", "optional", "required"] = "none"
    """optional: a client certificate is asked for and must verify when one is sent; required: a client
    without one is refused (mutual TLS)."""
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"
    """The oldest TLS version accepted; TLS 1.3 is negotiated whenever the client has it."""
    ciphers: Annotated[str, AfterValidator(_cipher_list)] = TLS_CIPHERS
    """TLS 1.2 cipher suites (OpenSSL's format). TLS 1.3 always offers OpenSSL's TLS 1.3 suites, all AEAD:
    Python's ssl module cannot choose them."""


class UpstreamTls(Section):
    """TLS towards https:// upstreams (every route's); JWKS fetches always verify against the system store."""

    ca_file: FilePath | None = None
    """PEM CA bundle the upstream's certificate is verified against instead of the system's (an API behind
    an internal CA)."""
    cert_file: FilePath | None = None
    """PEM client certificate chain presented to upstreams that ask for one (mutual TLS); needs key_file."""
    key_file: FilePath | None = None


class UpstreamConfig(Section):
    url: UpstreamUrl = "https://api.voipbin.net"
    preserve_host: bool = False
    timeouts: Timeouts = Timeouts()
    retries: int = Field(default=1, ge=0, le=3)
    pool: Pool = Pool()
    max_error_body_bytes: ByteSize = ByteSize(65536)
    tls_verify: bool = True
    tls: UpstreamTls = UpstreamTls()
    request_buffer_bytes: ByteSize = ByteSize(65536)
    """A request body up to this size is read whole before an upstream connection is taken (a larger one
    from its first this-many bytes on), so a slow client never holds one for it; 0 streams from the first
    byte."""
    pool_name: str | None = None
    """A pool of `upstream_pools` for the routes that name neither `upstream` nor `pool`; None: `url`."""


PoolName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]


class PassiveHealth(Section):
    failures: PositiveInt = 3
    """Consecutive connect failures or timeouts of a target that eject it from its pool."""
    ejection: PositiveFloat = 30.0
    """Seconds out for a first ejection; each next one, with no response in between, lasts twice as long."""
    max_ejection: PositiveFloat = 300.0
    """The longest an ejection lasts."""

    @model_validator(mode="after")
    def _cap_above_first(self) -> PassiveHealth:
        if self.max_ejection < self.ejection:
            raise ValueError(
                f"max_ejection ({self.max_ejection:g}) must be at least ejection ({self.ejection:g})"
            )
        return self


class PoolTarget(Section):
    url: UpstreamUrl
    weight: PositiveInt = 1
    """The target's share of the pool's requests, against the other targets' weights."""


class UpstreamPoolConfig(Section):
    targets: tuple[PoolTarget, ...]
    balance: Literal["round_robin", "least_request"] = "round_robin"
    passive_health: PassiveHealth = PassiveHealth()

    # Not min_length: pydantic would also call a list whose targets are all invalid empty, a second error.
    @field_validator("targets")
    @classmethod
    def _distinct(cls, value: tuple[PoolTarget, ...]) -> tuple[PoolTarget, ...]:
        if not value:
            raise ValueError("a pool needs at least one target")
        seen: dict[tuple[str, str, int, str], str] = {}
        for target in value:
            identity = _target_identity(target.url)
            first = seen.get(identity)
            if first is None:
                seen[identity] = target.url
            else:
                also = f" (as {first!r}: the same scheme, host, port and path)" if first != target.url else ""
                raise ValueError(
                    f"{target.url!r} is listed twice{also}; list a target once (weight is its share)"
                )
        return value


def _target_identity(url: str) -> tuple[str, str, int, str]:
    """What makes two spellings of an upstream URL the same target: scheme and host in any letter case, the
    default port written out or not."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, parts.hostname or "", port, parts.path.rstrip("/")


class ServerConfig(Section):
    workers: PositiveInt = 1
    drain_timeout: PositiveFloat = 30.0
    max_in_flight: int = Field(default=10000, ge=0)
    """Concurrent requests per worker before 503 SERVICE_UNAVAILABLE; 0 is unlimited."""
    trusted_proxies: tuple[str, ...] = ()
    keepalive_timeout: PositiveFloat = 75.0
    header_timeout: PositiveFloat = 10.0
    """Seconds for a whole request head (request line and headers) to arrive, else 408 and close; on a new
    connection counted from the connect."""
    send_timeout: PositiveFloat = 60.0
    """Seconds a client may take none of a response it is sent (nginx's send_timeout); then its connection
    is cut, and the upstream connection serving it freed."""
    server_header: Annotated[str, AfterValidator(_header_value)] = "voipbin-gateway"
    """The Server header of every response, replacing the upstream's and aiohttp's (which names versions)."""
    pid_file: str | None = None
    """Where `serve` writes its process id (the supervisor's with --workers), for `voipbin-gateway reload`."""

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network such as 10.0.0.0/8 or ::1/128") from None
        return value


class WebSocketConfig(Section):
    """The WebSocket relay (routes with `websocket: true`)."""

    max_message_bytes: ByteSize = ByteSize(16 * 1024 * 1024)
    """The largest message relayed, either way (a route's max_message_bytes replaces it). A message is held
    whole while it is relayed, so this bounds the memory one stream can take; one over it ends the stream
    with 1009 to both sides. 0: no limit."""
    compression: bool = False
    """Negotiate permessage-deflate with clients that offer it. Off, the gateway relays frames as they are;
    on, it inflates and deflates every message towards the client (the upstream link stays uncompressed)."""


class LimitsConfig(Section):
    max_body_bytes: ByteSize = ByteSize(10 * 1024 * 1024)
    max_header_bytes: ByteSize = ByteSize(16 * 1024)
    max_uri_bytes: Annotated[ByteSize, Field(ge=256)] = ByteSize(8 * 1024)
    """The request target (path and query), checked by the HTTP parser: 414 when longer."""
    max_header_count: PositiveInt = 100
    min_body_rate: ByteSize = ByteSize(1024)
    """Request bodies: each this many bytes received buy one more second of waiting for the client, past
    min_body_rate_grace; a slower upload is answered 408 (or cut). 0 switches the check off."""
    min_body_rate_grace: PositiveFloat = 10.0
    """Seconds of waiting for a request body's bytes that are always allowed."""


class ErrorsConfig(Section):
    format: Literal["canonical", "flat"] = "canonical"


class HealthConfig(Section):
    upstream_probe_interval: PositiveFloat = 10.0
    upstream_max_age: PositiveFloat = 30.0


def _redis_url(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"(rediss?(\+cluster|\+sentinel)?|unix)://\S+", value):
        raise ValueError(
            "must be a redis://, rediss://, unix://, redis+cluster://host:port[,...] or "
            "redis+sentinel://host:port[,...]/service URL, or null for none"
        )
    return value


class RedisConfig(Section):
    url: Annotated[str | None, AfterValidator(_redis_url)] = None
    """None keeps all shared state in-process (the embedded default); set it to share across instances."""


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    access_log: bool = True
    redact_query_params: tuple[str, ...] = ("accesskey", "token")
    """Query parameters whose values never reach a log line (matched case-insensitively)."""


class MetricsConfig(Section):
    per_team: bool = False
    """Also count requests per team (gateway_team_requests_total); off by default for cardinality."""
    team_cap: PositiveInt = 1000
    """Teams beyond this many are counted together in gateway_team_requests_overflow_total."""
    multiprocess_dir: Annotated[str, Field(min_length=1)] | None = None
    """With server.workers > 1: the directory the workers share their metrics through (created if missing;
    files of earlier runs are removed, the directory is kept). None: $PROMETHEUS_MULTIPROC_DIR, else a fresh
    temporary directory removed at exit. Set it where the temporary directory is not writable (a read-only
    root filesystem)."""


JwtAlgorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip
_HMAC = frozenset({"HS256", "HS384", "HS512"})


def _env_name(value: str | None) -> str | None:
    if value is not None and value.startswith(ENV_PREFIX):
        raise ValueError(f"must not start with {ENV_PREFIX}, which is reserved for configuration overrides")
    return value


SecretEnvName = Annotated[str | None, AfterValidator(_env_name)]


class JwtKey(Section):
    """One verification key and the algorithms it may verify; the token's own `alg` never chooses."""

    kid: str | None = None
    """When set, only tokens whose `kid` header equals it are checked against this key."""
    algorithms: Annotated[tuple[JwtAlgorithm, ...], Field(min_length=1)]
    secret_env: SecretEnvName = None
    secret_file: str | None = None
    public_key_file: str | None = None
    jwks_url: UpstreamUrl | None = None

    @model_validator(mode="after")
    def _one_source(self) -> JwtKey:
        sources = [s for s in (self.secret_env, self.secret_file, self.public_key_file, self.jwks_url) if s]
        if len(sources) != 1:
            raise ValueError("a key needs exactly one of secret_env, secret_file, public_key_file, jwks_url")
        hmac = {a for a in self.algorithms if a in _HMAC}
        shared_secret = bool(self.secret_env or self.secret_file)
        if shared_secret and hmac != set(self.algorithms):
            raise ValueError("a shared secret verifies HS256/HS384/HS512 only")
        if not shared_secret and hmac:
            raise ValueError("public keys and JWKS verify RS*, PS*, ES* or EdDSA, never HS* (key confusion)")
        return self


class ClaimMap(Section):
    """Dot paths into the claims (or an introspection answer); the first one present wins."""

    customer_id: tuple[str, ...] = ("agent.customer_id", "customer_id")
    team_id: tuple[str, ...] = ("team_id", "agent.team_id")
    plan: tuple[str, ...] = ("plan",)
    credential_type: tuple[str, ...] = ("type",)
    credential_id: tuple[str, ...] = ("jti", "agent.id", "sub")


class JwksConfig(Section):
    cache_ttl: PositiveFloat = 300.0
    refetch_interval: PositiveFloat = 30.0
    """At most one refetch per URL in this many seconds for tokens with an unknown `kid`."""
    fetch_timeout: PositiveFloat = 5.0


class JwtConfig(Section):
    keys: tuple[JwtKey, ...] = ()
    jwks: JwksConfig = JwksConfig()
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    leeway: float = Field(default=30.0, ge=0)
    require_expiry: bool = True
    expiry_claim: str = "exp"
    """"exp" (NumericDate), or another dot path such as the API's own "expire" (a timestamp string)."""
    max_age: PositiveFloat | None = None
    """Reject tokens whose `iat` is older than this many seconds."""
    cache_size: int = Field(default=10000, ge=0)
    claims: ClaimMap = ClaimMap()


class AccessKeysConfig(Section):
    stores: tuple[Literal["redis", "file", "introspect"], ...] = ("introspect",)
    """Tried in order: the first store that knows a key answers."""
    prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{1,15}_$")] = "vbgw_"
    pepper_env: SecretEnvName = None
    pepper_file: str | None = None
    file: str | None = None
    cache_ttl: PositiveFloat = 30.0
    """Revocation and expiry take effect within this many seconds."""
    cache_size: int = Field(default=10000, ge=0)


def _claim_name(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[^.\s]+", value):
        raise ValueError("must be one claim name, without dots or spaces (or null)")
    return value


class IntrospectConfig(Section):
    url: UpstreamUrl | None = None
    """Default: the upstream's URL followed by `path`."""
    path: str = "/v1.0/me"
    jwt: bool = True
    """Also ask about JWTs that no configured key can verify."""
    timeout: PositiveFloat = 5.0
    positive_ttl: PositiveFloat = 60.0
    negative_ttl: PositiveFloat = 5.0
    cache_size: int = Field(default=10000, ge=0)
    claims: ClaimMap = ClaimMap(customer_id=("customer_id",), credential_id=("id",), credential_type=())
    answer_claim: Annotated[str | None, AfterValidator(_claim_name)] = "agent"
    """The answer is also placed under this claim name for route requirements: the API's /me answer is
    the agent object its tokens carry as `agent`, so `agent.permission` means the same for both."""


class CredentialSources(Section):
    authorization_header: bool = True
    query_token: bool = True
    cookie_token: bool = True
    query_accesskey: bool = True
    cookie_accesskey: bool = True


class IdentityHeaders(Section):
    customer_id: str = "X-Gateway-Customer-Id"
    team_id: str = "X-Gateway-Team-Id"
    credential_type: str = "X-Gateway-Credential-Type"
    credential_id: str = "X-Gateway-Credential-Id"


class AuthConfig(Section):
    sources: CredentialSources = CredentialSources()
    max_credential_bytes: ByteSize = ByteSize(8192)
    """Any credential (JWT or access key, from any source) larger than this is refused unparsed."""
    jwt: JwtConfig = JwtConfig()
    access_keys: AccessKeysConfig = AccessKeysConfig()
    introspect: IntrospectConfig = IntrospectConfig()
    on_unavailable: Literal["closed", "open"] = "closed"
    """closed: 503 when a credential cannot be checked; open: forward it without an identity."""
    realm: str = "voipbin"
    headers: IdentityHeaders = IdentityHeaders()
    file_check_interval: float = Field(default=2.0, ge=0)
    """Seconds between looks at the access-key file, the pepper and JWT key files and the TLS files: a
    change re-reads them as a reload does, so revoking a key or renewing a certificate needs no signal. 0
    looks only on a reload."""


class RouteRequirements(Section):
    credential_types: tuple[str, ...] = ()
    claims: dict[str, str | tuple[str, ...]] = Field(default_factory=dict)
    """Dot path → required value (or any of several values)."""


KeyPart = Literal["ip", "customer", "team", "credential", "route"]


class PolicyValues(Section):
    """Values that replace a policy's own for one credential type or one plan."""

    rate: PositiveFloat | None = None
    burst: PositiveInt | None = None
    limit: int | None = Field(default=None, ge=0)


class PolicyConfig(Section):
    key: Annotated[tuple[KeyPart, ...], Field(min_length=1)]
    """What is counted together: ip, customer, team, credential, route, or a combination."""
    algorithm: Literal["gcra", "quota"] = "gcra"
    rate: PositiveFloat | None = None
    """gcra: requests per `period`."""
    period: PositiveFloat = 1.0
    burst: PositiveInt | None = None
    """gcra: requests allowed at once from idle."""
    limit: int | None = Field(default=None, ge=0)
    """quota: requests per calendar window."""
    window: Literal["day", "month"] | None = None
    timezone: str = "UTC"
    shadow: bool = False
    on_redis_error: Literal["local", "open", "closed"] = "local"
    scope: Literal["shared", "local"] = "shared"
    """shared: one count in Redis for every instance; local: each instance counts alone, in memory."""
    by_credential_type: dict[str, PolicyValues] = Field(default_factory=dict)
    """Credential types listed here get these values and a bucket of their own."""
    plans: dict[str, PolicyValues] = Field(default_factory=dict)

    @field_validator("key")
    @classmethod
    def _distinct(cls, value: tuple[KeyPart, ...]) -> tuple[KeyPart, ...]:
        if len(set(value)) != len(value):
            raise ValueError("key parts must be distinct")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone such as UTC or Asia/Seoul") from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> PolicyConfig:
        if self.algorithm == "gcra" and (self.rate is None or self.burst is None):
            raise ValueError("a gcra policy needs rate and burst")
        if self.algorithm == "quota" and (self.limit is None or self.window is None):
            raise ValueError("a quota policy needs limit and window (day or month)")
        return self


def documented_tiers() -> dict[str, PolicyConfig]:
    """The API's own documented limits (API-CONVENTIONS.md)."""
    per_ip = {"key": ("ip",), "scope": "local"}
    return {
        "ip-auth": PolicyConfig(**per_ip, rate=10, burst=20),
        "ip-account": PolicyConfig(**per_ip, rate=10, burst=20),
        "ip-api": PolicyConfig(**per_ip, rate=200, burst=400),
        "customer": PolicyConfig(
            key=("customer",),
            rate=16.7,
            burst=33,
            by_credential_type={
                "direct": PolicyValues(rate=50, burst=100),
                "delegate": PolicyValues(rate=8.3, burst=16),
            },
        ),
    }


class RateLimitConfig(Section):
    policies: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")], PolicyConfig] = Field(
        default_factory=documented_tiers
    )
    instances: PositiveInt = 1
    """Gateway instances sharing the load; a `local` fallback enforces limit / instances."""
    redis_budget: PositiveFloat = 0.25
    """Seconds from writing a check to Redis to reading its reply before the policy's on_redis_error
    applies; time the check spends queued in a busy gateway is not charged (ratelimit/redis_backend.py).
    A written check may already be counted in Redis, so falling back early counts it twice: the default
    outlasts a Redis merely descheduled on a crowded host, and still finds a stalled one within 250 ms."""
    breaker_failures: PositiveInt = 5
    breaker_reset: PositiveFloat = 5.0
    ietf_headers: bool = False
    """Also send RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers)."""
    ipv6_prefix: int = Field(default=DEFAULT_IPV6_PREFIX, ge=16, le=128)
    """Policies keyed by `ip` count an IPv6 client per network of this length (one host often holds a /64
    and can rotate through it); 128 counts every address apart."""
    ipv4_prefix: int = Field(default=DEFAULT_IPV4_PREFIX, ge=8, le=32)
    """The same for IPv4 clients (and IPv4-mapped IPv6 addresses); 32 counts every address apart."""
    local_max_keys: int = Field(default=DEFAULT_MAX_KEYS, ge=16)
    """Keys the in-process limiter table holds (local policies and the Redis fallback); least recently
    used ones are forgotten past it. At least 16: one request may write a key per policy of its route, and
    must not evict its own."""


def _http_methods(value: tuple[str, ...]) -> tuple[str, ...]:
    upper = tuple(m.upper() for m in value)
    for method in upper:
        if method not in HTTP_METHODS:
            raise ValueError(f"{method!r} is not an HTTP method; allowed: {', '.join(HTTP_METHODS)}")
    return upper


def _allowed_origin(value: str) -> str:
    if value != ANY:
        parse_allowed_origin(value)  # its ValueError says what is wrong
    return value


def _header_name(value: str) -> str:
    if value != ANY and not is_header_name(value):
        raise ValueError("is not a header name: letters, digits and !#$%&'*+.^_`|~- only")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]


class CorsConfig(Section):
    """A CORS policy (gateway/cors.py): which web pages (origins) may call the API from a browser, with
    which methods and request headers, and which response headers their scripts may read."""

    allow_origins: tuple[Annotated[str, AfterValidator(_allowed_origin)], ...] = ()
    """Exact origins (https://app.example.com), "*" for any, or patterns such as https://*.example.com;
    none: CORS is off, left to the upstream."""
    allow_methods: Annotated[tuple[str, ...], Field(min_length=1)] | None = None
    """What a preflight may ask for; None: the route's methods (the common ones for a route without)."""
    allow_headers: tuple[HeaderName, ...] = ("Authorization", "Content-Type", "X-Request-ID")
    """Request headers a page may send; ["*"]: any (answered with the names asked for)."""
    expose_headers: tuple[HeaderName, ...] | None = None
    """Response headers scripts may read; None: the rate-limit headers, Retry-After and X-Request-ID."""
    allow_credentials: bool = False
    """Cookies (and TLS client certificates) may go with the requests, and scripts read their answers."""
    max_age: int = Field(default=600, ge=0, le=86400)
    """Seconds a browser may reuse a preflight's answer (browsers cap it, Firefox at 86400)."""

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if ANY in value and len(value) > 1:
            raise ValueError("'*' allows every origin: list it alone")
        return value

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else _http_methods(value)

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _header_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and ANY in value and len(value) > 1:
            raise ValueError("'*' stands for every header: list it alone")
        return value

    @field_validator("allow_credentials")
    @classmethod
    def _credentials(cls, value: bool, info: ValidationInfo) -> bool:
        if value and ANY in info.data.get("allow_origins", ()):
            raise ValueError(
                "cannot be true with allow_origins ['*']: browsers refuse credentialed answers to any "
                "origin; list the origins (patterns such as https://*.example.com work) or set "
                "allow_credentials: false"
            )
        if value and info.data.get("expose_headers") == (ANY,):
            raise ValueError(
                "cannot be true with expose_headers ['*']: with credentials browsers read '*' as a header "
                "named '*'; list the header names, or set allow_credentials: false"
            )
        return value


def _route_path(value: str | None) -> str | None:
    if value is not None and not value.startswith("/"):
        raise ValueError("must start with '/'")
    return value


RoutePath = Annotated[str | None, AfterValidator(_route_path)]

# What the gateway itself writes into a target: RFC 3986 path characters that every server reads alike (no
# escapes, no ';' path parameters, no query or fragment), so routing's refusals need no second look.
_CLEAN_PATH = re.compile(r"/|(/[A-Za-z0-9._~!$&'()*+,=:@-]+)+/?")


def _rewrite_prefix(value: str | None) -> str | None:
    if value is None:
        return value
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    if not _CLEAN_PATH.fullmatch(value):
        raise ValueError(
            "must be a plain path: segments of ASCII letters, digits and -._~!$&'()*+,=:@ "
            "(no '%', ';', '?', '#', spaces or empty segments)"
        )
    if any(segment in (".", "..") for segment in value.split("/")):
        raise ValueError("must not contain '.' or '..' segments")
    return value


class RouteConfig(Section):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
    prefix: RoutePath = None
    path: RoutePath = None
    methods: tuple[str, ...] = ()
    upstream: UpstreamUrl | None = None
    pool: str | None = None
    """A pool of `upstream_pools` to balance over, instead of one `upstream`."""
    preserve_host: bool | None = None
    timeouts: RouteTimeouts = RouteTimeouts()
    max_body_bytes: ByteSize | None = None
    min_body_rate: ByteSize | None = None
    request_buffer_bytes: ByteSize | None = None
    case_sensitive: bool = False
    """Match the path in this letter case only. Off, every spelling of the route's paths is the route's, so
    an upstream that ignores case cannot be reached past it through a less protected route."""
    strip_prefix: bool = False
    """Prefix routes only: forward the target without the matched prefix (`/api/calls?x=1` → `/calls?x=1`)."""
    rewrite_prefix: Annotated[str | None, AfterValidator(_rewrite_prefix)] = None
    """Prefix routes only: forward the target with the matched prefix replaced by this path (`/v1.0`:
    `/api/calls` → `/v1.0/calls`). It replaces the prefix on its own: strip_prefix is implied."""
    websocket: bool = False
    max_message_bytes: ByteSize | None = None
    """WebSocket routes only: replaces websocket.max_message_bytes."""
    auth: Literal["required", "optional", "none"] = "required"
    hide_credentials: bool = False
    require: RouteRequirements = RouteRequirements()
    rate_limit: tuple[str, ...] = ()
    """Policy names that apply, from rate_limit.policies."""
    cost: PositiveInt = 1
    cors: CorsConfig | None = None
    """This route's CORS policy, replacing the global `cors` whole; None: the global one."""

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _http_methods(value)

    @model_validator(mode="after")
    def _one_matcher(self) -> RouteConfig:
        if (self.prefix is None) == (self.path is None):
            raise ValueError("a route needs exactly one of 'prefix' or 'path'")
        return self


def default_routes() -> tuple[RouteConfig, ...]:
    return (
        RouteConfig(name="auth-unregister", path="/auth/unregister", rate_limit=("ip-account", "customer")),
        RouteConfig(name="auth-delegate", path="/auth/delegate", rate_limit=("ip-account", "customer")),
        RouteConfig(name="auth", prefix="/auth", auth="none", rate_limit=("ip-auth",)),
        RouteConfig(name="events", path="/v1.0/ws", websocket=True, rate_limit=("ip-api", "customer")),
        RouteConfig(name="api", prefix="/v1.0", rate_limit=("ip-api", "customer")),
    )


def _secret_header_value(value: SecretStr) -> SecretStr:
    if any(c in value.get_secret_value() for c in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL")
    return value


# A number in YAML is a string here: a numeric API key is still a key.
CollectorSecret = Annotated[
    SecretStr,
    BeforeValidator(lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v),
    AfterValidator(_secret_header_value),
]


class TracingConfig(Section):
    """W3C trace context on every request, and OpenTelemetry spans exported over OTLP/HTTP when enabled."""

    enabled: bool = False
    """Record spans of sampled requests and export them to `endpoint`."""
    propagate: bool = True
    """Continue an inbound traceparent (or start a trace) and send the upstream a traceparent naming the
    gateway's span; the access log names the trace. Off: trace headers pass through like any other."""
    trust_inbound: bool = True
    """Continue a caller's trace and keep its sampling decision. Off (a public edge): every request starts
    a trace of its own, so no client can join your traces or have every request of its own sampled."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """The share of new traces sampled (a caller's decision is kept). Travels in the traceparent's sampled
    flag, also with `enabled: false`, so upstreams sampling by their parent follow it."""
    endpoint: UpstreamUrl = "http://127.0.0.1:4318/v1/traces"
    """The collector's OTLP/HTTP traces URL, /v1/traces included."""
    headers: dict[HeaderName, CollectorSecret] = Field(default_factory=dict)
    """Sent with every export (a collector's API key); never logged."""
    service_name: Annotated[str, Field(min_length=1)] = "voipbin-gateway"
    export_timeout: PositiveFloat = 10.0
    """Seconds one export may take, retries included; the spans are then dropped and counted."""
    schedule_delay: PositiveFloat = 5.0
    """Seconds between exports (sooner when a batch is full)."""
    max_queue_size: PositiveInt = 2048
    """Spans waiting for export; past it new spans are dropped and counted, never waited for."""
    max_export_batch_size: PositiveInt = 512

    def part_key(self) -> tuple[object, ...]:
        """What the tracer is built from, header values included (the JSON dump masks them)."""
        secrets = tuple(sorted((name, value.get_secret_value()) for name, value in self.headers.items()))
        return (self.model_dump_json(), secrets)


class GatewayConfig(Section):
    listen: ListenAddress = "127.0.0.1:8080"
    admin_listen: ListenAddress = "127.0.0.1:9102"
    tls: TlsConfig = TlsConfig()
    admin_tls: TlsConfig = TlsConfig()
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    upstream_pools: dict[PoolName, UpstreamPoolConfig] = Field(default_factory=dict)
    """Named sets of targets that routes balance over (`pool` on a route, `upstream.pool_name`)."""
    limits: LimitsConfig = LimitsConfig()
    errors: ErrorsConfig = ErrorsConfig()
    health: HealthConfig = HealthConfig()
    redis: RedisConfig = RedisConfig()
    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    cors: CorsConfig = CorsConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    logging: LoggingConfig = LoggingConfig()
    routes: tuple[RouteConfig, ...] = Field(default_factory=default_routes)

    @model_validator(mode="wrap")
    @classmethod
    def _cross_checked(cls, data: Any, handler: ModelWrapValidatorHandler[GatewayConfig]) -> GatewayConfig:
        """Problems across keys are reported together with the fields' own errors (see config_checks)."""
        if not isinstance(data, Mapping):
            return handler(data)
        from gateway.config_checks import cross_field_problems  # built on this module's models

        try:
            config = handler(data)
        except ValidationError as exc:
            problems = cross_field_problems(data)  # what the raw parts still tell
            if not problems:
                raise
            raise ValidationError.from_exception_data(cls.__name__, [*_as_details(exc), *problems]) from None
        # Checked as plain data also when the parts were given as models (GatewayConfig(routes=[...])).
        problems = cross_field_problems(config.model_dump())
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return config


def _as_details(exc: ValidationError) -> list[InitErrorDetails]:
    return [
        InitErrorDetails(
            type=PydanticCustomError(error["type"], error["msg"]), loc=error["loc"], input=error["input"]
        )
        for error in exc.errors(include_url=False)
    ]


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """File (or built-in defaults), then GATEWAY_* environment, then command-line overrides (dotted keys)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_PATH_ENV)
    raw: dict[str, Any] = {}
    if path:
        raw = read_config_file(Path(path))
    origins: dict[str, str] = {}  # dotted key → where a value that is not the file's came from
    for key, (name, value) in _env_overrides(environ).items():
        _set_dotted(raw, key, value)
        origins[key] = name
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
            origins[key] = "the command line"
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        source = str(path) if path else "built-in defaults"
        raise ConfigError(_describe(exc, source=source, origins=origins)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's top-level mapping, unvalidated; ConfigError when it cannot be read as one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of sections, not {type(data).__name__}"
        )
    # A section whose keys were all deleted or commented out reads as null; it means "all defaults".
    sections = {name for name, info in GatewayConfig.model_fields.items() if _is_model(info.annotation)}
    return {key: {} if value is None and key in sections else value for key, value in data.items()}


def _env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """GATEWAY_<SECTION>_<KEY> → "section.key": (variable name, value).

    Keys themselves contain underscores (GATEWAY_UPSTREAM_TIMEOUTS_RESPONSE_HEADERS), so the name is resolved
    by walking the model's field names rather than splitting on a delimiter, which a generic settings
    library would get wrong for such keys.
    """
    found: dict[str, tuple[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV or _KUBERNETES_LINK.fullmatch(name):
            continue
        dotted = _resolve_env_name(name[len(ENV_PREFIX) :].lower(), GatewayConfig)
        if dotted is None:
            raise ConfigError(f"environment {name}: no such configuration key")
        found[dotted] = (name, _env_value(value))
    return found


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _resolve_env_name(rest: str, model: type[BaseModel]) -> str | None:
    for field_name, info in model.model_fields.items():
        if rest == field_name:
            return field_name
        sub = info.annotation
        if rest.startswith(field_name + "_") and _is_model(sub):
            tail = _resolve_env_name(rest[len(field_name) + 1 :], sub)
            if tail is not None:
                return f"{field_name}.{tail}"
    return None


def _env_value(value: str) -> Any:
    # Lists and mappings come as JSON (GATEWAY_SERVER_TRUSTED_PROXIES='["10.0.0.0/8"]'); scalars stay strings
    # and pydantic coerces them, so a secret such as "0123" is never turned into a number.
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _describe(exc: ValidationError, *, source: str, origins: Mapping[str, str]) -> str:
    lines = [f"invalid configuration ({source}):"]
    for error in exc.errors(include_url=False):
        key = _dotted_loc(error["loc"])
        origin = next((o for k, o in origins.items() if key == k or key.startswith((f"{k}.", f"{k}["))), None)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key; allowed here: {', '.join(_allowed_keys(error['loc']))}"
        elif error["type"].startswith("byte_size"):
            message = (
                "must be a number of bytes or a size such as 16KiB or 10MiB (B, KB, KiB, MB, MiB, GB, GiB)"
            )
        value = error.get("input")
        secret = key in _SECRET_VALUES or (key.startswith(_SECRET_PREFIXES) and not key.endswith(".[key]"))
        if secret and error["type"] == "dict_type":
            message = (
                'must be a mapping of header names to values, such as {"x-api-key": "..."} (JSON in the '
                "environment)"
            )
        shown = "" if isinstance(value, dict) or secret else f" = {_short(value)}"
        if origin is not None:
            shown += f" (from {origin})"
        lines.append(f"  {key}{shown}: {message}")
    return "\n".join(lines)


# Keys whose values are never repeated in an error message (a collector's API key, say), and those under them.
_SECRET_VALUES = ("tracing.headers",)
_SECRET_PREFIXES = tuple(f"{key}." for key in _SECRET_VALUES)


def _dotted_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = GatewayConfig
    keyed = False  # the model is a mapping's value type: the next part is the mapping's key
    for part in loc[:-1]:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return []
        model = nested
        keyed = getattr(annotation, "__origin__", None) is dict
    return sorted(model.model_fields)


def _short(value: Any) -> str:
    text = _USERINFO.sub("[redacted]@", repr(value))  # a rejected URL's password stays out of the message
    return text if len(text) <= 80 else text[:77] + "..."
