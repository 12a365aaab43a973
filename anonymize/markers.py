"""What a de-identified instance says about its de-identification (PS3.3 C.12.1.1.3 and C.7.5.1).

Written last, after the profile has cleaned everything, so the markers themselves are never
scrubbed, and replaced (not appended) so that de-identifying twice writes them identically.
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from anonymize.profile import BASIC_PROFILE_CODE, OPTION_CODES, PROFILE_EDITION, DeidentificationOptions
from mammofl import __version__

MANUFACTURER: Final = "mammofl"
MODEL_NAME: Final = "mammofl anonymize"
# DeidentificationMethod (LO, up to 64 characters per value): our signature comes first.
METHOD_SIGNATURE: Final = "MAMMOFL ANONYMIZE"
METHOD_PROFILE: Final = f"DICOM PS3.15-{PROFILE_EDITION} E.1-1 BASIC PROFILE"
# DCM 109104 "De-identifying Equipment" (CID 7005 Contributing Equipment Purposes of Reference).
DEIDENTIFYING_EQUIPMENT_CODE: Final = ("109104", "De-identifying Equipment")
CODING_SCHEME: Final = "DCM"


def set_markers(ds: Dataset, options: DeidentificationOptions, *, dates: str, pixels_cleaned: bool) -> None:
    """Mark `ds` as de-identified by us under `options`.

    `dates` is the LongitudinalTemporalInformationModified value ("MODIFIED", "UNMODIFIED" or
    "REMOVED"); `pixels_cleaned` says the Clean Pixel Data Option was applied to its pixels.
    """
    claimed = sorted((name for name in options.enabled if name in OPTION_CODES
                      and (name != "clean_pixel_data" or pixels_cleaned)), key=OPTION_CODES.__getitem__)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [METHOD_SIGNATURE + " " + __version__, METHOD_PROFILE,
                                 *(OPTION_CODES[name][1].upper()[:64] for name in claimed)]
    ds.DeidentificationMethodCodeSequence = Sequence(
        [_code(*BASIC_PROFILE_CODE)] + [_code(*OPTION_CODES[name]) for name in claimed])
    ds.LongitudinalTemporalInformationModified = dates
    if pixels_cleaned:
        ds.BurnedInAnnotation = "NO"
    _record_equipment(ds)


def _record_equipment(ds: Dataset) -> None:
    """Our item in ContributingEquipmentSequence, replacing one a previous run left."""
    others = [item for item in ds.get("ContributingEquipmentSequence", []) if not is_our_equipment(item)]
    ours = Dataset()
    ours.PurposeOfReferenceCodeSequence = Sequence([_code(*DEIDENTIFYING_EQUIPMENT_CODE)])
    ours.Manufacturer = MANUFACTURER
    ours.ManufacturerModelName = MODEL_NAME
    ours.SoftwareVersions = __version__
    ours.ContributionDescription = METHOD_PROFILE
    ds.ContributingEquipmentSequence = Sequence([*others, ours])


def is_our_equipment(item: Dataset) -> bool:
    """Whether a ContributingEquipmentSequence item is the one `set_markers` writes."""
    return item.get("Manufacturer") == MANUFACTURER and item.get("ManufacturerModelName") == MODEL_NAME


def carries_our_markers(ds: Dataset) -> bool:
    """Whether `ds` has the markers `set_markers` writes (forgeable: see anonymize.gate for the keyed check)."""
    method = ds.get("DeidentificationMethod")
    values = [] if method is None else ([method] if isinstance(method, str) else list(method))
    return (ds.get("PatientIdentityRemoved") == "YES"
            and any(str(value).startswith(METHOD_SIGNATURE) for value in values)
            and any(is_our_equipment(item) for item in ds.get("ContributingEquipmentSequence", [])))


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodeMeaning = meaning
    return item
