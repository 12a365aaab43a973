"""Dividing records among federated sites, and a site's records into train and validation.

Every split here is by patient: one patient's images never end up on two sites or
on both sides of a train/validation split, since views of the same breast would
leak the answer. A patient is (site_id, patient_id), so that pooled sites which
reuse local patient ids keep their patients apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from common.data.images import is_raster, read_dicom_header
from common.data.records import ImageRecord
from common.errors import DataError

SCHEMES = ("site", "iid", "dirichlet", "scanner")
UNKNOWN_SCANNER = "unknown"

PatientKey = tuple[str, str]
Patients = dict[PatientKey, list[ImageRecord]]


def site_name(index: int) -> str:
    """The id of the `index`-th (0-based) simulated site: site-01, site-02, ..."""
    return f"site-{index + 1:02d}"


def partition_records(
    records: Sequence[ImageRecord],
    scheme: str,
    num_sites: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> dict[str, list[ImageRecord]]:
    """Give each of `num_sites` sites its records, by patient, following `scheme`.

    - "site": the records' own `site_id` (real sites); a non-zero `num_sites` must
      match their number, 0 takes the sites as found.
    - "iid": patients shuffled and dealt evenly.
    - "dirichlet": label skew; each class's patients split by Dirichlet(alpha) shares.
    - "scanner": each scanner model goes to one site (scanner read from the DICOM
      header when the record has none).
    Every site gets at least one patient. Deterministic for a given `seed`.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be greater than 0, got {alpha}")
    if scheme == "site":
        return _by_site_id(records, num_sites)
    if num_sites < 1:
        raise DataError(f"num_sites must be at least 1 for scheme {scheme!r}, got {num_sites}")
    if scheme == "scanner":
        records = [_with_scanner(record) for record in records]
    patients = group_by_patient(records)
    if len(patients) < num_sites:
        raise DataError(
            f"cannot give {num_sites} sites a patient each: the records hold only "
            f"{len(patients)} patients"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        assignment = _deal_evenly(sorted(patients), num_sites, rng)
    elif scheme == "dirichlet":
        assignment = _dirichlet_label_skew(patients, num_sites, alpha, rng)
    else:
        assignment = _one_site_per_scanner(patients, num_sites)
    return {
        site_name(site): [record for key in keys for record in patients[key]]
        for site, keys in enumerate(assignment)
    }


def split_train_val(
    records: Sequence[ImageRecord], validation_split: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out about `validation_split` of the patients for validation, stratified by label.

    A patient's label is its most severe image label. With a positive split and at
    least two patients, both sides get at least one patient.
    """
    if not 0 <= validation_split < 1:
        raise DataError(f"validation_split must be in [0, 1), got {validation_split}")
    patients = group_by_patient(records)
    by_label = _keys_by_label(patients)
    total = round(len(patients) * validation_split)
    if validation_split > 0 and len(patients) >= 2:
        total = min(max(total, 1), len(patients) - 1)
    rng = np.random.default_rng(seed)
    held_out: set[PatientKey] = set()
    for keys, count in zip(by_label.values(), apportion(total, [len(k) for k in by_label.values()])):
        held_out.update(keys[i] for i in rng.permutation(len(keys))[:count])
    train = [record for record in records if patient_key(record) not in held_out]
    val = [record for record in records if patient_key(record) in held_out]
    return train, val


def patient_key(record: ImageRecord) -> PatientKey:
    """Who the image belongs to: (site_id, patient_id), site "" when unknown."""
    return (record.site_id or "", record.patient_id)


def group_by_patient(records: Sequence[ImageRecord]) -> Patients:
    """Records grouped by patient, in the order patients first appear."""
    patients: Patients = {}
    for record in records:
        patients.setdefault(patient_key(record), []).append(record)
    return patients


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to `weights` that sum to `total` (largest remainder).

    No share exceeds its weight's exact quota rounded up, so splitting a list of
    n items by their own sizes never asks a group for more items than it has.
    """
    weights_array = np.asarray(weights, dtype=np.float64)
    if total == 0 or weights_array.sum() <= 0:
        return [0] * len(weights)
    quotas = total * weights_array / weights_array.sum()
    shares = np.floor(quotas).astype(int)
    # Stable sort: equal remainders go to the earlier entry.
    for index in np.argsort(-(quotas - shares), kind="stable")[: total - shares.sum()]:
        shares[index] += 1
    return shares.tolist()


def _by_site_id(records: Sequence[ImageRecord], num_sites: int) -> dict[str, list[ImageRecord]]:
    sites: dict[str, list[ImageRecord]] = {}
    for record in records:
        if record.site_id is None:
            raise DataError(
                f"{record.image_path}: scheme 'site' needs every record's site_id; load "
                "the data with load_site_folders or choose another scheme"
            )
        sites.setdefault(record.site_id, []).append(record)
    if num_sites != 0 and len(sites) != num_sites:
        raise DataError(
            f"scheme 'site' found {len(sites)} sites in the records but num_sites is {num_sites}"
        )
    return dict(sorted(sites.items()))


def _keys_by_label(patients: Patients) -> dict[int, list[PatientKey]]:
    """Patient keys (sorted, so input order does not matter) grouped by patient label."""
    by_label: dict[int, list[PatientKey]] = {}
    for key in sorted(patients):
        by_label.setdefault(max(r.label for r in patients[key]), []).append(key)
    return dict(sorted(by_label.items()))


def _deal_evenly(
    keys: list[PatientKey], num_sites: int, rng: np.random.Generator
) -> list[list[PatientKey]]:
    shuffled = [keys[i] for i in rng.permutation(len(keys))]
    return [shuffled[site::num_sites] for site in range(num_sites)]


def _dirichlet_label_skew(
    patients: Patients, num_sites: int, alpha: float, rng: np.random.Generator
) -> list[list[PatientKey]]:
    """Each label's patients split among sites by fresh Dirichlet(alpha) shares.

    Small alpha concentrates each label on few sites; sites left empty then take
    one patient from the largest site so that every site can train.
    """
    assignment: list[list[PatientKey]] = [[] for _ in range(num_sites)]
    for keys in _keys_by_label(patients).values():
        shuffled = [keys[i] for i in rng.permutation(len(keys))]
        counts = apportion(len(keys), rng.dirichlet([alpha] * num_sites))
        bounds = np.cumsum([0, *counts])
        for site in range(num_sites):
            assignment[site].extend(shuffled[bounds[site] : bounds[site + 1]])
    for empty in (site for site in range(num_sites) if not assignment[site]):
        largest = max(range(num_sites), key=lambda site: len(assignment[site]))
        assignment[empty].append(assignment[largest].pop())
    return assignment


def _one_site_per_scanner(patients: Patients, num_sites: int) -> list[list[PatientKey]]:
    """Scanner groups, largest first, each to the site with the fewest images so far."""
    by_scanner: dict[str, list[PatientKey]] = {}
    for key in sorted(patients):
        by_scanner.setdefault(_patient_scanner(patients[key]), []).append(key)
    if len(by_scanner) < num_sites:
        raise DataError(
            f"scheme 'scanner' needs at least num_sites={num_sites} distinct scanner models; "
            f"the records hold {len(by_scanner)}: {', '.join(sorted(by_scanner))}"
        )
    scanner_images = {s: sum(len(patients[k]) for k in keys) for s, keys in by_scanner.items()}
    site_images = [0] * num_sites
    assignment: list[list[PatientKey]] = [[] for _ in range(num_sites)]
    for scanner in sorted(by_scanner, key=lambda s: (-scanner_images[s], s)):
        emptiest = min(range(num_sites), key=lambda site: (site_images[site], site))
        assignment[emptiest].extend(by_scanner[scanner])
        site_images[emptiest] += scanner_images[scanner]
    return assignment


def _patient_scanner(records: list[ImageRecord]) -> str:
    """The scanner most of a patient's images were taken on (ties: alphabetical first)."""
    counts = Counter(record.scanner or UNKNOWN_SCANNER for record in records)
    return min(counts, key=lambda scanner: (-counts[scanner], scanner))


def _with_scanner(record: ImageRecord) -> ImageRecord:
    """The record with `scanner` filled from its DICOM header (Manufacturer + model name)."""
    if record.scanner is not None:
        return record
    return replace(record, scanner=read_scanner_model(record))


def read_scanner_model(record: ImageRecord) -> str:
    """The image's scanner as "Manufacturer ManufacturerModelName" from its DICOM header.

    JPEG/PNG exports carry no header and, like headers without both, give "unknown".
    """
    if is_raster(record.image_path):
        return UNKNOWN_SCANNER
    header = read_dicom_header(record.image_path, ["Manufacturer", "ManufacturerModelName"])
    parts = [str(header.get(keyword) or "").strip() for keyword in ("Manufacturer", "ManufacturerModelName")]
    return " ".join(part for part in parts if part) or UNKNOWN_SCANNER
