"""Password hashes for the metrics endpoint's basic auth: PBKDF2-HMAC-SHA256, stdlib only.

A hash is one ASCII string in the modular crypt format::

    $pbkdf2-sha256$ITERATIONS$SALT$CHECKSUM

``ITERATIONS`` in decimal (10000 to 10000000; ``gblk hash-password`` uses
600000, OWASP's 2023 figure for PBKDF2-HMAC-SHA256), ``SALT`` (at least 8 bytes,
16 from ``hash_password``) and ``CHECKSUM`` (the 32-byte derived key) in
"adapted base64": standard base64 with ``.`` for ``+`` and no ``=`` padding.
The password is UTF-8 encoded. Checking compares derived keys in constant time.

What it must not do: log, keep or show a password; echo a value it refuses (an
operator may have pasted a plain password where a hash belongs); depend on
anything outside the standard library (no bcrypt).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Optional

SCHEME = "pbkdf2-sha256"
#: what ``hash_password`` uses unless told otherwise
DEFAULT_ITERATIONS = 600_000
MIN_ITERATIONS = 10_000
#: a sanity bound: every check of a wrong password costs this much CPU
MAX_ITERATIONS = 10_000_000
SALT_BYTES = 16
MIN_SALT_BYTES = 8
#: SHA-256's digest size: the derived key is one block
KEY_BYTES = 32

FORMAT = f"${SCHEME}$ITERATIONS$SALT$HASH"

_AB64 = re.compile(r"[A-Za-z0-9./]+")


class BadHash(ValueError):
    """Not a hash gblk can check; the message says what is expected, never the value."""


def ab64_encode(data: bytes) -> str:
    """Adapted base64: ``.`` instead of ``+``, no padding."""
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("+", ".")


def ab64_decode(text: str) -> bytes:
    """The inverse of ab64_encode; ValueError on anything else."""
    if not _AB64.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not adapted base64")
    padded = text.replace(".", "+") + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise ValueError("not adapted base64") from exc


def _derive(password: str, salt: bytes, iterations: int) -> bytes:
    # hashlib releases the GIL while it works: callers run this in a worker thread
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations, KEY_BYTES)


@dataclass(frozen=True)
class PasswordHash:
    """A parsed hash. ``str()`` gives the hash string back."""

    iterations: int
    salt: bytes
    checksum: bytes

    @classmethod
    def parse(cls, text: object) -> "PasswordHash":
        """Parse a hash string; BadHash (saying what is wrong, not what was given)."""
        expected = f"expected {FORMAT} (make one with gblk hash-password)"
        if not isinstance(text, str):
            raise BadHash(f"must be a string: {expected}")
        parts = text.split("$")
        if len(parts) != 5 or parts[0] != "" or parts[1] != SCHEME:
            raise BadHash(f"is not a password hash gblk knows: {expected}")
        _, _, iterations_s, salt_s, checksum_s = parts
        if not iterations_s.isdigit() or not iterations_s.isascii() or iterations_s.startswith("0"):
            raise BadHash(f"has a bad iteration count: {expected}")
        iterations = int(iterations_s)
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise BadHash(f"has {iterations} iterations; allowed: {MIN_ITERATIONS} to {MAX_ITERATIONS}")
        try:
            salt = ab64_decode(salt_s)
            checksum = ab64_decode(checksum_s)
        except ValueError:
            raise BadHash(f"has a salt or hash that is not adapted base64: {expected}") from None
        if len(salt) < MIN_SALT_BYTES:
            raise BadHash(f"has a salt of {len(salt)} bytes; at least {MIN_SALT_BYTES} are needed")
        if len(checksum) != KEY_BYTES:
            raise BadHash(f"has a hash of {len(checksum)} bytes; PBKDF2-SHA256 gives {KEY_BYTES}")
        return cls(iterations, salt, checksum)

    def verify(self, password: str) -> bool:
        """True if ``password`` is the one hashed. Costs ``iterations`` rounds: run it
        off the event loop. Constant time in where the derived keys differ."""
        return hmac.compare_digest(_derive(password, self.salt, self.iterations), self.checksum)

    def __str__(self) -> str:
        return f"${SCHEME}${self.iterations}${ab64_encode(self.salt)}${ab64_encode(self.checksum)}"

    def __repr__(self) -> str:  # a hash is a secret too (offline guessing): keep it out of logs
        return f"PasswordHash(iterations={self.iterations})"


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS, salt: Optional[bytes] = None) -> str:
    """The hash string of ``password`` with a fresh random salt (or ``salt``, for tests)."""
    if not password:
        raise ValueError("empty password")
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be from {MIN_ITERATIONS} to {MAX_ITERATIONS}")
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(f"salt must be at least {MIN_SALT_BYTES} bytes")
    return str(PasswordHash(iterations, salt, _derive(password, salt, iterations)))
