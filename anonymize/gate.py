"""The gate: only instances our anonymizer produced may reach training or storage.

Two strengths of evidence:

- markers only (`secret=None`): PatientIdentityRemoved=YES, our DeidentificationMethod signature
  and our de-identifying equipment item. Cheap, but anyone can write them;
- keyed (`secret` given): in addition, the Patient ID must be a pseudonym and the SOP Instance UID
  a mapped UID made with that secret (unless the Retain UIDs Option was used), which nobody
  without the secret can forge.

The API de-identifies uploads with `deidentify_bytes` before storing anything; the training data
pipeline calls `require_deidentified_file` on each image (or de-identifies on the fly).
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from anonymize.deidentify import DeidentificationSummary, Quarantined, deidentify_bytes
from anonymize.markers import carries_our_markers
from anonymize.patients import is_pseudonym
from anonymize.profile import OPTION_CODES
from anonymize.uids import UidMapper
from common.data.images import read_dicom_header
from common.errors import DataError

__all__ = ["DeidentificationSummary", "NotDeidentifiedError", "Quarantined", "deidentify_bytes",
           "is_deidentified", "require_deidentified_file"]

_RETAIN_UIDS_CODE = OPTION_CODES["retain_uids"][0]
GATE_TAGS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
             "ContributingEquipmentSequence", "PatientID", "SOPInstanceUID")


class NotDeidentifiedError(DataError):
    """An image that our anonymizer did not produce was offered to training or storage."""


def is_deidentified(ds: Dataset, secret: bytes | None = None) -> bool:
    """Whether `ds` was produced by mammofl's anonymizer (keyed check when `secret` is given)."""
    if not carries_our_markers(ds):
        return False
    if secret is None:
        return True
    if not is_pseudonym(secret, str(ds.get("PatientID", ""))):
        return False
    codes = {str(item.get("CodeValue")) for item in ds.get("DeidentificationMethodCodeSequence", [])}
    return _RETAIN_UIDS_CODE in codes or UidMapper(secret).is_mapped(str(ds.get("SOPInstanceUID", "")))


def require_deidentified_file(path: Path | str, secret: bytes | None = None) -> None:
    """Raise NotDeidentifiedError unless the DICOM file at `path` passes `is_deidentified`
    (reads the header only)."""
    header = read_dicom_header(path, tags=GATE_TAGS)
    if not is_deidentified(header, secret):
        raise NotDeidentifiedError(f"{path}: not produced by mammofl anonymize"
                                   f"{' with this secret' if secret is not None else ''}; run "
                                   "`mammofl anonymize` on it first (training and storage take only "
                                   "de-identified images)")
