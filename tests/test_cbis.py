"""The CBIS-DDSM loader reads all three published layouts into the same image-level records."""

import logging
import shutil

import pytest

from common.data.cbis import FULL_MAMMOGRAM, DirectResolver, load_cbis_ddsm, load_site_folders, read_case_rows
from common.data.records import BENIGN, MALIGNANT, NORMAL
from common.errors import DataError
from tests.fixtures.cbis_layouts import (
    CASES,
    MASS_HEADER,
    build_direct_tree,
    build_kaggle_tree,
    build_tcia_tree,
)

BUILDERS = {
    "direct": build_direct_tree,
    "tcia": build_tcia_tree,
    "tcia without metadata.csv": lambda root: build_tcia_tree(root, with_metadata=False),
    "kaggle": build_kaggle_tree,
}


@pytest.fixture(params=BUILDERS.values(), ids=BUILDERS.keys())
def tree(request, tmp_path):
    return request.param(tmp_path / "cbis")


def test_auto_detected_layout_yields_one_record_per_image_with_its_files(tree):
    records = load_cbis_ddsm(tree.root)

    assert {r.image_path: r.roi_mask_paths for r in records} == {
        path: expected.masks for path, expected in tree.expected.items()
    }


def test_image_label_is_the_most_severe_pathology_and_metadata_is_kept(tree):
    records = {r.image_path: r for r in load_cbis_ddsm(tree.root, layout=tree.layout)}

    for path, expected in tree.expected.items():
        record, case = records[path], expected.case
        assert record.label == case.expected_label
        assert record.split == case.split and record.patient_id == case.patient_id
        assert record.laterality == case.side[0] and record.view == case.view
        assert record.breast_density == case.expected_density


def test_labels_map_cbis_pathologies_onto_three_classes(tmp_path):
    tree = build_direct_tree(tmp_path)
    by_folder = {e.case.folder: e.case for e in tree.expected.values()}

    labels = {r.image_path.parts[-4]: r.label for r in load_cbis_ddsm(tmp_path)}

    assert labels["Mass-Training_P_00001_LEFT_CC"] == MALIGNANT  # MALIGNANT + BENIGN rows
    assert labels["Mass-Training_P_00001_LEFT_MLO"] == BENIGN  # BENIGN_WITHOUT_CALLBACK
    assert labels["Normal-Training_P_09001_LEFT_CC"] == NORMAL
    assert set(labels) == set(by_folder)


def test_both_density_spellings_and_the_official_split_are_read(tmp_path):
    build_direct_tree(tmp_path)

    records = {r.image_path.parts[-4]: r for r in load_cbis_ddsm(tmp_path)}

    assert records["Mass-Training_P_00001_LEFT_CC"].breast_density == 3  # breast_density column
    assert records["Calc-Test_P_00038_RIGHT_CC"].breast_density == 2  # "breast density" column
    assert records["Calc-Test_P_00038_RIGHT_CC"].split == "test"
    assert records["Calc-Test_P_00038_RIGHT_CC"].abnormality_types == ("calcification",)
    assert records["Normal-Training_P_09001_LEFT_CC"].abnormality_types == ()


def test_tcia_and_kaggle_pick_the_full_size_mask_not_the_crop_sharing_its_series(tmp_path):
    for build in (build_tcia_tree, build_kaggle_tree):
        tree = build(tmp_path / build.__name__)

        records = load_cbis_ddsm(tree.root)

        masks = [mask for r in records for mask in r.roi_mask_paths]
        assert masks and all(mask in {m for e in tree.expected.values() for m in e.masks} for mask in masks)


def test_kaggle_row_without_series_description_still_resolves(tmp_path):
    tree = build_kaggle_tree(tmp_path, blank_description_for=CASES[0].folder)

    assert {r.image_path for r in load_cbis_ddsm(tmp_path)} == set(tree.expected)


def test_missing_image_names_csv_row_and_path(tmp_path):
    tree = build_direct_tree(tmp_path)
    missing = next(p for p, e in tree.expected.items() if e.case.kind == "calc")
    missing.unlink()

    with pytest.raises(DataError) as error:
        load_cbis_ddsm(tmp_path, layout="direct")

    message = str(error.value)
    assert "calc_case_description_test_set.csv data row 1" in message
    assert "image file path" in message and "Calc-Test_P_00038_RIGHT_CC/" in message


