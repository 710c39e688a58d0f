"""Keyed pseudonyms for patient, case and specimen identifiers.

A pseudonym is HMAC-SHA256(node secret, kind || value), so the same identifier always maps to
the same pseudonym on one node (slides of one patient link together) while nobody without the
node's secret can compute or reverse it. The submitting node maps a pseudonym back by
recomputing it for identifiers it already holds; no table of originals is ever stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_MIN_KEY_BYTES = 32


class Pseudonymizer:
    """Derives stable, keyed pseudonyms. The key never leaves the node."""

    def __init__(self, key: bytes, site: str) -> None:
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"pseudonym key must be at least {_MIN_KEY_BYTES} bytes")
        self._key = key
        self._site = site

    def pseudonym(self, kind: str, value: str) -> str:
        """Return the pseudonym of `value`, an identifier of the given kind ("patient", ...)."""
        normalised = value.strip()
        mac = hmac.new(self._key, f"{kind}\x00{normalised}".encode(), hashlib.sha256).digest()
        token = base64.b32encode(mac[:15]).decode("ascii").lower()
        return f"{self._site}-{kind[:3]}-{token}"

    def is_pseudonym(self, value: str) -> bool:
        """True for a value this node produced (site prefix, kind, 24 base32 characters)."""
        parts = value.split("-")
        return (
            len(parts) >= 3
            and "-".join(parts[:-2]) == self._site
            and len(parts[-1]) == 24
            and parts[-1].isalnum()
        )

    def uid(self, value: str) -> str:
        """A DICOM UID (2.25 root, decimal of 128 bits) derived from `value` under the key."""
        mac = hmac.new(self._key, f"uid\x00{value}".encode(), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(mac[:16], "big"))
