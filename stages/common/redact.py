"""Redaction for everything a run publishes: model card, open_clip_config.json, run.json, logs.

What goes: credentials in URLs (`user:pass@`), query strings and fragments (presigned URLs carry
their signature and key id there), the host of internal endpoints (cluster DNS names, single-label
hosts, private/loopback/link-local addresses), AWS access key ids in free text, and the values of
keys that name a secret (`token`, `password`, `secret`, ...). What stays: the scheme, a public host,
the bucket and the path, so a reader still knows where the data came from.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
INTERNAL_HOST = "internal-host"
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`|\\]+")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_WORDS = {"secret", "secrets", "token", "password", "passwd", "credential", "credentials", "apikey",
                 "auth", "authorization", "signature"}
_SECRET_PAIRS = ("api_key", "access_key", "secret_key", "private_key")
_INTERNAL_SUFFIXES = (".svc", ".cluster.local", ".internal", ".local", ".localdomain", ".lan", ".home.arpa")
# Object-store schemes: the netloc is the bucket, which is kept.
_BUCKET_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf", "file", "memory"}


def is_internal_host(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "." not in host or host.endswith(_INTERNAL_SUFFIXES)
    return not ip.is_global


def is_secret_key(key: str) -> bool:
    """`hf_token`, `AWS_SECRET_ACCESS_KEY`, `password` ...; not `tokenizer` or `max_tokens`."""
    lowered = key.lower().replace("-", "_")
    return bool(set(re.split(r"[_.]", lowered)) & _SECRET_WORDS) or any(p in lowered for p in _SECRET_PAIRS)


def redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return REDACTED
    if parts.scheme.lower() in _BUCKET_SCHEMES:
        netloc = parts.hostname or parts.netloc.rsplit("@", 1)[-1]
    else:
        host = parts.hostname or ""
        if is_internal_host(host):
            netloc = INTERNAL_HOST
        else:
            netloc = f"[{host}]" if ":" in host else host
            if port is not None:
                netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Every URL in free text redacted, and AWS key ids that appear on their own."""
    def one(match: re.Match) -> str:
        url = match.group(0)
        core = url.rstrip(".,;:!?)]}")  # sentence punctuation after a URL is not part of it
        return redact_url(core) + url[len(core):]
    return _AWS_KEY_ID.sub(REDACTED, _URL.sub(one, text))


def redact(value: Any, key: str = "") -> Any:
    """A JSON-like value with every string redacted and the values of secret-named keys replaced."""
    if key and is_secret_key(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
