"""De-identification of synthetic mammograms seeded with canary PHI: nothing identifying survives,
UIDs and dates stay consistent, the output is a valid instance, and a second pass changes nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
from pathlib import Path

import pydicom
import pytest

from anonymize import iod
from anonymize.deidentify import Quarantined, deidentify_bytes
from anonymize.gate import is_deidentified
from anonymize.patients import is_pseudonym
from anonymize.profile import DEFAULT_OPTIONS, DeidentificationOptions, parse_options
from anonymize.uids import UidMapper
from common.data.synthetic_dicom import synthesize_dataset
from common.errors import ConfigError
from tests.fixtures.anonymize_canaries import (
    CANARY_PATIENT,
    PHI_WORDS,
    plant_canaries,
    plant_free_text,
    surviving_canaries,
)

SECRET = bytes(range(32))
MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthesize_dataset(root / "data", sites=2, per_site=4, size=256, seed=11, burned_in_text=0.0)
    return root / "data"


@pytest.fixture(scope="module")
def mammograms(synthetic: Path) -> list[Path]:
    paths = sorted(p for p in synthetic.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "MG"
                   and pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY)
    assert len(paths) >= 4
    return paths


@pytest.fixture(scope="module")
def canary_file(mammograms: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("canary") / "canary.dcm"
    plant_canaries(mammograms[0], target)
    return target


def deidentify(path: Path, options: DeidentificationOptions = DEFAULT_OPTIONS, secret: bytes = SECRET):
    output, summary = deidentify_bytes(path.read_bytes(), options, secret)
    return output, summary, pydicom.dcmread(io.BytesIO(output))


def test_the_planted_canaries_are_really_in_the_input(canary_file: Path) -> None:
    assert len(surviving_canaries(canary_file.read_bytes())) >= 27


@pytest.mark.parametrize("options", [DEFAULT_OPTIONS, DeidentificationOptions(),
                                     parse_options(["retain_patient_characteristics", "clean_descriptors",
                                                    "clean_structured_content", "retain_full_dates"])],
                         ids=["default", "basic-profile", "full-dates"])
def test_no_canary_survives_anywhere_in_the_output_bytes(canary_file: Path, options: DeidentificationOptions) -> None:
    output, _, _ = deidentify(canary_file, options)
    survivors = surviving_canaries(output)
    if options.retain_full_dates:
        survivors.remove("20190506")  # kept on purpose under Retain Longitudinal Full Dates
    assert survivors == []


def test_original_uids_are_replaced_everywhere_and_file_meta_agrees(canary_file: Path) -> None:
    original = pydicom.dcmread(canary_file)
    output, _, result = deidentify(canary_file)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert original[keyword].value.encode() not in output
        assert UidMapper(SECRET).is_mapped(result[keyword].value)
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    assert result.SOPClassUID == original.SOPClassUID
    assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert result.preamble == b"\0" * 128


def test_uid_mapping_is_shared_across_files_so_references_resolve(mammograms: list[Path], tmp_path: Path) -> None:
    referenced = pydicom.dcmread(mammograms[0])
    referring = pydicom.dcmread(mammograms[1])
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = referenced.SOPClassUID
    item.ReferencedSOPInstanceUID = referenced.SOPInstanceUID
    referring.ReferencedInstanceSequence = [item]
    referring.save_as(tmp_path / "referring.dcm", enforce_file_format=True)
    _, _, target = deidentify(mammograms[0])
    _, _, source = deidentify(tmp_path / "referring.dcm")
    assert source.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == target.SOPInstanceUID
    assert source.ReferencedInstanceSequence[0].ReferencedSOPClassUID == referenced.SOPClassUID


def test_patients_get_keyed_pseudonyms_and_one_non_zero_shift_preserving_intervals(canary_file: Path) -> None:
    original = pydicom.dcmread(canary_file)
    _, _, result = deidentify(canary_file)
    assert is_pseudonym(SECRET, result.PatientID) and result.PatientName == result.PatientID
    _, _, again = deidentify(canary_file)
    assert again.PatientID == result.PatientID
    shift = _days(result.StudyDate) - _days(original.StudyDate)
    assert shift != 0
    assert _days(result.AcquisitionDateTime[:8]) - _days(original.AcquisitionDateTime[:8]) == shift
    assert result.AcquisitionDateTime[8:] == original.AcquisitionDateTime[8:]
    assert result.StudyTime == original.StudyTime
    assert result.PatientBirthDate == ""
    assert result.LongitudinalTemporalInformationModified == "MODIFIED"


def test_another_secret_gives_other_pseudonyms_and_uids(canary_file: Path) -> None:
    _, _, ours = deidentify(canary_file)
    _, _, theirs = deidentify(canary_file, secret=b"\x01" * 32)
    assert ours.PatientID != theirs.PatientID and ours.SOPInstanceUID != theirs.SOPInstanceUID


def test_mammography_attributes_without_identity_are_kept(canary_file: Path) -> None:
    original = pydicom.dcmread(canary_file)
    _, _, result = deidentify(canary_file)
    for keyword in ("ImageLaterality", "ViewPosition", "BreastImplantPresent", "KVP", "CompressionForce",
                    "BodyPartThickness", "PhotometricInterpretation", "WindowCenter", "Manufacturer",
                    "ManufacturerModelName", "PixelSpacing", "PresentationIntentType", "PatientOrientation"):
        assert result[keyword].value == original[keyword].value, keyword
    assert result.ViewCodeSequence[0].CodeValue == original.ViewCodeSequence[0].CodeValue
    assert result.PixelData == original.PixelData


def test_by_default_descriptors_are_removed_and_local_code_meanings_cleaned(canary_file: Path) -> None:
    _, summary, result = deidentify(canary_file)
    assert "SeriesDescription" not in result and "ImageComments" not in result
    modifier = result.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
    nested = modifier.PurposeOfReferenceCodeSequence[0]
    assert nested.CodingSchemeDesignator == "99LOCAL" and nested.CodeMeaning == "[removed] by [removed]"
    assert modifier.CodeMeaning == "[removed]"  # a local scheme's meaning keeps vocabulary words only
    # A standard scheme's meaning (CPT here) is coded vocabulary, kept as it is.
    assert result.ProcedureCodeSequence[0].CodeMeaning == "Screening mammography, bilateral"
    assert nested.PersonName == "ANONYMIZED"
    assert summary.actions["(0008,103E)"] == "X"


def test_clean_descriptors_keeps_only_vocabulary_words(canary_file: Path) -> None:
    _, summary, result = deidentify(canary_file, parse_options([*DEFAULT_OPTIONS.enabled, "clean_descriptors",
                                                                "clean_structured_content"]))
    assert result.SeriesDescription == "L CC [removed]"
    assert result.ImageComments == "prior at [removed]"
    assert result.ContentSequence[0].TextValue == "[removed] by [removed]"
    assert summary.removed_words["(0008,103E)"] == 1 and summary.removed_words["(0020,4000)"] == 6


@pytest.fixture(scope="module")
def free_text_file(mammograms: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = pydicom.dcmread(mammograms[0])
    plant_free_text(ds)
    target = tmp_path_factory.mktemp("free-text") / "free-text.dcm"
    ds.save_as(target, enforce_file_format=True)
    assert all(word.encode() in target.read_bytes() for word in PHI_WORDS)  # planted, and only there
    return target


@pytest.mark.parametrize("options", [
    DEFAULT_OPTIONS, DeidentificationOptions(),
    parse_options(["retain_patient_characteristics", "retain_modified_dates", "clean_descriptors",
                   "clean_structured_content"])], ids=["default", "basic-profile", "clean-descriptors"])
def test_free_text_phi_found_nowhere_else_does_not_survive(free_text_file: Path, options) -> None:
    # Before: the default kept descriptors and scrubbed only values repeated in identifying
    # attributes, so every planted name, number, date and address here came back verbatim.
    output, summary = deidentify_bytes(free_text_file.read_bytes(), options, SECRET)

    upper = output.upper()
    assert [word for word in PHI_WORDS if word.upper().encode() in upper] == []
    audit = json.dumps(dataclasses.asdict(summary))
    assert [word for word in PHI_WORDS if word in audit] == []


def test_clean_descriptors_keeps_the_safe_words_of_nested_and_top_level_text(free_text_file: Path) -> None:
    options = parse_options(["retain_patient_characteristics", "clean_descriptors"])
    _, summary, result = deidentify(free_text_file, options)

    assert result.StudyDescription == "Mammo screening [removed] by [removed]"
    assert result.AdditionalPatientHistory == "[removed] breast cancer"
    assert result.RequestAttributesSequence[0].RequestedProcedureDescription == "Biopsy for [removed]"
    assert result.ImageComments == "[removed]"
    assert summary.removed_words["(0040,0275)>(0040,1002)"] == 6  # lump found Thistlewood 2019 04 01
    assert summary.removed_words["(0020,4000)"] >= 12


def test_a_user_vocabulary_extends_the_shipped_one(free_text_file: Path, tmp_path: Path) -> None:
    from anonymize.vocabulary import load_vocabulary

    (tmp_path / "words.txt").write_text("# our protocol words\nlatex\n", encoding="utf-8")
    options = parse_options(["retain_patient_characteristics", "clean_descriptors"])

    output, _ = deidentify_bytes(free_text_file.read_bytes(), options, SECRET,
                                 vocabulary=load_vocabulary(tmp_path / "words.txt"))
    result = pydicom.dcmread(io.BytesIO(output))
    assert result.Allergies == "latex per [removed]"
    (tmp_path / "bad.txt").write_text("MRN4242\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.txt: 1 entry is not a single word"):
        load_vocabulary(tmp_path / "bad.txt")


def test_private_blocks_overlays_and_curves_are_removed(canary_file: Path) -> None:
    _, summary, result = deidentify(canary_file)
    assert not any(elem.tag.is_private for elem in result.iterall())
    assert not any((elem.tag.group & 0xFF00) in (0x5000, 0x6000) for elem in result)
    assert summary.actions["(0029,xx10)"] == "X"
    assert summary.actions["(6000,3000)"] == "X"


def test_option_sets_change_exactly_the_attributes_they_should(canary_file: Path) -> None:
    _, _, basic = deidentify(canary_file, DeidentificationOptions())
    _, _, characteristics = deidentify(canary_file, parse_options("retain_patient_characteristics"))
    assert "PatientAge" not in basic and basic.PatientSex == ""
    assert characteristics.PatientAge == pydicom.dcmread(canary_file).PatientAge
    assert characteristics.PatientSex == "F"
    assert _differing(basic, characteristics) == {"PatientAge", "PatientSex", "DeidentificationMethod",
                                                  "DeidentificationMethodCodeSequence"}
    _, _, institution = deidentify(canary_file, parse_options("retain_institution_identity"))
    assert institution.InstitutionName == "ZQX Canary Hospital 7"
    assert _differing(basic, institution) == {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                                              "DeidentificationMethod", "DeidentificationMethodCodeSequence"}
    _, _, uids = deidentify(canary_file, parse_options("retain_uids"))
    assert uids.SOPInstanceUID == pydicom.dcmread(canary_file).SOPInstanceUID


def test_basic_profile_removes_dates_and_descriptors(canary_file: Path) -> None:
    _, _, result = deidentify(canary_file, DeidentificationOptions())
    assert result.StudyDate == "" and "SeriesDate" not in result and "AcquisitionDateTime" not in result
    assert "SeriesDescription" not in result and "ImageComments" not in result
    assert result.LongitudinalTemporalInformationModified == "REMOVED"
    assert [item.CodeValue for item in result.DeidentificationMethodCodeSequence] == ["113100"]


def test_markers_name_the_profile_options_and_equipment(canary_file: Path) -> None:
    _, _, result = deidentify(canary_file)
    assert result.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in result.DeidentificationMethodCodeSequence] == [
        "113100", "113101", "113107", "113108"]
    assert result.ContributingEquipmentSequence[-1].Manufacturer == "mammofl"
    assert result.ContributingEquipmentSequence[-1].PurposeOfReferenceCodeSequence[0].CodeValue == "109104"
    assert result.BurnedInAnnotation == "NO"
    assert is_deidentified(result) and is_deidentified(result, SECRET)
    assert not is_deidentified(result, b"\x02" * 32)
    assert not is_deidentified(pydicom.dcmread(canary_file))


def test_output_keeps_the_type_1_and_2_attributes_its_iod_requires(mammograms: list[Path]) -> None:
    for path in mammograms:
        original = pydicom.dcmread(path)
        _, _, result = deidentify(path)
        required = iod.required_attributes(original.SOPClassUID)
        assert len(required) > 30
        for keyword, attribute_type in required.items():
            if keyword in original:
                assert keyword in result, keyword
                if attribute_type == "1":
                    assert result[keyword].value not in (None, "", []), keyword


def test_deidentifying_the_output_again_changes_nothing(canary_file: Path) -> None:
    once, _, _ = deidentify(canary_file)
    twice, _ = deidentify_bytes(once, DEFAULT_OPTIONS, SECRET)
    assert twice == once


def test_summary_holds_no_value_from_the_file(canary_file: Path) -> None:
    _, summary, _ = deidentify(canary_file)
    text = repr(summary)
    assert surviving_canaries(text.encode()) == []
    assert summary.actions["(0010,0010)"] == "P" and summary.actions["(0008,0018)"] == "U"


def test_a_file_without_sop_instance_uid_is_quarantined(canary_file: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(canary_file)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "no-uid.dcm")
    with pytest.raises(Quarantined) as caught:
        deidentify(tmp_path / "no-uid.dcm")
    assert caught.value.reason == "not-composite"
    assert CANARY_PATIENT.mrn not in str(caught.value)


def _days(value: str) -> int:
    return dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])).toordinal()


def _differing(first: pydicom.Dataset, second: pydicom.Dataset) -> set[str]:
    keywords = {elem.keyword for elem in first} | {elem.keyword for elem in second}
    return {keyword for keyword in keywords if keyword and first.get(keyword) != second.get(keyword)}


def test_pydicom_never_logs_a_header_value(caplog):
    import logging

    from common import dicom_logging  # noqa: F401  (what every DICOM-reading package imports)

    with caplog.at_level(logging.DEBUG):
        logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.SMITH^JOHN'. Please see the standard")
        logging.getLogger("pydicom.valuerep").warning('Invalid value for VR IS: "JOHN1970"')
    assert "SMITH" not in caplog.text and "JOHN1970" not in caplog.text
    assert "Invalid value for VR UI: '<value withheld>'" in caplog.text


def test_reading_an_invalid_header_value_prints_no_value_on_stderr(tmp_path):
    # Before: pydicom's warn_and_log also issued a UserWarning, which Python printed to stderr
    # quoting the value (the REST service's console, a site's log file).
    import subprocess
    import sys

    script = (
        "import anonymize.deidentify, logging, pydicom\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "pydicom.config.settings.reading_validation_mode = pydicom.config.WARN\n"
        "from pydicom.valuerep import validate_value\n"
        "validate_value('UI', '1.2.SMITH^JOHN', pydicom.config.WARN)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])

    assert result.returncode == 0, result.stderr
    assert "SMITH" not in result.stderr and "<value withheld>" in result.stderr
