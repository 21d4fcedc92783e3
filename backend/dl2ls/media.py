"""Media through the backend: signed URLs for `/media/<item id>`.

Label Studio's editor fetches a task's video from the user's browser, which has no Dataloop token;
the backend streams it from Dataloop with its own. The URL a task carries is bound to its item by
an HMAC (SHA-256) keyed with DL2LS_MEDIA_SECRET: it never holds a token, it does not expire (Label
Studio keeps task data for good), and rotating the secret revokes every URL at once. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import quote

SIGNATURE_CHARS = 32  # hex: 128 bits of the HMAC


def signature(item_id: str, secret: str) -> str:
    digest = hmac.new(secret.encode(), f"dl2ls-media\x00{item_id}".encode(), hashlib.sha256).hexdigest()
    return digest[:SIGNATURE_CHARS]


def valid(item_id: str, given: str | None, secret: str | None) -> bool:
    """Whether `given` is this item's signature under `secret` (constant time)."""
    if not secret or not given or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), signature(item_id, secret).encode())


@dataclass(frozen=True)
class MediaProxy:
    """Where browsers reach the backend (DL2LS_PUBLIC_URL) and the secret its URLs are signed with."""

    public_url: str
    secret: str

    def url(self, item_id: str) -> str:
        return f"{self.public_url.rstrip('/')}/media/{quote(item_id, safe='')}?sig={signature(item_id, self.secret)}"
