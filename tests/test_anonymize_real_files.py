"""De-identification of the real DICOM files shipped with pydicom: compressed, private, nested,
SR, overlays - and the broken ones (truncated, bad VR, not DICOM, no pixel decoder) quarantined."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from anonymize.deidentify import Quarantined, deidentify_bytes
from anonymize.private import SafePrivateList
from anonymize.profile import DEFAULT_OPTIONS, parse_options
from anonymize.uids import CLASS_UID_KEYWORDS, is_well_known

SECRET = bytes(range(32))
# Reading the originals in these tests (not in the anonymizer) warns about their invalid values.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
ACCEPTED = ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "rtplan.dcm",
            "test-SR.dcm", "reportsi.dcm", "waveform_ecg.dcm", "rtdose_rle_1frame.dcm", "image_dfl.dcm")


def identifying_values(ds: pydicom.Dataset) -> set[str]:
    """Person names, patient/institution identifiers and instance UIDs found anywhere in `ds`."""
    found = set()
    for elem in ds.iterall():
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        for value in values:
            text = str(value) if value is not None else ""
            if elem.VR == "PN":
                found.update(part for part in text.replace("=", "^").split("^") if len(part) >= 4)
            elif elem.keyword in ("PatientID", "InstitutionName", "InstitutionAddress", "StationName",
                                  "AccessionNumber", "DeviceSerialNumber") and len(text) >= 4:
                found.add(text)
            elif elem.VR == "UI" and elem.keyword not in CLASS_UID_KEYWORDS and not is_well_known(text) and len(text) >= 8:
                found.add(text)
    return found


@pytest.mark.parametrize("name", ACCEPTED)
def test_real_files_lose_every_identifying_value_and_stay_readable(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    original = pydicom.dcmread(io.BytesIO(data))
    output, summary = deidentify_bytes(data, DEFAULT_OPTIONS, SECRET)
    result = pydicom.dcmread(io.BytesIO(output))
    leaked = [value for value in identifying_values(original) if value.upper().encode() in output.upper()]
    assert leaked == []
    assert not any(elem.tag.is_private for elem in result.iterall())
    assert result.PatientIdentityRemoved == "YES" and result.SOPClassUID == original.SOPClassUID
    assert deidentify_bytes(output, DEFAULT_OPTIONS, SECRET)[0] == output
    assert summary.input_blake3 != summary.output_blake3


def test_deep_sequences_are_walked_and_their_uids_mapped() -> None:
    data = Path(get_testdata_file("rtplan.dcm")).read_bytes()
    original = pydicom.dcmread(io.BytesIO(data))
    output, summary = deidentify_bytes(data, DEFAULT_OPTIONS, SECRET)
    result = pydicom.dcmread(io.BytesIO(output))
    nested = [path for path in summary.actions if path.count(">") >= 2]
    assert nested
    referenced = original.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
    mapped = result.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
    assert mapped != referenced and mapped.startswith("2.25.") and UID(mapped).is_valid


def test_sr_content_is_cleaned_item_by_item() -> None:
    data = Path(get_testdata_file("test-SR.dcm")).read_bytes()
    _, summary = deidentify_bytes(data, DEFAULT_OPTIONS, SECRET)
    assert any(path.startswith("(0040,A730)>") for path in summary.actions)
    _, basic = deidentify_bytes(data, parse_options([]), SECRET)
    assert basic.actions.get("(0040,A730)>(0040,A160)", "X") == "X"  # free SR text removed under the basic profile


def test_private_sequences_nested_in_private_blocks_are_removed() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for elem in pydicom.dcmread(get_testdata_file("nested_priv_SQ.dcm")):
        if elem.tag.is_private:
            ds.add(elem)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    output, summary = deidentify_bytes(buffer.getvalue(), DEFAULT_OPTIONS, SECRET)
    assert not any(elem.tag.is_private for elem in pydicom.dcmread(io.BytesIO(output)).iterall())
    assert summary.actions["(0001,0001)"] == "X"


def test_retain_safe_private_keeps_exactly_the_allow_listed_element() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    creator = ds[0x00430010].value
    allowed = SafePrivateList(frozenset({(creator, 0x0043, 0x27)}))
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    output, _ = deidentify_bytes(data, parse_options("retain_safe_private"), SECRET, safe_private=allowed)
    kept = [elem.tag for elem in pydicom.dcmread(io.BytesIO(output)).iterall() if elem.tag.is_private]
    assert kept == [pydicom.tag.Tag(0x00430010), pydicom.tag.Tag(0x00431027)]
    output, _ = deidentify_bytes(data, DEFAULT_OPTIONS, SECRET, safe_private=allowed)
    assert not any(elem.tag.is_private for elem in pydicom.dcmread(io.BytesIO(output)).iterall())


def test_overlays_are_removed_whole() -> None:
    data = Path(get_testdata_file("examples_overlay.dcm")).read_bytes()
    assert any(elem.tag.group == 0x6000 for elem in pydicom.dcmread(io.BytesIO(data)))
    output, _ = deidentify_bytes(data, parse_options("retain_modified_dates"), SECRET)
    assert not any((elem.tag.group & 0xFF00) == 0x6000 for elem in pydicom.dcmread(io.BytesIO(output)))


@pytest.mark.parametrize(("name", "reason"), [("rtplan_truncated.dcm", "truncated"), ("MR_truncated.dcm", "truncated"),
                                              ("badVR.dcm", "invalid-value"), ("no_meta.dcm", "not-dicom"),
                                              ("nested_priv_SQ.dcm", "not-composite")])
def test_broken_real_files_are_quarantined_with_a_reason(name: str, reason: str) -> None:
    with pytest.raises(Quarantined) as caught:
        deidentify_bytes(Path(get_testdata_file(name)).read_bytes(), DEFAULT_OPTIONS, SECRET)
    assert caught.value.reason == reason


def test_compressed_pixels_without_a_decoder_are_quarantined() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pixel decoder in pydicom
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(Quarantined) as caught:
        deidentify_bytes(buffer.getvalue(), DEFAULT_OPTIONS, SECRET)
    assert caught.value.reason == "no-pixel-decoder"


@pytest.mark.parametrize("data", [b"", b"hello, not a DICOM file", b"\0" * 128 + b"DICM"], ids=["empty", "text", "bare"])
def test_non_dicom_bytes_are_quarantined(data: bytes) -> None:
    with pytest.raises(Quarantined) as caught:
        deidentify_bytes(data, DEFAULT_OPTIONS, SECRET)
    assert caught.value.reason in ("not-dicom", "truncated", "not-composite")
