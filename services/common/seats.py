"""Seat keys (PROTOCOL v2 "Seats"): the secret in a participant's link.

A participant has a public **code** (their name in every payload, the export and the API) and a
secret **key**, the only credential of their seat: `/p/{key}` and `/ws/{key}`. The store mints
keys when it creates a session; the gateway checks them.

A key verifies itself: 16 random bytes from `secrets` (128 bits, the part nobody can guess)
followed by the first 8 bytes of their HMAC-SHA256 under the deployment's seat secret, in
URL-safe base64 without padding (32 characters). The gateway checks the tag before it asks the
store anything, so a flood of made-up keys (or of participant codes, which are public) costs
one HMAC each and no look-up; a forged key gets through with probability 2^-64 per try, and
then still has to name a seat the store knows. The secret is `CANOPY_SEAT_SECRET`, or, when
that is not set, one derived from the admin token (so a deployment with one secret works as it
is; set `CANOPY_SEAT_SECRET` to rotate the admin token without invalidating links: see
docs/operations.md).

Keys never appear in logs: `fingerprint(key)` is a short keyed hash that names a key without
giving it away, for the rare log line that must tell two keys apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

NONCE_BYTES = 16
TAG_BYTES = 8
KEY_LENGTH = 32  # characters of base64url for NONCE_BYTES + TAG_BYTES (24 bytes)
_KEY = re.compile(r"[A-Za-z0-9_-]{32}")
_DERIVATION = b"canopy seat keys v2"


def derive_secret(seat_secret: str, admin_token: str) -> bytes:
    """The HMAC key of seat keys: `seat_secret` when set, else one derived from the token."""
    if seat_secret:
        return hashlib.sha256(_DERIVATION + b"\x00" + seat_secret.encode()).digest()
    return hmac.new(admin_token.encode(), _DERIVATION, hashlib.sha256).digest()


def _tag(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()[:TAG_BYTES]


def new_key(secret: bytes) -> str:
    """A fresh seat key (128 random bits and their tag)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return base64.urlsafe_b64encode(nonce + _tag(secret, nonce)).decode().rstrip("=")


def well_formed(key: str, secret: bytes) -> bool:
    """Whether `key` is one this deployment could have minted (checked before any look-up).

    Constant time in the tag comparison; anything that is not 32 base64url characters is
    refused at once (a participant code is 20 hex characters: never a key)."""
    if _KEY.fullmatch(key) is None:
        return False
    try:
        raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
    except (binascii.Error, ValueError):
        return False
    nonce, tag = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
    return len(tag) == TAG_BYTES and hmac.compare_digest(tag, _tag(secret, nonce))


def fingerprint(key: str) -> str:
    """A short name for a key in a log line: not the key, and not reversible to it."""
    return hashlib.blake2s(key.encode(), digest_size=4, person=b"canopyfp").hexdigest()
