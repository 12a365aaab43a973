"""The synthetic mammography generator: pixels, DICOM files and the CBIS-DDSM layout."""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from common.data.records import BENIGN, MALIGNANT, NORMAL
from common.data.synthetic import plan_site, synthesize_image
from common.data.synthetic_dicom import (
    FakePatient,
    FakeStudy,
    Institution,
    SynthSummary,
    identifying_metadata,
    synthesize_dataset,
)
from common.errors import DataError

SITES, PER_SITE, SIZE, SEED = 3, 12, 96, 3
MASS_HEADER = ("patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,"
               "mass shape,mass margins,assessment,pathology,subtlety,image file path,cropped image file path,"
               "ROI mask file path")
CALC_HEADER = ("patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,"
               "calc type,calc distribution,assessment,pathology,subtlety,image file path,cropped image file path,"
               "ROI mask file path")
FOLDER = re.compile(r"^(Mass|Calc|Normal)-(Training|Test)_(P_\d{5})_(LEFT|RIGHT)_(CC|MLO)$")
MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
ASSESSMENTS = {"MALIGNANT": {0, 4, 5}, "BENIGN": {0, 2, 3, 4}, "BENIGN_WITHOUT_CALLBACK": {2, 3}, "NORMAL": {1}}


def _seed_with_two_lesion_image() -> int:
    """First seed whose tiny data set has an image with two abnormalities (cheap: plans only)."""
    for seed in range(SEED, SEED + 200):
        plans = [plan_site(site, PER_SITE, seed=seed, test_fraction=0.25) for site in range(SITES)]
        if any(len(image.lesions) == 2 for exams in plans for exam in exams for image in exam.images):
            return seed
    raise AssertionError("no seed in range gives a two-lesion image")


@pytest.fixture(scope="module")
def seed() -> int:
    return _seed_with_two_lesion_image()


def _generate(root: Path, seed: int, **overrides) -> SynthSummary:
    arguments = {"sites": SITES, "per_site": PER_SITE, "size": SIZE, "seed": seed, "test_fraction": 0.25,
                 "burned_in_text": 0.5} | overrides
    return synthesize_dataset(root, **arguments)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, seed: int) -> SynthSummary:
    return _generate(tmp_path_factory.mktemp("synth") / "out", seed)


def _rows(site_dir: Path) -> list[dict[str, str]]:
    """Every CSV row of a site, with the CSV's kind and split added."""
    rows = []
    for path in sorted((site_dir / "csv").glob("*.csv")):
        kind, split = re.match(r"(mass|calc|normal)_case_description_(train|test)_set\.csv", path.name).groups()
        with path.open(newline="") as handle:
            rows.extend(row | {"_kind": kind, "_split": split} for row in csv.DictReader(handle))
    return rows


def _images(summary: SynthSummary) -> list[tuple[str, dict[str, str], pydicom.Dataset]]:
    """(site id, first CSV row, dataset) of every full-field image."""
    images = []
    for site in summary.sites:
        first_rows = {}
        for row in _rows(summary.out_dir / site):
            first_rows.setdefault(row["image file path"], row)
        for path, row in sorted(first_rows.items()):
            images.append((site, row, pydicom.dcmread(summary.out_dir / site / "CBIS-DDSM" / path)))
    return images


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels in [0, 1], 1 = white, through the file's own window and photometric interpretation."""
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    shown = np.clip((ds.pixel_array.astype(float) - (center - width / 2)) / width, 0.0, 1.0)
    return 1.0 - shown if ds.PhotometricInterpretation == "MONOCHROME1" else shown


def _display_white(ds: pydicom.Dataset) -> int:
    return (1 << ds.BitsStored) - 1 if ds.PhotometricInterpretation == "MONOCHROME2" else 0


# --- layout and CSVs -----------------------------------------------------------------------------


def test_layout_has_manifest_csvs_and_dicom_tree(dataset: SynthSummary, seed: int) -> None:
    assert dataset.sites == ("site-01", "site-02", "site-03")
    manifest = json.loads((dataset.out_dir / "manifest.json").read_text())
    assert (manifest["seed"], manifest["size"]) == (seed, SIZE)
    for site in dataset.sites:
        names = sorted(path.name for path in (dataset.out_dir / site / "csv").iterdir())
        assert names == sorted(f"{kind}_case_description_{split}_set.csv"
                               for kind in ("mass", "calc", "normal") for split in ("train", "test"))
        assert (dataset.out_dir / site / "CBIS-DDSM").is_dir()
        assert manifest["sites"][site]["counts"] == dataset.counts[site]


def test_csv_headers_are_exactly_cbis_ddsm(dataset: SynthSummary) -> None:
    for site in dataset.sites:
        for path in (dataset.out_dir / site / "csv").glob("*.csv"):
            header = path.read_text().splitlines()[0]
            assert header == (CALC_HEADER if path.name.startswith("calc") else MASS_HEADER), path.name


