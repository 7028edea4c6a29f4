"""The optional API key (``serve.api_key_env``).

Only the key's SHA-256 leaves the process that reads the environment variable: it is what the deployment's
arguments, the Serve config file and Ray's own records of the deployment hold, so neither a log line nor a
dashboard ever shows the key.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from medvl.spec import ServeSpec, SpecError


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_digest(settings: ServeSpec) -> str:
    """The digest of the key in ``$serve.api_key_env``; "" when no key is asked for."""
    if not settings.api_key_env:
        return ""
    key = os.environ.get(settings.api_key_env, "")
    if not key:
        raise SpecError(f"serve.api_key_env: expected the environment variable {settings.api_key_env} to hold the "
                        "API key, got it unset or empty")
    return key_digest(key)


def presented_key(headers) -> str:
    """The key a request carries: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "")


def authorized(headers, digest: str) -> bool:
    if not digest:
        return True
    key = presented_key(headers)
    return bool(key) and hmac.compare_digest(key_digest(key), digest)
