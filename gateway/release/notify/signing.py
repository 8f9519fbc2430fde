"""Signing webhook payloads: HMAC-SHA256 over "<timestamp>.<body>", as Stripe and Slack sign theirs.

The timestamp is inside the signed text, so a captured request cannot be replayed
later with a fresh timestamp; a receiver refuses timestamps older than a few minutes
(`verify`'s `max_age_s`) and compares signatures in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Gateway-Signature"
TIMESTAMP_HEADER = "X-Gateway-Timestamp"
SCHEME = "sha256="
# A receiver's default tolerance for the timestamp, either way (clocks drift a little).
MAX_AGE_S = 300


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-Gateway-Signature value: sha256=<hex HMAC-SHA256 of b"<timestamp>.<body>">."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return SCHEME + digest


def headers(secret: bytes, timestamp: int, body: bytes) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(secret: bytes, timestamp: str, sent: str, body: bytes, now: float, max_age_s: float = MAX_AGE_S) -> bool:
    """What a receiver checks: the timestamp is recent and the signature is the body's, under `secret`."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs(now - stamp) > max_age_s:
        return False
    return hmac.compare_digest(signature(secret, stamp, body), sent)