def test_csv_paths_are_relative_real_files_in_cbis_folders(dataset: SynthSummary) -> None:
    for site in dataset.sites:
        root = dataset.out_dir / site / "CBIS-DDSM"
        for row in _rows(dataset.out_dir / site):
            image_path = row["image file path"]
            folder = image_path.split("/")[0]
            prefix, split_word, patient_id, side, view = FOLDER.match(folder).groups()
            assert "\\" not in image_path and not image_path.startswith("/")
            assert image_path.endswith("/000000.dcm") and len(image_path.split("/")) == 4
            assert (root / image_path).is_file()
            assert (patient_id, side, view) == (row["patient_id"], row["left or right breast"], row["image view"])
            assert split_word == {"train": "Training", "test": "Test"}[row["_split"]]
            assert prefix == {"mass": "Mass", "calc": "Calc", "normal": "Normal"}[row["_kind"]]
            if row["_kind"] == "normal":
                assert (row["ROI mask file path"], row["cropped image file path"]) == ("", "")
                continue
            roi_folder = f"{folder}_{row['abnormality id']}"
            assert row["ROI mask file path"].split("/")[0] == roi_folder
            assert row["ROI mask file path"].endswith("/000000.dcm")
            assert row["cropped image file path"].endswith("/000001.dcm")
            assert (root / row["ROI mask file path"]).is_file() and (root / row["cropped image file path"]).is_file()


def test_csv_values_use_cbis_vocabulary_and_consistent_assessment(dataset: SynthSummary) -> None:
    for site in dataset.sites:
        for row in _rows(dataset.out_dir / site):
            density = row["breast density"] if row["_kind"] == "calc" else row["breast_density"]
            assert density in {"1", "2", "3", "4"}
            assert int(row["assessment"]) in ASSESSMENTS[row["pathology"]]
            expected_type = {"mass": "mass", "calc": "calcification", "normal": "normal"}[row["_kind"]]
            assert row["abnormality type"] == expected_type
            if row["_kind"] == "normal":
                assert (row["abnormality id"], row["pathology"], row["subtlety"]) == ("0", "NORMAL", "")
            else:
                assert row["pathology"] in {"BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT"}
                assert 1 <= int(row["subtlety"]) <= 5


def test_an_image_with_two_abnormalities_has_one_row_per_abnormality(dataset: SynthSummary) -> None:
    ids_by_image: dict[str, list[str]] = defaultdict(list)
    for site in dataset.sites:
        for row in _rows(dataset.out_dir / site):
            if row["_kind"] != "normal":
                ids_by_image[site + row["image file path"]].append(row["abnormality id"])
    assert any(len(ids) == 2 for ids in ids_by_image.values())
    for ids in ids_by_image.values():
        assert sorted(ids) == [str(number) for number in range(1, len(ids) + 1)]


def test_split_is_by_patient(dataset: SynthSummary) -> None:
    for site in dataset.sites:
        splits_by_patient = defaultdict(set)
        for row in _rows(dataset.out_dir / site):
            splits_by_patient[row["patient_id"]].add(row["_split"])
        assert all(len(splits) == 1 for splits in splits_by_patient.values())
        assert {"train", "test"} == set().union(*splits_by_patient.values())


def test_a_lesion_shows_in_every_view_of_its_breast_and_the_other_breast_is_normal(dataset: SynthSummary) -> None:
    for site in dataset.sites:
        kinds_by_breast = defaultdict(set)
        for row in _rows(dataset.out_dir / site):
            kinds_by_breast[row["patient_id"], row["left or right breast"]].add((row["image view"], row["_kind"]))
        for kinds in kinds_by_breast.values():
            assert len({kind for _, kind in kinds}) == 1, kinds
        abnormal_patients = {patient for (patient, _), kinds in kinds_by_breast.items()
                             if any(kind != "normal" for _, kind in kinds)}
        for patient in abnormal_patients:
            sides = [kinds for (p, _), kinds in kinds_by_breast.items() if p == patient]
            assert sum(any(kind != "normal" for _, kind in kinds) for kinds in sides) == 1


# --- non-IID sites ---------------------------------------------------------------------------------


def test_image_counts_add_up_and_differ_between_sites(dataset: SynthSummary) -> None:
    per_site = [tuple(sum(dataset.counts[site][split][name] for split in ("train", "test"))
                      for name in ("normal", "benign", "malignant")) for site in dataset.sites]
    assert all(sum(counts) == PER_SITE for counts in per_site)
    assert len(set(per_site)) == SITES
    assert dataset.total_images == SITES * PER_SITE == len(_images(dataset))


