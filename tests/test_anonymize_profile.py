"""The vendored PS3.15 Table E.1-1 and IOD type tables, and how options and types pick an action."""

from __future__ import annotations

import pytest
from pydicom.tag import Tag

from anonymize import iod
from anonymize.profile import (
    DEFAULT_OPTIONS,
    OPTION_HELP,
    DeidentificationOptions,
    load_profile,
    parse_options,
    resolve_by_type,
)
from common.errors import ConfigError

ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


def test_the_table_is_the_2024b_edition_with_every_row_and_option_column() -> None:
    table = load_profile()
    rows = list(table.exact.values()) + [rule for _, _, rule in table.masked] + [table.private]
    assert table.edition == "2024b" and len(rows) == 621
    assert {rule.basic for rule in rows} <= ACTIONS
    columns = {option for rule in rows for option in rule.options}
    assert columns == set(OPTION_HELP) - {"clean_pixel_data"} | {"clean_graphics"}
    assert {action for rule in rows for action in rule.options.values()} == {"K", "C"}


def test_the_table_agrees_with_the_dicom_anonymizer_package_basic_profile_column() -> None:
    anonymizer = pytest.importorskip("dicomanonymizer.dicom_anonymization_databases.dicomfields_2024b")
    table = load_profile()
    assert table.rule_for(Tag(0x00100010)).basic == "Z"
    for entry in anonymizer.X_Z_D_TAGS + anonymizer.U_TAGS + anonymizer.Z_D_TAGS:
        if len(entry) == 2:
            assert table.rule_for(Tag(*entry)).basic in ("X/Z/D", "U", "Z/D")


def test_repeating_groups_match_any_overlay_or_curve_group() -> None:
    table = load_profile()
    assert table.rule_for(Tag(0x60023000)).name == "Overlay Data"
    assert table.rule_for(Tag(0x501E0010)).name == "Curve Data"


@pytest.mark.parametrize(("keyword_tag", "options", "action"), [
    (0x00101010, DeidentificationOptions(), "X"),                        # Patient's Age
    (0x00101010, parse_options("retain_patient_characteristics"), "K"),
    (0x00080020, parse_options("retain_modified_dates"), "C"),           # Study Date
    (0x00080020, parse_options("retain_full_dates"), "K"),
    (0x0018700C, parse_options("retain_device_identity,retain_modified_dates"), "C"),  # calibration date: shifted
    (0x00181002, parse_options("retain_uids,retain_device_identity"), "K"),            # Device UID
    (0x0008103E, parse_options("clean_descriptors"), "C"),               # Series Description
    (0x0008103E, DeidentificationOptions(), "X"),
])
def test_options_decide_the_action_the_most_protective_winning(keyword_tag: int, options, action: str) -> None:
    assert load_profile().rule_for(Tag(keyword_tag)).action(options) == action


@pytest.mark.parametrize(("action", "attribute_type", "chosen"), [
    ("X/Z", "2", "Z"), ("X/Z", "3", "X"), ("X/Z", None, "X"), ("Z/D", "1", "D"), ("Z/D", "2C", "Z"),
    ("X/D", "1C", "D"), ("X/D", "2", "D"), ("X/Z/D", "2", "Z"), ("X/Z/U*", "1", "U"), ("Z", "3", "Z")])
def test_combined_actions_follow_the_attribute_type_in_the_iod(action: str, attribute_type, chosen: str) -> None:
    assert resolve_by_type(action, attribute_type) == chosen


def test_iod_table_knows_the_mammography_requirements() -> None:
    required = iod.required_attributes("1.2.840.10008.5.1.4.1.1.1.2")
    assert required["ImageLaterality"] == "1" and required["PatientID"] == "2" and required["ViewCodeSequence"] == "1"
    assert iod.attribute_type("1.2.840.10008.5.1.4.1.1.1.2", "InstitutionName") == "3"
    assert iod.required_attributes("1.2.3.4") == {}


def test_unknown_or_contradictory_options_are_refused_with_the_valid_names() -> None:
    with pytest.raises(ConfigError, match="valid: retain_safe_private"):
        parse_options("retain_everything")
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_options("retain-full-dates,retain-modified-dates")
    assert parse_options(",".join(DEFAULT_OPTIONS.enabled)) == DEFAULT_OPTIONS
