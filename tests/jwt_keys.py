"""Key material and token minting for JWT tests: keys are generated per test session, never checked in."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

HMAC_SECRET = secrets.token_urlsafe(48)
"""The API's shared secret, as the gateway would read it from an environment variable."""


@dataclass(frozen=True)
class KeyPair:
    private: Any
    kind: str

    @property
    def public(self) -> Any:
        return self.private.public_key()

    @property
    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self, kid: str | None = None, alg: str | None = None, **extra: Any) -> dict[str, Any]:
        """The public JWK, with `kid` and `alg` only when given."""
        to_jwk = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}[self.kind].to_jwk
        out: dict[str, Any] = dict(to_jwk(self.public, as_dict=True))
        out.pop("kid", None)
        out.update({k: v for k, v in (("kid", kid), ("alg", alg)) if v is not None}, **extra)
        return out


@functools.cache
def rsa_key(name: str = "a", bits: int = 2048) -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=bits), "RSA")


@functools.cache
def ec_key(name: str = "a") -> KeyPair:
    return KeyPair(ec.generate_private_key(ec.SECP256R1()), "EC")


@functools.cache
def ed_key(name: str = "a") -> KeyPair:
    return KeyPair(ed25519.Ed25519PrivateKey.generate(), "OKP")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(claims: dict[str, Any], key: Any, alg: str, **headers: Any) -> str:
    """A token signed the ordinary way (PyJWT); `key` is an HMAC secret or a KeyPair."""
    signing_key = key.private if isinstance(key, KeyPair) else key
    return jwt.encode(claims, signing_key, algorithm=alg, headers=headers or None)


def raw_token(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes,
    sign: Callable[[bytes], bytes] | bytes = b"",
) -> str:
    """A token assembled by hand, for the shapes PyJWT refuses to produce."""
    parts = [
        b64(part if isinstance(part, bytes) else json.dumps(part).encode()) for part in (header, payload)
    ]
    signing_input = ".".join(parts).encode()
    signature = sign(signing_input) if callable(sign) else sign
    return f"{parts[0]}.{parts[1]}.{b64(signature)}"


def hmac_signer(secret: bytes | str, alg: str = "HS256") -> Callable[[bytes], bytes]:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    key = secret.encode() if isinstance(secret, str) else secret
    return lambda data: hmac.new(key, data, digest).digest()
