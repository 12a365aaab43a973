"""Keyed patient pseudonyms and the per-patient date shift.

A pseudonym is "MFL" + base32(HMAC id + HMAC tag): the same patient ID gives the same pseudonym
at every site sharing the secret, and the tag lets `is_pseudonym` recognise one so that
de-identifying an already de-identified file neither re-pseudonymises nor shifts its dates again.
The date shift is a keyed number of days in [-MAX_SHIFT_DAYS, -1]: never zero, always into the past,
the same for every file of the patient, so intervals between a patient's dates are preserved.
"""

from __future__ import annotations

import base64
import hmac
from typing import Final

from anonymize.secret import keyed_digest

PSEUDONYM_PREFIX: Final = "MFL"
MAX_SHIFT_DAYS: Final = 3650
_ID_BYTES = 10
_TAG_BYTES = 5


def pseudonym(secret: bytes, patient_id: str) -> str:
    """The patient's pseudonymous ID (also used as Patient's Name); a pseudonym maps to itself."""
    if is_pseudonym(secret, patient_id):
        return patient_id
    identifier = keyed_digest(secret, b"patient-id", patient_id.encode("utf-8"))[:_ID_BYTES]
    return PSEUDONYM_PREFIX + _base32(identifier + _tag(secret, identifier))


def is_pseudonym(secret: bytes, value: str) -> bool:
    """Whether `value` is a pseudonym this secret produced."""
    if not value.startswith(PSEUDONYM_PREFIX):
        return False
    try:
        raw = base64.b32decode(value[len(PSEUDONYM_PREFIX):])
    except ValueError:
        return False
    if len(raw) != _ID_BYTES + _TAG_BYTES:
        return False
    return hmac.compare_digest(raw[_ID_BYTES:], _tag(secret, raw[:_ID_BYTES]))


def date_shift_days(secret: bytes, patient_id: str) -> int:
    """The patient's keyed, non-zero shift in days (negative: dates move into the past)."""
    digest = keyed_digest(secret, b"date-shift", patient_id.encode("utf-8"))
    return -(1 + int.from_bytes(digest[:8], "big") % MAX_SHIFT_DAYS)


def _tag(secret: bytes, identifier: bytes) -> bytes:
    return keyed_digest(secret, b"patient-tag", identifier)[:_TAG_BYTES]


def _base32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii")
