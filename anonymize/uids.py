"""Keyed UID replacement: every instance UID maps to one "2.25." UID, the same at every site and run
that shares the secret, so references between files still resolve after de-identification.

Layout of the 128-bit UUID behind a mapped UID (ISO/IEC 9834-8 requires a UUID under 2.25):
bytes 0-10 are an HMAC of the original UID (with the UUID version 8 and variant bits set inside
them), bytes 11-15 an HMAC tag over bytes 0-10. The tag lets `is_mapped` recognise a UID this
secret produced, which makes mapping idempotent: a mapped UID is never mapped again. 82 free bits
keep accidental collisions (the only way two UIDs could share an image) below 1e-9 for 1e8 UIDs.
"""

from __future__ import annotations

import hmac
import uuid
from functools import lru_cache
from typing import Final

from anonymize.secret import keyed_digest

UUID_ROOT: Final = "2.25."
# UIDs under the DICOM root name classes, transfer syntaxes, coding schemes and well-known frames
# of reference: they identify nothing about a patient and must survive unchanged.
DICOM_ROOT: Final = "1.2.840.10008."
# Attributes whose UID names a class or a scheme whatever its root (private SOP classes included).
CLASS_UID_KEYWORDS: Final = frozenset({
    "SOPClassUID", "MediaStorageSOPClassUID", "ReferencedSOPClassUID", "ReferencedSOPClassUIDInFile",
    "AffectedSOPClassUID", "RequestedSOPClassUID", "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID",
    "SOPClassesInStudy", "TransferSyntaxUID", "ReferencedTransferSyntaxUIDInFile", "ImplementationClassUID",
    "CodingSchemeUID", "ContextUID", "MappingResourceUID", "ContextGroupExtensionCreatorUID",
    "TemplateExtensionCreatorUID", "TemplateExtensionOrganizationUID", "PrivateInformationCreatorUID",
})
_ID_BYTES = 11
_TAG_BYTES = 5


class UidMapper:
    """Maps instance UIDs to keyed 2.25 UIDs; class and well-known UIDs pass through."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self.map = lru_cache(maxsize=65536)(self._map)

    def _map(self, uid: str) -> str:
        if is_well_known(uid) or self.is_mapped(uid):
            return uid
        raw = bytearray(keyed_digest(self._secret, b"uid", uid.encode("ascii", "replace"))[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # UUID version 8 (custom)
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        raw[_ID_BYTES:] = self._tag(bytes(raw[:_ID_BYTES]))
        return UUID_ROOT + str(uuid.UUID(bytes=bytes(raw)).int)

    def is_mapped(self, uid: str) -> bool:
        """Whether `uid` is a UID this secret produced (so mapping it again must leave it alone)."""
        if not uid.startswith(UUID_ROOT):
            return False
        digits = uid[len(UUID_ROOT):]
        if not digits.isdigit() or int(digits) >= 1 << 128:
            return False
        raw = int(digits).to_bytes(16, "big")
        return hmac.compare_digest(raw[_ID_BYTES:], self._tag(raw[:_ID_BYTES]))

    def _tag(self, identifier: bytes) -> bytes:
        return keyed_digest(self._secret, b"uid-tag", identifier)[:_TAG_BYTES]


def is_well_known(uid: str) -> bool:
    """Whether `uid` is defined by the DICOM standard (SOP classes, transfer syntaxes, ...)."""
    return uid.startswith(DICOM_ROOT)
