"""Keyed UIDs, pseudonyms and date shifts; date arithmetic; descriptor scrubbing."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, generate_uid

from anonymize.dates import DateValueError, shift_date, shift_datetime
from anonymize.descriptors import IdentifyingTerms
from anonymize.patients import MAX_SHIFT_DAYS, date_shift_days, is_pseudonym, pseudonym
from anonymize.uids import UidMapper

SECRET = bytes(range(32))


def test_uid_mapping_is_keyed_consistent_one_to_one_and_valid() -> None:
    originals = [generate_uid(entropy_srcs=[str(i)]) for i in range(20000)]
    mapper = UidMapper(SECRET)
    mapped = [mapper.map(uid) for uid in originals]
    assert len(set(mapped)) == len(originals)
    assert mapped == [UidMapper(SECRET).map(uid) for uid in originals]
    assert all(uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid for uid in mapped[:500])
    assert UidMapper(b"\x01" * 32).map(originals[0]) != mapped[0]


def test_mapped_uids_are_recognised_and_never_mapped_twice() -> None:
    mapper = UidMapper(SECRET)
    mapped = mapper.map("1.2.826.0.1.3680043.8.498.1")
    assert mapper.is_mapped(mapped) and mapper.map(mapped) == mapped
    foreign = "2.25.329800735698586629295641978511506172918"
    assert not mapper.is_mapped(foreign) and mapper.map(foreign) != foreign
    assert not UidMapper(b"\x01" * 32).is_mapped(mapped)


def test_well_known_uids_pass_through() -> None:
    for uid in ("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.4.1.1"):
        assert UidMapper(SECRET).map(uid) == uid


def test_pseudonyms_are_keyed_stable_and_recognisable() -> None:
    name = pseudonym(SECRET, "MRN1234567")
    assert name == pseudonym(SECRET, "MRN1234567") != pseudonym(SECRET, "MRN1234568")
    assert is_pseudonym(SECRET, name) and pseudonym(SECRET, name) == name
    assert not is_pseudonym(b"\x01" * 32, name) and not is_pseudonym(SECRET, "MFLAAAA")
    assert len(name) <= 64 and "MRN" not in name


def test_date_shifts_are_per_patient_never_zero_and_bounded() -> None:
    shifts = [date_shift_days(SECRET, f"P{i}") for i in range(2000)]
    assert all(-MAX_SHIFT_DAYS <= shift <= -1 for shift in shifts)
    assert len(set(shifts)) > 1000
    assert date_shift_days(SECRET, "P1") == date_shift_days(SECRET, "P1")


@pytest.mark.parametrize(("value", "shifted"), [
    ("20190506", "20190501"), ("20190301-20190306", "20190224-20190301"), ("2019", "2018"), ("201903", "201902"),
    ("1997.04.24", "19970419")])
def test_shift_date_moves_whole_days_keeping_precision(value: str, shifted: str) -> None:
    assert shift_date(value, -5) == shifted


@pytest.mark.parametrize(("value", "shifted"), [
    ("20190506101500.123456", "20190501101500.123456"), ("20190506101500+0100", "20190501101500+0100"),
    ("20190506", "20190501"), ("2019", "2018")])
def test_shift_datetime_keeps_time_fraction_and_offset(value: str, shifted: str) -> None:
    assert shift_datetime(value, -5) == shifted


@pytest.mark.parametrize("value", ["2019-05-06", "YESTERDAY", "20191399"])
def test_invalid_dates_raise_without_quoting_the_value(value: str) -> None:
    with pytest.raises(DateValueError) as caught:
        shift_date(value, -5)
    assert value not in str(caught.value)


def test_scrubbing_masks_whole_words_only_and_keeps_lengths() -> None:
    terms = IdentifyingTerms()
    terms.add_name("HALVORSEN^MARIA")
    terms.add_value("MRN1234567")
    terms.add_value("Breast Imaging")
    assert terms.scrub("L CC halvorsen mrn1234567") == "L CC ********* **********"
    assert terms.scrub("MARIANNE BREAST") == "MARIANNE BREAST"
    assert terms.scrub("Breast Imaging dept") == "************** dept"