def test_skip_missing_drops_the_image_and_reports_the_count(tmp_path, caplog):
    tree = build_tcia_tree(tmp_path)
    shutil.rmtree(tmp_path / "CBIS-DDSM" / "Calc-Test_P_00038_RIGHT_CC")

    with caplog.at_level(logging.WARNING):
        records = load_cbis_ddsm(tmp_path, skip_missing=True)

    assert len(records) == len(tree.expected) - 1
    assert "skipped 1 of 5 rows" in caplog.text


def test_missing_mask_is_an_error_or_dropped_alone_when_skipping(tmp_path):
    tree = build_direct_tree(tmp_path)
    image, expected = next((p, e) for p, e in tree.expected.items() if len(e.masks) == 2)
    expected.masks[1].unlink()

    with pytest.raises(DataError, match="column .roi mask file path. names"):
        load_cbis_ddsm(tmp_path)
    kept = {r.image_path: r for r in load_cbis_ddsm(tmp_path, skip_missing=True)}
    assert kept[image].roi_mask_paths == expected.masks[:1] and kept[image].label == MALIGNANT


def test_unknown_pathology_names_the_valid_values(tmp_path):
    build_direct_tree(tmp_path)
    csv_path = tmp_path / "csv" / "mass_case_description_train_set.csv"
    csv_path.write_text(csv_path.read_text().replace("MALIGNANT", "MALIGNANTT", 1))

    with pytest.raises(DataError, match="pathology.*valid: BENIGN, BENIGN_WITHOUT_CALLBACK, MALIGNANT, NORMAL"):
        load_cbis_ddsm(tmp_path)


def test_missing_required_column_is_named(tmp_path):
    (tmp_path / "csv").mkdir()
    header = MASS_HEADER.replace(",pathology,", ",diagnosis,")
    (tmp_path / "csv" / "mass_case_description_train_set.csv").write_text(header + "\n")

    with pytest.raises(DataError, match="missing column.*pathology"):
        load_cbis_ddsm(tmp_path)


def test_root_without_case_csvs_lists_the_expected_files(tmp_path):
    with pytest.raises(DataError, match="mass_case_description_train_set.csv"):
        load_cbis_ddsm(tmp_path)


def test_unknown_layout_names_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match="valid: auto, direct, tcia, kaggle"):
        load_cbis_ddsm(tmp_path, layout="nbia")


def test_undetectable_layout_says_what_was_looked_for(tmp_path):
    build_direct_tree(tmp_path)
    shutil.rmtree(tmp_path / "CBIS-DDSM")

    with pytest.raises(DataError, match="cannot tell the CBIS-DDSM layout"):
        load_cbis_ddsm(tmp_path)


def test_site_folders_become_site_ids(tmp_path):
    build_direct_tree(tmp_path / "site-01")
    build_kaggle_tree(tmp_path / "hospital-b")
    (tmp_path / "notes").mkdir()

    sites = load_site_folders(tmp_path)

    assert list(sites) == ["hospital-b", "site-01"]
    assert all(r.site_id == site for site, records in sites.items() for r in records)
    assert all(len(records) == len(CASES) for records in sites.values())


def test_root_without_site_folders_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()

    with pytest.raises(DataError, match="site-\\*"):
        load_site_folders(tmp_path)


def test_direct_tree_whose_first_image_was_quarantined_is_still_read_as_direct(tmp_path, caplog):
    # De-identification quarantines images with burned-in text; at 1,000 images a site the first
    # CSV row's image was one of them, and the tree was taken for an NBIA download (0 records).
    tree = build_direct_tree(tmp_path)
    first = DirectResolver(tmp_path).resolve(read_case_rows(tmp_path)[0].image, FULL_MAMMOGRAM)
    first.unlink()

    with caplog.at_level(logging.WARNING):
        records = load_cbis_ddsm(tmp_path, skip_missing=True)

    assert {r.image_path for r in records} == set(tree.expected) - {first}
    assert "direct layout" in caplog.text
