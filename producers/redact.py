"""Credentials out of URLs, before a URL is recorded (provenance, configs) or printed (errors, logs).

An endpoint may carry its key in three places, and each is replaced by `***`:
- the user-info part: `https://user:pass@host/v1` -> `https://***@host/v1`;
- a query value whose name says it is a secret (`?api_key=...`, `key=`, `token=`, `sig=`, ...);
- a path segment that looks like a key: one of its `-`/`_`/`.`-separated words is `sk`, `pk`,
  `key`, `apikey`, `token`, `secret`, ..., or it is a long run of letters and digits (24+ characters, mixing both),
  e.g. `https://host/key-sk-abc123/v1` -> `https://host/***/v1`.
Scheme, host, port and the other path segments stay, so a message still says where a request went.
The real URL is only ever used to make the request.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_PARAM = re.compile(r"key|token|secret|pass|pwd|auth|sig|credential|session|code", re.IGNORECASE)
SECRET_WORDS = {"sk", "pk", "rk", "key", "apikey", "token", "secret", "bearer", "password"}
_LONG_TOKEN = re.compile(r"^[A-Za-z0-9_\-.~]{24,}$")
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>()\[\]{}]+")


def _secret_segment(segment: str) -> bool:
    if not segment:
        return False
    if SECRET_WORDS & {w.lower() for w in re.split(r"[-_.:]", segment)}:
        return True
    return bool(_LONG_TOKEN.match(segment) and re.search(r"[A-Za-z]", segment) and re.search(r"\d", segment))


def redact_url(url: str | None) -> str | None:
    """`url` with any credential replaced by `***` (None and non-URLs come back unchanged)."""
    if not url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # an unparsable URL: hide everything after the scheme
        return url.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    path = "/".join(MASK if _secret_segment(s) else s for s in parts.path.split("/"))
    query = parts.query
    if query:
        query = urlencode([(k, MASK if SECRET_PARAM.search(k) else v)
                           for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
    fragment = MASK if parts.fragment and _secret_segment(parts.fragment) else parts.fragment
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def redact_text(text: str) -> str:
    """Every URL inside a message redacted (`redact_url`); the rest of the text as it is."""
    def one(match: re.Match) -> str:
        url = match.group(0)
        core = url.rstrip(".,;:!?")  # sentence punctuation after a URL is not part of it
        return (redact_url(core) or "") + url[len(core):]

    return _URL_IN_TEXT.sub(one, text)


def redacted(value: Any) -> Any:
    """A copy of a config (dicts, lists, tuples, strings) with every URL in every string redacted."""
    if isinstance(value, str):
        return redact_text(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(v) for v in value)
    return value
