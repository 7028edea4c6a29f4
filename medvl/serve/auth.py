"""The optional API key (``serve.api_key_env``).

The key never leaves the process that reads the environment variable. What the deployment receives, and so what
the Serve config file and the Ray dashboard show (a deployment's arguments are public there), is a salted
HMAC-SHA256 of the key: ``hmac-sha256:<salt hex>:<mac hex>``, with a random salt drawn at each start. That is not
the key, and no precomputed table matches it; but whoever reads it can test guesses offline, so a key that could
be guessed (a word, a short string) is not safe: use a long random one (``openssl rand -hex 32``). A key-derivation
function (scrypt) would slow such guessing but cost every request tens of milliseconds; a random key needs neither.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from medvl.spec import ServeSpec, SpecError

SCHEME = "hmac-sha256"
SALT_BYTES = 16
DASHBOARD_NOTE = (
    "API key: with serve.api_key_env set, the key itself is never written anywhere; the deployment's arguments (shown "
    "by the Ray dashboard and held by --write-config's file) carry a salted HMAC-SHA256 of it and its salt, against "
    "which a guessable key could be tested offline: use a long random key, e.g. `openssl rand -hex 32`."
)


def key_digest(key: str, salt: str | None = None) -> str:
    """``hmac-sha256:<salt>:<mac>``; a new random salt unless one is given (to check a presented key)."""
    salt = salt if salt is not None else secrets.token_hex(SALT_BYTES)
    mac = hmac.new(bytes.fromhex(salt), key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return f"{SCHEME}:{salt}:{mac}"


def api_key_digest(settings: ServeSpec) -> str:
    """The salted digest of the key in ``$serve.api_key_env``; "" when no key is asked for."""
    if not settings.api_key_env:
        return ""
    key = os.environ.get(settings.api_key_env, "")
    if not key:
        raise SpecError(f"serve.api_key_env: expected the environment variable {settings.api_key_env} to hold the "
                        "API key, got it unset or empty")
    return key_digest(key)


def check_digest(digest: str) -> None:
    """Refuse a digest this version cannot check (e.g. an older config file's bare SHA-256): never serve open."""
    scheme, _, rest = digest.partition(":")
    salt, _, mac = rest.partition(":")
    try:
        bytes.fromhex(salt), bytes.fromhex(mac)
    except ValueError:
        salt = ""
    if scheme != SCHEME or not salt or len(mac) != 64:
        raise ValueError(f"the API key digest is not {SCHEME}:<salt>:<mac>: rewrite the Serve config with "
                         "`medvl serve SPEC --write-config PATH`")


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
    salt = digest.split(":")[1]
    return bool(key) and hmac.compare_digest(key_digest(key, salt), digest)