def test_sites_have_different_label_priors() -> None:
    malignant_share = []
    for site in range(3):
        labels = [image.label for exam in plan_site(site, 400, seed=0, test_fraction=0.2) for image in exam.images]
        malignant_share.append(labels.count(MALIGNANT) / len(labels))
    assert max(malignant_share) - min(malignant_share) > 0.2


def test_sites_have_different_scanners(dataset: SynthSummary) -> None:
    scanners = {site: (ds.file_meta.TransferSyntaxUID, ds.PhotometricInterpretation, ds.BitsStored,
                       ds.ManufacturerModelName) for site, _, ds in _images(dataset)}
    assert scanners["site-01"][:3] == (ExplicitVRLittleEndian, "MONOCHROME2", 12)
    assert scanners["site-02"][:3] == (ExplicitVRLittleEndian, "MONOCHROME1", 14)
    assert scanners["site-03"][:3] == (RLELossless, "MONOCHROME2", 12)
    assert len({model for *_, model in scanners.values()}) == 3


# --- DICOM files -------------------------------------------------------------------------------------


def test_mammograms_are_conformant_and_decode(dataset: SynthSummary) -> None:
    for site, row, ds in _images(dataset):
        assert ds.preamble is not None and ds.file_meta.MediaStorageSOPClassUID == MAMMOGRAPHY_FOR_PRESENTATION
        assert (ds.SOPClassUID, ds.Modality, ds.PresentationIntentType) == (
            MAMMOGRAPHY_FOR_PRESENTATION, "MG", "FOR PRESENTATION")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID.startswith("2.25.") and ds.FrameOfReferenceUID.startswith("2.25.")
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, round(0.8 * SIZE)) and pixels.dtype == np.uint16
        assert (ds.BitsAllocated, ds.PixelRepresentation, ds.HighBit) == (16, 0, ds.BitsStored - 1)
        assert pixels.max() < (1 << ds.BitsStored)
        assert ds.ImageLaterality == row["left or right breast"][0] and ds.ViewPosition == row["image view"]
        assert ds.ViewCodeSequence[0].CodeValue == {"CC": "399162004", "MLO": "399368009"}[ds.ViewPosition]
        assert ds.PatientSex == "F" and ds.PatientName and ds.AccessionNumber and ds.InstitutionName


def test_roi_masks_are_binary_full_size_and_crops_are_smaller(dataset: SynthSummary) -> None:
    checked = 0
    for site in dataset.sites:
        root = dataset.out_dir / site / "CBIS-DDSM"
        for row in _rows(dataset.out_dir / site):
            if row["_kind"] == "normal":
                continue
            mask = pydicom.dcmread(root / row["ROI mask file path"])
            crop = pydicom.dcmread(root / row["cropped image file path"])
            assert mask.BitsAllocated == 8 and set(np.unique(mask.pixel_array)) == {0, 255}
            assert mask.pixel_array.shape == (SIZE, round(0.8 * SIZE))
            assert crop.pixel_array.size < mask.pixel_array.size
            checked += 1
    assert checked > 0


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(
        tmp_path: Path, dataset: SynthSummary, seed: int) -> None:
    again = _generate(tmp_path / "again", seed)
    first = {path.relative_to(dataset.out_dir): path.read_bytes() for path in dataset.out_dir.rglob("*") if path.is_file()}
    second = {path.relative_to(again.out_dir): path.read_bytes() for path in again.out_dir.rglob("*") if path.is_file()}
    assert first == second
    other = _generate(tmp_path / "other", seed + 1, sites=1, per_site=4, burned_in_text=0.0)
    other_files = {path.relative_to(other.out_dir) for path in other.out_dir.rglob("*.dcm")}
    assert other_files.isdisjoint(first)
    assert not any(ds.BurnedInAnnotation == "YES" for _, _, ds in _images(other))


# --- anatomy, laterality, lesions, text -------------------------------------------------------------


def test_mlo_shows_a_bright_pectoral_corner_and_cc_does_not(dataset: SynthSummary) -> None:
    corner_brightness = defaultdict(list)
    for _, _, ds in _images(dataset):
        shown = _display(ds)
        rows, cols = shown.shape
        corner = shown[round(0.03 * rows):round(0.12 * rows), :round(0.08 * cols)]
        if ds.ImageLaterality == "R":
            corner = shown[round(0.03 * rows):round(0.12 * rows), cols - round(0.08 * cols):]
        corner_brightness[ds.ViewPosition].append(float(corner.mean()))
    assert min(corner_brightness["MLO"]) > 0.5
    assert max(corner_brightness["CC"]) < 0.3


