"""Partitioning never splits a patient, fills every site and follows its scheme's skew."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.data.partition import apportion, partition_records, split_train_val
from common.data.records import ImageRecord
from common.errors import DataError
from tests.fixtures.cbis_layouts import write_dicom


def make_records(patients=60, images_per_patient=2, site_id=None):
    """Patients with a few images each; labels cycle 0,1,2 by patient (all images alike)."""
    return [
        ImageRecord(
            image_path=Path(f"/data/P_{p:05d}_{i}.dcm"),
            label=p % 3,
            split="train",
            patient_id=f"P_{p:05d}",
            site_id=site_id,
        )
        for p in range(patients)
        for i in range(images_per_patient)
    ]


def patients_of(records):
    return {(r.site_id, r.patient_id) for r in records}


def assert_is_a_patient_partition(sites, records):
    everything = [r for site in sites.values() for r in site]
    assert sorted(map(str, (r.image_path for r in everything))) == sorted(str(r.image_path) for r in records)
    seen = [patients_of(site) for site in sites.values()]
    assert sum(map(len, seen)) == len(set().union(*seen)), "a patient is on two sites"
    assert all(sites.values()), "a site is empty"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_schemes_partition_by_patient_into_named_non_empty_sites(scheme):
    records = make_records()

    sites = partition_records(records, scheme, 4, seed=1)

    assert list(sites) == ["site-01", "site-02", "site-03", "site-04"]
    assert_is_a_patient_partition(sites, records)


def test_iid_sites_get_equal_patient_counts():
    sites = partition_records(make_records(patients=61), "iid", 4, seed=0)

    assert sorted(len(patients_of(s)) for s in sites.values()) == [15, 15, 15, 16]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_deterministic_per_seed(scheme):
    records = make_records()

    first = partition_records(records, scheme, 3, seed=7)

    assert first == partition_records(records, scheme, 3, seed=7)
    assert first != partition_records(records, scheme, 3, seed=8)


def _mean_majority_share(sites):
    shares = [Counter(r.label for r in s).most_common(1)[0][1] / len(s) for s in sites.values()]
    return float(np.mean(shares))


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha():
    records = make_records(patients=300, images_per_patient=1)

    skewed = partition_records(records, "dirichlet", 5, alpha=0.1, seed=0)
    balanced = partition_records(records, "dirichlet", 5, alpha=100.0, seed=0)

    assert _mean_majority_share(skewed) > 0.7 > 0.45 > _mean_majority_share(balanced)


def test_tiny_alpha_still_gives_every_site_a_patient():
    records = make_records(patients=12)

    sites = partition_records(records, "dirichlet", 10, alpha=0.001, seed=3)

    assert_is_a_patient_partition(sites, records)


def test_site_scheme_uses_the_records_own_sites():
    records = make_records(10, site_id="hospital-a") + make_records(6, site_id="hospital-b")

    sites = partition_records(records, "site", 2)

    assert {name: len(s) for name, s in sites.items()} == {"hospital-a": 20, "hospital-b": 12}
    assert partition_records(records, "site", 0) == sites  # 0: as many sites as the records name


def test_site_scheme_needs_site_ids_and_a_matching_count():
    with pytest.raises(DataError, match="site_id"):
        partition_records(make_records(4), "site", 1)
    with pytest.raises(DataError, match="found 1 sites.*num_sites is 2"):
        partition_records(make_records(4, site_id="site-01"), "site", 2)


def test_same_patient_id_at_two_sites_is_two_patients():
    records = make_records(3, site_id="site-01") + make_records(3, site_id="site-02")

    sites = partition_records(records, "iid", 6, seed=0)

    assert all(len(patients_of(s)) == 1 for s in sites.values())


def _scanner_records(tmp_path, models):
    records = []
    for index, model in enumerate(models):
        path = write_dicom(tmp_path / f"{index}.dcm", np.zeros((2, 2), dtype=np.uint16),
                           manufacturer="ACME", model=model)
        records.append(ImageRecord(path, label=index % 3, split="train", patient_id=f"P_{index:05d}"))
    return records


def test_scanner_scheme_reads_models_from_headers_and_keeps_each_on_one_site(tmp_path):
    records = _scanner_records(tmp_path, ["A"] * 4 + ["B"] * 3 + ["C"] * 2 + ["D"])

    sites = partition_records(records, "scanner", 2)

    assert_is_a_patient_partition(sites, records)
    scanners = [{r.scanner for r in s} for s in sites.values()]
    assert scanners[0].isdisjoint(scanners[1])
    assert set().union(*scanners) == {"ACME A", "ACME B", "ACME C", "ACME D"}
    assert sorted(len(s) for s in sites.values()) == [5, 5]


def test_scanner_scheme_needs_as_many_scanners_as_sites(tmp_path):
    records = _scanner_records(tmp_path, ["A", "A", "B"])

    with pytest.raises(DataError, match="at least num_sites=3 distinct scanner models.*hold 2"):
        partition_records(records, "scanner", 3)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("kmeans", 2), "valid: site, iid, dirichlet, scanner"),
        (("iid", 0), "num_sites must be at least 1 for scheme 'iid'"),
        (("dirichlet", 2), "alpha must be greater than 0"),
    ],
)
def test_invalid_arguments_are_data_errors_naming_what_is_valid(arguments, message):
    with pytest.raises(DataError, match=message):
        partition_records(make_records(6), *arguments, alpha=0.0 if arguments[0] == "dirichlet" else 0.5)


def test_more_sites_than_patients_is_refused():
    with pytest.raises(DataError, match="only 3 patients"):
        partition_records(make_records(3), "iid", 4)


def test_validation_split_is_by_patient_and_stratified():
    records = make_records(patients=30)

    train, val = split_train_val(records, 0.2, seed=0)

    assert patients_of(train).isdisjoint(patients_of(val))
    assert len(train) + len(val) == len(records)
    assert Counter(r.label for r in val) == {0: 4, 1: 4, 2: 4}  # 2 patients x 2 images per label


def test_validation_split_is_deterministic_and_seed_dependent():
    records = make_records(patients=30)

    assert split_train_val(records, 0.3, 1) == split_train_val(records, 0.3, 1)
    assert split_train_val(records, 0.3, 1) != split_train_val(records, 0.3, 2)


def test_tiny_positive_split_still_holds_out_one_patient():
    train, val = split_train_val(make_records(patients=2), 0.05, seed=0)

    assert len(patients_of(val)) == 1 and len(patients_of(train)) == 1


def test_zero_split_keeps_everything_for_training():
    records = make_records(patients=5)

    assert split_train_val(records, 0.0, seed=0) == (records, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_validation_split_outside_unit_interval_is_refused(fraction):
    with pytest.raises(DataError, match=r"validation_split must be in \[0, 1\)"):
        split_train_val(make_records(4), fraction, seed=0)


def test_apportion_sums_to_total_and_never_exceeds_a_group():
    sizes = [7, 1, 3, 0]

    shares = apportion(5, sizes)

    assert sum(shares) == 5 and all(s <= n for s, n in zip(shares, sizes))
