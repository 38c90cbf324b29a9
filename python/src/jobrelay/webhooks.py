"""Checking jobrelay's completion webhooks on the receiving side.

A jobrelay server POSTs a job's JSON to its ``callback_url`` when the job ends, with::

    X-Jobrelay-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">
    X-Jobrelay-Delivery: <id, the same on every retry: deduplicate on it>
    X-Jobrelay-Event: Completed | Failed | Invalid | Killed | Running

keyed with the service's ``webhook_secret``. Deliveries are retried until a 2xx answer (410
stops them for good), so a receiver should answer 2xx quickly and ignore a delivery id it has
seen already.

>>> job = jobrelay.webhooks.verify(secret, request.headers, request.body)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Dict, Mapping, Optional, Union

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "InvalidSignature",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "X-Jobrelay-Signature"
DELIVERY_HEADER = "X-Jobrelay-Delivery"
EVENT_HEADER = "X-Jobrelay-Event"


class InvalidSignature(ValueError):
    """The delivery is not signed with this secret, was changed, or is too old."""


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    # Any mapping: httpx/Starlette/Django headers are case-insensitive, a plain dict may not be.
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _digest(secret: Union[str, bytes], t: int, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: Union[str, bytes], body: Union[str, bytes], t: Optional[int] = None) -> str:
    """The ``X-Jobrelay-Signature`` value the server sends for ``body`` at time ``t``
    (default: now); for tests of a receiver."""
    raw = body.encode() if isinstance(body, str) else body
    at = int(time.time()) if t is None else t
    return f"t={at},v1={_digest(secret, at, raw)}"


def verify(
    secret: Union[str, bytes],
    headers: Mapping[str, str],
    body: Union[str, bytes],
    tolerance: float = 300,
    *,
    now: Optional[float] = None,
) -> Dict[str, Any]:
    """Checks a delivery: its ``X-Jobrelay-Signature`` matches ``body`` (the raw request
    body, exactly as received) under ``secret``, and was made within ``tolerance`` seconds
    of now (an old delivery replayed is refused). Returns the job's JSON; raises
    :class:`InvalidSignature` otherwise."""
    raw = body.encode() if isinstance(body, str) else body
    header = _header(headers, SIGNATURE_HEADER)
    if not header:
        raise InvalidSignature(f"no {SIGNATURE_HEADER} header")
    t: Optional[int] = None
    candidates = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                t = int(value)
            except ValueError:
                raise InvalidSignature(f"bad t= in {SIGNATURE_HEADER}: {value!r}") from None
        elif key == "v1":
            candidates.append(value)
    if t is None:
        raise InvalidSignature(f"no t= in {SIGNATURE_HEADER}")
    current = time.time() if now is None else now
    if abs(current - t) > tolerance:
        raise InvalidSignature(f"signed at {t}, more than {tolerance} s from now ({int(current)})")
    expected = _digest(secret, t, raw)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise InvalidSignature("the signature does not match the body and secret")
    try:
        job = json.loads(raw)
    except ValueError:
        raise InvalidSignature("the signed body is not JSON") from None
    if not isinstance(job, dict):
        raise InvalidSignature("the signed body is not a JSON object")
    return job