def test_breast_sits_on_the_chest_wall_side_of_its_laterality(dataset: SynthSummary) -> None:
    for _, _, ds in _images(dataset):
        tissue = _display(ds) > 0.15
        column_centroid = np.nonzero(tissue)[1].mean() / tissue.shape[1]
        assert (column_centroid < 0.5) == (ds.ImageLaterality == "L")


@pytest.mark.parametrize("view", ["CC", "MLO"])
@pytest.mark.parametrize("laterality", ["L", "R"])
def test_pure_image_masks_follow_label_view_and_side(view: str, laterality: str) -> None:
    for label in (NORMAL, BENIGN, MALIGNANT):
        spec, image = synthesize_image(label, size=128, view=view, laterality=laterality, seed=11)
        assert spec.label == label and len(image.lesion_masks) == len(spec.lesions)
        assert (len(image.lesion_masks) > 0) == (label != NORMAL)
        for mask in image.lesion_masks:
            assert mask.shape == image.pixels.shape and mask.any()
            assert (mask & ~image.breast_mask).sum() <= 0.05 * mask.sum()
        assert image.pectoral_mask.any() == (view == "MLO")
        chest_wall_half = image.breast_mask[:, :64] if laterality == "L" else image.breast_mask[:, -64:]
        assert chest_wall_half.sum() > 0.6 * image.breast_mask.sum()


def test_lesions_smaller_than_a_pixel_still_have_a_roi_at_the_smallest_size() -> None:
    for seed in range(6):
        for label in (BENIGN, MALIGNANT):
            _, image = synthesize_image(label, size=32, view="MLO" if seed % 2 else "CC", seed=seed)
            assert image.pixels.shape == (32, 26)
            assert all(mask.any() for mask in image.lesion_masks)


def test_burned_in_text_is_in_the_pixels_exactly_when_declared(dataset: SynthSummary) -> None:
    declared = []
    for _, _, ds in _images(dataset):
        ink = ds.pixel_array == _display_white(ds)
        declared.append(ds.BurnedInAnnotation)
        assert ink.any() == (ds.BurnedInAnnotation == "YES")
        if ink.any():
            ink_rows, ink_cols = np.nonzero(ink)
            assert ink_rows.max() < 0.15 * SIZE
            anterior_half = ink_cols >= ds.Columns / 2 if ds.ImageLaterality == "L" else ink_cols < ds.Columns / 2
            assert anterior_half.all()
    assert {"YES", "NO"} == set(declared)


def test_identifying_metadata_carries_patient_values_into_nested_and_private_items() -> None:
    patient = FakePatient("CANARY^ALICE", "MRN-CANARY-1", "OTHER-CANARY-2", dt.date(1960, 5, 17))
    study = FakeStudy(dt.datetime(2020, 2, 3, 9, 30), "ACC-CANARY", "77", "DOC^CANARY", "RAD^CANARY",
                      "TECH^CANARY", "RP-CANARY", "SPS-CANARY", "2.25.1234")
    institution = Institution("Canary Hospital", "1 Canary Road", "Breast Imaging", "CANARY-ST", "SN-CANARY")
    ds = identifying_metadata(patient, study, institution)
    assert (ds.PatientName, ds.PatientID, ds.PatientAge) == ("CANARY^ALICE", "MRN-CANARY-1", "059Y")
    assert ds.OtherPatientIDsSequence[0].PatientID == "OTHER-CANARY-2"
    assert ds.RequestAttributesSequence[0].ScheduledProcedureStepID == "SPS-CANARY"
    block = ds.private_block(0x0029, "SYNTHMAMMO 1.0")
    middle = block[0x11].value[0]
    innermost = middle.private_block(0x0029, "SYNTHMAMMO 1.0")[0x12].value[0]
    assert "MRN-CANARY-1" in block[0x10].value
    assert innermost.private_block(0x0029, "SYNTHMAMMO 1.0")[0x13].value == "CANARY^ALICE"


# --- arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argument", "value", "valid"), [
    ("sites", 0, ">= 1"),
    ("per_site", 0, ">= 1"),
    ("size", 31, "[32, 6000]"),
    ("size", 6001, "[32, 6000]"),
    ("seed", -1, ">= 0"),
    ("test_fraction", 1.5, "[0, 1]"),
    ("burned_in_text", -0.1, "[0, 1]"),
])
def test_invalid_arguments_raise_data_error_naming_argument_and_range(
        tmp_path: Path, argument: str, value: float, valid: str) -> None:
    with pytest.raises(DataError) as error:
        synthesize_dataset(tmp_path / "out", **{argument: value})
    assert argument in str(error.value) and valid in str(error.value)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_directory(tmp_path: Path) -> None:
    (tmp_path / "stale.txt").write_text("left over")
    with pytest.raises(DataError, match="out_dir"):
        synthesize_dataset(tmp_path, sites=1, per_site=1, size=32)
